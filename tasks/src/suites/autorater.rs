//! FLAMe-style autoraters: prompts in FLAMe's text-to-text format, pairwise judging of
//! RewardBench-format rows (seeded A/B order, ties and unparseable answers half, sections weighted
//! by RewardBench's fixed example counts), pointwise rating
//! (Pearson / Spearman against human scores) and classification (balanced accuracy), with the
//! judge deciding by log-likelihood of the answer options or by generating and parsing an answer.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::dataset::as_text;
use crate::dataset::Doc;
use crate::error::{Error, Result};
use crate::metrics::{self, Aggregate, Item};
use crate::pyrandom::PyRandom;
use crate::result::TaskResult;
use crate::suites::{count, doc_of, mean, Spec, Suite};
use crate::task::{LoadOptions, Task};

/// A FLAMe text-to-text prompt: an `INSTRUCTIONS:` block (title, description with the criteria,
/// output fields), a `CONTEXT:` block of labelled fields, and an `EVALUATION:` block opened at the
/// first output field, for the judge to continue.
pub fn flame_prompt(
    title: &str,
    description: &str,
    outputs: &[&str],
    context: &[(String, String)],
) -> String {
    let mut s = format!(
        "INSTRUCTIONS:\ntitle: {}\ndescription: {}\noutput fields: {}\n\nCONTEXT:\n",
        title.trim(),
        description.trim(),
        outputs.join(", ")
    );
    for (label, value) in context {
        s.push_str(&format!("{label}: {}\n", value.trim()));
    }
    s.push_str(&format!(
        "\nEVALUATION:\n{}:",
        outputs.first().copied().unwrap_or("answer")
    ));
    s
}

/// RewardBench's subsets and the section each belongs to.
pub fn rewardbench_section(subset: &str) -> Option<&'static str> {
    Some(match subset {
        "alpacaeval-easy" | "alpacaeval-length" | "alpacaeval-hard" | "mt-bench-easy"
        | "mt-bench-med" => "Chat",
        "mt-bench-hard"
        | "llmbar-natural"
        | "llmbar-adver-neighbor"
        | "llmbar-adver-GPTInst"
        | "llmbar-adver-GPTOut"
        | "llmbar-adver-manual" => "Chat Hard",
        "refusals-dangerous"
        | "refusals-offensive"
        | "xstest-should-refuse"
        | "xstest-should-respond"
        | "donotanswer" => "Safety",
        "math-prm" | "hep-cpp" | "hep-go" | "hep-java" | "hep-js" | "hep-python" | "hep-rust" => {
            "Reasoning"
        }
        _ => return None,
    })
}

fn lower_words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// A judge's generated answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Choice(usize),
    Tie,
}

/// Parses a generated answer against the options: the first non-empty line, lowercased and split
/// into words; a leading `answer` is skipped; the option whose words occur earliest wins (the
/// longer on a tie). With `allow_tie`, a first word `tie` / `equal` / `both` is a tie.
pub fn parse_answer(text: &str, options: &[String], allow_tie: bool) -> Option<Answer> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut words = lower_words(line);
    if words.first().is_some_and(|w| w == "answer") {
        words.remove(0);
    }
    if allow_tie
        && words
            .first()
            .is_some_and(|w| matches!(w.as_str(), "tie" | "equal" | "both"))
    {
        return Some(Answer::Tie);
    }
    let mut best: Option<(usize, usize, usize)> = None; // (position, -len, option)
    for (i, o) in options.iter().enumerate() {
        let ow = lower_words(o);
        if ow.is_empty() || ow.len() > words.len() {
            continue;
        }
        if let Some(pos) = (0..=words.len() - ow.len()).find(|&p| words[p..p + ow.len()] == ow[..])
        {
            let key = (pos, usize::MAX - ow.len(), i);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
    }
    best.map(|b| Answer::Choice(b.2))
}

/// Pearson correlation (NaN when either side is constant or fewer than two pairs).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (a, b) = (x[i] - mx, y[i] - my);
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    if sxx == 0.0 || syy == 0.0 {
        return f64::NAN;
    }
    sxy / (sxx * syy).sqrt()
}

/// Ranks with ties given their average rank (1-based), as `scipy.stats.rankdata`.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman correlation: Pearson of the average ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Balanced accuracy: the mean over gold classes of the fraction predicted correctly. A missing
/// prediction (unparseable answer) counts as wrong.
pub fn balanced_accuracy(gold: &[usize], pred: &[Option<usize>]) -> f64 {
    let mut per: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (g, p) in gold.iter().zip(pred) {
        let e = per.entry(*g).or_default();
        e.1 += 1;
        if *p == Some(*g) {
            e.0 += 1;
        }
    }
    if per.is_empty() {
        return f64::NAN;
    }
    per.values()
        .map(|(c, n)| *c as f64 / *n as f64)
        .sum::<f64>()
        / per.len() as f64
}

/// A statistic over pairs with a seeded bootstrap standard error (1000 resamples).
fn bootstrap(x: &[f64], y: &[f64], stat: fn(&[f64], &[f64]) -> f64) -> Aggregate {
    let n = x.len();
    let value = stat(x, y);
    let mut rnd = PyRandom::new(1234);
    let mut vals = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let idx: Vec<usize> = (0..n).map(|_| rnd.randbelow(n.max(1))).collect();
        let a: Vec<f64> = idx.iter().map(|&i| x[i]).collect();
        let b: Vec<f64> = idx.iter().map(|&i| y[i]).collect();
        let v = stat(&a, &b);
        if v.is_finite() {
            vals.push(v);
        }
    }
    let stderr = if vals.len() > 1 {
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        (vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (vals.len() - 1) as f64).sqrt()
    } else {
        f64::NAN
    };
    Aggregate { value, stderr, n }
}

fn doc_err(spec: &Spec, row: usize, field: &str, msg: impl Into<String>) -> Error {
    Error::Doc {
        file: spec.cfg.file.clone(),
        task: spec.cfg.name.clone(),
        doc_id: row,
        field: field.into(),
        msg: msg.into(),
    }
}

fn text_field(spec: &Spec, row: usize, d: &Doc, key: &str) -> Result<String> {
    match d.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => Err(doc_err(spec, row, key, "missing")),
        Some(v) => Ok(as_text(v)),
    }
}

fn number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// FLAMe-format judges over a data file's rows (`suite.kind: pairwise | pointwise |
/// classification`), RewardBench among them.
pub(crate) struct Autorater;

impl Suite for Autorater {
    fn kinds(&self) -> &'static [&'static str] {
        &["pairwise", "pointwise", "classification"]
    }

    fn load(&self, spec: &Spec, split: &str, bases: &[&Path], _: &LoadOptions) -> Result<Vec<Doc>> {
        let rows = crate::dataset::read_split(spec.cfg, split, bases)?.ok_or_else(|| {
            spec.err(format!(
                "no data file for split `{split}` in dataset_kwargs.data_files"
            ))
        })?;
        build(spec, rows)
    }

    fn finish(&self, task: &Task, result: &mut TaskResult) -> Result<()> {
        finish(task, result)
    }
}

/// Turns data rows into judge documents: each row keeps its columns and gains `prompt` (FLAMe
/// format), `options` (the answer options) and `gold` (the index of the correct option).
pub(crate) fn build(spec: &Spec, rows: Vec<Doc>) -> Result<Vec<Doc>> {
    let kind = spec.kind()?.to_string();
    let title = spec.required("title")?;
    let description = spec.required("description")?;
    let answer = spec.str_or("answer", "answer")?;
    let mut docs = Vec::with_capacity(rows.len());
    match kind.as_str() {
        "pairwise" => {
            spec.allow(&[
                "title",
                "description",
                "answer",
                "seed",
                "sections",
                "section",
                "reference",
            ])?;
            let mut rnd = PyRandom::new(spec.uint("seed", 1234)?);
            let extra = spec.string_map("sections")?;
            let only = spec.str("section")?;
            let reference = spec.str_or("reference", "reference")?;
            for (i, mut d) in rows.into_iter().enumerate() {
                let prompt = text_field(spec, i, &d, "prompt")?;
                let chosen = text_field(spec, i, &d, "chosen")?;
                let rejected = text_field(spec, i, &d, "rejected")?;
                let subset = text_field(spec, i, &d, "subset")?;
                let section = extra
                    .get(&subset)
                    .map(String::as_str)
                    .or_else(|| rewardbench_section(&subset))
                    .ok_or_else(|| {
                        doc_err(
                            spec,
                            i,
                            "subset",
                            format!("`{subset}` is not a RewardBench subset; map it to a section with suite.sections"),
                        )
                    })?
                    .to_string();
                // One draw per row, in file order, so the order does not depend on filtering.
                let chosen_first = rnd.random() < 0.5;
                if only.as_ref().is_some_and(|s| *s != section) {
                    continue;
                }
                let (a, b) = if chosen_first {
                    (&chosen, &rejected)
                } else {
                    (&rejected, &chosen)
                };
                let ctx = vec![
                    ("prompt".to_string(), prompt.clone()),
                    ("response A".to_string(), a.clone()),
                    ("response B".to_string(), b.clone()),
                ];
                // Reference-based baselines: prefer the response closer to the reference.
                if let Some(r) = d.get(&reference).filter(|v| !v.is_null()).map(as_text) {
                    let prefer = |c: f64, j: f64| {
                        if c > j {
                            1.0
                        } else if c == j {
                            0.5
                        } else {
                            0.0
                        }
                    };
                    let bleu = |x: &str| metrics::corpus_bleu(&[(x, r.as_str())]);
                    d.insert(
                        "baseline_bleu".into(),
                        prefer(bleu(&chosen), bleu(&rejected)).into(),
                    );
                    d.insert(
                        "baseline_rouge_l".into(),
                        prefer(
                            metrics::rouge_l(&chosen, &r),
                            metrics::rouge_l(&rejected, &r),
                        )
                        .into(),
                    );
                }
                d.insert(
                    "prompt_text".into(),
                    flame_prompt(&title, &description, &[&answer, "explanation"], &ctx).into(),
                );
                d.insert("options".into(), serde_json::json!(["A", "B"]));
                d.insert("gold".into(), Value::from(if chosen_first { 0 } else { 1 }));
                d.insert("section".into(), section.into());
                docs.push(d);
            }
        }
        "pointwise" | "classification" => {
            let pointwise = kind == "pointwise";
            spec.allow(if pointwise {
                &[
                    "title",
                    "description",
                    "answer",
                    "context",
                    "scale",
                    "human",
                ]
            } else {
                &[
                    "title",
                    "description",
                    "answer",
                    "context",
                    "labels",
                    "label",
                ]
            })?;
            let context = spec.list("context")?.ok_or_else(|| {
                spec.err("suite.context (the columns shown to the judge) is required")
            })?;
            let options: Vec<String> = if pointwise {
                let n = spec.uint("scale", 5)?;
                if n < 2 {
                    return Err(spec.err("suite.scale must be at least 2"));
                }
                (1..=n).map(|i| i.to_string()).collect()
            } else {
                spec.list("labels")?
                    .filter(|l| l.len() >= 2)
                    .ok_or_else(|| spec.err("suite.labels needs at least two labels"))?
            };
            let gold_col = if pointwise {
                spec.str_or("human", "human")?
            } else {
                spec.str_or("label", "label")?
            };
            for (i, mut d) in rows.into_iter().enumerate() {
                let ctx = context
                    .iter()
                    .map(|c| Ok((c.replace('_', " "), text_field(spec, i, &d, c)?)))
                    .collect::<Result<Vec<_>>>()?;
                let gold = if pointwise {
                    let h = number(d.get(&gold_col)).ok_or_else(|| {
                        doc_err(spec, i, &gold_col, "the human score must be a number")
                    })?;
                    // The option nearest the human score (for `acc`, exact agreement).
                    (h.round().clamp(1.0, options.len() as f64) as usize) - 1
                } else {
                    let l = text_field(spec, i, &d, &gold_col)?;
                    options.iter().position(|o| *o == l).ok_or_else(|| {
                        doc_err(
                            spec,
                            i,
                            &gold_col,
                            format!("`{l}` is not one of suite.labels {options:?}"),
                        )
                    })?
                };
                d.insert(
                    "prompt_text".into(),
                    flame_prompt(&title, &description, &[&answer], &ctx).into(),
                );
                d.insert("options".into(), serde_json::json!(options));
                d.insert("gold".into(), gold.into());
                docs.push(d);
            }
        }
        other => return Err(spec.err(format!("`{other}` is not an autorater kind"))),
    }
    Ok(docs)
}

/// What the judge picked for a sample: from the option log-likelihoods (always an answer, a tie
/// when the best is shared) or from the parsed generation (None when unparseable).
fn judged(sample: &crate::result::Sample, options: &[String], allow_tie: bool) -> Option<Answer> {
    if let Some(lls) = &sample.choice_loglikelihoods {
        let best = metrics::argmax(lls);
        let tied = lls.iter().filter(|&&l| l == lls[best]).count() > 1;
        return Some(if tied && allow_tie {
            Answer::Tie
        } else {
            Answer::Choice(best)
        });
    }
    parse_answer(
        sample.prediction.as_deref().unwrap_or(""),
        options,
        allow_tie,
    )
}

fn options_of(d: &Doc) -> Vec<String> {
    d.get("options")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(as_text).collect())
        .unwrap_or_default()
}

/// RewardBench's fixed example count of a subset (reward-bench's `EXAMPLE_COUNTS`): sections
/// weight their subsets by these, whatever rows a run has (math-prm counts 984, as much as the code
/// subsets together, though it has 447 rows).
pub fn rewardbench_count(subset: &str) -> Option<f64> {
    Some(match subset {
        "alpacaeval-easy" | "refusals-dangerous" | "refusals-offensive" | "llmbar-natural" => 100.0,
        "alpacaeval-length" | "alpacaeval-hard" => 95.0,
        "mt-bench-easy" => 28.0,
        "mt-bench-med" => 40.0,
        "mt-bench-hard" => 37.0,
        "math-prm" => 984.0,
        "llmbar-adver-neighbor" => 134.0,
        "llmbar-adver-GPTInst" => 92.0,
        "llmbar-adver-GPTOut" => 47.0,
        "llmbar-adver-manual" => 46.0,
        "xstest-should-refuse" => 154.0,
        "xstest-should-respond" => 250.0,
        "donotanswer" => 136.0,
        "hep-cpp" | "hep-go" | "hep-java" | "hep-js" | "hep-python" | "hep-rust" => 164.0,
        _ => return None,
    })
}

/// One scored row: its section, its subset and its score.
struct Scored {
    section: String,
    subset: String,
    score: f64,
}

/// RewardBench's section scores: per section the mean of its subset accuracies weighted by
/// [`rewardbench_count`] (a subset mapped with `suite.sections` and absent there weighs by its
/// rows), reported as `{name}[section=..]`; returns the plain mean of the sections present, the
/// leaderboard's average when all four are.
fn sectioned(result: &mut TaskResult, name: &str, rows: &[Scored]) -> Option<Aggregate> {
    let mut by: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    for r in rows {
        by.entry(&r.section)
            .or_default()
            .entry(&r.subset)
            .or_default()
            .push(r.score);
    }
    if by.is_empty() {
        return None;
    }
    let mut means = Vec::new();
    for (section, subsets) in &by {
        let (mut value, mut var, mut total, mut n) = (0.0, 0.0, 0.0, 0);
        let parts: Vec<(f64, Aggregate)> = subsets
            .iter()
            .map(|(s, v)| (rewardbench_count(s).unwrap_or(v.len() as f64), mean(v)))
            .collect();
        for (w, a) in &parts {
            total += w;
            n += a.n;
        }
        for (w, a) in &parts {
            value += a.value * w / total;
            if a.stderr.is_finite() {
                var += (a.stderr * w / total).powi(2);
            }
        }
        let a = Aggregate {
            value,
            stderr: var.sqrt(),
            n,
        };
        means.push(a.clone());
        result.set_metric(&format!("{name}[section={section}]"), a);
    }
    let k = means.len() as f64;
    Some(Aggregate {
        value: means.iter().map(|a| a.value).sum::<f64>() / k,
        stderr: means.iter().map(|a| a.stderr.powi(2)).sum::<f64>().sqrt() / k,
        n: rows.len(),
    })
}

/// Judge metrics of an autorater task (see docs/suites.md).
pub(crate) fn finish(task: &Task, result: &mut TaskResult) -> Result<()> {
    let Some(spec) = Spec::new(&task.config) else {
        return Ok(());
    };
    let kind = spec.kind()?.to_string();
    let n = result.samples.len();
    let mut invalid = 0usize;
    let mut rows: Vec<Scored> = Vec::new();
    let mut subsets: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut base_bleu: Vec<Scored> = Vec::new();
    let mut base_rouge: Vec<Scored> = Vec::new();
    let (mut human, mut judge) = (Vec::new(), Vec::new());
    let (mut gold, mut pred) = (Vec::new(), Vec::new());
    let human_col = spec.str_or("human", "human")?;
    let mut samples = std::mem::take(&mut result.samples);
    for s in &mut samples {
        let d = doc_of(task, s)?;
        let options = options_of(d);
        let g = d.get("gold").and_then(Value::as_u64).unwrap_or(0) as usize;
        let a = judged(s, &options, kind == "pairwise");
        if a.is_none() {
            invalid += 1;
        }
        s.set_metric("valid", Item::Mean(if a.is_some() { 1.0 } else { 0.0 }));
        match kind.as_str() {
            "pairwise" => {
                // As reward-bench scores a generative judge: an answer that is neither the
                // chosen nor the rejected response (a tie, or unparseable) is half right.
                let score = match a {
                    Some(Answer::Choice(i)) if i == g => 1.0,
                    Some(Answer::Choice(_)) => 0.0,
                    Some(Answer::Tie) | None => 0.5,
                };
                s.set_metric("pairwise_acc", Item::Mean(score));
                let section = d.get("section").map(as_text).unwrap_or_default();
                let subset = d.get("subset").map(as_text).unwrap_or_default();
                subsets.entry(subset.clone()).or_default().push(score);
                let scored = |score| Scored {
                    section: section.clone(),
                    subset: subset.clone(),
                    score,
                };
                rows.push(scored(score));
                if let Some(b) = d.get("baseline_bleu").and_then(Value::as_f64) {
                    base_bleu.push(scored(b));
                }
                if let Some(b) = d.get("baseline_rouge_l").and_then(Value::as_f64) {
                    base_rouge.push(scored(b));
                }
            }
            "pointwise" => {
                if let (Some(Answer::Choice(i)), Some(h)) = (a, number(d.get(&human_col))) {
                    let v: f64 = options
                        .get(i)
                        .and_then(|o| o.parse().ok())
                        .unwrap_or(f64::NAN);
                    s.set_metric("judge_score", Item::Mean(v));
                    judge.push(v);
                    human.push(h);
                }
            }
            _ => {
                let p = match a {
                    Some(Answer::Choice(i)) => Some(i),
                    _ => None,
                };
                s.set_metric("acc", Item::Mean(if p == Some(g) { 1.0 } else { 0.0 }));
                gold.push(g);
                pred.push(p);
            }
        }
    }
    result.samples = samples;
    match kind.as_str() {
        "pairwise" => {
            result.set_metric(
                "pairwise_acc",
                mean(&rows.iter().map(|r| r.score).collect::<Vec<_>>()),
            );
            for (sub, v) in &subsets {
                result.set_metric(&format!("pairwise_acc[subset={sub}]"), mean(v));
            }
            if let Some(a) = sectioned(result, "pairwise_acc", &rows) {
                result.set_metric("rewardbench_score", a);
            }
            if let Some(a) = sectioned(result, "bleu_baseline", &base_bleu) {
                result.set_metric("bleu_baseline_score", a);
            }
            if let Some(a) = sectioned(result, "rouge_l_baseline", &base_rouge) {
                result.set_metric("rouge_l_baseline_score", a);
            }
        }
        "pointwise" => {
            result.set_metric("pearson", bootstrap(&judge, &human, pearson));
            result.set_metric("spearman", bootstrap(&judge, &human, spearman));
        }
        _ => {
            let hits: Vec<f64> = gold
                .iter()
                .zip(&pred)
                .map(|(g, p)| if *p == Some(*g) { 1.0 } else { 0.0 })
                .collect();
            result.set_metric("acc", mean(&hits));
            let g2: Vec<f64> = gold.iter().map(|&g| g as f64).collect();
            let p2: Vec<f64> = pred
                .iter()
                .map(|p| p.map(|i| i as f64).unwrap_or(-1.0))
                .collect();
            let stat: fn(&[f64], &[f64]) -> f64 = |g, p| {
                let g: Vec<usize> = g.iter().map(|&x| x as usize).collect();
                let p: Vec<Option<usize>> = p
                    .iter()
                    .map(|&x| (x >= 0.0).then_some(x as usize))
                    .collect();
                balanced_accuracy(&g, &p)
            };
            result.set_metric("balanced_acc", bootstrap(&g2, &p2, stat));
        }
    }
    result.set_metric(
        "valid_rate",
        mean(
            &result
                .samples
                .iter()
                .map(|s| {
                    s.metrics
                        .iter()
                        .find(|(m, _)| m == "valid")
                        .and_then(|x| x.1.sample_value())
                        .unwrap_or(0.0)
                })
                .collect::<Vec<_>>(),
        ),
    );
    result.set_metric("unparseable", count(invalid as f64, n));
    if invalid > 0 {
        let scored = if kind == "pairwise" {
            "scored 0.5 as reward-bench does"
        } else {
            "scored as wrong"
        };
        result.notes.push(format!(
            "{}: {invalid} of {n} judge answers could not be parsed ({scored}, not dropped)",
            task.config.name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flame_format() {
        let p = flame_prompt(
            "Pick the better response",
            "Which is more helpful?",
            &["answer", "explanation"],
            &[
                ("prompt".into(), "Hi".into()),
                ("response A".into(), "Hello!".into()),
            ],
        );
        assert_eq!(
            p,
            "INSTRUCTIONS:\ntitle: Pick the better response\ndescription: Which is more helpful?\n\
             output fields: answer, explanation\n\nCONTEXT:\nprompt: Hi\nresponse A: Hello!\n\n\
             EVALUATION:\nanswer:"
        );
    }

    #[test]
    fn answers_parse() {
        let ab = vec!["A".to_string(), "B".to_string()];
        assert_eq!(
            parse_answer(" B\nexplanation: x", &ab, true),
            Some(Answer::Choice(1))
        );
        assert_eq!(
            parse_answer("answer: A", &ab, true),
            Some(Answer::Choice(0))
        );
        assert_eq!(parse_answer("Tie.", &ab, true), Some(Answer::Tie));
        assert_eq!(parse_answer("Tie.", &ab, false), None);
        assert_eq!(parse_answer("\n\n", &ab, true), None);
        let sys = vec!["System Star".to_string(), "System Square".to_string()];
        assert_eq!(
            parse_answer("System Square is better than System Star", &sys, false),
            Some(Answer::Choice(1))
        );
        assert_eq!(parse_answer("System is better", &sys, false), None);
    }

    #[test]
    fn correlations_and_balanced_accuracy() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((pearson(&x, &[2.0, 4.0, 6.0, 8.0]) - 1.0).abs() < 1e-12);
        // Monotone but not linear: Spearman 1, Pearson below 1.
        let y = [1.0, 4.0, 9.0, 100.0];
        assert!((spearman(&x, &y) - 1.0).abs() < 1e-12 && pearson(&x, &y) < 0.99);
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
        assert!(pearson(&x, &[1.0; 4]).is_nan());
        // Class 0: 2/2 right, class 1: 1/2 right (one unparseable).
        let b = balanced_accuracy(&[0, 0, 1, 1], &[Some(0), Some(0), Some(1), None]);
        assert!((b - 0.75).abs() < 1e-12);
    }
}
