//! moeval's suite metrics against numbers the reference implementations' own code produced on
//! synthetic judges (tasks/tests/data/README.md says how each file was made).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tasks::lm::{GenerateRequest, LanguageModel, Loglikelihood, LoglikelihoodRequest, ModelError};
use tasks::{runner, LoadOptions, Registry, RunOptions, Task, TaskResult};

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
    task.finish(&mut r).unwrap();
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

/// The two labelled responses of a CoBBLEr reference-format prompt and the text after them.
fn cobbler_shown(prompt: &str) -> ([(&str, &str); 2], &str) {
    let start = prompt.find("\n```\n").unwrap() + 5;
    let end = prompt.rfind("\n```\n").unwrap();
    let (block, after) = (&prompt[start..end], &prompt[end..]);
    if let Some(rest) = block.strip_prefix("System Star: ") {
        let cut = rest.find("\nSystem Square: ").unwrap();
        return (
            [
                ("System Star", &rest[..cut]),
                ("System Square", &rest[cut + 16..]),
            ],
            after,
        );
    }
    let first = &block[..block.find(": ").unwrap()];
    let cut = block.rfind("\nModel ").unwrap();
    let second = &block[cut + 1..cut + block[cut..].find(": ").unwrap()];
    (
        [
            (first, &block[first.len() + 2..cut]),
            (second, &block[cut + 1 + second.len() + 2..]),
        ],
        after,
    )
}

fn cobbler_answer(pair: &[(&str, &str); 2], i: usize) -> String {
    format!("{} is better", pair[i].0.replace(" (You)", ""))
}

/// More letters "e", then the smaller text, then the first shown.
fn content_pick(pair: &[(&str, &str); 2]) -> usize {
    let (a, b) = (pair[0].1, pair[1].1);
    let (ca, cb) = (a.matches('e').count(), b.matches('e').count());
    usize::from(!(ca > cb || (ca == cb && a <= b)))
}

fn judge_content(p: &str) -> String {
    let (pair, _) = cobbler_shown(p);
    cobbler_answer(&pair, content_pick(&pair))
}

fn judge_longer(p: &str) -> String {
    let (pair, _) = cobbler_shown(p);
    let longer = pair[0].1.chars().count() < pair[1].1.chars().count();
    cobbler_answer(&pair, usize::from(longer))
}

fn judge_first_invalid(p: &str) -> String {
    let (pair, _) = cobbler_shown(p);
    if pair[0].1.chars().count() % 5 < 2 {
        "I cannot decide.".into()
    } else {
        cobbler_answer(&pair, 0)
    }
}

fn judge_cue(p: &str) -> String {
    let (pair, after) = cobbler_shown(p);
    if after.contains("System Star") {
        cobbler_answer(&pair, 0)
    } else if after.contains("System Square") {
        cobbler_answer(&pair, 1)
    } else {
        cobbler_answer(&pair, content_pick(&pair))
    }
}

#[test]
fn cobbler_biases_equal_the_reference() {
    let reference = data("cobbler_reference.json");
    let dir = tempfile::tempdir().unwrap();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets/cobbler");
    std::fs::write(
        dir.path().join("cob.yaml"),
        format!(
            "include: {}\ntask: cob\noutput_type: generate_until\ngeneration_kwargs: {{until: [\"\\n\"]}}\n\
             suite:\n  kind: cobbler\n  instructions: {}\n  generations: {}\n  evaluator: {}\n",
            suites().join("cobbler/_cobbler.yaml").display(),
            shared.join("llm_preference_evalset.json").display(),
            shared.join("full_n15_model_generations.json").display(),
            reference["evaluator"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let opts = LoadOptions::default();
    let task = Task::load(reg.task_config("cob", &opts.data_dir).unwrap(), &opts).unwrap();
    // The paper's full set: 50 instructions x 105 model pairs, 4 biases, 2 prompts each.
    assert_eq!(task.docs().len(), 5250 * 8);
    // Every prompt byte for byte: per bias the same multiset of prompts as the reference shows its
    // judge (count, SHA-256 of the sorted prompts joined by NUL, and the first in full).
    let instances = task.instances(1234).unwrap();
    for (bias, variant) in [
        ("order", "plain"),
        ("bandwagon", "bandwagon"),
        ("distraction", "attentional"),
        ("compassion", "compassion"),
    ] {
        let want = &reference["prompts"][bias];
        let mut prompts: Vec<&str> = instances
            .iter()
            .filter(|i| task.docs()[i.doc_id]["variant"] == variant)
            .map(|i| i.context.as_str())
            .collect();
        assert_eq!(
            prompts.len() as u64,
            want["count"].as_u64().unwrap(),
            "{bias}"
        );
        assert!(
            prompts.contains(&want["first"].as_str().unwrap()),
            "{bias}: the reference's first prompt is not among moeval's"
        );
        prompts.sort_unstable();
        let digest = {
            use sha2::{Digest, Sha256};
            let d = Sha256::digest(prompts.join("\0").as_bytes());
            d.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        assert_eq!(digest, want["sha256_sorted"].as_str().unwrap(), "{bias}");
    }
    let names: [(&str, &str, &str); 15] = [
        ("order", "First order percentage", "order_first"),
        ("order", "Last order percentage", "order_last"),
        ("order", "Me bias", "egocentric"),
        (
            "order",
            "Valid response percentage",
            "valid_response[variant=plain]",
        ),
        (
            "order",
            "Consistency percentage",
            "consistency[variant=plain]",
        ),
        ("bandwagon", "Bandwagon percentage", "bandwagon"),
        (
            "bandwagon",
            "Valid response percentage",
            "valid_response[variant=bandwagon]",
        ),
        ("distraction", "Distraction", "attentional"),
        (
            "distraction",
            "Valid response percentage",
            "valid_response[variant=attentional]",
        ),
        (
            "compassion",
            "First order percentage",
            "compassion_order_first",
        ),
        (
            "compassion",
            "Last order percentage",
            "compassion_order_last",
        ),
        (
            "compassion",
            "Me bias (for compassion)",
            "compassion_egocentric",
        ),
        ("salience", "Retention Percentage", "salience_retention"),
        ("salience", "Short Bias", "salience_short"),
        ("salience", "Long Bias", "salience_long"),
    ];
    type Answer = fn(&str) -> String;
    let judges: [(&str, Answer); 4] = [
        ("content", judge_content),
        ("longer", judge_longer),
        ("first_invalid", judge_first_invalid),
        ("cue", judge_cue),
    ];
    for (judge, f) in judges {
        let r = run(&task, &Judge(f));
        for (bias, stat, name) in names {
            let want = reference["judges"][judge][bias][stat].as_f64().unwrap();
            close(
                metric(&r, name),
                want,
                &format!("{judge}: {bias} {stat} ({name})"),
            );
        }
    }
}
