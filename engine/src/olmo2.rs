//! OLMo2 (`model_type: olmo2`): post-norm decoder blocks with a dense SwiGLU feed-forward. FlexOlmo's public
//! model, and so its public expert, comes from such a checkpoint.
//!
//! ```text
//! h = h + post_attention_layernorm(attn(h))
//! h = h + post_feedforward_layernorm(mlp(h))
//! ```

use candle_core::Tensor;

use crate::config::Config;
use crate::layers::{Attention, Batch, Mlp, RmsNorm, TensorSource};
use crate::Result;

#[derive(Clone, Debug)]
pub(crate) struct Block {
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
}

impl Block {
    pub fn load(src: &dyn TensorSource, cfg: &Config, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            self_attn: Attention::load(src, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                src,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
            )?,
            mlp: Mlp::load(src, &format!("{p}.mlp"), h, cfg.intermediate_size)?,
            post_feedforward_layernorm: RmsNorm::load(
                src,
                &format!("{p}.post_feedforward_layernorm"),
                h,
                eps,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor, layer: usize, batch: &mut Batch<'_>) -> Result<Tensor> {
        // The attention output is a temporary, freed before the feed-forward runs.
        let x = (x + self
            .post_attention_layernorm
            .forward(&self.self_attn.forward(x, layer, batch)?)?)?;
        let m = self.mlp.forward(&x)?;
        Ok((&x + self.post_feedforward_layernorm.forward(&m)?)?)
    }
}
