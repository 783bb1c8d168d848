//! `config.json` of a Hugging Face checkpoint, for the architectures the engine runs.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Which forward pass a checkpoint needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `flex_olmo`: OLMo2-style post-norm blocks with a sparse MoE.
    FlexOlmo,
    /// `olmoe`: pre-norm blocks with a sparse MoE.
    Olmoe,
    /// `olmo2`: post-norm blocks with a dense SwiGLU MLP.
    Olmo2,
}

impl Architecture {
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::FlexOlmo => "flex_olmo",
            Architecture::Olmoe => "olmoe",
            Architecture::Olmo2 => "olmo2",
        }
    }
}

/// The fields of `config.json` the engine uses, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Experts per MoE layer (0 for dense models).
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub tie_word_embeddings: bool,
    pub clip_qkv: Option<f64>,
    pub max_position_embeddings: usize,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    norm_topk_prob: Option<bool>,
    tie_word_embeddings: Option<bool>,
    clip_qkv: Option<f64>,
    max_position_embeddings: Option<usize>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<u32>,
    bos_token_id: Option<u32>,
}

impl Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!(
                "cannot read the model config ({e}); a model directory needs a config.json"
            ),
        })?;
        Self::from_json(&text).map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and validates the text of a `config.json`; the error is a message without the path.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("invalid config: {e}"))?;
        let architecture = match raw.model_type.as_str() {
            "flex_olmo" => Architecture::FlexOlmo,
            "olmoe" => Architecture::Olmoe,
            "olmo2" => Architecture::Olmo2,
            other => {
                return Err(format!(
                    "unknown model_type `{other}`; supported: flex_olmo, olmoe, olmo2"
                ))
            }
        };
        let rope_type = raw
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.clone());
        if let Some(t) = rope_type.filter(|t| t != "default") {
            return Err(format!("rope_type `{t}` is not supported (only `default`)"));
        }
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported (released checkpoints have null)".into());
        }
        let default_theta = match architecture {
            Architecture::Olmoe => 10_000.0,
            _ => 500_000.0,
        };
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(default_theta);
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || !raw.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                raw.hidden_size
            ));
        }
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        let head_dim = raw.hidden_size / heads;
        if !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        let (num_experts, num_experts_per_tok) = match architecture {
            Architecture::Olmo2 => (0, 0),
            _ => {
                let e = raw.num_experts.ok_or_else(|| {
                    "missing field `num_experts` (required for MoE models)".to_string()
                })?;
                let k = raw.num_experts_per_tok.ok_or_else(|| {
                    "missing field `num_experts_per_tok` (required for MoE models)".to_string()
                })?;
                if e == 0 || k == 0 {
                    return Err("num_experts and num_experts_per_tok must be positive".into());
                }
                (e, k)
            }
        };
        for (field, v) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_hidden_layers", raw.num_hidden_layers),
        ] {
            if v == 0 {
                return Err(format!("{field} is 0; it must be positive"));
            }
        }
        // Routing would silently use fewer experts than the checkpoint was trained with.
        if num_experts_per_tok > num_experts {
            return Err(format!(
                "num_experts_per_tok {num_experts_per_tok} exceeds num_experts {num_experts}"
            ));
        }
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        if max_position_embeddings == 0 {
            return Err(
                "max_position_embeddings is 0; the context must hold at least one token".into(),
            );
        }
        let eos_token_ids = match raw.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => Vec::new(),
        };
        // A special token outside the vocabulary would index past the embeddings, or never stop
        // generation.
        let specials = eos_token_ids
            .iter()
            .map(|&id| ("eos_token_id", id))
            .chain(raw.bos_token_id.map(|id| ("bos_token_id", id)))
            .chain(raw.pad_token_id.map(|id| ("pad_token_id", id)));
        for (field, id) in specials {
            if id as usize >= raw.vocab_size {
                return Err(format!(
                    "{field} {id} is outside the vocabulary (vocab_size {})",
                    raw.vocab_size
                ));
            }
        }
        let default_eps = match architecture {
            Architecture::Olmoe => 1e-5,
            _ => 1e-6,
        };
        Ok(Config {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(default_eps),
            rope_theta,
            num_experts,
            num_experts_per_tok,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            clip_qkv: raw.clip_qkv,
            max_position_embeddings,
            eos_token_ids,
            pad_token_id: raw.pad_token_id,
            bos_token_id: raw.bos_token_id,
        })
    }

    /// True for architectures with a sparse MoE in every layer.
    pub fn is_moe(&self) -> bool {
        self.num_experts > 0
    }

    /// The `config.json` text for this config (used when writing checkpoints).
    pub fn to_json(&self) -> serde_json::Value {
        let arch_name = match self.architecture {
            Architecture::FlexOlmo => "FlexOlmoForCausalLM",
            Architecture::Olmoe => "OlmoeForCausalLM",
            Architecture::Olmo2 => "Olmo2ForCausalLM",
        };
        let mut v = serde_json::json!({
            "architectures": [arch_name],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_ids.first(),
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "dtype": "float32",
        });
        if self.is_moe() {
            v["num_experts"] = self.num_experts.into();
            v["num_experts_per_tok"] = self.num_experts_per_tok.into();
            v["norm_topk_prob"] = self.norm_topk_prob.into();
        }
        if self.architecture == Architecture::Olmoe {
            v["clip_qkv"] = self.clip_qkv.into();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type":"flex_olmo","vocab_size":10,"hidden_size":8,"intermediate_size":4,
        "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":null,"num_experts":2,
        "num_experts_per_tok":1,"rope_theta":1000.0,"eos_token_id":[0,3]}"#;

    #[test]
    fn reads_old_style_rope_and_defaults() {
        let c = Config::from_json(BASE).unwrap();
        assert_eq!(c.rope_theta, 1000.0);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.eos_token_ids, vec![0, 3]);
        assert!(!c.tie_word_embeddings);
        let round = Config::from_json(&c.to_json().to_string()).unwrap();
        assert_eq!(round.rope_theta, 1000.0);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Config::from_json(&BASE.replace("flex_olmo", "llama")).unwrap_err();
        assert!(e.contains("unknown model_type `llama`"), "{e}");
        let e = Config::from_json(&BASE.replace("\"hidden_size\":8,", "")).unwrap_err();
        assert!(e.contains("missing field `hidden_size`"), "{e}");
        let e = Config::from_json(&BASE.replace("\"num_experts\":2,", "")).unwrap_err();
        assert!(e.contains("num_experts"), "{e}");
        let e = Config::from_json(&BASE.replace("[0,3]", "[0,10]")).unwrap_err();
        assert!(
            e.contains("eos_token_id 10 is outside the vocabulary"),
            "{e}"
        );
        let e = Config::from_json(
            &BASE.replace("\"num_experts_per_tok\":1", "\"num_experts_per_tok\":3"),
        )
        .unwrap_err();
        assert!(
            e.contains("num_experts_per_tok 3 exceeds num_experts 2"),
            "{e}"
        );
    }
}
