//! Fault injection for `moeval eval`: the process is killed (the test-only `MOEVAL_TEST_FAULT` point
//! aborts it, as kill -9 would) at each of its durable steps, and `--resume` must then give exactly
//! the results of an uninterrupted run; runs are never left half-written without saying so. Also:
//! one writer per run directory, run ids that stay inside `--output`, settings that `--resume`
//! reproduces or refuses to change, and reports that do not skip broken runs silently.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reports::results::{read_metrics, read_samples};
use reports::Manifest;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture() -> PathBuf {
    Path::new(ROOT).join("../shared/fixtures/tiny-flexolmo")
}

fn moeval() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moeval"));
    c.args(["--threads", "2"]);
    c
}

/// `moeval eval` of the fixture on the tiny test tasks into `out`, small batches so a run has many.
fn eval(out: &Path, extra: &[&str]) -> Command {
    let mut c = moeval();
    c.arg("eval")
        .arg("--model")
        .arg(fixture())
        .args(["--include-path", &format!("{ROOT}/tests/data/tasks")])
        .args(["--include-path", &format!("{ROOT}/tests/data/datastore")])
        .args(["--batch-size", "2"])
        .arg("--output")
        .arg(out)
        .args(extra);
    c
}

fn resume(run: &Path) -> Command {
    let mut c = moeval();
    c.arg("eval").arg("--resume").arg(run);
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    o
}

fn fails(o: Output, needles: &[&str]) -> String {
    let e = stderr(&o);
    assert!(!o.status.success(), "should fail: {e}");
    for n in needles {
        assert!(e.contains(n), "no `{n}` in: {e}");
    }
    e
}

/// Runs `c` with the fault point `point` armed and checks that it died there.
fn killed_at(c: &mut Command, point: &str) {
    let o = c.env(durable::fault::VAR, point).output().unwrap();
    let name = point.split('@').next().unwrap();
    fails(o, &[&format!("fault point {name} reached")]);
}

/// Requests computed by a run, from eval's summary line "... N requests computed, ...".
fn computed(o: &Output) -> usize {
    let e = stderr(o);
    let i = e
        .find(" requests computed")
        .unwrap_or_else(|| panic!("no summary in: {e}"));
    e[..i].rsplit(' ').next().unwrap().parse().unwrap()
}

/// Asserts two run directories hold the same samples and metrics (and are complete).
fn same_results(a: &Path, b: &Path) {
    for d in [a, b] {
        let m = Manifest::read(&d.join("manifest.json")).unwrap();
        assert_eq!(m.status, "complete", "{}", d.display());
    }
    assert_eq!(
        read_samples(&a.join("samples.parquet")).unwrap(),
        read_samples(&b.join("samples.parquet")).unwrap()
    );
    assert_eq!(
        read_metrics(&a.join("metrics.parquet")).unwrap(),
        read_metrics(&b.join("metrics.parquet")).unwrap()
    );
}

/// Files of a run directory that are neither results nor the lock: temporary files left behind.
fn strays(run: &Path) -> Vec<String> {
    std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn eval_killed_at_each_step_resumes_to_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--tasks", "mc_tiny,ppl_tiny", "--run-id", "r"];
    let whole = tmp.path().join("whole");
    let o = ok(eval(&whole, &args).output().unwrap());
    let total = computed(&o);
    // Killed after taking the run's lock, before its manifest: nothing was started, so running the
    // same command again completes it.
    let out = tmp.path().join("locked");
    killed_at(&mut eval(&out, &args), "eval.locked");
    assert!(!out.join("r/manifest.json").exists());
    ok(eval(&out, &args).output().unwrap());
    same_results(&out.join("r"), &whole.join("r"));
    // After the manifest is first written; after the 1st, 5th journaled batch; half-way through
    // appending the 3rd batch (a torn journal line); before and between the Parquet files; before
    // the final manifest.
    for point in [
        "eval.started",
        "eval.journaled@1",
        "eval.journaled@5",
        "eval.journal-torn@3",
        "eval.before-samples",
        "eval.after-samples",
        "eval.before-manifest",
    ] {
        let out = tmp.path().join(point.replace(['.', '@'], "-"));
        let run = out.join("r");
        killed_at(&mut eval(&out, &args), point);
        // Never a silent half-state: the run says it is unfinished, report refuses it, and a new
        // eval with its id points to --resume.
        assert_eq!(
            Manifest::read(&run.join("manifest.json")).unwrap().status,
            "running",
            "{point}"
        );
        let rep = moeval()
            .args(["report", "--runs"])
            .arg(&run)
            .arg("--out")
            .arg(out.join("report"))
            .output()
            .unwrap();
        fails(rep, &["is running", "--resume"]);
        fails(eval(&out, &args).output().unwrap(), &["--resume"]);
        // What a writer killed in the middle of a file leaves behind; resume clears it.
        std::fs::write(run.join(".metrics.parquet.999.0.tmp"), b"half a file").unwrap();

        let o = ok(resume(&run).output().unwrap());
        let redone = computed(&o);
        match point {
            "eval.started" => assert_eq!(redone, total, "{point}"),
            "eval.before-samples" | "eval.after-samples" | "eval.before-manifest" => {
                assert_eq!(redone, 0, "{point}: every answer was journaled")
            }
            _ => assert!(0 < redone && redone < total, "{point}: {redone} of {total}"),
        }
        same_results(&run, &whole.join("r"));
        assert!(strays(&run).is_empty(), "{point}: {:?}", strays(&run));
    }
}

/// Builds a kNN-LM store of `corpus` (from tests/data/datastore) with the fixture's hidden states.
fn knn_store(corpus: &str, out: &Path) {
    ok(moeval()
        .args(["datastore", "build", "--input"])
        .arg(Path::new(ROOT).join("tests/data/datastore").join(corpus))
        .arg("--tokenizer")
        .arg(fixture())
        .arg("--out")
        .arg(out)
        .args(["--block", "128", "--stride", "64", "--knn", "--model"])
        .arg(fixture())
        .output()
        .unwrap());
}

#[test]
fn resume_reproduces_retrieval_and_window_settings_or_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    knn_store("canary_corpus.jsonl", &store);
    let settings = [
        "--tasks",
        "ppl_tiny,mc_tiny",
        "--opt-out",
        "1",
        "--retrieval",
        "knn",
        "--datastore",
        store.to_str().unwrap(),
        "--k",
        "16",
        "--lambda",
        "0.3",
        "--ppl-window",
        "16",
        "--ppl-stride",
        "8",
    ];
    let args = [&settings[..], &["--run-id", "knn"]].concat();
    let whole = tmp.path().join("whole");
    ok(eval(&whole, &args).output().unwrap());
    ok(eval(
        &whole,
        &[
            "--tasks",
            "ppl_tiny,mc_tiny",
            "--opt-out",
            "1",
            "--run-id",
            "plain",
        ],
    )
    .output()
    .unwrap());

    // The rows say what ran: the expert left out, the retrieval settings and the datastore.
    let rows = read_samples(&whole.join("knn/samples.parquet")).unwrap();
    let metrics = read_metrics(&whole.join("knn/metrics.parquet")).unwrap();
    let m = Manifest::read(&whole.join("knn/manifest.json")).unwrap();
    let retrieval = &metrics[0].retrieval;
    assert!(
        retrieval.starts_with("knn:k=16,lambda=0.3,temperature=10,datastore=store@")
            && retrieval.ends_with(";ppl_window=16,ppl_stride=8"),
        "{retrieval}"
    );
    assert!(rows.iter().all(|r| r.mask == "-expert-1"));
    assert!(metrics.iter().all(|r| &r.retrieval == retrieval));
    assert_eq!(&m.settings.retrieval, retrieval);
    let scoring = m.settings.scoring.as_ref().unwrap();
    assert_eq!(scoring.retrieval_mode.as_deref(), Some("knn"));
    assert_eq!(
        (scoring.ppl_window, scoring.ppl_stride),
        (Some(16), Some(8))
    );
    assert_eq!(
        (scoring.device.as_str(), scoring.dtype.as_str()),
        ("cpu", "f32")
    );
    let plain = read_metrics(&whole.join("plain/metrics.parquet")).unwrap();
    assert!(plain
        .iter()
        .all(|r| r.retrieval == "none" && r.mask == "-expert-1"));
    assert_ne!(
        read_samples(&whole.join("plain/samples.parquet")).unwrap()[0].loglikelihood,
        rows[0].loglikelihood,
        "retrieval changes the numbers"
    );
    // Rows of the same task and mask with and without retrieval are told apart by the gate.
    let baseline = tmp.path().join("baseline.json");
    let gate = |extra: &[&str]| {
        moeval()
            .args(["gate", "--baseline"])
            .arg(&baseline)
            .arg("--runs")
            .arg(&whole)
            .args(extra)
            .output()
            .unwrap()
    };
    ok(gate(&["--update"]));
    assert!(ok(gate(&[])).stdout.starts_with(b"gate passed"));

    // Killed and resumed with nothing on the command line but --resume: the same numbers, so the
    // retrieval and window settings came back from the manifest.
    let out = tmp.path().join("killed");
    killed_at(&mut eval(&out, &args), "eval.journaled@2");
    ok(resume(&out.join("knn")).output().unwrap());
    same_results(&out.join("knn"), &whole.join("knn"));

    // Options that would change a resumed run's numbers are refused, not ignored.
    let out = tmp.path().join("killed2");
    killed_at(&mut eval(&out, &args), "eval.journaled@1");
    let run = out.join("knn");
    for extra in [
        &["--lambda", "0.5"][..],
        &["--ppl-window", "8", "--ppl-stride", "8"],
        &["--opt-out", "2"],
        &["--batch-size", "4"],
    ] {
        let o = resume(&run).args(extra).output().unwrap();
        fails(o, &["cannot be used with", extra[0]]);
    }
    // A datastore that changed since the run started is refused, naming what changed.
    std::fs::rename(&store, tmp.path().join("old-store")).unwrap();
    knn_store("corpus.jsonl", &store);
    fails(
        resume(&run).output().unwrap(),
        &[
            "cannot resume run `knn`",
            "datastore_identity",
            "start a new run",
        ],
    );
    assert_eq!(
        Manifest::read(&run.join("manifest.json")).unwrap().status,
        "running"
    );
    // A run started on another device (GPU answers are bf16) is refused on this one, and a run whose
    // manifest does not record these settings cannot be resumed at all.
    let path = run.join("manifest.json");
    let mut m = Manifest::read(&path).unwrap();
    m.settings.scoring.as_mut().unwrap().device = "cuda:0".into();
    m.write(&path).unwrap();
    fails(
        resume(&run).output().unwrap(),
        &["computes on cuda:0, this process on cpu", "--device cuda:0"],
    );
    m.settings.scoring = None;
    m.write(&path).unwrap();
    fails(
        resume(&run).output().unwrap(),
        &["did not record its retrieval", "start a new run"],
    );
}

#[test]
fn one_writer_per_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = ["--tasks", "mc_tiny,ppl_tiny", "--run-id", "r"];
    // Another process holds the run's lock: a second eval is refused, naming the run and the lock,
    // and writes nothing.
    std::fs::create_dir_all(out.join("r")).unwrap();
    let lock_file = out.join("r").join("run.lock");
    let held = durable::Lock::acquire(&lock_file).unwrap();
    let e = fails(
        eval(&out, &args).output().unwrap(),
        &["run `r`", "another moeval process"],
    );
    assert!(e.contains(lock_file.to_str().unwrap()), "{e}");
    assert!(!out.join("r/manifest.json").exists());
    drop(held);

    // Two evals with one run id at once: exactly one writes the run, the other is refused.
    let spawn = || {
        eval(&out, &args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(
        [a.status.success(), b.status.success()]
            .iter()
            .filter(|s| **s)
            .count(),
        1,
        "a: {}\nb: {}",
        stderr(&a),
        stderr(&b)
    );
    let loser = if a.status.success() { &b } else { &a };
    let e = stderr(loser);
    assert!(
        e.contains("another moeval process") || e.contains("already holds a run"),
        "{e}"
    );
    let reference = tmp.path().join("reference");
    ok(eval(&reference, &args).output().unwrap());
    same_results(&out.join("r"), &reference.join("r"));

    // A resume is refused while another process holds the run (a fresh output folder, so the
    // requests are not cached yet and the run is killed half-way).
    let out = tmp.path().join("out2");
    killed_at(
        &mut eval(&out, &["--tasks", "mc_tiny", "--run-id", "k"]),
        "eval.journaled@1",
    );
    let held = durable::Lock::acquire(&out.join("k/run.lock")).unwrap();
    fails(
        resume(&out.join("k")).output().unwrap(),
        &["run `k`", "another moeval process"],
    );
    drop(held);
    ok(resume(&out.join("k")).output().unwrap());
}

#[test]
fn run_ids_stay_inside_the_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a/out");
    std::fs::create_dir_all(&out).unwrap();
    for id in [
        "../x", "..", ".", "a/b", "/abs", "..\\x", ".hidden", "cache", "",
    ] {
        fails(
            eval(&out, &["--tasks", "mc_tiny", "--run-id", id])
                .output()
                .unwrap(),
            &["cannot name a run folder inside --output"],
        );
    }
    // Nothing was written anywhere.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(tmp.path().join("a")).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn report_refuses_unreadable_runs_unless_told_to_skip() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    for id in ["good", "corrupt"] {
        ok(eval(&out, &["--tasks", "mc_tiny", "--run-id", id])
            .output()
            .unwrap());
    }
    std::fs::write(out.join("corrupt/metrics.parquet"), b"not parquet").unwrap();
    let report = |extra: &[&str]| {
        moeval()
            .args(["report", "--runs"])
            .arg(&out)
            .arg("--out")
            .arg(tmp.path().join("report"))
            .args(extra)
            .output()
            .unwrap()
    };
    let e = fails(report(&[]), &["1 run(s) cannot be read", "--skip-bad-runs"]);
    assert!(
        e.contains("corrupt") && e.contains("metrics.parquet"),
        "{e}"
    );
    assert!(!tmp.path().join("report/leaderboard.parquet").exists());
    let o = ok(report(&["--skip-bad-runs"]));
    assert!(stderr(&o).contains("warning: skipping"), "{}", stderr(&o));
    assert!(tmp.path().join("report/leaderboard.parquet").exists());
    // The gate never skips: a broken run would only look like missing metrics.
    let o = moeval()
        .args(["gate", "--update", "--baseline"])
        .arg(tmp.path().join("b.json"))
        .arg("--runs")
        .arg(&out)
        .output()
        .unwrap();
    fails(o, &["cannot be read"]);
}
