//! `moeval forward`: one unbatched prompt through a model, with everything a parity check compares,
//! written as safetensors under stable names: `input_ids` (i64 [T]), `logits` (f32 [T, V]) and, for
//! MoE models, `router_logits.layer{l}` (f32 [T, E], before the softmax).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use engine::{Model, SeqInput};

/// Runs `prompt` (tokenised without special tokens) and writes the tensors to `out` atomically.
/// Returns the number of tokens.
pub fn forward_to_file(model: &Model, prompt: &str, out: &Path) -> Result<usize> {
    let tokens = model.require_tokenizer()?.encode(prompt)?;
    ensure!(!tokens.is_empty(), "the prompt encodes to no tokens");
    let mut cache = model.new_cache();
    let fwd = model.forward(
        &mut [SeqInput {
            tokens: &tokens,
            cache: &mut cache,
            mask: None,
        }],
        true,
    )?;
    let mut tensors = HashMap::new();
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    tensors.insert(
        "input_ids".to_string(),
        Tensor::from_vec(ids, tokens.len(), &Device::Cpu)?,
    );
    tensors.insert("logits".to_string(), model.logits(&fwd.hidden)?);
    for (l, r) in fwd
        .router_logits
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        tensors.insert(format!("router_logits.layer{l}"), r);
    }
    durable::write_atomic_with(out, |tmp| {
        candle_core::safetensors::save(&tensors, tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))
    })
    .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(tokens.len())
}
