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

/// A metric's value over a task, with its standard error and sample count. NaN is "undefined"
/// (null in results: no items, no standard error), so two aggregates are equal when each field is
/// equal or NaN in both.
#[derive(Clone, Debug)]
pub struct Aggregate {
    pub value: f64,
    pub stderr: f64,
    pub n: usize,
}

impl PartialEq for Aggregate {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
        same(self.value, other.value) && same(self.stderr, other.stderr) && self.n == other.n
    }
}

/// lm-evaluation-harness's default `bootstrap_iters` (`simple_evaluate` and its CLI, which does not
/// change it): the number of resamples behind a bootstrapped standard error.
pub const BOOTSTRAP_ITERS: usize = 100_000;

/// The resamples lm-evaluation-harness draws for the corpus translation metrics (`bleu`, `chrf`,
/// `chrf++`, `ter`): its `_compute_task_aggregations` lowers them to `min(bootstrap_iters, 100)`.
pub const TRANSLATION_BOOTSTRAP_ITERS: usize = 100;

/// lm-evaluation-harness's chunk size: chunk `i` of its resamples is drawn from `random.Random(i)`.
const BOOTSTRAP_CHUNK: usize = 1000;

/// Aggregates per-sample items of one metric (in document order) with lm-evaluation-harness
/// 0.4.13's value and standard error (`_compute_task_aggregations` and `stderr_for_metric`):
///
/// - means: sample standard deviation / sqrt(n) (`mean_stderr`);
/// - `perplexity`: its bootstrap over the log-likelihoods, [`BOOTSTRAP_ITERS`] resamples
///   ([`bootstrap_stderr`]);
/// - `bleu` / `chrf` / `ter`: the same bootstrap with [`TRANSLATION_BOOTSTRAP_ITERS`] resamples;
/// - `weighted_perplexity` (word and byte perplexity) and `bits_per_byte`: no standard error (the
///   harness reports `N/A`): NaN.
///
/// One item, or none, has no standard error either (NaN); no items have no value. Items of one
/// metric share a kind: mixed kinds give NaN (not a panic).
pub fn aggregate(items: &[Item]) -> Aggregate {
    let n = items.len();
    let nan = Aggregate {
        value: f64::NAN,
        stderr: f64::NAN,
        n,
    };
    let Some(first) = items.first() else {
        return nan;
    };
    match first {
        Item::Mean(_) => {
            let Some(xs) = collect(items, |i| match i {
                Item::Mean(v) => Some(*v),
                _ => None,
            }) else {
                return nan;
            };
            let (value, stderr) = mean_stderr(&xs);
            Aggregate { value, stderr, n }
        }
        Item::Perplexity(_) => {
            let Some(lls) = collect(items, |i| match i {
                Item::Perplexity(l) => Some(*l),
                _ => None,
            }) else {
                return nan;
            };
            let value = perplexity(lls.iter().copied(), n);
            let stderr = if n > 1 {
                bootstrap_stderr(n, BOOTSTRAP_ITERS, |draws| {
                    perplexity(draws.map(|i| lls[i]), n)
                })
            } else {
                f64::NAN
            };
            Aggregate { value, stderr, n }
        }
        Item::WeightedPerplexity(..) | Item::BitsPerByte(..) => {
            let bpb = matches!(first, Item::BitsPerByte(..));
            let Some(pairs) = collect(items, |i| match i {
                Item::WeightedPerplexity(a, b) if !bpb => Some((*a, *b)),
                Item::BitsPerByte(a, b) if bpb => Some((*a, *b)),
                _ => None,
            }) else {
                return nan;
            };
            // `weighted_mean`: sum(a) / sum(b), each summed in order.
            let a: f64 = pairs.iter().map(|p| p.0).sum();
            let b: f64 = pairs.iter().map(|p| p.1).sum();
            let wm = a / b;
            let value = if bpb {
                -wm / std::f64::consts::LN_2
            } else {
                (-wm).exp()
            };
            Aggregate {
                value,
                stderr: f64::NAN,
                n,
            }
        }
        Item::Translation(t, ..) => {
            if items
                .iter()
                .any(|i| !matches!(i, Item::Translation(u, ..) if u == t))
            {
                return nan;
            }
            translation_aggregate(*t, items)
        }
    }
}

/// The values `pick` finds in every item, or `None` when some item is of another kind.
fn collect<T>(items: &[Item], pick: impl Fn(&Item) -> Option<T>) -> Option<Vec<T>> {
    items.iter().map(pick).collect()
}

/// lm-evaluation-harness's `perplexity` aggregation of `n` log-likelihoods: `exp(-mean)`, the mean
/// summed in order as Python's `sum` does.
fn perplexity(lls: impl Iterator<Item = f64>, n: usize) -> f64 {
    let mut s = 0.0;
    for l in lls {
        s += l;
    }
    (-(s / n as f64)).exp()
}

/// BLEU / chrF / TER over translation items of one metric, with lm-evaluation-harness's bootstrap
/// of the corpus score.
fn translation_aggregate(t: Translation, items: &[Item]) -> Aggregate {
    let n = items.len();
    let stderr_of = |stat: &(dyn Fn(&mut Draws) -> f64 + Sync)| {
        if n > 1 {
            bootstrap_stderr(n, TRANSLATION_BOOTSTRAP_ITERS, stat)
        } else {
            f64::NAN
        }
    };
    if let Some((t, seg)) = translation_stats(items) {
        // Each segment is scored once; a resample sums its segments' statistics, which is what
        // rescoring the resampled corpus computes (same draws, same order, same numbers).
        let all: Vec<&SegmentStats> = seg.iter().collect();
        let value = t.score_stats(&all);
        let stderr = stderr_of(&|draws: &mut Draws| {
            let resample: Vec<&SegmentStats> = draws.map(|i| &seg[i]).collect();
            t.score_stats(&resample)
        });
        return Aggregate { value, stderr, n };
    }
    // Documents with differing reference counts: a resample's reference streams depend on which
    // documents it drew, so each resample is rescored.
    let all: Vec<&Item> = items.iter().collect();
    let value = translation_corpus(t, &all);
    let stderr = stderr_of(&|draws: &mut Draws| {
        let resample: Vec<&Item> = draws.map(|i| &items[i]).collect();
        translation_corpus(t, &resample)
    });
    Aggregate { value, stderr, n }
}

/// The corpus score of translation items (rescored from their texts).
fn translation_corpus(t: Translation, items: &[&Item]) -> f64 {
    let (mut preds, mut refs) = (Vec::new(), Vec::new());
    for i in items {
        if let Item::Translation(_, p, r) = i {
            preds.push(p.as_str());
            refs.push(r.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
    t.corpus(&preds, &refs)
}

/// The indices of one resample of `n` items: CPython's `Random.choices(xs, k=n)` without weights
/// draws `floor(random() * n)` for each of the `n`, in order.
pub struct Draws<'a> {
    rnd: &'a mut PyRandom,
    n: usize,
    left: usize,
}

impl Iterator for Draws<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // `random() * n` is below n, so truncation is `floor` and the index is in range.
        Some((self.rnd.random() * self.n as f64) as usize)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

/// lm-evaluation-harness 0.4.13's `bootstrap_stderr(f, xs, iters)` for `n` items: `iters / c`
/// chunks of `c = min(1000, iters)` resamples, chunk `i` drawn with `random.Random(i).choices(xs,
/// k=n)`; `stat` computes the statistic of one resample from its draws; the result is the sample
/// standard deviation of all the statistics, in chunk order. NaN when `n == 0` or there are fewer
/// than two resamples.
///
/// Chunks are independent, so they run in parallel; the statistics are gathered in chunk order, so
/// the result does not depend on the number of threads.
pub fn bootstrap_stderr<F>(n: usize, iters: usize, stat: F) -> f64
where
    F: Fn(&mut Draws) -> f64 + Sync,
{
    let chunk = iters.min(BOOTSTRAP_CHUNK);
    if n == 0 || chunk == 0 {
        return f64::NAN;
    }
    use rayon::prelude::*;
    let stats: Vec<Vec<f64>> = (0..iters / chunk)
        .into_par_iter()
        .map(|i| {
            let mut rnd = PyRandom::new(i as u64);
            (0..chunk)
                .map(|_| {
                    stat(&mut Draws {
                        rnd: &mut rnd,
                        n,
                        left: n,
                    })
                })
                .collect()
        })
        .collect();
    let stats = stats.concat();
    if stats.len() < 2 {
        return f64::NAN;
    }
    sample_std(&stats)
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

/// lm-evaluation-harness's `sample_stddev`: sums in order, divided by n - 1.
fn sample_std(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)).sqrt()
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

    /// The slow way: rescore every resampled corpus (the same lm-eval draws).
    fn rescored(t: Translation, items: &[Item]) -> (f64, f64) {
        let all: Vec<&Item> = items.iter().collect();
        let se = bootstrap_stderr(items.len(), TRANSLATION_BOOTSTRAP_ITERS, |d| {
            let r: Vec<&Item> = d.map(|i| &items[i]).collect();
            translation_corpus(t, &r)
        });
        (translation_corpus(t, &all), se)
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
            let (value, stderr) = rescored(t, &items);
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
    /// (`RAYON_NUM_THREADS=1` for one thread).
    #[test]
    #[ignore = "timing: run by hand in release"]
    fn bootstrap_timing() {
        let lls: Vec<Item> = (0..1000)
            .map(|i| Item::Perplexity(-((i * 7919 % 1009) as f64) / 97.3))
            .collect();
        let start = std::time::Instant::now();
        let a = aggregate(&lls);
        println!(
            "perplexity, 1000 items, {BOOTSTRAP_ITERS} resamples: {:.3}s ({} threads), stderr {}",
            start.elapsed().as_secs_f64(),
            rayon::current_num_threads(),
            a.stderr
        );
        for (t, fast, slow) in compare_bootstraps(300) {
            println!(
                "{t:?}, 300 segments, {TRANSLATION_BOOTSTRAP_ITERS} resamples: over statistics \
                 {fast:.3}s, rescoring {slow:.3}s"
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
    fn draws_are_cpythons_choices() {
        // random.Random(0).choices(range(10), k=10); random.Random(99).choices(range(7), k=7);
        // random.Random(2).choices(range(1000), k=5)
        for (seed, n, k, want) in [
            (0, 10, 10, vec![8, 7, 4, 2, 5, 4, 7, 3, 4, 5]),
            (99, 7, 7, vec![2, 1, 1, 1, 5, 1, 2]),
            (2, 1000, 5, vec![956, 947, 56, 84, 835]),
        ] {
            let mut rnd = PyRandom::new(seed);
            let d = Draws {
                rnd: &mut rnd,
                n,
                left: k,
            };
            assert_eq!(d.collect::<Vec<_>>(), want, "seed {seed}");
        }
    }

    #[test]
    fn bootstrap_is_deterministic_and_lm_evals_kinds() {
        let items: Vec<Item> = (0..20)
            .map(|i| Item::Perplexity(-(i as f64) / 10.0))
            .collect();
        let a = aggregate(&items);
        assert_eq!(a, aggregate(&items));
        assert!(a.stderr > 0.0 && a.value > 1.0);
        // lm-eval reports no standard error for weighted perplexities and bits per byte, nor for
        // a single item.
        let w = aggregate(&[
            Item::WeightedPerplexity(-3.0, 2.0),
            Item::WeightedPerplexity(-5.0, 4.0),
        ]);
        assert!((w.value - 8f64.exp().powf(1.0 / 6.0)).abs() < 1e-12 && w.stderr.is_nan());
        let b = aggregate(&[Item::BitsPerByte(-1.0, 2.0), Item::BitsPerByte(-3.0, 2.0)]);
        assert!((b.value - 1.0 / std::f64::consts::LN_2).abs() < 1e-12 && b.stderr.is_nan());
        assert!(aggregate(&[Item::Perplexity(-1.0)]).stderr.is_nan());
        // Undefined equals undefined: reruns compare equal.
        assert_eq!(w, w.clone());
        // Mixed kinds are not one metric's items.
        assert!(aggregate(&[Item::Mean(1.0), Item::Perplexity(-1.0)])
            .value
            .is_nan());
    }
}
