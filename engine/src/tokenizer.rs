//! `tokenizer.json` through the `tokenizers` crate.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A model's tokenizer. Encoding never adds special tokens: callers add EOS/BOS prefixes explicitly.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                message:
                    "not found; the model directory needs the tokenizer.json it was trained with"
                        .into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!("cannot load: {e}"),
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode text: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, keeping special tokens out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            message: format!("cannot decode tokens: {e}"),
        })
    }

    /// Id of a token string such as `<|endoftext|>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
