//! Step-wise decoding (continuous batching): sequences joining mid-flight, with their own masks and
//! samplers, get exactly what they get alone; prompt log-probabilities agree with scoring.

mod common;

use common::*;
use engine::generate::{generate, Decoder, GenParams, Generation, SeqId, SeqRequest};
use engine::score::{loglikelihood, ScoreOptions, ScoreRequest};
use engine::{ExpertMask, LoadOptions, Model};

fn model() -> Model {
    Model::load(&fixture("tiny-flexolmo"), &LoadOptions::default()).unwrap()
}

fn requests(model: &Model) -> Vec<SeqRequest> {
    let tok = model.require_tokenizer().unwrap();
    let masks = [
        None,
        Some(ExpertMask::all(4).without(&[2]).unwrap()),
        Some(ExpertMask::all(4).without(&[1, 3]).unwrap()),
    ];
    let prompts = [
        "Alice is a doctor. Bob is a nurse.",
        "The quick brown fox",
        "def add(a, b):",
        "Once upon a time",
        "Permission is hereby granted",
    ];
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| SeqRequest {
            prompt: tok.encode(p).unwrap(),
            params: GenParams {
                max_new_tokens: 6 + 3 * i,
                temperature: if i % 2 == 0 { 0.0 } else { 0.9 },
                top_p: (i == 3).then_some(0.8),
                seed: 7 + i as u64,
                stop: if i == 2 { vec!["\n".into()] } else { vec![] },
                stop_at_eos: i != 4,
            },
            mask: masks[i % masks.len()].clone(),
            logprobs: Some(2),
            prompt_logprobs: false,
        })
        .collect()
}

fn alone(model: &Model, r: &SeqRequest) -> Generation {
    generate(
        model,
        &[(r.prompt.clone(), r.params.clone())],
        r.mask.as_ref(),
    )
    .unwrap()
    .remove(0)
}

#[test]
fn joining_between_steps_gives_what_each_sequence_gets_alone() {
    let model = model();
    let reqs = requests(&model);
    let mut dec = Decoder::new(&model);
    let mut got: Vec<Option<Generation>> = vec![None; reqs.len()];
    let mut ids: Vec<SeqId> = Vec::new();
    let mut step = 0;
    // One new sequence joins every second step, while the others are mid-generation.
    while ids.len() < reqs.len() || !dec.is_empty() {
        if step % 2 == 0 && ids.len() < reqs.len() {
            ids.push(dec.add(reqs[ids.len()].clone()).unwrap());
        }
        for p in dec.step().unwrap() {
            let i = ids.iter().position(|&id| id == p.id).unwrap();
            if let Some(t) = &p.token {
                assert!(t.logprob <= 0.0 && t.top.len() == 2, "{t:?}");
                assert!(t.top[0].1 >= t.top[1].1);
            }
            if let Some(g) = p.finished {
                got[i] = Some(g);
            }
        }
        step += 1;
        assert!(step < 200, "decoding did not end");
    }
    for (r, g) in reqs.iter().zip(got) {
        assert_eq!(g.unwrap(), alone(&model, r), "prompt {:?}", r.prompt);
    }
}

#[test]
fn generate_batches_as_before() {
    let model = model();
    let reqs = requests(&model);
    let mask = ExpertMask::all(4).without(&[0]).unwrap();
    let prompts: Vec<(Vec<u32>, GenParams)> = reqs
        .iter()
        .map(|r| (r.prompt.clone(), r.params.clone()))
        .collect();
    let batched = generate(&model, &prompts, Some(&mask)).unwrap();
    for (p, g) in prompts.iter().zip(&batched) {
        let one = generate(&model, std::slice::from_ref(p), Some(&mask)).unwrap();
        assert_eq!(&one[0], g);
    }
}

#[test]
fn prompt_logprobs_match_scoring() {
    let model = model();
    let tok = model.require_tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is Paris.").unwrap();
    let mask = ExpertMask::all(4).without(&[1]).unwrap();
    let mut dec = Decoder::new(&model);
    let id = dec
        .add(SeqRequest {
            prompt: prompt.clone(),
            params: GenParams {
                max_new_tokens: 0,
                ..GenParams::default()
            },
            mask: Some(mask.clone()),
            logprobs: Some(1),
            prompt_logprobs: true,
        })
        .unwrap();
    let out = dec.step().unwrap();
    assert!(dec.is_empty());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].id, id);
    assert!(out[0].token.is_none());
    assert_eq!(out[0].finished.as_ref().unwrap().tokens, Vec::<u32>::new());
    let lps = out[0].prompt_logprobs.clone().unwrap();
    assert_eq!(lps.len(), prompt.len() - 1);
    let scores = loglikelihood(
        &model,
        &[ScoreRequest {
            context: prompt[..1].to_vec(),
            continuation: prompt[1..].to_vec(),
        }],
        &ScoreOptions {
            mask: Some(mask),
            ..ScoreOptions::default()
        },
    )
    .unwrap();
    for ((lp, s), g) in lps.iter().zip(&scores[0].logprobs).zip(&scores[0].greedy) {
        assert!((lp.logprob - s).abs() < 1e-5, "{} vs {s}", lp.logprob);
        assert_eq!(lp.top[0].0 == lp.token, *g);
    }
}

#[test]
fn cancel_and_bad_input() {
    let model = model();
    let reqs = requests(&model);
    let mut dec = Decoder::new(&model);
    let a = dec.add(reqs[0].clone()).unwrap();
    let b = dec.add(reqs[1].clone()).unwrap();
    dec.step().unwrap();
    assert!(dec.cancel(a));
    assert!(!dec.cancel(a));
    assert_eq!(dec.ids().collect::<Vec<_>>(), vec![b]);
    let mut last = None;
    while !dec.is_empty() {
        for p in dec.step().unwrap() {
            assert_eq!(p.id, b);
            last = p.finished.or(last);
        }
    }
    assert_eq!(last.unwrap(), alone(&model, &reqs[1]));
    let bad = |prompt: Vec<u32>, mask: Option<ExpertMask>| {
        Decoder::new(&model)
            .add(SeqRequest {
                prompt,
                mask,
                ..SeqRequest::default()
            })
            .unwrap_err()
            .to_string()
    };
    assert!(bad(vec![], None).contains("no tokens"));
    assert!(bad(vec![5, 9999], None).contains("outside the vocabulary"));
    assert!(bad(vec![5], Some(ExpertMask::all(3))).contains("not loaded"));
}
