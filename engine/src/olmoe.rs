//! OLMoE (`model_type: olmoe`): pre-norm decoder blocks with a sparse Mixture-of-Experts feed-forward.
//!
//! ```text
//! h = h + attn(input_layernorm(h))          # q/k/v optionally clipped to ±clip_qkv
//! h = h + moe(post_attention_layernorm(h))
//! ```

use candle_core::Tensor;
use routers::ExpertMask;

use crate::config::Config;
use crate::layers::{Attention, Batch, RmsNorm, SparseMoe, TensorSource};
use crate::Result;

#[derive(Clone, Debug)]
pub(crate) struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: SparseMoe,
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
            input_layernorm: RmsNorm::load(src, &format!("{p}.input_layernorm"), h, eps)?,
            self_attn: Attention::load(src, &format!("{p}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                src,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
            )?,
            mlp: SparseMoe::load(src, &format!("{p}.mlp"), cfg, loaded, router_bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor, layer: usize, batch: &mut Batch<'_>) -> Result<Tensor> {
        let a = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, layer, batch)?;
        let x = (x + a)?;
        let m = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, batch)?;
        Ok((x + m)?)
    }
}
