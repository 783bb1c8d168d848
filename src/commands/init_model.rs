use std::path::PathBuf;

use anyhow::{Context, Result};
use engine::init::{write_random_checkpoint_as, Preset, RandomInit};

/// `moeval init-model`: a seeded random-weight checkpoint, identical for the same preset and seed.
#[derive(clap::Args)]
pub struct Args {
    /// Shape: `small` (vocab 50304, hidden 512, 8 layers, 4 experts top-2) or `tiny` (vocab 512, hidden 64).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory to write config.json, generation_config.json and the weights into.
    #[arg(long)]
    out: PathBuf,
    /// Dtype of the written weights: `f32`, or `bf16` (rounded to nearest even; what 7B-class
    /// checkpoints ship in, and what `--dtype checkpoint` then holds in memory as is).
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    dtype: String,
    /// Largest safetensors file in GiB: bigger checkpoints are written as shards with
    /// model.safetensors.index.json, one shard in memory at a time.
    #[arg(long, default_value_t = 2.0, value_name = "GIB")]
    shard_size: f64,
}

pub fn run(a: Args) -> Result<()> {
    let preset = Preset::parse(&a.preset)?;
    let cfg = preset.config();
    let dtype = match a.dtype.as_str() {
        "f32" => safetensors::Dtype::F32,
        "bf16" => safetensors::Dtype::BF16,
        other => anyhow::bail!("--dtype `{other}`: choose f32 or bf16"),
    };
    anyhow::ensure!(a.shard_size > 0.0, "--shard-size must be positive");
    let shard_bytes = (a.shard_size * (1u64 << 30) as f64) as usize;
    write_random_checkpoint_as(
        &cfg,
        &RandomInit { seed: a.seed },
        &a.out,
        dtype,
        shard_bytes,
    )
    .with_context(|| format!("cannot write the checkpoint to {}", a.out.display()))?;
    eprintln!(
        "wrote {} preset (seed {}, {}) to {}",
        a.preset,
        a.seed,
        a.dtype,
        a.out.display()
    );
    Ok(())
}
