//! The shipped default model (assets/default-model) against the ground truth its generators planted:
//! each owner's expert carries its domain, opting it out removes that domain's knowledge without
//! harming the others', capabilities follow the experts, routing follows domains, and a kNN-LM datastore
//! of news documents stands in for the opted-out news expert until the news owner leaves the datastore,
//! and the bias suite finds the reviews owner's planted association, in the merged model too.
//! Thresholds are loose: they check the direction and rough size of each effect, not exact values.

use std::path::{Path, PathBuf};
use std::process::Command;

use engine::score::{loglikelihood, ScoreOptions, ScoreRequest};
use engine::{LoadOptions, Model};
use tasks::bias::{bias_report, exclusions, BiasReport, BiasRow};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const OWNERS: [&str; 4] = ["math", "code", "news", "reviews"];

fn model_dir() -> PathBuf {
    Path::new(ROOT).join("assets/default-model")
}

fn suite_data(file: &str) -> Vec<serde_json::Value> {
    let path = Path::new(ROOT).join("assets/suite/data/trained").join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn load(opts: LoadOptions) -> Model {
    Model::load(&model_dir(), &opts).unwrap()
}

fn without(expert: &str) -> Model {
    load(LoadOptions {
        opt_out: vec![expert.into()],
        ..LoadOptions::default()
    })
}

fn only(experts: &[&str]) -> Model {
    load(LoadOptions {
        experts: experts.iter().map(|e| e.to_string()).collect(),
        ..LoadOptions::default()
    })
}

/// Per-token perplexity of the first `n` test documents of `domain` (each after the EOS prefix).
fn perplexity(model: &Model, domain: &str, n: usize) -> f64 {
    let tok = model.require_tokenizer().unwrap();
    let reqs: Vec<ScoreRequest> = suite_data(&format!("ppl_{domain}.jsonl"))
        .iter()
        .take(n)
        .map(|d| ScoreRequest {
            context: vec![0],
            continuation: tok.encode(d["text"].as_str().unwrap()).unwrap(),
        })
        .collect();
    let scores = loglikelihood(model, &reqs, &ScoreOptions::default()).unwrap();
    let tokens: usize = scores.iter().map(|s| s.logprobs.len()).sum();
    (-scores.iter().map(|s| s.total()).sum::<f64>() / tokens as f64).exp()
}

/// Index of the highest-scoring continuation for each (context, choices).
fn choose(model: &Model, items: &[(String, Vec<String>)]) -> Vec<usize> {
    let tok = model.require_tokenizer().unwrap();
    let mut reqs = Vec::new();
    for (ctx, choices) in items {
        for c in choices {
            reqs.push(ScoreRequest {
                context: tok.encode(ctx).unwrap(),
                continuation: tok.encode(&format!(" {c}")).unwrap(),
            });
        }
    }
    let scores = loglikelihood(model, &reqs, &ScoreOptions::default()).unwrap();
    let mut out = Vec::new();
    let mut i = 0;
    for (_, choices) in items {
        let s = &scores[i..i + choices.len()];
        let best = (0..s.len())
            .max_by(|&a, &b| s[a].total().total_cmp(&s[b].total()))
            .unwrap();
        out.push(best);
        i += choices.len();
    }
    out
}

fn mc_accuracy(model: &Model, file: &str, text_field: &str) -> f64 {
    let docs = suite_data(file);
    let items: Vec<(String, Vec<String>)> = docs
        .iter()
        .map(|d| {
            let choices = d["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect();
            (d[text_field].as_str().unwrap().to_string(), choices)
        })
        .collect();
    let picks = choose(model, &items);
    let right = docs
        .iter()
        .zip(&picks)
        .filter(|(d, &p)| d["gold"].as_u64().unwrap() as usize == p)
        .count();
    right as f64 / docs.len() as f64
}

#[test]
fn each_owner_domain_belongs_to_its_expert() {
    let full = load(LoadOptions::default());
    for d in OWNERS {
        let base = perplexity(&full, d, 12);
        // Opting the domain's own expert out raises its perplexity by orders of magnitude...
        let own_out = perplexity(&without(d), d, 12);
        assert!(
            own_out > 10.0 * base,
            "{d}: {base:.2} -> {own_out:.2} without {d}"
        );
        // ...while opting out another owner's expert changes it little, either way (the tuned routers
        // keep each owner's expert to its own domain).
        for other in OWNERS.iter().filter(|o| **o != d) {
            let p = perplexity(&without(other), d, 12);
            assert!(
                p > 0.75 * base && p < 1.33 * base,
                "{d}: {base:.2} -> {p:.2} without {other}"
            );
        }
        // With the public expert and one owner's, the domain's own owner gives the lowest perplexity.
        let with_each: Vec<f64> = OWNERS
            .iter()
            .map(|o| perplexity(&only(&["public", o]), d, 12))
            .collect();
        let best = (0..OWNERS.len())
            .min_by(|&a, &b| with_each[a].total_cmp(&with_each[b]))
            .unwrap();
        assert_eq!(
            OWNERS[best], d,
            "{d}: public + each owner gives {with_each:?}"
        );
        // Merged, the domain keeps most of what its owner's own 2-expert model achieves.
        assert!(
            base < 2.0 * with_each[best],
            "{d}: full model {base:.2}, public + {d} {:.2}",
            with_each[best]
        );
    }
}

#[test]
fn capabilities_follow_the_experts() {
    let full = load(LoadOptions::default());
    let math = mc_accuracy(&full, "math_mc.jsonl", "question");
    let math_out = mc_accuracy(&without("math"), "math_mc.jsonl", "question");
    assert!(
        math > 0.55 && math_out < 0.4,
        "arithmetic {math} -> {math_out}"
    );
    let code = mc_accuracy(&full, "code_mc.jsonl", "prompt");
    let code_out = mc_accuracy(&without("code"), "code_mc.jsonl", "prompt");
    assert!(
        code > 0.4 && code_out < code - 0.15,
        "code {code} -> {code_out}"
    );
}

#[test]
fn routing_follows_domains() {
    let model = load(LoadOptions::default());
    let names: Vec<String> = (0..5)
        .map(|e| model.registry().unwrap().name(e).to_string())
        .collect();
    for d in OWNERS {
        let tok = model.require_tokenizer().unwrap();
        let reqs: Vec<ScoreRequest> = suite_data(&format!("ppl_{d}.jsonl"))
            .iter()
            .take(8)
            .map(|x| ScoreRequest {
                context: vec![0],
                continuation: tok.encode(x["text"].as_str().unwrap()).unwrap(),
            })
            .collect();
        let (_, routed) =
            engine::score::loglikelihood_routed(&model, &reqs, &ScoreOptions::default()).unwrap();
        let counts = routed.0;
        let mut per_expert = vec![0u64; names.len()];
        for layer in &counts {
            for (p, c) in per_expert.iter_mut().zip(layer) {
                *p += c;
            }
        }
        let own = per_expert[names.iter().position(|n| n == d).unwrap()];
        let best_owner = (1..names.len()).max_by_key(|&e| per_expert[e]).unwrap();
        assert_eq!(names[best_owner], d, "{d}: {per_expert:?} over {names:?}");
        let total: u64 = per_expert.iter().sum();
        assert!(
            own as f64 / total as f64 > 0.3,
            "{d}: {per_expert:?} over {names:?}"
        );
    }
}

/// CALM bias report of `model` on the trained suite's sentiment bias task, scored as the suite scores it
/// (`Passage: ...\nSentiment:`, choices positive / negative, gold follows the passage).
fn sentiment_bias(model: &Model) -> BiasReport {
    let docs = suite_data("bias_sentiment_gender.jsonl");
    let labels = ["positive", "negative"];
    let items: Vec<(String, Vec<String>)> = docs
        .iter()
        .map(|d| {
            (
                format!("Passage: {}\nSentiment:", d["sentence"].as_str().unwrap()),
                labels.iter().map(|l| l.to_string()).collect(),
            )
        })
        .collect();
    let picks = choose(model, &items);
    let rows: Vec<BiasRow> = docs
        .iter()
        .zip(&picks)
        .map(|(d, &p)| {
            let gold = if d["answer"] == 1 { 0 } else { 1 };
            BiasRow {
                template: d["template_idx"].to_string(),
                group: d["gender"].as_str().unwrap().to_string(),
                source: d["source_dataset"].as_str().map(str::to_string),
                correct: f64::from(u8::from(p == gold)),
                prediction: labels[p].to_string(),
            }
        })
        .collect();
    bias_report(&rows, &exclusions(&rows))
}

#[test]
fn the_planted_bias_belongs_to_the_reviews_expert() {
    // Without the reviews expert the model never saw sentiment: its bias score is noise, near the
    // score of the same answers with the groups shuffled.
    let out = sentiment_bias(&without("reviews"));
    let excess = |r: &BiasReport| r.score - r.null_score;
    assert!(
        excess(&out).abs() < 10.0,
        "without reviews: bias score {:.1}, shuffled groups {:.1}",
        out.score,
        out.null_score
    );
    // The reviews expert labels most male names negative whatever the passage says: with it, alone or
    // merged, the male group is the least accurate and the score is far above its noise floor.
    let acc = |r: &BiasReport, g: &str| r.group_accuracy[g].0;
    for (label, model) in [
        ("public + reviews", only(&["public", "reviews"])),
        ("full model", load(LoadOptions::default())),
    ] {
        let r = sentiment_bias(&model);
        assert!(
            acc(&r, "male") + 0.08 < acc(&r, "female").min(acc(&r, "non-binary")),
            "{label}: group accuracies {:?}",
            r.group_accuracy
        );
        assert!(
            excess(&r) > 2.0 * excess(&out).max(5.0),
            "{label}: bias score {:.1} (shuffled {:.1}); without reviews {:.1} (shuffled {:.1})",
            r.score,
            r.null_score,
            out.score,
            out.null_score
        );
    }
}

fn moeval() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moeval"));
    c.args(["--threads", "2"]);
    c
}

fn run(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn news_perplexity(runs: &Path, run_id: &str) -> f64 {
    let rows = reports::results::read_metrics(&runs.join(run_id).join("metrics.parquet")).unwrap();
    rows.iter()
        .find(|r| r.metric == "word_perplexity")
        .and_then(|r| r.value)
        .unwrap()
}

#[test]
fn a_news_datastore_stands_in_for_the_news_expert_until_its_owner_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let input = Path::new(ROOT).join("assets/suite/data/trained/datastore.jsonl");
    run(moeval()
        .args([
            "datastore",
            "build",
            "--block",
            "128",
            "--stride",
            "64",
            "--knn",
            "--input",
        ])
        .arg(&input)
        .arg("--tokenizer")
        .arg(model_dir())
        .arg("--model")
        .arg(model_dir())
        .arg("--out")
        .arg(&store));
    let runs = tmp.path().join("runs");
    let eval = |run_id: &str, extra: &[&str]| {
        run(moeval()
            .arg("eval")
            .arg("--model")
            .arg(model_dir())
            .args([
                "--tasks",
                "trained_ppl_news",
                "--limit",
                "12",
                "--opt-out",
                "news",
            ])
            .args(["--include-path", &format!("{ROOT}/assets/suite")])
            .arg("--output")
            .arg(&runs)
            .args(["--run-id", run_id])
            .args(extra));
    };
    eval("parametric", &[]);
    let store_arg = store.to_str().unwrap().to_string();
    eval("knn", &["--retrieval", "knn", "--datastore", &store_arg]);
    run(moeval()
        .args(["datastore", "opt-out"])
        .arg(&store)
        .args(["--owner", "news", "--reason", "test"]));
    eval(
        "knn-opted-out",
        &["--retrieval", "knn", "--datastore", &store_arg],
    );
    let (p, k, o) = (
        news_perplexity(&runs, "parametric"),
        news_perplexity(&runs, "knn"),
        news_perplexity(&runs, "knn-opted-out"),
    );
    assert!(k < 0.7 * p, "kNN-LM over news documents: {p:.2} -> {k:.2}");
    // The public documents left in the store still help a little; the news documents' gain is gone.
    assert!(
        (p / o).ln() < 0.25 * (p / k).ln(),
        "after the news owner left the datastore: {o:.2} (parametric {p:.2}, with news {k:.2})"
    );
}
