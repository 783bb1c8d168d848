//! A run: tasks on a model, written to a run directory (manifest, samples, metrics, routing),
//! persisting every answered request so a killed run resumes and shards merge without a model.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use durable::fault;
use engine::{ExpertMask, Model};
use rayon::prelude::*;
use reports::cache::{scope_name, CachedLm, RequestCache};
use reports::fsutil::{sha256_file, sha256_hex, utc_now};
use reports::manifest::{
    FileHash, Manifest, ModelInfo, Scoring, Seeds, Settings, TaskInfo, Timing, Variant,
    MANIFEST_VERSION,
};
use reports::tables::{self, MetricRow, RoutingRow, RunColumns};
use tasks::{
    Hooks, LanguageModel, LoadOptions, Progress, Registry, RunOptions, Shard, Task, TaskResult,
};

use crate::lm::EngineLm;
use crate::retrieval::{Retrieval, RetrievalSettings};
use crate::Experts;

/// The lock file that keeps two processes from writing one run directory at once. The kernel
/// releases it when its holder dies, so a killed run never blocks its `--resume`.
const RUN_LOCK: &str = "run.lock";

/// Opt-out sweeps `--opt-out-sweep` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    /// The full model, then the model without each one expert.
    LeaveOneOut,
}

/// Folders of built-in task files, found from the source tree this binary was built from.
fn builtin_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.parent().unwrap_or(root).join("tasks/suites");
    if dir.is_dir() {
        vec![dir]
    } else {
        Vec::new()
    }
}

fn default_run_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // 2025-01-31T12:00:00Z -> 20250131-120000, so folders sort by time.
    let t: String = reports::fsutil::utc(secs)
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect();
    format!("{}-{}", t.replace('T', "-"), std::process::id())
}

fn abs(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// `git rev-parse HEAD` of the source tree this binary was built from (`+dirty` with changes).
fn git_revision() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("git")
        .args(["-C", dir, "rev-parse", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let rev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dirty = std::process::Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty { format!("{rev}+dirty") } else { rev })
}

fn device_label(model: &Model) -> String {
    if model.device() != engine::Device::Cpu {
        return format!("{} ({})", model.device(), model.device_name());
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    });
    let held = format!(
        "weights held as {}, {} kernels",
        model.weights_dtype(),
        engine::matmul::kernel_name()
    );
    match cpu {
        Some(c) => format!("cpu ({c}; {held})"),
        None => format!("cpu ({held})"),
    }
}

fn hash_file(path: &Path, root: &Path) -> Result<FileHash> {
    let (sha256, bytes) = sha256_file(path)?;
    Ok(FileHash {
        path: path
            .strip_prefix(root)
            .unwrap_or(path)
            .display()
            .to_string(),
        sha256,
        bytes,
    })
}

/// Hashes of everything in a model directory that determines its outputs.
fn model_info(model: &Model, dir: &Path) -> Result<ModelInfo> {
    let opt = |name: &str| -> Result<Option<String>> {
        let p = dir.join(name);
        Ok(if p.is_file() {
            Some(sha256_file(&p)?.0)
        } else {
            None
        })
    };
    let mut weights: Vec<FileHash> = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.ends_with(".safetensors") || n == "model.safetensors.index.json"
        })
        .collect();
    files.sort();
    for f in &files {
        weights.push(hash_file(f, dir)?);
    }
    let config_sha256 = sha256_file(&dir.join("config.json"))?.0;
    let tokenizer_sha256 = opt("tokenizer.json")?;
    let experts_toml_sha256 = opt(routers::EXPERTS_FILE)?;
    let policy_sha256 = opt(routers::POLICY_FILE)?;
    // The identity of the model's outputs: config, tokenizer, expert registry (router biases) and
    // every weight file. The owners' policy only narrows the mask, which is recorded separately.
    let mut ident = format!(
        "config {config_sha256}\ntokenizer {}\nexperts {}\n",
        tokenizer_sha256.as_deref().unwrap_or("-"),
        experts_toml_sha256.as_deref().unwrap_or("-")
    );
    for w in &weights {
        ident.push_str(&format!("{} {}\n", w.path, w.sha256));
    }
    let names = |ix: &[usize]| -> Vec<String> {
        model
            .registry()
            .map(|r| ix.iter().map(|&i| r.name(i).to_string()).collect())
            .unwrap_or_default()
    };
    let eff = model.effective_mask();
    Ok(ModelInfo {
        id: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| abs(dir)),
        dir: abs(dir),
        model_type: model.config().architecture.model_type().to_string(),
        config_sha256,
        tokenizer_sha256,
        experts_toml_sha256,
        policy_sha256,
        weights,
        weights_hash: sha256_hex(ident.as_bytes()),
        expert_names: model
            .registry()
            .map(|r| (0..r.len()).map(|i| r.name(i).to_string()).collect())
            .unwrap_or_default(),
        opted_out_by_policy: eff.map(|e| names(&e.by_policy)).unwrap_or_default(),
        opted_out_by_request: eff.map(|e| names(&e.by_request)).unwrap_or_default(),
    })
}

/// The `mask` label of a variant that may use the experts `allowed` of `names`: `full` when that is
/// every expert; in a run restricted with `--experts`, `experts=A+B` (the experts it may use);
/// otherwise `-A-B`, each expert left out (by the owners' policy, `--opt-out` or the sweep).
fn mask_label(allowed: &[usize], names: &[String], restricted: bool) -> String {
    let name = |i: usize| names.get(i).cloned().unwrap_or_else(|| i.to_string());
    if allowed.len() == names.len() {
        "full".into()
    } else if restricted {
        let a: Vec<String> = allowed.iter().map(|&i| name(i)).collect();
        format!("experts={}", a.join("+"))
    } else {
        (0..names.len())
            .filter(|i| !allowed.contains(i))
            .map(|i| format!("-{}", name(i)))
            .collect()
    }
}

/// The run's mask variants: the effective mask, then, for a sweep, each of its experts left out.
/// `restricted`: the run named its experts with `--experts`.
fn variants(
    model: &Model,
    info: &ModelInfo,
    sweep: Option<Sweep>,
    restricted: bool,
) -> Result<Vec<(Variant, Option<ExpertMask>)>> {
    // GPU answers (bf16) are not the CPU's (f32): each device caches its own.
    // So are answers of weights rounded to bf16 (`--dtype bf16` on a wider checkpoint).
    let scope = |allowed: &[usize]| match model.device() {
        engine::Device::Cpu if model.weights_rounded() => {
            format!("bf16w-{}", scope_name(&info.weights_hash, allowed))
        }
        engine::Device::Cpu => scope_name(&info.weights_hash, allowed),
        engine::Device::Cuda(_) => format!("cuda-{}", scope_name(&info.weights_hash, allowed)),
    };
    let Some(eff) = model.effective_mask() else {
        if sweep.is_some() {
            bail!("--opt-out-sweep needs a Mixture-of-Experts model; this one is dense");
        }
        return Ok(vec![(
            Variant {
                label: "full".into(),
                allowed: Vec::new(),
                opted_out: Vec::new(),
                cache_scope: scope(&[]),
            },
            None,
        )]);
    };
    let name = |i: usize| {
        info.expert_names
            .get(i)
            .cloned()
            .unwrap_or_else(|| i.to_string())
    };
    let names: Vec<String> = (0..model.config().num_experts).map(name).collect();
    let make = |mask: &ExpertMask| {
        let allowed: Vec<usize> = mask.allowed().collect();
        Variant {
            label: mask_label(&allowed, &names, restricted),
            opted_out: mask.removed().map(name).collect(),
            cache_scope: scope(&allowed),
            allowed,
        }
    };
    let mut out = vec![(make(&eff.mask), None)];
    if sweep == Some(Sweep::LeaveOneOut) {
        if eff.mask.count() < 2 {
            bail!("--opt-out-sweep leave-one-out needs at least two usable experts");
        }
        for e in eff.mask.allowed() {
            let m = eff.mask.without(&[e])?;
            out.push((make(&m), Some(m)));
        }
    }
    Ok(out)
}

/// Every task file found: the built-in suites, then `include_paths`.
pub fn task_registry(include_paths: &[PathBuf]) -> Result<Registry> {
    let mut dirs = builtin_dirs();
    dirs.extend(include_paths.iter().cloned());
    Ok(Registry::scan(&dirs)?)
}

/// Loads a run's tasks; `hooks` runs their `!function` code (Python starts only if one has some).
pub(crate) fn load_tasks(
    s: &Settings,
    fewshot_seed: u64,
    hooks: &Hooks,
) -> Result<(Registry, Vec<Task>)> {
    let includes: Vec<PathBuf> = s.include_paths.iter().map(PathBuf::from).collect();
    let registry = task_registry(&includes)?;
    let names = registry.resolve(&s.tasks)?;
    let data_dir = PathBuf::from(&s.data_dir);
    let load = LoadOptions {
        data_dir: data_dir.clone(),
        limit: s.limit,
        num_fewshot: s.num_fewshot,
        fewshot_seed,
        pairs: s.pairs,
        hooks: hooks.clone(),
        gen_kwargs: match &s.gen_kwargs {
            Some(g) => tasks::config::parse_gen_kwargs(g)
                .map_err(|e| anyhow::anyhow!("--gen-kwargs: {e}"))?,
            None => Default::default(),
        },
    };
    let configs = names
        .iter()
        .map(|n| registry.task_config(n, &data_dir))
        .collect::<Result<Vec<_>, _>>()?;
    // Python's start-up and the hooks' imports run in the background while the data loads.
    let mut functions = Vec::new();
    for cfg in &configs {
        functions.extend(
            tasks::check::hook_functions(cfg)?
                .into_iter()
                .map(|(_, f)| f),
        );
    }
    let datasets = configs
        .iter()
        .any(|c| c.process_docs.is_some() || c.fewshot.process_docs.is_some());
    hooks.warm(&functions, datasets);
    let loaded: Vec<_> = configs
        .par_iter()
        .map(|cfg| Task::load(cfg.clone(), &load))
        .collect();
    // A task whose Hub dataset is not (all) in the cache downloads it (one at a time), unless offline.
    let hub = crate::download::HubSettings::from_env();
    let mut on_file = |repo: &str, file: &str| eprintln!("downloading dataset {repo}: {file}");
    let tasks = loaded
        .into_iter()
        .zip(&configs)
        .map(|(task, cfg)| {
            crate::download::finish_load(task, cfg, &load, &hub, &mut on_file)
                .with_context(|| format!("cannot load task `{}`", cfg.name))
        })
        .collect::<Result<_>>()?;
    Ok((registry, tasks))
}

/// Hashes of each task's file and the data files it reads.
fn task_infos(tasks: &[Task]) -> Result<Vec<TaskInfo>> {
    tasks
        .iter()
        .map(|t| {
            let c = &t.config;
            let dir = c.file.parent().unwrap_or(Path::new("."));
            let bases = [Path::new("."), dir];
            // Data files, join files, and a Hub dataset's snapshot files in the cache.
            let paths = tasks::dataset::data_paths(c, &bases);
            Ok(TaskInfo {
                name: c.name.clone(),
                file: abs(&c.file),
                file_sha256: sha256_file(&c.file)?.0,
                data_files: paths
                    .iter()
                    .filter(|p| p.is_file())
                    .map(|p| {
                        let (sha256, bytes) = sha256_file(p)?;
                        Ok(FileHash {
                            path: abs(p),
                            sha256,
                            bytes,
                        })
                    })
                    .collect::<Result<_>>()?,
                documents: t.docs().len(),
                version: c.version.clone(),
            })
        })
        .collect()
}

/// What one variant (expert mask) of a run produced.
pub struct VariantResult {
    /// The columns every row of this variant carries (run, model, mask, retrieval).
    pub columns: RunColumns,
    pub results: Vec<TaskResult>,
    pub metrics: Vec<MetricRow>,
    /// Tokens routed to each expert per (task, layer) while this variant's requests were computed.
    routing: Vec<RoutingRow>,
}

/// A metric's row with its direction and aggregation: from the task file's `metric_list` for the
/// metrics it configures (group cells such as `acc[gender=male]` follow their metric), the metric's
/// defaults otherwise; derived metrics and group means have no per-sample aggregation.
fn metric_row(
    task: Option<&Task>,
    name: &str,
    metric: &str,
    agg: &tasks::metrics::Aggregate,
) -> MetricRow {
    let base = metric.split(['[', ',']).next().unwrap_or(metric);
    let spec = task.and_then(|t| t.config.metric_list.iter().find(|s| s.metric == base));
    MetricRow {
        task: name.to_string(),
        metric: metric.to_string(),
        aggregate: agg.clone(),
        higher_is_better: spec
            .and_then(|s| s.higher_is_better)
            .unwrap_or_else(|| tasks::metrics::higher_is_better(base)),
        aggregation: spec.map(|s| tasks::metrics::aggregation_of(&s.metric).to_string()),
    }
}

/// Where a run journals its answers, and where else answers may come from.
pub(crate) struct CacheDirs {
    /// The root of the journal the run writes (`<own>/<scope>/<writer>.jsonl`) and reads.
    pub own: PathBuf,
    /// Roots of journals answers are borrowed from: copied into the own journal when used.
    pub borrow: Vec<PathBuf>,
}

impl CacheDirs {
    /// A run's: the shared `OUTPUT/cache`, except for a shard, which journals into its own
    /// folder (`shard=I-of-N/journal/`, so the folder alone can be merged anywhere) and borrows
    /// from the shared cache.
    pub(crate) fn of_run(root: &Path, run_dir: &Path, sharded: bool) -> CacheDirs {
        if sharded {
            CacheDirs {
                own: run_dir.join(JOURNAL_DIR),
                borrow: vec![root.join("cache")],
            }
        } else {
            CacheDirs {
                own: root.join("cache"),
                borrow: Vec::new(),
            }
        }
    }
}

/// A shard folder's request journals.
pub(crate) const JOURNAL_DIR: &str = "journal";

/// Runs every task for every variant through the request cache. A variant without a model can
/// only answer from the cache (shard merging).
#[allow(clippy::too_many_arguments)]
pub(crate) fn execute(
    manifest: &mut Manifest,
    registry: &Registry,
    tasks: &[Task],
    models: &[Option<&dyn LanguageModel>],
    caches: &CacheDirs,
    writer: Option<&str>,
    shard: Option<Shard>,
    progress: &dyn Progress,
    engine: Option<&Model>,
) -> Result<Vec<VariantResult>> {
    let opts = RunOptions {
        batch_size: manifest.settings.batch_size,
        fewshot_seed: manifest.seeds.fewshot,
    };
    let mut out = Vec::new();
    manifest.timings.clear();
    for (v, lm) in manifest.variants.clone().iter().zip(models) {
        let mut cache =
            RequestCache::open(&caches.own.join(&v.cache_scope), &v.cache_scope, writer)?;
        for b in &caches.borrow {
            cache.borrow_from(&b.join(&v.cache_scope))?;
        }
        let cached_lm = CachedLm::new(*lm, cache);
        let mut results = Vec::with_capacity(tasks.len());
        let mut routing = Vec::new();
        for t in tasks {
            let start = Instant::now();
            let ev =
                tasks::runner::run(&cached_lm, std::slice::from_ref(t), &opts, shard, progress)
                    .with_context(|| format!("task `{}` ({})", t.name(), v.label))?;
            let seconds = start.elapsed().as_secs_f64();
            let (r, cached) = (ev.results, ev.cached);
            let computed = ev.requests - cached;
            let documents: usize = r.iter().map(|x| x.samples.len()).sum();
            manifest.timings.push(Timing {
                variant: v.label.clone(),
                task: t.name().to_string(),
                seconds,
                documents,
                requests: computed + cached,
                computed,
                cached,
                documents_per_second: documents as f64 / seconds.max(1e-9),
            });
            if let Some(model) = engine {
                // Each token is sent to min(top-k, allowed experts) experts, so the picks of a layer
                // divided by that count are the tokens the layer processed.
                let k = model
                    .config()
                    .num_experts_per_tok
                    .min(v.allowed.len())
                    .max(1) as f64;
                // The task's answers carry the tokens routed while computing them (answers from the
                // cache route nothing: zero rows).
                let cfg = model.config();
                let routed = if ev.routed.is_empty() {
                    vec![vec![0; cfg.num_experts]; cfg.num_hidden_layers]
                } else {
                    ev.routed
                };
                for (layer, counts) in routed.iter().enumerate() {
                    let processed = counts.iter().sum::<u64>() as f64 / k;
                    for (expert, &tokens) in counts.iter().enumerate() {
                        routing.push(RoutingRow {
                            run_id: manifest.run_id.clone(),
                            mask: v.label.clone(),
                            task: t.name().to_string(),
                            layer,
                            expert,
                            expert_name: manifest
                                .model
                                .expert_names
                                .get(expert)
                                .cloned()
                                .unwrap_or_else(|| expert.to_string()),
                            tokens,
                            share: if processed > 0.0 {
                                tokens as f64 / processed
                            } else {
                                0.0
                            },
                        });
                    }
                }
            }
            results.extend(r);
        }
        // CALM's exclusions are judged over a task and its partner, which ran separately.
        tasks::score::apply_joint_rules(tasks, &mut results);
        let mut metrics: Vec<MetricRow> = Vec::new();
        for r in &results {
            let task = tasks.iter().find(|t| t.name() == r.task);
            for (m, agg) in &r.metrics {
                metrics.push(metric_row(task, &r.task, m, agg));
            }
        }
        for (group, m, agg) in tasks::score::group_aggregates(registry, &results) {
            metrics.push(metric_row(None, &group, &m, &agg));
        }
        let names = |ix: &[usize]| -> String {
            ix.iter()
                .map(|&i| {
                    manifest
                        .model
                        .expert_names
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| i.to_string())
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        out.push(VariantResult {
            columns: RunColumns {
                run_id: manifest.run_id.clone(),
                model_id: manifest.model.id.clone(),
                weights_hash: manifest.model.weights_hash.clone(),
                mask: v.label.clone(),
                experts: names(&v.allowed),
                opted_out: v.opted_out.join(","),
                retrieval: manifest.settings.retrieval.clone(),
            },
            results,
            metrics,
            routing,
        });
    }
    Ok(out)
}

/// Writes samples, metrics and routing Parquet files (each atomically); the manifest still says
/// `running` until [`finish_run`].
pub(crate) fn write_tables(dir: &Path, vs: &[VariantResult]) -> Result<()> {
    let samples: Vec<(RunColumns, Vec<TaskResult>)> = vs
        .iter()
        .map(|v| (v.columns.clone(), v.results.clone()))
        .collect();
    let metrics: Vec<(RunColumns, Vec<MetricRow>)> = vs
        .iter()
        .map(|v| (v.columns.clone(), v.metrics.clone()))
        .collect();
    fault::point("eval.before-samples");
    tables::write_samples(&dir.join("samples.parquet"), &samples)?;
    fault::point("eval.after-samples");
    tables::write_metrics(&dir.join("metrics.parquet"), &metrics)?;
    let routing: Vec<RoutingRow> = vs.iter().flat_map(|v| v.routing.clone()).collect();
    tables::write_routing(&dir.join("routing.parquet"), &routing)?;
    Ok(())
}

/// Marks the run complete, ended at `end` (now by default). The manifest goes last: `complete`
/// means every file of the run is in place.
pub(crate) fn finish_run(dir: &Path, manifest: &mut Manifest, end: Option<String>) -> Result<()> {
    fault::point("eval.before-manifest");
    manifest.status = "complete".into();
    manifest.end_time = end.or_else(|| Some(utc_now()));
    manifest.write(&dir.join("manifest.json"))?;
    Ok(())
}

fn shard_label(s: Shard) -> String {
    format!("shard={}-of-{}", s.index, s.count)
}

/// A run id names one folder directly inside `--output`.
fn check_run_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id != "cache"
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ensure!(
        ok,
        "--run-id `{id}` cannot name a run folder inside --output: use ASCII letters, digits, `-`, `_` \
         and `.`, not starting with `.` (so no `..` or path separators), and not `cache` (the request \
         cache's folder)"
    );
    Ok(())
}

/// Takes the run directory's lock, or says which run is busy and where its holder's lock is.
pub(crate) fn lock_run(dir: &Path, run_id: &str) -> Result<durable::Lock> {
    let path = dir.join(RUN_LOCK);
    durable::Lock::try_acquire(&path)
        .with_context(|| format!("cannot lock {}", path.display()))?
        .with_context(|| {
            format!(
                "run `{run_id}` in {} is being written by another moeval process (it holds the lock {}); \
                 wait for it to finish, or use another --run-id",
                dir.display(),
                path.display()
            )
        })
}

/// Removes the temporary files a killed writer left in a run directory (`.NAME.PID.SEQ.tmp`, from
/// [`durable::write_atomic`]). Only called under the run's lock, so no live writer owns them.
fn remove_temporary_files(dir: &Path) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            std::fs::remove_file(e.path())
                .with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// The recorded dtype of a CPU run whose loading rounded wider weights to bf16 (`--dtype bf16`).
const ROUNDED_BF16: &str = "bf16-weights";

/// The precision a model's numbers have: f32 on the CPU (weights held as stored give f32's numbers
/// exactly), [`ROUNDED_BF16`] when loading rounded wider weights to bf16, bf16 on a GPU.
fn dtype(model: &Model) -> &'static str {
    match model.device() {
        engine::Device::Cpu if model.weights_rounded() => ROUNDED_BF16,
        engine::Device::Cpu => "f32",
        engine::Device::Cuda(_) => "bf16",
    }
}

/// Names the settings that differ between what a run recorded and what resuming it would use.
fn changed(recorded: &impl serde::Serialize, now: &impl serde::Serialize) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(recorded), serde_json::to_value(now))
    else {
        return vec!["settings".into()];
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| {
            let now = b.get(k).unwrap_or(&serde_json::Value::Null);
            format!("{k} (recorded {v}, now {now})")
        })
        .collect()
}

/// What a resumed run would compute differently from what it started with, if anything.
fn resume_conflicts(m: &Manifest, vars: &[Variant], tasks: &[TaskInfo]) -> Vec<String> {
    let mut out = Vec::new();
    let expert_sets = |v: &[Variant]| -> Vec<(String, Vec<usize>)> {
        v.iter()
            .map(|v| (v.label.clone(), v.allowed.clone()))
            .collect()
    };
    if expert_sets(&m.variants) != expert_sets(vars) {
        let labels = |v: &[Variant]| v.iter().map(|v| v.label.clone()).collect::<Vec<_>>();
        out.push(format!(
            "the experts (masks {:?}, now {:?}; did an owner's opt-out change?)",
            labels(&m.variants),
            labels(vars)
        ));
    }
    // Task files, data files (by content) and document counts.
    let ident = |t: &[TaskInfo]| -> Vec<(String, String, Vec<String>, usize)> {
        t.iter()
            .map(|t| {
                let data = t.data_files.iter().map(|f| f.sha256.clone()).collect();
                (t.name.clone(), t.file_sha256.clone(), data, t.documents)
            })
            .collect()
    };
    for (a, b) in ident(&m.tasks).iter().zip(ident(tasks).iter()) {
        if a != b {
            out.push(format!("the task file or data of `{}`", a.0));
        }
    }
    if m.tasks.len() != tasks.len() {
        out.push("the task list".into());
    }
    out
}

/// Everything a new run needs: what `moeval eval` takes on its command line.
#[derive(Clone, Debug)]
pub struct EvalSettings {
    /// Model directory (config.json, tokenizer.json, safetensors weights).
    pub model: PathBuf,
    /// Tasks, groups or tags.
    pub tasks: Vec<String>,
    /// Extra folders of task files, searched with the built-in suites.
    pub include_paths: Vec<PathBuf>,
    /// Only the first N documents of each task.
    pub limit: Option<usize>,
    /// Few-shot examples per prompt (overrides each task's `num_fewshot`).
    pub num_fewshot: Option<usize>,
    /// `--gen-kwargs`: `KEY=VALUE,..` updates of every generation task's `generation_kwargs`.
    pub gen_kwargs: Option<String>,
    /// CoBBLEr suites: (instruction, model pair) items to compare (0 = all).
    pub pairs: Option<usize>,
    /// Requests per model call (scores do not depend on it).
    pub batch_size: usize,
    /// Fills `{data_dir}` in task files' data paths.
    pub data_dir: PathBuf,
    /// Seed of the few-shot sampler.
    pub fewshot_seed: u64,
    /// Results go to OUTPUT/<run id>/; the request cache to OUTPUT/cache/.
    pub output: PathBuf,
    /// Name of the run folder (default: time and process id).
    pub run_id: Option<String>,
    /// Run only this shard into OUTPUT/<run id>/shard=I-of-N/ ([`crate::shards::choose_shard`]).
    pub shard: Option<Shard>,
    /// Where `shard` came from (`--shard`, `slurm`, `kubernetes`), for the manifest.
    pub shard_source: Option<String>,
    /// Also evaluate the model without each expert.
    pub sweep: Option<Sweep>,
    pub experts: Experts,
    pub retrieval: RetrievalSettings,
    pub device: engine::Device,
    /// How the CPU holds projection weights (`--dtype`).
    pub dtype: engine::WeightDtype,
}

/// A new run, or the continuation of an interrupted one from its folder (every setting then comes
/// from its manifest).
pub enum Start {
    New(Box<EvalSettings>),
    Resume {
        dir: PathBuf,
        device: engine::Device,
    },
}

/// What a finished run wrote and computed.
pub struct Outcome {
    pub run_dir: PathBuf,
    pub manifest: Manifest,
    pub variants: Vec<VariantResult>,
    /// Wall time of the requests' computation, in seconds.
    pub seconds: f64,
}

/// Runs (or resumes) an evaluation into its run directory; `hooks` runs the tasks' Python
/// `!function` code, `progress` sees each phase's requests.
pub fn evaluate(start: Start, hooks: &Hooks, progress: &dyn Progress) -> Result<Outcome> {
    // Settings, run directory and output root: from the command line, or from the manifest (under
    // the run's lock, so no other process is writing it).
    let mut lock = None;
    let resuming = matches!(start, Start::Resume { .. });
    let (mut manifest, run_dir, root, model_dir, sweep, retrieval_args, device, weights) =
        match start {
            Start::Resume { dir, device } => {
                let path = dir.join("manifest.json");
                let read = || {
                    Manifest::read(&path)
                        .with_context(|| format!("cannot resume {}", dir.display()))
                };
                lock = Some(lock_run(&dir, &read()?.run_id)?);
                let m = read()?;
                remove_temporary_files(&dir)?;
                if m.status == "complete" {
                    bail!(
                        "{}: run `{}` is already complete; nothing to resume",
                        path.display(),
                        m.run_id
                    );
                }
                let Some(scoring) = &m.settings.scoring else {
                    bail!(
                    "{}: run `{}` was started by a moeval that did not record its retrieval, window \
                     and device settings, so resuming could change its numbers; start a new run",
                    path.display(),
                    m.run_id
                );
                };
                if scoring.device != device.to_string() {
                    bail!(
                    "{}: run `{}` computes on {}, this process on {device}; resume it with --device {}",
                    path.display(),
                    m.run_id,
                    scoring.device,
                    scoring.device
                );
                }
                let retrieval_args = RetrievalSettings::from_scoring(scoring)
                    .with_context(|| format!("cannot resume {}", path.display()))?;
                let root = if m.settings.shard.is_some() {
                    dir.parent().and_then(Path::parent)
                } else {
                    dir.parent()
                }
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
                let sweep = match m.settings.opt_out_sweep.as_deref() {
                    Some("leave-one-out") => Some(Sweep::LeaveOneOut),
                    Some(o) => bail!("{}: unknown opt-out sweep `{o}`", path.display()),
                    None => None,
                };
                let model_dir = PathBuf::from(&m.model.dir);
                // Weights rounded to bf16 stay so; otherwise held as stored, which gives f32's numbers.
                let weights = if scoring.dtype == ROUNDED_BF16 {
                    engine::WeightDtype::Bf16
                } else {
                    engine::WeightDtype::Checkpoint
                };
                (
                    m,
                    dir.clone(),
                    root,
                    model_dir,
                    sweep,
                    retrieval_args,
                    device,
                    weights,
                )
            }
            Start::New(a) => {
                ensure!(a.batch_size > 0, "--batch-size must be at least 1");
                let output = a.output.clone();
                let model_dir = a.model.clone();
                let shard = a.shard;
                let run_id = a.run_id.clone().unwrap_or_else(default_run_id);
                check_run_id(&run_id)?;
                let mut dir = output.join(&run_id);
                if let Some(s) = shard {
                    dir = dir.join(shard_label(s));
                }
                // Checked again under the lock, before anything is written.
                if dir.join("manifest.json").exists() {
                    bail!(
                        "{} already holds a run; use --resume {} to finish it, or another --run-id",
                        dir.display(),
                        dir.display()
                    );
                }
                let settings = Settings {
                    tasks: a.tasks.clone(),
                    include_paths: a.include_paths.iter().map(|p| abs(p)).collect(),
                    data_dir: abs(&a.data_dir),
                    limit: a.limit,
                    num_fewshot: a.num_fewshot,
                    gen_kwargs: a.gen_kwargs.clone(),
                    pairs: a.pairs,
                    batch_size: a.batch_size,
                    opt_out: a.experts.opt_out.clone(),
                    experts: a.experts.experts.clone(),
                    opt_out_sweep: a.sweep.map(|_| "leave-one-out".to_string()),
                    shard: shard.map(|s| format!("{}/{}", s.index, s.count)),
                    shard_source: a.shard_source.clone().filter(|_| shard.is_some()),
                    retrieval: "none".into(),
                    scoring: None,
                };
                let m = Manifest {
                    manifest_version: MANIFEST_VERSION,
                    run_id,
                    status: "running".into(),
                    settings,
                    seeds: Seeds {
                        fewshot: a.fewshot_seed,
                        bootstrap: 1234,
                        generation: 1234,
                    },
                    start_time: utc_now(),
                    ..Manifest::default()
                };
                // The datastore by absolute path, so a resume from another folder finds the same one.
                let mut retrieval_args = a.retrieval.clone();
                retrieval_args.datastore =
                    retrieval_args.datastore.as_deref().map(|d| abs(d).into());
                (
                    m,
                    dir,
                    output,
                    model_dir,
                    a.sweep,
                    retrieval_args,
                    a.device,
                    a.dtype,
                )
            }
        };
    let shard = manifest
        .settings
        .shard
        .as_deref()
        .map(Shard::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (registry, tasks) = load_tasks(&manifest.settings, manifest.seeds.fewshot, hooks)?;
    let experts = Experts {
        opt_out: manifest.settings.opt_out.clone(),
        experts: manifest.settings.experts.clone(),
    };
    let model = crate::load_model(&model_dir, &experts, device, weights)?;
    let info = model_info(&model, &model_dir)?;
    if resuming && info.weights_hash != manifest.model.weights_hash {
        bail!(
            "the model in {} changed since run `{}` started (weights hash {} != {}); start a new run",
            model_dir.display(),
            manifest.run_id,
            info.weights_hash,
            manifest.model.weights_hash
        );
    }
    let restricted = !manifest.settings.experts.is_empty();
    let mut vars = variants(&model, &info, sweep, restricted)?;
    // Retrieval changes every answer: cache it apart, per datastore state and settings.
    let retrieval = Retrieval::open(&model, &retrieval_args)?;
    if let Some(r) = &retrieval {
        vars.iter_mut()
            .for_each(|(v, _)| v.cache_scope = r.cache_scope(&v.cache_scope));
    }
    let scoring = Scoring {
        max_length: model.config().max_position_embeddings,
        device: model.device().to_string(),
        dtype: dtype(&model).into(),
        ..retrieval_args.scoring(retrieval.as_ref())
    };
    let task_info = task_infos(&tasks)?;
    let variant_list: Vec<Variant> = vars.iter().map(|v| v.0.clone()).collect();
    if resuming {
        let mut problems = resume_conflicts(&manifest, &variant_list, &task_info);
        if let Some(recorded) = &manifest.settings.scoring {
            problems.extend(changed(recorded, &scoring));
        }
        if !problems.is_empty() {
            bail!(
                "cannot resume run `{}`: changed since it started: {}; start a new run",
                manifest.run_id,
                problems.join("; ")
            );
        }
    }
    manifest.settings.retrieval = retrieval
        .as_ref()
        .map_or_else(|| "none".to_string(), Retrieval::label);
    manifest.settings.scoring = Some(scoring);
    manifest.moeval_version = env!("CARGO_PKG_VERSION").to_string();
    manifest.git_revision = git_revision();
    manifest.model = info;
    manifest.variants = variant_list;
    manifest.tasks = task_info;
    manifest.device = device_label(&model);
    manifest.threads = rayon::current_num_threads();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let _lock = match lock {
        Some(l) => l,
        None => {
            let l = lock_run(&run_dir, &manifest.run_id)?;
            if run_dir.join("manifest.json").exists() {
                bail!(
                    "{} already holds a run (another process started it meanwhile); use --resume {} \
                     to finish it, or another --run-id",
                    run_dir.display(),
                    run_dir.display()
                );
            }
            l
        }
    };
    fault::point("eval.locked");
    manifest.write(&run_dir.join("manifest.json"))?;
    fault::point("eval.started");

    let lms: Vec<EngineLm> = vars
        .iter()
        .map(|(_, m)| Ok(EngineLm::new(&model)?.with_mask(m.clone())))
        .collect::<Result<_>>()?;
    let rlms = retrieval
        .as_ref()
        .map(|r| {
            vars.iter()
                .map(|(_, m)| r.lm(&model, m.clone()))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    let models: Vec<Option<&dyn LanguageModel>> = match &rlms {
        Some(r) => r.iter().map(|l| Some(l as &dyn LanguageModel)).collect(),
        None => lms.iter().map(|l| Some(l as &dyn LanguageModel)).collect(),
    };
    let writer = match shard {
        Some(s) => format!("{}.shard-{}-of-{}", manifest.run_id, s.index, s.count),
        None => manifest.run_id.clone(),
    };
    let start = Instant::now();
    let vs = execute(
        &mut manifest,
        &registry,
        &tasks,
        &models,
        &CacheDirs::of_run(&root, &run_dir, shard.is_some()),
        Some(&writer),
        shard,
        progress,
        Some(&model),
    )?;
    let elapsed = start.elapsed().as_secs_f64();
    write_tables(&run_dir, &vs)?;
    // Retrieval's records are part of the run: written before the manifest says `complete`.
    if let Some(r) = &retrieval {
        let labelled: Vec<(&str, &[TaskResult])> = manifest
            .variants
            .iter()
            .map(|v| v.label.as_str())
            .zip(vs.iter().map(|v| v.results.as_slice()))
            .collect();
        r.write_run_records(&run_dir, &labelled)?;
    }
    finish_run(&run_dir, &mut manifest, None)?;
    Ok(Outcome {
        run_dir,
        manifest,
        variants: vs,
        seconds: elapsed,
    })
}
