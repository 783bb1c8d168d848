//! Tokenizers that cut documents into blocks: a model's `tokenizer.json`, or bytes (for tests).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Bytes,
}

/// Turns text into token ids and back. Encoding never adds special tokens.
pub struct Tokenizer {
    inner: Inner,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory (or the file itself).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = if dir.is_dir() {
            dir.join("tokenizer.json")
        } else {
            dir.to_path_buf()
        };
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path,
                message:
                    "not found; pass the model directory whose tokenizer.json the store should use"
                        .into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: format!("cannot load: {e}"),
        })?;
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(inner)),
            path,
        })
    }

    /// One token per UTF-8 byte (ids 0-255); for tests and examples.
    pub fn bytes() -> Self {
        Tokenizer {
            inner: Inner::Bytes,
            path: PathBuf::from("<bytes>"),
        }
    }

    /// The file the tokenizer came from (`<bytes>` for the byte tokenizer).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| self.err(format!("cannot encode text: {e}"))),
            Inner::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// Text of `ids`; a block boundary inside a multi-byte character decodes to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t
                .decode(ids, false)
                .map_err(|e| self.err(format!("cannot decode tokens: {e}"))),
            Inner::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    fn err(&self, message: String) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message,
        }
    }
}
