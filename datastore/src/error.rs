use std::path::PathBuf;

/// Everything that can go wrong building, opening or querying a store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A malformed input row (only fatal with `strict`; otherwise counted and skipped).
    #[error("{path}:{line}: {reason}")]
    Malformed {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("datastore {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("search index: {0}")]
    Index(#[from] tantivy::TantivyError),
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    pub(crate) fn store(path: impl Into<PathBuf>, message: impl Into<String>) -> Error {
        Error::Store {
            path: path.into(),
            message: message.into(),
        }
    }
}
