//! Seeded random-weight models ("presets") and writing checkpoints in Hugging Face layout.
//!
//! Every tensor gets its own generator, seeded from the model seed and the tensor's name, so a tensor's
//! values do not depend on which other tensors are generated, in what order, or on how many threads run.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use safetensors::Dtype;

use crate::config::{Architecture, Config};
use crate::layers::TensorSource;
use crate::{Error, Result};

/// Named model shapes for benchmarks and self-contained examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// FlexOlmo, vocab 50304, hidden 512, intermediate 1024, 8 layers, 8 heads (8 kv), 4 experts, top-2.
    Small,
    /// FlexOlmo, vocab 512, hidden 64, intermediate 96, 2 layers, 4 heads (2 kv), 4 experts, top-2.
    Tiny,
    /// OLMoE-1B-7B's shape: vocab 50304, hidden 2048, intermediate 1024, 16 layers, 16 heads (16 kv),
    /// 64 experts, top-8 (6.9B parameters; for GPU benchmarks).
    Olmoe1b7b,
}

impl Preset {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "small" => Ok(Preset::Small),
            "tiny" => Ok(Preset::Tiny),
            "olmoe-1b-7b" => Ok(Preset::Olmoe1b7b),
            other => Err(Error::Input(format!(
                "unknown preset `{other}`; choose small, tiny or olmoe-1b-7b"
            ))),
        }
    }

    pub fn config(self) -> Config {
        let (vocab, hidden, inter, layers, heads, kv) = match self {
            Preset::Small => (50304, 512, 1024, 8, 8, 8),
            Preset::Tiny => (512, 64, 96, 2, 4, 2),
            Preset::Olmoe1b7b => (50304, 2048, 1024, 16, 16, 16),
        };
        let (architecture, experts, top_k) = match self {
            Preset::Olmoe1b7b => (Architecture::Olmoe, 64, 8),
            _ => (Architecture::FlexOlmo, 4, 2),
        };
        Config {
            architecture,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-6,
            rope_theta: 500_000.0,
            num_experts: experts,
            num_experts_per_tok: top_k,
            norm_topk_prob: false,
            tie_word_embeddings: false,
            clip_qkv: None,
            max_position_embeddings: 4096,
            eos_token_ids: vec![0],
            pad_token_id: Some(1),
            bos_token_id: None,
        }
    }
}

/// Names and shapes of every tensor a checkpoint of `cfg` holds, in a fixed order.
pub fn tensor_specs(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let qw = cfg.num_attention_heads * cfg.head_dim;
    let kvw = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("q_proj", vec![qw, h]),
            ("k_proj", vec![kvw, h]),
            ("v_proj", vec![kvw, h]),
            ("o_proj", vec![h, qw]),
        ] {
            out.push((format!("{p}.self_attn.{n}.weight"), s));
        }
        out.push((format!("{p}.self_attn.q_norm.weight"), vec![qw]));
        out.push((format!("{p}.self_attn.k_norm.weight"), vec![kvw]));
        let norms: &[&str] = match cfg.architecture {
            Architecture::Olmoe => &["input_layernorm", "post_attention_layernorm"],
            _ => &["post_attention_layernorm", "post_feedforward_layernorm"],
        };
        for n in norms {
            out.push((format!("{p}.{n}.weight"), vec![h]));
        }
        let mlp = |prefix: String, out: &mut Vec<(String, Vec<usize>)>| {
            out.push((format!("{prefix}.gate_proj.weight"), vec![i, h]));
            out.push((format!("{prefix}.up_proj.weight"), vec![i, h]));
            out.push((format!("{prefix}.down_proj.weight"), vec![h, i]));
        };
        if cfg.is_moe() {
            out.push((format!("{p}.mlp.gate.weight"), vec![cfg.num_experts, h]));
            for e in 0..cfg.num_experts {
                mlp(format!("{p}.mlp.experts.{e}"), &mut out);
            }
        } else {
            mlp(format!("{p}.mlp"), &mut out);
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Random weights: norms are ones, everything else is normal(0, 0.02).
pub struct RandomInit {
    pub seed: u64,
}

impl RandomInit {
    /// The values of tensor `name` with `len` elements.
    pub fn generate(&self, name: &str, len: usize) -> Vec<f32> {
        if name.contains("norm") {
            return vec![1.0; len];
        }
        // FNV-1a of the name, mixed with the seed: stable across platforms and versions.
        let mut key = 0xcbf2_9ce4_8422_2325u64 ^ self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in name.bytes() {
            key = (key ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        const CHUNK: usize = 1 << 16;
        let mut data = vec![0f32; len];
        data.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut rng =
                    ChaCha8Rng::seed_from_u64(key ^ (c as u64).wrapping_mul(0xd6e8_feb8_6659_fd93));
                for pair in chunk.chunks_mut(2) {
                    // Box-Muller: two standard normals from two uniforms in (0, 1].
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random::<f64>();
                    let r = (-2.0 * u1.ln()).sqrt() * 0.02;
                    let t = std::f64::consts::TAU * u2;
                    pair[0] = (r * t.cos()) as f32;
                    if pair.len() > 1 {
                        pair[1] = (r * t.sin()) as f32;
                    }
                }
            });
        data
    }
}

impl TensorSource for RandomInit {
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.generate(name, shape.iter().product()))
    }
    fn contains(&self, _name: &str) -> bool {
        true
    }
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors` (f32) for a model of `cfg`
/// whose tensors come from `init`.
pub fn write_random_checkpoint(cfg: &Config, init: &RandomInit, dir: &Path) -> Result<()> {
    write_random_checkpoint_as(cfg, init, dir, Dtype::F32, usize::MAX)
}

/// [`write_random_checkpoint`] with the tensors in `dtype` (`F32` or `BF16`, rounded to nearest
/// even), in shards of at most `shard_bytes` each (`model-0000I-of-0000N.safetensors` and
/// `model.safetensors.index.json`, as Hugging Face writes them) when one file would be larger.
/// One shard's tensors are in memory at a time; each file is written under a temporary name and
/// renamed, the index last.
pub fn write_random_checkpoint_as(
    cfg: &Config,
    init: &RandomInit,
    dir: &Path,
    dtype: Dtype,
    shard_bytes: usize,
) -> Result<()> {
    let io = |context: String| move |source| Error::Io { context, source };
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::BF16 => 2,
        other => return Err(Error::Input(format!("cannot write {other:?} checkpoints"))),
    };
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0usize;
    let mut total = 0usize;
    for (name, shape) in tensor_specs(cfg) {
        let bytes = shape.iter().product::<usize>() * width;
        if size > 0 && size + bytes > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        total += bytes;
        shards.last_mut().expect("one shard").push((name, shape));
    }
    let n = shards.len();
    let file_name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    for (i, specs) in shards.into_iter().enumerate() {
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
            .into_iter()
            .map(|(name, shape)| {
                let values = init.generate(&name, shape.iter().product());
                let bytes = match dtype {
                    Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    _ => values
                        .iter()
                        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                        .collect(),
                };
                (name, shape, bytes)
            })
            .collect();
        let views = data
            .iter()
            .map(|(n, s, b)| {
                safetensors::tensor::TensorView::new(dtype, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Input(format!("tensor {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let name = file_name(i);
        let weights_path = dir.join(&name);
        let tmp = dir.join(format!("{name}.tmp"));
        safetensors::serialize_to_file(views, None, &tmp).map_err(|e| Error::Weights {
            path: tmp.clone(),
            message: format!("cannot write: {e}"),
        })?;
        std::fs::rename(&tmp, &weights_path)
            .map_err(io(format!("cannot rename {}", tmp.display())))?;
        for (t, _, _) in &data {
            weight_map.insert(t.clone(), name.clone().into());
        }
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let tmp = dir.join("model.safetensors.index.json.tmp");
        std::fs::write(&tmp, index.to_string())
            .map_err(io(format!("cannot write {}", tmp.display())))?;
        std::fs::rename(&tmp, dir.join("model.safetensors.index.json"))
            .map_err(io("cannot write model.safetensors.index.json".into()))?;
    }
    let mut json = cfg.to_json();
    if dtype == Dtype::BF16 {
        json["torch_dtype"] = "bfloat16".into();
        json["dtype"] = "bfloat16".into();
    }
    let config = serde_json::to_string_pretty(&json).expect("JSON values serialise");
    std::fs::write(dir.join("config.json"), config)
        .map_err(io("cannot write config.json".into()))?;
    let generation = serde_json::json!({"eos_token_id": cfg.eos_token_ids.first(), "pad_token_id": cfg.pad_token_id});
    std::fs::write(dir.join("generation_config.json"), generation.to_string())
        .map_err(io("cannot write generation_config.json".into()))?;
    Ok(())
}
