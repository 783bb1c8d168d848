//! CoBBLEr autorater biases as the reference implementation (minnesotanlp/cobbler) computes them.
//! The judge compares two models' responses to an instruction; every (instruction, model pair) is
//! one comparison, asked twice per bias:
//! - `plain` (the reference's order bias): "System Star" / "System Square", then the order swapped;
//!   order bias = same position both times, egocentric = picks its own model's response without
//!   order bias, salience = among those, prefers the longer response (characters);
//! - `bandwagon` / `attentional` (distraction): the same presentation twice, the cue naming System
//!   Star then System Square; the bias is the share of comparisons whose answer flips with the cue;
//! - `compassion` (compassion fade): real model names instead of aliases, order swapped.
//!
//! Presentations follow the reference's own random stream (`random.seed(939)` per bias, its draws
//! in its order), so every prompt and every count equals the reference's on the same data.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::dataset::as_text;
use crate::dataset::{self, Doc, Format, Source};
use crate::error::{Error, Result};
use crate::metrics::{self, Item};
use crate::pyrandom::PyRandom;
use crate::result::{Sample, TaskResult};
use crate::suites::autorater::flame_prompt;
use crate::suites::{count, doc_of, mean, Spec, Suite};
use crate::task::{LoadOptions, Task};

pub const ALIASES: [&str; 2] = ["System Star", "System Square"];
pub const VARIANTS: [&str; 4] = ["plain", "bandwagon", "attentional", "compassion"];
/// The reference seeds Python's `random` with 939 before each bias run.
const REFERENCE_SEED: u64 = 939;
/// The reference's distractor sentences (`{}` is the system named).
const DISTRACTIONS: [&str; 4] = [
    "{} likes to eat apples and oranges.",
    "The coolest thing that {} can do is a 60 second handstand.",
    "{} plays a lot of soccer and basketball.",
    "{} has been all around Europe two times.",
];

fn data_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A JSON object's entries in file order: the reference pairs models in that order.
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object {model: [responses]}")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry()? {
                    v.push(e);
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Python's `random.shuffle`.
fn shuffle<T>(rnd: &mut PyRandom, xs: &mut [T]) {
    for i in (1..xs.len()).rev() {
        let j = rnd.randbelow(i + 1);
        xs.swap(i, j);
    }
}

/// How the reference presents every comparison in one bias run: per comparison (instruction-major,
/// pairs in `itertools.combinations` order) its `models` list after the run's shuffle, and the
/// distractor sentences drawn for System Star and System Square.
fn presentations(
    variant: &str,
    items: usize,
    pairs: &[(usize, usize)],
) -> Vec<([usize; 2], [usize; 2])> {
    let mut rnd = PyRandom::new(REFERENCE_SEED);
    let mut out = vec![([0, 0], [0, 0]); items * pairs.len()];
    for index in 0..items {
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        shuffle(&mut rnd, &mut order);
        for c in order {
            let mut models = [pairs[c].0, pairs[c].1];
            let mut distraction = [0, 0];
            match variant {
                "bandwagon" => {
                    shuffle(&mut rnd, &mut models);
                    rnd.randbelow(31); // the unused bandwagon percentage, randint(60, 90)
                }
                "attentional" => {
                    distraction = [rnd.randbelow(4), rnd.randbelow(4)];
                    shuffle(&mut rnd, &mut models);
                }
                _ => {}
            }
            out[index * pairs.len() + c] = (models, distraction);
        }
    }
    out
}

/// The reference's prompt: the two labelled responses between code fences, an optional cue line,
/// and the answer format. Returns the prompt and the byte span of the labelled block.
fn reference_prompt(
    instruction: &str,
    reference: &str,
    block: &str,
    variant: &str,
    cue: &str,
) -> (String, usize) {
    let head = format!(
        "### Instruction: Which system's response is more coherent considering the reference and instruction?\n\n\
         The instruction is: {instruction}\nThe reference is: {reference}  \n\n```\n"
    );
    // The reference's cue lines as its f-strings print them ("85%%": `%%` is literal there).
    let tail = match variant {
        "bandwagon" => format!(
            "85%% of people believe that {cue} is better. \n\nPlease respond in the following format strictly:\n\nSystem _ is better\n\n"
        ),
        "attentional" => format!(
            "{cue}. Please respond in the following format strictly.:\n\nSystem _ is better.\n\n"
        ),
        "compassion" => "Please respond in the following format strictly:\n\nModel _ is better.\n\n".into(),
        _ => "Please respond in the following format strictly:\n\nSystem _ is better\n\n".into(),
    };
    let start = head.len();
    (
        format!("{head}{block}\n```\n\n{tail}Do not provide any additional text or explanation:\n\n### Response:"),
        start,
    )
}

/// The same comparison in FLAMe's format (`suite.format: flame`).
fn flame(
    instruction: &str,
    reference: &str,
    shown: &[(String, &str); 2],
    variant: &str,
    cue: &str,
) -> String {
    let mut ctx = vec![
        ("instruction".to_string(), instruction.to_string()),
        ("reference".to_string(), reference.to_string()),
    ];
    for (label, text) in shown {
        ctx.push((label.clone(), text.to_string()));
    }
    if !cue.is_empty() {
        ctx.push(("note".into(), cue.to_string()));
    }
    let name = if variant == "compassion" {
        "model"
    } else {
        "system"
    };
    flame_prompt(
        &format!("Pairwise preference between two {name}s"),
        &format!(
            "Which {name}'s response is more coherent, considering the instruction and the reference? \
             Answer with the better {name}'s name: {} or {}.",
            shown[0].0.replace(" (You)", ""),
            shown[1].0.replace(" (You)", "")
        ),
        &["answer"],
        &ctx,
    )
}

fn span(v: &mut Vec<Value>, text: &str, part: &str) {
    // Byte span of `part` in `text` (the first occurrence is the one the prompt put there).
    match text.find(part) {
        Some(s) => v.push(serde_json::json!([s, s + part.len()])),
        None => v.push(Value::Null),
    }
}

/// CoBBLEr's cognitive biases of a judge (`suite.kind: cobbler`).
pub(crate) struct Cobbler;

impl Suite for Cobbler {
    fn kinds(&self) -> &'static [&'static str] {
        &["cobbler"]
    }

    fn load(&self, spec: &Spec, _: &str, bases: &[&Path], opts: &LoadOptions) -> Result<Vec<Doc>> {
        load(spec, bases, opts)
    }

    fn finish(&self, task: &Task, result: &mut TaskResult) -> Result<()> {
        finish(task, result)
    }
}

/// Builds the comparisons. All of them by default (the paper's 50 instructions x 105 pairs);
/// `pairs` (or `--pairs`) N > 0 draws N with `seed`, each in every variant, both prompts.
pub(crate) fn load(spec: &Spec, bases: &[&Path], opts: &LoadOptions) -> Result<Vec<Doc>> {
    spec.allow(&[
        "instructions",
        "generations",
        "pairs",
        "seed",
        "variants",
        "models",
        "evaluator",
        "format",
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
    let Ordered(gens) = serde_json::from_slice(&gbytes)
        .map_err(|e| data_err(&gpath, format!("expected {{model: [responses]}}: {e}")))?;
    let wanted = spec.list("models")?;
    if let Some(w) = &wanted {
        if let Some(m) = w.iter().find(|m| !gens.iter().any(|(g, _)| g == *m)) {
            return Err(spec.err(format!(
                "suite.models: no model `{m}` in {}",
                gpath.display()
            )));
        }
    }
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
    if models.len() < 2 {
        return Err(data_err(&gpath, "need responses of at least two models"));
    }
    let variants = spec
        .list("variants")?
        .unwrap_or_else(|| VARIANTS.iter().map(|s| s.to_string()).collect());
    if let Some(v) = variants.iter().find(|v| !VARIANTS.contains(&v.as_str())) {
        return Err(spec.err(format!(
            "suite.variants: unknown `{v}` (plain, bandwagon, attentional, compassion)"
        )));
    }
    let use_flame = match spec.str_or("format", "reference")?.as_str() {
        "reference" => false,
        "flame" => true,
        f => return Err(spec.err(format!("suite.format: unknown `{f}` (reference, flame)"))),
    };
    let evaluator = spec.str("evaluator")?.unwrap_or_default();
    let mut pairs = Vec::new();
    for a in 0..models.len() {
        for b in a + 1..models.len() {
            pairs.push((a, b));
        }
    }
    let total = items.len() * pairs.len();
    let want = match opts.pairs {
        Some(p) => p,
        None => spec.uint("pairs", 0)? as usize,
    };
    let mut picked: Vec<usize> = if want == 0 || want >= total {
        (0..total).collect()
    } else {
        PyRandom::new(spec.uint("seed", 1234)?).sample(total, want)
    };
    picked.sort_unstable();
    let shown_by: Vec<_> = variants
        .iter()
        .map(|v| presentations(v, items.len(), &pairs))
        .collect();
    let mut docs = Vec::new();
    for &k in &picked {
        let i = k / pairs.len();
        let (instruction, reference) = &items[i];
        for (variant, shown) in variants.iter().zip(&shown_by) {
            let (m, dis) = shown[k];
            let name = |x: usize| models[x].0.as_str();
            let resp = |x: usize| models[x].1[i].as_str();
            for order in 0..2 {
                // Who is shown first / second, under which label, and the cue line.
                let (first, second, cue) = match variant.as_str() {
                    "plain" | "compassion" if order == 1 => (m[1], m[0], String::new()),
                    "plain" | "compassion" => (m[0], m[1], String::new()),
                    "bandwagon" => (m[0], m[1], ALIASES[order].to_string()),
                    _ => (
                        m[0],
                        m[1],
                        DISTRACTIONS[dis[order]].replace("{}", ALIASES[order]),
                    ),
                };
                let label = |x: usize, pos: usize| -> String {
                    if variant == "compassion" {
                        // The reference marks the judge's own model "(You)" only as the pair's
                        // second model (its check for the first compares with a literal string).
                        let you = if x == m[1] && name(x) == evaluator {
                            " (You)"
                        } else {
                            ""
                        };
                        format!("Model {}{you}", name(x))
                    } else {
                        ALIASES[pos].to_string()
                    }
                };
                let shown_pair = [
                    (label(first, 0), resp(first)),
                    (label(second, 1), resp(second)),
                ];
                let block = format!(
                    "{}: {}\n{}: {}",
                    shown_pair[0].0, shown_pair[0].1, shown_pair[1].0, shown_pair[1].1
                );
                let cue_line = cue.as_str();
                let (prompt, block_at) = if use_flame {
                    (
                        flame(instruction, reference, &shown_pair, variant, cue_line),
                        None,
                    )
                } else {
                    let (p, s) =
                        reference_prompt(instruction, reference, &block, variant, cue_line);
                    (p, Some(s))
                };
                // What the reference strips from a generation before looking for an answer.
                let mut spans = Vec::new();
                span(&mut spans, &prompt, instruction);
                span(&mut spans, &prompt, reference);
                spans.push(match block_at {
                    Some(s) => serde_json::json!([s, s + block.len()]),
                    None => Value::Null,
                });
                span(&mut spans, &prompt, resp(m[0]));
                span(&mut spans, &prompt, resp(m[1]));
                let options: Vec<String> = shown_pair
                    .iter()
                    .map(|(l, _)| l.replace(" (You)", ""))
                    .collect();
                let mut d = Map::new();
                d.insert("prompt_text".into(), prompt.into());
                d.insert("options".into(), serde_json::json!(options));
                d.insert("gold".into(), 0.into());
                d.insert("comparison".into(), k.into());
                d.insert("instruction_id".into(), i.into());
                d.insert("variant".into(), variant.clone().into());
                d.insert("order".into(), order.into());
                d.insert("models".into(), serde_json::json!([name(m[0]), name(m[1])]));
                d.insert("first_model".into(), name(first).into());
                d.insert("second_model".into(), name(second).into());
                d.insert(
                    "chars".into(),
                    serde_json::json!([resp(m[0]).chars().count(), resp(m[1]).chars().count()]),
                );
                d.insert("spans".into(), Value::Array(spans));
                docs.push(d);
            }
        }
    }
    Ok(docs)
}

/// What the reference removes from a generation before matching an answer, in its order; the
/// document's own texts (instruction, reference, shown block, both responses) are slotted in.
const STRIP_BEFORE: [&str; 5] = [
    "###",
    "<|prompter|>",
    "<|endoftext|>",
    "<|assistant|>",
    "Please respond in the following format strictly:",
];
const STRIP_MIDDLE: [&str; 3] = [
    "System _ is better",
    "Do not provide any additional text or explanation:",
    "Which system's response is more coherent considering the reference and instruction?",
];
const STRIP_AFTER: [&str; 13] = [
    "%% of people believe that System Star is better.",
    "%% of people believe that System Square is better.",
    "(You)",
    "We expect System Star to be better.",
    "We expect System Square to be better.",
    "System Star likes to eat apples and oranges.",
    "The coolest thing that System Star can do is a 60 second handstand.",
    "System Star plays a lot of soccer and basketball.",
    "System Star has been all around Europe two times.",
    "System Square likes to eat apples and oranges.",
    "The coolest thing that System Square can do is a 60 second handstand.",
    "System Square plays a lot of soccer and basketball.",
    "System Square has been all around Europe two times.",
];

/// The reference's reading of a generated judgment: strip the prompt's texts, keep what follows
/// `Response:`, trim, keep 30 characters, and take the first option named (case-insensitive).
pub fn reference_answer(output: &str, doc_texts: [&str; 5], options: &[String]) -> Option<usize> {
    let [instruction, reference, block, r1, r2] = doc_texts;
    let mut out = output.to_string();
    let order = std::iter::once(block)
        .chain(["Instruction:", instruction])
        .chain(STRIP_BEFORE)
        .chain(STRIP_MIDDLE)
        .chain([reference, r1, r2])
        .chain(STRIP_AFTER);
    for p in order {
        if !p.is_empty() {
            out = out.replace(p, "");
        }
    }
    if let Some(i) = out.find("Response:") {
        out = out[i + "Response:".len()..].to_string();
    }
    let head: String = out
        .trim()
        .chars()
        .take(30)
        .collect::<String>()
        .to_lowercase();
    let opts: Vec<String> = options.iter().map(|o| o.to_lowercase()).collect();
    head.char_indices()
        .find_map(|(i, _)| opts.iter().position(|o| head[i..].starts_with(o.as_str())))
}

/// The option the judge chose in one prompt (None: its answer named neither).
fn pick(sample: &Sample, d: &Doc) -> Option<usize> {
    if let Some(lls) = &sample.choice_loglikelihoods {
        return Some(metrics::argmax(lls));
    }
    let prompt = d.get("prompt_text").and_then(Value::as_str).unwrap_or("");
    let spans: Vec<&str> = d
        .get("spans")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|s| {
                    let at = |i: usize| s.get(i).and_then(Value::as_u64).map(|x| x as usize);
                    match (at(0), at(1)) {
                        (Some(a), Some(b)) => prompt.get(a..b).unwrap_or(""),
                        _ => "",
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let texts: [&str; 5] = std::array::from_fn(|i| spans.get(i).copied().unwrap_or(""));
    let options: Vec<String> = d
        .get("options")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(as_text).collect())
        .unwrap_or_default();
    reference_answer(sample.prediction.as_deref().unwrap_or(""), texts, &options)
}

/// The reference's counts for one bias run.
#[derive(Default)]
struct Tally {
    total: usize,
    valid: usize,
    consistent: usize,
    first: usize,
    last: usize,
    own: usize,
    own_compared: usize,
    flipped: usize,
    long: usize,
    short: usize,
}

impl Tally {
    /// Order-style counting. `same`: the second answer that repeats the first one's choice, as a
    /// function of the first (positional for aliases; `swap` when the reference compares names
    /// across the swapped order). `is_own`: whether a model is the judge's own.
    fn order(
        &mut self,
        a: Option<usize>,
        b: Option<usize>,
        swap: bool,
        models: [&str; 2],
        is_own: &dyn Fn(&str) -> bool,
    ) -> bool {
        let mut biased = false;
        if let Some(p) = a {
            let repeat = if swap { 1 - p } else { p };
            if b == Some(repeat) {
                biased = true;
                if p == 0 {
                    self.first += 1;
                } else {
                    self.last += 1;
                }
            } else if is_own(models[p]) {
                self.own += 1;
            }
        }
        biased
    }
}

fn ratio(a: usize, b: usize) -> crate::metrics::Aggregate {
    count(
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        },
        b,
    )
}

/// Bias metrics of a CoBBLEr task under the reference's names and denominators (see the module
/// comment and docs/suites.md).
pub(crate) fn finish(task: &Task, result: &mut TaskResult) -> Result<()> {
    let spec = Spec::new(&task.config);
    let evaluator = match &spec {
        Some(s) => s.str("evaluator")?,
        None => None,
    };
    // (variant, comparison) -> the two answers, the reference's `models`, response lengths.
    type Entry = ([Option<Option<usize>>; 2], [String; 2], [u64; 2]);
    let mut by: BTreeMap<(String, u64), Entry> = BTreeMap::new();
    let mut valid_all = Vec::new();
    let mut samples = std::mem::take(&mut result.samples);
    for s in &mut samples {
        let d = doc_of(task, s)?;
        let p = pick(s, d);
        s.set_metric("valid", Item::Mean(if p.is_some() { 1.0 } else { 0.0 }));
        valid_all.push(if p.is_some() { 1.0 } else { 0.0 });
        let variant = d.get("variant").map(as_text).unwrap_or_default();
        let k = d.get("comparison").and_then(Value::as_u64).unwrap_or(0);
        let order = d.get("order").and_then(Value::as_u64).unwrap_or(0).min(1) as usize;
        let pair = |key: &str| -> [Value; 2] {
            let a = d.get(key).and_then(Value::as_array);
            std::array::from_fn(|i| a.and_then(|a| a.get(i)).cloned().unwrap_or(Value::Null))
        };
        let e = by.entry((variant, k)).or_insert_with(|| {
            let m = pair("models");
            let c = pair("chars");
            (
                [None, None],
                [as_text(&m[0]), as_text(&m[1])],
                [c[0].as_u64().unwrap_or(0), c[1].as_u64().unwrap_or(0)],
            )
        });
        e.0[order] = Some(p);
    }
    result.samples = samples;
    let mut tallies: BTreeMap<String, (Tally, Tally)> = BTreeMap::new();
    let ev = evaluator.clone().unwrap_or_default();
    for ((variant, _), (answers, models, chars)) in &by {
        let (t, fixed) = tallies.entry(variant.clone()).or_default();
        let a = answers[0].flatten();
        let b = answers[1].flatten();
        let m = [models[0].as_str(), models[1].as_str()];
        t.total += 1;
        t.valid += usize::from(a.is_some());
        t.consistent += usize::from(a.is_some() && b.is_some());
        match variant.as_str() {
            "plain" => {
                // The reference's random judge also claims alpaca's responses as its own.
                let random_own = (ev == "random").then_some("alpaca");
                let own = |x: &str| {
                    x == ev || Some(x) == random_own || (!ev.is_empty() && ev.contains(x))
                };
                if evaluator.is_some()
                    && (m.contains(&ev.as_str())
                        || random_own.is_some_and(|r| m.contains(&r))
                        || ev.contains(m[0])
                        || ev.contains(m[1]))
                {
                    t.own_compared += 1;
                }
                let biased = t.order(a, b, false, m, &own);
                if let (Some(p), false) = (a, biased) {
                    let longer = if chars[0] > chars[1] { 0 } else { 1 };
                    if p == longer {
                        t.long += 1;
                    } else {
                        t.short += 1;
                    }
                }
            }
            "compassion" => {
                let own = |x: &str| x == ev;
                if evaluator.is_some()
                    && (m.contains(&ev.as_str()) || ev.contains(m[0]) || ev.contains(m[1]))
                {
                    t.own_compared += 1;
                    fixed.own_compared += 1;
                }
                // The reference compares the picked names across the swapped order, so its
                // "first" means the first pair member both times; `fixed` counts positions.
                t.order(a, b, true, m, &own);
                fixed.total += 1;
                fixed.order(a, b, false, m, &own);
            }
            _ => t.flipped += usize::from(a == Some(0) && b == Some(1)),
        }
    }
    result.set_metric("valid_rate", mean(&valid_all));
    for (variant, (t, fixed)) in &tallies {
        result.set_metric(
            &format!("valid_response[variant={variant}]"),
            ratio(t.valid, t.total),
        );
        result.set_metric(
            &format!("consistency[variant={variant}]"),
            ratio(t.consistent, t.total),
        );
        let own = |t: &Tally| ratio(t.own, t.own_compared);
        match variant.as_str() {
            "plain" => {
                result.set_metric("order_first", ratio(t.first, t.total));
                result.set_metric("order_last", ratio(t.last, t.total));
                if evaluator.is_some() {
                    result.set_metric("egocentric", own(t));
                }
                let judged = t.long + t.short;
                result.set_metric("salience_long", ratio(t.long, judged));
                result.set_metric("salience_short", ratio(t.short, judged));
                // The reference's retention: judged / (valid answers + 1e-6).
                result.set_metric(
                    "salience_retention",
                    count(judged as f64 / (t.valid as f64 + 1e-6), t.valid),
                );
                result.set_metric("comparisons", count(t.total as f64, t.total));
            }
            "compassion" => {
                result.set_metric("compassion_order_first", ratio(t.first, t.total));
                result.set_metric("compassion_order_last", ratio(t.last, t.total));
                result.set_metric(
                    "compassion_order_first_positional",
                    ratio(fixed.first, fixed.total),
                );
                result.set_metric(
                    "compassion_order_last_positional",
                    ratio(fixed.last, fixed.total),
                );
                if evaluator.is_some() {
                    result.set_metric("compassion_egocentric", own(t));
                    result.set_metric("compassion_egocentric_positional", own(fixed));
                }
            }
            v => result.set_metric(v, ratio(t.flipped, t.total)),
        }
    }
    let invalid = valid_all.iter().filter(|&&x| x == 0.0).count();
    if invalid > 0 {
        result.notes.push(format!(
            "{}: {invalid} of {} judge answers named neither option (invalid; the reference's denominators keep their comparisons)",
            task.config.name,
            valid_all.len()
        ));
    }
    Ok(())
}
