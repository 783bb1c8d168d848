//! `moeval eval`: runs tasks on a model ([`harness::evaluate`]) and prints the metrics table.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result};
use harness::{EvalSettings, Start, Sweep, VariantResult};
use indicatif::{ProgressBar, ProgressStyle};
use tasks::Shard;

/// Opt-out sweeps `--opt-out-sweep` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SweepArg {
    /// The full model, then the model without each one expert.
    LeaveOneOut,
}

/// `moeval eval`: run tasks (lm-evaluation-harness YAML files or the built-in suites) on a model.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, tokenizer.json, safetensors weights).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tasks, groups or tags, comma-separated (e.g. `calm_sentiment_gender_ll` or `calm`);
    /// `list` prints every task, group and tag found (with --include-path) and exits.
    #[arg(long, value_delimiter = ',', required_unless_present = "resume")]
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
    /// Updates every generation task's `generation_kwargs`, as lm_eval's --gen_kwargs does:
    /// `KEY=VALUE` pairs joined by commas (e.g. `max_gen_toks=64,temperature=0`); recorded in the
    /// manifest.
    #[arg(long, value_name = "KEY=VALUE,..")]
    gen_kwargs: Option<String>,
    /// CoBBLEr suites: compare this many (instruction, model pair) items, drawn deterministically
    /// (overrides the task file's `pairs`; 0 = all).
    #[arg(long)]
    pairs: Option<usize>,
    /// Requests per model call (scores do not depend on it).
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Fills `{data_dir}` in task files' data paths (the CALM data by default).
    #[arg(long, default_value = "../shared/datasets/calm")]
    data_dir: PathBuf,
    /// Seed of the few-shot sampler (lm-evaluation-harness uses 1234).
    #[arg(long, default_value_t = 1234)]
    fewshot_seed: u64,
    /// Results go to OUTPUT/<run id>/ (manifest.json, samples.parquet, metrics.parquet); answered
    /// requests are cached in OUTPUT/cache/ and reused by later runs.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Name of the run folder (default: time and process id). Shards of one run share it.
    #[arg(long)]
    run_id: Option<String>,
    /// Continue an interrupted run (or shard) from its folder: every setting comes from its manifest
    /// (options that would change them are refused) and only requests missing from the cache are
    /// computed.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = [
        "model", "tasks", "output", "run_id", "shard", "opt_out_sweep", "limit", "num_fewshot",
        "gen_kwargs", "include_path", "pairs", "batch_size", "data_dir", "fewshot_seed", "opt_out", "experts",
        "retrieval", "datastore", "k", "lambda", "temperature", "query_tokens", "ppl_window",
        "ppl_stride",
    ])]
    resume: Option<PathBuf>,
    /// Run shard I of N (documents whose id is I modulo N) into OUTPUT/<run id>/shard=I-of-N/, a
    /// self-contained folder (its request journal included); `moeval report` merges the shard
    /// folders of a run, copied together from any machines. Give all shards the same --run-id.
    /// Without --shard, a Slurm array task (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT, run id
    /// `slurm-<SLURM_ARRAY_JOB_ID>` by default) or a Kubernetes Indexed Job pod
    /// (JOB_COMPLETION_INDEX of MOEVAL_SHARD_COUNT) runs its own shard; see deploy/.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// Also evaluate the model without each expert, in the same run (`leave-one-out`).
    #[arg(long, value_enum, value_name = "KIND")]
    opt_out_sweep: Option<SweepArg>,
    #[command(flatten)]
    experts: super::ExpertArgs,
    #[command(flatten)]
    retrieval: super::RetrievalArgs,
    #[command(flatten)]
    python: super::PythonArg,
}

/// A progress bar per phase of requests.
struct Bar(Mutex<ProgressBar>);

impl tasks::Progress for Bar {
    fn start(&self, kind: &str, total: usize) {
        let bar = ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template(
                "{msg:>24} [{bar:30}] {pos}/{len} requests, {per_sec}, eta {eta}",
            )
            .expect("the progress template is valid")
            .progress_chars("=> "),
        );
        bar.set_message(kind.to_string());
        if let Ok(mut b) = self.0.lock() {
            *b = bar;
        }
    }
    fn advance(&self, n: usize) {
        if let Ok(b) = self.0.lock() {
            b.inc(n as u64);
        }
    }
    fn finish(&self) {
        if let Ok(b) = self.0.lock() {
            b.finish_and_clear();
        }
    }
}

fn fmt(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "-".into()
    }
}

fn print_table(vs: &[VariantResult]) {
    let several = vs.len() > 1;
    println!(
        "{}{:<32} {:<28} {:>10} {:>10} {:>7}",
        if several {
            format!("{:<14} ", "mask")
        } else {
            String::new()
        },
        "task",
        "metric",
        "value",
        "stderr",
        "n"
    );
    for v in vs {
        // Per-template rows stay in metrics.parquet.
        for r in v
            .metrics
            .iter()
            .filter(|r| !r.metric.contains(',') && !r.metric.starts_with("template_bias["))
        {
            let agg = &r.aggregate;
            println!(
                "{}{:<32} {:<28} {:>10} {:>10} {:>7}",
                if several {
                    format!("{:<14} ", v.columns.mask)
                } else {
                    String::new()
                },
                r.task,
                r.metric,
                fmt(agg.value),
                fmt(agg.stderr),
                agg.n
            );
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in vs {
        for r in &v.results {
            for n in &r.notes {
                if seen.insert(n.clone()) {
                    eprintln!("note: {n}");
                }
            }
        }
    }
}

/// Prints a Markdown table with padded columns.
fn print_table_md(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([headers[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        println!("|{}|", padded.join("|"));
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|&w| "-".repeat(w)).collect());
    for r in rows {
        line(r.clone());
    }
    println!();
}

/// `--tasks list`: groups, tags and tasks, as `lm_eval --tasks list` prints them.
fn list_tasks(include_paths: &[PathBuf]) -> Result<()> {
    let l = harness::task_registry(include_paths)?.listing();
    let path = |p: &PathBuf| p.display().to_string();
    let groups: Vec<Vec<String>> = l
        .groups
        .iter()
        .map(|(g, f)| vec![g.clone(), path(f)])
        .collect();
    print_table_md(&["Group", "Config Location"], &groups);
    let tags: Vec<Vec<String>> = l.tags.iter().map(|t| vec![t.clone()]).collect();
    print_table_md(&["Tag"], &tags);
    let tasks: Vec<Vec<String>> = l
        .tasks
        .iter()
        .map(|(t, f, o)| vec![t.clone(), path(f), o.clone()])
        .collect();
    print_table_md(&["Task", "Config Location", "Output Type"], &tasks);
    eprintln!(
        "{} groups, {} tags, {} tasks",
        groups.len(),
        tags.len(),
        tasks.len()
    );
    Ok(())
}

pub fn run(a: Args, at: super::Placement) -> Result<()> {
    if a.resume.is_none() && a.tasks == ["list"] {
        return list_tasks(&a.include_path);
    }
    let start = match a.resume {
        Some(dir) => Start::Resume {
            dir,
            device: at.device,
        },
        None => {
            let explicit = a.shard.as_deref().map(Shard::parse).transpose();
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let shard = harness::shards::choose_shard(
                explicit.map_err(anyhow::Error::msg)?,
                a.run_id,
                &env,
            )?;
            Start::New(Box::new(EvalSettings {
                model: a.model.context("--model is required")?,
                tasks: a.tasks,
                include_paths: a.include_path,
                limit: a.limit,
                num_fewshot: a.num_fewshot,
                gen_kwargs: a.gen_kwargs.clone(),
                pairs: a.pairs,
                batch_size: a.batch_size,
                data_dir: a.data_dir,
                fewshot_seed: a.fewshot_seed,
                output: a.output.context("--output is required")?,
                run_id: shard.run_id,
                shard: shard.shard,
                shard_source: shard.source,
                sweep: a.opt_out_sweep.map(|_| Sweep::LeaveOneOut),
                experts: a.experts.into(),
                retrieval: a.retrieval.into(),
                device: at.device,
                dtype: at.dtype,
            }))
        }
    };
    let hooks = a.python.hooks();
    let out = harness::evaluate(start, &hooks, &Bar(Mutex::new(ProgressBar::hidden())))?;
    print_table(&out.variants);
    let t = &out.manifest.timings;
    let docs: usize = t.iter().map(|t| t.documents).sum();
    let computed: usize = t.iter().map(|t| t.computed).sum();
    let cached: usize = t.iter().map(|t| t.cached).sum();
    eprintln!(
        "{docs} documents in {:.1}s ({:.1} documents/s); {computed} requests computed, {cached} from the cache; results in {}",
        out.seconds,
        docs as f64 / out.seconds.max(1e-9),
        out.run_dir.display()
    );
    let h = hooks.stats();
    if h.calls > 0 {
        eprintln!(
            "Python hooks ({}): {} calls over {} items in {:.2}s ({:.3} ms per item){}",
            hooks.python().display(),
            h.calls,
            h.items,
            h.seconds,
            1e3 * h.seconds / h.items.max(1) as f64,
            if h.warm_seconds > 0.0 {
                format!(
                    "; start-up and imports {:.2}s, while data loaded",
                    h.warm_seconds
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
