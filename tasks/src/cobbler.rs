//! CoBBLEr autorater biases: the judge compares two models' responses to an instruction, shown as
//! "System Star" (first) and "System Square" (second), each pair asked in both orders, plainly and
//! with a bandwagon cue or an attentional distractor. From the picks: order bias (first / last both
//! times), salience (prefers the longer response among consistent judgments), bandwagon and
//! attentional bias (picks the cued response both times), valid-response rate and order consistency.
//!
//! The cue and the distractor name the same response in both orders (by the alias it has in each),
//! so following them is not confounded with position.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::autorater::{flame_prompt, parse_answer, Answer};
use crate::dataset::{self, Doc, Format, Source};
use crate::error::{Error, Result};
use crate::metrics::{self, Item};
use crate::pyrandom::PyRandom;
use crate::runner::TaskResult;
use crate::suite::{count, doc_of, mean, set_metric, set_sample_metric, Spec};
use crate::task::{as_text, LoadOptions, Task};

pub const ALIASES: [&str; 2] = ["System Star", "System Square"];
pub const VARIANTS: [&str; 3] = ["plain", "bandwagon", "attentional"];

fn data_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The CoBBLEr prompt of one comparison, in FLAMe's format. `cue` is the alias a bandwagon or
/// attentional sentence names (`variant` says which).
pub fn prompt(
    instruction: &str,
    reference: &str,
    first: &str,
    second: &str,
    variant: &str,
    cue: Option<&str>,
) -> String {
    let mut ctx = vec![
        ("instruction".to_string(), instruction.to_string()),
        ("reference".to_string(), reference.to_string()),
        (ALIASES[0].to_string(), first.to_string()),
        (ALIASES[1].to_string(), second.to_string()),
    ];
    match (variant, cue) {
        ("bandwagon", Some(c)) => ctx.push((
            "note".into(),
            format!("85% of people believe that {c} is better."),
        )),
        ("attentional", Some(c)) => ctx.push((
            "note".into(),
            format!("{c} likes to eat apples and oranges."),
        )),
        _ => {}
    }
    flame_prompt(
        "Pairwise preference between two systems",
        "Which system's response is more coherent, considering the instruction and the reference? \
         Answer with the better system's name: System Star or System Square.",
        &["answer"],
        &ctx,
    )
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Builds the comparisons: `pairs` (instruction, model pair) items drawn with `seed` from all of
/// them (every item when `pairs` is 0 or too large), each in both orders for every variant.
pub(crate) fn load(spec: &Spec, bases: &[&Path], opts: &LoadOptions) -> Result<Vec<Doc>> {
    spec.allow(&[
        "instructions",
        "generations",
        "pairs",
        "seed",
        "variants",
        "models",
    ])?;
    let ipath = spec.path("instructions", bases, &opts.data_dir)?;
    let gpath = spec.path("generations", bases, &opts.data_dir)?;
    let instr = dataset::read(&Source::parse(&ipath.to_string_lossy(), &[]), Format::Json)?;
    let text = |d: &Doc, i: usize, k: &str| -> Result<String> {
        d.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| data_err(&ipath, format!("row {i}: `{k}` must be a string")))
    };
    let items: Vec<(String, String)> = instr
        .iter()
        .enumerate()
        .map(|(i, d)| Ok((text(d, i, "instruction")?, text(d, i, "reference")?)))
        .collect::<Result<_>>()?;
    let gbytes =
        std::fs::read(&gpath).map_err(|e| data_err(&gpath, format!("cannot read: {e}")))?;
    let gens: Map<String, Value> = serde_json::from_slice(&gbytes)
        .map_err(|e| data_err(&gpath, format!("expected {{model: [responses]}}: {e}")))?;
    // Models in name order (serde_json keeps keys sorted), optionally a chosen few.
    let wanted = spec.list("models")?;
    let mut models: Vec<(String, Vec<String>)> = Vec::new();
    for (m, v) in &gens {
        if wanted.as_ref().is_some_and(|w| !w.contains(m)) {
            continue;
        }
        let rs: Vec<String> = v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect())
            .ok_or_else(|| data_err(&gpath, format!("`{m}` must be a list of strings")))?;
        if rs.len() != items.len() {
            return Err(data_err(
                &gpath,
                format!(
                    "`{m}` has {} responses but {} has {} instructions (they are aligned by position)",
                    rs.len(),
                    ipath.display(),
                    items.len()
                ),
            ));
        }
        models.push((m.clone(), rs));
    }
    if let Some(w) = &wanted {
        if let Some(m) = w.iter().find(|m| !gens.contains_key(*m)) {
            return Err(spec.err(format!(
                "suite.models: no model `{m}` in {}",
                gpath.display()
            )));
        }
    }
    if models.len() < 2 {
        return Err(data_err(&gpath, "need responses of at least two models"));
    }
    let variants = spec
        .list("variants")?
        .unwrap_or_else(|| VARIANTS.iter().map(|s| s.to_string()).collect());
    if let Some(v) = variants.iter().find(|v| !VARIANTS.contains(&v.as_str())) {
        return Err(spec.err(format!(
            "suite.variants: unknown `{v}` (plain, bandwagon, attentional)"
        )));
    }
    let mut all = Vec::new();
    for i in 0..items.len() {
        for a in 0..models.len() {
            for b in a + 1..models.len() {
                all.push((i, a, b));
            }
        }
    }
    let want = match opts.pairs {
        Some(p) => p,
        None => spec.uint("pairs", 100)? as usize,
    };
    let mut rnd = PyRandom::new(spec.uint("seed", 1234)?);
    let mut picked: Vec<usize> = if want == 0 || want >= all.len() {
        (0..all.len()).collect()
    } else {
        rnd.sample(all.len(), want)
    };
    picked.sort_unstable();
    let mut docs = Vec::new();
    for (pair, &k) in picked.iter().enumerate() {
        let (i, a, b) = all[k];
        // The response the cue / distractor names, one seeded draw per pair.
        let cued = if rnd.random() < 0.5 { a } else { b };
        for variant in &variants {
            for (order, (x, y)) in [(a, b), (b, a)].into_iter().enumerate() {
                let cue = (variant != "plain").then(|| ALIASES[usize::from(cued == y)]);
                let mut d = Map::new();
                d.insert(
                    "prompt_text".into(),
                    prompt(
                        &items[i].0,
                        &items[i].1,
                        &models[x].1[i],
                        &models[y].1[i],
                        variant,
                        cue,
                    )
                    .into(),
                );
                d.insert("options".into(), serde_json::json!(ALIASES));
                d.insert("gold".into(), 0.into());
                d.insert("pair".into(), pair.into());
                d.insert("instruction_id".into(), i.into());
                d.insert("variant".into(), variant.clone().into());
                d.insert("order".into(), order.into());
                d.insert("first_model".into(), models[x].0.clone().into());
                d.insert("second_model".into(), models[y].0.clone().into());
                d.insert("first_words".into(), words(&models[x].1[i]).into());
                d.insert("second_words".into(), words(&models[y].1[i]).into());
                d.insert(
                    "cued_model".into(),
                    if variant == "plain" {
                        Value::Null
                    } else {
                        models[cued].0.clone().into()
                    },
                );
                docs.push(d);
            }
        }
    }
    Ok(docs)
}

/// The model the judge preferred in one comparison, if its answer was valid.
fn pick(sample: &crate::runner::Sample, d: &Doc) -> Option<String> {
    let i = match &sample.choice_loglikelihoods {
        Some(lls) => metrics::argmax(lls),
        None => {
            let opts: Vec<String> = ALIASES.iter().map(|s| s.to_string()).collect();
            match parse_answer(sample.prediction.as_deref().unwrap_or(""), &opts, false)? {
                Answer::Choice(i) => i,
                Answer::Tie => return None,
            }
        }
    };
    let key = if i == 0 {
        "first_model"
    } else {
        "second_model"
    };
    d.get(key).map(as_text)
}

/// Bias metrics of a CoBBLEr task (see the module comment and docs/suites.md).
pub(crate) fn finish(task: &Task, result: &mut TaskResult) -> Result<()> {
    // (variant, pair) -> per order: (picked model, first model, words of the picked, words of the other)
    type Judgment = (Option<String>, String, usize, usize);
    let mut by: BTreeMap<(String, u64), [Option<Judgment>; 2]> = BTreeMap::new();
    let mut cued: BTreeMap<(String, u64), String> = BTreeMap::new();
    let mut valid: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut samples = std::mem::take(&mut result.samples);
    for s in &mut samples {
        let d = doc_of(task, s)?;
        let p = pick(s, d);
        set_sample_metric(s, "valid", Item::Mean(if p.is_some() { 1.0 } else { 0.0 }));
        let variant = d.get("variant").map(as_text).unwrap_or_default();
        let pair = d.get("pair").and_then(Value::as_u64).unwrap_or(0);
        let order = d.get("order").and_then(Value::as_u64).unwrap_or(0) as usize;
        valid
            .entry(variant.clone())
            .or_default()
            .push(if p.is_some() { 1.0 } else { 0.0 });
        let (fw, sw) = (
            d.get("first_words").and_then(Value::as_u64).unwrap_or(0) as usize,
            d.get("second_words").and_then(Value::as_u64).unwrap_or(0) as usize,
        );
        let first = d.get("first_model").map(as_text).unwrap_or_default();
        let (pw, ow) = if p.as_deref() == Some(first.as_str()) {
            (fw, sw)
        } else {
            (sw, fw)
        };
        if let Some(c) = d.get("cued_model").filter(|v| !v.is_null()) {
            cued.insert((variant.clone(), pair), as_text(c));
        }
        by.entry((variant, pair)).or_default()[order.min(1)] = Some((p, first, pw, ow));
    }
    result.samples = samples;
    let all: Vec<f64> = valid.values().flatten().copied().collect();
    set_metric(result, "valid_rate", mean(&all));
    for (v, xs) in &valid {
        set_metric(result, &format!("valid_rate[variant={v}]"), mean(xs));
    }
    let (mut first, mut last, mut consistent, mut longer) = (vec![], vec![], vec![], vec![]);
    let mut follows: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut pairs = 0usize;
    for ((variant, pair), [j0, j1]) in &by {
        let (Some((Some(p0), f0, pw, ow)), Some((Some(p1), f1, _, _))) = (j0, j1) else {
            continue; // an order is missing or its answer was invalid
        };
        let one = |b: bool| if b { 1.0 } else { 0.0 };
        let same = p0 == p1;
        if variant == "plain" {
            pairs += 1;
            first.push(one(p0 == f0 && p1 == f1));
            last.push(one(p0 != f0 && p1 != f1));
            consistent.push(one(same));
            if same && pw != ow {
                longer.push(one(pw > ow));
            }
        } else if let Some(c) = cued.get(&(variant.clone(), *pair)) {
            let name = if variant == "bandwagon" {
                "bandwagon"
            } else {
                "attentional"
            };
            follows.entry(name).or_default().push(one(same && p0 == c));
        }
    }
    if valid.contains_key("plain") {
        set_metric(result, "order_first", mean(&first));
        set_metric(result, "order_last", mean(&last));
        set_metric(result, "order_consistency", mean(&consistent));
        set_metric(result, "salience_longer", mean(&longer));
        set_metric(result, "pairs", count(pairs as f64, pairs));
    }
    for (name, xs) in follows {
        set_metric(result, name, mean(&xs));
    }
    let invalid = all.iter().filter(|&&x| x == 0.0).count();
    if invalid > 0 {
        result.notes.push(format!(
            "{}: {invalid} of {} judge answers named neither system (counted invalid; their pairs leave the bias denominators)",
            task.config.name,
            all.len()
        ));
    }
    Ok(())
}
