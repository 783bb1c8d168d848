//! Sharded runs: shard folders (`RUN/shard=I-of-N/`) merged into their run without a model.

use std::path::Path;

use anyhow::{bail, Context, Result};
use reports::manifest::{Manifest, ShardRecord, Timing};
use tasks::{Hooks, LanguageModel, Shard};

use crate::run::{execute, finish_run, load_tasks, lock_run, write_tables};

/// Merges the shard folders of a run (`RUN/shard=I-of-N/`) into `RUN/`: re-scores every document
/// from the shards' request journals (no model needed), so the merged run is identical to one
/// that ran unsharded (`hooks` runs the tasks' Python `!function` code). Returns false when there
/// is nothing to merge.
pub fn merge_shards(run_dir: &Path, hooks: &Hooks) -> Result<bool> {
    let shards = reports::results::shard_dirs(run_dir);
    if shards.is_empty() {
        return Ok(false);
    }
    let merged = run_dir.join("manifest.json");
    let manifests: Vec<Manifest> = shards
        .iter()
        .map(|d| Manifest::read(&d.join("manifest.json")))
        .collect::<Result<_, _>>()?;
    if merged.is_file() {
        let m = Manifest::read(&merged)?;
        if m.status == "complete" && m.merged_shards.len() == manifests.len() {
            return Ok(true);
        }
    }
    let first = &manifests[0];
    let count = first
        .settings
        .shard
        .as_deref()
        .map(Shard::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .with_context(|| format!("{}: not a shard", shards[0].display()))?
        .count;
    let mut have = vec![false; count];
    for (m, d) in manifests.iter().zip(&shards) {
        let s = m
            .settings
            .shard
            .as_deref()
            .map(Shard::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?
            .with_context(|| format!("{}: not a shard", d.display()))?;
        if s.count != count
            || m.run_id != first.run_id
            || m.model.weights_hash != first.model.weights_hash
            || m.settings.retrieval != first.settings.retrieval
            || m.variants
                .iter()
                .map(|v| &v.label)
                .ne(first.variants.iter().map(|v| &v.label))
        {
            bail!(
                "{}: shard of another run (run id, shard count, model, masks or retrieval differ from {})",
                d.display(),
                shards[0].display()
            );
        }
        if m.status != "complete" {
            bail!(
                "{}: shard {}/{count} is not complete; resume it with `moeval eval --resume {}`",
                d.display(),
                s.index,
                d.display()
            );
        }
        have[s.index] = true;
    }
    if let Some(missing) = have.iter().position(|h| !h) {
        bail!(
            "{}: shard {missing}/{count} is missing (have {} of {count})",
            run_dir.display(),
            have.iter().filter(|h| **h).count()
        );
    }
    let mut manifest = first.clone();
    manifest.settings.shard = None;
    manifest.start_time = manifests
        .iter()
        .map(|m| m.start_time.clone())
        .min()
        .unwrap_or_default();
    manifest.merged_shards = manifests
        .iter()
        .map(|m| ShardRecord {
            shard: m.settings.shard.clone().unwrap_or_default(),
            start_time: m.start_time.clone(),
            end_time: m.end_time.clone(),
        })
        .collect();
    let (registry, tasks) = load_tasks(&manifest.settings, manifest.seeds.fewshot, hooks)
        .with_context(|| format!("merging the shards of {}", run_dir.display()))?;
    let models: Vec<Option<&dyn LanguageModel>> = vec![None; manifest.variants.len()];
    let root = run_dir.parent().unwrap_or(Path::new("."));
    let vs = execute(
        &mut manifest,
        &registry,
        &tasks,
        &models,
        &root.join("cache"),
        None,
        None,
        &tasks::NoProgress,
        None,
    )
    .with_context(|| format!("merging the shards of {}", run_dir.display()))?;
    // Time spent is the shards' (merging only re-reads answers).
    let mut timings = Vec::new();
    for m in &manifests {
        for t in &m.timings {
            match timings
                .iter_mut()
                .find(|x: &&mut Timing| x.variant == t.variant && x.task == t.task)
            {
                Some(x) => {
                    x.seconds += t.seconds;
                    x.documents += t.documents;
                    x.requests += t.requests;
                    x.computed += t.computed;
                    x.cached += t.cached;
                }
                None => timings.push(t.clone()),
            }
        }
    }
    for t in &mut timings {
        t.documents_per_second = t.documents as f64 / t.seconds.max(1e-9);
    }
    manifest.timings = timings;
    let _lock = lock_run(run_dir, &manifest.run_id)?;
    write_tables(run_dir, &vs)?;
    let end = manifests.iter().filter_map(|m| m.end_time.clone()).max();
    finish_run(run_dir, &mut manifest, end)?;
    Ok(true)
}
