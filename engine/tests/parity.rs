//! Parity with the Hugging Face reference outputs in `shared/fixtures`.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use engine::generate::{generate, GenParams};
use engine::{LoadOptions, Model, SeqInput};

const PROMPTS: usize = 4;

/// Full logits and router logits of one unbatched prompt.
fn run(model: &Model, tokens: &[u32]) -> (Tensor, Vec<Tensor>) {
    let mut cache = model.new_cache();
    let fwd = model
        .forward(
            &mut [SeqInput {
                tokens,
                cache: &mut cache,
                mask: None,
            }],
            true,
        )
        .unwrap();
    (
        model.logits(&fwd.hidden).unwrap(),
        fwd.router_logits.unwrap_or_default(),
    )
}

fn check_fixture(name: &str, tol: f32) {
    let model = Model::load(&fixture(name), &LoadOptions::default()).unwrap();
    let reference = reference(name);
    let prompts: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("reference.json")).unwrap(),
    )
    .unwrap();
    for i in 0..PROMPTS {
        let text = prompts["prompts"][i].as_str().unwrap();
        let tokens = model.require_tokenizer().unwrap().encode(text).unwrap();
        assert_eq!(
            tokens,
            ids(&reference[&format!("input_ids.{i}")]),
            "{name}: tokens of prompt {i}"
        );
        let (logits, router) = run(&model, &tokens);
        let d = max_abs_diff(&logits, &reference[&format!("logits.{i}")]);
        assert!(d <= tol, "{name}: logits of prompt {i} differ by {d}");
        for (l, r) in router.iter().enumerate() {
            let d = max_abs_diff(r, &reference[&format!("router_logits.{i}.layer{l}")]);
            assert!(
                d <= tol,
                "{name}: router logits of prompt {i} layer {l} differ by {d}"
            );
        }
        assert_eq!(
            router.len(),
            if model.config().is_moe() {
                model.config().num_hidden_layers
            } else {
                0
            }
        );
    }
    let prompt = ids(&reference["greedy.prompt"]);
    let params = GenParams {
        max_new_tokens: 16,
        stop_at_eos: false,
        ..GenParams::default()
    };
    let out = generate(&model, &[(prompt, params)], None).unwrap();
    assert_eq!(
        out[0].tokens,
        ids(&reference["greedy.output"]),
        "{name}: greedy generation"
    );
}

#[test]
fn flexolmo_matches_reference() {
    check_fixture("tiny-flexolmo", 1e-4);
}

#[test]
fn flexolmo_bf16_sharded_matches_reference() {
    check_fixture("tiny-flexolmo-bf16-sharded", 1e-4);
}

#[test]
fn olmoe_matches_reference() {
    check_fixture("tiny-olmoe", 1e-4);
}

#[test]
fn olmo2_matches_reference() {
    check_fixture("tiny-olmo2", 1e-4);
}

#[test]
fn opt_out_equals_physical_removal() {
    let name = "tiny-flexolmo";
    let model = Model::load(&fixture(name), &LoadOptions::opting_out(&[2])).unwrap();
    let reference = reference(name);
    for i in 0..PROMPTS {
        let (logits, _) = run(&model, &ids(&reference[&format!("input_ids.{i}")]));
        let d = max_abs_diff(&logits, &reference[&format!("optout2.logits.{i}")]);
        assert!(d <= 1e-5, "opt-out logits of prompt {i} differ by {d}");
    }
}

#[test]
fn per_sequence_mask_equals_load_time_opt_out() {
    let name = "tiny-flexolmo";
    let full = Model::load(&fixture(name), &LoadOptions::default()).unwrap();
    let reference = reference(name);
    let mask = full.loaded_experts().unwrap().without(&[2]).unwrap();
    let a = ids(&reference["input_ids.0"]);
    let b = ids(&reference["input_ids.1"]);
    let (mut ca, mut cb) = (full.new_cache(), full.new_cache());
    let fwd = full
        .forward(
            &mut [
                SeqInput {
                    tokens: &a,
                    cache: &mut ca,
                    mask: Some(&mask),
                },
                SeqInput {
                    tokens: &b,
                    cache: &mut cb,
                    mask: None,
                },
            ],
            false,
        )
        .unwrap();
    let logits = full.logits(&fwd.hidden).unwrap();
    let masked = logits.narrow(0, 0, a.len()).unwrap();
    let unmasked = logits.narrow(0, a.len(), b.len()).unwrap();
    assert!(max_abs_diff(&masked, &reference["optout2.logits.0"]) <= 1e-5);
    assert!(max_abs_diff(&unmasked, &reference["logits.1"]) <= 1e-4);
}

#[test]
fn incremental_decoding_matches_full_forward() {
    let model = Model::load(&fixture("tiny-flexolmo"), &LoadOptions::default()).unwrap();
    let reference = reference("tiny-flexolmo");
    let tokens = ids(&reference["input_ids.3"]);
    // Prefill 10 tokens, then feed the rest in steps of 1, 2 and 3 tokens.
    let (logits, cached) = logits_in_steps(&model, &tokens, &[10, 1, 2, 3, 1, 1, 5, 100]);
    let d = max_abs_diff(&logits, &reference["logits.3"]);
    assert!(d <= 1e-4, "incremental logits differ by {d}");
    assert_eq!(cached, tokens.len());
}

#[test]
fn tied_embeddings_use_the_embedding_matrix() {
    // A copy of the OLMo2 fixture without `lm_head.weight`, declared tied.
    let dir = copy_fixture("tiny-olmo2");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("lm_head.weight");
    let embed = tensors["model.embed_tokens.weight"].clone();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let model = Model::load(dir.path(), &LoadOptions::default()).unwrap();
    let tokens = ids(&reference("tiny-olmo2")["input_ids.0"]);
    let mut cache = model.new_cache();
    let fwd = model
        .forward(
            &mut [SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                mask: None,
            }],
            false,
        )
        .unwrap();
    let expected = fwd.hidden.matmul(&embed.t().unwrap()).unwrap();
    let d = max_abs_diff(&model.logits(&fwd.hidden).unwrap(), &expected);
    assert!(d <= 1e-4, "tied head differs by {d}");
}

/// bf16 weights held as bf16 (the default, `--dtype checkpoint`) give exactly the logits, router
/// logits and greedy generations of the same weights upcast to f32 at load (`--dtype f32`).
#[test]
fn resident_bf16_equals_upcast_exactly() {
    let load = |name: &str, dtype| {
        let opts = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        Model::load(&fixture(name), &opts).unwrap()
    };
    let resident = load(
        "tiny-flexolmo-bf16-sharded",
        engine::WeightDtype::Checkpoint,
    );
    let upcast = load("tiny-flexolmo-bf16-sharded", engine::WeightDtype::F32);
    assert_eq!(resident.weights_dtype(), "bf16");
    assert_eq!(upcast.weights_dtype(), "f32");
    let tok = resident.require_tokenizer().unwrap();
    for text in [
        "The capital of France is",
        "def add(a, b):\n    return",
        "1 2 3 4 5 6 7 8",
    ] {
        let tokens = tok.encode(text).unwrap();
        let (a, ra) = run(&resident, &tokens);
        let (b, rb) = run(&upcast, &tokens);
        let diff = a.sub(&b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{text}");
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(
                x.to_vec2::<f32>().unwrap(),
                y.to_vec2::<f32>().unwrap(),
                "{text}"
            );
        }
        let params = GenParams {
            max_new_tokens: 8,
            ..GenParams::default()
        };
        let gen = |m: &Model| {
            generate(m, &[(tokens.clone(), params.clone())], None).unwrap()[0]
                .tokens
                .clone()
        };
        assert_eq!(gen(&resident), gen(&upcast), "{text}");
    }
    // An f32 checkpoint held as bf16 is rounded, and says so.
    let rounded = load("tiny-flexolmo", engine::WeightDtype::Bf16);
    assert_eq!(rounded.weights_dtype(), "bf16");
    assert!(rounded.weights_rounded() && !resident.weights_rounded());
    assert_eq!(
        load("tiny-flexolmo", engine::WeightDtype::Checkpoint).weights_dtype(),
        "f32"
    );
}
