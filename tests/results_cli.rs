//! End to end: run directories (manifest + Parquet), crash-safe resume after kill -9, the request
//! cache across tasks, sharding and merging, report, compare and gate, on the default model
//! (tiny random FlexOlmo from `init-model` + the shipped tokenizer) and the default suite.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reports::results::{read_metrics, read_samples, SampleRow};
use reports::Manifest;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn moeval() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moeval"));
    c.args(["--threads", "2"]);
    c
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The default model: `init-model --preset tiny --seed 0` plus the committed tokenizer.
fn default_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny-default");
    ok(moeval()
        .args(["init-model", "--preset", "tiny", "--seed", "0", "--out"])
        .arg(&m)
        .output()
        .unwrap());
    std::fs::copy(
        Path::new(ROOT).join("assets/tokenizer.json"),
        m.join("tokenizer.json"),
    )
    .unwrap();
    m
}

fn eval(model: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = moeval();
    c.arg("eval")
        .arg("--model")
        .arg(model)
        .args(["--include-path", &format!("{ROOT}/assets/suite")])
        .args(["--include-path", &format!("{ROOT}/tests/data/results")])
        .arg("--output")
        .arg(out)
        .args(extra);
    c
}

/// Sample rows without the run id (which differs between the runs compared).
fn samples(dir: &Path) -> Vec<SampleRow> {
    let mut v = read_samples(&dir.join("samples.parquet")).unwrap();
    for s in &mut v {
        s.run_id.clear();
    }
    v
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// (computed, cached) from eval's summary line "... N requests computed, M from the cache; ...".
fn counts(o: &Output) -> (usize, usize) {
    let e = stderr(o);
    let words: Vec<&str> = e.split_whitespace().collect();
    let before = |w: &str| -> usize {
        let i = words
            .iter()
            .position(|x| x.trim_end_matches([',', ';']) == w)
            .unwrap_or_else(|| panic!("no `{w}` in: {e}"));
        words[i - 1].parse().unwrap_or_else(|_| panic!("{e}"))
    };
    let computed = words
        .iter()
        .position(|x| *x == "computed,")
        .map(|i| words[i - 2].parse().unwrap())
        .unwrap_or_else(|| panic!("{e}"));
    (computed, before("from"))
}

#[test]
fn run_directory_report_compare_and_gate() {
    let tmp = tempfile::tempdir().unwrap();
    let model = default_model(tmp.path());
    let out = tmp.path().join("runs");
    let o = ok(eval(
        &model,
        &out,
        &[
            "--tasks",
            "default",
            "--limit",
            "24",
            "--opt-out-sweep",
            "leave-one-out",
            "--run-id",
            "sweep",
        ],
    )
    .output()
    .unwrap());
    let run = out.join("sweep");
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "manifest.json",
            "metrics.parquet",
            "routing.parquet",
            "run.lock",
            "samples.parquet"
        ],
        "no temporary files"
    );

    let m = Manifest::read(&run.join("manifest.json")).unwrap();
    assert_eq!(m.status, "complete");
    assert_eq!(m.model.weights.len(), 1);
    assert_eq!(m.model.weights[0].sha256.len(), 64);
    assert!(m.model.tokenizer_sha256.is_some());
    let labels: Vec<&str> = m.variants.iter().map(|v| v.label.as_str()).collect();
    assert_eq!(
        labels,
        ["full", "-expert-0", "-expert-1", "-expert-2", "-expert-3"]
    );
    assert_eq!(m.variants[2].allowed, [0, 2, 3]);
    assert_eq!(m.tasks.len(), 3);
    assert!(m
        .tasks
        .iter()
        .all(|t| !t.data_files.is_empty() && t.file_sha256.len() == 64));
    assert_eq!(m.timings.len(), 15);
    assert!(m.end_time.is_some() && m.threads >= 1 && m.device.starts_with("cpu"));
    assert_eq!(m.settings.opt_out_sweep.as_deref(), Some("leave-one-out"));

    let s = samples(&run);
    // 24 + 24 + 12 documents per mask.
    assert_eq!(s.len(), 5 * 60);
    let first = &s[0];
    assert_eq!(
        (first.mask.as_str(), first.task.as_str()),
        ("full", "default_bias_sentiment_gender")
    );
    assert_eq!(first.weights_hash, m.model.weights_hash);
    assert_eq!(
        first.prompt_hash,
        reports::tables::prompt_hash(&first.prompt)
    );
    assert_eq!(first.choice_loglikelihoods.as_ref().unwrap().len(), 2);
    assert!(
        first.attributes.contains_key("gender") && first.attributes.contains_key("template_idx")
    );
    assert!(first.metrics.iter().any(|(k, _)| k == "acc"));
    // Opting an expert out changes the scores.
    let other = s
        .iter()
        .find(|x| x.mask == "-expert-1" && x.task == first.task && x.doc_id == 0)
        .unwrap();
    assert_ne!(other.choice_loglikelihoods, first.choice_loglikelihoods);
    let metrics = read_metrics(&run.join("metrics.parquet")).unwrap();
    let bias = metrics
        .iter()
        .find(|r| {
            r.mask == "-expert-2"
                && r.task == "default_bias_sentiment_race"
                && r.metric == "acc[race=asian]"
        })
        .unwrap();
    assert_eq!(bias.opted_out, "expert-2");
    assert_eq!(bias.experts, "expert-0,expert-1,expert-3");
    assert!(metrics
        .iter()
        .any(|r| r.task == "default" && r.metric == "acc"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("-expert-3"));

    // A second, plain run of the same model: its full mask comes from the cache entirely.
    let o = ok(eval(
        &model,
        &out,
        &["--tasks", "default", "--limit", "24", "--run-id", "plain"],
    )
    .output()
    .unwrap());
    assert_eq!(counts(&o).0, 0, "{}", stderr(&o));

    // Report.
    let rep = tmp.path().join("report");
    let o = ok(moeval()
        .args(["report", "--runs"])
        .arg(&out)
        .arg("--out")
        .arg(&rep)
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&o.stdout).contains("index.html"));
    let html = std::fs::read_to_string(rep.join("index.html")).unwrap();
    for needle in [
        "<svg",
        "Opt-out matrix",
        "Per-group accuracy",
        "Paired comparisons",
        "default_bias_sentiment_race",
        "class='sortable'",
        "race",
    ] {
        assert!(html.contains(needle), "index.html lacks {needle}");
    }
    // Self-contained: no external scripts, styles or images.
    assert!(!html.contains("<script src") && !html.contains("<link") && !html.contains("<img"));
    let md = std::fs::read_to_string(rep.join("summary.md")).unwrap();
    assert!(md.contains("| sweep | tiny-default | -expert-0 |"), "{md}");
    let lb = reports::results::read_parquet(&rep.join("leaderboard.parquet")).unwrap();
    assert!(lb.iter().map(|b| b.num_rows()).sum::<usize>() > 30);
    let part =
        rep.join("dataset/samples/run_id=sweep/mask=-expert-2/task=default_ppl/part-0.parquet");
    assert!(part.is_file(), "Hive layout");
    assert!(rep
        .join("dataset/metrics/run_id=plain/part-0.parquet")
        .is_file());

    // Compare two masks of the sweep run.
    let o = ok(moeval()
        .arg("compare")
        .arg(&run)
        .arg(&run)
        .args(["--mask-b", "-expert-0"])
        .output()
        .unwrap());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("mcnemar") && text.contains("bootstrap") && text.contains("default_ppl"),
        "{text}"
    );
    let o = moeval()
        .arg("compare")
        .arg(&run)
        .arg(&run)
        .args(["--mask-b", "nope"])
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("no mask `nope`"));

    // Gate: update writes a baseline the same runs pass; a worse baseline fails naming the metric.
    let baseline = tmp.path().join("baseline.json");
    ok(moeval()
        .args(["gate", "--update", "--baseline"])
        .arg(&baseline)
        .arg("--runs")
        .arg(&run)
        .output()
        .unwrap());
    let o = ok(moeval()
        .args(["gate", "--max-drop", "0", "--baseline"])
        .arg(&baseline)
        .arg("--runs")
        .arg(&run)
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&o.stdout).contains("gate passed"));
    let mut b = reports::gate::Baseline::read(&baseline).unwrap();
    let e = b
        .entries
        .iter_mut()
        .find(|e| {
            e.mask == "full" && e.task == "default_bias_sentiment_gender" && e.metric == "acc"
        })
        .unwrap();
    e.value += 0.5;
    b.write(&baseline).unwrap();
    let o = moeval()
        .args(["gate", "--baseline"])
        .arg(&baseline)
        .arg("--runs")
        .arg(&run)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("FAIL default_bias_sentiment_gender acc [full]"),
        "{text}"
    );
    assert_eq!(text.matches("FAIL").count(), 1, "{text}");
}

#[test]
fn resume_after_kill_computes_only_missing_requests_and_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let model = default_model(tmp.path());
    let args = [
        "--tasks",
        "default",
        "--limit",
        "40",
        "--batch-size",
        "8",
        "--run-id",
        "r",
    ];
    let whole = tmp.path().join("whole");
    let o = ok(eval(&model, &whole, &args).output().unwrap());
    let (total, _) = counts(&o);

    let killed = tmp.path().join("killed");
    // The test-only fault point dies (as under kill -9: no cleanup runs) right after the third
    // computed batch is journaled.
    let o = eval(&model, &killed, &args)
        .env(durable::fault::VAR, "eval.journaled@3")
        .output()
        .unwrap();
    assert!(!o.status.success(), "the run was not killed");
    let journal_dir = killed.join("cache");
    let lines = || -> usize {
        walk(&journal_dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .lines()
                    .count()
            })
            .sum()
    };
    assert!(lines() >= 3, "three batches journaled");
    let m = Manifest::read(&killed.join("r/manifest.json")).unwrap();
    assert_eq!(m.status, "running");
    assert!(!killed.join("r/samples.parquet").exists());
    // An incomplete run is refused by report, and a second eval with its id is refused too.
    let o = moeval()
        .args(["report", "--runs"])
        .arg(killed.join("r"))
        .arg("--out")
        .arg(tmp.path().join("rep"))
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("--resume"),
        "{}",
        stderr(&o)
    );
    let o = eval(&model, &killed, &args).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("--resume"));

    let done = lines();
    let o = ok(moeval()
        .arg("eval")
        .arg("--resume")
        .arg(killed.join("r"))
        .output()
        .unwrap());
    let (computed, cached) = counts(&o);
    assert!(
        computed > 0 && computed < total,
        "computed {computed} of {total}"
    );
    assert!(cached >= done, "cached {cached}, journaled {done}");
    assert_eq!(samples(&killed.join("r")), samples(&whole.join("r")));
    let a = read_metrics(&killed.join("r/metrics.parquet")).unwrap();
    let b = read_metrics(&whole.join("r/metrics.parquet")).unwrap();
    assert_eq!(a, b);
    let o = moeval()
        .arg("eval")
        .arg("--resume")
        .arg(killed.join("r"))
        .output()
        .unwrap();
    assert!(!o.status.success() && stderr(&o).contains("already complete"));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn cache_is_shared_across_tasks_and_shards_merge_to_the_unsharded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = default_model(tmp.path());
    let out = tmp.path().join("out");
    let o = ok(
        eval(&model, &out, &["--tasks", "default_ppl", "--run-id", "ppl"])
            .output()
            .unwrap(),
    );
    assert_eq!(counts(&o), (12, 0));
    // Another task with the same requests computes nothing.
    let o = ok(eval(
        &model,
        &out,
        &["--tasks", "ppl_bits_only", "--run-id", "bits"],
    )
    .output()
    .unwrap());
    assert_eq!(counts(&o), (0, 12));

    let args = [
        "--tasks",
        "default_bias_sentiment_race,default_ppl",
        "--limit",
        "30",
    ];
    let whole = tmp.path().join("whole");
    ok(
        eval(&model, &whole, &[&args[..], &["--run-id", "s"]].concat())
            .output()
            .unwrap(),
    );
    let sharded = tmp.path().join("sharded");
    for i in 0..3 {
        ok(eval(
            &model,
            &sharded,
            &[&args[..], &["--run-id", "s", "--shard", &format!("{i}/3")]].concat(),
        )
        .output()
        .unwrap());
    }
    let shard1 = samples(&sharded.join("s/shard=1-of-3"));
    assert!(shard1.iter().all(|s| s.doc_id % 3 == 1) && !shard1.is_empty());
    // Missing shards are named.
    let report = |runs: &Path| {
        moeval()
            .args(["report", "--runs"])
            .arg(runs)
            .arg("--out")
            .arg(tmp.path().join("rep"))
            .output()
            .unwrap()
    };
    std::fs::rename(sharded.join("s/shard=2-of-3"), tmp.path().join("aside")).unwrap();
    let o = report(&sharded.join("s"));
    assert!(
        !o.status.success() && stderr(&o).contains("shard 2/3 is missing"),
        "{}",
        stderr(&o)
    );
    std::fs::rename(tmp.path().join("aside"), sharded.join("s/shard=2-of-3")).unwrap();
    ok(report(&sharded.join("s")));
    assert_eq!(samples(&sharded.join("s")), samples(&whole.join("s")));
    assert_eq!(
        read_metrics(&sharded.join("s/metrics.parquet")).unwrap(),
        read_metrics(&whole.join("s/metrics.parquet")).unwrap()
    );
    let m = Manifest::read(&sharded.join("s/manifest.json")).unwrap();
    assert_eq!(m.merged_shards.len(), 3);
    assert_eq!(m.settings.shard, None);
}

/// Runs `command(i, folder)` for four "machines" `tmp/<prefix>0..3` at once; all must succeed.
/// Returns their folders.
fn on_four_nodes(
    tmp: &Path,
    prefix: &str,
    command: impl Fn(usize, &Path) -> Command,
) -> Vec<PathBuf> {
    let nodes: Vec<PathBuf> = (0..4).map(|i| tmp.join(format!("{prefix}{i}"))).collect();
    let procs: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| command(i, node).spawn().unwrap())
        .collect();
    for mut p in procs {
        assert!(p.wait().unwrap().success());
    }
    nodes
}

/// The shard folders of run `s` written under each of `roots` (one per "machine"), moved into
/// `dest/s/`; then each machine's folder, request cache included, is deleted.
fn gather_shards(roots: &[PathBuf], dest: &Path) {
    std::fs::create_dir_all(dest.join("s")).unwrap();
    for r in roots {
        for e in std::fs::read_dir(r.join("s")).unwrap() {
            let e = e.unwrap();
            std::fs::rename(e.path(), dest.join("s").join(e.file_name())).unwrap();
        }
        std::fs::remove_dir_all(r).unwrap();
    }
}

fn assert_same_run(merged: &Path, whole: &Path) {
    assert_eq!(samples(merged), samples(whole));
    assert_eq!(
        read_metrics(&merged.join("metrics.parquet")).unwrap(),
        read_metrics(&whole.join("metrics.parquet")).unwrap()
    );
    let m = Manifest::read(&merged.join("manifest.json")).unwrap();
    assert_eq!((m.status.as_str(), m.merged_shards.len()), ("complete", 4));
}

/// The shell script of the `name` Job's first container in deploy/k8s/eval-job.yaml, with its
/// environment.
fn k8s_container(name: &str) -> (String, Vec<(String, String)>) {
    let text = std::fs::read_to_string(format!("{ROOT}/deploy/k8s/eval-job.yaml")).unwrap();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v["metadata"]["name"] != name {
            continue;
        }
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        let env = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap().to_string();
                (s("name"), s("value"))
            })
            .collect();
        return (c["args"][0].as_str().unwrap().to_string(), env);
    }
    panic!("no Job `{name}` in deploy/k8s/eval-job.yaml");
}

#[test]
fn scheduler_shards_written_on_other_machines_merge_to_the_unsharded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = default_model(tmp.path());
    let tasks = "default_bias_sentiment_race,default_ppl";
    let extra = format!(
        "--include-path {ROOT}/assets/suite --include-path {ROOT}/tests/data/results --limit 30"
    );
    let whole = tmp.path().join("whole");
    ok(eval(
        &model,
        &whole,
        &["--tasks", tasks, "--limit", "30", "--run-id", "s"],
    )
    .output()
    .unwrap());
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_moeval")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    // Slurm: deploy/slurm/eval.sbatch as array tasks 1-4, four processes at once, each writing to
    // its own "node".
    let sbatch = format!("{ROOT}/deploy/slurm/eval.sbatch");
    let nodes = on_four_nodes(tmp.path(), "node", |i, node| {
        let mut c = Command::new("bash");
        c.arg(&sbatch)
            .env("PATH", &path)
            .env("SLURM_ARRAY_JOB_ID", "77")
            .env("SLURM_ARRAY_TASK_ID", (i + 1).to_string())
            .env("SLURM_ARRAY_TASK_MIN", "1")
            .env("SLURM_ARRAY_TASK_COUNT", "4")
            .env("MODEL", &model)
            .env("TASKS", tasks)
            .env("OUT", node)
            .env("RUN_ID", "s")
            .env("EVAL_ARGS", &extra);
        c
    });
    let shard = Manifest::read(&nodes[2].join("s/shard=2-of-4/manifest.json")).unwrap();
    assert_eq!(shard.settings.shard_source.as_deref(), Some("slurm"));
    assert!(nodes[2].join("s/shard=2-of-4/journal").is_dir());
    let slurm = tmp.path().join("slurm");
    gather_shards(&nodes, &slurm);
    // The script's merge mode (no array task id): `moeval report` over the gathered folders.
    ok(Command::new("bash")
        .arg(&sbatch)
        .env("PATH", &path)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env("OUT", &slurm)
        .env("RUN_ID", "s")
        .output()
        .unwrap());
    assert_same_run(&slurm.join("s"), &whole.join("s"));
    assert!(slurm.join("s-report").is_dir());

    // Kubernetes: the Indexed Job's container script with JOB_COMPLETION_INDEX 0..3.
    let (script, env) = k8s_container("moeval-eval");
    let nodes = on_four_nodes(tmp.path(), "pod", |i, node| {
        let script = script
            .replace("/results", &node.display().to_string())
            .replace("/models/flexolmo", &model.display().to_string());
        let mut c = Command::new("sh");
        c.args(["-c", &script]).env("PATH", &path);
        for (k, v) in &env {
            c.env(k, v);
        }
        c.env("JOB_COMPLETION_INDEX", i.to_string())
            .env("RUN_ID", "s")
            .env("TASKS", tasks)
            .env("THREADS", "1")
            .env("EVAL_ARGS", &extra);
        c
    });
    let shard = Manifest::read(&nodes[3].join("s/shard=3-of-4/manifest.json")).unwrap();
    assert_eq!(shard.settings.shard_source.as_deref(), Some("kubernetes"));
    let k8s = tmp.path().join("k8s");
    gather_shards(&nodes, &k8s);
    let (merge, _) = k8s_container("moeval-merge");
    ok(Command::new("sh")
        .args(["-c", &merge.replace("/results", &k8s.display().to_string())])
        .env("PATH", &path)
        .env("RUN_ID", "s")
        .output()
        .unwrap());
    assert_same_run(&k8s.join("s"), &whole.join("s"));

    // A --shard that disagrees with the scheduler is refused before anything is written.
    let o = eval(
        &model,
        &tmp.path().join("x"),
        &["--tasks", tasks, "--run-id", "x", "--shard", "0/4"],
    )
    .env("JOB_COMPLETION_INDEX", "1")
    .env("MOEVAL_SHARD_COUNT", "4")
    .output()
    .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("disagrees"),
        "{}",
        stderr(&o)
    );
    assert!(!tmp.path().join("x/x").exists());
}

/// `--dtype bf16` on an f32 checkpoint rounds its weights: the run says so (`bf16-weights`, and the
/// device line names what was held), and its answers are cached apart from the f32 ones.
#[test]
fn bf16_rounded_weights_are_recorded_and_cached_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let model = default_model(tmp.path());
    let out = tmp.path().join("out");
    let args = ["--tasks", "default_ppl", "--limit", "4"];
    ok(
        eval(&model, &out, &[&args[..], &["--run-id", "f32"]].concat())
            .output()
            .unwrap(),
    );
    let o = ok(
        eval(&model, &out, &[&args[..], &["--run-id", "bf16"]].concat())
            .args(["--dtype", "bf16"])
            .output()
            .unwrap(),
    );
    // Nothing from the f32 run's cache.
    assert_eq!(counts(&o).1, 0, "{}", stderr(&o));
    let m = Manifest::read(&out.join("bf16/manifest.json")).unwrap();
    assert_eq!(m.settings.scoring.unwrap().dtype, "bf16-weights");
    assert!(m.device.contains("weights held as bf16"), "{}", m.device);
    let f = Manifest::read(&out.join("f32/manifest.json")).unwrap();
    assert_eq!(f.settings.scoring.unwrap().dtype, "f32");
    assert!(f.device.contains("weights held as f32"), "{}", f.device);
    assert_ne!(samples(&out.join("bf16")), samples(&out.join("f32")));
}
