use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Messages name the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
    /// The GPU backend could not be used (no driver, no library, a failed launch).
    #[error("{0}")]
    Device(String),
    #[error(transparent)]
    Mask(#[from] routers::MaskError),
    #[error(transparent)]
    Router(#[from] routers::RouterError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tensor computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
