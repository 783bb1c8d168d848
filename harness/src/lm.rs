//! The engine model as a [`tasks::LanguageModel`]: text requests are tokenised with the evaluation
//! harness's rules (see `tasks::lm`) and scored or continued by the engine.

use engine::generate::{generate_routed, BeamParams, EarlyStopping, GenParams};
use engine::score::{loglikelihood_routed, ScoreOptions, ScoreRequest};
use engine::{ExpertMask, Model, Tokenizer};
use rayon::prelude::*;
use tasks::lm::{encode_pair, rolling_windows, truncate_left};
use tasks::{
    AnsweringModel, Answers, GenerateRequest, Loglikelihood, LoglikelihoodRequest, ModelError,
};

/// The engine's settings for a harness generation request (beam search as the harness's HF backend
/// passes `num_beams`, `length_penalty` and `early_stopping` to transformers).
pub fn gen_params(r: &GenerateRequest) -> GenParams {
    GenParams {
        max_new_tokens: r.max_gen_toks,
        temperature: r.temperature,
        top_p: r.top_p,
        seed: r.seed,
        stop: r.until.iter().filter(|s| !s.is_empty()).cloned().collect(),
        stop_at_eos: true,
        beam: BeamParams {
            num_beams: r.num_beams,
            length_penalty: r.length_penalty as f32,
            early_stopping: match r.early_stopping {
                tasks::EarlyStopping::Heuristic => EarlyStopping::Heuristic,
                tasks::EarlyStopping::Always => EarlyStopping::Always,
                tasks::EarlyStopping::Never => EarlyStopping::Never,
            },
        },
    }
}

/// A loaded engine model with the settings the harness semantics need.
pub struct EngineLm<'a> {
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    /// Prefix of an empty context and of the first rolling window: BOS if the model has one, else EOS.
    prefix: u32,
    max_length: usize,
    mask: Option<ExpertMask>,
}

impl<'a> EngineLm<'a> {
    pub fn new(model: &'a Model) -> Result<Self, engine::Error> {
        let cfg = model.config();
        let prefix = cfg
            .bos_token_id
            .or_else(|| cfg.eos_token_ids.first().copied())
            .ok_or_else(|| {
                engine::Error::Input(
                    "the model has neither a BOS nor an EOS token to prefix empty contexts with"
                        .into(),
                )
            })?;
        Ok(EngineLm {
            model,
            tokenizer: model.require_tokenizer()?,
            prefix,
            max_length: cfg.max_position_embeddings,
            mask: None,
        })
    }

    /// Scores with this expert mask instead of the loaded one (a subset of it: opt-out sweeps run
    /// every variant on one loaded model).
    pub fn with_mask(mut self, mask: Option<ExpertMask>) -> Self {
        self.mask = mask;
        self
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, engine::Error> {
        self.tokenizer.encode(text)
    }

    /// Scores token-level requests; an empty continuation scores 0 (and counts as greedy).
    fn score(&self, reqs: Vec<(Vec<u32>, Vec<u32>)>) -> Result<Answers<Loglikelihood>, ModelError> {
        let live: Vec<usize> = (0..reqs.len()).filter(|&i| !reqs[i].1.is_empty()).collect();
        let batch: Vec<ScoreRequest> = live
            .iter()
            .map(|&i| ScoreRequest {
                context: reqs[i].0.clone(),
                continuation: reqs[i].1.clone(),
            })
            .collect();
        let opts = ScoreOptions {
            mask: self.mask.clone(),
            ..ScoreOptions::default()
        };
        let (scores, routed) = loglikelihood_routed(self.model, &batch, &opts)?;
        let mut out = vec![
            Loglikelihood {
                logprob: 0.0,
                is_greedy: true
            };
            reqs.len()
        ];
        for (&i, s) in live.iter().zip(scores) {
            out[i] = Loglikelihood {
                logprob: s.total(),
                is_greedy: s.is_greedy(),
            };
        }
        Ok(Answers {
            routed: routed.0,
            ..Answers::plain(out)
        })
    }
}

impl AnsweringModel for EngineLm<'_> {
    fn answer_loglikelihood(
        &self,
        requests: &[LoglikelihoodRequest],
    ) -> Result<Answers<Loglikelihood>, ModelError> {
        let toks: Vec<(Vec<u32>, Vec<u32>)> = requests
            .par_iter()
            .map(|r| {
                let (c, k) =
                    encode_pair(|s| self.encode(s), &r.context, &r.continuation, self.prefix)?;
                Ok(truncate_left(c, k, self.max_length))
            })
            .collect::<Result<_, engine::Error>>()?;
        self.score(toks)
    }

    fn answer_rolling(&self, texts: &[String]) -> Result<Answers<f64>, ModelError> {
        let windows: Vec<Vec<(Vec<u32>, Vec<u32>)>> = texts
            .par_iter()
            .map(|t| {
                Ok(rolling_windows(
                    &self.encode(t)?,
                    self.prefix,
                    self.max_length,
                ))
            })
            .collect::<Result<_, engine::Error>>()?;
        let flat: Vec<(Vec<u32>, Vec<u32>)> = windows.iter().flatten().cloned().collect();
        let scored = self.score(flat)?;
        let mut it = scored.values.into_iter();
        let sums = windows
            .iter()
            .map(|w| it.by_ref().take(w.len()).map(|s| s.logprob).sum())
            .collect();
        Ok(Answers {
            routed: scored.routed,
            ..Answers::plain(sums)
        })
    }

    fn answer_generate(&self, requests: &[GenerateRequest]) -> Result<Answers<String>, ModelError> {
        let prompts: Vec<(Vec<u32>, GenParams)> = requests
            .iter()
            .map(|r| {
                let mut ids = self.encode(&r.context)?;
                // The harness keeps the last max_length - max_gen_toks context tokens.
                let keep = self.max_length.saturating_sub(r.max_gen_toks).max(1);
                if ids.len() > keep {
                    ids.drain(..ids.len() - keep);
                }
                if ids.is_empty() {
                    ids.push(self.prefix);
                }
                Ok((ids, gen_params(r)))
            })
            .collect::<Result<_, engine::Error>>()?;
        let (out, routed) = generate_routed(self.model, &prompts, self.mask.as_ref())?;
        Ok(Answers {
            routed: routed.0,
            ..Answers::plain(out.into_iter().map(|g| g.text).collect())
        })
    }
}
