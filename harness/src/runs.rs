//! Finding the runs a report, comparison or gate reads, with shards merged first.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// The complete runs found under some paths, and what a reader should be told about them.
pub struct Collected {
    pub runs: Vec<reports::Run>,
    /// Shards merged and runs skipped, one line each.
    pub notes: Vec<String>,
}

/// Run directories under the given paths, with shards merged. A run named directly must be
/// complete and readable. Runs found inside a folder that are not (killed, still running, corrupt)
/// are an error naming each, unless `skip_bad` (then each is named in a note). Merging re-scores
/// documents, so `hooks` runs the tasks' Python `!function` code.
pub fn collect_runs(paths: &[PathBuf], skip_bad: bool, hooks: &tasks::Hooks) -> Result<Collected> {
    let mut runs = Vec::new();
    let mut notes = Vec::new();
    let mut bad = Vec::new();
    for p in paths {
        let found = reports::results::discover_runs(p)?;
        let named = found.len() == 1 && &found[0] == p;
        for dir in found {
            let mut read = || -> Result<reports::Run> {
                if crate::shards::merge_shards(&dir, hooks)? {
                    notes.push(format!("merged the shards of {}", dir.display()));
                }
                Ok(reports::load_run(&dir)?)
            };
            match read() {
                Ok(r) => runs.push(r),
                Err(e) if named => {
                    return Err(e).with_context(|| format!("cannot read run {}", dir.display()))
                }
                Err(e) if skip_bad => {
                    notes.push(format!("warning: skipping {}: {e:#}", dir.display()))
                }
                Err(e) => bad.push(format!("{}: {e:#}", dir.display())),
            }
        }
    }
    if !bad.is_empty() {
        bail!(
            "{} run(s) cannot be read (pass --skip-bad-runs to report the others):\n  {}",
            bad.len(),
            bad.join("\n  ")
        );
    }
    anyhow::ensure!(!runs.is_empty(), "no complete runs found");
    Ok(Collected { runs, notes })
}
