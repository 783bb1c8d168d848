//! `manifest.json`: everything needed to know what a run computed and to redo it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{file_err, io, Result};
use crate::fsutil::write_atomic;

/// Version of the manifest layout; bumped only when a field changes meaning.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub manifest_version: u32,
    pub run_id: String,
    /// `running` while the run is in progress (or was killed), then `complete`.
    pub status: String,
    pub moeval_version: String,
    /// `git rev-parse HEAD` of the source tree, `+dirty` when it had uncommitted changes.
    pub git_revision: Option<String>,
    pub model: ModelInfo,
    /// The expert-mask variants this run evaluated (one, or the full model plus each opt-out).
    pub variants: Vec<Variant>,
    pub tasks: Vec<TaskInfo>,
    /// The settings the run was started with; `--resume` and shard merging reuse them.
    pub settings: Settings,
    pub seeds: Seeds,
    pub device: String,
    pub threads: usize,
    pub start_time: String,
    pub end_time: Option<String>,
    /// Seconds, documents and requests per (variant, task).
    pub timings: Vec<Timing>,
    /// Merged runs: the shard manifests' run ids and times.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_shards: Vec<ShardRecord>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    /// The model's name (directory name).
    pub id: String,
    pub dir: String,
    pub model_type: String,
    pub config_sha256: String,
    pub tokenizer_sha256: Option<String>,
    /// `experts.toml` (names, router biases) and the owners' opt-out policy, when present.
    pub experts_toml_sha256: Option<String>,
    pub policy_sha256: Option<String>,
    pub weights: Vec<FileHash>,
    /// SHA-256 over the hashes above: the identity of everything that determines the model's output.
    pub weights_hash: String,
    /// Expert names in index order (empty for dense models).
    pub expert_names: Vec<String>,
    /// Experts removed by the owners' policy, and on the command line.
    pub opted_out_by_policy: Vec<String>,
    pub opted_out_by_request: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FileHash {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Variant {
    /// `full`, or `-NAME` for the full mask without expert NAME.
    pub label: String,
    /// Indices of the experts the variant may use.
    pub allowed: Vec<usize>,
    pub opted_out: Vec<String>,
    /// The request-cache folder of this (model, mask), relative to the cache root.
    pub cache_scope: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskInfo {
    pub name: String,
    pub file: String,
    pub file_sha256: String,
    pub data_files: Vec<FileHash>,
    pub documents: usize,
    /// The task file's `metadata.version`, as written (a number or a string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub tasks: Vec<String>,
    pub include_paths: Vec<String>,
    pub data_dir: String,
    pub limit: Option<usize>,
    pub num_fewshot: Option<usize>,
    /// `--gen-kwargs`, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_kwargs: Option<String>,
    /// `--pairs`: comparisons drawn by CoBBLEr suites.
    pub pairs: Option<usize>,
    pub batch_size: usize,
    pub opt_out: Vec<String>,
    pub experts: Vec<String>,
    /// `leave-one-out` when the run swept single-expert opt-outs.
    pub opt_out_sweep: Option<String>,
    /// `I/N` when this is one shard of a run.
    pub shard: Option<String>,
    /// Where the shard came from: `--shard`, `slurm` (an array task) or `kubernetes` (an Indexed
    /// Job's pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_source: Option<String>,
    /// The retrieval label of every row (the `retrieval` column): `none`, `knn:...`, `ric:...`.
    pub retrieval: String,
    /// Everything else that changes a number, so `--resume` reproduces it or refuses. Absent from
    /// manifests written before these were recorded; such runs cannot be resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scoring: Option<Scoring>,
}

/// The settings of a run that change its numbers beyond the task list: retrieval, the scoring window,
/// the device and its compute precision.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Scoring {
    /// `ric` or `knn` (`None`: no datastore).
    pub retrieval_mode: Option<String>,
    /// The datastore directory (absolute) and its identity (SHA-256 of its manifest).
    pub datastore: Option<String>,
    pub datastore_identity: Option<String>,
    /// Retrieved blocks (ric) or neighbours (knn).
    pub k: Option<usize>,
    /// kNN-LM interpolation weight and softmax temperature.
    pub lambda: f64,
    pub temperature: f32,
    /// RIC-LM query length in tokens.
    pub query_tokens: usize,
    /// SILO perplexity protocol for rolling log-likelihood (`--ppl-window`, `--ppl-stride`).
    pub ppl_window: Option<usize>,
    pub ppl_stride: Option<usize>,
    /// Longest token sequence the model is given (the config's `max_position_embeddings`); longer
    /// contexts are cut from the left and rolling texts split into windows of this length.
    pub max_length: usize,
    /// `cpu` or `cuda:N`, and the compute dtype there (`f32` on the CPU, `bf16` on a GPU).
    pub device: String,
    pub dtype: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Seeds {
    pub fewshot: u64,
    /// Seed of the bootstrap standard errors.
    pub bootstrap: u64,
    /// Seed of generation requests (greedy unless a task samples).
    pub generation: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timing {
    pub variant: String,
    pub task: String,
    pub seconds: f64,
    pub documents: usize,
    /// Distinct requests the task needed, how many the model computed, how many came from the cache.
    pub requests: usize,
    pub computed: usize,
    pub cached: usize,
    pub documents_per_second: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ShardRecord {
    pub shard: String,
    pub start_time: String,
    pub end_time: Option<String>,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let m: Manifest = serde_json::from_str(&text).map_err(|e| file_err(path, e))?;
        if m.manifest_version > MANIFEST_VERSION {
            return Err(file_err(
                path,
                format!(
                    "manifest version {} is newer than this moeval understands ({MANIFEST_VERSION})",
                    m.manifest_version
                ),
            ));
        }
        Ok(m)
    }

    /// Writes the manifest atomically, pretty-printed.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| file_err(path, e))?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_newer_version_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("manifest.json");
        let mut m = Manifest {
            manifest_version: MANIFEST_VERSION,
            run_id: "r".into(),
            ..Manifest::default()
        };
        m.timings.push(Timing {
            task: "t".into(),
            seconds: 1.5,
            ..Timing::default()
        });
        m.write(&p).unwrap();
        assert_eq!(Manifest::read(&p).unwrap(), m);
        m.manifest_version = MANIFEST_VERSION + 1;
        m.write(&p).unwrap();
        let e = Manifest::read(&p).unwrap_err().to_string();
        assert!(e.contains("manifest.json") && e.contains("newer"), "{e}");
    }
}
