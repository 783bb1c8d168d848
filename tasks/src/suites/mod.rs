//! Built-in suites, for what task data cannot express on its own: Super-NaturalInstructions task
//! files ([`sni`]), FLAMe-format autoraters and RewardBench ([`autorater`]) and CoBBLEr biases
//! ([`cobbler`]). A task opts in with `suite: {kind: ..., ...}`; its YAML still says how a built
//! document becomes requests (`doc_to_text: prompt`, `doc_to_choice: options`, ...).
//!
//! Invariants: `suite.kind` is looked up in one place ([`SUITES`]); a suite builds its documents
//! when the task loads and adds the metrics that span samples after the task is summarised, from
//! the task and its samples alone, so a merged set of shards finishes the same as one run.

pub mod autorater;
pub mod cobbler;
pub mod sni;
mod spec;

use std::path::Path;

pub(crate) use spec::Spec;

use crate::config::TaskConfig;
use crate::dataset::Doc;
use crate::error::{Error, Result};
use crate::metrics::Aggregate;
use crate::result::{Sample, TaskResult};
use crate::task::{LoadOptions, Task};

/// A built-in suite.
pub(crate) trait Suite: Sync {
    /// The `suite.kind` values it answers to.
    fn kinds(&self) -> &'static [&'static str];

    /// Builds the task's documents (few-shot exemplars included: suites run zero-shot).
    fn load(
        &self,
        spec: &Spec,
        split: &str,
        bases: &[&Path],
        opts: &LoadOptions,
    ) -> Result<Vec<Doc>>;

    /// Adds metrics that need more than one sample (correlations, section means, biases over
    /// both orders) and per-sample judge metrics.
    fn finish(&self, _task: &Task, _result: &mut TaskResult) -> Result<()> {
        Ok(())
    }
}

/// Every built-in suite.
const SUITES: &[&dyn Suite] = &[&sni::Sni, &autorater::Autorater, &cobbler::Cobbler];

/// The suite of a task with `suite`, or an error naming the unknown kind.
fn suite_of<'a>(spec: &Spec<'a>) -> Result<&'static dyn Suite> {
    let kind = spec.kind()?;
    SUITES
        .iter()
        .copied()
        .find(|s| s.kinds().contains(&kind))
        .ok_or_else(|| {
            let known: Vec<&str> = SUITES.iter().flat_map(|s| s.kinds()).copied().collect();
            spec.err(format!(
                "unknown suite.kind `{kind}` (known: {})",
                known.join(", ")
            ))
        })
}

/// Builds a suite task's documents (called by [`Task::load`] when the task has `suite`).
pub(crate) fn load_docs(
    cfg: &TaskConfig,
    split: &str,
    bases: &[&Path],
    opts: &LoadOptions,
) -> Result<Vec<Doc>> {
    let spec = Spec::new(cfg).ok_or_else(|| Error::Config {
        file: cfg.file.clone(),
        msg: format!("task `{}` has no suite", cfg.name),
    })?;
    suite_of(&spec)?.load(&spec, split, bases, opts)
}

/// Runs a suite task's [`Suite::finish`]; nothing for tasks without `suite`.
pub(crate) fn finish(task: &Task, result: &mut TaskResult) -> Result<()> {
    match Spec::new(&task.config) {
        Some(spec) => suite_of(&spec)?.finish(task, result),
        None => Ok(()),
    }
}

/// A count reported as a metric (no standard error).
pub(crate) fn count(value: f64, n: usize) -> Aggregate {
    Aggregate {
        value,
        stderr: f64::NAN,
        n,
    }
}

/// Mean of 0/1 (or fractional) values with its standard error; NaN when empty.
pub(crate) fn mean(xs: &[f64]) -> Aggregate {
    if xs.is_empty() {
        return count(f64::NAN, 0);
    }
    let (value, stderr) = crate::metrics::mean_stderr(xs);
    Aggregate {
        value,
        stderr,
        n: xs.len(),
    }
}

/// The document a sample came from.
pub(crate) fn doc_of<'t>(task: &'t Task, sample: &Sample) -> Result<&'t Doc> {
    task.docs().get(sample.doc_id).ok_or_else(|| Error::Doc {
        file: task.config.file.clone(),
        task: task.config.name.clone(),
        doc_id: sample.doc_id,
        field: "doc_id".into(),
        msg: "sample has no document".into(),
    })
}
