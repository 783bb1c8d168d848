//! End-to-end: `moeval eval` on the tiny-flexolmo fixture with the self-written test tasks.

use std::path::Path;
use std::process::Command;

use tasks::dataset::{read, Format, Source};

fn fixture() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/tiny-flexolmo"
    ))
}

fn run_eval(out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["--threads", "2", "eval", "--model"])
        .arg(fixture())
        .args([
            "--include-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tasks"),
        ])
        .arg("--output")
        .arg(out)
        .args(extra)
        .output()
        .expect("moeval runs")
}

#[test]
fn eval_writes_samples_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_eval(
        dir.path(),
        &["--tasks", "mc_tiny,ppl_tiny", "--run-id", "r1"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("acc_mutual_info") && stdout.contains("bits_per_byte"),
        "{stdout}"
    );
    let run = dir.path().join("r1");
    let samples = read(
        &Source::parse(run.join("samples.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap();
    assert_eq!(samples.len(), 12);
    let first = &samples[0];
    assert_eq!(first["task"], "mc_tiny");
    assert_eq!(first["doc_id"], 0);
    assert_eq!(first["choice_loglikelihoods"].as_array().unwrap().len(), 3);
    assert!(first["loglikelihood"].as_f64().unwrap() < 0.0);
    assert_eq!(first["target"], "blue");
    assert!(first["acc"].is_number());
    // Results come in document order.
    let ids: Vec<i64> = samples
        .iter()
        .filter(|s| s["task"] == "mc_tiny")
        .map(|s| s["doc_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (0..6).collect::<Vec<_>>());
    let metrics = read(
        &Source::parse(run.join("metrics.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap();
    let acc = metrics
        .iter()
        .find(|m| m["task"] == "mc_tiny" && m["metric"] == "acc")
        .unwrap();
    assert_eq!(acc["n"], 6);
    assert!(acc["stderr"].as_f64().unwrap() > 0.0);
    // Routing statistics of the MoE model: per task and layer, shares of the tokens sum to top-k.
    let routing = read(
        &Source::parse(run.join("routing.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap();
    assert_eq!(routing.len(), 2 * 2 * 4, "tasks x layers x experts");
    for task in ["mc_tiny", "ppl_tiny"] {
        for layer in 0..2 {
            let total: f64 = routing
                .iter()
                .filter(|r| r["task"] == task && r["layer"] == layer)
                .map(|r| r["share"].as_f64().unwrap())
                .sum();
            assert!((total - 2.0).abs() < 1e-9, "{task} layer {layer}: {total}");
        }
    }
    // manifest.json, samples.parquet, metrics.parquet, routing.parquet, run.lock and no temporary
    // files.
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 5);
}

#[test]
fn scores_do_not_depend_on_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let lls = |id: &str, bs: &str| {
        let out = run_eval(
            dir.path(),
            &[
                "--tasks",
                "mc_tiny_fewshot",
                "--run-id",
                id,
                "--batch-size",
                bs,
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        read(
            &Source::parse(
                dir.path()
                    .join(id)
                    .join("samples.parquet")
                    .to_str()
                    .unwrap(),
                &[],
            ),
            Format::Parquet,
        )
        .unwrap()
        .into_iter()
        .map(|s| s["choice_loglikelihoods"].clone())
        .collect::<Vec<_>>()
    };
    let a = lls("b1", "1");
    let b = lls("b64", "64");
    for (x, y) in a.iter().zip(&b) {
        for (u, v) in x.as_array().unwrap().iter().zip(y.as_array().unwrap()) {
            assert!((u.as_f64().unwrap() - v.as_f64().unwrap()).abs() <= 1e-5);
        }
    }
}

#[test]
fn calm_suite_runs_on_the_shared_data() {
    let data = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/datasets/calm"
    ));
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["--threads", "2", "eval", "--model"])
        .arg(fixture())
        .args([
            "--tasks",
            "calm_sentiment_gender_ll,calm_nli_gender",
            "--limit",
            "30",
            "--run-id",
            "c",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--output")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("bias_score") && stdout.contains("acc[gender=male]"),
        "{stdout}"
    );
    let samples = read(
        &Source::parse(dir.path().join("c/samples.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap();
    assert_eq!(samples[0]["gender"], "male");
    assert!(samples
        .iter()
        .any(|s| s["prediction"].is_string() && s["task"] == "calm_nli_gender"));
}

#[test]
fn unknown_task_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_eval(dir.path(), &["--tasks", "no_such_task"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown task `no_such_task`"), "{err}");
}

#[test]
fn mask_column_says_which_experts_ran() {
    let dir = tempfile::tempdir().unwrap();
    for (id, extra) in [
        ("all", &[][..]),
        ("opted", &["--opt-out", "1,3"][..]),
        ("named", &["--experts", "0,2"][..]),
    ] {
        let out = run_eval(
            dir.path(),
            &[&["--tasks", "mc_tiny", "--run-id", id][..], extra].concat(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let column = |id: &str, name: &str| -> Vec<String> {
        let rows = read(
            &Source::parse(
                dir.path()
                    .join(id)
                    .join("samples.parquet")
                    .to_str()
                    .unwrap(),
                &[],
            ),
            Format::Parquet,
        )
        .unwrap();
        let mut v: Vec<String> = rows
            .iter()
            .map(|r| r[name].as_str().unwrap().to_string())
            .collect();
        v.dedup();
        v
    };
    assert_eq!(column("all", "mask"), ["full"]);
    assert_eq!(column("opted", "mask"), ["-expert-1-expert-3"]);
    assert_eq!(column("opted", "opted_out"), ["expert-1,expert-3"]);
    assert_eq!(column("named", "mask"), ["experts=expert-0+expert-2"]);
    assert_eq!(column("named", "experts"), ["expert-0,expert-2"]);
    for id in ["all", "opted", "named"] {
        assert_eq!(column(id, "retrieval"), ["none"]);
    }
    // The leaderboard carries the opted-out experts and the retrieval settings of each row.
    let report = Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["report", "--runs"])
        .arg(dir.path())
        .arg("--out")
        .arg(dir.path().join("report"))
        .output()
        .unwrap();
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    let board = read(
        &Source::parse(
            dir.path()
                .join("report/leaderboard.parquet")
                .to_str()
                .unwrap(),
            &[],
        ),
        Format::Parquet,
    )
    .unwrap();
    assert!(board
        .iter()
        .any(|r| r["mask"] == "-expert-1-expert-3" && r["opted_out"] == "expert-1,expert-3"));
    assert!(board.iter().all(|r| r["retrieval"] == "none"));
}

/// A task with `generation_kwargs: {num_beams: 3}` decodes with the engine's beam search, and every
/// row carries its requests' arguments as lm-evaluation-harness logs them.
#[test]
fn beam_search_task_runs_and_rows_carry_their_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_eval(
        dir.path(),
        &["--tasks", "gen_beam,mc_tiny", "--run-id", "b1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = read(
        &Source::parse(dir.path().join("b1/samples.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap();
    let model = engine::Model::load(fixture(), &engine::LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let beam = engine::generate::GenParams {
        max_new_tokens: 10,
        stop: vec!["\n".into()],
        beam: engine::generate::BeamParams {
            num_beams: 3,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut beams = 0;
    for s in &samples {
        let prompt = s["prompt"].as_str().unwrap();
        let args: serde_json::Value =
            serde_json::from_str(s["arguments"].as_str().unwrap()).unwrap();
        let args = args.as_object().unwrap();
        let keys: Vec<String> = (0..args.len()).map(|i| format!("gen_args_{i}")).collect();
        assert!(keys.iter().all(|k| args.contains_key(k)), "{args:?}");
        if s["task"] == "gen_beam" {
            assert_eq!(args.len(), 1);
            assert_eq!(
                args["gen_args_0"]["arg_1"],
                serde_json::json!({"until": ["\n"], "max_gen_toks": 10, "num_beams": 3,
                    "do_sample": false, "temperature": 0.0})
            );
            let want = engine::generate::generate(
                &model,
                &[(tok.encode(prompt).unwrap(), beam.clone())],
                None,
            )
            .unwrap()
            .remove(0);
            assert_eq!(s["prediction"], want.text.as_str(), "{prompt:?}");
            beams += 1;
            assert_eq!(args["gen_args_0"]["arg_0"], prompt);
        } else {
            // One request per choice, then (for acc_mutual_info) each choice after an empty context.
            let n = args.len() / 2;
            for (i, k) in keys.iter().enumerate() {
                assert_eq!(args[k]["arg_0"], if i < n { prompt } else { "" });
            }
            if s["doc_id"] == 0 {
                assert_eq!(args["gen_args_0"]["arg_1"], " blue");
                assert_eq!(args["gen_args_3"]["arg_1"], " blue");
            }
        }
    }
    assert_eq!(beams, 6);
}

#[test]
fn tasks_list_prints_groups_tags_and_tasks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["eval", "--tasks", "list", "--include-path"])
        .arg(root.join("tests/data/tasks"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "|Group ",
        "|Tag ",
        "|Task ",
        "|calm ",
        "|tiny_suite ",
        "mc_tiny.yaml",
        "|loglikelihood_rolling",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    let row = text.lines().find(|l| l.starts_with("|mc_tiny ")).unwrap();
    assert!(row.contains("multiple_choice"), "{row}");
    // Without `list`, a run still needs a model and an output folder.
    let out = Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["eval", "--tasks", "mc_tiny"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model is required"));
}
