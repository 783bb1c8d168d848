//! `moeval train` end to end at toy size: generated data, a public model, two owners' experts, the
//! merge and router tuning; the tuned model runs in the engine with only its routers changed, and bad
//! input is refused with a message that names the problem.

use std::path::Path;
use std::process::{Command, Output};

fn moeval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let out = moeval(args);
    assert!(
        out.status.success(),
        "moeval {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fails_with(args: &[&str], message: &str) {
    let out = moeval(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "moeval {args:?} succeeded");
    assert!(stderr.contains(message), "moeval {args:?}: {stderr}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_recipe_runs_end_to_end_and_tuning_moves_only_the_routers() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("data");
    ok(&[
        "train",
        "data",
        "--out",
        s(&data),
        "--train-docs",
        "60",
        "--held-out",
        "12",
    ]);
    let short = ["--steps", "2", "--batch", "2", "--seq-len", "16"];
    let file = |d: &str, split: &str| data.join(d).join(format!("{split}.jsonl"));
    let public = t.join("public");
    let public_train = file("public", "train");
    let mut args = vec!["train", "public", "--data", s(&public_train)];
    let tokenizer = data.join("tokenizer.json");
    args.extend(["--tokenizer", s(&tokenizer), "--out", s(&public)]);
    args.extend(["--hidden", "16", "--intermediate", "24", "--layers", "1"]);
    args.extend(["--heads", "2"]);
    args.extend(short);
    ok(&args);
    let owners = ["math", "news"];
    for o in owners {
        let out = t.join(o);
        let (train, valid) = (file(o, "train"), file(o, "valid"));
        let pv = file("public", "valid");
        let mut args = vec![
            "train",
            "expert",
            "--public",
            s(&public),
            "--data",
            s(&train),
        ];
        args.extend(["--router-samples", s(&valid), "--public-samples", s(&pv)]);
        args.extend(["--out", s(&out)]);
        args.extend(short);
        ok(&args);
    }
    let merged = t.join("merged");
    let specs: Vec<String> = owners
        .iter()
        .map(|o| format!("{o}={}", t.join(o).display()))
        .collect();
    let mut args = vec!["merge", "--public", s(&public), "--router", "from-experts"];
    for spec in &specs {
        args.extend(["--expert", spec]);
    }
    args.extend(["--out", s(&merged)]);
    ok(&args);

    let tuned = t.join("tuned");
    let proxies: Vec<_> = ["public", "math", "news"]
        .iter()
        .map(|d| file(d, "valid"))
        .collect();
    let mut args = vec!["train", "router", "--model", s(&merged), "--out", s(&tuned)];
    for p in &proxies {
        args.extend(["--proxy", s(p)]);
    }
    args.extend(["--opt-out-rate", "0.5", "--lr", "0.05"]);
    args.extend(short);
    ok(&args);

    // Killed while writing the tuned model: nothing at --out, and the retry gives the same bytes.
    for point in ["train-router.saved", "staged.commit"] {
        let out = t.join(point);
        let mut killed_args = args.clone();
        let at = killed_args.iter().position(|a| *a == s(&tuned)).unwrap();
        killed_args[at] = s(&out);
        let killed = Command::new(env!("CARGO_BIN_EXE_moeval"))
            .args(["--threads", "1"])
            .args(&killed_args)
            .env("MOEVAL_TEST_FAULT", point)
            .output()
            .unwrap();
        assert!(killed.status.code().is_none(), "{point}: {killed:?}");
        assert!(
            !out.exists(),
            "{point}: a half-written model was left at --out"
        );
        ok(&killed_args);
        for f in ["model.safetensors", "experts.toml", "config.json"] {
            assert_eq!(
                std::fs::read(tuned.join(f)).unwrap(),
                std::fs::read(out.join(f)).unwrap(),
                "{point}: {f}"
            );
        }
    }

    // The tuned model keeps its experts' names and differs from the merge in its routers alone.
    let registry = std::fs::read_to_string(tuned.join("experts.toml")).unwrap();
    assert!(registry.contains("\"math\"") && registry.contains("\"news\""));
    let a = train::model::read_tensors(&merged).unwrap();
    let b = train::model::read_tensors(&tuned).unwrap();
    assert_eq!(a.len(), b.len());
    let values = |t: &candle_core::Tensor| {
        let t = t.to_dtype(candle_core::DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    for (name, x) in &a {
        let moved = values(x) != values(&b[name]);
        assert_eq!(moved, name.ends_with(".mlp.gate.weight"), "{name}");
    }
    ok(&[
        "forward",
        "--model",
        s(&tuned),
        "--prompt",
        "3 and 4 make",
        "--opt-out",
        "news",
        "--out",
        s(&t.join("logits.safetensors")),
    ]);

    // Bad input: a dense model has no routers; the share of opt-out steps is a probability.
    let pv = file("public", "valid");
    let out = t.join("x");
    let tiny = t.join("tiny.jsonl");
    std::fs::write(&tiny, "{\"text\": \"3 and 4 make 7.\"}\n").unwrap();
    let tune = |model: &Path, proxy: &Path, rate: &str, message: &str| {
        let args = ["train", "router", "--model", s(model), "--proxy", s(proxy)];
        let rest = ["--opt-out-rate", rate, "--out", s(&out)];
        fails_with(&[&args[..], &rest[..]].concat(), message);
    };
    tune(&public, &pv, "0", "router tuning needs a flex_olmo model");
    tune(
        &merged,
        &pv,
        "2",
        "--opt-out-rate 2 must be between 0 and 1",
    );
    tune(
        &merged,
        &tiny,
        "0",
        "tiny.jsonl: 7 tokens of proxy text; router tuning needs more than --seq-len + 1 = 65",
    );
    assert!(!out.exists(), "nothing written on bad input");
}
