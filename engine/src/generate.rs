//! Text generation: greedy or seeded sampling, stop strings, EOS and a token budget, batched across prompts.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use routers::ExpertMask;

use crate::attention::KvCache;
use crate::model::{Model, SeqInput};
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
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// Hit `max_new_tokens`.
    Length,
    /// Emitted an EOS token (not included in `tokens`).
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

struct Active {
    cache: KvCache,
    sampler: LogitsProcessor,
    tokens: Vec<u32>,
    done: Option<FinishReason>,
    text: String,
}

/// Continues each prompt (token ids) under its parameters. Prompts are decoded together, one token per
/// step each, until every one has finished; each result is what that prompt would give alone.
pub fn generate(
    model: &Model,
    prompts: &[(Vec<u32>, GenParams)],
    mask: Option<&ExpertMask>,
) -> Result<Vec<Generation>> {
    if let Some(i) = prompts.iter().position(|p| p.0.is_empty()) {
        return Err(Error::Input(format!("prompt {i} has no tokens")));
    }
    if prompts.iter().any(|p| !p.1.stop.is_empty()) && model.tokenizer().is_none() {
        return Err(Error::Input("stop strings need a tokenizer".into()));
    }
    let eos = &model.config().eos_token_ids;
    let mut seqs: Vec<Active> = prompts
        .iter()
        .map(|(_, p)| {
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
            Active {
                cache: model.new_cache(),
                sampler: LogitsProcessor::from_sampling(p.seed, sampling),
                tokens: Vec::new(),
                done: (p.max_new_tokens == 0).then_some(FinishReason::Length),
                text: String::new(),
            }
        })
        .collect();
    // The first step feeds each prompt; later steps feed each live sequence its last token.
    let mut first = true;
    loop {
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].done.is_none())
            .collect();
        if live.is_empty() {
            break;
        }
        let feeds: Vec<Vec<u32>> = live
            .iter()
            .map(|&i| {
                if first {
                    prompts[i].0.clone()
                } else {
                    vec![*seqs[i]
                        .tokens
                        .last()
                        .expect("a live sequence after step one has a token")]
                }
            })
            .collect();
        let mut inputs: Vec<SeqInput> = seqs
            .iter_mut()
            .filter(|s| s.done.is_none())
            .zip(&feeds)
            .map(|(s, f)| SeqInput {
                tokens: f,
                cache: &mut s.cache,
                mask,
            })
            .collect();
        let fwd = model.forward(&mut inputs, false)?;
        drop(inputs);
        let rows: Vec<u32> = feeds
            .iter()
            .zip(&fwd.starts)
            .map(|(f, &s)| (s + f.len() - 1) as u32)
            .collect();
        let idx = Tensor::from_vec(rows, live.len(), fwd.hidden.device())?;
        let logits = model.logits(&fwd.hidden.index_select(&idx, 0)?)?;
        for (j, &i) in live.iter().enumerate() {
            let params = &prompts[i].1;
            let seq = &mut seqs[i];
            let next = seq.sampler.sample(&logits.get(j)?)?;
            if params.stop_at_eos && eos.contains(&next) {
                seq.done = Some(FinishReason::Eos);
                continue;
            }
            seq.tokens.push(next);
            if !params.stop.is_empty() {
                let text = model.require_tokenizer()?.decode(&seq.tokens)?;
                if let Some(cut) = params
                    .stop
                    .iter()
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                {
                    seq.text = text[..cut].to_string();
                    seq.done = Some(FinishReason::Stop);
                    continue;
                }
            }
            if seq.tokens.len() >= params.max_new_tokens {
                seq.done = Some(FinishReason::Length);
            }
        }
        first = false;
    }
    seqs.into_iter()
        .map(|s| {
            let finish = s.done.unwrap_or(FinishReason::Length);
            let text = match (finish, model.tokenizer()) {
                (FinishReason::Stop, _) => s.text,
                (_, Some(t)) => t.decode(&s.tokens)?,
                (_, None) => String::new(),
            };
            Ok(Generation {
                tokens: s.tokens,
                text,
                finish,
            })
        })
        .collect()
}
