//! Beam search against transformers' `generate(num_beams=3, do_sample=False, max_new_tokens=10)` on the
//! tiny-flexolmo fixture (`tests/data/beam_reference.json`, made by `scripts/beam_reference.py`), and
//! batched beam search against each prompt alone.

mod common;

use std::path::Path;

use common::*;
use engine::generate::{
    generate, BeamParams, Decoder, EarlyStopping, FinishReason, GenParams, Generation, SeqRequest,
};
use engine::{LoadOptions, Model};
use serde_json::Value;

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/beam_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The fixture with another EOS token: a copy whose config names `eos` (the reference passes
/// `eos_token_id` to `generate`, which is the same thing).
fn model_with_eos(eos: u64, dir: &Path) -> Model {
    let src = fixture("tiny-flexolmo");
    if eos == 0 {
        return Model::load(&src, &LoadOptions::default()).unwrap();
    }
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let cfg = dir.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["eos_token_id"] = Value::from(eos);
    std::fs::write(&cfg, c.to_string()).unwrap();
    Model::load(dir, &LoadOptions::default()).unwrap()
}

fn beam(early_stopping: EarlyStopping) -> GenParams {
    GenParams {
        max_new_tokens: 10,
        beam: BeamParams {
            num_beams: 3,
            length_penalty: 1.0,
            early_stopping,
        },
        ..GenParams::default()
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// What transformers returns after the prompt: the tokens, with the EOS that ended the best
/// hypothesis.
fn as_transformers(g: &Generation, eos: u32) -> Vec<u32> {
    let mut t = g.tokens.clone();
    if g.finish == FinishReason::Eos {
        t.push(eos);
    }
    t
}

#[test]
fn beam_search_equals_transformers() {
    let r = reference();
    assert_eq!(r["num_beams"], 3);
    let mut checked = 0;
    let mut ended_by_eos = 0;
    for setting in r["settings"].as_array().unwrap() {
        let eos = setting["eos_token_id"].as_u64().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let model = model_with_eos(eos, dir.path());
        let early = if setting["early_stopping"].as_bool().unwrap() {
            EarlyStopping::Always
        } else {
            EarlyStopping::Heuristic
        };
        for case in setting["results"].as_array().unwrap() {
            let prompt = ids(&case["input_ids"]);
            assert_eq!(
                model
                    .tokenizer()
                    .unwrap()
                    .encode(case["prompt"].as_str().unwrap())
                    .unwrap(),
                prompt
            );
            let g = generate(&model, &[(prompt, beam(early))], None).unwrap();
            assert_eq!(
                as_transformers(&g[0], eos as u32),
                ids(&case["output_ids"]),
                "eos {eos}, {early:?}, prompt {:?}",
                case["prompt"]
            );
            ended_by_eos += usize::from(g[0].finish == FinishReason::Eos);
            checked += 1;
        }
    }
    assert_eq!(checked, 30);
    // The EOS settings exercise hypotheses that end before the budget.
    assert!(ended_by_eos >= 4, "{ended_by_eos}");
}

/// Beam search differs from greedy decoding on these prompts: the test above checks beams, not argmax.
#[test]
fn beam_search_is_not_greedy() {
    let model = Model::load(&fixture("tiny-flexolmo"), &LoadOptions::default()).unwrap();
    let r = reference();
    let prompts: Vec<Vec<u32>> = r["settings"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["input_ids"]))
        .collect();
    let greedy = GenParams {
        max_new_tokens: 10,
        ..GenParams::default()
    };
    let batch: Vec<_> = prompts
        .iter()
        .map(|p| (p.clone(), greedy.clone()))
        .collect();
    let g = generate(&model, &batch, None).unwrap();
    let differ = g
        .iter()
        .zip(r["settings"][0]["results"].as_array().unwrap())
        .filter(|(g, c)| as_transformers(g, 0) != ids(&c["output_ids"]))
        .count();
    assert!(
        differ >= 3,
        "only {differ} of 10 prompts differ from greedy"
    );
}

/// All prompts of a setting in one batch (with greedy sequences among them, and prompts prefilled in
/// chunks) give each prompt's result alone.
#[test]
fn batched_beam_search_equals_each_prompt_alone() {
    let r = reference();
    let setting = &r["settings"][1];
    let eos = setting["eos_token_id"].as_u64().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_eos(eos, dir.path());
    let mut reqs: Vec<SeqRequest> = Vec::new();
    for (i, case) in setting["results"].as_array().unwrap().iter().enumerate() {
        let params = if i % 3 == 2 {
            GenParams {
                max_new_tokens: 7,
                ..GenParams::default()
            }
        } else {
            beam(if i % 2 == 0 {
                EarlyStopping::Heuristic
            } else {
                EarlyStopping::Always
            })
        };
        reqs.push(SeqRequest {
            prompt: ids(&case["input_ids"]),
            params,
            ..SeqRequest::default()
        });
    }
    let alone: Vec<Generation> = reqs
        .iter()
        .map(|q| {
            generate(&model, &[(q.prompt.clone(), q.params.clone())], None)
                .unwrap()
                .remove(0)
        })
        .collect();
    for chunk in [usize::MAX, 5] {
        let mut dec = Decoder::with_prefill_chunk(&model, chunk);
        for q in &reqs {
            dec.add(q.clone()).unwrap();
        }
        let mut got: Vec<Option<Generation>> = vec![None; reqs.len()];
        while !dec.is_empty() {
            for p in dec.step().unwrap() {
                assert!(p.error.is_none());
                if let Some(g) = p.finished {
                    got[p.id.0 as usize] = Some(g);
                }
            }
        }
        for (i, (g, a)) in got.into_iter().zip(&alone).enumerate() {
            assert_eq!(g.as_ref(), Some(a), "prompt {i}, prefill chunk {chunk}");
        }
    }
}

#[test]
fn beam_search_cuts_at_stop_strings_and_reports_bad_settings() {
    let model = Model::load(&fixture("tiny-flexolmo"), &LoadOptions::default()).unwrap();
    let tok = model.tokenizer().unwrap();
    let prompt = tok.encode("Once upon a time").unwrap();
    let full = generate(
        &model,
        &[(prompt.clone(), beam(EarlyStopping::Heuristic))],
        None,
    )
    .unwrap()
    .remove(0);
    // A stop string taken from the middle of the output cuts the text there.
    let stop: String = full.text.chars().skip(3).take(2).collect();
    let cut = full.text.find(&stop).unwrap();
    let params = GenParams {
        stop: vec![stop],
        ..beam(EarlyStopping::Heuristic)
    };
    let g = generate(&model, &[(prompt.clone(), params)], None)
        .unwrap()
        .remove(0);
    assert_eq!(g.finish, FinishReason::Stop);
    assert_eq!(g.text, full.text[..cut]);

    let bad = |params: GenParams, logprobs: Option<usize>, want: &str| {
        let mut dec = Decoder::new(&model);
        let e = dec
            .add(SeqRequest {
                prompt: prompt.clone(),
                params,
                logprobs,
                ..SeqRequest::default()
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e}");
    };
    let mut zero = beam(EarlyStopping::Heuristic);
    zero.beam.num_beams = 0;
    bad(zero, None, "num_beams must be at least 1");
    let sampled = GenParams {
        temperature: 0.7,
        ..beam(EarlyStopping::Heuristic)
    };
    bad(
        sampled,
        None,
        "sampling (temperature > 0) with num_beams > 1",
    );
    bad(beam(EarlyStopping::Heuristic), Some(2), "log-probabilities");
}

/// Beam search's cost next to greedy decoding (docs/tasks.md quotes it):
/// `cargo test --release -p engine --test beam -- --ignored --nocapture`.
#[test]
#[ignore = "timing, run by hand in release mode"]
fn beam_search_cost() {
    let model = Model::load(&fixture("tiny-flexolmo"), &LoadOptions::default()).unwrap();
    let r = reference();
    let prompts: Vec<Vec<u32>> = r["settings"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["input_ids"]))
        .collect();
    let greedy = GenParams {
        max_new_tokens: 10,
        stop_at_eos: false,
        ..GenParams::default()
    };
    for (name, params) in [
        ("greedy", greedy),
        ("beam 3", beam(EarlyStopping::Heuristic)),
    ] {
        let batch: Vec<_> = prompts
            .iter()
            .map(|p| (p.clone(), params.clone()))
            .collect();
        let reps = 50;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            for b in &batch {
                generate(&model, std::slice::from_ref(b), None).unwrap();
            }
        }
        let alone = t.elapsed().as_secs_f64() / (reps * batch.len()) as f64;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            generate(&model, &batch, None).unwrap();
        }
        let batched = t.elapsed().as_secs_f64() / (reps * batch.len()) as f64;
        println!(
            "{name}: {:.2} ms per prompt alone, {:.2} ms per prompt in a batch of 10",
            alone * 1e3,
            batched * 1e3
        );
    }
}
