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
                ..GenParams::default()
            },
            mask: masks[i % masks.len()].clone(),
            logprobs: Some(2),
            prompt_logprobs: false,
            picker: None,
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
            picker: None,
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

/// A prompt's (token, log-probability) pairs.
type PromptScores = Vec<(u32, f32)>;

/// Runs every request through one decoder that prefills at most `chunk` prompt tokens per step;
/// returns each one's result and prompt log-probabilities.
fn run_chunked(
    model: &Model,
    reqs: &[SeqRequest],
    chunk: usize,
) -> Vec<(Generation, PromptScores)> {
    let mut dec = Decoder::with_prefill_chunk(model, chunk);
    for r in reqs {
        dec.add(r.clone()).unwrap();
    }
    let mut out: Vec<(Option<Generation>, PromptScores)> = vec![(None, vec![]); reqs.len()];
    while !dec.is_empty() {
        for p in dec.step().unwrap() {
            let slot = &mut out[p.id.0 as usize];
            if let Some(lps) = p.prompt_logprobs {
                slot.1 = lps.iter().map(|t| (t.token, t.logprob)).collect();
            }
            if let Some(g) = p.finished {
                slot.0 = Some(g);
            }
        }
    }
    out.into_iter().map(|(g, l)| (g.unwrap(), l)).collect()
}

#[test]
fn chunked_prefill_gives_what_one_shot_prefill_gives() {
    let model = model();
    let mut reqs = requests(&model);
    for r in &mut reqs {
        r.prompt_logprobs = true;
    }
    let whole = run_chunked(&model, &reqs, usize::MAX);
    for chunk in [1, 3, 7] {
        let chunked = run_chunked(&model, &reqs, chunk);
        for ((g, l), (wg, wl)) in chunked.iter().zip(&whole) {
            assert_eq!(g, wg, "chunk {chunk}");
            assert_eq!(l.len(), wl.len());
            for ((t, lp), (wt, wlp)) in l.iter().zip(wl) {
                assert_eq!(t, wt);
                assert!((lp - wlp).abs() < 1e-5, "chunk {chunk}: {lp} vs {wlp}");
            }
        }
    }
    for (r, (g, _)) in reqs.iter().zip(&whole) {
        assert_eq!(*g, alone(&model, r));
    }
}

#[test]
fn a_failing_sampler_fails_its_sequence_alone() {
    let model = model();
    let reqs = requests(&model);
    let mut dec = Decoder::new(&model);
    let good = dec.add(reqs[0].clone()).unwrap();
    // Logits divided by this overflow to NaN probabilities: the sampler cannot draw.
    let mut broken = reqs[1].clone();
    broken.params.temperature = 1e-38;
    let bad = dec.add(broken).unwrap();
    let (mut finished, mut error) = (None, None);
    while !dec.is_empty() {
        for p in dec.step().unwrap() {
            if p.id == bad {
                error = p.error.or(error);
                assert!(p.finished.is_none());
            } else {
                finished = p.finished.or(finished);
            }
        }
    }
    let error = error.expect("the broken sequence reports an error");
    assert!(error.contains("sampling failed"), "{error}");
    assert!(!error.contains('\n'), "{error}");
    assert_eq!(finished.unwrap(), alone(&model, &reqs[0]));
    let _ = good;
}

#[test]
fn a_generated_eos_is_reported_as_the_last_token() {
    let model = model();
    let tok = model.require_tokenizer().unwrap();
    let prompt = tok.encode("The quick brown fox").unwrap();
    let greedy = generate(
        &model,
        &[(
            prompt.clone(),
            GenParams {
                max_new_tokens: 1,
                stop_at_eos: false,
                ..GenParams::default()
            },
        )],
        None,
    )
    .unwrap()
    .remove(0);
    // Make the greedy next token an EOS of a copy of the model.
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("tiny-flexolmo")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let cfg = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["eos_token_id"] = serde_json::json!(greedy.tokens[0]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let eos_model = Model::load(dir.path(), &LoadOptions::default()).unwrap();
    let mut dec = Decoder::new(&eos_model);
    dec.add(SeqRequest {
        prompt,
        params: GenParams {
            max_new_tokens: 1,
            ..GenParams::default()
        },
        logprobs: Some(0),
        ..SeqRequest::default()
    })
    .unwrap();
    let p = dec.step().unwrap().remove(0);
    assert_eq!(p.token.unwrap().token, greedy.tokens[0]);
    let g = p.finished.unwrap();
    assert_eq!(g.finish, engine::generate::FinishReason::Eos);
    assert!(g.tokens.is_empty());
}

/// A picker that takes the logits' first maximum (greedy) and records what it saw.
struct Greedy(std::sync::Mutex<Vec<(usize, usize)>>);

impl engine::generate::TokenPicker for Greedy {
    fn pick(&self, step: usize, hidden: &[f32], logits: &[f32]) -> engine::Result<u32> {
        self.0.lock().unwrap().push((step, hidden.len()));
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        Ok(best as u32)
    }
}

#[test]
fn a_token_picker_decodes_through_the_decoder() {
    let model = model();
    let greedy: Vec<SeqRequest> = requests(&model)
        .into_iter()
        .filter(|r| r.params.temperature == 0.0)
        .collect();
    let want: Vec<Generation> = greedy.iter().map(|r| alone(&model, r)).collect();
    let pickers: Vec<std::sync::Arc<Greedy>> = greedy
        .iter()
        .map(|_| std::sync::Arc::new(Greedy(Default::default())))
        .collect();
    let with_pickers: Vec<SeqRequest> = greedy
        .iter()
        .zip(&pickers)
        .map(|(r, p)| SeqRequest {
            picker: Some(engine::generate::Picker(p.clone())),
            ..r.clone()
        })
        .collect();
    let (got, routed) = engine::generate::generate_requests(&model, with_pickers).unwrap();
    assert_eq!(got, want, "picking the argmax is greedy decoding");
    assert!(
        !routed.is_empty(),
        "an MoE model's passes report their routing"
    );
    for (p, g) in pickers.iter().zip(&got) {
        let seen = p.0.lock().unwrap();
        // One pick per generated token (an EOS included), steps counting up, hidden states whole.
        let eos = usize::from(g.finish == engine::generate::FinishReason::Eos);
        assert_eq!(seen.len(), g.tokens.len() + eos);
        assert!(seen
            .iter()
            .enumerate()
            .all(|(i, &(step, h))| step == i && h == model.config().hidden_size));
    }
    // A picker only decodes greedily.
    let mut sampled = requests(&model).remove(1);
    sampled.picker = Some(engine::generate::Picker(pickers[0].clone()));
    assert!(Decoder::new(&model).add(sampled).is_err());
}
