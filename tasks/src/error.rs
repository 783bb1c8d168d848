use std::path::PathBuf;

/// Everything that can go wrong while loading, rendering, running or scoring a task.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A task or suite file that cannot be read or is malformed.
    #[error("{}: {msg}", file.display())]
    Config { file: PathBuf, msg: String },
    /// A dataset file that cannot be read.
    #[error("dataset {}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    /// A document whose template, target or choices cannot be produced.
    #[error("{} (task `{task}`, doc {doc_id}, field `{field}`): {msg}", file.display())]
    Doc {
        file: PathBuf,
        task: String,
        doc_id: usize,
        field: String,
        msg: String,
    },
    /// A Python hook (`!function`) that raised or returned something unusable, or a hook worker
    /// that could not run it.
    #[error("{0}")]
    Hook(Box<HookFailure>),
    /// A name that is neither a task, a group nor a tag.
    #[error("unknown task `{name}`{hint}")]
    UnknownTask { name: String, hint: String },
    /// The language model failed.
    #[error("model: {0}")]
    Model(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// What [`Error::Hook`] says: `function` is `!function module.name (file.py)`; `at` names the
/// document (`doc 17`) or what the call covered (`split `test``); `msg` carries the traceback.
#[derive(Debug, thiserror::Error)]
#[error("{} (task `{task}`, `{field}`: {function}, {at}): {msg}", file.display())]
pub struct HookFailure {
    pub file: PathBuf,
    pub task: String,
    pub field: String,
    pub function: String,
    pub at: String,
    pub msg: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}
