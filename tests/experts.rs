//! End-to-end tests of expert opt-out, owners' policy, routing statistics and merging, through the CLI.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{copy_dir, fixture, max_diff, moeval};

fn load(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

const PROMPT: &str = "Alice is a doctor. Bob is a nurse. Who is the doctor? Answer:";

/// Logits of `moeval forward` on prompt 1 of the fixtures.
fn forward(model: &Path, extra: &[&str]) -> Result<Tensor, String> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut args = vec![
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--out",
        out.path().to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = moeval(&args);
    if !ok {
        return Err(err);
    }
    Ok(load(out.path())["logits"].clone())
}

fn reference() -> BTreeMap<String, Tensor> {
    load(&fixture("tiny-flexolmo").join("reference.safetensors"))
}

const EXPERTS_TOML: &str = "[[expert]]\nindex = 0\nname = \"public\"\n[[expert]]\nindex = 1\nname = \"math\"\n\
[[expert]]\nindex = 2\nname = \"news\"\nowner = \"News Inc\"\n[[expert]]\nindex = 3\nname = \"code\"\n";

#[test]
fn cli_opt_out_equals_physical_removal() {
    let r = reference();
    let logits = forward(&fixture("tiny-flexolmo"), &["--opt-out", "2"]).unwrap();
    assert!(max_diff(&logits, &r["optout2.logits.1"]) <= 1e-5);
    let full = forward(&fixture("tiny-flexolmo"), &[]).unwrap();
    assert!(max_diff(&full, &r["logits.1"]) <= 1e-4);
    let (ok, _, err) = moeval(&[
        "forward",
        "--model",
        fixture("tiny-flexolmo").to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        "/dev/null",
        "--opt-out",
        "0,1,2,3",
    ]);
    assert!(
        !ok && err.contains("every expert would be opted out"),
        "{err}"
    );
}

#[test]
fn owner_policy_is_honoured_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    copy_dir(&fixture("tiny-flexolmo"), &model);
    std::fs::write(model.join("experts.toml"), EXPERTS_TOML).unwrap();
    let m = model.to_str().unwrap();
    let (ok, out, err) = moeval(&[
        "experts",
        "opt-out",
        "news",
        "--model",
        m,
        "--reason",
        "licence withdrawn",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("expert 2 (news) opted out"), "{out}");
    // Every run honours the policy: no flag needed.
    let r = reference();
    assert!(max_diff(&forward(&model, &[]).unwrap(), &r["optout2.logits.1"]) <= 1e-5);
    // Asking for the expert anyway is refused, naming the policy.
    let err = forward(&model, &["--experts", "public,news"]).unwrap_err();
    assert!(
        err.contains("news")
            && err.contains("expert-policy.json")
            && err.contains("licence withdrawn"),
        "{err}"
    );
    let (_, listing, _) = moeval(&["experts", "list", "--model", m, "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(rows[2]["opted_out"], true);
    assert_eq!(rows[2]["owner"], "News Inc");
    assert_eq!(rows[1]["opted_out"], false);
    let (ok, _, err) = moeval(&[
        "experts",
        "opt-in",
        "news",
        "--model",
        m,
        "--reason",
        "licence renewed",
    ]);
    assert!(ok, "{err}");
    assert!(max_diff(&forward(&model, &[]).unwrap(), &r["logits.1"]) <= 1e-4);
    let log = std::fs::read_to_string(model.join("expert-policy.log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["action"].as_str(), lines[1]["action"].as_str()),
        (Some("opt-out"), Some("opt-in"))
    );
    let (ok, _, err) = moeval(&[
        "experts", "opt-out", "sports", "--model", m, "--reason", "x",
    ]);
    assert!(
        !ok && err.contains("unknown expert `sports`") && err.contains("news (2)"),
        "{err}"
    );
}

#[test]
fn routing_statistics_to_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.jsonl");
    std::fs::write(
        &input,
        "{\"text\": \"The quick brown fox jumps over the lazy dog.\", \"domain\": \"prose\"}\n\
         {\"text\": \"def add(a, b):\\n    return a + b\", \"domain\": \"code\"}\n\
         {\"text\": \"def sub(a, b):\\n    return a - b\", \"domain\": \"code\"}\n",
    )
    .unwrap();
    let out = dir.path().join("route.parquet");
    let (ok, table, err) = moeval(&[
        "experts",
        "route",
        "--model",
        fixture("tiny-flexolmo").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--group-by",
        "domain",
        "--out",
        out.to_str().unwrap(),
        "--opt-out",
        "3",
    ]);
    assert!(ok, "{err}");
    assert!(table.contains("prose") && table.contains("code"), "{table}");
    let file = std::fs::File::open(&out).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut shares: BTreeMap<(String, i32), f64> = BTreeMap::new();
    let mut rows = 0;
    for batch in reader {
        let b = batch.unwrap();
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let group = col("group");
        let group = group
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .unwrap();
        let layer = col("layer");
        let layer = layer
            .as_any()
            .downcast_ref::<arrow_array::Int32Array>()
            .unwrap();
        let expert = col("expert");
        let expert = expert
            .as_any()
            .downcast_ref::<arrow_array::Int32Array>()
            .unwrap();
        let share = col("share");
        let share = share
            .as_any()
            .downcast_ref::<arrow_array::Float64Array>()
            .unwrap();
        for i in 0..b.num_rows() {
            *shares
                .entry((group.value(i).to_string(), layer.value(i)))
                .or_default() += share.value(i);
            if expert.value(i) == 3 {
                assert_eq!(
                    share.value(i),
                    0.0,
                    "an opted-out expert receives no tokens"
                );
            }
            rows += 1;
        }
    }
    assert_eq!(rows, 2 * 2 * 4, "groups x layers x experts");
    for (k, s) in shares {
        assert!(
            (s - 2.0).abs() < 1e-9,
            "{k:?}: shares sum to top-k, got {s}"
        );
    }
}

/// Writes an f32 checkpoint with `tensors`, the given config, and the fixture's tokenizer.
fn write_checkpoint(dir: &Path, tensors: &BTreeMap<String, Tensor>, config: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(
        &tensors.clone().into_iter().collect(),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture("tiny-flexolmo").join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
}

/// Splits tiny-flexolmo into a dense public model and three 2-expert owner checkpoints.
fn split(root: &Path) -> (PathBuf, Vec<(String, PathBuf)>) {
    let src = fixture("tiny-flexolmo");
    let weights = load(&src.join("model.safetensors"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let shared = |n: &str| !n.contains(".mlp.");
    let mut public: BTreeMap<String, Tensor> = weights
        .iter()
        .filter(|(n, _)| shared(n))
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    for l in 0..2 {
        for p in ["gate_proj", "up_proj", "down_proj"] {
            public.insert(
                format!("model.layers.{l}.mlp.{p}.weight"),
                weights[&format!("model.layers.{l}.mlp.experts.0.{p}.weight")].clone(),
            );
        }
    }
    let mut public_cfg = config.clone();
    public_cfg["model_type"] = "olmo2".into();
    public_cfg["architectures"] = serde_json::json!(["Olmo2ForCausalLM"]);
    let public_dir = root.join("public");
    write_checkpoint(&public_dir, &public, public_cfg);
    let mut owners = Vec::new();
    for (e, name) in [(1, "math"), (2, "news"), (3, "code")] {
        let mut t: BTreeMap<String, Tensor> = weights
            .iter()
            .filter(|(n, _)| shared(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        for l in 0..2 {
            for p in ["gate_proj", "up_proj", "down_proj"] {
                for (to, from) in [(0, 0), (1, e)] {
                    t.insert(
                        format!("model.layers.{l}.mlp.experts.{to}.{p}.weight"),
                        weights[&format!("model.layers.{l}.mlp.experts.{from}.{p}.weight")].clone(),
                    );
                }
            }
            let gate = &weights[&format!("model.layers.{l}.mlp.gate.weight")];
            let rows = Tensor::cat(
                &[gate.narrow(0, 0, 1).unwrap(), gate.narrow(0, e, 1).unwrap()],
                0,
            )
            .unwrap();
            t.insert(format!("model.layers.{l}.mlp.gate.weight"), rows);
        }
        let mut cfg = config.clone();
        cfg["num_experts"] = 2.into();
        let dir = root.join(name);
        write_checkpoint(&dir, &t, cfg);
        owners.push((name.to_string(), dir));
    }
    (public_dir, owners)
}

#[test]
fn merging_split_experts_reproduces_the_model() {
    let root = tempfile::tempdir().unwrap();
    let (public, owners) = split(root.path());
    let out = root.path().join("merged");
    let mut args: Vec<String> = vec![
        "merge".into(),
        "--public".into(),
        public.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    for (name, dir) in &owners {
        args.push("--expert".into());
        args.push(format!("{name}={}", dir.display()));
    }
    let (ok, _, err) = moeval(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert!(
        out.join("model.safetensors.index.json").exists()
            && out.join("model-00003-of-00003.safetensors").exists()
    );
    let r = reference();
    let merged = forward(&out, &[]).unwrap();
    assert!(max_diff(&merged, &r["logits.1"]) <= 1e-4);
    assert_eq!(
        max_diff(&merged, &forward(&fixture("tiny-flexolmo"), &[]).unwrap()),
        0.0,
        "bit-identical to the original"
    );
    // Names come from the merge: opting out `news` by name is opting out expert 2.
    assert!(
        max_diff(
            &forward(&out, &["--opt-out", "news"]).unwrap(),
            &r["optout2.logits.1"]
        ) <= 1e-5
    );
    let toml = std::fs::read_to_string(out.join("experts.toml")).unwrap();
    assert!(toml.contains("name = \"news\""), "{toml}");

    // Domain-embedding router rows from owners' samples, with a negative bias stored in experts.toml.
    let samples = root.path().join("s.jsonl");
    std::fs::write(
        &samples,
        "{\"text\": \"one two three\"}\n{\"text\": \"def f(x): return x\"}\n",
    )
    .unwrap();
    let out2 = root.path().join("merged2");
    let mut args2: Vec<String> = args.clone();
    args2[4] = out2.display().to_string();
    args2.extend([
        "--router".into(),
        "domain-embeddings".into(),
        "--bias".into(),
        "code=-0.5".into(),
    ]);
    for (name, _) in &owners {
        args2.push("--samples".into());
        args2.push(format!("{name}={}", samples.display()));
    }
    let (ok, _, err) = moeval(&args2.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let toml = std::fs::read_to_string(out2.join("experts.toml")).unwrap();
    assert!(toml.contains("router_bias = -0.5"), "{toml}");
    assert!(forward(&out2, &[]).is_ok());
}

#[test]
fn merging_refuses_experts_with_different_shared_weights() {
    let root = tempfile::tempdir().unwrap();
    let (public, owners) = split(root.path());
    // The news owner "accidentally" trained the final norm.
    let path = owners[1].1.join("model.safetensors");
    let mut t = load(&path);
    let norm = (&t["model.norm.weight"] * 1.5).unwrap();
    t.insert("model.norm.weight".into(), norm);
    candle_core::safetensors::save(&t.into_iter().collect(), &path).unwrap();
    let out = root.path().join("merged");
    let (ok, _, err) = moeval(&[
        "merge",
        "--public",
        public.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--expert",
        &format!("math={}", owners[0].1.display()),
        "--expert",
        &format!("news={}", owners[1].1.display()),
    ]);
    assert!(!ok);
    assert!(
        err.contains("tensor `model.norm.weight` differs") && err.contains("news"),
        "{err}"
    );
}

#[test]
fn killed_merge_leaves_nothing_and_a_retry_gives_the_same_model() {
    let root = tempfile::tempdir().unwrap();
    let (public, owners) = split(root.path());
    let merge = |out: &Path, fault: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_moeval"));
        c.args(["merge", "--public", public.to_str().unwrap(), "--out"])
            .arg(out)
            .env_remove("MOEVAL_TEST_FAULT");
        for (name, dir) in &owners {
            c.arg("--expert").arg(format!("{name}={}", dir.display()));
        }
        if let Some(f) = fault {
            c.env("MOEVAL_TEST_FAULT", f);
        }
        c.output().unwrap()
    };
    let reference = root.path().join("reference");
    assert!(merge(&reference, None).status.success());
    for point in ["merge.shards", "staged.commit"] {
        let out = root.path().join(point);
        let killed = merge(&out, Some(point));
        assert!(killed.status.code().is_none(), "{point}: {killed:?}");
        assert!(
            !out.exists(),
            "{point}: a half-merged model was left at --out"
        );
        let retry = merge(&out, None);
        assert!(retry.status.success(), "{point}: {retry:?}");
        let mut names: Vec<_> = std::fs::read_dir(&reference)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            assert_eq!(
                std::fs::read(reference.join(&n)).unwrap(),
                std::fs::read(out.join(&n)).unwrap(),
                "{point}: {n:?} differs"
            );
        }
    }
}
