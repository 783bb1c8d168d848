//! Throughput measurement for `moeval bench`: prefill and step-wise greedy decoding on synthetic token
//! ids, medians of repeated timed runs after one warm-up run (which pays one-time costs such as kernel
//! loading and allocation and is left out of timings and GPU profiles).

use std::path::Path;
use std::time::Instant;

use crate::init::{Preset, RandomInit};
use crate::{Config, KvCache, LoadOptions, Model, Result, SeqInput, Weights};

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Sequences prefilled together.
    pub batch: usize,
    /// Tokens per prefilled sequence.
    pub prefill_len: usize,
    /// Prompt tokens before decoding starts.
    pub prompt_len: usize,
    /// Decode steps timed per run.
    pub decode_steps: usize,
    /// Decode batch sizes to time (`batch` when empty).
    pub decode_batches: Vec<usize>,
    /// Timed runs per measurement (after one warm-up run).
    pub repeats: usize,
}

/// Measured throughput.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// Prefill tokens per second (median run).
    pub prefill_tok_s: f64,
    /// (decode batch, generated tokens per second), in the order asked.
    pub decode: Vec<(usize, f64)>,
    /// GPU kernel profiles of the timed runs (prefill first, then each decode batch), when profiling
    /// is on; each line says what it profiled.
    pub profiles: Vec<String>,
}

/// Deterministic pseudo-random token ids (splitmix64).
pub fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % vocab as u64) as u32
        })
        .collect()
}

/// Peak resident set size of this process, in MiB (VmHWM; `None` off Linux).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs `seqs` through fresh caches and returns the caches and each sequence's greedy next token.
fn prefill(model: &Model, seqs: &[Vec<u32>]) -> Result<(Vec<KvCache>, Vec<u32>)> {
    let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
    let mut inputs: Vec<SeqInput> = seqs
        .iter()
        .zip(caches.iter_mut())
        .map(|(s, c)| SeqInput {
            tokens: s,
            cache: c,
            mask: None,
        })
        .collect();
    let fwd = model.forward_last(&mut inputs)?;
    drop(inputs);
    let next = model.argmax(&fwd.hidden)?;
    Ok((caches, next))
}

/// Times prefill and decoding of `model`. Sizes must be positive.
pub fn measure(model: &Model, a: &BenchOptions) -> Result<Throughput> {
    if a.batch == 0
        || a.repeats == 0
        || a.prefill_len == 0
        || a.prompt_len == 0
        || a.decode_batches.contains(&0)
    {
        return Err(crate::Error::Input("sizes must be positive".into()));
    }
    let v = model.config().vocab_size;
    let mut profiles = Vec::new();
    let prefill_seqs: Vec<Vec<u32>> = (0..a.batch)
        .map(|i| tokens(a.prefill_len, v, i as u64))
        .collect();
    let mut prefill_times = Vec::new();
    for r in 0..=a.repeats {
        let t = Instant::now();
        let (_, logits) = prefill(model, &prefill_seqs)?;
        std::hint::black_box(logits);
        if r > 0 {
            prefill_times.push(t.elapsed().as_secs_f64());
        } else {
            let _ = crate::cuda::take_profile();
        }
    }
    if let Some(p) = crate::cuda::take_profile() {
        profiles.push(format!(
            "prefill (batch {} x {}, {} runs): {p}",
            a.batch,
            a.prefill_len,
            a.repeats + 1
        ));
    }
    let batches = if a.decode_batches.is_empty() {
        vec![a.batch]
    } else {
        a.decode_batches.clone()
    };
    let mut decode = Vec::new();
    for &batch in &batches {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|i| tokens(a.prompt_len, v, 1000 + i as u64))
            .collect();
        let mut times = Vec::new();
        for r in 0..=a.repeats {
            let (mut caches, mut next) = prefill(model, &prompts)?;
            // Profiles of decoding leave out the prompts' prefill (and the warm-up's steps below).
            let _ = crate::cuda::take_profile();
            let t = Instant::now();
            for _ in 0..a.decode_steps {
                let feeds: Vec<[u32; 1]> = next.iter().map(|&x| [x]).collect();
                let mut inputs: Vec<SeqInput> = feeds
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(f, c)| SeqInput {
                        tokens: f,
                        cache: c,
                        mask: None,
                    })
                    .collect();
                let fwd = model.forward(&mut inputs, false)?;
                next = model.argmax(&fwd.hidden)?;
            }
            if r > 0 {
                times.push(t.elapsed().as_secs_f64());
            } else {
                let _ = crate::cuda::take_profile();
            }
        }
        decode.push((batch, (batch * a.decode_steps) as f64 / median(times)));
        if let Some(p) = crate::cuda::take_profile() {
            profiles.push(format!(
                "decode batch {batch} ({} timed runs of {} steps): {p}",
                a.repeats, a.decode_steps
            ));
        }
    }
    Ok(Throughput {
        prefill_tok_s: (a.batch * a.prefill_len) as f64 / median(prefill_times),
        decode,
        profiles,
    })
}

/// The model a benchmark runs and how to name it: a checkpoint directory (token ids only, so no
/// tokenizer is needed) or, without one, the random-weight `preset` (`moeval init-model --preset P
/// --seed 0`'s weights).
pub fn load_model(dir: Option<&Path>, preset: &str, opts: &LoadOptions) -> Result<(Model, String)> {
    match dir {
        Some(dir) => {
            let cfg = Config::from_file(&dir.join("config.json"))?;
            let weights = Weights::open(dir)?;
            let model = Model::from_source(cfg, &weights, opts)?;
            Ok((model, dir.display().to_string()))
        }
        None => {
            let cfg = Preset::parse(preset)?.config();
            let model = Model::from_source(cfg, &RandomInit { seed: 0 }, opts)?;
            Ok((model, format!("preset {preset}")))
        }
    }
}

/// Parameters of a model of this shape (every tensor's elements).
pub fn parameters(cfg: &Config) -> usize {
    crate::init::tensor_specs(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}
