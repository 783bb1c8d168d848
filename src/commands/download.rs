//! `moeval download`: fetches datasets from the Hugging Face Hub, only when asked.
//!
//! - `--tasks NAMES [--include-path DIR]`: the Hub datasets those tasks read, into the Hugging Face
//!   cache, through the same code path as `moeval eval` (`harness::download::fetch_task_dataset`);
//!   each task is then checked to find its documents offline.
//! - `--dataset OWNER/NAME`: a whole repository into moeval's own cache, once (`harness::download`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Tasks, groups or tags (comma-separated) whose Hub datasets to fetch into the Hugging Face
    /// cache (HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub).
    #[arg(long, value_delimiter = ',', conflicts_with = "dataset")]
    tasks: Vec<String>,
    /// Extra folders of task YAML files (repeatable), searched with the built-in suites.
    #[arg(long, requires = "tasks")]
    include_path: Vec<PathBuf>,
    /// Fills `{data_dir}` in task files' data paths (as `moeval eval --data-dir`).
    #[arg(long, default_value = "../shared/datasets/calm", requires = "tasks")]
    data_dir: PathBuf,
    /// A whole dataset repository on the Hub, `owner/name`, into moeval's own cache (the default
    /// without --tasks).
    #[arg(long)]
    dataset: Option<String>,
    /// Branch, tag or commit (with --dataset).
    #[arg(long, default_value = "main")]
    revision: String,
    /// Cache folder for --dataset (default: $MOEVAL_CACHE, else ~/.cache/moeval).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Hub address for --dataset (for mirrors; --tasks reads HF_ENDPOINT).
    #[arg(long, default_value = "https://huggingface.co")]
    endpoint: String,
}

pub fn run(a: Args) -> Result<()> {
    if !a.tasks.is_empty() {
        return run_tasks(&a.tasks, &a.include_path, &a.data_dir);
    }
    let got = harness::download::download(
        &harness::download::DownloadSettings {
            dataset: a.dataset.unwrap_or_else(|| "vipulgupta/CALM".into()),
            revision: a.revision,
            cache_dir: a.cache_dir,
            endpoint: a.endpoint,
        },
        &mut |rel| eprintln!("downloading {rel}"),
    )?;
    if got.already {
        eprintln!(
            "already downloaded (remove {} to fetch again)",
            got.dir.display()
        );
    } else {
        eprintln!(
            "{} file(s) downloaded into {}",
            got.fetched,
            got.dir.display()
        );
    }
    println!("{}", got.dir.display());
    Ok(())
}

/// Fetches what each task's Hub dataset needs, then checks that the task's documents resolve
/// from the cache alone (so a later offline `moeval eval` finds them).
fn run_tasks(names: &[String], include_paths: &[PathBuf], data_dir: &Path) -> Result<()> {
    let registry = harness::task_registry(include_paths)?;
    let hub = harness::download::HubSettings::from_env();
    let offline = tasks::hub::offline();
    for n in registry.resolve(names)? {
        let cfg = registry.task_config(&n, data_dir)?;
        if harness::download::hub_dataset(&cfg).is_none() {
            continue;
        }
        let Some(split) = cfg.test_split.clone().or(cfg.validation_split.clone()) else {
            continue;
        };
        let dir = cfg.file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let bases = [Path::new("."), dir.as_path()];
        if offline {
            // Nothing may touch the network: check the cache, naming what is missing.
            tasks::dataset::find_dataset(&cfg, &split, &bases)?;
            eprintln!(
                "task `{n}`: dataset `{}` is in the cache (HF_HUB_OFFLINE is set)",
                cfg.dataset_path
            );
            continue;
        }
        let mut on_file = |repo: &str, file: &str| eprintln!("downloading dataset {repo}: {file}");
        let Some(got) = harness::download::fetch_task_dataset(&cfg, &hub, &mut on_file)? else {
            continue;
        };
        for (split, why) in &got.problems {
            eprintln!(
                "warning: task `{n}`: split `{split}` of `{}`: {why}",
                got.repo
            );
        }
        // The same resolution, offline, must now find the documents.
        tasks::dataset::find_dataset(&cfg, &split, &bases)
            .with_context(|| format!("task `{n}`: dataset `{}` after downloading", got.repo))?;
        eprintln!(
            "task `{n}`: dataset `{}`: {} file(s) downloaded, {} already cached",
            got.repo,
            got.downloaded.len(),
            got.cached
        );
    }
    println!("{}", tasks::hub::cache_root().display());
    Ok(())
}
