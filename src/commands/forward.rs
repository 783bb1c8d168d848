use std::path::PathBuf;

use anyhow::Result;

/// `moeval forward`: one unbatched prompt, tokenised without special tokens.
///
/// The output file holds `input_ids` (i64 [T]), `logits` (f32 [T, V]) and, for MoE models,
/// `router_logits.layer{l}` (f32 [T, E], before the softmax). These names are stable.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, tokenizer.json, safetensors weights).
    #[arg(long)]
    model: PathBuf,
    /// Text to run.
    #[arg(long)]
    prompt: String,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    experts: super::ExpertArgs,
}

pub fn run(a: Args, at: super::Placement) -> Result<()> {
    let model = super::load_model_with(&a.model, &a.experts, at)?;
    let tokens = harness::inspect::forward_to_file(&model, &a.prompt, &a.out)?;
    eprintln!(
        "wrote {} ({tokens} tokens, vocab {})",
        a.out.display(),
        model.config().vocab_size
    );
    Ok(())
}
