//! Built-in suites for what task data cannot express on its own: Super-NaturalInstructions task
//! files ([`crate::sni`]), FLAMe-format autoraters ([`crate::autorater`]) and CoBBLEr biases
//! ([`crate::cobbler`]). A task opts in with `suite: {kind: ..., ...}`; its YAML still says how a
//! built document becomes requests (`doc_to_text: prompt`, `doc_to_choice: options`, ...).
//!
//! Two entry points: [`load_docs`] builds the documents when the task loads, and [`finish`] adds the
//! metrics that need more than one sample (correlations, section means, biases over both orders).
//! `finish` depends only on the task and its samples, so it also works on a merged set of shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::TaskConfig;
use crate::dataset::{Doc, Source};
use crate::error::{Error, Result};
use crate::metrics::{Aggregate, Item};
use crate::runner::{Sample, TaskResult};
use crate::task::{LoadOptions, Task};

/// The `suite` mapping of a task, with errors that name the file and the task.
pub(crate) struct Spec<'a> {
    pub cfg: &'a TaskConfig,
    map: &'a Map<String, Value>,
}

impl<'a> Spec<'a> {
    pub(crate) fn new(cfg: &'a TaskConfig) -> Option<Spec<'a>> {
        cfg.suite.as_ref().map(|map| Spec { cfg, map })
    }

    pub(crate) fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Config {
            file: self.cfg.file.clone(),
            msg: format!("task `{}`: {msg}", self.cfg.name),
        }
    }

    pub(crate) fn kind(&self) -> Result<&str> {
        self.map.get("kind").and_then(Value::as_str).ok_or_else(|| {
            self.err("suite.kind is required (sni, pairwise, pointwise, classification or cobbler)")
        })
    }

    /// Unknown keys are errors, so typos in a suite do not pass silently.
    pub(crate) fn allow(&self, keys: &[&str]) -> Result<()> {
        match self
            .map
            .keys()
            .find(|k| k.as_str() != "kind" && !keys.contains(&k.as_str()))
        {
            Some(k) => Err(self.err(format!(
                "unknown key suite.{k} for kind `{}` (known: {})",
                self.kind()?,
                keys.join(", ")
            ))),
            None => Ok(()),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<Option<String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(format!("suite.{key} must be a string"))),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &str) -> Result<String> {
        Ok(self.str(key)?.unwrap_or_else(|| default.to_string()))
    }

    pub(crate) fn required(&self, key: &str) -> Result<String> {
        self.str(key)?
            .ok_or_else(|| self.err(format!("suite.{key} is required")))
    }

    pub(crate) fn uint(&self, key: &str, default: u64) -> Result<u64> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.err(format!("suite.{key} must be a non-negative integer"))),
        }
    }

    pub(crate) fn list(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(self.err(format!("suite.{key} must be a list of strings"))),
                })
                .collect::<Result<_>>()
                .map(Some),
            Some(_) => Err(self.err(format!("suite.{key} must be a list"))),
        }
    }

    pub(crate) fn string_map(&self, key: &str) -> Result<BTreeMap<String, String>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(BTreeMap::new()),
            Some(Value::Object(o)) => o
                .iter()
                .map(|(k, v)| match v.as_str() {
                    Some(s) => Ok((k.clone(), s.to_string())),
                    None => Err(self.err(format!("suite.{key}.{k} must be a string"))),
                })
                .collect(),
            Some(_) => Err(self.err(format!("suite.{key} must be a mapping"))),
        }
    }

    /// A path option: `{data_dir}` is filled, relative paths are tried against `bases`.
    pub(crate) fn path(&self, key: &str, bases: &[&Path], data_dir: &Path) -> Result<PathBuf> {
        let raw = self
            .required(key)?
            .replace("{data_dir}", &data_dir.to_string_lossy());
        Ok(Source::parse(&raw, bases).path)
    }
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
    match spec.kind()? {
        "sni" => crate::sni::load(&spec, bases, opts),
        "pairwise" | "pointwise" | "classification" => {
            let rows = crate::task::read_split(cfg, split, bases)?.ok_or_else(|| {
                spec.err(format!(
                    "no data file for split `{split}` in dataset_kwargs.data_files"
                ))
            })?;
            crate::autorater::build(&spec, rows)
        }
        "cobbler" => crate::cobbler::load(&spec, bases, opts),
        other => Err(spec.err(format!(
            "unknown suite.kind `{other}` (sni, pairwise, pointwise, classification or cobbler)"
        ))),
    }
}

/// Adds a suite task's corpus-level metrics (and per-sample judge metrics) to its result. Does
/// nothing for tasks without `suite`; safe to call once per summarised result.
pub fn finish(task: &Task, result: &mut TaskResult) -> Result<()> {
    let Some(spec) = Spec::new(&task.config) else {
        return Ok(());
    };
    match spec.kind()? {
        "pairwise" | "pointwise" | "classification" => crate::autorater::finish(task, result),
        "cobbler" => crate::cobbler::finish(task, result),
        _ => Ok(()),
    }
}

/// Sets (or replaces) an aggregate metric of a result.
pub(crate) fn set_metric(result: &mut TaskResult, name: &str, agg: Aggregate) {
    match result.metrics.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = agg,
        None => result.metrics.push((name.to_string(), agg)),
    }
}

/// Sets (or replaces) a per-sample metric.
pub(crate) fn set_sample_metric(sample: &mut Sample, name: &str, item: Item) {
    match sample.metrics.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = item,
        None => sample.metrics.push((name.to_string(), item)),
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
