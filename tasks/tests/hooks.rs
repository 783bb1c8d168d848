//! `!function` hooks through `Task::load` and `Task::instances`, against lm-evaluation-harness
//! 0.4.13: `tests/data/hooks/lmeval_reference.json` holds the documents after `process_docs` and
//! the request arguments the harness logged for the same task files
//! (`scripts/make_hooks_references.py`).
//!
//! `hooks_text` (doc_to_text / doc_to_choice hooks) runs with `python3`. `hooks_tiny` also has
//! `process_docs`, which needs `datasets`: it runs with the interpreter in `MOEVAL_LM_EVAL_PYTHON`
//! (CI sets it) and is skipped, saying so, without it.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tasks::{Hooks, LoadOptions, Registry, Task};

fn task_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hooks")
}

fn load(name: &str, opts: &LoadOptions) -> tasks::Result<Task> {
    let reg = Registry::scan(&[task_dir()]).unwrap();
    let cfg = reg.task_config(name, Path::new(".")).unwrap();
    Task::load(cfg, opts)
}

fn with_python(python: impl Into<PathBuf>) -> LoadOptions {
    LoadOptions {
        hooks: Hooks::new(Some(python.into())),
        ..LoadOptions::default()
    }
}

fn lm_eval_python() -> Option<PathBuf> {
    let p = std::env::var_os("MOEVAL_LM_EVAL_PYTHON").map(PathBuf::from);
    if p.is_none() {
        eprintln!("skipped: set MOEVAL_LM_EVAL_PYTHON to a Python with `datasets` (CI does)");
    }
    p
}

/// Documents (by their JSON text, so key order counts) and every request's arguments equal the
/// harness's.
fn assert_matches_reference(name: &str, task: &Task) {
    let text = std::fs::read_to_string(task_dir().join("lmeval_reference.json")).unwrap();
    let reference: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    let want = reference[name].as_array().unwrap();
    assert_eq!(task.docs().len(), want.len(), "{name}");
    let inst = task.instances(1234).unwrap();
    for ((doc, i), w) in task.docs().iter().zip(&inst).zip(want) {
        assert_eq!(
            serde_json::to_string(doc).unwrap(),
            serde_json::to_string(&w["doc"]).unwrap(),
            "{name} doc {}",
            i.doc_id
        );
        assert_eq!(
            task.harness_arguments(&i.requests),
            w["arguments"].as_str().unwrap(),
            "{name} doc {}",
            i.doc_id
        );
    }
}

#[test]
fn function_fields_give_the_harness_prompts() {
    let opts = with_python("python3");
    let task = load("hooks_text", &opts).unwrap();
    assert_matches_reference("hooks_text", &task);
    // doc_to_choice returned a tuple: a list of choices, as in the harness.
    assert_eq!(
        task.doc_to_choice(&task.docs()[1], 1).unwrap(),
        ["cold", "hot"]
    );
    // Load time ran each function field once over all documents.
    let s = opts.hooks.stats();
    assert_eq!((s.calls, s.items), (2, 12));
}

#[test]
fn process_docs_and_function_fields_give_the_harness_documents_and_prompts() {
    let Some(python) = lm_eval_python() else {
        return;
    };
    let opts = with_python(&python);
    let task = load("hooks_tiny", &opts).unwrap();
    assert_matches_reference("hooks_tiny", &task);
    // process_docs on each split (test, train) and doc_to_text / target / choice on the 5 test
    // documents, then on the few-shot exemplars drawn, in one batch per field.
    assert_eq!(opts.hooks.stats().calls, 2 + 3 + 3);
}

#[test]
fn limit_applies_after_process_docs() {
    let Some(python) = lm_eval_python() else {
        return;
    };
    let opts = LoadOptions {
        limit: Some(3),
        ..with_python(&python)
    };
    let task = load("hooks_tiny", &opts).unwrap();
    // process_docs dropped the third row, so the third document is the fourth row.
    let queries: Vec<&Value> = task.docs().iter().map(|d| &d["query"]).collect();
    assert_eq!(queries, ["The sky is", "Fire is", "Water is"]);
    let prompts = task.instances(1234).unwrap();
    assert!(prompts[2].context.ends_with("Question: Water is\nAnswer:"));
}

#[test]
fn a_raising_hook_fails_the_load_with_its_traceback() {
    let e = load("hooks_raise", &with_python("python3"))
        .err()
        .expect("the hook raises")
        .to_string();
    for want in [
        "hooks_raise.yaml",
        "task `hooks_raise`",
        "doc_to_text",
        "utils.raises",
        "utils.py",
        "doc 3",
        "Traceback (most recent call last)",
        "ValueError: no text for water questions",
    ] {
        assert!(e.contains(want), "`{want}` missing from: {e}");
    }
}

#[test]
fn tasks_without_hooks_never_start_python() {
    let opts = with_python("/nonexistent/python");
    let reg = Registry::scan(&[task_dir().join("../tasks")]).unwrap();
    let cfg = reg.task_config("mc_tiny_fewshot", Path::new(".")).unwrap();
    let task = Task::load(cfg, &opts).unwrap();
    task.instances(1234).unwrap();
    assert!(!opts.hooks.started());
    // A hook task with that interpreter is a clear error naming it.
    let e = load("hooks_text", &opts).err().unwrap().to_string();
    assert!(
        e.contains("/nonexistent/python") && e.contains("MOEVAL_PYTHON"),
        "{e}"
    );
}
