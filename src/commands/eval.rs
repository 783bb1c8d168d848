use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tasks::metrics::Aggregate;
use tasks::{output, runner, LoadOptions, Registry, RunOptions, Task};

use crate::lm::EngineLm;

/// `moeval eval`: run tasks (lm-evaluation-harness YAML files or the built-in suites) on a model.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, tokenizer.json, safetensors weights).
    #[arg(long)]
    model: PathBuf,
    /// Tasks, groups or tags, comma-separated (e.g. `calm_sentiment_gender_ll` or `calm`).
    #[arg(long, required = true, value_delimiter = ',')]
    tasks: Vec<String>,
    /// Extra folders of task YAML files (repeatable), searched with the built-in suites.
    #[arg(long)]
    include_path: Vec<PathBuf>,
    /// Evaluate only the first N documents of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Few-shot examples per prompt (overrides each task's `num_fewshot`).
    #[arg(long)]
    num_fewshot: Option<usize>,
    /// Requests per model call (scores do not depend on it).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Fills `{data_dir}` in task files' data paths (the CALM data by default).
    #[arg(long, default_value = "../shared/datasets/calm")]
    data_dir: PathBuf,
    /// Seed of the few-shot sampler (lm-evaluation-harness uses 1234).
    #[arg(long, default_value_t = 1234)]
    fewshot_seed: u64,
    /// Results go to OUTPUT/<run id>/ (samples.parquet, metrics.parquet).
    #[arg(long)]
    output: PathBuf,
    /// Name of the run folder (default: time and process id).
    #[arg(long)]
    run_id: Option<String>,
    #[command(flatten)]
    experts: super::ExpertArgs,
}

struct Bar(ProgressBar);

impl runner::Progress for Bar {
    fn start(&self, kind: &str, total: usize) {
        self.0.reset();
        self.0.set_length(total as u64);
        self.0.set_position(0);
        self.0.set_message(kind.to_string());
    }
    fn advance(&self, n: usize) {
        self.0.inc(n as u64);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Folders of built-in task files, found from the source tree this binary was built from.
fn builtin_dirs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tasks/suites");
    if dir.is_dir() {
        vec![dir]
    } else {
        Vec::new()
    }
}

fn run_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Days since 1970 to a civil date (Howard Hinnant's algorithm), so folders sort by time.
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let t = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{}",
        t / 3600,
        t / 60 % 60,
        t % 60,
        std::process::id()
    )
}

fn fmt(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "-".into()
    }
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be at least 1");
    let mut dirs = builtin_dirs();
    dirs.extend(a.include_path.iter().cloned());
    let registry = Registry::scan(&dirs)?;
    let names = registry.resolve(&a.tasks)?;
    let load = LoadOptions {
        data_dir: a.data_dir.clone(),
        limit: a.limit,
        num_fewshot: a.num_fewshot,
        fewshot_seed: a.fewshot_seed,
    };
    let tasks: Vec<Task> = names
        .iter()
        .map(|n| {
            let cfg = registry.task_config(n, &a.data_dir)?;
            Task::load(cfg, &load).with_context(|| format!("cannot load task `{n}`"))
        })
        .collect::<Result<_>>()?;
    let model = super::load_model_with(&a.model, &a.experts)?;
    let lm = EngineLm::new(&model)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg:>13} [{bar:30}] {pos}/{len} requests, {per_sec}, eta {eta}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );
    let opts = RunOptions {
        batch_size: a.batch_size,
        fewshot_seed: a.fewshot_seed,
    };
    let start = Instant::now();
    let results = runner::evaluate(&lm, &tasks, &opts, &Bar(bar))?;
    let elapsed = start.elapsed().as_secs_f64();
    let n_docs: usize = results.iter().map(|r| r.samples.len()).sum();

    let mut rows: Vec<(String, String, Aggregate)> = Vec::new();
    for r in &results {
        for (m, agg) in &r.metrics {
            rows.push((r.task.clone(), m.clone(), agg.clone()));
        }
    }
    let groups = runner::group_aggregates(&registry, &results);
    rows.extend(groups.iter().cloned());

    let dir = a.output.join(a.run_id.clone().unwrap_or_else(run_id));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    super::write_atomic(&dir.join("samples.parquet"), |p| {
        output::write_samples(p, &results).map_err(Into::into)
    })?;
    super::write_atomic(&dir.join("metrics.parquet"), |p| {
        output::write_metrics(p, &rows).map_err(Into::into)
    })?;

    // The table leaves out per-template rows (they are in metrics.parquet).
    println!(
        "{:<32} {:<28} {:>10} {:>10} {:>7}",
        "task", "metric", "value", "stderr", "n"
    );
    for (t, m, agg) in rows
        .iter()
        .filter(|r| !r.1.contains(",") && !r.1.starts_with("template_bias["))
    {
        println!(
            "{:<32} {:<28} {:>10} {:>10} {:>7}",
            t,
            m,
            fmt(agg.value),
            fmt(agg.stderr),
            agg.n
        );
    }
    for r in &results {
        for n in &r.notes {
            eprintln!("note: {n}");
        }
    }
    eprintln!(
        "{n_docs} documents in {elapsed:.1}s ({:.1} documents/s); results in {}",
        n_docs as f64 / elapsed.max(1e-9),
        dir.display()
    );
    Ok(())
}
