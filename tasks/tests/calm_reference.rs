//! CALM against its reference code (github.com/vipulgupta1011/CALM): prompts byte for byte and bias
//! scores on fixed predictions, compared with `tests/data/calm_reference/`, which
//! `scripts/make_calm_references.py` wrote by running the reference's own code (see the README
//! there). Needs the CALM data in `../shared/datasets/calm`; skipped without it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tasks::lm::{GenerateRequest, LanguageModel, Loglikelihood, LoglikelihoodRequest, ModelError};
use tasks::{runner, LoadOptions, NoProgress, Registry, RunOptions, Task};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn data_dir() -> Option<PathBuf> {
    let d = manifest().join("../../shared/datasets/calm");
    if d.is_dir() {
        Some(d)
    } else {
        eprintln!("{} not found: CALM reference tests skipped", d.display());
        None
    }
}

fn reference(file: &str) -> String {
    std::fs::read_to_string(manifest().join("tests/data/calm_reference").join(file)).unwrap()
}

fn load(names: &[String], data: &Path) -> Vec<Task> {
    let reg = Registry::scan(&[manifest().join("suites")]).unwrap();
    let opts = LoadOptions {
        data_dir: data.to_path_buf(),
        ..LoadOptions::default()
    };
    names
        .iter()
        .map(|n| Task::load(reg.task_config(n, data).unwrap(), &opts).unwrap())
        .collect()
}

const TASKS: [&str; 3] = ["qa", "nli", "sentiment"];
const ATTRS: [&str; 2] = ["gender", "race"];

fn generative_tasks() -> Vec<String> {
    TASKS
        .iter()
        .flat_map(|t| ATTRS.iter().map(move |a| format!("calm_{t}_{a}")))
        .collect()
}

#[test]
fn prompts_equal_the_reference_codes_for_every_source() {
    let Some(data) = data_dir() else { return };
    let tasks = load(&generative_tasks(), &data);
    let prompts: HashMap<&str, Vec<String>> = tasks
        .iter()
        .map(|t| {
            let p = t.instances(1234).unwrap();
            (t.name(), p.into_iter().map(|i| i.context).collect())
        })
        .collect();
    let mut sources = BTreeSet::new();
    let mut n = 0;
    for line in reference("prompts.jsonl").lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let task = r["task"].as_str().unwrap();
        let doc = r["doc_id"].as_u64().unwrap() as usize;
        let want = r["prompt"].as_str().unwrap();
        assert_eq!(
            prompts[task][doc], want,
            "{task} document {doc} ({})",
            r["source_dataset"]
        );
        sources.insert(r["source_dataset"].as_str().unwrap().to_string());
        n += 1;
    }
    assert_eq!(sources.len(), 16, "{sources:?}");
    assert!(n >= 96);
}

/// A value as text (strings bare, numbers as written).
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| {
            f.to_uppercase()
                .chain(c.flat_map(char::to_lowercase))
                .collect()
        })
        .unwrap_or_default()
}

/// The scripted model of `make_calm_references.py` (`prediction`), answer for answer.
fn prediction(
    task: &str,
    attr: &str,
    prompt: &str,
    gold: &Value,
    source: &str,
    group: &str,
    template: u64,
) -> String {
    let groups: &[&str] = if attr == "gender" {
        &["male", "female", "non-binary"]
    } else {
        &["white", "black", "hispanic", "asian"]
    };
    let h = fnv1a(prompt);
    let r = h % 1000;
    let g = groups.iter().position(|x| *x == group).unwrap() as u64;
    let wrong = (h >> 20) % 10 < g || (template % 7 == 3 && g == groups.len() as u64 - 1);
    match task {
        "qa" => {
            if source == "mcscript" {
                return " yes".into();
            }
            if source == "duorc" && attr == "race" {
                return " I do not know".into();
            }
            if let Value::Array(a) = gold {
                let (letter, text) = (as_text(&a[0]), as_text(&a[1]));
                return if wrong {
                    " E".into()
                } else if r < 300 {
                    format!(" {letter}")
                } else if r < 450 {
                    format!(" {text}.")
                } else if r < 550 {
                    format!(" {}", "ABCD".find(letter.as_str()).unwrap())
                } else if r < 600 {
                    format!("\n{letter}")
                } else {
                    format!(" {letter}: {text}")
                };
            }
            let gold = as_text(gold);
            if wrong {
                format!(" unknown\n{gold}")
            } else if r < 500 {
                format!(" {gold}\nPassage: x")
            } else if r < 650 {
                format!(" {}!", gold.to_uppercase())
            } else if r < 700 {
                format!("\n{gold}")
            } else {
                format!(" ({gold})")
            }
        }
        "nli" => {
            let label = as_text(gold);
            if source == "wnli" && attr == "race" {
                return " Maybe".into();
            }
            if wrong {
                let w = match label.as_str() {
                    "True" => "False",
                    "False" => "Neither",
                    _ => "True",
                };
                format!(" {w}")
            } else if r < 400 {
                format!(" {label}")
            } else if r < 500 {
                format!(" {}.", label.to_lowercase())
            } else if r < 550 {
                " True or False".into()
            } else if r < 600 {
                format!("\n{label}")
            } else {
                format!(" {label}ly")
            }
        }
        _ => {
            if source == "EEC" {
                return " positive".into();
            }
            let pos = as_text(gold) == "1";
            let (w0, w1) = match (source == "Toxic", pos) {
                (true, true) => ("True", "False"),
                (true, false) => ("False", "True"),
                (false, true) => ("positive", "negative"),
                (false, false) => ("negative", "positive"),
            };
            if wrong {
                format!(" {w1}")
            } else if r < 400 {
                format!(" {w0}")
            } else if r < 470 {
                format!(" {}!", capitalize(w0))
            } else if r < 520 {
                format!(" not {w1}")
            } else if r < 570 {
                " none".into()
            } else if r < 620 {
                if pos { " yes" } else { " no" }.into()
            } else {
                format!("\n{w0}")
            }
        }
    }
}

/// Answers each prompt from a table.
struct Table(HashMap<String, String>);

impl LanguageModel for Table {
    fn loglikelihood(&self, _: &[LoglikelihoodRequest]) -> Result<Vec<Loglikelihood>, ModelError> {
        Err("generation only".into())
    }
    fn loglikelihood_rolling(&self, _: &[String]) -> Result<Vec<f64>, ModelError> {
        Err("generation only".into())
    }
    fn generate_until(&self, r: &[GenerateRequest]) -> Result<Vec<String>, ModelError> {
        Ok(r.iter().map(|q| self.0[&q.context].clone()).collect())
    }
}

#[test]
fn scores_equal_the_reference_codes_on_fixed_predictions() {
    let Some(data) = data_dir() else { return };
    let want: Value = serde_json::from_str(&reference("scores.json")).unwrap();
    let tasks = load(&generative_tasks(), &data);
    let mut table = HashMap::new();
    for t in &tasks {
        let (kind, attr) = t.name()["calm_".len()..].split_once('_').unwrap();
        let mut preds = Vec::new();
        for (inst, doc) in t.instances(1234).unwrap().iter().zip(t.docs()) {
            let p = prediction(
                kind,
                attr,
                &inst.context,
                &inst.target,
                doc["source_dataset"].as_str().unwrap(),
                doc[attr].as_str().unwrap(),
                doc["template_idx"].as_u64().unwrap(),
            );
            // A model answers a prompt once (the runner sends identical prompts once, across
            // tasks): the first answer, in task order, stands, as in the script.
            preds.push(table.entry(inst.context.clone()).or_insert(p).clone());
        }
        assert_eq!(
            format!("{:016x}", fnv1a(&preds.join("\u{0}"))),
            want["predictions_fnv1a"][t.name()].as_str().unwrap(),
            "{}: the scripted predictions differ from the reference run's",
            t.name()
        );
    }
    let results =
        runner::evaluate(&Table(table), &tasks, &RunOptions::default(), &NoProgress).unwrap();
    let mut six = Vec::new();
    for r in &results {
        let (kind, attr) = r.task["calm_".len()..].split_once('_').unwrap();
        let w = &want["tasks"][kind];
        let got = r.metric("bias_score").unwrap().value;
        let exp = w[attr].as_f64().unwrap();
        assert!(
            (got - exp).abs() < 1e-9,
            "{}: bias_score {got}, reference {exp} ({w}); notes: {:?}",
            r.task,
            r.notes
        );
        let excluded = w["excluded"].as_array().unwrap().len() as f64;
        assert_eq!(
            r.metric("excluded_sources").unwrap().value,
            excluded,
            "{}",
            r.task
        );
        assert_eq!(r.metric("degenerate").unwrap().value, 0.0);
        six.push(got);
    }
    let calm = six.iter().sum::<f64>() / six.len() as f64;
    let exp = want["calm_score"].as_f64().unwrap();
    assert!(
        (calm - exp).abs() < 1e-9,
        "CALM score {calm}, reference {exp}"
    );
}
