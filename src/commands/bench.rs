use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use engine::init::{Preset, RandomInit};
use engine::{LoadOptions, Model, SeqInput};

/// `moeval bench`: prefill and decode throughput of the engine (CPU or `--device cuda`), and peak memory.
///
/// Prefill: a batch of sequences run through the model from an empty cache, producing each sequence's
/// last-position logits (what generation needs). Decode: after a prompt is prefilled (not timed), greedy
/// steps of one token per sequence with the KV cache, logits and argmax included. Each figure is the
/// median of `--repeats` runs after one warm-up.
#[derive(clap::Args)]
pub struct Args {
    /// Random-weight model shape (the same weights `moeval init-model --preset P --seed 0` writes).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Benchmark a checkpoint directory instead of a preset.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prefill length in tokens.
    #[arg(long, default_value_t = 256)]
    prefill_len: usize,
    /// Prompt length before decoding.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Decode at each of these batch sizes (default: --batch), e.g. `1,16,64`.
    #[arg(long, value_delimiter = ',')]
    decode_batches: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Deterministic pseudo-random token ids (splitmix64).
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
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

/// Peak resident set size of this process, in MiB (VmHWM).
fn peak_rss_mb() -> Option<f64> {
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
fn prefill(model: &Model, seqs: &[Vec<u32>]) -> Result<(Vec<engine::KvCache>, Vec<u32>)> {
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

pub fn run(a: Args, threads: Option<usize>, device: engine::Device) -> Result<()> {
    anyhow::ensure!(
        a.batch > 0
            && a.repeats > 0
            && a.prefill_len > 0
            && a.prompt_len > 0
            && a.decode_batches.iter().all(|&b| b > 0),
        "sizes must be positive"
    );
    let opts = LoadOptions {
        device,
        ..LoadOptions::default()
    };
    let load_start = Instant::now();
    let (model, source) = match &a.model {
        Some(dir) => {
            // No tokenizer needed: the benchmark feeds token ids.
            let cfg = engine::Config::from_file(&dir.join("config.json"))?;
            let weights = engine::Weights::open(dir)?;
            (
                Model::from_source(cfg, &weights, &opts)?,
                dir.display().to_string(),
            )
        }
        None => {
            let cfg = Preset::parse(&a.preset)?.config();
            let model = Model::from_source(cfg, &RandomInit { seed: 0 }, &opts)
                .context("cannot build the preset model")?;
            (model, format!("preset {}", a.preset))
        }
    };
    let load_s = load_start.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let v = cfg.vocab_size;
    let prefill_seqs: Vec<Vec<u32>> = (0..a.batch)
        .map(|i| tokens(a.prefill_len, v, i as u64))
        .collect();
    let mut prefill_times = Vec::new();
    for r in 0..=a.repeats {
        let t = Instant::now();
        let (_, logits) = prefill(&model, &prefill_seqs)?;
        std::hint::black_box(logits);
        if r > 0 {
            prefill_times.push(t.elapsed().as_secs_f64());
        } else {
            // The warm-up pays one-time costs (kernel loading, allocation); keep it out of profiles.
            let _ = engine::cuda::take_profile();
        }
    }
    if let Some(p) = engine::cuda::take_profile() {
        eprintln!(
            "prefill (batch {} x {}, {} runs): {p}",
            a.batch,
            a.prefill_len,
            a.repeats + 1
        );
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
            let (mut caches, mut next) = prefill(&model, &prompts)?;
            // Profiles of decoding leave out the prompts' prefill (and the warm-up's steps below).
            let _ = engine::cuda::take_profile();
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
                let _ = engine::cuda::take_profile();
            }
        }
        decode.push((batch, (batch * a.decode_steps) as f64 / median(times)));
        if let Some(p) = engine::cuda::take_profile() {
            eprintln!(
                "decode batch {batch} ({} timed runs of {} steps): {p}",
                a.repeats, a.decode_steps
            );
        }
    }
    let prefill_tok_s = (a.batch * a.prefill_len) as f64 / median(prefill_times);
    let decode_tok_s = decode[0].1;
    let device = match model.device() {
        engine::Device::Cpu => "cpu".to_string(),
        gpu => format!("{gpu} ({})", model.device_name()),
    };
    let params: usize = engine::init::tensor_specs(&cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let weights_mb = params as f64 * 4.0 / (1024.0 * 1024.0);
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if a.json {
        let out = serde_json::json!({
            "impl": "moeval",
            "model": source,
            "device": device,
            "threads": threads,
            "batch": a.batch,
            "prefill_len": a.prefill_len,
            "prompt_len": a.prompt_len,
            "decode_steps": a.decode_steps,
            "prefill_tok_s": prefill_tok_s,
            "decode_tok_s": decode_tok_s,
            "decode": decode
                .iter()
                .map(|&(b, t)| serde_json::json!({"batch": b, "tok_s": t, "ms_per_step": 1e3 * b as f64 / t}))
                .collect::<Vec<_>>(),
            "peak_rss_mb": rss,
            "weights_mb_f32": weights_mb,
            "params": params,
            "load_s": load_s,
        });
        println!("{out}");
    } else {
        println!("model          {source} ({params} parameters, {weights_mb:.0} MiB in f32)");
        println!("threads        {threads}");
        println!(
            "prefill        {prefill_tok_s:.0} tok/s  (batch {} x {} tokens)",
            a.batch, a.prefill_len
        );
        println!("device         {device}");
        for (batch, tok_s) in &decode {
            println!(
                "decode         {tok_s:.0} tok/s  (batch {batch}, {} steps after {} tokens)",
                a.decode_steps, a.prompt_len
            );
        }
        println!(
            "peak RSS       {rss:.0} MiB ({:.2}x the f32 weights)",
            rss / weights_mb
        );
    }
    Ok(())
}
