//! What a run produces: one [`Sample`] per document and a [`TaskResult`] per task.

use std::collections::BTreeMap;

use crate::lm::Sources;
use crate::metrics::{Aggregate, Item};

/// One evaluated document.
#[derive(Clone, Debug)]
pub struct Sample {
    pub doc_id: usize,
    /// The prompt (description + few-shot exemplars + document text) the requests continue.
    pub prompt: String,
    /// The requests' arguments as lm-evaluation-harness's `--log_samples` writes them (JSON).
    pub arguments: String,
    pub target: String,
    pub prediction: Option<String>,
    /// Generation tasks: each filter pipeline's answer, `(pipeline, value)` in `filter_list` order
    /// (`none` when the task has no `filter_list`), as lm-evaluation-harness's `filtered_resps`.
    pub filtered: Vec<(String, serde_json::Value)>,
    /// Multiple choice: each choice's log-likelihood, in choice order.
    pub choice_loglikelihoods: Option<Vec<f64>>,
    /// The continuation's (or whole document's) summed log-likelihood.
    pub loglikelihood: Option<f64>,
    pub metrics: Vec<(String, Item)>,
    /// Per-document values of metrics aggregated in Python (`aggregation: !function`) that are not
    /// plain numbers, e.g. `(gold, prediction)` pairs for a corpus-level F1.
    pub python_values: Vec<(String, serde_json::Value)>,
    /// Group attributes (`group_by` / `bias` fields).
    pub attributes: BTreeMap<String, String>,
    /// Per request, in request order, the retrieved documents its answer drew on; empty when no
    /// answer reported any.
    pub sources: Vec<Sources>,
}

/// A task's samples and metrics.
#[derive(Clone, Debug)]
pub struct TaskResult {
    pub task: String,
    pub samples: Vec<Sample>,
    /// (metric, aggregate) in a stable order: configured metrics first, then derived ones.
    pub metrics: Vec<(String, Aggregate)>,
    /// Exclusions and other remarks the user should see.
    pub notes: Vec<String>,
}

impl TaskResult {
    pub fn metric(&self, name: &str) -> Option<&Aggregate> {
        self.metrics.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    /// Sets (or replaces) an aggregate metric.
    pub(crate) fn set_metric(&mut self, name: &str, agg: Aggregate) {
        match self.metrics.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = agg,
            None => self.metrics.push((name.to_string(), agg)),
        }
    }
}

impl Sample {
    /// Sets (or replaces) a per-sample metric.
    pub(crate) fn set_metric(&mut self, name: &str, item: Item) {
        match self.metrics.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = item,
            None => self.metrics.push((name.to_string(), item)),
        }
    }
}
