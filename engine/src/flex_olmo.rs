//! FlexOlmo (`model_type: flex_olmo`): OLMo2-style post-norm decoder blocks whose feed-forward is a sparse
//! Mixture-of-Experts of independently trained experts.
//!
//! ```text
//! h = h + post_attention_layernorm(attn(h))
//! h = h + post_feedforward_layernorm(moe(h))
//! ```

use candle_core::Tensor;
use routers::ExpertMask;

use crate::config::Config;
use crate::layers::{Attention, Batch, RmsNorm, SparseMoe, TensorSource};
use crate::Result;

#[derive(Clone, Debug)]
pub(crate) struct Block {
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: SparseMoe,
    post_feedforward_layernorm: RmsNorm,
}

impl Block {
    pub fn load(
        src: &dyn TensorSource,
        cfg: &Config,
        layer: usize,
        loaded: &ExpertMask,
        router_bias: &[f32],
    ) -> Result<Self> {
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
            mlp: SparseMoe::load(src, &format!("{p}.mlp"), cfg, loaded, router_bias)?,
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
        let m = self.mlp.forward(&x, batch)?;
        Ok((&x + self.post_feedforward_layernorm.forward(&m)?)?)
    }
}
