//! One module per subcommand.

pub mod bench;
pub mod compare;
pub mod datastore;
pub mod download;
pub mod eval;
pub mod experts;
pub mod forward;
pub mod gate;
pub mod generate;
pub mod init_model;
pub mod merge;
pub mod report;
pub mod route;
pub mod serve;
pub mod train;
pub mod train_report;

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use engine::{Device, LoadOptions, Model};

static DEVICE: OnceLock<Device> = OnceLock::new();

/// Sets where every model of this process runs (the global `--device`).
pub fn set_device(device: Device) {
    let _ = DEVICE.set(device);
}

/// Where models run: the global `--device`, the CPU by default.
pub fn device() -> Device {
    DEVICE.get().copied().unwrap_or_default()
}

/// Expert selection shared by every command that runs a model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ExpertArgs {
    /// Experts to leave out, by name (from experts.toml) or index: `--opt-out math,2`. Their weights are
    /// never read. Owners' opt-outs recorded with `moeval experts opt-out` always apply as well.
    #[arg(long, value_name = "EXPERTS")]
    pub opt_out: Vec<String>,
    /// Use only these experts (names or indices). Naming an expert its owner opted out is refused.
    #[arg(long, value_name = "EXPERTS")]
    pub experts: Vec<String>,
}

/// Loads a model directory with the given expert selection, honouring the owners' policy.
pub fn load_model_with(dir: &Path, experts: &ExpertArgs) -> Result<Model> {
    let opts = LoadOptions {
        opt_out: experts.opt_out.clone(),
        experts: experts.experts.clone(),
        device: device(),
    };
    Model::load(dir, &opts).with_context(|| format!("cannot load the model in {}", dir.display()))
}

/// The `text` field of every non-blank line of a JSON Lines file; errors name the file and line.
pub fn jsonl_texts(file: &Path) -> Result<Vec<String>> {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: invalid JSON", file.display(), i + 1))?;
        let text = v["text"].as_str().with_context(|| {
            format!("{} line {}: no string field `text`", file.display(), i + 1)
        })?;
        out.push(text.to_string());
    }
    Ok(out)
}

/// Writes `path` through a uniquely named temporary file that `write` creates, synced and renamed into
/// place ([`durable::write_atomic_with`]), so readers and crashes never see a partial file.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    durable::write_atomic_with(path, write)
        .with_context(|| format!("cannot write {}", path.display()))
}
