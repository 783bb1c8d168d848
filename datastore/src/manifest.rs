//! `manifest.json`: what a store holds and how it was made. Its SHA-256 is the store's identity.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

pub(crate) const FILE: &str = "manifest.json";
// 2: blocks carry their exact BM25 length (`text_len`).
pub(crate) const FORMAT: u32 = 2;

/// Description of a store. Counts are kept current through opt-outs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    /// Tokens per block and between block starts.
    pub block: usize,
    pub stride: usize,
    /// The tokenizer file and the SHA-256 of its bytes (`bytes` for the byte tokenizer).
    pub tokenizer: String,
    pub tokenizer_sha256: String,
    /// Analyzer and BM25 parameters, for the record.
    pub analyzer: String,
    pub bm25: String,
    /// Input files with their sizes and SHA-256.
    pub inputs: Vec<InputFile>,
    pub documents: u64,
    pub blocks: u64,
    pub tokens: u64,
    /// Malformed rows skipped while building.
    pub skipped_rows: u64,
    /// kNN-LM keys, when built.
    pub knn: Option<KnnInfo>,
    /// Owners and document ids opted out since the build, in order.
    pub excluded_owners: Vec<String>,
    pub excluded_documents: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InputFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The kNN-LM part of a store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KnnInfo {
    /// Model whose final hidden states are the keys, and the SHA-256 of its `config.json` + weights index.
    pub model: String,
    pub model_sha256: String,
    pub dim: usize,
    pub entries: u64,
    /// Key storage (`f16`) and search (`exact`, or `hnsw` through an approximate index).
    pub dtype: String,
    pub search: String,
    /// How the approximate index was built and is searched (with `search` `hnsw`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<crate::ann::AnnSettings>,
    /// Folder of the key files in the store. A writer writes a new folder and switches this name in
    /// one manifest write, so a crash leaves the old keys or the new ones, never a mix.
    #[serde(
        default = "default_knn_dir",
        skip_serializing_if = "is_default_knn_dir"
    )]
    pub dir: String,
}

fn default_knn_dir() -> String {
    crate::knn::DIR.to_string()
}

fn is_default_knn_dir(d: &str) -> bool {
    d == crate::knn::DIR
}

impl Manifest {
    pub(crate) fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::store(
                    dir,
                    "not a datastore (no manifest.json); create one with `moeval datastore build`",
                )
            } else {
                Error::Io {
                    path: path.clone(),
                    source: e,
                }
            }
        })?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Input {
            path: path.clone(),
            message: format!("invalid manifest: {e}"),
        })?;
        if m.format != FORMAT {
            return Err(Error::store(
                dir,
                format!(
                    "format {} is not supported (expected {FORMAT}); rebuild the store",
                    m.format
                ),
            ));
        }
        Ok(m)
    }

    /// Writes the manifest through a temporary file and a rename.
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::store(dir, e.to_string()))?;
        write_atomic(&dir.join(FILE), &json)
    }

    /// SHA-256 (hex) of the manifest as written: the store's identity.
    pub fn identity(&self) -> String {
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        sha256_hex(&json)
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(Error::io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(Error::io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    durable::write_atomic(path, bytes).map_err(Error::io(path))
}

/// Gives `to` the contents of the never-changed file `from`: a hard link, or a copy where the
/// filesystem has none.
pub(crate) fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::hard_link(from, to)
        .or_else(|_| std::fs::copy(from, to).map(|_| ()))
        .map_err(Error::io(to))
}
