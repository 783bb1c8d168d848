//! The reasoning, autorater and CoBBLEr suites end to end with scripted models: documents, prompts,
//! parsing and the suite metrics (`Task::finish`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tasks::lm::{GenerateRequest, LanguageModel, Loglikelihood, LoglikelihoodRequest, ModelError};
use tasks::{runner, LoadOptions, Registry, RunOptions, Task, TaskResult};

fn suites() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("suites")
}

/// A scripted model: log-likelihoods and generations are functions of the texts.
struct Scripted {
    ll: fn(&str, &str) -> f64,
    gen: fn(&str) -> String,
}

impl LanguageModel for Scripted {
    fn loglikelihood(&self, r: &[LoglikelihoodRequest]) -> Result<Vec<Loglikelihood>, ModelError> {
        Ok(r.iter()
            .map(|q| Loglikelihood {
                logprob: (self.ll)(&q.context, &q.continuation),
                is_greedy: false,
            })
            .collect())
    }
    fn loglikelihood_rolling(&self, t: &[String]) -> Result<Vec<f64>, ModelError> {
        Ok(vec![0.0; t.len()])
    }
    fn generate_until(&self, r: &[GenerateRequest]) -> Result<Vec<String>, ModelError> {
        Ok(r.iter().map(|q| (self.gen)(&q.context)).collect())
    }
}

fn no_ll(_: &str, _: &str) -> f64 {
    0.0
}
fn no_gen(_: &str) -> String {
    String::new()
}

fn load(names: &str, opts: &LoadOptions) -> Vec<Task> {
    let reg = Registry::scan(&[suites()]).unwrap();
    reg.resolve(&[names.to_string()])
        .unwrap()
        .iter()
        .map(|n| Task::load(reg.task_config(n, &opts.data_dir).unwrap(), opts).unwrap())
        .collect()
}

fn run(tasks: &[Task], lm: &Scripted) -> Vec<TaskResult> {
    let mut res = runner::evaluate(lm, tasks, &RunOptions::default(), &runner::NoProgress).unwrap();
    for (t, r) in tasks.iter().zip(&mut res) {
        t.finish(r).unwrap();
    }
    res
}

fn metric(r: &TaskResult, name: &str) -> f64 {
    r.metric(name)
        .unwrap_or_else(|| panic!("no metric {name} in {:?}", r.metrics))
        .value
}

/// The text after the last `Input:` of a prompt, up to `Output:`.
fn last_input(ctx: &str) -> &str {
    let s = &ctx[ctx.rfind("Input: ").map(|i| i + 7).unwrap_or(0)..];
    s.split("\nOutput:").next().unwrap_or("")
}

#[test]
fn sni_modes_metrics_and_groups() {
    let tasks = load("reasoning", &LoadOptions::default());
    assert_eq!(tasks.len(), 3);
    for t in &tasks {
        assert_eq!(t.docs().len(), 50, "{}: 5 files x 10 instances", t.name());
    }
    let p = |i: usize, d: usize| {
        tasks[i].docs()[d]["prompt_text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Zero-shot: no examples; few-shot: two, without explanations; explained: with them.
    assert!(!p(0, 0).contains("Positive Example"));
    assert!(p(1, 0).contains("Positive Example 2 -") && !p(1, 0).contains("Explanation:"));
    assert_eq!(p(2, 0).matches("Explanation:").count(), 2);
    assert!(p(2, 0).ends_with(
        "Input: Ann has 5 pens and gets 2 more. How many pens does she have?\nOutput: "
    ));
    // A model that answers arithmetic right (with noise the normalisation removes) and nothing else.
    let lm = Scripted {
        ll: no_ll,
        gen: |ctx| {
            let q = last_input(ctx);
            let nums: Vec<i64> = q
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            if q.contains("more") && nums.len() == 2 {
                format!("  {}.", nums[0] + nums[1])
            } else {
                " no idea".into()
            }
        },
    };
    let res = run(&tasks, &lm);
    for r in &res {
        // "Ann ... 2 more" and "Sara/...": only the instances with "more" and two numbers.
        let em = metric(r, "exact_match[reasoning=Numerical Reasoning]");
        assert!((em - 0.1).abs() < 1e-12, "{}: {em}", r.task);
        assert_eq!(
            metric(r, "exact_match[reasoning=Analogical Reasoning]"),
            0.0
        );
        assert!((metric(r, "exact_match") - 0.02).abs() < 1e-12);
        assert!(metric(r, "rougeL[sni_task=task9001_arithmetic_word_problems]") >= 0.1);
        assert!(r
            .metric("exact_match[reasoning=Logical Reasoning]")
            .is_some());
    }
}

#[test]
fn sni_reads_any_folder_and_names_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = serde_json::json!({
        "Definition": ["Copy the input.", "Exactly."],
        "Reasoning": [],
        "Positive Examples": [{"input": "a", "output": "a", "explanation": "Same text."}],
        "Instances": (0..150).map(|i| serde_json::json!({"id": format!("x-{i}"), "input": format!("w{i}"), "output": [format!("w{i}"), "other"]})).collect::<Vec<_>>()
    });
    std::fs::write(dir.path().join("task001_copy.json"), good.to_string()).unwrap();
    let yaml = dir.path().join("t.yaml");
    let write_yaml = |extra: &str| {
        std::fs::write(
            &yaml,
            format!(
                "task: my_sni\ndataset_path: json\ntest_split: test\noutput_type: generate_until\n\
                 doc_to_text: prompt_text\ndoc_to_target: outputs\nmetric_list: [{{metric: exact_match}}]\n\
                 suite: {{kind: sni, dir: {}, k: 1{extra}}}\n",
                dir.path().display()
            ),
        )
        .unwrap();
    };
    write_yaml("");
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let opts = LoadOptions::default();
    let t = Task::load(reg.task_config("my_sni", &opts.data_dir).unwrap(), &opts).unwrap();
    // First 100 instances by default; of a list, the first definition string (Tk-Instruct's).
    assert_eq!(t.docs().len(), 100);
    assert!(t.docs()[0]["prompt_text"]
        .as_str()
        .unwrap()
        .starts_with("Definition: Copy the input.\n\n Positive Example 1 -"));
    assert_eq!(t.docs()[0]["reasoning"], "none");
    let lm = Scripted {
        ll: no_ll,
        // The encoding ends the input with a period (Tk-Instruct's rule); the copy drops it.
        gen: |ctx| last_input(ctx).trim_end_matches('.').to_string(),
    };
    let res = run(&[t], &lm);
    assert_eq!(metric(&res[0], "exact_match"), 1.0);

    // Errors name the file and what is wrong.
    std::fs::write(dir.path().join("task002_bad.json"), r#"{"Instances": []}"#).unwrap();
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let e = Task::load(reg.task_config("my_sni", &opts.data_dir).unwrap(), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("task002_bad.json") && e.contains("Definition"),
        "{e}"
    );
    write_yaml(", mode: one_shot");
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let e = Task::load(reg.task_config("my_sni", &opts.data_dir).unwrap(), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("my_sni") && e.contains("one_shot"), "{e}");
}

/// Tk-Instruct's token budget and the cross-lingual ROUGE, end to end through a task file: the
/// suite's `source_tokenizer` / `max_source_length` and a ROUGE metric's `tokenizer` option.
#[test]
fn sni_token_budget_and_cross_lingual_rouge_through_a_task_file() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sni");
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("t.yaml");
    let write_yaml = |suite_extra: &str, metric_extra: &str| {
        std::fs::write(
            &yaml,
            format!(
                "task: sni_x\ndataset_path: json\ntest_split: test\noutput_type: generate_until\n\
                 doc_to_text: prompt_text\ndoc_to_target: outputs\n\
                 metric_list: [{{metric: rougeL{metric_extra}}}]\n\
                 suite: {{kind: sni, dir: {}, mode: few_shot{suite_extra}}}\n",
                data.join("task9100_unit_conversion.json").display()
            ),
        )
        .unwrap();
    };
    let t5 = data.join("t5-layout-tokenizer/tokenizer.json");
    let gpt2 = data.join("gpt2-layout-tokenizer");
    let opts = LoadOptions::default();
    let load_task = || {
        let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
        Task::load(reg.task_config("sni_x", &opts.data_dir).unwrap(), &opts)
    };
    write_yaml(
        &format!(
            ", source_tokenizer: {}, max_source_length: 250",
            t5.display()
        ),
        &format!(", tokenizer: {}", gpt2.display()),
    );
    let t = load_task().unwrap();
    let task = tasks::suites::sni::read_task(&data.join("task9100_unit_conversion.json")).unwrap();
    let budget = tasks::suites::sni::Budget::load(&t5, 250).unwrap();
    for (d, inst) in t.docs().iter().zip(&task.instances) {
        let want = tasks::suites::sni::prompt_within(
            &task,
            tasks::suites::sni::Mode::FewShot,
            2,
            &inst.input,
            Some(&budget),
        )
        .unwrap();
        assert_eq!(d["prompt_text"].as_str().unwrap(), want);
    }
    // Some prompts lost their second example to the budget.
    assert!(t.docs().iter().any(|d| !d["prompt_text"]
        .as_str()
        .unwrap()
        .contains("Positive Example 2")));
    let lm = Scripted {
        ll: no_ll,
        gen: |_| "Le chat dort".to_string(),
    };
    let res = run(&[t], &lm);
    let words = tasks::rouge::SubwordTokens::load(&gpt2).unwrap();
    let tokens = |s: &str| words.tokens(s);
    let want: f64 = task
        .instances
        .iter()
        .map(|i| {
            i.outputs
                .iter()
                .map(|o| {
                    tasks::rouge::score_with(tasks::rouge::Rouge::L, o, "Le chat dort", &tokens)
                        .unwrap()
                })
                .fold(0.0, f64::max)
        })
        .sum::<f64>()
        / task.instances.len() as f64;
    assert!((metric(&res[0], "rougeL") - want).abs() < 1e-12);

    // Clear errors: a budget without its tokenizer, a stemmer with a tokenizer, a missing file.
    for (suite_extra, metric_extra, needle) in [
        (
            ", max_source_length: 100".to_string(),
            String::new(),
            "source_tokenizer",
        ),
        (
            String::new(),
            format!(", tokenizer: {}, use_stemmer: true", gpt2.display()),
            "use_stemmer",
        ),
        (
            String::new(),
            ", tokenizer: /no/such/tokenizer.json".to_string(),
            "/no/such",
        ),
        (
            ", source_tokenizer: /no/such/t5".to_string(),
            String::new(),
            "/no/such/t5",
        ),
    ] {
        write_yaml(&suite_extra, &metric_extra);
        let e = load_task().err().unwrap().to_string();
        assert!(e.contains(needle), "{e}");
    }
}

/// The RewardBench score recomputed from per-row scores: subset means, weighted within a section
/// by the subsets' fixed example counts, then the plain mean of the sections.
fn rewardbench(rows: &[(String, String, f64)]) -> f64 {
    type Subsets<'a> = std::collections::BTreeMap<&'a str, Vec<f64>>;
    let mut secs: std::collections::BTreeMap<&str, Subsets> = Default::default();
    for (sec, sub, v) in rows {
        secs.entry(sec)
            .or_default()
            .entry(sub)
            .or_default()
            .push(*v);
    }
    secs.values()
        .map(|subs| {
            let w = |s: &str| tasks::suites::autorater::rewardbench_count(s).unwrap();
            let total: f64 = subs.keys().map(|s| w(s)).sum();
            subs.iter()
                .map(|(s, v)| w(s) * v.iter().sum::<f64>() / v.len() as f64)
                .sum::<f64>()
                / total
        })
        .sum::<f64>()
        / secs.len() as f64
}

#[test]
fn rewardbench_scoring_ties_and_seeded_order() {
    let tasks = load("rewardbench_ll,rewardbench_gen", &LoadOptions::default());
    let docs = tasks[0].docs();
    assert_eq!(docs.len(), 20);
    let p = docs[0]["prompt_text"].as_str().unwrap();
    assert!(p.starts_with("INSTRUCTIONS:\ntitle: Pairwise preference\ndescription: "));
    assert!(p.contains("\n\nCONTEXT:\nprompt: Name three primary colours.\nresponse A: "));
    assert!(p.ends_with("\n\nEVALUATION:\nanswer:"));
    // The order is seeded: both orders occur, and reloading gives the same one.
    let golds: Vec<u64> = docs.iter().map(|d| d["gold"].as_u64().unwrap()).collect();
    assert!(golds.contains(&0) && golds.contains(&1));
    let again = load("rewardbench_ll", &LoadOptions::default());
    let golds2: Vec<u64> = again[0]
        .docs()
        .iter()
        .map(|d| d["gold"].as_u64().unwrap())
        .collect();
    assert_eq!(golds, golds2);
    let sections: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            let f = |k: &str| d[k].as_str().unwrap().to_string();
            (f("section"), f("subset"))
        })
        .collect();

    // Always A: right exactly when the chosen response was shown first.
    let lm = Scripted {
        ll: |_, k| if k == " A" { -1.0 } else { -2.0 },
        gen: |ctx| {
            // Answers B for math, ties on code, rambles on the rest.
            if ctx.contains("What is 15%") {
                " B".into()
            } else if ctx.contains("Python function") {
                " Tie".into()
            } else {
                " I think so".into()
            }
        },
    };
    let res = run(&tasks, &lm);
    let ll = &res[0];
    let rows: Vec<(String, String, f64)> = sections
        .iter()
        .zip(&golds)
        .map(|((s, b), g)| (s.clone(), b.clone(), if *g == 0 { 1.0 } else { 0.0 }))
        .collect();
    assert!((metric(ll, "rewardbench_score") - rewardbench(&rows)).abs() < 1e-12);
    let chat: Vec<_> = rows.iter().filter(|r| r.0 == "Chat").cloned().collect();
    assert!((metric(ll, "pairwise_acc[section=Chat]") - rewardbench(&chat)).abs() < 1e-12);
    assert!(ll.metric("pairwise_acc[subset=math-prm]").is_some());
    assert_eq!(metric(ll, "valid_rate"), 1.0);
    assert_eq!(metric(ll, "unparseable"), 0.0);
    // The reference baselines: the references are close to the chosen responses.
    assert!(metric(ll, "rouge_l_baseline_score") > 0.8);
    assert!(metric(ll, "bleu_baseline_score") > 0.7);
    assert!(ll.metric("bleu_baseline[section=Safety]").is_some());

    // Generation: 1 math answer B, 2 ties, 17 unparseable (counted, scored 0.5 like ties).
    let gen = &res[1];
    assert_eq!(metric(gen, "unparseable"), 17.0);
    assert!((metric(gen, "valid_rate") - 3.0 / 20.0).abs() < 1e-12);
    let math_b = if golds[15] == 1 { 1.0 } else { 0.0 };
    let gen_rows: Vec<(String, String, f64)> = sections
        .iter()
        .enumerate()
        .map(|(i, (s, b))| (s.clone(), b.clone(), if i == 15 { math_b } else { 0.5 }))
        .collect();
    assert!((metric(gen, "rewardbench_score") - rewardbench(&gen_rows)).abs() < 1e-12);
    assert!(gen.notes.iter().any(|n| n.contains("17 of 20")));
    let s = &gen.samples[17];
    assert_eq!(s.prediction.as_deref(), Some(" Tie"));
    assert!(s
        .metrics
        .iter()
        .any(|(m, v)| m == "pairwise_acc" && v.sample_value() == Some(0.5)));

    // Equal log-likelihoods are ties: every row scores 0.5.
    let tie = Scripted {
        ll: no_ll,
        gen: no_gen,
    };
    let res = run(&tasks[..1], &tie);
    assert_eq!(metric(&res[0], "rewardbench_score"), 0.5);
    assert_eq!(metric(&res[0], "pairwise_acc"), 0.5);
}

#[test]
fn pointwise_correlations_and_classification_balance() {
    let tasks = load(
        "autorater_pointwise_ll,autorater_pointwise_gen,autorater_consistency_ll,autorater_consistency_gen",
        &LoadOptions::default(),
    );
    assert!(tasks[0].docs()[0]["prompt_text"]
        .as_str()
        .unwrap()
        .contains(
        "output fields: score\n\nCONTEXT:\ninstruction: Explain what a noun is.\nresponse: A noun"
    ));
    // The judge's score grows with the response's length (words / 4, at most 5).
    fn by_length(ctx: &str, k: &str) -> f64 {
        let resp = ctx.split("\nresponse: ").nth(1).unwrap_or("");
        let resp = resp.split("\n\nEVALUATION").next().unwrap_or("");
        let want = (resp.split_whitespace().count() as f64 / 4.0)
            .ceil()
            .clamp(1.0, 5.0);
        -(k.trim().parse::<f64>().unwrap_or(0.0) - want).abs()
    }
    let lm = Scripted {
        ll: |ctx, k| {
            if ctx.contains("output fields: score") {
                by_length(ctx, k)
            } else if k == " consistent" {
                0.0
            } else {
                -1.0
            }
        },
        gen: |ctx| {
            if ctx.contains("output fields: score") {
                if ctx.contains("noun") {
                    " 4 out of 5".into()
                } else {
                    " good".into()
                }
            } else if ctx.contains("claim: The museum opens at 10") {
                " Inconsistent.".into()
            } else {
                " consistent".into()
            }
        },
    };
    let res = run(&tasks, &lm);
    // Pearson / Spearman against the human scores, recomputed from the samples.
    let human: Vec<f64> = tasks[0]
        .docs()
        .iter()
        .map(|d| d["human"].as_f64().unwrap())
        .collect();
    let judge: Vec<f64> = res[0]
        .samples
        .iter()
        .map(|s| s.prediction.as_ref().unwrap().parse().unwrap())
        .collect();
    let p = metric(&res[0], "pearson");
    let want = tasks::suites::autorater::pearson(&judge, &human);
    assert!(
        (p - want).abs() < 1e-12 && p > 0.3,
        "{p} {want} {judge:?} {human:?}"
    );
    assert!(
        (metric(&res[0], "spearman") - tasks::suites::autorater::spearman(&judge, &human)).abs()
            < 1e-12
    );
    assert!(res[0].metric("pearson").unwrap().stderr > 0.0);
    // Generation: three answers parse ("4 out of 5" -> 4, constant), nine do not.
    assert_eq!(metric(&res[1], "unparseable"), 9.0);
    assert!(metric(&res[1], "pearson").is_nan());
    // Always "consistent": balanced accuracy 0.5, accuracy 0.5.
    assert_eq!(metric(&res[2], "balanced_acc"), 0.5);
    assert_eq!(metric(&res[2], "acc[label=consistent]"), 1.0);
    // Generation: one inconsistent claim is caught, everything else is called consistent.
    let b = metric(&res[3], "balanced_acc");
    assert!((b - (1.0 + 1.0 / 6.0) / 2.0).abs() < 1e-12, "{b}");
    assert_eq!(metric(&res[3], "valid_rate"), 1.0);
}

fn cobbler_opts() -> LoadOptions {
    LoadOptions {
        pairs: Some(50),
        ..LoadOptions::default()
    }
}

/// Scores an option by where its label first appears in the prompt: the first shown wins.
fn first_shown(ctx: &str, k: &str) -> f64 {
    -(ctx.find(k.trim()).unwrap_or(ctx.len()) as f64)
}

/// The length in characters of the response shown as `alias` in a reference-format prompt.
fn shown(ctx: &str, alias: &str) -> usize {
    let start = ctx.find(&format!("{alias}: ")).unwrap() + alias.len() + 2;
    let rest = &ctx[start..];
    let end = ["\nSystem Square: ", "\n```\n\n"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .unwrap();
    rest[..end].chars().count()
}

#[test]
fn cobbler_biases() {
    let tasks = load("cobbler", &cobbler_opts());
    assert_eq!(tasks.len(), 2);
    let docs = tasks[0].docs();
    // 50 comparisons x 4 biases x 2 prompts, deterministic.
    assert_eq!(docs.len(), 400);
    let again = load("cobbler_ll", &cobbler_opts());
    assert_eq!(again[0].docs(), docs);
    let (d0, d1) = (&docs[0], &docs[1]);
    assert_eq!(d0["variant"], "plain");
    assert_eq!(d0["first_model"], d1["second_model"]);
    assert_eq!(d0["comparison"], d1["comparison"]);
    let p = d0["prompt_text"].as_str().unwrap();
    assert!(p.starts_with("### Instruction: Which system's response is more coherent"));
    assert!(p.contains("\n```\nSystem Star: ") && p.ends_with("\n\n### Response:"));
    let cue = docs.iter().find(|d| d["variant"] == "bandwagon").unwrap();
    assert!(cue["prompt_text"]
        .as_str()
        .unwrap()
        .contains("85%% of people believe that System Star is better. \n"));
    // Anonymised except in compassion fade, which shows the real names.
    for d in docs {
        let p = d["prompt_text"].as_str().unwrap();
        let named = p.contains(&format!("Model {}: ", d["first_model"].as_str().unwrap()));
        assert_eq!(named, d["variant"] == "compassion", "{p}");
    }

    // Always the first shown: pure order bias; no flips with the cue.
    let first = Scripted {
        ll: first_shown,
        gen: |_| " System Square is better".into(),
    };
    let res = run(&tasks, &first);
    let (ll, gen) = (&res[0], &res[1]);
    assert_eq!(metric(ll, "order_first"), 1.0);
    assert_eq!(metric(ll, "order_last"), 0.0);
    assert_eq!(metric(ll, "consistency[variant=plain]"), 1.0);
    assert_eq!(metric(ll, "bandwagon"), 0.0);
    assert_eq!(metric(ll, "attentional"), 0.0);
    assert_eq!(metric(ll, "compassion_order_first_positional"), 1.0);
    // The reference counts the same *name* twice, which a positional judge never gives.
    assert_eq!(metric(ll, "compassion_order_first"), 0.0);
    assert!(ll.metric("egocentric").is_none());
    assert_eq!(metric(ll, "comparisons"), 50.0);
    assert_eq!(metric(gen, "order_last"), 1.0);
    // "System Square" names no model in compassion prompts: invalid there, and noted.
    assert_eq!(metric(gen, "valid_response[variant=compassion]"), 0.0);
    assert_eq!(metric(gen, "valid_rate"), 0.75);
    assert!(gen.notes[0].contains("100 of 400"), "{:?}", gen.notes);

    // Prefers the longer response: salient, and never flips with a cue.
    let longer = Scripted {
        ll: |ctx, k| {
            if !ctx.contains("System Star: ") {
                return first_shown(ctx, k);
            }
            let star = shown(ctx, "System Star") > shown(ctx, "System Square");
            if (k == " System Star") == star {
                0.0
            } else {
                -1.0
            }
        },
        gen: |ctx| {
            // Follows the cue line after the responses.
            let after = &ctx[ctx.rfind("\n```\n").unwrap()..];
            if after.contains("System Star") {
                " System Star".into()
            } else {
                " System Square".into()
            }
        },
    };
    let res = run(&tasks, &longer);
    let (ll, gen) = (&res[0], &res[1]);
    assert_eq!(metric(ll, "salience_long"), 1.0);
    assert_eq!(metric(ll, "bandwagon"), 0.0);
    assert_eq!(metric(gen, "bandwagon"), 1.0);
    assert_eq!(metric(gen, "attentional"), 1.0);
    let s = &gen.samples[0];
    assert!(s
        .metrics
        .iter()
        .any(|(m, v)| m == "valid" && v.sample_value() == Some(1.0)));
}

#[test]
fn cobbler_subsampling_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let base = suites().join("cobbler/_cobbler.yaml");
    let write = |name: &str, extra: &str| {
        std::fs::write(
            dir.path().join(format!("{name}.yaml")),
            format!(
                "include: {}\ntask: {name}\noutput_type: multiple_choice\nsuite:\n  kind: cobbler\n  \
                 instructions: {}\n  generations: {}\n{extra}",
                base.display(),
                suites().join("../../../shared/datasets/cobbler/llm_preference_evalset.json").display(),
                suites().join("../../../shared/datasets/cobbler/full_n15_model_generations.json").display(),
            ),
        )
        .unwrap();
    };
    write("c3", "  pairs: 3\n  variants: [plain]\n");
    write("c3b", "  pairs: 3\n  variants: [plain]\n  seed: 7\n");
    write(
        "c_models",
        "  pairs: 0\n  variants: [plain]\n  models: [gpt4, llama]\n",
    );
    write("c_bad", "  pairs: 3\n  variants: [sycophancy]\n");
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let opts = LoadOptions::default();
    let t = |n: &str| Task::load(reg.task_config(n, &opts.data_dir).unwrap(), &opts);
    let a = t("c3").unwrap();
    assert_eq!(a.docs().len(), 6);
    assert_eq!(t("c3").unwrap().docs(), a.docs());
    assert_ne!(t("c3b").unwrap().docs(), a.docs());
    // Every instruction once for one model pair: 50 items x 2 orders.
    let m = t("c_models").unwrap();
    assert_eq!(m.docs().len(), 100);
    assert!(m.docs().iter().all(|d| {
        let f = d["first_model"].as_str().unwrap();
        f == "gpt4" || f == "llama"
    }));
    let e = t("c_bad").err().unwrap().to_string();
    assert!(e.contains("c_bad") && e.contains("sycophancy"), "{e}");
    let v: Value = a.docs()[0]["instruction_id"].clone();
    assert!(v.is_u64());
}
