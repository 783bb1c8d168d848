//! The trained weights mean to the engine what they meant to the trainer: after a few training steps,
//! the engine's logits for a saved checkpoint equal the candle training forward's, for the dense public
//! model and for an owner's 2-expert FlexOlmo (with grouped-query attention); and training is
//! deterministic for a seed.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use engine::config::{Architecture, Config};
use engine::{LoadOptions, Model, SeqInput};
use train::data;
use train::trainer::token_stream;
use train::{TrainModel, TrainOptions};

fn write_tokenizer(dir: &Path, docs: &[String]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut texts = vec![data::lexicon()];
    texts.extend(docs.iter().cloned());
    let tok = train::vocab::tokenizer_json(texts.iter().map(String::as_str));
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

fn tiny_config(vocab: usize) -> Config {
    Config {
        architecture: Architecture::Olmo2,
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        num_experts: 0,
        num_experts_per_tok: 0,
        norm_topk_prob: false,
        tie_word_embeddings: false,
        clip_qkv: None,
        max_position_embeddings: 512,
        eos_token_ids: vec![0],
        pad_token_id: Some(1),
        bos_token_id: None,
    }
}

fn opts(steps: usize) -> TrainOptions {
    TrainOptions {
        steps,
        batch: 4,
        seq_len: 24,
        warmup: 1,
        ..TrainOptions::default()
    }
}

/// Largest |difference| between the engine's logits and the trainer's for `ids`.
fn max_logit_difference(dir: &Path, ids: &[u32]) -> f32 {
    max_logit_difference_without(dir, ids, &[])
}

/// The same with the experts `opted_out` removed (by index) in both.
fn max_logit_difference_without(dir: &Path, ids: &[u32], opted_out: &[usize]) -> f32 {
    let load = LoadOptions {
        opt_out: opted_out.iter().map(usize::to_string).collect(),
        ..LoadOptions::default()
    };
    let engine = Model::load(dir, &load).unwrap();
    let mut cache = engine.new_cache();
    let fwd = engine
        .forward(
            &mut [SeqInput {
                tokens: ids,
                cache: &mut cache,
                mask: None,
            }],
            false,
        )
        .unwrap();
    let a = engine.logits(&fwd.hidden).unwrap();
    let trainer = TrainModel::load(dir).unwrap();
    let t = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    let b = trainer
        .logits(&trainer.forward_without(&t, opted_out).unwrap().0)
        .unwrap();
    max_abs_difference(&a, &b)
}

/// Largest |a - b| over two tensors of one shape, as f32.
fn max_abs_difference(a: &Tensor, b: &Tensor) -> f32 {
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    (f(a) - f(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn engine_logits_equal_the_training_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let public_dir = tmp.path().join("public");
    let docs = data::generate("public", 3, 60).unwrap();
    let math = data::generate("math", 3, 60).unwrap();
    write_tokenizer(&public_dir, &[docs.clone(), math.clone()].concat());
    let tok = engine::Tokenizer::from_file(&public_dir.join("tokenizer.json")).unwrap();
    let stream = token_stream(&tok, &docs, 0).unwrap();
    let public = TrainModel::init_public(tiny_config(tok.vocab_size()), 1).unwrap();
    let losses = train::train(&public, &stream, None, &opts(4), |_, _| {}).unwrap();
    assert!(
        losses[3] < losses[0],
        "training lowers the loss: {losses:?}"
    );
    public.save(&public_dir, DType::F32).unwrap();
    let ids = tok.encode(&math[0]).unwrap();
    let d = max_logit_difference(&public_dir, &ids);
    assert!(d < 1e-4, "olmo2 logits differ by {d}");

    // An owner's expert, trained a few steps from the public model, saved in bf16 as shipped.
    let tensors = train::model::read_tensors(&public_dir).unwrap();
    let h = 32;
    let rows: Vec<f32> = (0..2 * h)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1)
        .collect();
    let expert =
        TrainModel::expert_from_public(public.config(), &tensors, [&rows[..h], &rows[h..]])
            .unwrap();
    let math_stream = token_stream(&tok, &math, 0).unwrap();
    train::train(&expert, &math_stream, Some(&stream), &opts(3), |_, _| {}).unwrap();
    let expert_dir = tmp.path().join("math");
    expert.save(&expert_dir, DType::BF16).unwrap();
    std::fs::copy(
        public_dir.join("tokenizer.json"),
        expert_dir.join("tokenizer.json"),
    )
    .unwrap();
    let d = max_logit_difference(&expert_dir, &ids);
    assert!(d < 1e-4, "flex_olmo logits differ by {d}");

    // Frozen parts are the public model's (as bf16); the owner's expert and router row moved.
    let saved = train::model::read_tensors(&expert_dir).unwrap();
    let same = |a: &str, b: &str| {
        max_abs_difference(&saved[a], &tensors[b].to_dtype(DType::BF16).unwrap()) == 0.0
    };
    assert!(same(
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight"
    ));
    assert!(same(
        "model.layers.0.mlp.experts.0.up_proj.weight",
        "model.layers.0.mlp.up_proj.weight"
    ));
    assert!(!same(
        "model.layers.0.mlp.experts.1.up_proj.weight",
        "model.layers.0.mlp.up_proj.weight"
    ));
    let gate = saved["model.layers.0.mlp.gate.weight"]
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let bf = |x: f32| half_round(x);
    assert!(gate[0].iter().zip(&rows[..h]).all(|(a, b)| *a == bf(*b)));
    assert!(gate[1].iter().zip(&rows[h..]).any(|(a, b)| *a != bf(*b)));
}

#[test]
fn router_tuning_trains_only_routers_and_the_engine_agrees_on_top_k() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("merged");
    let domains: Vec<Vec<String>> = ["public", "math", "code"]
        .iter()
        .map(|d| data::generate(d, 4, 40).unwrap())
        .collect();
    write_tokenizer(&dir, &domains.concat());
    let tok = engine::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    // Four experts, two per token: routing is a real top-k choice, unlike the owners' 2-expert models.
    let config = Config {
        architecture: Architecture::FlexOlmo,
        num_experts: 4,
        num_experts_per_tok: 2,
        ..tiny_config(tok.vocab_size())
    };
    engine::init::write_random_checkpoint(&config, &engine::init::RandomInit { seed: 3 }, &dir)
        .unwrap();
    let before = train::model::read_tensors(&dir).unwrap();
    let model = TrainModel::load(&dir)
        .unwrap()
        .with_trained_routers()
        .unwrap();
    let streams: Vec<Vec<u32>> = domains
        .iter()
        .map(|d| token_stream(&tok, d, 0).unwrap())
        .collect();
    let o = TrainOptions {
        lr: 0.05,
        ..opts(6)
    };
    // Every step opts one expert out: the loss still falls and nothing but the routers moves.
    let losses = train::tune_routers(&model, &streams, 1.0, &o, |_, _| {}).unwrap();
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    let tuned = tmp.path().join("tuned");
    model.save(&tuned, DType::F32).unwrap();
    std::fs::copy(dir.join("tokenizer.json"), tuned.join("tokenizer.json")).unwrap();
    let after = train::model::read_tensors(&tuned).unwrap();
    for (name, t) in &before {
        let moved = max_abs_difference(t, &after[name]) > 0.0;
        assert_eq!(moved, name.ends_with(".mlp.gate.weight"), "{name}");
    }
    let ids = tok.encode(&domains[1][0]).unwrap();
    for opted_out in [&[][..], &[2], &[1, 3], &[0, 1, 2]] {
        let d = max_logit_difference_without(&tuned, &ids, opted_out);
        assert!(
            d < 1e-4,
            "top-2 of 4 without {opted_out:?}: logits differ by {d}"
        );
    }
}

/// `x` rounded to bf16 and back, through candle.
fn half_round(x: f32) -> f32 {
    Tensor::new(&[x], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = data::generate("news", 5, 40).unwrap();
    write_tokenizer(tmp.path(), &docs);
    let tok = engine::Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    let stream = token_stream(&tok, &docs, 0).unwrap();
    let run = |seed: u64| {
        let m = TrainModel::init_public(tiny_config(tok.vocab_size()), 2).unwrap();
        let o = TrainOptions { seed, ..opts(3) };
        train::train(&m, &stream, None, &o, |_, _| {}).unwrap();
        m.tensors()
            .unwrap()
            .into_values()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f32::to_bits)
            .collect::<Vec<u32>>()
    };
    let first = run(0);
    assert_eq!(first, run(0), "same seed, same weights bit for bit");
    assert_ne!(first, run(1), "another seed draws other windows");
}

#[test]
fn the_tokenizer_file_splits_like_the_vocabulary_builder() {
    let tmp = tempfile::tempdir().unwrap();
    let mut docs = Vec::new();
    for d in std::iter::once(data::PUBLIC).chain(data::OWNERS) {
        docs.extend(data::generate(d, 0, 30).unwrap());
    }
    write_tokenizer(tmp.path(), &docs);
    let tok = engine::Tokenizer::from_file(&tmp.path().join("tokenizer.json")).unwrap();
    let unk = tok.token_id(train::vocab::UNK).unwrap();
    for d in &docs {
        let ids = tok.encode(d).unwrap();
        assert_eq!(ids.len(), train::vocab::words(d).len(), "{d}");
        assert!(!ids.contains(&unk), "{d}");
    }
    assert_eq!(tok.token_id(train::vocab::EOS), Some(0));
}
