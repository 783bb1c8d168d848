//! moeval's BLEU, chrF, TER, ROUGE and Porter stems against the numbers sacreBLEU, rouge_score
//! and NLTK produced on the same 240 sentence pairs (tasks/tests/data/metric_references.json,
//! written by scripts/make_metric_references.py; see tasks/tests/data/README.md).

use serde_json::Value;
use tasks::metrics::{aggregate, Item, Translation};
use tasks::rouge::{self, Rouge};
use tasks::{porter, sacrebleu};

const TOL: f64 = 1e-6;

fn data() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/metric_references.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference file")).expect("json")
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("`{k}` is a string"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("`{k}` is a number"))
}

fn close(what: &str, got: f64, want: f64, bad: &mut Vec<String>) {
    if (got - want).abs() > TOL {
        bad.push(format!("{what}: moeval {got} reference {want}"));
    }
}

fn report(bad: Vec<String>) {
    assert!(
        bad.is_empty(),
        "{} differences:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn porter_stems_equal_nltk() {
    let d = data();
    let stems = d["porter"].as_object().expect("porter map");
    assert!(stems.len() > 3000);
    let bad: Vec<String> = stems
        .iter()
        .filter(|(w, want)| porter::stem(w) != want.as_str().unwrap_or_default())
        .map(|(w, want)| format!("{w}: moeval {} NLTK {want}", porter::stem(w)))
        .collect();
    report(bad);
}

#[test]
fn rouge_equals_rouge_score() {
    let d = data();
    let mut bad = Vec::new();
    for (i, p) in d["pairs"].as_array().expect("pairs").iter().enumerate() {
        for (key, stem) in [("rouge", false), ("rouge_stem", true)] {
            for name in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
                let kind = Rouge::parse(name).expect("rouge type");
                let got = rouge::score(kind, s(p, "ref"), s(p, "hyp"), stem);
                close(
                    &format!("pair {i} {key} {name}"),
                    got,
                    f(&p[key], name),
                    &mut bad,
                );
            }
        }
    }
    report(bad);
}

#[test]
fn sentence_scores_equal_sacrebleu() {
    let d = data();
    let mut bad = Vec::new();
    for (i, p) in d["pairs"].as_array().expect("pairs").iter().enumerate() {
        let (h, r) = (s(p, "hyp"), s(p, "ref"));
        for (t, key) in [
            (Translation::Bleu, "sentence_bleu"),
            (Translation::Chrf, "sentence_chrf"),
            (Translation::Ter, "sentence_ter"),
        ] {
            close(
                &format!("pair {i} {key}"),
                t.sentence(h, &[r]),
                f(p, key),
                &mut bad,
            );
        }
    }
    report(bad);
}

#[test]
fn corpus_scores_equal_sacrebleu() {
    let d = data();
    let pairs = d["pairs"].as_array().expect("pairs");
    let mut bad = Vec::new();
    for c in d["corpora"].as_array().expect("corpora") {
        let (a, b) = (f(c, "start") as usize, f(c, "end") as usize);
        let seg = &pairs[a..b];
        let hyps: Vec<&str> = seg.iter().map(|p| s(p, "hyp")).collect();
        let one = vec![seg.iter().map(|p| s(p, "ref")).collect::<Vec<_>>()];
        let two = vec![one[0].clone(), seg.iter().map(|p| s(p, "ref2")).collect()];
        let name = s(c, "name");
        for (refs, suffix) in [(&one, ""), (&two, "_2refs")] {
            let scores = [
                ("bleu", sacrebleu::corpus_bleu(&hyps, refs)),
                ("chrf", sacrebleu::corpus_chrf(&hyps, refs)),
                ("ter", sacrebleu::corpus_ter(&hyps, refs)),
            ];
            for (m, got) in scores {
                let key = format!("{m}{suffix}");
                close(
                    &format!("{name} {key}"),
                    got.expect("scored"),
                    f(c, &key),
                    &mut bad,
                );
            }
        }
    }
    report(bad);
}

/// The path a task takes: per-document items aggregated by the runner's corpus rule (the ten
/// generations; the bootstrap rescoring 1000 resamples keeps the corpus small).
#[test]
fn task_items_aggregate_to_the_corpus_score() {
    let d = data();
    let gens = &d["corpora"][1];
    assert_eq!(s(gens, "name"), "generations");
    let pairs = &d["pairs"].as_array().expect("pairs")[..10];
    for (t, key) in [
        (Translation::Bleu, "bleu"),
        (Translation::Chrf, "chrf"),
        (Translation::Ter, "ter"),
    ] {
        let items: Vec<Item> = pairs
            .iter()
            .map(|p| Item::Translation(t, s(p, "hyp").to_string(), vec![s(p, "ref").to_string()]))
            .collect();
        let a = aggregate(&items);
        assert!(
            (a.value - f(gens, key)).abs() < TOL,
            "{key}: {} vs {}",
            a.value,
            f(gens, key)
        );
        assert!(a.stderr > 0.0);
    }
}

#[test]
fn bad_reference_streams_are_errors() {
    let e = sacrebleu::corpus_bleu(&["a b", "c"], &[vec!["a b"]]).unwrap_err();
    assert!(e.contains("1 segments for 2 hypotheses"), "{e}");
    assert!(sacrebleu::corpus_chrf(&["a"], &[]).is_err());
    // No references for some document: nothing to score, not a panic.
    assert!(Translation::Ter.corpus(&["a"], &[vec![]]).is_nan());
}

#[test]
fn tokenizer_13a_examples() {
    assert_eq!(
        sacrebleu::tokenize_13a("The park's well-known gate costs 7.7 dollars, 1,000 in all."),
        "The park's well-known gate costs 7.7 dollars , 1,000 in all ."
    );
    assert_eq!(
        sacrebleu::tokenize_13a("a&amp;b (c) \"d\""),
        "a & b ( c ) \" d \""
    );
}
