//! Runs tasks against a [`LanguageModel`]: scheduling only. It deduplicates requests, batches them
//! sorted by length, and hands each document's answers to its task to score (see `score.rs`).

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::lm::{
    add_routed, GenerateRequest, LanguageModel, Loglikelihood, LoglikelihoodRequest, Sources,
};
use crate::result::TaskResult;
use crate::score::apply_joint_rules;
use crate::task::{Instance, Request, Response, Task};

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
    Ok(run(lm, tasks, opts, shard, progress)?.results)
}

/// What an evaluation produced: each task's result (samples carry their answers' sources) and what
/// the model did for the whole evaluation.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub results: Vec<TaskResult>,
    /// Tokens the model routed to each expert, `[layer][expert]`, over every request it computed
    /// (answers from a cache route nothing); empty for dense models.
    pub routed: Vec<Vec<u64>>,
    /// Unique requests sent to the model.
    pub requests: usize,
    /// Of those, answered from a cache.
    pub cached: usize,
}

/// [`evaluate_shard`] with what the model reported besides its answers ([`Evaluation`]).
pub fn run(
    lm: &dyn LanguageModel,
    tasks: &[Task],
    opts: &RunOptions,
    shard: Option<Shard>,
    progress: &dyn Progress,
) -> Result<Evaluation> {
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
    let mut routed: Vec<Vec<u64>> = Vec::new();
    let mut cached = 0;
    let mut ll_out: Vec<Option<Loglikelihood>> = vec![None; ll.len()];
    let mut ll_src: Vec<Sources> = vec![Sources::default(); ll.len()];
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
            let res = lm.loglikelihood_answers(&batch).map_err(model_err)?;
            if res.values.len() != batch.len() {
                return Err(Error::Model(format!(
                    "{} answers for {} requests",
                    res.values.len(),
                    batch.len()
                )));
            }
            add_routed(&mut routed, &res.routed);
            cached += res.cached;
            for (j, (&i, r)) in order[p..q].iter().zip(&res.values).enumerate() {
                ll_out[i] = Some(*r);
                ll_src[i] = res.sources_of(j);
            }
            progress.advance(q - p);
            p = q;
        }
        progress.finish();
    }
    let mut roll_out: Vec<f64> = vec![f64::NAN; roll.len()];
    let mut roll_src: Vec<Sources> = vec![Sources::default(); roll.len()];
    if !roll.is_empty() {
        progress.start("rolling", roll.len());
        let mut order: Vec<usize> = (0..roll.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(roll[i].len()));
        for chunk in order.chunks(bs) {
            let batch: Vec<String> = chunk.iter().map(|&i| roll[i].clone()).collect();
            let res = lm
                .loglikelihood_rolling_answers(&batch)
                .map_err(model_err)?;
            add_routed(&mut routed, &res.routed);
            cached += res.cached;
            for (j, (&i, r)) in chunk.iter().zip(&res.values).enumerate() {
                roll_out[i] = *r;
                roll_src[i] = res.sources_of(j);
            }
            progress.advance(chunk.len());
        }
        progress.finish();
    }
    let mut gen_out: Vec<String> = vec![String::new(); gen.len()];
    let mut gen_src: Vec<Sources> = vec![Sources::default(); gen.len()];
    if !gen.is_empty() {
        progress.start("generate", gen.len());
        let mut order: Vec<usize> = (0..gen.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(gen[i].context.len()));
        for chunk in order.chunks(bs) {
            let batch: Vec<GenerateRequest> = chunk.iter().map(|&i| gen[i].clone()).collect();
            let res = lm.generate_until_answers(&batch).map_err(model_err)?;
            add_routed(&mut routed, &res.routed);
            cached += res.cached;
            for (j, &i) in chunk.iter().enumerate() {
                gen_src[i] = res.sources_of(j);
            }
            for (&i, mut r) in chunk.iter().zip(res.values) {
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
        let responses: Vec<Vec<Response>> = insts
            .iter()
            .map(|inst| {
                inst.requests
                    .iter()
                    .map(|r| match r {
                        Request::Loglikelihood(q) => Response::Loglikelihood(
                            ll_out[ll_idx[q]].expect("every request answered"),
                        ),
                        Request::Rolling(t) => Response::Rolling(roll_out[roll_idx[t]]),
                        Request::Generate(g) => {
                            Response::Generate(gen_out[gen_idx[&gen_key(g)]].clone())
                        }
                    })
                    .collect()
            })
            .collect();
        let mut samples = task.score_all(insts, &responses)?;
        for (inst, sample) in insts.iter().zip(samples.iter_mut()) {
            let sources: Vec<Sources> = inst
                .requests
                .iter()
                .map(|r| match r {
                    Request::Loglikelihood(q) => ll_src[ll_idx[q]].clone(),
                    Request::Rolling(t) => roll_src[roll_idx[t]].clone(),
                    Request::Generate(g) => gen_src[gen_idx[&gen_key(g)]].clone(),
                })
                .collect();
            if sources
                .iter()
                .any(|s| s.units > 0 || !s.contributions.is_empty())
            {
                sample.sources = sources;
            }
        }
        let mut result = task.summarise(samples);
        task.finish(&mut result)?;
        results.push(result);
    }
    apply_joint_rules(tasks, &mut results);
    Ok(Evaluation {
        results,
        routed,
        requests: ll.len() + roll.len() + gen.len(),
        cached,
    })
}
