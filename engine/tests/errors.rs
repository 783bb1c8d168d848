//! Bad checkpoints give errors that name the file and the problem, never a panic.

mod common;

use common::*;
use engine::{LoadOptions, Model};

fn load_err(dir: &std::path::Path) -> String {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

#[test]
fn unknown_model_type() {
    let dir = copy_fixture("tiny-flexolmo");
    edit_config(dir.path(), |v| v["model_type"] = "llama".into());
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("unknown model_type `llama`"),
        "{e}"
    );
}

#[test]
fn missing_config_field() {
    let dir = copy_fixture("tiny-flexolmo");
    edit_config(dir.path(), |v| {
        v.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("missing field `num_hidden_layers`"),
        "{e}"
    );
}

#[test]
fn missing_config_file() {
    let dir = copy_fixture("tiny-olmo2");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn misshapen_tensor() {
    let dir = copy_fixture("tiny-flexolmo");
    // A config that claims a wider MLP than the weights have.
    edit_config(dir.path(), |v| v["intermediate_size"] = 128.into());
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(e.contains("has shape [96, 64], expected [128, 64]"), "{e}");
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture("tiny-flexolmo");
    edit_config(dir.path(), |v| v["num_hidden_layers"] = 3.into());
    let e = load_err(dir.path());
    assert!(e.contains("missing tensor `model.layers.2."), "{e}");
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("tiny-olmo2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt or truncated"),
        "{e}"
    );
}

#[test]
fn corrupt_safetensors_header() {
    let dir = copy_fixture("tiny-olmo2");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..40].fill(b'#');
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("corrupt or truncated"), "{e}");
}

#[test]
fn missing_shard() {
    let dir = copy_fixture("tiny-flexolmo-bf16-sharded");
    std::fs::remove_file(dir.path().join("model-00004-of-00006.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors.index.json"), "{e}");
    assert!(
        e.contains("shard `model-00004-of-00006.safetensors`") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn missing_tokenizer() {
    let dir = copy_fixture("tiny-olmoe");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn missing_weights() {
    let dir = copy_fixture("tiny-olmoe");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn opting_out_everything_or_unknown_expert() {
    let dir = fixture("tiny-flexolmo");
    let e = Model::load(&dir, &LoadOptions::opting_out(&[0, 1, 2, 3]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("every expert would be opted out"), "{e}");
    let e = Model::load(&dir, &LoadOptions::opting_out(&[7]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown expert `7`"), "{e}");
    let e = Model::load(&fixture("tiny-olmo2"), &LoadOptions::opting_out(&[0]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("dense"), "{e}");
}

#[test]
fn opted_out_expert_is_never_read() {
    // Corrupt every byte of expert 2's tensors and its router row in every layer: loading without
    // expert 2 must not notice, in the logits or in the router logits a forward pass reports.
    let dir = copy_fixture("tiny-flexolmo");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (mut experts, mut routers) = (0, 0);
    for (name, info) in header.as_object().unwrap() {
        let off = &info["data_offsets"];
        if off.is_null() {
            continue; // __metadata__
        }
        let (a, b) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        if name.contains(".experts.2.") {
            bytes[8 + n + a..8 + n + b].fill(0xff); // NaNs
            experts += 1;
        } else if name.ends_with(".mlp.gate.weight") {
            // Row 2 of [experts, hidden].
            let rows = info["shape"][0].as_u64().unwrap() as usize;
            let row = (b - a) / rows;
            bytes[8 + n + a + 2 * row..8 + n + a + 3 * row].fill(0xff);
            routers += 1;
        }
    }
    assert_eq!(
        (experts, routers),
        (6, 2),
        "2 layers x (3 tensors + a router row)"
    );
    std::fs::write(&path, &bytes).unwrap();
    let model = Model::load(dir.path(), &LoadOptions::opting_out(&[2])).unwrap();
    let reference = reference("tiny-flexolmo");
    let tokens = ids(&reference["input_ids.2"]);
    let mut cache = model.new_cache();
    let fwd = model
        .forward(
            &mut [engine::SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                mask: None,
            }],
            true,
        )
        .unwrap();
    let logits = model.logits(&fwd.hidden).unwrap();
    let d = max_abs_diff(&logits, &reference["optout2.logits.2"]);
    assert!(d <= 1e-5, "differs by {d}");
    for layer in fwd.router_logits.unwrap() {
        let experts = layer.dims()[1];
        let v = layer.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The removed expert's logit is reported as -inf: it has no router row.
        assert!(v
            .chunks_exact(experts)
            .all(|row| row[2] == f32::NEG_INFINITY && row.iter().all(|x| !x.is_nan())));
    }
    // And the corruption is real: loading expert 2 is refused, naming the file and the tensor.
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains(".mlp.") && e.contains("non-finite"),
        "{e}"
    );
}

#[test]
fn nan_weight_is_refused() {
    // One NaN in a tensor every forward pass reads (the final norm).
    let dir = copy_fixture("tiny-olmo2");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let info = &header["model.norm.weight"];
    assert_eq!(info["dtype"], "F32");
    let a = info["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[8 + n + a + 4..8 + n + a + 8].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors")
            && e.contains(
                "tensor `model.norm.weight` holds 1 non-finite value(s) (first at element 1: NaN)"
            ),
        "{e}"
    );
}

#[test]
fn top_k_beyond_the_experts_is_refused() {
    let dir = copy_fixture("tiny-flexolmo");
    edit_config(dir.path(), |v| v["num_experts_per_tok"] = 7.into());
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("num_experts_per_tok 7 exceeds num_experts 4"),
        "{e}"
    );
}

#[test]
fn zero_context_length_is_refused() {
    let dir = copy_fixture("tiny-flexolmo");
    edit_config(dir.path(), |v| v["max_position_embeddings"] = 0.into());
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json") && e.contains("max_position_embeddings is 0"),
        "{e}"
    );
}

#[test]
fn eos_beyond_the_vocabulary_is_refused() {
    let dir = copy_fixture("tiny-olmoe");
    edit_config(dir.path(), |v| v["eos_token_id"] = 512.into());
    let e = load_err(dir.path());
    assert!(
        e.contains("config.json")
            && e.contains("eos_token_id 512 is outside the vocabulary (vocab_size 512)"),
        "{e}"
    );
}
