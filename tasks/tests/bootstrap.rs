//! moeval's values and standard errors against lm-evaluation-harness 0.4.13's own
//! `_compute_task_aggregations` on the same items (tasks/tests/data/bootstrap_references.json,
//! written by scripts/make_bootstrap_references.py): mean, the bootstrapped perplexity (100,000
//! resamples) and BLEU / chrF / TER (100), and the weighted perplexities and bits per byte, which
//! have no standard error.

use serde_json::Value;
use tasks::metrics::{aggregate, Item, Translation};

/// Relative tolerance. Sums run in the harness's order, so nearly every number agrees to the last
/// bit; chrF's standard errors differ in the last place because moeval's `chrf_score` multiplies by
/// 100 before dividing where sacreBLEU divides first (a resample's score can differ by one ulp).
const REL: f64 = 1e-9;

fn data() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/bootstrap_references.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference file")).expect("json")
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is a number"))
}

/// The reference's items of `corpus` as moeval's items of `metric`.
fn items(d: &Value, metric: &str, corpus: &str) -> Vec<Item> {
    let raw = d["corpora"][corpus].as_array().expect("corpus");
    raw.iter()
        .map(|x| match metric {
            "acc" => Item::Mean(num(x)),
            "perplexity" => Item::Perplexity(num(x)),
            "word_perplexity" | "byte_perplexity" => {
                Item::WeightedPerplexity(num(&x[0]), num(&x[1]))
            }
            "bits_per_byte" => Item::BitsPerByte(num(&x[0]), num(&x[1])),
            m => {
                let t = Translation::parse(m).expect("translation metric");
                let refs = x[0].as_array().expect("references");
                Item::Translation(
                    t,
                    x[1].as_str().expect("prediction").to_string(),
                    refs.iter()
                        .map(|r| r.as_str().expect("reference").to_string())
                        .collect(),
                )
            }
        })
        .collect()
}

fn rel(got: f64, want: f64) -> f64 {
    if got == want {
        0.0
    } else {
        (got - want).abs() / want.abs()
    }
}

#[test]
fn standard_errors_equal_lm_evaluation_harness() {
    let d = data();
    assert_eq!(d["bootstrap_iters"], 100_000);
    let mut bad = Vec::new();
    let (mut worst, mut exact, mut total) = (0f64, 0, 0);
    for c in d["cases"].as_array().expect("cases") {
        let metric = c["metric"].as_str().expect("metric");
        let corpus = c["corpus"].as_str().expect("corpus");
        let its = items(&d, metric, corpus);
        let a = aggregate(&its);
        assert_eq!(a.n, its.len());
        let name = format!("{metric} on {corpus}");
        let want = num(&c["value"]);
        let mut check = |what: &str, got: f64, want: f64| {
            let r = rel(got, want);
            if r != 0.0 {
                eprintln!("not bit-equal: {name} {what}: moeval {got:e} lm-eval {want:e}");
            }
            worst = worst.max(r);
            total += 1;
            exact += usize::from(r == 0.0);
            if r.is_nan() || r > REL {
                bad.push(format!("{name} {what}: moeval {got} lm-eval {want}"));
            }
        };
        check("value", a.value, want);
        match &c["stderr"] {
            Value::Null if a.stderr.is_nan() => {}
            Value::Null => bad.push(format!("{name}: stderr {} where lm-eval has N/A", a.stderr)),
            se => check("stderr", a.stderr, num(se)),
        }
    }
    eprintln!("{exact} of {total} numbers bit-equal; largest relative difference {worst:e}");
    assert!(
        bad.is_empty(),
        "{} differences:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
