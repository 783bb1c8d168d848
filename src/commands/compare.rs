//! `moeval compare RUN_A RUN_B`: paired differences on the samples both runs share.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The reference run directory.
    run_a: PathBuf,
    /// The run compared against it (may be the same directory with another --mask-b).
    run_b: PathBuf,
    /// Mask variant of run A (default: its first, `full`), e.g. `-expert-2`.
    #[arg(long, allow_hyphen_values = true)]
    mask_a: Option<String>,
    /// Mask variant of run B (default: its first, `full`).
    #[arg(long, allow_hyphen_values = true)]
    mask_b: Option<String>,
    /// Only these tasks (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
}

pub fn run(a: Args) -> Result<()> {
    let load = |p: &PathBuf| {
        reports::load_run(p).with_context(|| format!("cannot read run {}", p.display()))
    };
    let (ra, rb) = (load(&a.run_a)?, load(&a.run_b)?);
    let (ma, sa) = ra.samples_of(a.mask_a.as_deref(), &a.tasks)?;
    let (mb, sb) = rb.samples_of(a.mask_b.as_deref(), &a.tasks)?;
    let cs = reports::compare::compare(&sa, &sb, |t, m| ra.higher_is_better(t, m));
    anyhow::ensure!(
        !cs.is_empty(),
        "the runs share no samples (same task, document and prompt)"
    );
    println!(
        "A = {} [{ma}] ({}), B = {} [{mb}] ({})",
        ra.manifest.run_id, ra.manifest.model.id, rb.manifest.run_id, rb.manifest.model.id
    );
    println!(
        "{:<30} {:<22} {:>6} {:>9} {:>9} {:>9} {:>21} {:>9}  test",
        "task", "metric", "n", "A", "B", "B-A", "95% CI", "p"
    );
    for c in &cs {
        let d = &c.diff;
        let better = if d.diff == 0.0 {
            ""
        } else if (d.diff > 0.0) == c.higher_is_better {
            " (B better)"
        } else {
            " (B worse)"
        };
        println!(
            "{:<30} {:<22} {:>6} {:>9.4} {:>9.4} {:>+9.4} {:>21} {:>9.4}  {}{better}",
            c.task,
            c.metric,
            d.n,
            d.mean_a,
            d.mean_b,
            d.diff,
            format!("[{:+.4}, {:+.4}]", d.ci_low, d.ci_high),
            c.p_value,
            c.test
        );
    }
    Ok(())
}
