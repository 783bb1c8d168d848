//! Prompts, requests and metrics of the test task files under tests/data/tasks, checked against
//! what lm-evaluation-harness 0.4.13 produced for the same files (hard-coded below).

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use tasks::lm::{GenerateRequest, Loglikelihood, LoglikelihoodRequest, ModelError};
use tasks::task::Request;
use tasks::{evaluate, LanguageModel, LoadOptions, NoProgress, Registry, RunOptions, Task};

fn task_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tasks")
}

fn load(name: &str) -> Task {
    let reg = Registry::scan(&[task_dir()]).unwrap();
    let cfg = reg.task_config(name, Path::new(".")).unwrap();
    Task::load(cfg, &LoadOptions::default()).unwrap()
}

/// A fake model: log-likelihood = -(characters of the continuation); records every call.
#[derive(Default)]
struct Fake {
    calls: RefCell<Vec<usize>>,
}

impl LanguageModel for Fake {
    fn loglikelihood(&self, r: &[LoglikelihoodRequest]) -> Result<Vec<Loglikelihood>, ModelError> {
        self.calls.borrow_mut().push(r.len());
        Ok(r.iter()
            .map(|q| Loglikelihood {
                logprob: -(q.continuation.chars().count() as f64),
                is_greedy: false,
            })
            .collect())
    }
    fn loglikelihood_rolling(&self, t: &[String]) -> Result<Vec<f64>, ModelError> {
        Ok(t.iter().map(|s| -(s.len() as f64)).collect())
    }
    fn generate_until(&self, r: &[GenerateRequest]) -> Result<Vec<String>, ModelError> {
        Ok(r.iter().map(|_| " Blue\nmore".to_string()).collect())
    }
}

#[test]
fn few_shot_prompts_match_the_harness_byte_for_byte() {
    let expected = [
        "Q: Water is \nA: wet\n\nQ: The sky is\nA: blue\n\nQ: The sky is\nA:",
        "Q: The sky is\nA: blue\n\nQ: Cats say\nA: meow\n\nQ: Fire is\nA:",
        "Q: The sun rises in the\nA: east\n\nQ: The sky is\nA: blue\n\nQ: Two plus two is\nA:",
        "Q: Cats say\nA: meow\n\nQ: The sky is\nA: blue\n\nQ: Water is \nA:",
        "Q: The sky is\nA: blue\n\nQ: Two plus two is\nA: four\n\nQ: The sun rises in the\nA:",
        "Q: Fire is\nA: hot\n\nQ: The sky is\nA: blue\n\nQ: Cats say\nA:",
    ];
    let inst = load("mc_tiny_fewshot").instances(1234).unwrap();
    let got: Vec<&str> = inst.iter().map(|i| i.context.as_str()).collect();
    assert_eq!(got, expected);
    // One request per choice, continuation = target_delimiter + choice.
    assert_eq!(
        inst[1].requests[0],
        Request::Loglikelihood(LoglikelihoodRequest {
            context: expected[1].into(),
            continuation: " cold".into()
        })
    );
}

#[test]
fn description_and_mutual_info_requests() {
    let inst = load("mc_tiny").instances(1234).unwrap();
    assert_eq!(inst[3].context, "Answer the questions.\n\nQ: Water is \nA:");
    // Two choices: two conditional and two unconditional (empty context) requests.
    assert_eq!(inst[3].requests.len(), 4);
    assert_eq!(
        inst[3].requests[2],
        Request::Loglikelihood(LoglikelihoodRequest {
            context: String::new(),
            continuation: " wet".into()
        })
    );
}

#[test]
fn runner_dedupes_and_keeps_document_order() {
    let tasks = vec![load("mc_tiny"), load("mc_tiny_fewshot"), load("gen_tiny")];
    let lm = Fake::default();
    let opts = RunOptions {
        batch_size: 3,
        ..RunOptions::default()
    };
    let res = evaluate(&lm, &tasks, &opts, &NoProgress).unwrap();
    assert_eq!(
        res[0].samples.iter().map(|s| s.doc_id).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    // mc_tiny: 15 conditional + 15 unconditional requests, but the unconditional ones of equal
    // choices (none here) and nothing else repeat; mc_tiny_fewshot adds 15 more.
    let sent: usize = lm.calls.borrow().iter().sum();
    assert_eq!(sent, 15 + 15 + 15);
    // The fake model prefers the shortest choice: doc 0 ("blue", "green", "loud") -> blue/loud tie -> first.
    let s0 = &res[0].samples[0];
    assert_eq!(
        s0.choice_loglikelihoods.as_deref(),
        Some(&[-5.0, -6.0, -5.0][..])
    );
    assert_eq!(s0.prediction.as_deref(), Some("blue"));
    let acc = res[0].metric("acc").unwrap();
    assert_eq!(acc.n, 6);
    // Generation: " Blue" cut at "\n", compared ignoring case and surrounding spaces.
    let g = &res[2];
    assert_eq!(g.samples[0].prediction.as_deref(), Some(" Blue"));
    assert_eq!(g.samples[0].metrics[0].1.sample_value(), Some(1.0));
}

#[test]
fn results_do_not_depend_on_batch_size() {
    let tasks = vec![load("mc_tiny"), load("ppl_tiny")];
    let a = evaluate(
        &Fake::default(),
        &tasks,
        &RunOptions {
            batch_size: 1,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    let b = evaluate(
        &Fake::default(),
        &tasks,
        &RunOptions {
            batch_size: 100,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.metrics, y.metrics);
    }
}

#[test]
fn render_errors_name_file_task_doc_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("d.jsonl"),
        "{\"q\": \"a\"}\n{\"x\": \"b\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "task: bad\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: d.jsonl\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \" x\"\n",
    )
    .unwrap();
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let task = Task::load(
        reg.task_config("bad", Path::new(".")).unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    let err = task.instances(1234).unwrap_err().to_string();
    assert!(
        err.contains("bad.yaml")
            && err.contains("task `bad`")
            && err.contains("doc 1")
            && err.contains("doc_to_text"),
        "{err}"
    );
}

#[test]
fn unknown_keys_and_python_code_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), "task: a\ndataset_path: json\ntest_split: test\ndoc_to_text: x\ndoc_to_target: y\ntypo_key: 1\n").unwrap();
    std::fs::write(dir.path().join("b.yaml"), "task: b\ndataset_path: json\ntest_split: test\ndoc_to_text: !function utils.f\ndoc_to_target: y\n").unwrap();
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let e = reg
        .task_config("a", Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(e.contains("typo_key"), "{e}");
    std::fs::write(dir.path().join("d.jsonl"), "{\"x\": 1}\n").unwrap();
    let e = reg.resolve(&["nope".into()]).unwrap_err().to_string();
    assert!(e.contains("unknown task `nope`"), "{e}");
    let cfg = reg.task_config("b", Path::new(".")).unwrap();
    assert!(matches!(cfg.doc_to_text, tasks::config::Field::Function(_)));
}

#[test]
fn groups_and_tags_expand() {
    let reg = Registry::scan(&[task_dir()]).unwrap();
    let names = reg.resolve(&["tiny_suite".into()]).unwrap();
    assert_eq!(names.len(), 4);
    assert!(names.contains(&"mc_tiny".to_string()));
}

#[test]
fn metric_direction_is_read_and_aggregations_other_than_the_metrics_own_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let head = "dataset_path: json\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: x\ndoc_to_target: 0\ndoc_to_choice: [a, b]\n";
    std::fs::write(
        dir.path().join("ok.yaml"),
        format!("task: ok\n{head}metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: false\n  - metric: acc_norm\n"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("median.yaml"),
        format!("task: median\n{head}metric_list:\n  - metric: acc\n    aggregation: median\n"),
    )
    .unwrap();
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let cfg = reg.task_config("ok", Path::new(".")).unwrap();
    let dirs: Vec<(&str, Option<bool>)> = cfg
        .metric_list
        .iter()
        .map(|m| (m.metric.as_str(), m.higher_is_better))
        .collect();
    assert_eq!(dirs, [("acc", Some(false)), ("acc_norm", None)]);
    let e = reg
        .task_config("median", Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("median.yaml") && e.contains("aggregation \"median\"") && e.contains("`mean`"),
        "{e}"
    );
    assert_eq!(
        tasks::metrics::aggregation_of("word_perplexity"),
        "weighted_perplexity"
    );
}

/// `fewshot_config` (first_n sampler, its own split, doc_to_text and delimiters; literal samples):
/// the expected request arguments are what lm-evaluation-harness 0.4.13 built for the same files
/// (`TaskManager(include_path="tests/data/tasks")`, `build_all_requests`, first three documents).
#[test]
fn fewshot_config_matches_the_harness() {
    let args = |name: &str| -> Vec<(String, String)> {
        load(name)
            .instances(1234)
            .unwrap()
            .iter()
            .take(3)
            .map(|i| match &i.requests[0] {
                Request::Loglikelihood(l) => (l.context.clone(), l.continuation.clone()),
                r => panic!("{r:?}"),
            })
            .collect()
    };
    let cfg = "Question: The sky is\nAnswer:  blue\n###\nQuestion: Fire is\nAnswer:  hot\n###\n";
    assert_eq!(
        args("mc_tiny_fewshot_cfg"),
        [
            (format!("{cfg}Q: The sky is\nA:"), " blue".to_string()),
            (format!("{cfg}Q: Fire is\nA:"), " cold".to_string()),
            (format!("{cfg}Q: Two plus two is\nA:"), " three".to_string()),
        ]
    );
    let s = "Q: Grass is\nA: green\n\n";
    assert_eq!(
        args("mc_tiny_fewshot_samples"),
        [
            (format!("{s}Q: The sky is\nA:"), " blue".to_string()),
            (format!("{s}Q: Fire is\nA:"), " cold".to_string()),
            (format!("{s}Q: Two plus two is\nA:"), " three".to_string()),
        ]
    );
    let reg = Registry::scan(&[task_dir()]).unwrap();
    let cfg = reg
        .task_config("mc_tiny_fewshot_cfg", Path::new("."))
        .unwrap();
    assert_eq!(cfg.version, Some(serde_json::json!(2.0)));
}

/// Fields whose behaviour moeval does not reproduce are refused with the field named.
#[test]
fn unsupported_fields_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let base = "dataset_path: json\ntest_split: test\ndoc_to_text: x\ndoc_to_target: y\n";
    for (i, (extra, want)) in [
        ("unsafe_code: true\n", "unsafe_code"),
        ("doc_to_image: img\n", "doc_to_image"),
        (
            "fewshot_config:\n  sampler: balanced\n",
            "fewshot_config.sampler",
        ),
        ("fewshot_config:\n  typo: 1\n", "fewshot_config.typo"),
        ("repeats: 0\n", "repeats"),
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(
            dir.path().join(format!("t{i}.yaml")),
            format!("task: t{i}\n{base}{extra}"),
        )
        .unwrap();
        let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
        let e = reg
            .task_config(&format!("t{i}"), Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{extra}: {e}");
    }
}

/// A model whose answers cycle through fixed texts, one per call position.
struct Cycling(Vec<&'static str>, RefCell<usize>);

impl LanguageModel for Cycling {
    fn loglikelihood(&self, _: &[LoglikelihoodRequest]) -> Result<Vec<Loglikelihood>, ModelError> {
        unreachable!()
    }
    fn loglikelihood_rolling(&self, _: &[String]) -> Result<Vec<f64>, ModelError> {
        unreachable!()
    }
    fn generate_until(&self, r: &[GenerateRequest]) -> Result<Vec<String>, ModelError> {
        Ok(r.iter()
            .map(|_| {
                let mut i = self.1.borrow_mut();
                *i += 1;
                self.0[(*i - 1) % self.0.len()].to_string()
            })
            .collect())
    }
}

/// `filter_list` pipelines and `repeats`: metrics named `metric,pipeline` as lm-evaluation-harness
/// names them, each pipeline's answer kept (`Sample::filtered`), `repeats` answers per document
/// (greedy repeats are one computation) and logged as one request.
#[test]
fn filter_pipelines_name_metrics_and_keep_answers() {
    let task = load("gen_filters");
    let lm = Cycling(vec!["blue #### 12", "$1,000 is blue"], RefCell::new(0));
    let r = &evaluate(&lm, &[task], &RunOptions::default(), &NoProgress).unwrap()[0];
    let names: Vec<&str> = r.metrics.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "exact_match,strict-match",
            "exact_match,flexible-extract",
            "exact_match,vote"
        ]
    );
    let s = &r.samples[0];
    let filtered: Vec<(&str, String)> = s
        .filtered
        .iter()
        .map(|(n, v)| (n.as_str(), v.to_string()))
        .collect();
    // Greedy repeats are computed once, so all three answers of a document are the same text.
    let first = s.prediction.clone().unwrap();
    let expected_flexible = if first.starts_with("blue") {
        "\"12\""
    } else {
        "\"$1,000\""
    };
    assert_eq!(
        filtered[1],
        ("flexible-extract", expected_flexible.to_string())
    );
    assert_eq!(filtered[2], ("vote", "\"blue\"".to_string()));
    assert_eq!(
        s.arguments.matches("gen_args_").count(),
        1,
        "{}",
        s.arguments
    );
    // Document 0's target is "blue": only the vote pipeline extracts it.
    assert_eq!(
        s.metrics
            .iter()
            .map(|(n, it)| (n.as_str(), it.sample_value()))
            .collect::<Vec<_>>(),
        [
            ("exact_match,strict-match", Some(0.0)),
            ("exact_match,flexible-extract", Some(0.0)),
            ("exact_match,vote", Some(1.0))
        ]
    );
}

/// `gen_prefix` (a literal on a multiple-choice task, a template on a generation task), and
/// `max_new_tokens`: expected arguments are lm-evaluation-harness 0.4.13's for the same files
/// (`build_all_requests`, first three documents).
#[test]
fn gen_prefix_matches_the_harness() {
    let mc: Vec<(String, String)> = load("mc_tiny_gen_prefix")
        .instances(1234)
        .unwrap()
        .iter()
        .take(3)
        .map(|i| match &i.requests[0] {
            Request::Loglikelihood(l) => (l.context.clone(), l.continuation.clone()),
            r => panic!("{r:?}"),
        })
        .collect();
    let want = [
        (
            "Q: Water is A: wet\n\nQ: The sky is A: blue\n\nQ: The sky is A:",
            " blue",
        ),
        (
            "Q: The sky is A: blue\n\nQ: Cats say A: meow\n\nQ: Fire is A:",
            " cold",
        ),
        (
            "Q: The sun rises in the A: east\n\nQ: The sky is A: blue\n\nQ: Two plus two is A:",
            " three",
        ),
    ];
    for (g, w) in mc.iter().zip(want) {
        assert_eq!((g.0.as_str(), g.1.as_str()), w);
    }
    let task = load("gen_tiny_gen_prefix");
    let gen: Vec<(String, usize)> = task
        .instances(1234)
        .unwrap()
        .iter()
        .take(3)
        .map(|i| match &i.requests[0] {
            Request::Generate(g) => (g.context.clone(), g.max_gen_toks),
            r => panic!("{r:?}"),
        })
        .collect();
    assert_eq!(
        gen,
        [
            (
                "Q: Water is \nReply: wet\n\nQ: The sky is\nReply:".to_string(),
                8
            ),
            (
                "Q: The sky is\nReply: blue\n\nQ: Fire is\nAnswer:".to_string(),
                8
            ),
            (
                "Q: The sun rises in the\nReply: east\n\nQ: Two plus two is\nAnswer:".to_string(),
                8
            ),
        ]
    );
}
