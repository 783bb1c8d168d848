//! Evaluation tasks: lm-evaluation-harness-compatible YAML task files, dataset readers, request
//! building with the harness's exact semantics, metrics with standard errors, and bias suites.
//!
//! The crate does not depend on any model: it drives anything that implements [`LanguageModel`].
//! Modules depend one way: `config`, `hub` (Hugging Face Hub datasets in the local cache) and
//! `dataset` (what a task is and reads) <- `task` (documents
//! to requests) <- `suites` (built-in document builders and their metrics) <- `load`, `score`
//! (scoring, owned by the task) <- `runner` (scheduling only).

pub mod bias;
pub mod check;
pub mod config;
pub mod dataset;
mod error;
pub mod filters;
mod format;
pub mod hooks;
pub mod hub;
pub mod lm;
mod load;
pub mod metrics;
pub mod porter;
pub mod pyrandom;
mod pyscore;
mod pytext;
pub mod result;
pub mod rouge;
pub mod runner;
pub mod sacrebleu;
pub mod score;
pub mod suites;
pub mod task;
mod template;
mod ter;

pub use config::{Listing, OutputType, Registry, TaskConfig};
pub use error::{Error, HookFailure, Missing, Result};
pub use hooks::Hooks;
pub use lm::{
    AnsweringModel, Answers, Contribution, EarlyStopping, GenerateRequest, LanguageModel,
    Loglikelihood, LoglikelihoodRequest, ModelError, Sources,
};
pub use result::{Sample, TaskResult};
pub use runner::{evaluate, evaluate_shard, Evaluation, NoProgress, Progress, RunOptions, Shard};
pub use task::{LoadOptions, Task};
pub use template::python_methods;
