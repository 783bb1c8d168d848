//! `moeval gate`: fails (exit status 1) when a metric dropped beyond its allowance against a
//! committed baseline; `--update` rewrites the baseline from the runs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use reports::gate::Baseline;

#[derive(clap::Args)]
pub struct Args {
    /// The baseline file (JSON, committed with the code).
    #[arg(long)]
    baseline: PathBuf,
    /// Run directories, or folders holding them.
    #[arg(long, required = true, num_args = 1..)]
    runs: Vec<PathBuf>,
    /// Allowed drop: in the metric's units on 0-1 scales, relative (x |baseline|) above 1.
    #[arg(long, default_value_t = 0.01)]
    max_drop: f64,
    /// Standard errors (combined, baseline and run) added to the allowance.
    #[arg(long, default_value_t = 1.96)]
    z: f64,
    /// Write the runs' metrics as the new baseline instead of checking.
    #[arg(long)]
    update: bool,
    #[command(flatten)]
    python: super::PythonArg,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(
        a.max_drop >= 0.0 && a.z >= 0.0,
        "--max-drop and --z must be >= 0"
    );
    // Every run found must be readable: a skipped run would only show up as missing metrics.
    let runs = super::report::collect_runs(&a.runs, false, &a.python.hooks())?;
    let entries = reports::leaderboard::entries(&runs);
    if a.update {
        let ids: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{} ({} {})",
                    r.manifest.run_id,
                    r.manifest.model.id,
                    &r.manifest.model.weights_hash[..12.min(r.manifest.model.weights_hash.len())]
                )
            })
            .collect();
        let b = Baseline::from_entries(
            &entries,
            &format!("moeval gate --update from {}", ids.join(", ")),
        )?;
        b.write(&a.baseline)
            .with_context(|| format!("cannot write {}", a.baseline.display()))?;
        println!(
            "wrote {} metrics to {}",
            b.entries.len(),
            a.baseline.display()
        );
        return Ok(());
    }
    let b = Baseline::read(&a.baseline)?;
    let failures = b.check(&entries, a.max_drop, a.z)?;
    for f in &failures {
        println!("FAIL {f}");
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} baseline metrics dropped beyond their allowance (--max-drop {}, z {})",
            failures.len(),
            b.entries.len(),
            a.max_drop,
            a.z
        );
    }
    println!(
        "gate passed: {} metrics within allowance of {}",
        b.entries.len(),
        a.baseline.display()
    );
    Ok(())
}
