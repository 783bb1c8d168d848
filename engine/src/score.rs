//! Log-likelihood scoring of continuations, the primitive behind multiple-choice and perplexity tasks.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use routers::ExpertMask;

use crate::attention::KvCache;
use crate::model::{Model, RoutedTokens, SeqInput};
use crate::{Error, Result};

/// Score `continuation` given `context` (token ids). The context must not be empty: callers prefix
/// an empty context with the EOS/BOS token, as the evaluation harness does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ScoreRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// Per-token log-probabilities of a continuation and whether each token was the model's argmax.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub logprobs: Vec<f32>,
    pub greedy: Vec<bool>,
}

impl Score {
    /// Summed log-likelihood of the continuation (accumulated in f64).
    pub fn total(&self) -> f64 {
        self.logprobs.iter().map(|&x| x as f64).sum()
    }

    /// True when every continuation token was the argmax.
    pub fn is_greedy(&self) -> bool {
        self.greedy.iter().all(|&g| g)
    }
}

/// Batching of [`loglikelihood`].
#[derive(Clone, Debug)]
pub struct ScoreOptions {
    /// Upper bound on new tokens per forward call (a sequence longer than this runs alone).
    pub batch_tokens: usize,
    /// Experts the requests may use; `None` means every loaded expert.
    pub mask: Option<ExpertMask>,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            batch_tokens: 2048,
            mask: None,
        }
    }
}

/// Scores every request. Requests that share a context compute it once and extend its KV cache
/// (a fork per continuation); results come back in request order and do not depend on batching.
pub fn loglikelihood(
    model: &Model,
    requests: &[ScoreRequest],
    opts: &ScoreOptions,
) -> Result<Vec<Score>> {
    Ok(loglikelihood_routed(model, requests, opts)?.0)
}

/// [`loglikelihood`] with the tokens its forward passes routed to each expert.
pub fn loglikelihood_routed(
    model: &Model,
    requests: &[ScoreRequest],
    opts: &ScoreOptions,
) -> Result<(Vec<Score>, RoutedTokens)> {
    let mut routed = RoutedTokens::default();
    for (i, r) in requests.iter().enumerate() {
        if r.context.is_empty() || r.continuation.is_empty() {
            return Err(Error::Input(format!(
                "score request {i}: context and continuation must both be non-empty"
            )));
        }
        let v = model.config().vocab_size as u32;
        if let Some(&t) = r.context.iter().chain(&r.continuation).find(|&&t| t >= v) {
            return Err(Error::Input(format!(
                "score request {i}: token id {t} is outside the vocabulary (size {v})"
            )));
        }
    }
    // Group by context, in order of first appearance.
    let mut groups: Vec<(&[u32], Vec<usize>)> = Vec::new();
    let mut by_ctx: HashMap<&[u32], usize> = HashMap::new();
    for (i, r) in requests.iter().enumerate() {
        let g = *by_ctx.entry(&r.context).or_insert_with(|| {
            groups.push((&r.context, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(i);
    }
    let mut results: Vec<Option<Score>> = vec![None; requests.len()];
    let mask = opts.mask.as_ref();
    // Work through the groups in chunks, so only one chunk's context caches are alive at a time.
    let mut g = 0;
    while g < groups.len() {
        let mut end = g;
        let mut tokens = 0;
        while end < groups.len() && (end == g || tokens + groups[end].0.len() <= opts.batch_tokens)
        {
            tokens += groups[end].0.len();
            end += 1;
        }
        let chunk = &groups[g..end];
        // 1. Contexts: fill their caches and take the logits of their last position.
        let mut caches: Vec<KvCache> = chunk.iter().map(|_| model.new_cache()).collect();
        let mut inputs: Vec<SeqInput> = chunk
            .iter()
            .zip(caches.iter_mut())
            .map(|((ctx, _), cache)| SeqInput {
                tokens: ctx,
                cache,
                mask,
            })
            .collect();
        let fwd = model.forward_last(&mut inputs)?;
        routed.add(&fwd.routed);
        drop(inputs);
        // Each context's last row predicts the first token of every continuation in its group.
        let queries: Vec<(u32, Vec<u32>)> = chunk
            .iter()
            .zip(&fwd.starts)
            .map(|((_, reqs), &s)| {
                let firsts = reqs.iter().map(|&r| requests[r].continuation[0]).collect();
                (s as u32, firsts)
            })
            .collect();
        let first = gather_logprobs(model, &fwd.hidden, &queries)?;
        let caches: Vec<Arc<KvCache>> = caches.into_iter().map(Arc::new).collect();
        // 2. Continuations: feed all but the last token on a fork of the context's cache.
        let mut pending: Vec<(usize, usize)> = Vec::new(); // (group in chunk, request)
        for (ci, (_, reqs)) in chunk.iter().enumerate() {
            for (j, &r) in reqs.iter().enumerate() {
                let cont = &requests[r].continuation;
                let (lp, gr) = first[ci][j];
                results[r] = Some(Score {
                    logprobs: vec![lp],
                    greedy: vec![gr],
                });
                if cont.len() > 1 {
                    pending.push((ci, r));
                }
            }
        }
        let mut p = 0;
        while p < pending.len() {
            let mut q = p;
            let mut tokens = 0;
            while q < pending.len() {
                let n = requests[pending[q].1].continuation.len() - 1;
                if q > p && tokens + n > opts.batch_tokens {
                    break;
                }
                tokens += n;
                q += 1;
            }
            let part = &pending[p..q];
            let mut forks: Vec<KvCache> = part
                .iter()
                .map(|&(ci, _)| KvCache::fork(&caches[ci]))
                .collect();
            let mut inputs: Vec<SeqInput> = part
                .iter()
                .zip(forks.iter_mut())
                .map(|(&(_, r), cache)| {
                    let cont = &requests[r].continuation;
                    SeqInput {
                        tokens: &cont[..cont.len() - 1],
                        cache,
                        mask,
                    }
                })
                .collect();
            let fwd = model.forward(&mut inputs, false)?;
            routed.add(&fwd.routed);
            drop(inputs);
            // Row s + i predicts continuation token i + 1.
            let queries: Vec<(u32, Vec<u32>)> = part
                .iter()
                .zip(&fwd.starts)
                .flat_map(|(&(_, r), &s)| {
                    let cont = &requests[r].continuation;
                    (1..cont.len()).map(move |i| ((s + i - 1) as u32, vec![cont[i]]))
                })
                .collect();
            let mut found = gather_logprobs(model, &fwd.hidden, &queries)?.into_iter();
            for &(_, r) in part {
                let score = results[r].as_mut().expect("first token scored above");
                for _ in 1..requests[r].continuation.len() {
                    let (lp, gr) = found.next().expect("one query per token")[0];
                    score.logprobs.push(lp);
                    score.greedy.push(gr);
                }
            }
            p = q;
        }
        g = end;
    }
    let scores = results
        .into_iter()
        .map(|r| r.expect("every request scored"))
        .collect();
    Ok((scores, routed))
}

/// For each (row of `hidden`, tokens) query: the log-probability of each token under that row's
/// distribution and whether it is the argmax (the first maximum, as `torch.argmax`). Logits are computed
/// a slice of rows at a time, so memory stays bounded however many rows are asked for.
fn gather_logprobs(
    model: &Model,
    hidden: &Tensor,
    queries: &[(u32, Vec<u32>)],
) -> Result<Vec<Vec<(f32, bool)>>> {
    const SLICE: usize = 64;
    if let Some(gpu) = model.cuda() {
        return gather_logprobs_gpu(gpu, model.config().hidden_size, hidden, queries);
    }
    let v = model.config().vocab_size;
    let mut out = Vec::with_capacity(queries.len());
    for part in queries.chunks(SLICE) {
        let rows: Vec<u32> = part.iter().map(|q| q.0).collect();
        let idx = Tensor::from_vec(rows, part.len(), hidden.device())?;
        let logits = model.logits(&hidden.index_select(&idx, 0)?)?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        for (row, (_, tokens)) in flat.chunks_exact(v).zip(part) {
            let (mut argmax, mut max) = (0usize, f32::NEG_INFINITY);
            for (i, &x) in row.iter().enumerate() {
                if x > max {
                    max = x;
                    argmax = i;
                }
            }
            let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
            let log_z = max as f64 + sum.ln();
            out.push(
                tokens
                    .iter()
                    .map(|&t| {
                        (
                            (row[t as usize] as f64 - log_z) as f32,
                            t as usize == argmax,
                        )
                    })
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// [`gather_logprobs`] on the GPU: logits, log-softmax and argmax stay on the device; one hidden row
/// per (row, token) pair, a bounded number of pairs at a time.
fn gather_logprobs_gpu(
    gpu: &crate::cuda::CudaModel,
    h: usize,
    hidden: &Tensor,
    queries: &[(u32, Vec<u32>)],
) -> Result<Vec<Vec<(f32, bool)>>> {
    const PAIRS: usize = 512;
    let flat = hidden.flatten_all()?.to_vec1::<f32>()?;
    let pairs: Vec<(usize, u32)> = queries
        .iter()
        .flat_map(|(r, tokens)| tokens.iter().map(move |&t| (*r as usize, t)))
        .collect();
    let mut found = Vec::with_capacity(pairs.len());
    for part in pairs.chunks(PAIRS) {
        let mut rows = Vec::with_capacity(part.len() * h);
        for &(r, _) in part {
            rows.extend_from_slice(&flat[r * h..(r + 1) * h]);
        }
        let tokens: Vec<u32> = part.iter().map(|p| p.1).collect();
        found.extend(gpu.logprobs(&rows, &tokens)?);
    }
    let mut found = found.into_iter();
    Ok(queries
        .iter()
        .map(|(_, tokens)| tokens.iter().filter_map(|_| found.next()).collect())
        .collect())
}
