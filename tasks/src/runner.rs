//! Runs tasks against a [`LanguageModel`]: deduplicates requests, batches them sorted by length,
//! and turns the answers into per-sample rows and aggregated metrics, in document order.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::bias;
use crate::config::{OutputType, Registry};
use crate::error::{Error, Result};
use crate::lm::{GenerateRequest, LanguageModel, Loglikelihood, LoglikelihoodRequest};
use crate::metrics::{self, Aggregate, Item, Translation};
use crate::rouge::{self, Rouge};
use crate::task::{as_text, Instance, Request, Response, Task};

/// Receives progress while requests run (the CLI draws a progress bar).
pub trait Progress {
    /// A phase starts with `total` requests of `kind` (`loglikelihood`, `rolling`, `generate`).
    fn start(&self, kind: &str, total: usize);
    fn advance(&self, n: usize);
    fn finish(&self);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: usize) {}
    fn advance(&self, _: usize) {}
    fn finish(&self) {}
}

/// Runner settings.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Requests per model call (results do not depend on it).
    pub batch_size: usize,
    /// Few-shot sampler seed.
    pub fewshot_seed: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            batch_size: 64,
            fewshot_seed: 1234,
        }
    }
}

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
    /// Multiple choice: each choice's log-likelihood, in choice order.
    pub choice_loglikelihoods: Option<Vec<f64>>,
    /// The continuation's (or whole document's) summed log-likelihood.
    pub loglikelihood: Option<f64>,
    pub metrics: Vec<(String, Item)>,
    /// Group attributes (`group_by` / `bias` fields).
    pub attributes: BTreeMap<String, String>,
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
}

fn model_err(e: crate::lm::ModelError) -> Error {
    Error::Model(e.to_string())
}

fn gen_key(g: &GenerateRequest) -> String {
    format!(
        "{}\u{0}{:?}\u{0}{}\u{0}{}\u{0}{:?}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}",
        g.context,
        g.until,
        g.max_gen_toks,
        g.temperature,
        g.top_p,
        g.seed,
        g.num_beams,
        g.length_penalty,
        g.early_stopping
    )
}

/// One of `count` disjoint parts of every task's documents: documents whose id is `index` modulo
/// `count`. The split depends only on document ids, so N machines agree on it without talking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parses `I/N` (0 <= I < N).
    pub fn parse(s: &str) -> std::result::Result<Shard, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("shard `{s}` is not of the form I/N (e.g. 0/4)"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("shard `{s}`: `{i}` is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("shard `{s}`: `{n}` is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard `{s}`: need 0 <= I < N"));
        }
        Ok(Shard { index, count })
    }

    pub fn contains(&self, doc_id: usize) -> bool {
        doc_id % self.count == self.index
    }
}

/// Evaluates tasks: every request of every task is sent once, even when several documents or
/// tasks ask for it.
pub fn evaluate(
    lm: &dyn LanguageModel,
    tasks: &[Task],
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<Vec<TaskResult>> {
    evaluate_shard(lm, tasks, opts, None, progress)
}

/// [`evaluate`] restricted to one shard of the documents. Prompts are built for every document
/// first (the few-shot sampler is consumed in document order), so a document's prompt is the same
/// whichever shard runs it; metrics cover the shard's documents only.
pub fn evaluate_shard(
    lm: &dyn LanguageModel,
    tasks: &[Task],
    opts: &RunOptions,
    shard: Option<Shard>,
    progress: &dyn Progress,
) -> Result<Vec<TaskResult>> {
    let instances: Vec<Vec<Instance>> = tasks
        .iter()
        .map(|t| {
            let mut v = t.instances(opts.fewshot_seed)?;
            if let Some(sh) = shard {
                v.retain(|i| sh.contains(i.doc_id));
            }
            Ok(v)
        })
        .collect::<Result<_>>()?;
    // Unique requests per kind.
    let mut ll: Vec<LoglikelihoodRequest> = Vec::new();
    let mut ll_idx: HashMap<LoglikelihoodRequest, usize> = HashMap::new();
    let mut roll: Vec<String> = Vec::new();
    let mut roll_idx: HashMap<String, usize> = HashMap::new();
    let mut gen: Vec<GenerateRequest> = Vec::new();
    let mut gen_idx: HashMap<String, usize> = HashMap::new();
    for inst in instances.iter().flatten() {
        for r in &inst.requests {
            match r {
                Request::Loglikelihood(q) => {
                    if !ll_idx.contains_key(q) {
                        ll_idx.insert(q.clone(), ll.len());
                        ll.push(q.clone());
                    }
                }
                Request::Rolling(t) => {
                    if !roll_idx.contains_key(t) {
                        roll_idx.insert(t.clone(), roll.len());
                        roll.push(t.clone());
                    }
                }
                Request::Generate(g) => {
                    let k = gen_key(g);
                    if let std::collections::hash_map::Entry::Vacant(e) = gen_idx.entry(k) {
                        e.insert(gen.len());
                        gen.push(g.clone());
                    }
                }
            }
        }
    }
    let bs = opts.batch_size.max(1);
    // Log-likelihood: longest contexts first, equal contexts adjacent (so a batch shares their prefix).
    let mut order: Vec<usize> = (0..ll.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&ll[a], &ll[b]);
        (y.context.len() + y.continuation.len())
            .cmp(&(x.context.len() + x.continuation.len()))
            .then_with(|| x.cmp(y))
    });
    // Regroup so all requests with one context sit together, at the position of its longest request.
    let mut ctx_first: HashMap<&str, usize> = HashMap::new();
    for (pos, &i) in order.iter().enumerate() {
        ctx_first.entry(ll[i].context.as_str()).or_insert(pos);
    }
    order.sort_by_key(|&i| {
        (
            ctx_first[ll[i].context.as_str()],
            ll[i].continuation.clone(),
        )
    });
    let mut ll_out: Vec<Option<Loglikelihood>> = vec![None; ll.len()];
    if !ll.is_empty() {
        progress.start("loglikelihood", ll.len());
        let mut p = 0;
        while p < order.len() {
            let mut q = (p + bs).min(order.len());
            // Do not split one context's requests across calls.
            while q < order.len() && ll[order[q]].context == ll[order[q - 1]].context {
                q += 1;
            }
            let batch: Vec<LoglikelihoodRequest> =
                order[p..q].iter().map(|&i| ll[i].clone()).collect();
            let res = lm.loglikelihood(&batch).map_err(model_err)?;
            if res.len() != batch.len() {
                return Err(Error::Model(format!(
                    "{} answers for {} requests",
                    res.len(),
                    batch.len()
                )));
            }
            for (&i, r) in order[p..q].iter().zip(res) {
                ll_out[i] = Some(r);
            }
            progress.advance(q - p);
            p = q;
        }
        progress.finish();
    }
    let mut roll_out: Vec<f64> = vec![f64::NAN; roll.len()];
    if !roll.is_empty() {
        progress.start("rolling", roll.len());
        let mut order: Vec<usize> = (0..roll.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(roll[i].len()));
        for chunk in order.chunks(bs) {
            let batch: Vec<String> = chunk.iter().map(|&i| roll[i].clone()).collect();
            let res = lm.loglikelihood_rolling(&batch).map_err(model_err)?;
            for (&i, r) in chunk.iter().zip(res) {
                roll_out[i] = r;
            }
            progress.advance(chunk.len());
        }
        progress.finish();
    }
    let mut gen_out: Vec<String> = vec![String::new(); gen.len()];
    if !gen.is_empty() {
        progress.start("generate", gen.len());
        let mut order: Vec<usize> = (0..gen.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(gen[i].context.len()));
        for chunk in order.chunks(bs) {
            let batch: Vec<GenerateRequest> = chunk.iter().map(|&i| gen[i].clone()).collect();
            let res = lm.generate_until(&batch).map_err(model_err)?;
            for (&i, mut r) in chunk.iter().zip(res) {
                // Cut at the first stop string here too, whatever the model did (the harness does).
                if let Some(cut) = gen[i]
                    .until
                    .iter()
                    .filter(|u| !u.is_empty())
                    .filter_map(|u| r.find(u.as_str()))
                    .min()
                {
                    r.truncate(cut);
                }
                gen_out[i] = r;
            }
            progress.advance(chunk.len());
        }
        progress.finish();
    }
    let mut results = Vec::new();
    for (task, insts) in tasks.iter().zip(&instances) {
        let mut samples = Vec::with_capacity(insts.len());
        for inst in insts {
            let responses: Vec<Response> = inst
                .requests
                .iter()
                .map(|r| match r {
                    Request::Loglikelihood(q) => {
                        Response::Loglikelihood(ll_out[ll_idx[q]].expect("every request answered"))
                    }
                    Request::Rolling(t) => Response::Rolling(roll_out[roll_idx[t]]),
                    Request::Generate(g) => {
                        Response::Generate(gen_out[gen_idx[&gen_key(g)]].clone())
                    }
                })
                .collect();
            samples.push(score(task, inst, &responses)?);
        }
        let mut result = summarise(task, samples);
        // Suite metrics that span samples (RewardBench sections, CoBBLEr biases, correlations).
        crate::suite::finish(task, &mut result)?;
        results.push(result);
    }
    bias::apply_joint_rules(tasks, &mut results);
    Ok(results)
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

fn score(task: &Task, inst: &Instance, responses: &[Response]) -> Result<Sample> {
    let cfg = &task.config;
    let mut s = Sample {
        doc_id: inst.doc_id,
        prompt: inst.context.clone(),
        arguments: task.harness_arguments(&inst.requests),
        target: String::new(),
        prediction: None,
        choice_loglikelihoods: None,
        loglikelihood: None,
        metrics: Vec::new(),
        attributes: task.attributes(inst.doc_id),
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
            for m in &cfg.metric_list {
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
            for m in &cfg.metric_list {
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
            for m in &cfg.metric_list {
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
            let Response::Generate(out) = &responses[0] else {
                unreachable!("generation task, generation response")
            };
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
            for m in &cfg.metric_list {
                let pred = metrics::normalise(out, &m.kwargs);
                let refs: Vec<String> = golds
                    .iter()
                    .map(|g| metrics::normalise(g, &m.kwargs))
                    .collect();
                let any = |f: &dyn Fn(&str) -> f64| refs.iter().map(|r| f(r)).fold(0.0, f64::max);
                let item = match m.metric.as_str() {
                    "exact_match" => Item::Mean(any(&|r| if r == pred { 1.0 } else { 0.0 })),
                    "f1" => Item::Mean(any(&|r| metrics::token_f1(&pred, r))),
                    "rouge_l" => Item::Mean(any(&|r| metrics::rouge_l(&pred, r))),
                    // rouge_score's F-measure, max over the references; `use_stemmer` as there.
                    name if Rouge::parse(name).is_some() => {
                        let kind = Rouge::parse(name).unwrap_or(Rouge::L);
                        let stem = m.kwargs.get("use_stemmer").and_then(Value::as_bool);
                        Item::Mean(any(&|r| {
                            rouge::score(kind, r, &pred, stem.unwrap_or(false))
                        }))
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
                            bias::calm_match_reference(kind, out, &golds)
                        } else {
                            bias::calm_match(kind, out, &golds, &labels)
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
                };
                s.metrics.push((m.metric.clone(), item));
            }
            s.prediction = Some(out.clone());
        }
    }
    Ok(s)
}

fn summarise(task: &Task, samples: Vec<Sample>) -> TaskResult {
    let cfg = &task.config;
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for m in &cfg.metric_list {
        let items: Vec<Item> = samples
            .iter()
            .filter_map(|s| {
                s.metrics
                    .iter()
                    .find(|(n, _)| n == &m.metric)
                    .map(|x| x.1.clone())
            })
            .collect();
        out.push((m.metric.clone(), metrics::aggregate(&items)));
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
                    s.metrics.iter().find(|(n, _)| n == &m.metric),
                ) {
                    by.entry(v.as_str()).or_default().push(it.clone());
                }
            }
            for (v, items) in by {
                out.push((format!("{}[{f}={v}]", m.metric), metrics::aggregate(&items)));
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
