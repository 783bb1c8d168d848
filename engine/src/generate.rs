//! Text generation: greedy, seeded sampling or beam search, stop strings, EOS and a token budget,
//! batched across prompts.

use std::sync::Arc;

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use routers::ExpertMask;

use crate::attention::KvCache;
use crate::model::{Model, RoutedTokens, SeqInput};
use crate::{Error, Result};

/// How to continue one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling threshold in (0, 1); `None` samples from the whole distribution.
    pub top_p: Option<f64>,
    /// Seed of the sampler (ignored when greedy).
    pub seed: u64,
    /// Generation stops at the first occurrence of any of these strings; the text is cut before it.
    pub stop: Vec<String>,
    /// Stop when the model emits one of its EOS tokens.
    pub stop_at_eos: bool,
    /// Beam search instead of greedy decoding when `num_beams > 1`.
    pub beam: BeamParams,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: None,
            seed: 0,
            stop: Vec::new(),
            stop_at_eos: true,
            beam: BeamParams::default(),
        }
    }
}

/// Beam search as transformers' `generate(num_beams=N, do_sample=False)` runs it: each step keeps the
/// `N` best unfinished continuations by summed log-probability; a continuation that ends (EOS, or the
/// token budget) becomes a hypothesis scored `sum / generated_len ^ length_penalty`, and the best of
/// at most `N` hypotheses is the output. Stop strings cut the final text only (they do not end beams).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BeamParams {
    /// 1 means no beam search.
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
}

impl Default for BeamParams {
    fn default() -> Self {
        Self {
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
        }
    }
}

/// transformers' `early_stopping`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `False` (transformers' default): stop once the best running beam, scored at its current length,
    /// cannot beat the worst of `N` finished hypotheses.
    #[default]
    Heuristic,
    /// `True`: stop as soon as `N` hypotheses are finished.
    Always,
    /// `"never"`: as `Heuristic`, but a positive length penalty scores running beams at the maximum length.
    Never,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_new_tokens`.
    Length,
    /// Emitted an EOS token (not included in `tokens`; reported in the step's [`Progress::token`]).
    Eos,
    /// Produced a stop string (the text is cut before it).
    Stop,
}

/// The continuation of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated token ids (without the EOS that ended it, if any).
    pub tokens: Vec<u32>,
    /// Decoded text, cut before the first stop string. Empty when the model has no tokenizer.
    pub text: String,
    pub finish: FinishReason,
}

/// A token with its log-probability under the model (log-softmax of the raw logits, before temperature),
/// and the most likely tokens at that position when asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `top` most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Chooses a greedy sequence's next token itself, from the last position's final hidden state
/// (the LM head's input) and logits: how kNN-LM decodes through the [`Decoder`] with its datastore
/// mixed in. `step` counts the sequence's generated tokens before this one.
pub trait TokenPicker: Send + Sync {
    fn pick(&self, step: usize, hidden: &[f32], logits: &[f32]) -> Result<u32>;
}

/// A shared [`TokenPicker`].
#[derive(Clone)]
pub struct Picker(pub Arc<dyn TokenPicker>);

impl std::fmt::Debug for Picker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Picker")
    }
}

/// One sequence for a [`Decoder`].
#[derive(Clone, Debug, Default)]
pub struct SeqRequest {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    /// Experts this sequence may use; `None` means every loaded expert.
    pub mask: Option<ExpertMask>,
    /// Report each generated token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Report the log-probability of every prompt token after the first (from the prefill), with
    /// `logprobs` alternatives. This scores a prompt, even with `max_new_tokens` 0.
    pub prompt_logprobs: bool,
    /// Picks each next token instead of the decoder's sampler (greedy requests only: refused with
    /// sampling or beams).
    pub picker: Option<Picker>,
}

/// Handle of a sequence inside a [`Decoder`]; handles count up from 0 in the order sequences are added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// What one [`Decoder::step`] did for one sequence. A sequence whose prompt is still being prefilled in
/// chunks reports nothing.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Progress {
    pub id: SeqId,
    /// On the step that finishes the prompt's prefill, when asked for: entry `i` scores `prompt[i + 1]`.
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    /// The token this step produced, an EOS that ended the sequence included (`None` when it needed no
    /// token). Its `logprob` and `top` are filled only when the sequence asked for log-probabilities.
    pub token: Option<TokenLogprob>,
    /// Set on the sequence's last step; the sequence then leaves the decoder.
    pub finished: Option<Generation>,
    /// Set when this sequence alone failed (its sampler could not draw a token); it leaves the decoder
    /// and the others carry on.
    pub error: Option<String>,
}

struct Active {
    id: SeqId,
    req: SeqRequest,
    cache: KvCache,
    sampler: LogitsProcessor,
    tokens: Vec<u32>,
    done: Option<FinishReason>,
    text: String,
    /// Prompt tokens already in the cache (the prefill is done when this is the prompt's length).
    fed: usize,
    /// Prompt log-probabilities gathered over the prefill's chunks.
    scored: Vec<TokenLogprob>,
    /// Why this sequence failed alone.
    failed: Option<String>,
    /// Beam search state (`num_beams > 1`).
    beams: Option<BeamSearch>,
}

/// One running beam: its own KV cache (forked from its parent's when several beams continue it) and
/// its tokens, the last of which is fed at the next step.
struct Beam {
    cache: KvCache,
    tokens: Vec<u32>,
    score: f32,
}

/// A finished hypothesis: tokens (an EOS that ended it included) and its length-penalised score.
struct Hypothesis {
    tokens: Vec<u32>,
    score: f32,
    eos: bool,
}

#[derive(Default)]
struct BeamSearch {
    /// Best first; empty before the first expansion (the prompt's cache is then the only parent).
    running: Vec<Beam>,
    /// Best first, at most `num_beams`.
    finished: Vec<Hypothesis>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`: a running beam may still improve.
    improvable: bool,
}

/// transformers masks beams it must not pick with this score (in f32).
const MASKED: f32 = -1.0e9;

/// Step-wise generation for continuous batching: sequences join between steps, each with its own
/// parameters, expert mask and stop conditions, and leave when done or cancelled. Every step runs one
/// forward pass over all live sequences (new ones feed their prompt, the others their last token); as the
/// forward pass never pads and is batch-independent, a sequence's result does not depend on what else
/// was in the batch or when it joined.
///
/// With a prefill chunk, a step feeds at most that many prompt tokens in all (earliest sequence first),
/// so a long prompt is prefilled over several steps while the other sequences keep decoding.
pub struct Decoder<'m> {
    model: &'m Model,
    seqs: Vec<Active>,
    next_id: u64,
    prefill_chunk: usize,
    /// Tokens the steps' forward passes routed to each expert since the last `take_routed`.
    routed: RoutedTokens,
}

impl<'m> Decoder<'m> {
    /// A decoder that prefills each prompt in one step.
    pub fn new(model: &'m Model) -> Self {
        Self::with_prefill_chunk(model, usize::MAX)
    }

    /// A decoder that feeds at most `chunk` prompt tokens per step (at least 1).
    pub fn with_prefill_chunk(model: &'m Model, chunk: usize) -> Self {
        Self {
            model,
            seqs: Vec::new(),
            next_id: 0,
            prefill_chunk: chunk.max(1),
            routed: RoutedTokens::default(),
        }
    }

    /// Tokens this decoder's forward passes routed to each expert since it was made (or since the
    /// previous call, which resets the count).
    pub fn take_routed(&mut self) -> RoutedTokens {
        std::mem::take(&mut self.routed)
    }

    /// Adds a sequence; it starts at the next step. Bad input is refused here, so that one request
    /// cannot fail a step shared with others.
    pub fn add(&mut self, req: SeqRequest) -> Result<SeqId> {
        let model = self.model;
        if req.prompt.is_empty() {
            return Err(Error::Input("the prompt has no tokens".into()));
        }
        let v = model.config().vocab_size as u32;
        if let Some(&t) = req.prompt.iter().find(|&&t| t >= v) {
            return Err(Error::Input(format!(
                "token id {t} is outside the vocabulary (size {v})"
            )));
        }
        if !req.params.stop.is_empty() && model.tokenizer().is_none() {
            return Err(Error::Input("stop strings need a tokenizer".into()));
        }
        if let (Some(m), Some(loaded)) = (&req.mask, model.loaded_experts()) {
            if m.num_experts() != loaded.num_experts() || !m.is_subset_of(loaded) {
                return Err(Error::Input(format!(
                    "expert mask {m:?} asks for experts that were not loaded ({loaded:?})"
                )));
            }
        }
        let p = &req.params;
        if req.picker.is_some() && (p.temperature > 0.0 || p.beam.num_beams > 1) {
            return Err(Error::Input(
                "a token picker decodes greedily: no sampling (temperature > 0) or beams".into(),
            ));
        }
        if p.beam.num_beams == 0 {
            return Err(Error::Input("num_beams must be at least 1".into()));
        }
        let beams = if p.beam.num_beams > 1 {
            if p.temperature > 0.0 {
                return Err(Error::Input(
                    "beam search decodes deterministically: sampling (temperature > 0) with num_beams > 1 is not supported".into(),
                ));
            }
            if req.logprobs.is_some() {
                return Err(Error::Input(
                    "per-token log-probabilities are not available with beam search".into(),
                ));
            }
            if !p.beam.length_penalty.is_finite() {
                return Err(Error::Input(
                    "length_penalty must be a finite number".into(),
                ));
            }
            Some(BeamSearch {
                improvable: true,
                ..BeamSearch::default()
            })
        } else {
            None
        };
        let sampling = if p.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match p.top_p {
                Some(top_p) => Sampling::TopP {
                    p: top_p,
                    temperature: p.temperature,
                },
                None => Sampling::All {
                    temperature: p.temperature,
                },
            }
        };
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.push(Active {
            id,
            sampler: LogitsProcessor::from_sampling(p.seed, sampling),
            cache: model.new_cache(),
            tokens: Vec::new(),
            done: None,
            text: String::new(),
            fed: 0,
            scored: Vec::new(),
            failed: None,
            beams,
            req,
        });
        Ok(id)
    }

    /// Drops a sequence (a client went away); returns whether it was there.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let before = self.seqs.len();
        self.seqs.retain(|s| s.id != id);
        self.seqs.len() != before
    }

    /// Sequences in the decoder (started or waiting for their first step).
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Handles of the sequences in the decoder.
    pub fn ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.iter().map(|s| s.id)
    }

    /// Runs one decoding step over every sequence and reports what each did; finished sequences leave.
    pub fn step(&mut self) -> Result<Vec<Progress>> {
        let model = self.model;
        let mut out = Vec::with_capacity(self.seqs.len());
        // A sequence that wants no token and no prompt scores ends without a forward pass.
        for s in &mut self.seqs {
            if s.fed == 0 && s.req.params.max_new_tokens == 0 && !s.req.prompt_logprobs {
                s.done = Some(FinishReason::Length);
            }
        }
        let live: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| self.seqs[i].done.is_none())
            .collect();
        if !live.is_empty() {
            self.forward_step(&live, &mut out)?;
        }
        let mut i = 0;
        while i < self.seqs.len() {
            if self.seqs[i].done.is_none() {
                i += 1;
                continue;
            }
            let s = self.seqs.remove(i);
            let (finished, error) = match s.failed {
                Some(e) => (None, Some(e)),
                None => (Some(finish(model, s.done, s.tokens, s.text)?), None),
            };
            match out.iter_mut().find(|p| p.id == s.id) {
                Some(p) => {
                    p.finished = finished;
                    p.error = error;
                }
                None => out.push(Progress {
                    id: s.id,
                    finished,
                    error,
                    ..Progress::default()
                }),
            }
        }
        Ok(out)
    }

    fn forward_step(&mut self, live: &[usize], out: &mut Vec<Progress>) -> Result<()> {
        let model = self.model;
        let eos = &model.config().eos_token_ids;
        // What each sequence feeds this step: the next chunk of its prompt, or its last token (one
        // entry per running beam under beam search). Sequences left without prefill budget wait.
        let mut budget = self.prefill_chunk;
        let mut steps: Vec<(usize, Vec<u32>)> = Vec::with_capacity(live.len());
        for &i in live {
            let s = &self.seqs[i];
            let left = s.req.prompt.len() - s.fed;
            if left == 0 {
                match &s.beams {
                    Some(b) => steps.extend(
                        b.running
                            .iter()
                            .filter_map(|beam| Some((i, vec![*beam.tokens.last()?]))),
                    ),
                    None => {
                        if let Some(&last) = s.tokens.last() {
                            steps.push((i, vec![last]));
                        }
                    }
                }
                continue;
            }
            let n = left.min(budget);
            if n > 0 {
                budget -= n;
                steps.push((i, s.req.prompt[s.fed..s.fed + n].to_vec()));
            }
        }
        if steps.is_empty() {
            return Ok(());
        }
        let prefilling = |s: &Active| s.fed < s.req.prompt.len();
        // Every row is needed only when a prompt is scored; otherwise each sequence's last.
        let all_rows = steps
            .iter()
            .any(|(i, _)| prefilling(&self.seqs[*i]) && self.seqs[*i].req.prompt_logprobs);
        let mut feeding = steps.iter().map(|(i, _)| *i).peekable();
        let mut inputs: Vec<SeqInput> = Vec::with_capacity(steps.len());
        for (i, s) in self.seqs.iter_mut().enumerate() {
            if feeding.next_if_eq(&i).is_none() {
                continue;
            }
            let mask = s.req.mask.as_ref();
            match &mut s.beams {
                Some(b) if !b.running.is_empty() => {
                    // One entry per beam, in beam order (the steps above list them so).
                    while feeding.next_if_eq(&i).is_some() {}
                    for beam in &mut b.running {
                        inputs.push(SeqInput {
                            tokens: &steps[inputs.len()].1,
                            cache: &mut beam.cache,
                            mask,
                        });
                    }
                }
                _ => inputs.push(SeqInput {
                    tokens: &steps[inputs.len()].1,
                    cache: &mut s.cache,
                    mask,
                }),
            }
        }
        let fwd = if all_rows {
            model.forward(&mut inputs, false)?
        } else {
            model.forward_last(&mut inputs)?
        };
        drop(inputs);
        self.routed.add(&fwd.routed);
        // Rows whose logits we need: the last of each sequence, plus a scored prompt chunk's other rows.
        let mut rows: Vec<u32> = Vec::new();
        let mut first_row = Vec::with_capacity(steps.len());
        for (j, (i, f)) in steps.iter().enumerate() {
            let start = fwd.starts[j];
            first_row.push(rows.len());
            let s = &self.seqs[*i];
            if !all_rows {
                rows.push(start as u32);
            } else if prefilling(s) && s.req.prompt_logprobs {
                rows.extend((start..start + f.len()).map(|r| r as u32));
            } else {
                rows.push((start + f.len() - 1) as u32);
            }
        }
        let n = rows.len();
        let idx = Tensor::from_vec(rows, n, fwd.hidden.device())?;
        let hidden = fwd.hidden.index_select(&idx, 0)?;
        let logits = model.logits(&hidden)?;
        // Beam searches advance once all their beams' rows are in: (sequence, rows in beam order).
        let mut beam_rows: Vec<(usize, Vec<usize>)> = Vec::new();
        for (j, (i, f)) in steps.iter().enumerate() {
            let s = &mut self.seqs[*i];
            let top = s.req.logprobs.unwrap_or(0);
            let last = first_row.get(j + 1).copied().unwrap_or(n) - 1;
            if s.beams.as_ref().is_some_and(|b| !b.running.is_empty()) {
                match beam_rows.last_mut() {
                    Some((k, r)) if k == i => r.push(last),
                    _ => beam_rows.push((*i, vec![last])),
                }
                continue;
            }
            let mut progress = Progress {
                id: s.id,
                ..Progress::default()
            };
            if prefilling(s) {
                if s.req.prompt_logprobs {
                    // Row `r` of this chunk predicts the prompt token after it.
                    for (r, &t) in (first_row[j]..=last).zip(&s.req.prompt[s.fed + 1..]) {
                        s.scored.push(token_logprob(&logits.get(r)?, t, top)?);
                    }
                }
                s.fed += f.len();
                if prefilling(s) {
                    continue;
                }
                if s.req.prompt_logprobs {
                    progress.prompt_logprobs = Some(std::mem::take(&mut s.scored));
                }
            }
            if s.req.params.max_new_tokens == 0 {
                s.done = Some(FinishReason::Length);
                out.push(progress);
                continue;
            }
            if s.beams.is_some() {
                // The prompt is in: the first expansion starts from its cache.
                beam_rows.push((*i, vec![last]));
                out.push(progress);
                continue;
            }
            let row = logits.get(last)?;
            let picked = match &s.req.picker {
                Some(p) => Some(p.0.pick(
                    s.tokens.len(),
                    &hidden.get(last)?.to_vec1::<f32>()?,
                    &row.to_vec1::<f32>()?,
                )),
                None => None,
            };
            let next = match picked.unwrap_or_else(|| Ok(s.sampler.sample(&row)?)) {
                Ok(t) => t,
                Err(e) => {
                    // Only this sequence's sampling settings are at fault.
                    s.failed = Some(format!("sampling failed: {}", first_line(&e.to_string())));
                    s.done = Some(FinishReason::Length);
                    out.push(progress);
                    continue;
                }
            };
            progress.token = Some(match s.req.logprobs {
                Some(top) => token_logprob(&row, next, top)?,
                None => TokenLogprob {
                    token: next,
                    logprob: 0.0,
                    top: Vec::new(),
                },
            });
            let params = &s.req.params;
            if params.stop_at_eos && eos.contains(&next) {
                s.done = Some(FinishReason::Eos);
                out.push(progress);
                continue;
            }
            s.tokens.push(next);
            if !params.stop.is_empty() {
                let text = model.require_tokenizer()?.decode(&s.tokens)?;
                if let Some(cut) = stop_cut(&text, &params.stop) {
                    s.text = text[..cut].to_string();
                    s.done = Some(FinishReason::Stop);
                }
            }
            if s.done.is_none() && s.tokens.len() >= params.max_new_tokens {
                s.done = Some(FinishReason::Length);
            }
            out.push(progress);
        }
        for (i, rows) in beam_rows {
            let s = &mut self.seqs[i];
            let rows: Vec<Vec<f32>> = rows
                .iter()
                .map(|&r| Ok(log_softmax(&logits.get(r)?.to_vec1::<f32>()?)))
                .collect::<Result<_>>()?;
            let first = s.beams.as_ref().is_some_and(|b| b.running.is_empty());
            if first {
                // The prompt's cache becomes the frozen parent of the first beams.
                let prompt = std::mem::replace(&mut s.cache, KvCache::new(0, 0));
                if let Some(b) = &mut s.beams {
                    b.running.push(Beam {
                        cache: prompt,
                        tokens: Vec::new(),
                        score: 0.0,
                    });
                }
            } else {
                out.push(Progress {
                    id: s.id,
                    ..Progress::default()
                });
            }
            if let Some(end) = beam_step(s, &rows, eos)? {
                s.done = Some(end);
            }
            if let (Some(FinishReason::Eos | FinishReason::Length), false) =
                (s.done, s.req.params.stop.is_empty())
            {
                let text = model.require_tokenizer()?.decode(&s.tokens)?;
                if let Some(cut) = stop_cut(&text, &s.req.params.stop) {
                    s.text = text[..cut].to_string();
                    s.done = Some(FinishReason::Stop);
                }
            }
        }
        Ok(())
    }
}

/// Where the first of the stop strings starts in `text`.
fn stop_cut(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|st| text.find(st.as_str())).min()
}

/// Log-softmax of one row of logits (the sum accumulated in f64), as transformers' beam search
/// scores each continuation.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_z = sum.ln() as f32;
    row.iter().map(|&x| (x - max) - log_z).collect()
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, cmp);
    order.truncate(k);
    order.sort_by(cmp);
    order
}

/// One step of transformers' beam search (`GenerationMixin._beam_search`, one prompt): `rows` are the
/// running beams' next-token log-probabilities. Updates the beams, their caches and the finished
/// hypotheses; returns how the search ended, if it did, with the best hypothesis in `s.tokens`.
fn beam_step(s: &mut Active, rows: &[Vec<f32>], eos: &[u32]) -> Result<Option<FinishReason>> {
    let params = &s.req.params;
    let bp = params.beam;
    let n_beams = bp.num_beams;
    let stop_ids: &[u32] = if params.stop_at_eos { eos } else { &[] };
    let Some(b) = s.beams.as_mut() else {
        return Ok(None);
    };
    let vocab = rows.first().map_or(0, Vec::len);
    // Tokens each running beam has generated (all equal) before this step.
    let done_len = b.running.first().map_or(0, |r| r.tokens.len());
    let at_limit = done_len + 1 >= params.max_new_tokens;
    // Candidates: every (beam, token) by summed log-probability; keep enough that `num_beams`
    // survive even if the best ones all end in EOS.
    let keep = 2.max(1 + stop_ids.len()) * n_beams;
    let sums: Vec<f32> = b
        .running
        .iter()
        .zip(rows)
        .flat_map(|(beam, row)| row.iter().map(move |&lp| beam.score + lp))
        .collect();
    let cands: Vec<(usize, u32, f32, bool)> = top_k(&sums, keep)
        .into_iter()
        .map(|c| {
            let token = (c % vocab) as u32;
            let ends = at_limit || stop_ids.contains(&token);
            (c / vocab, token, sums[c], ends)
        })
        .collect();
    // Running beams for the next step: the best candidates that did not end.
    let running_scores: Vec<f32> = cands
        .iter()
        .map(|&(_, _, sc, ends)| if ends { sc + MASKED } else { sc })
        .collect();
    let next = top_k(&running_scores, n_beams);
    // Finished hypotheses: only candidates among the first `num_beams` that ended, and only while a
    // better hypothesis is still possible.
    let full = b.finished.len() >= n_beams;
    let accept = b.improvable && !(full && bp.early_stopping == EarlyStopping::Always);
    if accept {
        let len_pen = ((done_len + 1) as f32).powf(bp.length_penalty);
        for &(beam, token, sc, ends) in cands.iter().take(n_beams) {
            if !ends {
                continue;
            }
            let mut tokens = b.running[beam].tokens.clone();
            tokens.push(token);
            let score = sc / len_pen;
            let pos = b.finished.partition_point(|h| h.score >= score);
            if pos < n_beams {
                b.finished.insert(
                    pos,
                    Hypothesis {
                        tokens,
                        score,
                        eos: stop_ids.contains(&token),
                    },
                );
                b.finished.truncate(n_beams);
            }
        }
    }
    // New running beams; a parent continued by one beam hands it its cache, a parent continued by
    // several is frozen and forked for each.
    let mut children = vec![0usize; b.running.len()];
    for &c in &next {
        children[cands[c].0] += 1;
    }
    enum Parent {
        Gone,
        Own(Beam),
        Shared(Arc<KvCache>, Vec<u32>),
    }
    let mut parents: Vec<Parent> = std::mem::take(&mut b.running)
        .into_iter()
        .zip(&children)
        .map(|(beam, &n)| match n {
            0 => Parent::Gone,
            1 => Parent::Own(beam),
            _ => Parent::Shared(Arc::new(beam.cache), beam.tokens),
        })
        .collect();
    let mut running = Vec::with_capacity(next.len());
    for &c in &next {
        let (p, token, _, _) = cands[c];
        let (cache, mut tokens) = match std::mem::replace(&mut parents[p], Parent::Gone) {
            Parent::Own(beam) => (beam.cache, beam.tokens),
            Parent::Shared(cache, tokens) => {
                let fork = (KvCache::fork(&cache), tokens.clone());
                parents[p] = Parent::Shared(cache, tokens);
                fork
            }
            Parent::Gone => {
                return Err(Error::Input("internal: a beam's parent is gone".into()));
            }
        };
        tokens.push(token);
        running.push(Beam {
            cache,
            tokens,
            score: running_scores[c],
        });
    }
    b.running = running;
    // transformers' stopping test after the step, at the new length.
    let best_len = if bp.early_stopping == EarlyStopping::Never && bp.length_penalty > 0.0 {
        params.max_new_tokens
    } else {
        done_len + 1
    };
    let best_running = b.running.first().map_or(f32::NEG_INFINITY, |r| r.score)
        / (best_len as f32).powf(bp.length_penalty);
    let worst_finished = if b.finished.len() < n_beams {
        MASKED
    } else {
        b.finished.last().map_or(MASKED, |h| h.score)
    };
    b.improvable &= best_running > worst_finished;
    let all_full = b.finished.len() >= n_beams && bp.early_stopping == EarlyStopping::Always;
    let all_ended = cands.iter().all(|c| c.3);
    if b.improvable && !all_full && !all_ended {
        return Ok(None);
    }
    let best = b
        .finished
        .first()
        .ok_or_else(|| Error::Input("internal: beam search ended without a hypothesis".into()))?;
    let mut tokens = best.tokens.clone();
    let end = if best.eos {
        tokens.pop();
        FinishReason::Eos
    } else {
        FinishReason::Length
    };
    s.tokens = tokens;
    b.running.clear();
    Ok(Some(end))
}

/// The first line of an error's text: candle appends a backtrace on the lines after it when
/// `RUST_BACKTRACE` is set, which must not reach clients.
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

fn finish(
    model: &Model,
    done: Option<FinishReason>,
    tokens: Vec<u32>,
    stop_text: String,
) -> Result<Generation> {
    let finish = done.unwrap_or(FinishReason::Length);
    let text = match (finish, model.tokenizer()) {
        (FinishReason::Stop, _) => stop_text,
        (_, Some(t)) => t.decode(&tokens)?,
        (_, None) => String::new(),
    };
    Ok(Generation {
        tokens,
        text,
        finish,
    })
}

/// Log-softmax of one row of logits at `token`, with the `top` most likely tokens (accumulated in f64, as
/// scoring does).
fn token_logprob(logits: &Tensor, token: u32, top: usize) -> Result<TokenLogprob> {
    let row = logits.to_vec1::<f32>()?;
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let lp = |x: f32| (x as f64 - log_z) as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        let k = top.min(order.len());
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        order.truncate(k);
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        best = order
            .into_iter()
            .map(|t| (t, lp(row[t as usize])))
            .collect();
    }
    Ok(TokenLogprob {
        token,
        logprob: lp(row
            .get(token as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY)),
        top: best,
    })
}

/// Continues each prompt (token ids) under its parameters. Prompts are decoded together, one token per
/// step each, until every one has finished; each result is what that prompt would give alone.
pub fn generate(
    model: &Model,
    prompts: &[(Vec<u32>, GenParams)],
    mask: Option<&ExpertMask>,
) -> Result<Vec<Generation>> {
    Ok(generate_routed(model, prompts, mask)?.0)
}

/// [`generate`] with the tokens its forward passes routed to each expert.
pub fn generate_routed(
    model: &Model,
    prompts: &[(Vec<u32>, GenParams)],
    mask: Option<&ExpertMask>,
) -> Result<(Vec<Generation>, RoutedTokens)> {
    if let Some(i) = prompts.iter().position(|p| p.0.is_empty()) {
        return Err(Error::Input(format!("prompt {i} has no tokens")));
    }
    let reqs = prompts
        .iter()
        .map(|(prompt, params)| SeqRequest {
            prompt: prompt.clone(),
            params: params.clone(),
            mask: mask.cloned(),
            ..SeqRequest::default()
        })
        .collect();
    generate_requests(model, reqs)
}

/// Decodes whole requests together (each as it would alone) until all have finished; results in
/// request order, with the tokens the forward passes routed. A request that fails fails the call.
pub fn generate_requests(
    model: &Model,
    reqs: Vec<SeqRequest>,
) -> Result<(Vec<Generation>, RoutedTokens)> {
    let n = reqs.len();
    let mut decoder = Decoder::new(model);
    for r in reqs {
        decoder.add(r)?;
    }
    // Handles count from 0 in the order added, so a handle is its request's index.
    let mut out: Vec<Option<Generation>> = vec![None; n];
    while !decoder.is_empty() {
        for p in decoder.step()? {
            if let Some(e) = p.error {
                return Err(Error::Input(format!("request {}: {e}", p.id.0)));
            }
            if let Some(g) = p.finished {
                out[p.id.0 as usize] = Some(g);
            }
        }
    }
    let generations = out
        .into_iter()
        .map(|g| g.ok_or_else(|| Error::Input("internal: a prompt did not finish".into())))
        .collect::<Result<_>>()?;
    Ok((generations, decoder.take_routed()))
}
