use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use engine::SeqInput;

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

pub fn run(a: Args, device: engine::Device) -> Result<()> {
    let model = super::load_model_with(&a.model, &a.experts, device)?;
    let tokens = model.require_tokenizer()?.encode(&a.prompt)?;
    anyhow::ensure!(!tokens.is_empty(), "the prompt encodes to no tokens");
    let mut cache = model.new_cache();
    let fwd = model.forward(
        &mut [SeqInput {
            tokens: &tokens,
            cache: &mut cache,
            mask: None,
        }],
        true,
    )?;
    let mut out = HashMap::new();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    out.insert(
        "input_ids".to_string(),
        Tensor::from_vec(ids, tokens.len(), &Device::Cpu)?,
    );
    out.insert("logits".to_string(), model.logits(&fwd.hidden)?);
    for (l, r) in fwd
        .router_logits
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        out.insert(format!("router_logits.layer{l}"), r);
    }
    super::write_atomic(&a.out, |tmp| {
        candle_core::safetensors::save(&out, tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))
    })?;
    eprintln!(
        "wrote {} ({} tokens, vocab {})",
        a.out.display(),
        tokens.len(),
        model.config().vocab_size
    );
    Ok(())
}
