//! Every table a run directory holds, and their writers: `samples.parquet` (one row per sample),
//! `metrics.parquet` (one row per task and metric), `routing.parquet` (tokens per expert),
//! `attribution.parquet` / `attribution_units.parquet` (datastore documents behind each prediction).
//! The column layout is documented in `docs/results.md`; columns are only ever added, never renamed
//! or removed. Every file goes through [`write_parquet_atomic`].

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use sha2::{Digest, Sha256};

use tasks::metrics::Aggregate;
use tasks::{Sample, TaskResult};

use crate::error::{file_err, Error, Result};

/// What every row of a run says about where it came from: the run, the model, the experts used.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunColumns {
    pub run_id: String,
    /// The model's name (its directory name).
    pub model_id: String,
    /// SHA-256 over config, tokenizer, expert files and every weight file (see the manifest).
    pub weights_hash: String,
    /// The expert-mask variant: `full` (every expert of the model), `-A-B` (experts A and B left
    /// out) or `experts=A+B` (a run restricted to experts A and B).
    pub mask: String,
    /// Names of the experts the variant may use, comma-separated (empty for dense models).
    pub experts: String,
    /// Names of the experts left out (owners' policy, request or sweep), comma-separated.
    pub opted_out: String,
    /// Retrieval and scoring-window settings: `none`, or e.g.
    /// `knn:k=1024,lambda=0.3,temperature=10,datastore=news@<identity>` (see docs/results.md).
    pub retrieval: String,
}

/// One row of `metrics.parquet` before the run columns.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricRow {
    /// Task or group.
    pub task: String,
    pub metric: String,
    pub aggregate: Aggregate,
    /// From the task file's `metric_list` when it says, else the metric's default
    /// ([`tasks::metrics::higher_is_better`]).
    pub higher_is_better: bool,
    /// lm-evaluation-harness's name of the aggregation (`mean`, `perplexity`, ...) of a metric the
    /// task file configures; `None` for derived metrics (bias scores, group means).
    pub aggregation: Option<String>,
}

/// Columns before the per-task ones in `samples.parquet`, in order.
pub const SAMPLE_COLUMNS: &[&str] = &[
    "run_id",
    "model_id",
    "weights_hash",
    "mask",
    "experts",
    "opted_out",
    "retrieval",
    "task",
    "doc_id",
    "prompt_hash",
    "prompt",
    "choice_loglikelihoods",
    "loglikelihood",
    "prediction",
    "target",
    "arguments",
    "filtered_resps",
];

/// Columns of `metrics.parquet`, in order.
pub const METRIC_COLUMNS: &[&str] = &[
    "run_id",
    "model_id",
    "weights_hash",
    "mask",
    "experts",
    "opted_out",
    "retrieval",
    "task",
    "metric",
    "value",
    "stderr",
    "n",
    "higher_is_better",
    "aggregation",
];

/// First 16 hex digits of the SHA-256 of a prompt: equal prompts across runs and tasks join on it.
pub fn prompt_hash(prompt: &str) -> String {
    let d = Sha256::digest(prompt.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Writes a record batch to `path` through a uniquely named temporary file in the same folder,
/// synced to disk and renamed into place ([`durable::write_atomic_with`]), so a reader (or a crash)
/// never sees half a file and concurrent writers never share a temporary file.
pub fn write_parquet_atomic(path: &Path, batch: &RecordBatch) -> Result<()> {
    durable::write_atomic_with(path, |tmp| {
        let file = std::fs::File::create(tmp)?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props))
            .map_err(std::io::Error::other)?;
        w.write(batch).map_err(std::io::Error::other)?;
        w.into_inner().map_err(std::io::Error::other)?.flush()
    })
    .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

fn run_fields() -> Vec<Field> {
    SAMPLE_COLUMNS[..7]
        .iter()
        .map(|n| Field::new(*n, DataType::Utf8, false))
        .collect()
}

fn run_cols<'a>(ctx: impl Iterator<Item = &'a RunColumns> + Clone) -> Vec<ArrayRef> {
    let col = |f: fn(&RunColumns) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(ctx.clone().map(f)))
    };
    vec![
        col(|c| &c.run_id),
        col(|c| &c.model_id),
        col(|c| &c.weights_hash),
        col(|c| &c.mask),
        col(|c| &c.experts),
        col(|c| &c.opted_out),
        col(|c| &c.retrieval),
    ]
}

/// Builds the `samples.parquet` table: the fixed columns ([`SAMPLE_COLUMNS`]), then one nullable
/// string column per group attribute (sorted by name), then one nullable double column per metric
/// (in the order the tasks list them).
pub fn samples_batch(parts: &[(RunColumns, Vec<TaskResult>)]) -> Result<RecordBatch> {
    let rows: Vec<(&RunColumns, &str, &Sample)> = parts
        .iter()
        .flat_map(|(c, rs)| {
            rs.iter()
                .flat_map(move |r| r.samples.iter().map(move |s| (c, r.task.as_str(), s)))
        })
        .collect();
    let attrs: BTreeSet<&str> = rows
        .iter()
        .flat_map(|(_, _, s)| s.attributes.keys().map(String::as_str))
        .collect();
    let mut metric_names: Vec<&str> = Vec::new();
    for (_, _, s) in &rows {
        for (m, _) in &s.metrics {
            if !metric_names.contains(&m.as_str()) {
                metric_names.push(m);
            }
        }
    }
    let mut fields = run_fields();
    fields.extend([
        Field::new("task", DataType::Utf8, false),
        Field::new("doc_id", DataType::Int64, false),
        Field::new("prompt_hash", DataType::Utf8, false),
        Field::new("prompt", DataType::Utf8, false),
        Field::new(
            "choice_loglikelihoods",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ),
        Field::new("loglikelihood", DataType::Float64, true),
        Field::new("prediction", DataType::Utf8, true),
        Field::new("target", DataType::Utf8, false),
        Field::new("arguments", DataType::Utf8, false),
        Field::new("filtered_resps", DataType::Utf8, true),
    ]);
    let mut cols = run_cols(rows.iter().map(|r| r.0));
    cols.extend::<[ArrayRef; 10]>([
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.2.doc_id as i64),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| prompt_hash(&r.2.prompt)),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.2.prompt.as_str()),
        )),
        {
            let mut b = ListBuilder::new(Float64Builder::new());
            for (_, _, s) in &rows {
                match &s.choice_loglikelihoods {
                    Some(v) => {
                        b.values().append_slice(v);
                        b.append(true);
                    }
                    None => b.append(false),
                }
            }
            Arc::new(b.finish())
        },
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.2.loglikelihood),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.2.prediction.as_deref()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.2.target.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.2.arguments.as_str()),
        )),
        // A JSON object, pipeline -> answer, in `filter_list` order (null for other output types).
        Arc::new(StringArray::from_iter(rows.iter().map(|r| {
            (!r.2.filtered.is_empty()).then(|| {
                serde_json::Value::Object(r.2.filtered.iter().cloned().collect()).to_string()
            })
        }))),
    ]);
    // A task field or metric named like a fixed column gets an `attr_` prefix.
    let mut used: BTreeSet<String> = SAMPLE_COLUMNS.iter().map(|s| s.to_string()).collect();
    let mut unique = |name: &str| {
        let mut n = name.to_string();
        while !used.insert(n.clone()) {
            n = format!("attr_{n}");
        }
        n
    };
    for a in &attrs {
        fields.push(Field::new(unique(a), DataType::Utf8, true));
        let mut b = StringBuilder::new();
        for (_, _, s) in &rows {
            b.append_option(s.attributes.get(*a));
        }
        cols.push(Arc::new(b.finish()));
    }
    for m in &metric_names {
        fields.push(Field::new(unique(m), DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from_iter(rows.iter().map(
            |(_, _, s)| {
                s.metrics
                    .iter()
                    .find(|(n, _)| n == m)
                    .and_then(|(_, it)| it.sample_value())
            },
        ))));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| Error::Invalid(e.to_string()))
}

/// Builds the `metrics.parquet` table ([`METRIC_COLUMNS`]); NaN values and stderrs become nulls.
pub fn metrics_batch(parts: &[(RunColumns, Vec<MetricRow>)]) -> Result<RecordBatch> {
    let rows: Vec<(&RunColumns, &MetricRow)> = parts
        .iter()
        .flat_map(|(c, rs)| rs.iter().map(move |r| (c, r)))
        .collect();
    let mut fields = run_fields();
    fields.extend([
        Field::new("task", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("stderr", DataType::Float64, true),
        Field::new("n", DataType::Int64, false),
        Field::new("higher_is_better", DataType::Boolean, false),
        Field::new("aggregation", DataType::Utf8, true),
    ]);
    let nan_null = |x: f64| x.is_finite().then_some(x);
    let mut cols = run_cols(rows.iter().map(|r| r.0));
    cols.extend::<[ArrayRef; 7]>([
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.1.task.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.1.metric.as_str()),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| nan_null(r.1.aggregate.value)),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| nan_null(r.1.aggregate.stderr)),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.1.aggregate.n as i64),
        )),
        Arc::new(arrow_array::BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.1.higher_is_better)),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.1.aggregation.as_deref()),
        )),
    ]);
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| Error::Invalid(e.to_string()))
}

/// Writes `samples.parquet` atomically (see [`samples_batch`]).
pub fn write_samples(path: &Path, parts: &[(RunColumns, Vec<TaskResult>)]) -> Result<()> {
    write_parquet_atomic(path, &samples_batch(parts)?)
}

/// Writes `metrics.parquet` atomically (see [`metrics_batch`]).
pub fn write_metrics(path: &Path, parts: &[(RunColumns, Vec<MetricRow>)]) -> Result<()> {
    write_parquet_atomic(path, &metrics_batch(parts)?)
}

/// One row of `routing.parquet`: tokens a variant routed to an expert in one layer while it computed
/// one task's requests (answers from the request cache route nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingRow {
    pub run_id: String,
    pub mask: String,
    pub task: String,
    pub layer: usize,
    pub expert: usize,
    pub expert_name: String,
    pub tokens: u64,
    /// Share of the tokens the layer processed (a layer's shares sum to top-k).
    pub share: f64,
}

/// The columns both routing tables end with: `layer`, `expert`, `expert_name`, `tokens`, `share`,
/// from (layer, expert, expert name, tokens, share) per row.
fn routing_columns(rows: &[(usize, usize, &str, u64, f64)]) -> Vec<(&'static str, ArrayRef)> {
    let i = |f: fn(&(usize, usize, &str, u64, f64)) -> i32| -> ArrayRef {
        Arc::new(arrow_array::Int32Array::from_iter_values(
            rows.iter().map(f),
        ))
    };
    vec![
        ("layer", i(|r| r.0 as i32)),
        ("expert", i(|r| r.1 as i32)),
        (
            "expert_name",
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
        ),
        (
            "tokens",
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.3 as i64),
            )),
        ),
        (
            "share",
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.4))),
        ),
    ]
}

/// Writes `routing.parquet` atomically; nothing when there are no rows (dense models).
pub fn write_routing(path: &Path, rows: &[RoutingRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let s = |f: fn(&RoutingRow) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let mut cols = vec![
        ("run_id", s(|r| r.run_id.clone())),
        ("mask", s(|r| r.mask.clone())),
        ("task", s(|r| r.task.clone())),
    ];
    let counts: Vec<_> = rows
        .iter()
        .map(|r| (r.layer, r.expert, r.expert_name.as_str(), r.tokens, r.share))
        .collect();
    cols.extend(routing_columns(&counts));
    let batch = RecordBatch::try_from_iter(cols).map_err(|e| Error::Invalid(e.to_string()))?;
    write_parquet_atomic(path, &batch)
}

/// One row of `moeval experts route --out`: tokens of a group of documents sent to an expert.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRoutingRow {
    pub group: String,
    pub layer: usize,
    pub expert: usize,
    pub expert_name: String,
    pub tokens: u64,
    /// `tokens` over the group's tokens.
    pub share: f64,
}

/// Writes `experts route`'s table atomically.
pub fn write_group_routing(path: &Path, rows: &[GroupRoutingRow]) -> Result<()> {
    let group: ArrayRef = Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| r.group.as_str()),
    ));
    let mut cols = vec![("group", group)];
    let counts: Vec<_> = rows
        .iter()
        .map(|r| (r.layer, r.expert, r.expert_name.as_str(), r.tokens, r.share))
        .collect();
    cols.extend(routing_columns(&counts));
    let batch = RecordBatch::try_from_iter(cols).map_err(|e| Error::Invalid(e.to_string()))?;
    write_parquet_atomic(path, &batch)
}

/// One row of `attribution.parquet` (per sample and source document: `request`, `unit` and
/// `block_id` unused) or `attribution_units.parquet` (per scored window or token).
#[derive(Clone, Debug, PartialEq)]
pub struct AttributionRow {
    pub variant: String,
    pub task: String,
    pub doc_id: usize,
    pub request: usize,
    pub unit: u32,
    pub block_id: u64,
    pub source_doc_id: String,
    pub owner: String,
    pub license: String,
    pub weight: f64,
}

/// Writes an attribution table atomically: with `units`, the per-unit columns (`request`, `unit`,
/// `block_id`) too.
pub fn write_attribution(path: &Path, rows: &[AttributionRow], units: bool) -> Result<()> {
    let s = |f: fn(&AttributionRow) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let i = |f: fn(&AttributionRow) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(f)))
    };
    let mut cols: Vec<(&str, ArrayRef)> = vec![
        ("variant", s(|r| r.variant.clone())),
        ("task", s(|r| r.task.clone())),
        ("doc_id", i(|r| r.doc_id as i64)),
    ];
    if units {
        cols.push(("request", i(|r| r.request as i64)));
        cols.push(("unit", i(|r| i64::from(r.unit))));
        cols.push(("block_id", i(|r| r.block_id as i64)));
    }
    cols.extend([
        ("source_doc_id", s(|r| r.source_doc_id.clone())),
        ("owner", s(|r| r.owner.clone())),
        ("license", s(|r| r.license.clone())),
        (
            "weight",
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.weight),
            )) as ArrayRef,
        ),
    ]);
    let batch = RecordBatch::try_from_iter(cols).map_err(|e| Error::Invalid(e.to_string()))?;
    write_parquet_atomic(path, &batch)
}

/// Writes a JSON file of the run (e.g. `retrieval.json`) atomically, pretty-printed.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| file_err(path, e))?;
    crate::fsutil::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_direction_and_aggregation_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("metrics.parquet");
        let agg = Aggregate {
            value: 0.5,
            stderr: 0.1,
            n: 4,
        };
        let row = |metric: &str, hib: bool, aggregation: Option<&str>| MetricRow {
            task: "t".into(),
            metric: metric.into(),
            aggregate: agg.clone(),
            higher_is_better: hib,
            aggregation: aggregation.map(str::to_string),
        };
        let rows = vec![
            row("acc", false, Some("mean")),
            row("bias_score", false, None),
        ];
        write_metrics(&path, &[(RunColumns::default(), rows)]).unwrap();
        let back = crate::results::read_metrics(&path).unwrap();
        let got: Vec<(&str, bool, Option<&str>)> = back
            .iter()
            .map(|m| {
                (
                    m.metric.as_str(),
                    m.higher_is_better,
                    m.aggregation.as_deref(),
                )
            })
            .collect();
        // The task file's `higher_is_better: false` for acc wins over the metric's default.
        assert_eq!(
            got,
            [("acc", false, Some("mean")), ("bias_score", false, None)]
        );
    }
}
