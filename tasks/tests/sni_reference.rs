//! Super-NaturalInstructions as Tk-Instruct encodes and scores it: moeval's prompts for a task
//! file in the real natural-instructions layout, in all three modes, against the encodings
//! Tk-Instruct's `DataCollatorForNI` produced for the same file, and moeval's SNI metrics
//! against Tk-Instruct's `compute_metrics` (tasks/tests/data/sni/, written by
//! scripts/make_sni_references.py).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tasks::metrics::normalise;
use tasks::rouge::{self, Rouge};
use tasks::suites::sni::{self, Mode};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sni")
}

fn reference() -> Value {
    let p = dir().join("tk_instruct_references.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference file")).expect("json")
}

#[test]
fn prompts_equal_tk_instruct_encodings() {
    let task = sni::read_task(&dir().join("task9100_unit_conversion.json")).expect("task file");
    let r = reference();
    for (name, mode) in [
        ("zero_shot", Mode::ZeroShot),
        ("few_shot", Mode::FewShot),
        ("few_shot_explained", Mode::FewShotExplained),
    ] {
        let want = r["encodings"][name].as_array().expect("encodings");
        assert_eq!(want.len(), task.instances.len());
        for (inst, w) in task.instances.iter().zip(want) {
            assert_eq!(
                sni::prompt(&task, mode, 2, &inst.input),
                w.as_str().expect("string"),
                "{name}, {}",
                inst.id
            );
        }
    }
}

/// Tk-Instruct's token budget (`max_source_length`), counted with a small tokenizer in T5's layout:
/// examples dropped, then the prompt cut and decoded, as the collator does with transformers'
/// tokenizer, for every mode and budget the reference file holds.
#[test]
fn prompts_within_a_token_budget_equal_tk_instruct_encodings() {
    let task = sni::read_task(&dir().join("task9100_unit_conversion.json")).expect("task file");
    let r = reference();
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(r["budget_tokenizer"].as_str().expect("tokenizer path"));
    let budgeted = r["budgeted_encodings"].as_object().expect("budgeted");
    assert_eq!(budgeted.len(), 18);
    let (mut dropped, mut cut) = (0, 0);
    for (key, want) in budgeted {
        let (name, max) = key.split_once('/').expect("mode/budget");
        let mode = Mode::parse(name).expect("mode");
        let budget =
            sni::Budget::load(&tokenizer, max.parse().expect("budget")).expect("tokenizer");
        let full = r["encodings"][name].as_array().expect("encodings");
        for ((inst, w), f) in task
            .instances
            .iter()
            .zip(want.as_array().expect("list"))
            .zip(full)
        {
            let w = w.as_str().expect("string");
            assert_eq!(
                sni::prompt_within(&task, mode, 2, &inst.input, Some(&budget)).expect("prompt"),
                w,
                "{key}, {}",
                inst.id
            );
            if w != f.as_str().expect("string") {
                if w.ends_with("Output: ") {
                    dropped += 1;
                } else {
                    cut += 1;
                }
            }
        }
    }
    // The file exercises both rules.
    assert!(dropped >= 10 && cut >= 10, "{dropped} dropped, {cut} cut");
}

/// Checks moeval's SNI scores against the reference's rows `rows` and x100 totals `totals`: exact
/// match after SNI's normalisation, and ROUGE-1 / ROUGE-L by `rouge_of(kind, reference, prediction)`,
/// each the max over the references.
fn assert_scores(rows: &str, totals: &str, rouge_of: &dyn Fn(Rouge, &str, &str) -> f64) {
    let r = reference();
    let opts: Map<String, Value> = serde_json::from_value(serde_json::json!(
        {"ignore_case": true, "ignore_punctuation": true, "collapse_whitespace": true}
    ))
    .expect("options");
    let scores = r[rows].as_array().expect("scores");
    let mut sums = [0.0; 3];
    for s in scores {
        let pred = s["prediction"].as_str().expect("prediction");
        let refs: Vec<&str> = s["references"]
            .as_array()
            .expect("references")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let max = |f: &dyn Fn(&str) -> f64| refs.iter().map(|r| f(r)).fold(0.0, f64::max);
        let em = max(&|g| f64::from(u8::from(normalise(pred, &opts) == normalise(g, &opts))));
        let r1 = max(&|g| rouge_of(Rouge::N(1), g, pred));
        let rl = max(&|g| rouge_of(Rouge::L, g, pred));
        for (i, (name, got)) in [("exact_match", em), ("rouge1", r1), ("rougeL", rl)]
            .into_iter()
            .enumerate()
        {
            let want = s[name].as_f64().expect("number");
            assert!(
                (got - want).abs() < 1e-9,
                "{rows}: {pred:?} {name}: {got} vs {want}"
            );
            sums[i] += got;
        }
    }
    // compute_metrics reports x100, rounded to 4 decimals.
    let n = scores.len() as f64;
    for (name, sum) in ["exact_match", "rouge1", "rougeL"].into_iter().zip(sums) {
        let want = r[totals][name].as_f64().expect("number");
        assert!((100.0 * sum / n - want).abs() < 5e-5, "{totals}: {name}");
    }
}

/// SNI's scorer with the options the reasoning suite's `_sni.yaml` gives: exact match after
/// SNI's normalisation, ROUGE-1 and ROUGE-L with the stemmer, max over the references.
#[test]
fn scores_equal_tk_instruct_compute_metrics() {
    assert_scores("scores", "compute_metrics", &|kind, g, pred| {
        rouge::score(kind, g, pred, true)
    });
}

/// The cross-lingual track: `compute_metrics(xlingual=True)` scores ROUGE over GPT-2's tokens (here a
/// small tokenizer in GPT-2's layout), without the stemmer; moeval's `tokenizer:` ROUGE option.
#[test]
fn cross_lingual_scores_equal_tk_instruct_compute_metrics() {
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(
        reference()["xlingual_tokenizer"]
            .as_str()
            .expect("tokenizer path"),
    );
    let t = rouge::SubwordTokens::load(&tokenizer).expect("tokenizer");
    let tokens = |s: &str| t.tokens(s);
    assert_scores(
        "xlingual_scores",
        "xlingual_compute_metrics",
        &|kind, g, pred| rouge::score_with(kind, g, pred, &tokens).expect("tokens"),
    );
}
