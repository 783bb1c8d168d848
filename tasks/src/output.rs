//! Parquet tables of a run: one row per sample, one row per (task, metric).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;

use crate::error::{Error, Result};
use crate::runner::TaskResult;

const FIXED: &[&str] = &[
    "task",
    "doc_id",
    "choice_loglikelihoods",
    "loglikelihood",
    "prediction",
    "target",
];

fn write(path: &Path, batch: RecordBatch) -> Result<()> {
    let file = std::fs::File::create(path)
        .map_err(|e| Error::Output(format!("{}: {e}", path.display())))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props))
        .map_err(|e| Error::Output(e.to_string()))?;
    w.write(&batch).map_err(|e| Error::Output(e.to_string()))?;
    w.close().map_err(|e| Error::Output(e.to_string()))?;
    Ok(())
}

/// Writes `samples.parquet`: task, doc_id, choice_loglikelihoods, loglikelihood, prediction, target,
/// then one nullable string column per group attribute and one nullable double column per metric.
pub fn write_samples(path: &Path, results: &[TaskResult]) -> Result<()> {
    let rows: Vec<(&str, &crate::runner::Sample)> = results
        .iter()
        .flat_map(|r| r.samples.iter().map(move |s| (r.task.as_str(), s)))
        .collect();
    let attrs: BTreeSet<&str> = rows
        .iter()
        .flat_map(|(_, s)| s.attributes.keys().map(String::as_str))
        .collect();
    let mut metric_names: Vec<&str> = Vec::new();
    for (_, s) in &rows {
        for (m, _) in &s.metrics {
            if !metric_names.contains(&m.as_str()) {
                metric_names.push(m);
            }
        }
    }
    let mut fields = vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("doc_id", DataType::Int64, false),
        Field::new(
            "choice_loglikelihoods",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ),
        Field::new("loglikelihood", DataType::Float64, true),
        Field::new("prediction", DataType::Utf8, true),
        Field::new("target", DataType::Utf8, false),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.1.doc_id as i64),
        )),
        {
            let mut b = ListBuilder::new(Float64Builder::new());
            for (_, s) in &rows {
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
            rows.iter().map(|r| r.1.loglikelihood),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.1.prediction.as_deref()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.1.target.as_str()),
        )),
    ];
    let mut used: BTreeSet<String> = FIXED.iter().map(|s| s.to_string()).collect();
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
        for (_, s) in &rows {
            b.append_option(s.attributes.get(*a));
        }
        cols.push(Arc::new(b.finish()));
    }
    for m in &metric_names {
        fields.push(Field::new(unique(m), DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from_iter(rows.iter().map(
            |(_, s)| {
                s.metrics
                    .iter()
                    .find(|(n, _)| n == m)
                    .and_then(|(_, it)| it.sample_value())
            },
        ))));
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)
        .map_err(|e| Error::Output(e.to_string()))?;
    write(path, batch)
}

/// Writes `metrics.parquet`: task (or group), metric, value, stderr, n.
pub fn write_metrics(
    path: &Path,
    rows: &[(String, String, crate::metrics::Aggregate)],
) -> Result<()> {
    let schema = Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
        Field::new("stderr", DataType::Float64, true),
        Field::new("n", DataType::Int64, false),
    ]);
    let nan_null = |x: f64| x.is_finite().then_some(x);
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.0.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.1.as_str()),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| nan_null(r.2.value)),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| nan_null(r.2.stderr)),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.2.n as i64),
        )),
    ];
    let batch =
        RecordBatch::try_new(Arc::new(schema), cols).map_err(|e| Error::Output(e.to_string()))?;
    write(path, batch)
}
