//! End-to-end: `moeval datastore` and retrieval-augmented `moeval eval` on the tiny-flexolmo fixture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tasks::dataset::{read, Format, Source};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn fixture() -> PathBuf {
    Path::new(ROOT).join("../shared/fixtures/tiny-flexolmo")
}

fn data(name: &str) -> PathBuf {
    Path::new(ROOT).join("tests/data/datastore").join(name)
}

fn moeval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["--threads", "2"])
        .args(args)
        .output()
        .expect("moeval runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Builds a store of `input` with 128-token blocks every 64 tokens (the fixture's context is 256).
fn build(input: &str, out: &Path, extra: &[&str]) -> Output {
    let (i, t, o) = (data(input), fixture(), out.to_path_buf());
    let mut args = vec!["datastore", "build", "--input", s(&i)];
    args.extend([
        "--tokenizer",
        s(&t),
        "--out",
        s(&o),
        "--block",
        "128",
        "--stride",
        "64",
    ]);
    args.extend(extra);
    moeval(&args)
}

fn rows(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    read(&Source::parse(s(path), &[]), Format::Parquet).unwrap()
}

#[test]
fn build_stats_query_and_opt_out() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let out = build("corpus.jsonl", &store, &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    // Malformed rows are reported with file and line, and counted.
    assert!(
        err.contains("corpus.jsonl:13: missing field `text`"),
        "{err}"
    );
    assert!(
        err.contains("corpus.jsonl:14: field `text` is a number"),
        "{err}"
    );
    assert!(err.contains("2 malformed rows skipped"), "{err}");

    let stats = ok(&moeval(&["datastore", "stats", s(&store)]));
    assert!(
        stats.contains("alpine_club") && stats.contains("proprietary"),
        "{stats}"
    );

    let q = ok(&moeval(&[
        "datastore",
        "query",
        s(&store),
        "--text",
        "glacier avalanche on the ridge",
        "--k",
        "3",
    ]));
    assert!(q.contains("owner=alpine_club"), "{q}");

    let o = ok(&moeval(&[
        "datastore",
        "opt-out",
        s(&store),
        "--owner",
        "alpine_club",
        "--reason",
        "withdrawn",
    ]));
    assert!(o.contains("segments merged"), "{o}");
    let q = ok(&moeval(&[
        "datastore",
        "query",
        s(&store),
        "--text",
        "glacier avalanche on the ridge",
        "--k",
        "50",
        "--json",
    ]));
    assert!(!q.contains("alpine_club"), "{q}");
    let st: serde_json::Value =
        serde_json::from_str(&ok(&moeval(&["datastore", "stats", s(&store), "--json"]))).unwrap();
    assert_eq!(st["excluded_owners"][0], "alpine_club");
    assert!(st["stats"]["owners"].get("alpine_club").is_none());
    let audit = std::fs::read_to_string(store.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"reason\":\"withdrawn\""), "{audit}");

    // --strict stops at the first malformed row, naming file and line.
    let strict = build("corpus.jsonl", &tmp.path().join("strict"), &["--strict"]);
    assert!(!strict.status.success());
    let err = String::from_utf8_lossy(&strict.stderr);
    assert!(
        err.contains("corpus.jsonl:13: missing field `text`"),
        "{err}"
    );
}

fn eval(out: &Path, run: &str, task: &str, extra: &[&str]) -> Output {
    let (f, inc, tasks_inc) = (
        fixture(),
        data(""),
        Path::new(ROOT).join("tests/data/tasks"),
    );
    let mut args = vec![
        "eval",
        "--model",
        s(&f),
        "--include-path",
        s(&inc),
        "--include-path",
        s(&tasks_inc),
    ];
    args.extend(["--tasks", task, "--output", s(out), "--run-id", run]);
    args.extend(["--ppl-window", "128", "--ppl-stride", "64"]);
    args.extend(extra);
    moeval(&args)
}

/// Summed log-likelihood of each perplexity sample of a run.
fn loglik(run: &Path) -> Vec<f64> {
    rows(&run.join("samples.parquet"))
        .iter()
        .filter(|r| r["task"].as_str().is_some_and(|t| t.ends_with("_ppl")))
        .map(|r| r["loglikelihood"].as_f64().unwrap())
        .collect()
}

#[test]
fn ric_lm_eval_records_attribution_and_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    ok(&build("corpus.jsonl", &store, &[]));
    let out = tmp.path().join("runs");
    // Log-likelihood, rolling perplexity and generation tasks all run with RIC-LM.
    let r = eval(
        &out,
        "ric",
        "river_ppl,mc_tiny,gen_tiny",
        &["--retrieval", "ric", "--datastore", s(&store), "--k", "1"],
    );
    ok(&r);
    let plain = eval(&out, "plain", "river_ppl", &[]);
    ok(&plain);
    let run = out.join("ric");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("retrieval.json")).unwrap()).unwrap();
    let manifest = std::fs::read(store.join("manifest.json")).unwrap();
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(&manifest)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(info["datastore_identity"], hash);
    assert_eq!(info["mode"], "ric");
    // Every river document retrieves river blocks; the weight of one block per window is 1.
    let att = rows(&run.join("attribution.parquet"));
    assert!(att.iter().any(|r| r["owner"] == "river_trust"), "{att:?}");
    assert!(att.iter().all(|r| r["weight"].as_f64().unwrap() > 0.0));
    let units = rows(&run.join("attribution_units.parquet"));
    assert!(
        units.iter().all(|r| r["unit"].as_i64().unwrap() >= 1),
        "the first window has no context to retrieve with"
    );
    // Retrieved text changes the scores (it is context), but retrieved tokens are not scored: the
    // rolling log-likelihood still covers exactly the document's tokens, so it stays comparable.
    let (ric, base) = (loglik(&run), loglik(&out.join("plain")));
    assert_ne!(ric, base);
    assert_eq!(ric.len(), base.len());
}

#[test]
fn knn_canary_reverts_to_parametric_after_opt_out() {
    knn_canary("exact");
}

/// The canary through the approximate index: opt-out rebuilds its graphs without the owner's keys,
/// and the store then searches as one built without them.
#[test]
fn knn_canary_reverts_to_parametric_after_opt_out_with_an_approximate_index() {
    knn_canary("hnsw");
}

fn knn_canary(index: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let f = fixture();
    ok(&build(
        "canary_corpus.jsonl",
        &store,
        &["--knn", "--model", s(&f), "--knn-index", index],
    ));
    let out = tmp.path().join("runs");
    let knn = [
        "--retrieval",
        "knn",
        "--datastore",
        s(&store),
        "--k",
        "16",
        "--temperature",
        "1",
        "--lambda",
        "0.3",
    ];
    let ppl = |run: &str| -> f64 {
        let rows = rows(&out.join(run).join("metrics.parquet"));
        rows.iter()
            .find(|r| r["metric"] == "byte_perplexity" && r["task"] == "canary_ppl")
            .and_then(|r| r["value"].as_f64())
            .unwrap()
    };
    ok(&eval(&out, "parametric", "canary_ppl", &[]));
    ok(&eval(&out, "with_x", "canary_ppl,canary_gen", &knn));
    let search = |run: &str| -> String {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(run).join("retrieval.json")).unwrap())
                .unwrap();
        info["search"].as_str().unwrap().to_string()
    };
    assert!(search("with_x").starts_with(index), "{}", search("with_x"));
    // kNN-LM generation decodes through the engine's decoder; every generated token's neighbours
    // are attributed, units counting the tokens.
    let gen_owners = |run: &str| -> Vec<(String, i64)> {
        rows(&out.join(run).join("attribution_units.parquet"))
            .iter()
            .filter(|r| r["task"] == "canary_gen")
            .map(|r| {
                (
                    r["owner"].as_str().unwrap().to_string(),
                    r["unit"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let with_x = gen_owners("with_x");
    assert!(with_x.iter().any(|(o, _)| o == "owner_x"), "{with_x:?}");
    assert!(
        with_x.iter().all(|&(_, u)| (0..7).contains(&u)),
        "{with_x:?}"
    );
    assert!(
        ppl("with_x") < ppl("parametric") / 5.0,
        "{} vs {}",
        ppl("with_x"),
        ppl("parametric")
    );

    // Owner X leaves: the store equals one built without X (same neighbours, same perplexity).
    ok(&moeval(&[
        "datastore",
        "opt-out",
        s(&store),
        "--owner",
        "owner_x",
        "--reason",
        "canary",
    ]));
    ok(&eval(&out, "without_x", "canary_ppl,canary_gen", &knn));
    let without_x = gen_owners("without_x");
    assert!(
        without_x.iter().all(|(o, _)| o != "owner_x"),
        "an opted-out owner fed generation: {without_x:?}"
    );
    let reference = tmp.path().join("reference");
    let only_y = tmp.path().join("only_y.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(data("canary_corpus.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.contains("owner_x"))
        .map(String::from)
        .collect();
    std::fs::write(&only_y, lines.join("\n") + "\n").unwrap();
    let (t, r) = (fixture(), reference.clone());
    ok(&moeval(&[
        "datastore",
        "build",
        "--input",
        s(&only_y),
        "--tokenizer",
        s(&t),
        "--out",
        s(&r),
        "--block",
        "128",
        "--stride",
        "64",
        "--knn",
        "--model",
        s(&f),
        "--knn-index",
        index,
    ]));
    let knn_ref = [
        "--retrieval",
        "knn",
        "--datastore",
        s(&reference),
        "--k",
        "16",
        "--temperature",
        "1",
        "--lambda",
        "0.3",
    ];
    ok(&eval(&out, "reference", "canary_ppl", &knn_ref));
    assert_eq!(
        loglik(&out.join("without_x")),
        loglik(&out.join("reference"))
    );
    assert!(ppl("without_x") > ppl("parametric") / 2.0);
    let att = rows(&out.join("without_x").join("attribution.parquet"));
    assert!(att.iter().all(|r| r["owner"] != "owner_x"));
    let att = rows(&out.join("with_x").join("attribution.parquet"));
    assert!(att.iter().any(|r| r["owner"] == "owner_x"));

    // Every owner gone: kNN-LM equals the parametric model under the same protocol.
    ok(&moeval(&[
        "datastore",
        "opt-out",
        s(&store),
        "--owner",
        "owner_y",
    ]));
    ok(&eval(&out, "empty", "canary_ppl", &knn));
    let (a, b) = (
        loglik(&out.join("empty"))[0],
        loglik(&out.join("parametric"))[0],
    );
    assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("empty/retrieval.json")).unwrap()).unwrap();
    assert_eq!(
        info["excluded_owners"],
        serde_json::json!(["owner_x", "owner_y"])
    );
}
