use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use engine::LoadOptions;

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

pub fn run(a: Args, threads: Option<usize>, at: super::Placement) -> Result<()> {
    let opts = LoadOptions {
        device: at.device,
        dtype: at.dtype,
        ..LoadOptions::default()
    };
    let load_start = Instant::now();
    let (model, source) = engine::bench::load_model(a.model.as_deref(), &a.preset, &opts)
        .context("cannot load the benchmark model")?;
    let load_s = load_start.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    let t = engine::bench::measure(
        &model,
        &engine::bench::BenchOptions {
            batch: a.batch,
            prefill_len: a.prefill_len,
            prompt_len: a.prompt_len,
            decode_steps: a.decode_steps,
            decode_batches: a.decode_batches.clone(),
            repeats: a.repeats,
        },
    )?;
    for p in &t.profiles {
        eprintln!("{p}");
    }
    let (prefill_tok_s, decode) = (t.prefill_tok_s, t.decode);
    let decode_tok_s = decode[0].1;
    let device = match model.device() {
        engine::Device::Cpu => "cpu".to_string(),
        gpu => format!("{gpu} ({})", model.device_name()),
    };
    let params = engine::bench::parameters(&cfg);
    let weights_mb = params as f64 * 4.0 / (1024.0 * 1024.0);
    let rss = engine::bench::peak_rss_mb().unwrap_or(f64::NAN);
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
            "weights_dtype": model.weights_dtype(),
            "kernel": engine::matmul::kernel_name(),
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
        println!(
            "weights        held as {} ({} kernels)",
            model.weights_dtype(),
            engine::matmul::kernel_name()
        );
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
