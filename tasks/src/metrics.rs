//! Per-sample metrics, their aggregation over a task and standard errors.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::pyrandom::PyRandom;

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
    /// (prediction, reference); aggregated as corpus BLEU.
    Bleu(String, String),
}

impl Item {
    /// A single-sample view of the value, for the per-sample table.
    pub fn sample_value(&self) -> Option<f64> {
        match self {
            Item::Mean(v) => Some(*v),
            Item::Perplexity(ll) => Some((-ll).exp()),
            Item::WeightedPerplexity(ll, n) => Some((-ll / n).exp()),
            Item::BitsPerByte(ll, n) => Some(-ll / n / std::f64::consts::LN_2),
            Item::Bleu(p, r) => Some(corpus_bleu(&[(p.as_str(), r.as_str())])),
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
    let value = corpus(items);
    let mut rnd = PyRandom::new(BOOTSTRAP_SEED);
    let mut stats = Vec::with_capacity(BOOTSTRAP_ITERS);
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
        Some(Item::Bleu(..)) => {
            let pairs: Vec<(&str, &str)> = items
                .iter()
                .filter_map(|i| {
                    if let Item::Bleu(p, r) = i {
                        Some((p.as_str(), r.as_str()))
                    } else {
                        None
                    }
                })
                .collect();
            corpus_bleu(&pairs)
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

/// `rouge_score`'s default tokenisation: lowercase, non-alphanumerics become spaces.
fn rouge_tokens(s: &str) -> Vec<String> {
    let t: String = s
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { ' ' })
        .collect();
    t.split_whitespace().map(str::to_string).collect()
}

/// ROUGE-L F-measure (longest common subsequence of tokens).
pub fn rouge_l(pred: &str, reference: &str) -> f64 {
    let p = rouge_tokens(pred);
    let r = rouge_tokens(reference);
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let mut dp = vec![0usize; r.len() + 1];
    for a in &p {
        let mut prev = 0;
        for (j, b) in r.iter().enumerate() {
            let tmp = dp[j + 1];
            dp[j + 1] = if a == b {
                prev + 1
            } else {
                dp[j + 1].max(dp[j])
            };
            prev = tmp;
        }
    }
    let lcs = dp[r.len()] as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let precision = lcs / p.len() as f64;
    let recall = lcs / r.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Splits punctuation off words (close to sacreBLEU's `13a` tokeniser for plain text).
fn bleu_tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in s.split_whitespace() {
        let mut cur = String::new();
        for c in w.chars() {
            if c.is_ascii_punctuation() {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            } else {
                cur.push(c);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

/// Corpus BLEU-4 (x100) with the brevity penalty and sacreBLEU's default `exp` smoothing.
pub fn corpus_bleu(pairs: &[(&str, &str)]) -> f64 {
    let mut matches = [0usize; 4];
    let mut totals = [0usize; 4];
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (p, r) in pairs {
        let p = bleu_tokens(p);
        let r = bleu_tokens(r);
        sys_len += p.len();
        ref_len += r.len();
        for n in 1..=4 {
            let mut rc: HashMap<&[String], usize> = HashMap::new();
            for g in r.windows(n) {
                *rc.entry(g).or_default() += 1;
            }
            for g in p.windows(n) {
                if let Some(c) = rc.get_mut(g) {
                    if *c > 0 {
                        *c -= 1;
                        matches[n - 1] += 1;
                    }
                }
            }
            totals[n - 1] += p.len().saturating_sub(n - 1);
        }
    }
    if sys_len == 0 {
        return 0.0;
    }
    let mut log_sum = 0.0;
    let mut k = 1.0;
    for n in 0..4 {
        if totals[n] == 0 {
            return 0.0;
        }
        let prec = if matches[n] == 0 {
            k *= 2.0;
            100.0 / (k * totals[n] as f64)
        } else {
            100.0 * matches[n] as f64 / totals[n] as f64
        };
        log_sum += prec.ln();
    }
    let bp = if sys_len < ref_len {
        (1.0 - ref_len as f64 / sys_len as f64).exp()
    } else {
        1.0
    };
    bp * (log_sum / 4.0).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

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
