//! Log-likelihood scoring: batch invariance, shared contexts, agreement with full logits.

mod common;

use candle_core::Tensor;
use common::*;
use engine::generate::{generate, FinishReason, GenParams};
use engine::score::{loglikelihood, Score, ScoreOptions, ScoreRequest};
use engine::{LoadOptions, Model, SeqInput};

fn model() -> Model {
    Model::load(&fixture("tiny-flexolmo"), &LoadOptions::default()).unwrap()
}

fn log_softmax_rows(logits: &Tensor) -> Vec<Vec<f32>> {
    candle_nn::ops::log_softmax(logits, 1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn requests(model: &Model) -> Vec<ScoreRequest> {
    let tok = model.require_tokenizer().unwrap();
    let ctx = |s: &str| tok.encode(s).unwrap();
    let mut out = Vec::new();
    for (c, conts) in [
        ("Alice is a doctor. Bob is a nurse. Who is the doctor? Answer:", vec![" Alice", " Bob", " nobody at all"]),
        ("The quick brown fox", vec![" jumps over the lazy dog.", " sleeps"]),
        ("def add(a, b):\n   ", vec![" return a + b", " pass"]),
        ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software", vec![" and"]),
    ] {
        for cont in conts {
            out.push(ScoreRequest { context: ctx(c), continuation: ctx(cont) });
        }
    }
    out
}

fn assert_close(a: &[Score], b: &[Score], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.greedy, y.greedy, "request {i}");
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() <= tol, "request {i}: {p} vs {q}");
        }
    }
}

#[test]
fn scores_equal_log_softmax_of_full_logits() {
    let model = model();
    let reqs = requests(&model);
    let scores = loglikelihood(&model, &reqs, &ScoreOptions::default()).unwrap();
    for (r, s) in reqs.iter().zip(&scores) {
        let all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        let mut cache = model.new_cache();
        let fwd = model
            .forward(
                &mut [SeqInput {
                    tokens: &all,
                    cache: &mut cache,
                    mask: None,
                }],
                false,
            )
            .unwrap();
        let lp = log_softmax_rows(&model.logits(&fwd.hidden).unwrap());
        for (j, &tok) in r.continuation.iter().enumerate() {
            let row = &lp[r.context.len() - 1 + j];
            assert!((row[tok as usize] - s.logprobs[j]).abs() <= 1e-5);
            let argmax = row
                .iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > row[b] { i } else { b });
            assert_eq!(s.greedy[j], argmax == tok as usize);
        }
    }
}

#[test]
fn results_do_not_depend_on_batch_size_or_order() {
    let model = model();
    let reqs = requests(&model);
    let big = loglikelihood(
        &model,
        &reqs,
        &ScoreOptions {
            batch_tokens: 4096,
            mask: None,
        },
    )
    .unwrap();
    // One request per call: nothing shared, nothing batched.
    let alone: Vec<Score> = reqs
        .iter()
        .map(|r| {
            loglikelihood(
                &model,
                std::slice::from_ref(r),
                &ScoreOptions {
                    batch_tokens: 1,
                    mask: None,
                },
            )
            .unwrap()
            .remove(0)
        })
        .collect();
    assert_close(&big, &alone, 1e-5);
    let mut reversed = reqs.clone();
    reversed.reverse();
    let mut rev = loglikelihood(
        &model,
        &reversed,
        &ScoreOptions {
            batch_tokens: 7,
            mask: None,
        },
    )
    .unwrap();
    rev.reverse();
    assert_close(&big, &rev, 1e-5);
}

#[test]
fn mixed_length_batch_equals_alone() {
    let model = model();
    let reference = reference("tiny-flexolmo");
    let seqs: Vec<Vec<u32>> = (0..4)
        .map(|i| ids(&reference[&format!("input_ids.{i}")]))
        .collect();
    let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
    let mut inputs: Vec<SeqInput> = seqs
        .iter()
        .zip(caches.iter_mut())
        .map(|(s, c)| SeqInput {
            tokens: s,
            cache: c,
            mask: None,
        })
        .collect();
    let fwd = model.forward(&mut inputs, false).unwrap();
    let batched = log_softmax_rows(&model.logits(&fwd.hidden).unwrap());
    for (i, s) in seqs.iter().enumerate() {
        let mut cache = model.new_cache();
        let one = model
            .forward(
                &mut [SeqInput {
                    tokens: s,
                    cache: &mut cache,
                    mask: None,
                }],
                false,
            )
            .unwrap();
        let alone = log_softmax_rows(&model.logits(&one.hidden).unwrap());
        for (t, row) in alone.iter().enumerate() {
            let other = &batched[fwd.starts[i] + t];
            let d = row
                .iter()
                .zip(other)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-5, "sequence {i} token {t}: {d}");
        }
    }
}

#[test]
fn bad_requests_are_errors() {
    let model = model();
    let e = loglikelihood(
        &model,
        &[ScoreRequest {
            context: vec![],
            continuation: vec![5],
        }],
        &ScoreOptions::default(),
    );
    assert!(e.unwrap_err().to_string().contains("non-empty"));
    let e = loglikelihood(
        &model,
        &[ScoreRequest {
            context: vec![3],
            continuation: vec![100_000],
        }],
        &ScoreOptions::default(),
    );
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("outside the vocabulary"));
}

#[test]
fn generation_stops_and_batches() {
    let model = model();
    let tok = model.require_tokenizer().unwrap();
    let prompt = tok.encode("The quick brown fox").unwrap();
    let greedy = GenParams {
        max_new_tokens: 12,
        stop_at_eos: false,
        ..GenParams::default()
    };
    let alone = generate(&model, &[(prompt.clone(), greedy.clone())], None)
        .unwrap()
        .remove(0);
    assert_eq!(alone.tokens.len(), 12);
    assert_eq!(alone.finish, FinishReason::Length);
    // A stop string taken from the greedy text cuts the output right before it.
    let cut_at = alone
        .text
        .char_indices()
        .nth(alone.text.chars().count() / 2)
        .unwrap()
        .0;
    let stop: String = alone.text[cut_at..].chars().take(2).collect();
    let stopped = GenParams {
        stop: vec![stop.clone()],
        ..greedy.clone()
    };
    let sampled = GenParams {
        temperature: 0.8,
        top_p: Some(0.9),
        seed: 7,
        ..greedy.clone()
    };
    let other = tok.encode("def add(a, b):").unwrap();
    let batch = generate(
        &model,
        &[
            (prompt.clone(), greedy.clone()),
            (other.clone(), sampled.clone()),
            (prompt.clone(), stopped),
        ],
        None,
    )
    .unwrap();
    assert_eq!(batch[0], alone, "batched greedy equals alone");
    assert_eq!(batch[2].finish, FinishReason::Stop);
    assert_eq!(batch[2].text, alone.text[..alone.text.find(&stop).unwrap()]);
    let again = generate(&model, &[(other, sampled)], None)
        .unwrap()
        .remove(0);
    assert_eq!(
        batch[1], again,
        "seeded sampling is reproducible and batch-independent"
    );
}

#[test]
fn routed_token_counts_follow_masks() {
    let model = model();
    let tokens = model
        .require_tokenizer()
        .unwrap()
        .encode("The quick brown fox jumps over the lazy dog.")
        .unwrap();
    let mask = model.loaded_experts().unwrap().without(&[2]).unwrap();
    let mut cache = model.new_cache();
    let fwd = model
        .forward(
            &mut [SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                mask: Some(&mask),
            }],
            false,
        )
        .unwrap();
    // The pass returns its own counts.
    let counts = fwd.routed.0;
    assert_eq!(counts.len(), model.config().num_hidden_layers);
    for layer in &counts {
        assert_eq!(
            layer.iter().sum::<u64>(),
            2 * tokens.len() as u64,
            "top-2 per token"
        );
        assert_eq!(layer[2], 0, "opted-out expert gets nothing");
    }
    // Scoring and decoding add up their passes' counts: one more token, one more token's routing.
    let (_, routed) = engine::score::loglikelihood_routed(
        &model,
        &[engine::score::ScoreRequest {
            context: tokens.clone(),
            continuation: vec![tokens[0]],
        }],
        &engine::score::ScoreOptions {
            mask: Some(mask.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(routed.0, counts, "the context pass routes the same tokens");
}
