//! End-to-end: the reasoning, autorater and CoBBLEr suites through `moeval eval` on the
//! tiny-flexolmo fixture (suite metrics come from `Task::finish`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use tasks::dataset::{read, Format, Source};

fn fixture() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/tiny-flexolmo"
    ))
}

/// Runs `moeval eval` and returns metrics.parquet as `task/metric -> value`, plus the run folder.
fn eval(out: &Path, run: &str, extra: &[&str]) -> (BTreeMap<String, f64>, std::path::PathBuf) {
    let o = Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["--threads", "2", "eval", "--model"])
        .arg(fixture())
        .arg("--output")
        .arg(out)
        .args(["--run-id", run])
        .args(extra)
        .output()
        .expect("moeval runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = out.join(run);
    let rows = read(
        &Source::parse(dir.join("metrics.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap();
    let m = rows
        .iter()
        .map(|r| {
            (
                format!(
                    "{}/{}",
                    r["task"].as_str().unwrap(),
                    r["metric"].as_str().unwrap()
                ),
                r["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    (m, dir)
}

#[test]
fn reasoning_suite_groups_by_skill() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = eval(dir.path(), "r", &["--tasks", "reasoning"]);
    for mode in ["sni_zero_shot", "sni_few_shot", "sni_few_shot_explained"] {
        for skill in ["Numerical", "Analogical", "Temporal", "Causal", "Logical"] {
            for metric in ["exact_match", "rougeL", "rouge1"] {
                let k = format!("{mode}/{metric}[reasoning={skill} Reasoning]");
                assert!(m[&k] >= 0.0 && m[&k] <= 1.0, "{k}");
            }
        }
    }
}

#[test]
fn autorater_suite_reports_judge_and_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let (m, run) = eval(dir.path(), "a", &["--tasks", "autorater"]);
    for t in ["rewardbench_ll", "rewardbench_gen"] {
        let secs: Vec<f64> = ["Chat", "Chat Hard", "Safety", "Reasoning"]
            .iter()
            .map(|s| m[&format!("{t}/pairwise_acc[section={s}]")])
            .collect();
        let overall = m[&format!("{t}/rewardbench_score")];
        assert!((overall - secs.iter().sum::<f64>() / 4.0).abs() < 1e-9);
        assert!(m[&format!("{t}/rouge_l_baseline_score")] > 0.5);
    }
    // Log-likelihood judging always answers; the fixture's generations are counted, not dropped.
    assert_eq!(m["rewardbench_ll/valid_rate"], 1.0);
    assert_eq!(
        m["rewardbench_gen/unparseable"],
        20.0 * (1.0 - m["rewardbench_gen/valid_rate"])
    );
    assert!(m.contains_key("autorater_pointwise_ll/spearman"));
    assert!(m["autorater_consistency_ll/balanced_acc"] >= 0.0);
    let samples = read(
        &Source::parse(run.join("samples.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap();
    assert!(samples
        .iter()
        .any(|s| s["task"] == "rewardbench_gen" && s["valid"].is_number()));
}

#[test]
fn cobbler_biases_per_expert_mask() {
    let dir = tempfile::tempdir().unwrap();
    // The first 80 documents are 10 comparisons x 4 biases x 2 prompts.
    let args = ["--tasks", "cobbler_ll", "--limit", "80"];
    let (full, _) = eval(dir.path(), "full", &args);
    let (masked, _) = eval(
        dir.path(),
        "masked",
        &[&args[..], &["--opt-out", "1"]].concat(),
    );
    for m in [&full, &masked] {
        assert_eq!(m["cobbler_ll/valid_rate"], 1.0);
        assert_eq!(m["cobbler_ll/comparisons"], 10.0);
        // Log-likelihood judging always answers: every answer valid, every pair consistent.
        assert_eq!(m["cobbler_ll/consistency[variant=plain]"], 1.0);
        assert!(m["cobbler_ll/order_first"] + m["cobbler_ll/order_last"] <= 1.0);
        for b in [
            "bandwagon",
            "attentional",
            "salience_long",
            "compassion_order_first",
        ] {
            assert!(m.contains_key(&format!("cobbler_ll/{b}")), "{b}");
        }
    }
    // The same comparisons, judged by a different set of experts.
    let biases = |m: &BTreeMap<String, f64>| {
        [
            "order_first",
            "order_last",
            "salience_long",
            "bandwagon",
            "attentional",
        ]
        .map(|b| m[&format!("cobbler_ll/{b}")])
    };
    assert_ne!(biases(&full), biases(&masked));
}

#[test]
fn pairs_flag_subsamples_cobbler_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--tasks", "cobbler_ll", "--pairs", "4"];
    let (a, run) = eval(dir.path(), "a", &args);
    let (b, _) = eval(dir.path(), "b", &args);
    assert_eq!(a["cobbler_ll/comparisons"], 4.0);
    // Debug text so that an undefined (NaN) metric compares equal to itself.
    assert_eq!(
        format!("{a:?}"),
        format!("{b:?}"),
        "the same draw every time"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["settings"]["pairs"], 4);
}
