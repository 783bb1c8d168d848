//! Scoring that runs in Python, in batches through the task's hook worker: `process_results`,
//! `metric: !function` and `aggregation: !function`, as lm-evaluation-harness 0.4.13 calls them.
//!
//! What the hooks get: `process_results(doc, results)` with `results` one entry per request —
//! `[log-likelihood, is_greedy]` for log-likelihood requests, the log-likelihood for a rolling one,
//! the pipeline's answer for a generation (called once per `filter_list` pipeline); a metric
//! function `f(references=[gold], predictions=[answer], **kwargs)` per generated answer. Numbers
//! become mean metrics (lm-eval's `mean` and its standard error); anything else is kept for the
//! metric's Python aggregation.

use serde_json::Value;

use crate::config::OutputType;
use crate::dataset::Doc;
use crate::error::{Error, Result};
use crate::hooks::{self, Items, Site};
use crate::metrics::{Aggregate, Item};
use crate::result::{Sample, TaskResult};
use crate::task::{Instance, Response, Task};

/// Fills `samples` (one per instance) with the Python-computed metrics of `task`.
pub(crate) fn python_scores(
    task: &Task,
    insts: &[Instance],
    responses: &[Vec<Response>],
    samples: &mut [Sample],
) -> Result<()> {
    let cfg = &task.config;
    let functions: Vec<_> = cfg
        .metric_list
        .iter()
        .filter(|m| m.function.is_some())
        .collect();
    if insts.is_empty() || (cfg.process_results.is_none() && functions.is_empty()) {
        return Ok(());
    }
    let ids: Vec<usize> = insts.iter().map(|i| i.doc_id).collect();
    let docs: Vec<&Doc> = ids.iter().map(|&i| &task.docs()[i]).collect();
    let site = |field: &'static str| Site {
        file: &cfg.file,
        task: &cfg.name,
        field,
        items: Items::Docs {
            label: "doc",
            ids: &ids,
        },
    };
    // Per pipeline (one, `none`, for log-likelihood tasks): each document's `results`.
    let pipelines: Vec<String> = match samples.first() {
        Some(s) if !s.filtered.is_empty() => s.filtered.iter().map(|(n, _)| n.clone()).collect(),
        _ => vec!["none".to_string()],
    };
    for (k, pipeline) in pipelines.iter().enumerate() {
        let results: Vec<Value> = responses
            .iter()
            .zip(samples.iter())
            .map(|(rs, s)| match cfg.output_type {
                OutputType::GenerateUntil => Value::Array(vec![s.filtered[k].1.clone()]),
                _ => Value::Array(
                    rs.iter()
                        .map(|r| match r {
                            Response::Loglikelihood(l) => {
                                serde_json::json!([l.logprob, l.is_greedy])
                            }
                            Response::Rolling(l) => Value::from(*l),
                            Response::Generate(g) => Value::from(g.as_str()),
                        })
                        .collect(),
                ),
            })
            .collect();
        if let Some(f) = &cfg.process_results {
            let items: Vec<(&Doc, Value)> = docs.iter().copied().zip(results.clone()).collect();
            let maps = task
                .hooks
                .process_results(f, &items, &site("process_results"))?;
            for (s, m) in samples.iter_mut().zip(maps) {
                for (name, v) in m {
                    record(task, s, &task.metric_name(&name, pipeline), v);
                }
            }
            continue;
        }
        if cfg.output_type != OutputType::GenerateUntil {
            return Err(Error::Config {
                file: cfg.file.clone(),
                msg: format!(
                    "task `{}`: a `metric: !function` needs output_type generate_until (or process_results)",
                    cfg.name
                ),
            });
        }
        for m in &functions {
            let f = m.function.as_ref().expect("filtered on function");
            let items: Vec<(Value, Value)> = insts
                .iter()
                .zip(&results)
                .map(|(i, r)| (gold(i), r[0].clone()))
                .collect();
            let values = task.hooks.metric(f, &items, &m.kwargs, &site("metric"))?;
            for (s, v) in samples.iter_mut().zip(values) {
                // A metric may answer with a mapping of several scores; its own is under its name.
                let v = match v {
                    Value::Object(mut o) => o.remove(&m.metric).unwrap_or(Value::Null),
                    v => v,
                };
                record(task, s, &task.metric_name(&m.metric, pipeline), v);
            }
        }
    }
    Ok(())
}

/// The gold answer a generation metric compares with, as lm-evaluation-harness passes it: the
/// target, a choice index turned into the choice's text.
fn gold(inst: &Instance) -> Value {
    match &inst.target {
        Value::Number(n) if !inst.choices.is_empty() => n
            .as_u64()
            .and_then(|i| inst.choices.get(i as usize))
            .map(|c| Value::from(c.as_str()))
            .unwrap_or_else(|| inst.target.clone()),
        v => v.clone(),
    }
}

fn record(task: &Task, s: &mut Sample, name: &str, v: Value) {
    let base = name.split(',').next().unwrap_or(name);
    let python_aggregation = task
        .config
        .metric_list
        .iter()
        .any(|m| m.metric == base && m.aggregation.is_some());
    match hooks::number(&v) {
        Some(x) if !python_aggregation => s.set_metric(name, Item::Mean(x)),
        _ => s.python_values.push((name.to_string(), v)),
    }
}

/// Replaces the aggregate of every metric with `aggregation: !function` by what the function
/// computes over the per-document values (no standard error, as lm-eval gives none).
pub(crate) fn python_aggregates(task: &Task, result: &mut TaskResult) -> Result<()> {
    let cfg = &task.config;
    for m in cfg.metric_list.iter().filter(|m| m.aggregation.is_some()) {
        let f = m.aggregation.as_ref().expect("filtered");
        let names: Vec<String> = task
            .metric_names()
            .into_iter()
            .filter(|n| n.split(',').next() == Some(m.metric.as_str()))
            .collect();
        for name in names {
            let values: Vec<Value> = result
                .samples
                .iter()
                .filter_map(|s| {
                    s.python_values
                        .iter()
                        .find(|(n, _)| n == &name)
                        .map(|(_, v)| v.clone())
                        .or_else(|| {
                            s.metrics
                                .iter()
                                .find(|(n, _)| n == &name)
                                .and_then(|(_, it)| it.sample_value())
                                .map(Value::from)
                        })
                })
                .collect();
            if values.is_empty() {
                continue;
            }
            let label = format!("metric `{name}`");
            let site = Site {
                file: &cfg.file,
                task: &cfg.name,
                field: "aggregation",
                items: Items::Whole(&label),
            };
            let value = task.hooks.aggregation(f, &values, &site)?;
            result.set_metric(
                &name,
                Aggregate {
                    value,
                    stderr: f64::NAN,
                    n: values.len(),
                },
            );
        }
    }
    Ok(())
}
