//! Per-sample metrics, their aggregation over a task and standard errors.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::pyrandom::PyRandom;
use crate::rouge::{self, Rouge};
use crate::sacrebleu;

/// The corpus-level translation metrics, computed by sacreBLEU's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    Bleu,
    Chrf,
    Ter,
}

impl Translation {
    pub fn parse(name: &str) -> Option<Translation> {
        match name {
            "bleu" => Some(Translation::Bleu),
            "chrf" => Some(Translation::Chrf),
            "ter" => Some(Translation::Ter),
            _ => None,
        }
    }

    /// The corpus score, lm-evaluation-harness's way: `refs[i]` are the references of segment
    /// `i`, regrouped into sacreBLEU's reference streams. Like the harness's `_sacreformat`
    /// (`zip(*refs)`), only as many streams as the segment with the fewest references has are
    /// used. NaN when there is nothing to score.
    pub fn corpus(self, preds: &[&str], refs: &[Vec<&str>]) -> f64 {
        let k = refs.iter().map(Vec::len).min().unwrap_or(0);
        let streams: Vec<Vec<&str>> = (0..k)
            .map(|j| refs.iter().map(|r| r[j]).collect())
            .collect();
        let r = match self {
            Translation::Bleu => sacrebleu::corpus_bleu(preds, &streams),
            Translation::Chrf => sacrebleu::corpus_chrf(preds, &streams),
            Translation::Ter => sacrebleu::corpus_ter(preds, &streams),
        };
        r.unwrap_or(f64::NAN)
    }

    /// A segment's sufficient statistics (its first `k` references): the corpus score of some
    /// segments is [`Translation::score_stats`] of theirs, in order.
    fn stats(self, pred: &str, refs: &[&str]) -> SegmentStats {
        match self {
            Translation::Bleu => SegmentStats::Bleu(sacrebleu::bleu_segment(pred, refs)),
            Translation::Chrf => SegmentStats::Chrf(sacrebleu::chrf_segment(pred, refs)),
            Translation::Ter => SegmentStats::Ter(sacrebleu::ter_segment(pred, refs)),
        }
    }

    /// The corpus score of segments from their statistics (what [`Translation::corpus`] gives).
    fn score_stats(self, stats: &[&SegmentStats]) -> f64 {
        match self {
            Translation::Bleu => sacrebleu::bleu_from(stats.iter().filter_map(|s| match s {
                SegmentStats::Bleu(b) => Some(b),
                _ => None,
            })),
            Translation::Chrf => sacrebleu::chrf_from(stats.iter().filter_map(|s| match s {
                SegmentStats::Chrf(c) => Some(c),
                _ => None,
            })),
            Translation::Ter => sacrebleu::ter_from(stats.iter().filter_map(|s| match s {
                SegmentStats::Ter(t) => Some(t),
                _ => None,
            })),
        }
    }

    /// One segment's score: sacreBLEU's `sentence_bleu` (effective n-gram order) for BLEU, the
    /// corpus score of the one segment for chrF and TER (what `sentence_chrf` / `sentence_ter`
    /// give).
    pub fn sentence(self, pred: &str, refs: &[&str]) -> f64 {
        match self {
            Translation::Bleu if !refs.is_empty() => sacrebleu::sentence_bleu(pred, refs),
            _ => self.corpus(&[pred], &[refs.to_vec()]),
        }
    }
}

/// One segment's statistics under a translation metric.
#[derive(Clone, Copy, Debug)]
enum SegmentStats {
    Bleu(sacrebleu::BleuStats),
    Chrf(sacrebleu::ChrfStats),
    Ter((usize, f64)),
}

/// Statistics of translation items that all have the same (non-zero) number of references, so
/// that every resample of them regroups the same references: `None` otherwise.
fn translation_stats(items: &[Item]) -> Option<(Translation, Vec<SegmentStats>)> {
    let Some(Item::Translation(t, _, first)) = items.first() else {
        return None;
    };
    let k = first.len();
    let mut out = Vec::with_capacity(items.len());
    for i in items {
        match i {
            Item::Translation(u, p, r) if u == t && r.len() == k && k > 0 => {
                let refs: Vec<&str> = r.iter().map(String::as_str).collect();
                out.push(t.stats(p, &refs));
            }
            _ => return None,
        }
    }
    Some((*t, out))
}

/// Whether larger values of a metric are better, when its task file does not say (`higher_is_better`
/// in `metric_list`): lm-evaluation-harness's registry for its metrics (perplexities, bits per byte
/// and TER are better small), and moeval's own derived metrics (bias scores and the counts that
/// describe exclusions are better small). `acc[gender=male]`-style group cells follow their metric.
pub fn higher_is_better(metric: &str) -> bool {
    let base = metric.split('[').next().unwrap_or(metric);
    !matches!(
        base,
        "perplexity"
            | "word_perplexity"
            | "byte_perplexity"
            | "bits_per_byte"
            | "ter"
            | "bias_score"
            | "bias_excess"
            | "bias_score_null"
            | "template_bias"
            | "templates_skipped"
            | "excluded_sources"
            | "degenerate"
    )
}

/// The aggregation moeval applies to a per-sample metric a task file configures, by
/// lm-evaluation-harness's name for it: `perplexity`, `weighted_perplexity`, `bits_per_byte`, the
/// corpus-level `bleu` / `chrf` / `ter`, and `mean` for everything else.
pub fn aggregation_of(metric: &str) -> &'static str {
    match metric {
        "perplexity" => "perplexity",
        "word_perplexity" | "byte_perplexity" => "weighted_perplexity",
        "bits_per_byte" => "bits_per_byte",
        "bleu" => "bleu",
        "chrf" => "chrf",
        "ter" => "ter",
        _ => "mean",
    }
}

/// A per-sample metric value, in the form its aggregation needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// Averaged (accuracy, exact match, F1, ROUGE-L): closed-form standard error.
    Mean(f64),
    /// A log-likelihood; aggregated as `exp(-mean)`.
    Perplexity(f64),
    /// (log-likelihood, words or bytes); aggregated as `exp(-sum ll / sum count)`.
    WeightedPerplexity(f64, f64),
    /// (log-likelihood, bytes); aggregated as `-sum ll / sum bytes / ln 2`.
    BitsPerByte(f64, f64),
    /// (metric, prediction, references); aggregated at corpus level by sacreBLEU's rules.
    Translation(Translation, String, Vec<String>),
}

impl Item {
    /// A single-sample view of the value, for the per-sample table.
    pub fn sample_value(&self) -> Option<f64> {
        match self {
            Item::Mean(v) => Some(*v),
            Item::Perplexity(ll) => Some((-ll).exp()),
            Item::WeightedPerplexity(ll, n) => Some((-ll / n).exp()),
            Item::BitsPerByte(ll, n) => Some(-ll / n / std::f64::consts::LN_2),
            Item::Translation(t, p, r) => {
                let r: Vec<&str> = r.iter().map(String::as_str).collect();
                Some(t.sentence(p, &r))
            }
        }
    }
}

/// A metric's value over a task, with its standard error and sample count.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    pub value: f64,
    pub stderr: f64,
    pub n: usize,
}

const BOOTSTRAP_ITERS: usize = 1000;
const BOOTSTRAP_SEED: u64 = 1234;

/// Aggregates per-sample items of one metric. Means use the sample standard deviation / sqrt(n);
/// everything else a seeded bootstrap (1000 resamples), so reruns give the same error bars.
pub fn aggregate(items: &[Item]) -> Aggregate {
    let n = items.len();
    if n == 0 {
        return Aggregate {
            value: f64::NAN,
            stderr: f64::NAN,
            n,
        };
    }
    if items.iter().all(|i| matches!(i, Item::Mean(_))) {
        let xs: Vec<f64> = items
            .iter()
            .filter_map(|i| {
                if let Item::Mean(v) = i {
                    Some(*v)
                } else {
                    None
                }
            })
            .collect();
        let (value, stderr) = mean_stderr(&xs);
        return Aggregate { value, stderr, n };
    }
    let mut rnd = PyRandom::new(BOOTSTRAP_SEED);
    let mut stats = Vec::with_capacity(BOOTSTRAP_ITERS);
    if let Some((t, seg)) = translation_stats(items) {
        // Each segment is scored once; a resample sums its segments' statistics, which is what
        // rescoring the resampled corpus computes (same draws, same order, same numbers).
        let all: Vec<&SegmentStats> = seg.iter().collect();
        let value = t.score_stats(&all);
        let mut resample = Vec::with_capacity(n);
        for _ in 0..BOOTSTRAP_ITERS {
            resample.clear();
            resample.extend((0..n).map(|_| &seg[rnd.randbelow(n)]));
            stats.push(t.score_stats(&resample));
        }
        let stderr = if n > 1 { sample_std(&stats) } else { f64::NAN };
        return Aggregate { value, stderr, n };
    }
    let value = corpus(items);
    let mut resample = Vec::with_capacity(n);
    for _ in 0..BOOTSTRAP_ITERS {
        resample.clear();
        resample.extend((0..n).map(|_| items[rnd.randbelow(n)].clone()));
        stats.push(corpus(&resample));
    }
    let stderr = if n > 1 { sample_std(&stats) } else { f64::NAN };
    Aggregate { value, stderr, n }
}

/// Mean and its standard error (sample standard deviation / sqrt(n); NaN for one sample).
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let se = if xs.len() > 1 {
        sample_std(xs) / n.sqrt()
    } else {
        f64::NAN
    };
    (mean, se)
}

fn sample_std(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

fn corpus(items: &[Item]) -> f64 {
    match items.first() {
        Some(Item::Perplexity(_)) => {
            let s: f64 = items
                .iter()
                .map(|i| if let Item::Perplexity(l) = i { *l } else { 0.0 })
                .sum();
            (-s / items.len() as f64).exp()
        }
        Some(Item::WeightedPerplexity(..)) | Some(Item::BitsPerByte(..)) => {
            let (mut a, mut b) = (0.0, 0.0);
            for i in items {
                if let Item::WeightedPerplexity(x, y) | Item::BitsPerByte(x, y) = i {
                    a += x;
                    b += y;
                }
            }
            if matches!(items[0], Item::BitsPerByte(..)) {
                -a / b / std::f64::consts::LN_2
            } else {
                (-a / b).exp()
            }
        }
        Some(Item::Translation(t, ..)) => {
            let (mut preds, mut refs) = (Vec::new(), Vec::new());
            for i in items {
                if let Item::Translation(_, p, r) = i {
                    preds.push(p.as_str());
                    refs.push(r.iter().map(String::as_str).collect::<Vec<_>>());
                }
            }
            t.corpus(&preds, &refs)
        }
        Some(Item::Mean(_)) => {
            items
                .iter()
                .map(|i| if let Item::Mean(v) = i { *v } else { 0.0 })
                .sum::<f64>()
                / items.len() as f64
        }
        None => f64::NAN,
    }
}

/// Index of the first maximum (numpy's `argmax`).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Multiple-choice metrics from per-choice log-likelihoods (conditional, and unconditional for
/// `acc_mutual_info`), the gold index or indices, and the choice texts.
pub fn multiple_choice(
    name: &str,
    lls: &[f64],
    uncond: Option<&[f64]>,
    greedy: &[bool],
    gold: &[usize],
    choices: &[String],
) -> Option<f64> {
    let hit = |p: usize| if gold.contains(&p) { 1.0 } else { 0.0 };
    Some(match name {
        "acc" => hit(argmax(lls)),
        "acc_norm" => {
            let v: Vec<f64> = lls
                .iter()
                .zip(choices)
                .map(|(l, c)| l / c.chars().count() as f64)
                .collect();
            hit(argmax(&v))
        }
        "acc_bytes" => {
            let v: Vec<f64> = lls
                .iter()
                .zip(choices)
                .map(|(l, c)| l / c.len() as f64)
                .collect();
            hit(argmax(&v))
        }
        "acc_mutual_info" => {
            let u = uncond?;
            let v: Vec<f64> = lls.iter().zip(u).map(|(c, u)| c - u).collect();
            hit(argmax(&v))
        }
        // A judge's pairwise preference (RewardBench): a tie for the best score counts half.
        "pairwise_acc" => {
            let best = lls.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let tied = lls.iter().filter(|&&l| l == best).count();
            if gold.iter().any(|&g| lls.get(g) == Some(&best)) {
                1.0 / tied as f64
            } else {
                0.0
            }
        }
        "exact_match" => {
            if gold
                .iter()
                .any(|&g| greedy.get(g).copied().unwrap_or(false))
            {
                1.0
            } else {
                0.0
            }
        }
        _ => return None,
    })
}

fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
}

/// Applies the answer-normalisation options of a metric entry to a text: `first_line`, `strip`,
/// `ignore_case`, `ignore_punctuation`, `ignore_numbers` (Hugging Face `exact_match` semantics),
/// `collapse_whitespace` (trim, runs of whitespace become one space: Super-NaturalInstructions).
pub fn normalise(s: &str, opts: &Map<String, Value>) -> String {
    let flag = |k: &str| opts.get(k).and_then(Value::as_bool).unwrap_or(false);
    let mut t = s.to_string();
    if flag("first_line") {
        t = t.trim_start().lines().next().unwrap_or("").to_string();
    }
    if flag("strip") {
        t = t.trim().to_string();
    }
    if flag("ignore_case") {
        t = t.to_lowercase();
    }
    if flag("ignore_punctuation") {
        t.retain(|c| !is_punct(c));
    }
    if flag("ignore_numbers") {
        t.retain(|c| !c.is_ascii_digit());
    }
    if flag("collapse_whitespace") {
        t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    t
}

/// SQuAD-style answer normalisation: lowercase, drop punctuation and articles, collapse spaces.
fn squad_tokens(s: &str) -> Vec<String> {
    let lower: String = s.to_lowercase().chars().filter(|c| !is_punct(*c)).collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(str::to_string)
        .collect()
}

/// Token-overlap F1 between a prediction and a reference (SQuAD).
pub fn token_f1(pred: &str, reference: &str) -> f64 {
    let p = squad_tokens(pred);
    let r = squad_tokens(reference);
    if p.is_empty() || r.is_empty() {
        return if p == r { 1.0 } else { 0.0 };
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for w in &r {
        *counts.entry(w).or_default() += 1;
    }
    let mut same = 0;
    for w in &p {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// ROUGE-L F-measure as rouge_score computes it, without stemming.
pub fn rouge_l(pred: &str, reference: &str) -> f64 {
    rouge::score(Rouge::L, reference, pred, false)
}

/// `sacrebleu.corpus_bleu` over (prediction, reference) pairs, one reference each (x100).
pub fn corpus_bleu(pairs: &[(&str, &str)]) -> f64 {
    let (preds, refs): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
    sacrebleu::corpus_bleu(&preds, &[refs]).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slow way: rescore every resampled corpus.
    fn rescored(items: &[Item]) -> (f64, f64) {
        let n = items.len();
        let mut rnd = PyRandom::new(BOOTSTRAP_SEED);
        let stats: Vec<f64> = (0..BOOTSTRAP_ITERS)
            .map(|_| {
                let r: Vec<Item> = (0..n).map(|_| items[rnd.randbelow(n)].clone()).collect();
                corpus(&r)
            })
            .collect();
        (corpus(items), sample_std(&stats))
    }

    /// Bootstraps `n` segments per metric both ways; returns (metric, seconds fast, seconds slow).
    fn compare_bootstraps(n: usize) -> Vec<(Translation, f64, f64)> {
        let mut out = Vec::new();
        let words = [
            "the",
            "cat",
            "sat",
            "on",
            "a",
            "mat",
            "7.7",
            "park's",
            "well-known",
            "dog",
        ];
        let sentence = |seed: usize, len: usize| -> String {
            (0..len)
                .map(|j| words[(seed * 7 + j * j * 3 + j) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        };
        for t in [Translation::Bleu, Translation::Chrf, Translation::Ter] {
            let items: Vec<Item> = (0..n)
                .map(|i| {
                    Item::Translation(
                        t,
                        sentence(i, 8 + i % 13),
                        vec![sentence(i + 1, 9 + i % 11), sentence(i + 2, 7 + i % 5)],
                    )
                })
                .collect();
            let start = std::time::Instant::now();
            let fast = aggregate(&items);
            let fast_s = start.elapsed().as_secs_f64();
            let start = std::time::Instant::now();
            let (value, stderr) = rescored(&items);
            let slow_s = start.elapsed().as_secs_f64();
            assert_eq!((fast.value, fast.stderr), (value, stderr), "{t:?}");
            out.push((t, fast_s, slow_s));
        }
        out
    }

    #[test]
    fn translation_bootstrap_from_statistics_equals_rescoring() {
        compare_bootstraps(25);
    }

    /// `cargo test --release -p tasks --lib bootstrap_timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing: run by hand in release"]
    fn bootstrap_timing() {
        for (t, fast, slow) in compare_bootstraps(300) {
            println!(
                "{t:?}, 300 segments: bootstrap over statistics {fast:.3}s, rescoring {slow:.3}s"
            );
        }
    }

    #[test]
    fn mean_stderr_is_sample_std_over_sqrt_n() {
        let (m, se) = mean_stderr(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(m, 0.75);
        assert!((se - 0.25).abs() < 1e-12);
    }

    #[test]
    fn multiple_choice_metrics() {
        let choices = vec!["a".to_string(), "bbbb".to_string()];
        let lls = [-2.0, -3.0];
        assert_eq!(
            multiple_choice("acc", &lls, None, &[true, false], &[1], &choices),
            Some(0.0)
        );
        // Per character: -2 vs -0.75.
        assert_eq!(
            multiple_choice("acc_norm", &lls, None, &[true, false], &[1], &choices),
            Some(1.0)
        );
        assert_eq!(
            multiple_choice(
                "acc_mutual_info",
                &lls,
                Some(&[-1.0, -5.0]),
                &[true, false],
                &[1],
                &choices
            ),
            Some(1.0)
        );
    }

    #[test]
    fn text_metrics() {
        assert!((token_f1("the cat sat", "a cat sat down") - 0.8).abs() < 1e-12);
        assert!((rouge_l("a b c d", "a c d e") - 0.75).abs() < 1e-12);
        assert!(
            (corpus_bleu(&[("the cat sat on the mat", "the cat sat on the mat")]) - 100.0).abs()
                < 1e-9
        );
        let o = serde_json::json!({"ignore_case": true, "ignore_punctuation": true, "first_line": true});
        assert_eq!(normalise(" Paris.\nmore", o.as_object().unwrap()), "paris");
    }

    #[test]
    fn bootstrap_is_seeded() {
        let items: Vec<Item> = (0..20)
            .map(|i| Item::Perplexity(-(i as f64) / 10.0))
            .collect();
        let a = aggregate(&items);
        assert_eq!(a, aggregate(&items));
        assert!(a.stderr > 0.0 && a.value > 1.0);
    }
}
