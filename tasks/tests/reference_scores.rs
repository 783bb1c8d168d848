//! moeval's suite metrics against numbers the reference implementations' own code produced on
//! synthetic judges (tasks/tests/data/README.md says how each file was made).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tasks::lm::{GenerateRequest, LanguageModel, Loglikelihood, LoglikelihoodRequest, ModelError};
use tasks::{runner, suite, LoadOptions, Registry, RunOptions, Task, TaskResult};

fn data(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn suites() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("suites")
}

/// A judge that only generates: its answer is a function of the prompt.
struct Judge(fn(&str) -> String);

impl LanguageModel for Judge {
    fn loglikelihood(&self, r: &[LoglikelihoodRequest]) -> Result<Vec<Loglikelihood>, ModelError> {
        Ok(r.iter()
            .map(|_| Loglikelihood {
                logprob: 0.0,
                is_greedy: false,
            })
            .collect())
    }
    fn loglikelihood_rolling(&self, t: &[String]) -> Result<Vec<f64>, ModelError> {
        Ok(vec![0.0; t.len()])
    }
    fn generate_until(&self, r: &[GenerateRequest]) -> Result<Vec<String>, ModelError> {
        Ok(r.iter().map(|q| (self.0)(&q.context)).collect())
    }
}

fn run(task: &Task, lm: &Judge) -> TaskResult {
    let mut res = runner::evaluate(
        lm,
        std::slice::from_ref(task),
        &RunOptions::default(),
        &runner::NoProgress,
    )
    .unwrap();
    let mut r = res.remove(0);
    suite::finish(task, &mut r).unwrap();
    r
}

fn metric(r: &TaskResult, name: &str) -> f64 {
    r.metric(name)
        .unwrap_or_else(|| panic!("no metric {name} in {:?}", r.metrics))
        .value
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() < 1e-12,
        "{what}: moeval {got}, reference {want}"
    );
}

/// The response shown as `label` in a FLAMe pairwise prompt.
fn response<'a>(ctx: &'a str, label: &str) -> &'a str {
    let start = ctx.find(&format!("\nresponse {label}: ")).unwrap() + 13;
    ctx[start..].split('\n').next().unwrap()
}

#[test]
fn rewardbench_sections_equal_reward_bench() {
    let reference = data("rewardbench_reference.json");
    let dir = tempfile::tempdir().unwrap();
    // Each row's chosen response says what the judge does with it.
    let mut lines = String::new();
    for (i, row) in reference["rows"].as_array().unwrap().iter().enumerate() {
        let outcome = row["outcome"].as_str().unwrap();
        lines.push_str(
            &serde_json::json!({
                "prompt": format!("question {i}"),
                "chosen": format!("chosen {outcome}"),
                "rejected": "rejected",
                "subset": row["subset"],
            })
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(dir.path().join("rows.jsonl"), lines).unwrap();
    std::fs::write(
        dir.path().join("rb.yaml"),
        format!(
            "include: {}\ntask: rb\noutput_type: generate_until\ngeneration_kwargs: {{until: [\"\\n\"]}}\n\
             metric_list: []\ndataset_kwargs:\n  data_files:\n    test: {}\n",
            suites().join("autorater/_pairwise.yaml").display(),
            dir.path().join("rows.jsonl").display()
        ),
    )
    .unwrap();
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let opts = LoadOptions::default();
    let task = Task::load(reg.task_config("rb", &opts.data_dir).unwrap(), &opts).unwrap();
    let judge = Judge(|ctx| {
        let chosen = if response(ctx, "A").starts_with("chosen") {
            "A"
        } else {
            "B"
        };
        let other = if chosen == "A" { "B" } else { "A" };
        let outcome = response(ctx, chosen).trim_start_matches("chosen ");
        match outcome {
            "right" => format!(" {chosen}"),
            "wrong" => format!(" {other}"),
            _ => " I cannot tell.".into(),
        }
    });
    let r = run(&task, &judge);
    for (subset, want) in reference["subsets"].as_object().unwrap() {
        let got = metric(&r, &format!("pairwise_acc[subset={subset}]"));
        close(got, want.as_f64().unwrap(), subset);
    }
    for (section, want) in reference["sections"].as_object().unwrap() {
        let got = metric(&r, &format!("pairwise_acc[section={section}]"));
        close(got, want.as_f64().unwrap(), section);
    }
    close(
        metric(&r, "rewardbench_score"),
        reference["overall"].as_f64().unwrap(),
        "overall",
    );
}
