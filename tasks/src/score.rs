//! Scoring, owned by the task: a document's answers become a [`Sample`] ([`Task::score`]), a
//! task's samples become its metrics ([`Task::summarise`], then [`Task::finish`] for a suite's
//! metrics that span samples), and groups aggregate their members ([`group_aggregates`]).
//!
//! Everything here depends only on the task and its answers, so a merged set of shards scores the
//! same as one run.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::bias;
use crate::config::{OutputType, Registry};
use crate::dataset::as_text;
use crate::error::{Error, Result};
use crate::metrics::{self, Aggregate, Item, Translation};
use crate::result::{Sample, TaskResult};
use crate::rouge::{self, Rouge};
use crate::task::{Instance, Response, Task};

impl Task {
    /// The per-sample metric names, in order: `metric_list`'s, or, for a generation task with a
    /// `filter_list`, `metric,pipeline` for each pipeline (lm-evaluation-harness's names).
    pub fn metric_names(&self) -> Vec<String> {
        self.filters
            .iter()
            .flat_map(|p| {
                self.config
                    .metric_list
                    .iter()
                    .map(|m| self.metric_name(&m.metric, &p.name))
            })
            .collect()
    }

    /// The metrics moeval computes itself: all of `metric_list`, unless `process_results` scores
    /// the documents (in Python), and never a `metric: !function`.
    pub(crate) fn builtin_metrics(&self) -> impl Iterator<Item = &crate::config::MetricSpec> {
        let python = self.config.process_results.is_some();
        self.config
            .metric_list
            .iter()
            .filter(move |m| !python && m.function.is_none())
    }

    /// A per-sample metric's name: `metric`, or lm-evaluation-harness's `metric,pipeline` for a
    /// generation task with a `filter_list`.
    pub(crate) fn metric_name(&self, metric: &str, pipeline: &str) -> String {
        if self.config.filter_list.is_some() && self.config.output_type == OutputType::GenerateUntil
        {
            crate::filters::metric_key(metric, pipeline)
        } else {
            metric.to_string()
        }
    }

    /// Scores one document from its requests' answers, given in request order.
    pub fn score(&self, inst: &Instance, responses: &[Response]) -> Result<Sample> {
        let mut v = self.score_all(std::slice::from_ref(inst), &[responses.to_vec()])?;
        Ok(v.remove(0))
    }

    /// Scores documents from their answers (`responses[i]` answers `insts[i]`'s requests). Python
    /// filters, `process_results` and metric functions run once per batch, not per document.
    pub fn score_all(
        &self,
        insts: &[Instance],
        responses: &[Vec<Response>],
    ) -> Result<Vec<Sample>> {
        let filtered = self.filter_all(insts, responses)?;
        let mut samples = insts
            .iter()
            .zip(responses)
            .zip(filtered)
            .map(|((i, r), f)| score_instance(self, i, r, f))
            .collect::<Result<Vec<_>>>()?;
        crate::pyscore::python_scores(self, insts, responses, &mut samples)?;
        Ok(samples)
    }

    /// Each generation's answers through every `filter_list` pipeline, the whole batch at once
    /// (Python steps in the hook worker): per instance, (pipeline, value) in pipeline order.
    fn filter_all(
        &self,
        insts: &[Instance],
        responses: &[Vec<Response>],
    ) -> Result<Vec<Vec<(String, Value)>>> {
        let mut out = vec![Vec::new(); insts.len()];
        if self.config.output_type != OutputType::GenerateUntil || insts.is_empty() {
            return Ok(out);
        }
        let outs: Vec<Vec<String>> = responses
            .iter()
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| match r {
                        Response::Generate(g) => Some(g.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        let docs: Vec<crate::dataset::Doc> =
            insts.iter().map(|i| self.docs[i.doc_id].clone()).collect();
        let ids: Vec<usize> = insts.iter().map(|i| i.doc_id).collect();
        for p in &self.filters {
            let mut python = |step: &crate::filters::PythonStep,
                              state: Vec<Value>,
                              docs: &[crate::dataset::Doc]|
             -> std::result::Result<Vec<Value>, String> {
                let refs: Vec<&crate::dataset::Doc> = docs.iter().collect();
                let site = crate::hooks::Site {
                    file: &self.config.file,
                    task: &self.config.name,
                    field: "filter_list",
                    items: crate::hooks::Items::Docs {
                        label: "doc",
                        ids: &ids,
                    },
                };
                let kwargs = match step {
                    crate::filters::PythonStep::Class { kwargs, .. } => Some(kwargs),
                    crate::filters::PythonStep::Custom { .. } => None,
                };
                self.hooks
                    .filter(step.function(), kwargs, &state, &refs, &site)
                    .map_err(|e| e.to_string())
            };
            let values = p
                .apply(&outs, &docs, &mut python)
                .map_err(|e| Error::Config {
                    file: self.config.file.clone(),
                    msg: format!("task `{}`: filter_list: {e}", self.config.name),
                })?;
            for (slot, v) in out.iter_mut().zip(values) {
                slot.push((p.name.clone(), v));
            }
        }
        Ok(out)
    }

    /// A task's metrics over its samples: each configured metric, its per-group values and the
    /// bias metrics of a task with `bias`.
    pub fn summarise(&self, samples: Vec<Sample>) -> TaskResult {
        summarise_samples(self, samples)
    }

    /// Adds a suite's metrics that span samples (RewardBench sections, CoBBLEr biases,
    /// correlations). Does nothing for tasks without `suite`; safe to call once per summarised
    /// result.
    pub fn finish(&self, result: &mut TaskResult) -> Result<()> {
        crate::pyscore::python_aggregates(self, result)?;
        crate::suites::finish(self, result)
    }
}

/// CALM's exclusions, judged over a task and its partner task (which may have run separately):
/// call once over every result of a run.
pub fn apply_joint_rules(tasks: &[Task], results: &mut [TaskResult]) {
    bias::apply_joint_rules(tasks, results)
}

fn doc_err(task: &Task, doc_id: usize, field: &str, msg: impl Into<String>) -> Error {
    Error::Doc {
        file: task.config.file.clone(),
        task: task.config.name.clone(),
        doc_id,
        field: field.into(),
        msg: msg.into(),
    }
}

/// Gold choice indices of a multiple-choice document.
fn gold_indices(task: &Task, inst: &Instance) -> Result<Vec<usize>> {
    let one = |v: &Value| -> Result<usize> {
        match v {
            Value::Number(n) => n
                .as_u64()
                .map(|i| i as usize)
                .filter(|&i| i < inst.choices.len())
                .ok_or_else(|| {
                    doc_err(
                        task,
                        inst.doc_id,
                        "doc_to_target",
                        format!(
                            "target {n} is not an index into {} choices",
                            inst.choices.len()
                        ),
                    )
                }),
            Value::String(s) => inst.choices.iter().position(|c| c == s).ok_or_else(|| {
                doc_err(
                    task,
                    inst.doc_id,
                    "doc_to_target",
                    format!("target {s:?} is not one of the choices {:?}", inst.choices),
                )
            }),
            other => Err(doc_err(
                task,
                inst.doc_id,
                "doc_to_target",
                format!("target {other} is neither an index nor a choice"),
            )),
        }
    };
    match &inst.target {
        Value::Array(a) => a.iter().map(one).collect(),
        v => Ok(vec![one(v)?]),
    }
}

fn score_instance(
    task: &Task,
    inst: &Instance,
    responses: &[Response],
    filtered: Vec<(String, Value)>,
) -> Result<Sample> {
    let cfg = &task.config;
    let mut s = Sample {
        doc_id: inst.doc_id,
        prompt: inst.context.clone(),
        arguments: task.harness_arguments(&inst.requests),
        target: String::new(),
        prediction: None,
        filtered: Vec::new(),
        choice_loglikelihoods: None,
        loglikelihood: None,
        metrics: Vec::new(),
        python_values: Vec::new(),
        attributes: task.attributes(inst.doc_id),
        sources: Vec::new(),
    };
    let lls: Vec<(f64, bool)> = responses
        .iter()
        .filter_map(|r| {
            if let Response::Loglikelihood(l) = r {
                Some((l.logprob, l.is_greedy))
            } else {
                None
            }
        })
        .collect();
    match cfg.output_type {
        OutputType::MultipleChoice => {
            let k = inst.choices.len();
            let gold = gold_indices(task, inst)?;
            let cond: Vec<f64> = lls[..k].iter().map(|x| x.0).collect();
            let greedy: Vec<bool> = lls[..k].iter().map(|x| x.1).collect();
            let uncond: Option<Vec<f64>> =
                (lls.len() == 2 * k).then(|| lls[k..].iter().map(|x| x.0).collect());
            s.target = gold
                .iter()
                .map(|&g| inst.choices[g].clone())
                .collect::<Vec<_>>()
                .join(" | ");
            let pred = metrics::argmax(&cond);
            s.prediction = Some(inst.choices[pred].clone());
            s.loglikelihood = Some(cond[gold[0]]);
            for m in task.builtin_metrics() {
                let v = metrics::multiple_choice(
                    &m.metric,
                    &cond,
                    uncond.as_deref(),
                    &greedy,
                    &gold,
                    &inst.choices,
                )
                .ok_or_else(|| Error::Config {
                    file: cfg.file.clone(),
                    msg: format!(
                        "task `{}`: metric `{}` is not available for multiple_choice",
                        cfg.name, m.metric
                    ),
                })?;
                s.metrics.push((m.metric.clone(), Item::Mean(v)));
            }
            s.choice_loglikelihoods = Some(cond);
        }
        OutputType::Loglikelihood => {
            let (l, g) = lls[0];
            s.target = as_text(&inst.target);
            s.loglikelihood = Some(l);
            for m in task.builtin_metrics() {
                let item = match m.metric.as_str() {
                    "perplexity" => Item::Perplexity(l),
                    "acc" => Item::Mean(if g { 1.0 } else { 0.0 }),
                    o => {
                        return Err(Error::Config {
                            file: cfg.file.clone(),
                            msg: format!(
                                "task `{}`: metric `{o}` is not available for loglikelihood",
                                cfg.name
                            ),
                        })
                    }
                };
                s.metrics.push((m.metric.clone(), item));
            }
        }
        OutputType::LoglikelihoodRolling => {
            let Response::Rolling(l) = responses[0] else {
                unreachable!("rolling task, rolling response")
            };
            let text = as_text(&inst.target);
            // Python's len(re.split(r"\s+", text)): one more than the number of whitespace runs.
            let mut words = 1usize;
            let mut in_ws = false;
            for c in text.chars() {
                let ws = crate::lm::is_py_space(c);
                if ws && !in_ws {
                    words += 1;
                }
                in_ws = ws;
            }
            let bytes = text.len() as f64;
            s.loglikelihood = Some(l);
            for m in task.builtin_metrics() {
                let item = match m.metric.as_str() {
                    "word_perplexity" => Item::WeightedPerplexity(l, words as f64),
                    "byte_perplexity" => Item::WeightedPerplexity(l, bytes),
                    "bits_per_byte" => Item::BitsPerByte(l, bytes),
                    o => {
                        return Err(Error::Config {
                            file: cfg.file.clone(),
                            msg: format!(
                            "task `{}`: metric `{o}` is not available for loglikelihood_rolling",
                            cfg.name
                        ),
                        })
                    }
                };
                s.metrics.push((m.metric.clone(), item));
            }
            s.target = text;
        }
        OutputType::GenerateUntil => {
            let outs: Vec<String> = responses
                .iter()
                .filter_map(|r| match r {
                    Response::Generate(g) => Some(g.clone()),
                    _ => None,
                })
                .collect();
            let golds: Vec<String> = if !inst.choices.is_empty() {
                let idx = gold_indices(task, inst)?;
                idx.iter().map(|&i| inst.choices[i].clone()).collect()
            } else {
                match &inst.target {
                    Value::Array(a) => a.iter().map(as_text).collect(),
                    v => vec![as_text(v)],
                }
            };
            s.target = golds.join(" | ");
            for (pipeline, value) in &filtered {
                // What the metrics compare: the pipeline's answer as text (lm-eval hands the
                // metric whatever the pipeline left; after `take_first` that is a string).
                let answer = match value {
                    Value::String(t) => t.clone(),
                    v => as_text(v),
                };
                for m in task.builtin_metrics() {
                    let item = generation_metric(task, m, &answer, &golds)?;
                    s.metrics
                        .push((task.metric_name(&m.metric, pipeline), item));
                }
            }
            s.filtered = filtered;
            s.prediction = outs.into_iter().next();
        }
    }
    Ok(s)
}

/// One generation metric of one answer against the references.
fn generation_metric(
    task: &Task,
    m: &crate::config::MetricSpec,
    out: &str,
    golds: &[String],
) -> Result<Item> {
    let cfg = &task.config;
    let pred = metrics::normalise(out, &m.kwargs);
    let refs: Vec<String> = golds
        .iter()
        .map(|g| metrics::normalise(g, &m.kwargs))
        .collect();
    let any = |f: &dyn Fn(&str) -> f64| refs.iter().map(|r| f(r)).fold(0.0, f64::max);
    Ok(match m.metric.as_str() {
        "exact_match" => Item::Mean(any(&|r| if r == pred { 1.0 } else { 0.0 })),
        "f1" => Item::Mean(any(&|r| metrics::token_f1(&pred, r))),
        "rouge_l" => Item::Mean(any(&|r| metrics::rouge_l(&pred, r))),
        // rouge_score's F-measure, max over the references; `use_stemmer` as there.
        name if Rouge::parse(name).is_some() => {
            let kind = Rouge::parse(name).unwrap_or(Rouge::L);
            let stem = m.kwargs.get("use_stemmer").and_then(Value::as_bool);
            let subword = m
                .kwargs
                .get("tokenizer")
                .and_then(Value::as_str)
                .and_then(|t| task.rouge_tokens.get(t));
            match subword {
                // `Task::load` loaded every `tokenizer` a ROUGE metric names.
                Some(t) => {
                    let mut best = 0.0f64;
                    for r in &refs {
                        let tokens = |s: &str| t.tokens(s);
                        let v = rouge::score_with(kind, r, &pred, &tokens).map_err(|msg| {
                            Error::Config {
                                file: cfg.file.clone(),
                                msg: format!("task `{}`, metric `{name}`: {msg}", cfg.name),
                            }
                        })?;
                        best = best.max(v);
                    }
                    Item::Mean(best)
                }
                None => Item::Mean(any(&|r| {
                    rouge::score(kind, r, &pred, stem.unwrap_or(false))
                })),
            }
        }
        name if Translation::parse(name).is_some() => {
            let t = Translation::parse(name).unwrap_or(Translation::Bleu);
            Item::Translation(t, pred.clone(), refs.clone())
        }
        "calm_match" | "calm_match_moeval" => {
            let kind = m.kwargs.get("kind").and_then(Value::as_str).unwrap_or("qa");
            let labels: Vec<String> = m
                .kwargs
                .get("labels")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(as_text).collect())
                .unwrap_or_default();
            let ok = if m.metric == "calm_match" {
                bias::calm_match_reference(kind, out, golds)
            } else {
                bias::calm_match(kind, out, golds, &labels)
            }
            .map_err(|e| Error::Config {
                file: cfg.file.clone(),
                msg: format!("task `{}`: {e}", cfg.name),
            })?;
            Item::Mean(if ok { 1.0 } else { 0.0 })
        }
        o => {
            return Err(Error::Config {
                file: cfg.file.clone(),
                msg: format!(
                    "task `{}`: metric `{o}` is not available for generate_until",
                    cfg.name
                ),
            })
        }
    })
}

fn summarise_samples(task: &Task, samples: Vec<Sample>) -> TaskResult {
    let cfg = &task.config;
    let mut out = Vec::new();
    let mut notes = cfg.ignored.clone();
    for name in task.metric_names() {
        let items: Vec<Item> = samples
            .iter()
            .filter_map(|s| {
                s.metrics
                    .iter()
                    .find(|(n, _)| n == &name)
                    .map(|x| x.1.clone())
            })
            .collect();
        out.push((name.clone(), metrics::aggregate(&items)));
        // Per-group values of mean metrics.
        let mut fields: Vec<&String> = cfg.group_by.iter().collect();
        if let Some(b) = &cfg.bias {
            if !fields.contains(&&b.group) {
                fields.push(&b.group);
            }
        }
        for f in fields {
            let mut by: BTreeMap<&str, Vec<Item>> = BTreeMap::new();
            for s in &samples {
                if let (Some(v), Some((_, it))) = (
                    s.attributes.get(f.as_str()),
                    s.metrics.iter().find(|(n, _)| n == &name),
                ) {
                    by.entry(v.as_str()).or_default().push(it.clone());
                }
            }
            for (v, items) in by {
                out.push((format!("{name}[{f}={v}]"), metrics::aggregate(&items)));
            }
        }
    }
    let (bias_metrics, bias_notes) = bias::task_metrics(cfg, &samples, None);
    out.extend(bias_metrics);
    notes.extend(bias_notes);
    TaskResult {
        task: cfg.name.clone(),
        samples,
        metrics: out,
        notes,
    }
}

/// Aggregate metrics of the groups whose member tasks all ran: (group, metric, aggregate).
/// Each is a mean over member tasks (weighted by size when `weight_by_size`), NaN members skipped.
pub fn group_aggregates(
    registry: &Registry,
    results: &[TaskResult],
) -> Vec<(String, String, Aggregate)> {
    let by_name: HashMap<&str, &TaskResult> =
        results.iter().map(|r| (r.task.as_str(), r)).collect();
    let mut out = Vec::new();
    for g in registry.groups() {
        let Ok(members) = registry.resolve(std::slice::from_ref(&g.name)) else {
            continue;
        };
        if members.is_empty() || !members.iter().all(|m| by_name.contains_key(m.as_str())) {
            continue;
        }
        for a in &g.aggregate {
            let vals: Vec<&Aggregate> = members
                .iter()
                .filter_map(|m| by_name[m.as_str()].metric(&a.metric))
                .filter(|x| x.value.is_finite())
                .collect();
            if vals.is_empty() {
                continue;
            }
            let w: Vec<f64> = vals
                .iter()
                .map(|x| if a.weight_by_size { x.n as f64 } else { 1.0 })
                .collect();
            let tw: f64 = w.iter().sum();
            let value = vals.iter().zip(&w).map(|(x, w)| x.value * w).sum::<f64>() / tw;
            let stderr = vals
                .iter()
                .zip(&w)
                .map(|(x, w)| (x.stderr * w / tw).powi(2))
                .sum::<f64>()
                .sqrt();
            out.push((
                g.name.clone(),
                a.metric.clone(),
                Aggregate {
                    value,
                    stderr,
                    n: vals.len(),
                },
            ));
        }
    }
    out
}
