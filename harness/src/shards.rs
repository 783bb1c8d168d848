//! Sharded runs: shard folders (`RUN/shard=I-of-N/`) merged into their run without a model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use reports::manifest::{Manifest, ShardRecord, Timing};
use tasks::{Hooks, LanguageModel, Shard};

use crate::run::{execute, finish_run, load_tasks, lock_run, write_tables, CacheDirs, JOURNAL_DIR};

/// Merges the shard folders of a run (`RUN/shard=I-of-N/`) into `RUN/`: re-scores every document
/// from the request journals each shard folder holds (no model, and no path of the machines the
/// shards ran on, needed), so the merged run is identical to one
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
    // The answers: each shard folder's own journal, then (for shards written before shards kept
    // one) the shared cache beside the run.
    let root = run_dir.parent().unwrap_or(Path::new("."));
    let mut journals: Vec<PathBuf> = shards.iter().map(|d| d.join(JOURNAL_DIR)).collect();
    journals.push(root.join("cache"));
    let caches = CacheDirs {
        own: journals.remove(0),
        borrow: journals,
    };
    let vs = execute(
        &mut manifest,
        &registry,
        &tasks,
        &models,
        &caches,
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

/// The shard a new run evaluates, where that came from, and the run id all shards share.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardChoice {
    pub shard: Option<Shard>,
    /// `--shard`, `slurm` or `kubernetes` (recorded in the manifest).
    pub source: Option<String>,
    pub run_id: Option<String>,
}

/// Kubernetes gives an Indexed Job's pods their index, not the Job's completions: the manifest
/// passes that count in this variable.
pub const SHARD_COUNT_ENV: &str = "MOEVAL_SHARD_COUNT";

/// Chooses the shard of a new run: `--shard I/N` when given; else a Slurm array task's
/// (`(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP` of
/// `SLURM_ARRAY_TASK_COUNT`, so `--array=1-4` and `--array=0-6:2` number their shards 0..3); else a
/// Kubernetes Indexed Job pod's (`JOB_COMPLETION_INDEX` of [`SHARD_COUNT_ENV`]). A `--shard` that
/// disagrees with the scheduler's is an error, as is a sharded run without a run id, which every
/// shard must share (under Slurm it defaults to `slurm-<SLURM_ARRAY_JOB_ID>`). `env` reads the
/// environment (empty values count as unset).
pub fn choose_shard(
    explicit: Option<Shard>,
    run_id: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ShardChoice> {
    let number = |k: &str| -> Result<Option<usize>> {
        env(k)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{k}=`{v}` is not a non-negative whole number"))
            })
            .transpose()
    };
    let scheduler = if let Some(id) = number("SLURM_ARRAY_TASK_ID")? {
        let count = number("SLURM_ARRAY_TASK_COUNT")?.context(
            "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --shard I/N",
        )?;
        let min = number("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let step = number("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let shard = id
            .checked_sub(min)
            .filter(|d| d % step == 0)
            .map(|d| d / step)
            .filter(|&i| i < count)
            .with_context(|| {
                format!(
                    "Slurm array task {id} (min {min}, step {step}, count {count}) is not one of the \
                     array's tasks; pass --shard I/N"
                )
            })?;
        Some((
            Shard {
                index: shard,
                count,
            },
            "slurm",
        ))
    } else if let Some(index) = number("JOB_COMPLETION_INDEX")? {
        let count = number(SHARD_COUNT_ENV)?.with_context(|| {
            format!(
                "JOB_COMPLETION_INDEX={index} (a Kubernetes Indexed Job) needs the number of shards: \
                 set {SHARD_COUNT_ENV} to the Job's completions, or pass --shard I/N"
            )
        })?;
        anyhow::ensure!(
            index < count,
            "JOB_COMPLETION_INDEX={index} is not below {SHARD_COUNT_ENV}={count}"
        );
        Some((Shard { index, count }, "kubernetes"))
    } else {
        None
    };
    let (shard, source) = match (explicit, scheduler) {
        (Some(e), Some((s, from))) if e != s => bail!(
            "--shard {}/{} disagrees with the {from} scheduler's shard {}/{}; drop --shard to use \
             the scheduler's",
            e.index,
            e.count,
            s.index,
            s.count
        ),
        (Some(e), _) => (Some(e), Some("--shard".to_string())),
        (None, Some((s, from))) => (Some(s), Some(from.to_string())),
        (None, None) => (None, None),
    };
    let run_id = match run_id {
        Some(r) => Some(r),
        None if shard.is_some() => Some(
            env("SLURM_ARRAY_JOB_ID")
                .filter(|_| source.as_deref() == Some("slurm"))
                .map(|j| format!("slurm-{j}"))
                .context(
                    "a sharded run needs --run-id: every shard of the run must be given the same one",
                )?,
        ),
        None => None,
    };
    Ok(ShardChoice {
        shard,
        source,
        run_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment holding `vars` (empty values count as unset, as in the binary).
    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        }
    }

    fn choose(explicit: Option<&str>, vars: &[(&str, &str)]) -> Result<ShardChoice> {
        choose_shard(
            explicit.map(|s| Shard::parse(s).unwrap()),
            Some("r".into()),
            &env_of(vars),
        )
    }

    fn shard(c: &ShardChoice) -> (usize, usize, &str) {
        let s = c.shard.unwrap();
        (s.index, s.count, c.source.as_deref().unwrap())
    }

    #[test]
    fn schedulers_name_the_shard() {
        let slurm = [
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ];
        assert_eq!(shard(&choose(None, &slurm).unwrap()), (2, 4, "slurm"));
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "6"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ];
        assert_eq!(shard(&choose(None, &stepped).unwrap()), (3, 4, "slurm"));
        let k8s = [("JOB_COMPLETION_INDEX", "0"), (SHARD_COUNT_ENV, "4")];
        assert_eq!(shard(&choose(None, &k8s).unwrap()), (0, 4, "kubernetes"));
        assert_eq!(
            shard(&choose(Some("0/4"), &k8s).unwrap()),
            (0, 4, "--shard")
        );
        assert_eq!(choose(None, &[]).unwrap().shard, None);
    }

    #[test]
    fn bad_or_conflicting_shards_are_errors() {
        let k8s = [("JOB_COMPLETION_INDEX", "1"), (SHARD_COUNT_ENV, "4")];
        let e = choose(Some("0/4"), &k8s).unwrap_err().to_string();
        assert!(e.contains("disagrees") && e.contains("kubernetes"), "{e}");
        let e = choose(None, &[("JOB_COMPLETION_INDEX", "1")])
            .unwrap_err()
            .to_string();
        assert!(e.contains(SHARD_COUNT_ENV), "{e}");
        let e = choose(
            None,
            &[("JOB_COMPLETION_INDEX", "4"), (SHARD_COUNT_ENV, "4")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not below"), "{e}");
        let gap = [
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ];
        assert!(choose(None, &gap).is_err());
        let e = choose(
            None,
            &[
                ("SLURM_ARRAY_TASK_ID", "x"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("SLURM_ARRAY_TASK_ID=`x`"), "{e}");
    }

    #[test]
    fn shards_share_a_run_id() {
        let slurm = env_of(&[
            ("SLURM_ARRAY_TASK_ID", "0"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("SLURM_ARRAY_JOB_ID", "77"),
        ]);
        let c = choose_shard(None, None, &slurm).unwrap();
        assert_eq!(c.run_id.as_deref(), Some("slurm-77"));
        let e = choose_shard(Some(Shard { index: 0, count: 2 }), None, &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--run-id"), "{e}");
        assert_eq!(choose_shard(None, None, &|_| None).unwrap().run_id, None);
    }
}
