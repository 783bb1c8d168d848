//! Loading a model with an expert selection, always through the owners' policy.

use std::path::Path;

use anyhow::{Context, Result};
use engine::{Device, LoadOptions, Model, WeightDtype};

/// Expert selection shared by everything that runs a model: the owners' opt-outs recorded with
/// `moeval experts opt-out` always apply as well.
#[derive(Clone, Debug, Default)]
pub struct Experts {
    /// Experts to leave out, by name (from experts.toml) or index. Their weights are never read.
    pub opt_out: Vec<String>,
    /// Use only these experts (names or indices). Naming an expert its owner opted out is refused.
    pub experts: Vec<String>,
}

/// Loads a model directory on `device` with the given expert selection, honouring the owners'
/// policy; `dtype` is how the CPU holds its projection weights.
pub fn load_model(
    dir: &Path,
    experts: &Experts,
    device: Device,
    dtype: WeightDtype,
) -> Result<Model> {
    let opts = LoadOptions {
        opt_out: experts.opt_out.clone(),
        experts: experts.experts.clone(),
        device,
        dtype,
    };
    Model::load(dir, &opts).with_context(|| format!("cannot load the model in {}", dir.display()))
}
