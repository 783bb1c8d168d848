//! `tasks::filters` against lm-evaluation-harness 0.4.13's own filter code: every case and
//! pattern of tests/data/filter_references.json (made by scripts/make_filter_references.py)
//! must give exactly the reference's output, or fail where the reference raises.

use serde_json::{Map, Value};
use tasks::dataset::Doc;
use tasks::filters::{parse_filter_list, FilterPipeline, PyRegex, PythonStep};

fn data() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/filter_references.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference file")).unwrap()
}

/// The script's Python filters (`PY_FILTERS`), as a Python worker would run them.
fn python(step: &PythonStep, state: Vec<Value>, docs: &[Doc]) -> Result<Vec<Value>, String> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let f = step.function();
    assert_eq!(f.module, "filter_fns");
    match (step, f.name.as_str()) {
        (PythonStep::Custom { .. }, "upper_all") => Ok(state
            .iter()
            .map(|rs| strings(rs).iter().map(|r| r.to_uppercase()).collect())
            .collect()),
        (PythonStep::Custom { .. }, "answer_from_doc") => Ok(state
            .iter()
            .zip(docs)
            .map(|(rs, d)| vec![d["answer"].clone(); strings(rs).len()].into())
            .collect()),
        (PythonStep::Class { kwargs, .. }, "AppendSuffix") => {
            let suffix = kwargs.get("suffix").and_then(Value::as_str).unwrap_or("!");
            Ok(state
                .iter()
                .map(|rs| strings(rs).iter().map(|r| format!("{r}{suffix}")).collect())
                .collect())
        }
        _ => Err(format!("no such test filter {f}")),
    }
}

#[test]
fn pipelines_match_lm_eval() {
    let data = data();
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in data["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let responses: Vec<Vec<String>> =
            serde_json::from_value(case["responses"].clone()).unwrap();
        let docs: Vec<Doc> =
            serde_json::from_value::<Vec<Map<String, Value>>>(case["docs"].clone()).unwrap();
        for entry in case["filter_list"].as_array().unwrap() {
            let pipeline = entry["name"].as_str().unwrap();
            let expected = &case["results"][pipeline];
            let got =
                FilterPipeline::parse(entry).and_then(|p| p.apply(&responses, &docs, &mut python));
            checked += 1;
            match (got, expected.get("output"), expected.get("error")) {
                (Ok(out), Some(want), _) if Value::Array(out.clone()) == *want => {}
                (Err(_), None, Some(_)) => {}
                (got, _, _) => failures.push(format!(
                    "{name}/{pipeline}: moeval {got:?}\n    lm-eval {expected}"
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} pipelines differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 57, "only {checked} pipelines checked");
}

#[test]
fn real_task_filter_lists_parse() {
    let data = data();
    for case in data["cases"].as_array().unwrap().iter().take(5) {
        let list = parse_filter_list(Some(&case["filter_list"])).unwrap();
        assert_eq!(list.len(), case["filter_list"].as_array().unwrap().len());
    }
}

/// Python's `findall` / `sub` for every pattern lm-eval's bundled tasks give a filter, and for
/// syntax the engines read differently.
#[test]
fn patterns_match_python_re() {
    let data = data();
    let inputs: Vec<String> = serde_json::from_value(data["pattern_inputs"].clone()).unwrap();
    let mut failures = Vec::new();
    for p in data["patterns"].as_array().unwrap() {
        let pattern = p["pattern"].as_str().unwrap();
        let re = match PyRegex::new(pattern) {
            Ok(re) => re,
            Err(e) => {
                failures.push(format!("{pattern:?}: {e}"));
                continue;
            }
        };
        for (i, text) in inputs.iter().enumerate() {
            let findall = re.findall(text).map(Value::Array);
            if findall.as_ref() != Ok(&p["findall"][i]) {
                failures.push(format!(
                    "{pattern:?} findall on {text:?}: {findall:?}, Python {}",
                    p["findall"][i]
                ));
            }
            let sub = re.sub(text, "");
            if sub.as_deref().ok() != p["sub"][i].as_str() {
                failures.push(format!(
                    "{pattern:?} sub on {text:?}: {sub:?}, Python {}",
                    p["sub"][i]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Why fancy-regex: how many of the bundled tasks' filter patterns each engine compiles and runs
/// exactly like Python (`findall` on every input), used directly (no translation, the engine's
/// own match iterator). The counts are asserted so docs and code cannot drift.
#[test]
fn engine_choice_measured() {
    let data = data();
    let inputs: Vec<String> = serde_json::from_value(data["pattern_inputs"].clone()).unwrap();
    let measure = |source: &str| -> [usize; 6] {
        let task: Vec<&Value> = data["patterns"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["source"] == source)
            .collect();
        let to_value = |groups: Vec<Option<&str>>| -> Value {
            let s = |g: &Option<&str>| Value::String(g.unwrap_or("").to_string());
            match groups.len() {
                1 => s(&groups[0]),
                2 => s(&groups[1]),
                _ => Value::Array(groups[1..].iter().map(s).collect()),
            }
        };
        let (mut regex_compiles, mut regex_same, mut fancy_compiles, mut fancy_same, mut ours) =
            (0, 0, 0, 0, 0);
        for p in &task {
            let pattern = p["pattern"].as_str().unwrap();
            let want = |i: usize| &p["findall"][i];
            if let Ok(re) = regex::Regex::new(pattern) {
                regex_compiles += 1;
                let same = inputs.iter().enumerate().all(|(i, t)| {
                    let got: Vec<Value> = re
                        .captures_iter(t)
                        .map(|c| to_value(c.iter().map(|m| m.map(|m| m.as_str())).collect()))
                        .collect();
                    Value::Array(got) == *want(i)
                });
                regex_same += usize::from(same);
            }
            if let Ok(re) = fancy_regex::Regex::new(pattern) {
                fancy_compiles += 1;
                let same = inputs.iter().enumerate().all(|(i, t)| {
                    let got: Vec<Value> = re
                        .captures_iter(t)
                        .map(|c| {
                            let c = c.unwrap();
                            to_value((0..c.len()).map(|g| c.get(g).map(|m| m.as_str())).collect())
                        })
                        .collect();
                    Value::Array(got) == *want(i)
                });
                fancy_same += usize::from(same);
            }
            let re = PyRegex::new(pattern).unwrap();
            ours += usize::from(
                inputs
                    .iter()
                    .enumerate()
                    .all(|(i, t)| re.findall(t).map(Value::Array).as_ref() == Ok(want(i))),
            );
        }
        [
            task.len(),
            regex_compiles,
            regex_same,
            fancy_compiles,
            fancy_same,
            ours,
        ]
    };
    let (task, syntax) = (measure("task"), measure("syntax"));
    println!(
        "[patterns, regex compiles, regex identical, fancy-regex compiles, fancy-regex \
         identical, PyRegex identical]: tasks' {task:?}, Python syntax {syntax:?}"
    );
    assert_eq!(task, [28, 25, 25, 28, 28, 28]);
    assert_eq!(syntax, [23, 18, 10, 22, 12, 23]);
}
