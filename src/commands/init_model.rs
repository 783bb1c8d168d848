use std::path::PathBuf;

use anyhow::{Context, Result};
use engine::init::{write_random_checkpoint, Preset, RandomInit};

/// `moeval init-model`: a seeded random-weight checkpoint, identical for the same preset and seed.
#[derive(clap::Args)]
pub struct Args {
    /// Shape: `small` (vocab 50304, hidden 512, 8 layers, 4 experts top-2) or `tiny` (vocab 512, hidden 64).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory to write config.json, generation_config.json and model.safetensors (f32) into.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let preset = Preset::parse(&a.preset)?;
    let cfg = preset.config();
    write_random_checkpoint(&cfg, &RandomInit { seed: a.seed }, &a.out)
        .with_context(|| format!("cannot write the checkpoint to {}", a.out.display()))?;
    eprintln!(
        "wrote {} preset (seed {}) to {}",
        a.preset,
        a.seed,
        a.out.display()
    );
    Ok(())
}
