//! The leaderboard: one row per (run, model, mask, retrieval, task, metric), written as Parquet and
//! Markdown.

use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};

use crate::compare::Comparison;
use crate::error::{file_err, Result};
use crate::results::{MetricRow, Run};

/// Whether larger values of a task's metric are better, as the runs recorded it (from the task file,
/// else the metric's default).
pub fn direction(entries: &[Entry], task: &str, metric: &str) -> bool {
    entries
        .iter()
        .find(|e| e.task == task && e.metric == metric)
        .map_or_else(
            || tasks::metrics::higher_is_better(metric),
            |e| e.higher_is_better,
        )
}

/// Metrics shown in summaries and gated: not per-template cells or bookkeeping counts.
pub fn is_headline(metric: &str) -> bool {
    !metric.contains(',')
        && !metric.starts_with("template_bias[")
        && !matches!(
            metric,
            "templates_used"
                | "templates_skipped"
                | "excluded_sources"
                | "degenerate"
                | "bias_score_null"
        )
}

/// A task's primary metric: the first metric it reports that is not per group.
pub fn primary_metric<'a>(rows: impl Iterator<Item = &'a MetricRow>, task: &str) -> Option<String> {
    let mut rows = rows.filter(|r| r.task == task);
    rows.find(|r| is_headline(&r.metric) && !r.metric.contains('['))
        .map(|r| r.metric.clone())
}

/// One leaderboard row.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub run_id: String,
    pub model_id: String,
    pub weights_hash: String,
    pub mask: String,
    pub experts: String,
    /// Names of the experts left out, comma-separated.
    pub opted_out: String,
    /// Retrieval settings (`none` without a datastore): with the mask, what tells two rows of one
    /// task apart.
    pub retrieval: String,
    pub task: String,
    pub metric: String,
    pub value: Option<f64>,
    pub stderr: Option<f64>,
    pub n: i64,
    pub higher_is_better: bool,
    /// The task's primary metric (used for charts and the summary table).
    pub primary: bool,
}

/// Headline metrics of every run, in run order.
pub fn entries(runs: &[Run]) -> Vec<Entry> {
    let mut out = Vec::new();
    for run in runs {
        let mut tasks: Vec<&str> = Vec::new();
        for m in &run.metrics {
            if !tasks.contains(&m.task.as_str()) {
                tasks.push(&m.task);
            }
        }
        let primaries: Vec<(String, Option<String>)> = tasks
            .iter()
            .map(|t| (t.to_string(), primary_metric(run.metrics.iter(), t)))
            .collect();
        for m in run.metrics.iter().filter(|m| is_headline(&m.metric)) {
            let primary = primaries
                .iter()
                .any(|(t, p)| t == &m.task && p.as_deref() == Some(m.metric.as_str()));
            out.push(Entry {
                run_id: m.run_id.clone(),
                model_id: m.model_id.clone(),
                weights_hash: m.weights_hash.clone(),
                mask: m.mask.clone(),
                experts: m.experts.clone(),
                opted_out: m.opted_out.clone(),
                retrieval: m.retrieval.clone(),
                task: m.task.clone(),
                metric: m.metric.clone(),
                value: m.value,
                stderr: m.stderr,
                n: m.n,
                higher_is_better: m.higher_is_better,
                primary,
            });
        }
    }
    out
}

/// The leaderboard as an Arrow table (columns documented in docs/results.md).
pub fn batch(entries: &[Entry]) -> Result<RecordBatch> {
    let s = |f: fn(&Entry) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(entries.iter().map(f)))
    };
    let schema = Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("weights_hash", DataType::Utf8, false),
        Field::new("mask", DataType::Utf8, false),
        Field::new("experts", DataType::Utf8, false),
        Field::new("task", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("stderr", DataType::Float64, true),
        Field::new("n", DataType::Int64, false),
        Field::new("higher_is_better", DataType::Boolean, false),
        Field::new("primary", DataType::Boolean, false),
        // Added after the columns above, which keep their places.
        Field::new("opted_out", DataType::Utf8, false),
        Field::new("retrieval", DataType::Utf8, false),
    ]);
    let cols: Vec<ArrayRef> = vec![
        s(|e| &e.run_id),
        s(|e| &e.model_id),
        s(|e| &e.weights_hash),
        s(|e| &e.mask),
        s(|e| &e.experts),
        s(|e| &e.task),
        s(|e| &e.metric),
        Arc::new(Float64Array::from_iter(entries.iter().map(|e| e.value))),
        Arc::new(Float64Array::from_iter(entries.iter().map(|e| e.stderr))),
        Arc::new(Int64Array::from_iter_values(entries.iter().map(|e| e.n))),
        Arc::new(BooleanArray::from_iter(
            entries.iter().map(|e| Some(e.higher_is_better)),
        )),
        Arc::new(BooleanArray::from_iter(
            entries.iter().map(|e| Some(e.primary)),
        )),
        s(|e| &e.opted_out),
        s(|e| &e.retrieval),
    ];
    RecordBatch::try_new(Arc::new(schema), cols)
        .map_err(|e| file_err(std::path::Path::new("leaderboard.parquet"), e))
}

/// Formats a value with its standard error, `0.5000 ± 0.0500`, or `-` when missing.
pub fn fmt_value(v: Option<f64>, se: Option<f64>) -> String {
    match (v, se) {
        (Some(v), Some(se)) if se.is_finite() => format!("{v:.4} ± {se:.4}"),
        (Some(v), _) => format!("{v:.4}"),
        _ => "-".into(),
    }
}

/// One row of the summary table: run id, model id, mask and retrieval.
#[derive(Clone, Debug, PartialEq)]
pub struct RowKey {
    pub run_id: String,
    pub model_id: String,
    pub mask: String,
    pub retrieval: String,
}

impl RowKey {
    /// True when `e` belongs to this row.
    pub fn holds(&self, e: &Entry) -> bool {
        e.run_id == self.run_id
            && e.model_id == self.model_id
            && e.mask == self.mask
            && e.retrieval == self.retrieval
    }
}

/// Columns (tasks with their primary metric) and rows (run, model, mask, retrieval) of the summary
/// table.
pub fn summary_grid(entries: &[Entry]) -> (Vec<(String, String)>, Vec<RowKey>) {
    let mut cols: Vec<(String, String)> = Vec::new();
    let mut rows: Vec<RowKey> = Vec::new();
    for e in entries.iter().filter(|e| e.primary) {
        let c = (e.task.clone(), e.metric.clone());
        if !cols.contains(&c) {
            cols.push(c);
        }
        let r = RowKey {
            run_id: e.run_id.clone(),
            model_id: e.model_id.clone(),
            mask: e.mask.clone(),
            retrieval: e.retrieval.clone(),
        };
        if !rows.contains(&r) {
            rows.push(r);
        }
    }
    (cols, rows)
}

/// The Markdown summary: the primary metric of each task per (run, model, mask), then paired
/// comparisons.
pub fn markdown(entries: &[Entry], comparisons: &[(String, String, Vec<Comparison>)]) -> String {
    let (cols, rows) = summary_grid(entries);
    let mut s = String::from("# moeval results\n\n");
    s.push_str("Primary metric of each task (value ± standard error; ↓ = lower is better).\n\n");
    s.push_str("| run | model | mask | retrieval |");
    for (t, m) in &cols {
        let arrow = if direction(entries, t, m) { "" } else { " ↓" };
        s.push_str(&format!(" {t} ({m}{arrow}) |"));
    }
    s.push_str("\n|---|---|---|---|");
    s.push_str(&"---:|".repeat(cols.len()));
    s.push('\n');
    for r in &rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} |",
            r.run_id, r.model_id, r.mask, r.retrieval
        ));
        for (t, m) in &cols {
            let e = entries
                .iter()
                .find(|e| r.holds(e) && &e.task == t && &e.metric == m);
            s.push_str(&format!(
                " {} |",
                e.map_or("".into(), |e| fmt_value(e.value, e.stderr))
            ));
        }
        s.push('\n');
    }
    if !comparisons.is_empty() {
        s.push_str("\n## Paired comparisons\n\n");
        s.push_str("| A | B | task | metric | n | A | B | B − A | 95% CI | p | test |\n");
        s.push_str("|---|---|---|---|---:|---:|---:|---:|---|---:|---|\n");
        for (a, b, cs) in comparisons {
            for c in cs {
                s.push_str(&format!(
                    "| {a} | {b} | {} | {} | {} | {:.4} | {:.4} | {:+.4} | [{:+.4}, {:+.4}] | {:.4} | {} |\n",
                    c.task,
                    c.metric,
                    c.diff.n,
                    c.diff.mean_a,
                    c.diff.mean_b,
                    c.diff.diff,
                    c.diff.ci_low,
                    c.diff.ci_high,
                    c.p_value,
                    c.test
                ));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_and_headlines() {
        use tasks::metrics::higher_is_better;
        assert!(higher_is_better("acc"));
        assert!(higher_is_better("acc[gender=male]"));
        assert!(!higher_is_better("word_perplexity"));
        assert!(!higher_is_better("bias_score"));
        assert!(!higher_is_better("ter"));
        assert!(is_headline("acc[gender=male]"));
        assert!(!is_headline("acc[template_idx=3,gender=male]"));
        assert!(!is_headline("template_bias[template_idx=3]"));
        assert!(!is_headline("degenerate"));
    }
}
