//! `moeval report`: leaderboard (Parquet + Markdown), self-contained HTML and a Hive-partitioned
//! dataset from run directories; shard folders are merged first.

use std::path::PathBuf;

use anyhow::{Context, Result};
use reports::html::HtmlOptions;

#[derive(clap::Args)]
pub struct Args {
    /// Run directories, or folders holding run directories (e.g. an `eval --output` folder).
    #[arg(long, required = true, num_args = 1..)]
    runs: Vec<PathBuf>,
    /// Folder for leaderboard.parquet, summary.md, index.html and dataset/.
    #[arg(long)]
    out: PathBuf,
    /// Title of the HTML page.
    #[arg(long, default_value = "moeval report")]
    title: String,
    /// Sample rows per task in the HTML sample browsers.
    #[arg(long, default_value_t = 300)]
    max_samples: usize,
    /// Report the other runs when some found inside a folder are incomplete or unreadable (each is
    /// named in a warning); without it such a run is an error.
    #[arg(long)]
    skip_bad_runs: bool,
    #[command(flatten)]
    python: super::PythonArg,
}

/// The complete runs under `paths`, shards merged ([`harness::runs::collect_runs`]); its notes go to
/// stderr.
pub fn collect_runs(
    paths: &[PathBuf],
    skip_bad: bool,
    hooks: &tasks::Hooks,
) -> Result<Vec<reports::Run>> {
    let c = harness::runs::collect_runs(paths, skip_bad, hooks)?;
    for n in &c.notes {
        eprintln!("{n}");
    }
    Ok(c.runs)
}

pub fn run(a: Args) -> Result<()> {
    let runs = collect_runs(&a.runs, a.skip_bad_runs, &a.python.hooks())?;
    let files = reports::write_report(
        &runs,
        &a.out,
        &HtmlOptions {
            title: a.title,
            max_samples: a.max_samples,
        },
    )
    .with_context(|| format!("cannot write the report to {}", a.out.display()))?;
    print!(
        "{}",
        std::fs::read_to_string(&files.markdown).unwrap_or_default()
    );
    eprintln!(
        "{} run(s); leaderboard {}, summary {}, dataset {}",
        runs.len(),
        files.leaderboard.display(),
        files.markdown.display(),
        files.dataset.display()
    );
    println!(
        "HTML report: {}",
        std::path::absolute(&files.html)
            .unwrap_or(files.html.clone())
            .display()
    );
    Ok(())
}
