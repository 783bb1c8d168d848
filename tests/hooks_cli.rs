//! End-to-end: `moeval eval` on task files with Python `!function` hooks (tests/data/hooks), on the
//! tiny-flexolmo fixture. `hooks_tiny` has `process_docs`, which needs `datasets`: it runs with the
//! interpreter in `MOEVAL_LM_EVAL_PYTHON` (CI sets it) and is skipped, saying so, without it.

use std::path::Path;
use std::process::{Command, Output};

use tasks::dataset::{read, Format, Source};

fn fixture() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/tiny-flexolmo"
    ))
}

fn eval(out: &Path, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["--threads", "2", "eval", "--model"])
        .arg(fixture())
        .args([
            "--include-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/hooks"),
            "--include-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tasks"),
            "--run-id",
            "r1",
        ])
        .arg("--output")
        .arg(out)
        .args(extra)
        .env_remove("MOEVAL_PYTHON")
        .envs(env.iter().copied())
        .output()
        .expect("moeval runs")
}

fn samples(run: &Path) -> Vec<tasks::dataset::Doc> {
    read(
        &Source::parse(run.join("samples.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn function_fields_run_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = eval(
        dir.path(),
        &["--tasks", "hooks_text", "--python", "python3"],
        &[],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("hooks_text") && stdout.contains("acc"),
        "{stdout}"
    );
    // A hook's print goes to stderr; the cost line names the interpreter.
    assert!(!stdout.contains("hooks may print") && stderr.contains("hooks may print"));
    assert!(
        stderr.contains("Python hooks (python3): 2 calls over 12 items"),
        "{stderr}"
    );
    let rows = samples(&dir.path().join("r1"));
    let targets: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["blue", "hot", "four", "wet", "white", "east"]);
}

#[test]
fn process_docs_runs_through_the_cli() {
    let Some(python) = std::env::var_os("MOEVAL_LM_EVAL_PYTHON") else {
        eprintln!("skipped: set MOEVAL_LM_EVAL_PYTHON to a Python with `datasets` (CI does)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The interpreter comes from MOEVAL_PYTHON this time.
    let out = eval(
        dir.path(),
        &["--tasks", "hooks_tiny"],
        &[("MOEVAL_PYTHON", &python)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = samples(&dir.path().join("r1"));
    // process_docs dropped one of six rows; targets are the hooks' gold choices.
    let targets: Vec<&str> = rows.iter().map(|r| r["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["blue", "hot", "wet", "white", "east"]);
    let manifest = std::fs::read_to_string(dir.path().join("r1/manifest.json")).unwrap();
    assert!(manifest.contains("\"complete\""));
}

#[test]
fn a_raising_hook_fails_the_run_with_its_traceback_and_writes_no_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = eval(
        dir.path(),
        &["--tasks", "hooks_raise", "--python", "python3"],
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for want in [
        "task `hooks_raise`",
        "utils.raises",
        "doc 3",
        "Traceback (most recent call last)",
        "ValueError: no text for water questions",
    ] {
        assert!(stderr.contains(want), "`{want}` missing from: {stderr}");
    }
    let run = dir.path().join("r1");
    assert!(!run.join("metrics.parquet").exists() && !run.join("samples.parquet").exists());
    if let Ok(m) = std::fs::read_to_string(run.join("manifest.json")) {
        assert!(!m.contains("\"complete\""), "{m}");
    }
}

#[test]
fn a_missing_interpreter_matters_only_to_tasks_with_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = std::ffi::OsStr::new("/nonexistent/python");
    let out = eval(
        dir.path(),
        &["--tasks", "mc_tiny"],
        &[("MOEVAL_PYTHON", nowhere)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let out = eval(
        dir.path(),
        &["--tasks", "hooks_text"],
        &[("MOEVAL_PYTHON", nowhere)],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/python")
            && stderr.contains("chosen by MOEVAL_PYTHON")
            && stderr.contains("--python"),
        "{stderr}"
    );
}
