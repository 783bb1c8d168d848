//! Results that last, and the one owner of the run directory: every table a run holds with its
//! atomic writer ([`tables`]), run manifests, the crash-safe request cache (one request identity),
//! reading run directories, leaderboards (Parquet, Markdown, HTML with inline SVG), paired
//! comparisons, a Hive-partitioned export and the regression gate. Schemas: `docs/results.md`.

pub mod cache;
pub mod compare;
mod error;
pub mod fsutil;
pub mod gate;
pub mod hive;
pub mod html;
pub mod leaderboard;
pub mod manifest;
pub mod results;
pub mod stats;
pub mod tables;

pub use error::{Error, Result};
pub use manifest::Manifest;
pub use results::{load_run, Run};

use std::path::{Path, PathBuf};

/// Files a report wrote.
#[derive(Clone, Debug)]
pub struct ReportFiles {
    pub leaderboard: PathBuf,
    pub markdown: PathBuf,
    pub html: PathBuf,
    pub dataset: PathBuf,
}

/// Paired comparisons a report shows: every other mask of a run against its first (`full`), and
/// every other run's first mask against the first run's.
pub fn default_comparisons(runs: &[Run]) -> Vec<(String, String, Vec<compare::Comparison>)> {
    fn pick<'a>(r: &'a Run, mask: &str) -> Vec<&'a results::SampleRow> {
        r.samples.iter().filter(|s| s.mask == mask).collect()
    }
    let mut out = Vec::new();
    for r in runs {
        let masks = r.masks();
        for m in masks.iter().skip(1) {
            let c = compare::compare(&pick(r, &masks[0]), &pick(r, m), |t, m| {
                r.higher_is_better(t, m)
            });
            out.push((
                format!("{} {}", r.manifest.run_id, masks[0]),
                format!("{} {m}", r.manifest.run_id),
                c,
            ));
        }
    }
    if let Some(first) = runs.first() {
        let fm = first.masks().first().cloned().unwrap_or_default();
        for r in &runs[1..] {
            let m = r.masks().first().cloned().unwrap_or_default();
            let c = compare::compare(&pick(first, &fm), &pick(r, &m), |t, m| {
                first.higher_is_better(t, m)
            });
            if !c.is_empty() {
                out.push((
                    format!("{} {fm}", first.manifest.run_id),
                    format!("{} {m}", r.manifest.run_id),
                    c,
                ));
            }
        }
    }
    out
}

/// Writes `leaderboard.parquet`, `summary.md`, `index.html` and the Hive dataset (`dataset/`)
/// for complete runs into `out`.
pub fn write_report(runs: &[Run], out: &Path, opts: &html::HtmlOptions) -> Result<ReportFiles> {
    std::fs::create_dir_all(out).map_err(error::io(out))?;
    let entries = leaderboard::entries(runs);
    let comparisons = default_comparisons(runs);
    let files = ReportFiles {
        leaderboard: out.join("leaderboard.parquet"),
        markdown: out.join("summary.md"),
        html: out.join("index.html"),
        dataset: out.join("dataset"),
    };
    let batch = leaderboard::batch(&entries)?;
    crate::tables::write_parquet_atomic(&files.leaderboard, &batch)
        .map_err(|e| error::file_err(&files.leaderboard, e))?;
    fsutil::write_atomic(
        &files.markdown,
        leaderboard::markdown(&entries, &comparisons).as_bytes(),
    )?;
    fsutil::write_atomic(
        &files.html,
        html::render(runs, &entries, &comparisons, opts).as_bytes(),
    )?;
    hive::export(runs, &files.dataset)?;
    Ok(files)
}
