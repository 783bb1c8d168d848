//! End-to-end tests of the engine commands: forward (stable output names), generate, init-model, bench.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::{fixture, max_diff, moeval};

#[test]
fn forward_writes_the_parity_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let model = fixture("tiny-olmoe");
    let (ok, _, err) = moeval(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "def add(a, b):\n    return a + b",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let reference =
        candle_core::safetensors::load(model.join("reference.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(got["input_ids"].dtype(), DType::I64);
    assert_eq!(
        got["input_ids"].to_vec1::<i64>().unwrap(),
        reference["input_ids.2"].to_vec1::<i64>().unwrap()
    );
    let close = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        let d = max_diff(a, b);
        assert!(d <= 1e-4, "differs by {d}");
    };
    close(&got["logits"], &reference["logits.2"]);
    for l in 0..2 {
        close(
            &got[&format!("router_logits.layer{l}")],
            &reference[&format!("router_logits.2.layer{l}")],
        );
    }
    let mut names: Vec<_> = got.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "input_ids",
            "logits",
            "router_logits.layer0",
            "router_logits.layer1"
        ]
    );
    // A dense model writes no router logits.
    let (ok, _, err) = moeval(&[
        "forward",
        "--model",
        fixture("tiny-olmo2").to_str().unwrap(),
        "--prompt",
        "hi there",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        candle_core::safetensors::load(&out, &Device::Cpu)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn generate_is_greedy_by_default_and_seeded_when_sampling() {
    let m = fixture("tiny-flexolmo");
    let m = m.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            m,
            "--prompt",
            "The quick brown fox",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = moeval(&args);
        assert!(ok, "{err}");
        out
    };
    assert_eq!(run(&[]), run(&[]));
    let a = run(&["--temperature", "1.0", "--seed", "3"]);
    assert_eq!(a, run(&["--temperature", "1.0", "--seed", "3"]));
    let (ok, _, err) = moeval(&["generate", "--model", m, "--prompt", "x", "--top-p", "1.5"]);
    assert!(!ok && err.contains("--top-p"), "{err}");
    let (ok, _, err) = moeval(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(
        !ok && err.contains("/nonexistent/model") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn init_model_is_deterministic_and_benchable() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for d in [&a, &b] {
        let (ok, _, err) = moeval(&[
            "init-model",
            "--preset",
            "tiny",
            "--seed",
            "7",
            "--out",
            d.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
    }
    let bytes = |d: &PathBuf| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&a), bytes(&b), "same seed, same weights");
    let (ok, out, err) = moeval(&[
        "--threads",
        "2",
        "bench",
        "--model",
        a.to_str().unwrap(),
        "--json",
        "--batch",
        "2",
        "--prefill-len",
        "16",
        "--prompt-len",
        "8",
        "--decode-steps",
        "4",
        "--repeats",
        "1",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in ["prefill_tok_s", "decode_tok_s", "peak_rss_mb"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key} in {v}");
    }
    let (ok, _, err) = moeval(&[
        "init-model",
        "--preset",
        "huge",
        "--out",
        a.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("unknown preset `huge`"), "{err}");
}
