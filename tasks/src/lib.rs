//! Evaluation tasks: lm-evaluation-harness-compatible YAML task files, dataset readers, request
//! building with the harness's exact semantics, metrics with standard errors, and bias suites.
//!
//! The crate does not depend on any model: it drives anything that implements [`LanguageModel`].

pub mod config;
pub mod dataset;
mod error;
pub mod lm;
pub mod pyrandom;
mod template;

pub use config::{OutputType, Registry, TaskConfig};
pub use error::{Error, Result};
pub use lm::{
    EarlyStopping, GenerateRequest, LanguageModel, Loglikelihood, LoglikelihoodRequest, ModelError,
};
pub mod autorater;
pub mod bias;
pub mod cobbler;
pub mod metrics;
pub mod porter;
mod pytext;
pub mod rouge;
pub mod runner;
pub mod sacrebleu;
pub mod sni;
pub mod suite;
pub mod task;
mod ter;

pub use runner::{
    evaluate, evaluate_shard, NoProgress, Progress, RunOptions, Sample, Shard, TaskResult,
};
pub use task::{LoadOptions, Task};
