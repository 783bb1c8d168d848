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
    /// Files of a Hugging Face Hub dataset that are not in the local cache (which ones, where it
    /// looked); the harness downloads them unless `HF_HUB_OFFLINE` is set.
    #[error("{0}")]
    HubMissing(Box<Missing>),
    /// A Hugging Face Hub dataset that cannot give a split whatever is downloaded (unknown
    /// configuration or split, a format moeval does not read, a malformed README.md).
    #[error("dataset `{repo}` (config {config}, split `{split}`, revision `{revision}`): {msg}")]
    Hub {
        repo: String,
        config: String,
        split: String,
        revision: String,
        msg: String,
    },
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

/// Files of a Hugging Face Hub dataset that are not in the local cache: the repository,
/// configuration, split and revision, the folder searched, and what matched nothing there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// The task that needs them, when known.
    pub task: Option<String>,
    /// `owner/name`.
    pub repo: String,
    /// The configuration (`dataset_name`); `None` is the default one.
    pub config: Option<String>,
    pub split: String,
    pub revision: String,
    /// The repository's folder in the cache.
    pub cache_dir: PathBuf,
    /// Per revision searched (the task's, then `refs/convert/parquet`), the repository-relative
    /// files or glob patterns that matched nothing; none when nothing of the revision is cached.
    pub needed: Vec<(String, Vec<String>)>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config = match &self.config {
            Some(c) => format!("`{c}`"),
            None => "default".into(),
        };
        write!(
            f,
            "dataset `{}` (config {config}, split `{}`, revision `{}`) is not in the Hugging Face cache {}:",
            self.repo,
            self.split,
            self.revision,
            self.cache_dir.display()
        )?;
        for (rev, needed) in &self.needed {
            if needed.is_empty() {
                write!(
                    f,
                    " nothing of revision `{rev}` is cached (no `refs/{rev}` or no snapshot);"
                )?;
            } else {
                let list: Vec<String> = needed.iter().map(|n| format!("`{n}`")).collect();
                write!(f, " at `{rev}` no file matches {};", list.join(", "))?;
            }
        }
        let task = self.task.as_deref().unwrap_or("TASK");
        write!(
            f,
            " fetch it with `moeval download --tasks {task} [--include-path DIR]`, or run without HF_HUB_OFFLINE=1 so that `moeval eval` downloads it"
        )
    }
}
