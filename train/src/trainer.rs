//! The training loop: random windows of a token stream, next-token cross-entropy, AdamW with linear
//! warm-up and cosine decay. Deterministic for a seed: windows come from a seeded generator and the
//! tensor math runs in a fixed order for a fixed thread count.

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::TrainModel;
use crate::{Error, Result};

/// Settings of one training run.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Peak learning rate (after warm-up; decays to a tenth by the last step).
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    /// Seeds the choice of training windows.
    pub seed: u64,
    /// Weight of the routing loss (expert training with public windows as the router's negatives).
    pub routing_weight: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 600,
            batch: 16,
            seq_len: 64,
            lr: 3e-3,
            warmup: 30,
            weight_decay: 0.01,
            seed: 0,
            routing_weight: 1.0,
        }
    }
}

/// Token ids of `docs`, each preceded by `eos`, concatenated: documents start after an end-of-text
/// token in training as they do after the prefix token in rolling perplexity.
pub fn token_stream(tokenizer: &engine::Tokenizer, docs: &[String], eos: u32) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for d in docs {
        out.push(eos);
        out.extend(tokenizer.encode(d)?);
    }
    Ok(out)
}

/// AdamW over `model`'s trainable tensors (betas 0.9 / 0.95).
fn adamw(model: &TrainModel, lr: f64, weight_decay: f64) -> Result<AdamW> {
    let params = ParamsAdamW {
        lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay,
    };
    Ok(AdamW::new(model.trainable(), params)?)
}

fn learning_rate(o: &TrainOptions, step: usize) -> f64 {
    if step < o.warmup {
        return o.lr * (step + 1) as f64 / o.warmup as f64;
    }
    let progress = (step - o.warmup) as f64 / (o.steps - o.warmup).max(1) as f64;
    o.lr * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// Trains `model`'s trainable tensors on `stream`; `log(step, loss)` sees every step's language-model
/// loss. Returns those losses.
///
/// With `negatives` (text that is not the owner's, for an owner's expert), each step also runs half a
/// batch of negative windows and adds the routing loss: the owner's router row learns to prefer the
/// owner's expert on the owner's tokens and the public expert on the others; on the negatives the owner's
/// expert is also held close to the public expert ([`TrainModel::negative_loss`]). Negative windows have
/// no language-model loss: what the owner's expert learns to predict comes from the owner's data alone.
pub fn train(
    model: &TrainModel,
    stream: &[u32],
    negatives: Option<&[u32]>,
    o: &TrainOptions,
    mut log: impl FnMut(usize, f32),
) -> Result<Vec<f32>> {
    let window = o.seq_len + 1;
    let short = |s: &[u32]| s.len() <= window;
    if short(stream) || negatives.is_some_and(short) || o.steps == 0 || o.batch == 0 {
        return Err(Error::Input(format!(
            "need steps > 0, batch > 0 and more than {window} tokens of training (and negative) text"
        )));
    }
    let mut opt = adamw(model, o.lr, o.weight_decay)?;
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let mut losses = Vec::with_capacity(o.steps);
    for step in 0..o.steps {
        let ids = windows(&mut rng, stream, o.batch, window)?;
        opt.set_learning_rate(learning_rate(o, step));
        let (lm, own_route) = model.losses(&ids, negatives.map(|_| true))?;
        let l = lm.to_scalar::<f32>()?;
        let loss = match (negatives, own_route) {
            (Some(neg), Some(own_route)) => {
                let public = windows(&mut rng, neg, o.batch.div_ceil(2), o.seq_len)?;
                let route = (own_route + model.negative_loss(&public)?)?;
                (lm + (route * (0.5 * o.routing_weight))?)?
            }
            _ => lm,
        };
        opt.backward_step(&loss)?;
        log(step, l);
        losses.push(l);
    }
    Ok(losses)
}

/// Router tuning on proxy data (FlexOlmo's optional last step): trains `model`'s trainable tensors
/// (its routers, see [`TrainModel::with_trained_routers`]) on the language-model loss of windows drawn
/// equally from each of `streams` (one per domain). With probability `opt_out_rate` a step removes one
/// expert other than the public expert 0, chosen uniformly, so that the routers also learn what to do
/// when an owner has opted out. `log(step, loss)` sees every step's loss; returns them.
pub fn tune_routers(
    model: &TrainModel,
    streams: &[Vec<u32>],
    opt_out_rate: f64,
    o: &TrainOptions,
    mut log: impl FnMut(usize, f32),
) -> Result<Vec<f32>> {
    let window = o.seq_len + 1;
    let experts = model.config().num_experts;
    if streams.is_empty() || streams.iter().any(|s| s.len() <= window) || o.steps == 0 {
        return Err(Error::Input(format!(
            "router tuning needs steps > 0 and more than {window} tokens of each domain's proxy text"
        )));
    }
    let mut opt = adamw(model, o.lr, 0.0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let per_domain = o.batch.div_ceil(streams.len()).max(1);
    let mut losses = Vec::with_capacity(o.steps);
    for step in 0..o.steps {
        let mut rows = Vec::with_capacity(streams.len());
        for s in streams {
            rows.push(windows(&mut rng, s, per_domain, window)?);
        }
        let ids = Tensor::cat(&rows, 0)?;
        let opted_out: Vec<usize> = if experts > 2 && rng.random_bool(opt_out_rate) {
            vec![rng.random_range(1..experts)]
        } else {
            Vec::new()
        };
        opt.set_learning_rate(learning_rate(o, step));
        let loss = model.loss_without(&ids, &opted_out)?;
        opt.backward_step(&loss)?;
        let l = loss.to_scalar::<f32>()?;
        log(step, l);
        losses.push(l);
    }
    Ok(losses)
}

/// `len` token ids drawn uniformly from `first..vocab`: text of no domain. Shown to an owner's router
/// as negatives beside public text, it teaches the router row which tokens are the owner's, so that
/// after merging the row stays quiet on other owners' domains, which it never sees.
pub fn noise_stream(first: u32, vocab: u32, len: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x006e_6f69_7365);
    (0..len).map(|_| rng.random_range(first..vocab)).collect()
}

/// `n` random windows of `window` tokens of `stream`, as a `[n, window]` tensor.
fn windows(rng: &mut ChaCha8Rng, stream: &[u32], n: usize, window: usize) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(n * window);
    for _ in 0..n {
        let start = rng.random_range(0..stream.len() - window);
        ids.extend_from_slice(&stream[start..start + window]);
    }
    Ok(Tensor::from_vec(ids, (n, window), &Device::Cpu)?)
}

/// Mean next-token loss over consecutive windows of `stream` (at most `max_windows` of them).
pub fn mean_loss(
    model: &TrainModel,
    stream: &[u32],
    seq_len: usize,
    max_windows: usize,
) -> Result<f32> {
    let window = seq_len + 1;
    let rows: Vec<&[u32]> = stream.chunks_exact(window).take(max_windows).collect();
    if rows.is_empty() {
        return Err(Error::Input(format!(
            "need at least {window} tokens to measure a loss"
        )));
    }
    let ids = Tensor::from_vec(rows.concat(), (rows.len(), window), &Device::Cpu)?;
    Ok(model.loss(&ids)?.to_scalar::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        let o = TrainOptions {
            steps: 100,
            warmup: 10,
            lr: 1.0,
            ..Default::default()
        };
        assert!((learning_rate(&o, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&o, 10) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&o, 100) - 0.1).abs() < 1e-12);
        assert!(learning_rate(&o, 50) < learning_rate(&o, 20));
    }
}
