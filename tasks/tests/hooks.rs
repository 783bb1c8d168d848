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

fn task_docs(reg: &Registry, name: &str) -> Vec<tasks::dataset::Doc> {
    let cfg = reg.task_config(name, Path::new(".")).unwrap();
    Task::load(cfg, &LoadOptions::default())
        .unwrap()
        .docs()
        .to_vec()
}

/// The per-document cost of hooks over 10,000 documents (docs/tasks.md quotes it):
/// `cargo test --release -p tasks --test hooks -- --ignored --nocapture`. `doc_to_text` runs with
/// `python3`; `process_docs` with `MOEVAL_LM_EVAL_PYTHON` when set.
#[test]
#[ignore]
fn cost_per_document() {
    use std::time::Instant;
    const N: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let mut data = String::new();
    for i in 0..N {
        let row = serde_json::json!({
            "question": format!("question number {i} asks about something long enough to be a real prompt"),
            "options": "alpha|beta|gamma|delta",
            "answer": (i % 4).to_string(),
            "skip": false,
        });
        data.push_str(&row.to_string());
        data.push('\n');
    }
    std::fs::write(dir.path().join("big.jsonl"), data).unwrap();
    // The test tasks' hooks, plus one that does not print.
    let utils = std::fs::read_to_string(task_dir().join("utils.py")).unwrap();
    std::fs::write(
        dir.path().join("utils.py"),
        utils + "\n\ndef question_text(doc):\n    return \"Q: \" + doc[\"question\"]\n",
    )
    .unwrap();
    let yaml = |name: &str, fields: &str| {
        std::fs::write(
            dir.path().join(format!("{name}.yaml")),
            format!(
                "task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: big.jsonl\n\
                 output_type: multiple_choice\ntest_split: test\n{fields}metric_list:\n  - metric: acc\n"
            ),
        )
        .unwrap();
    };
    yaml(
        "by_template",
        "doc_to_text: \"Q: {{question}}\"\ndoc_to_target: \"{{answer}}\"\ndoc_to_choice: [alpha, beta, gamma, delta]\n",
    );
    yaml(
        "by_hook",
        "doc_to_text: !function utils.question_text\ndoc_to_target: \"{{answer}}\"\ndoc_to_choice: [alpha, beta, gamma, delta]\n",
    );
    yaml(
        "by_process_docs",
        "process_docs: !function utils.process_docs\ndoc_to_text: !function utils.doc_to_text\n\
         doc_to_target: !function utils.doc_to_target\ndoc_to_choice: !function utils.doc_to_choice\n",
    );
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let run = |name: &str, python: &Path| {
        let opts = with_python(python);
        let t0 = Instant::now();
        let task = Task::load(reg.task_config(name, Path::new(".")).unwrap(), &opts).unwrap();
        let loaded = t0.elapsed().as_secs_f64();
        task.instances(1234).unwrap();
        let total = t0.elapsed().as_secs_f64();
        let s = opts.hooks.stats();
        eprintln!(
            "{name}: {} docs; load {:.1} ms ({:.4} ms/doc), load + prompts {:.4} ms/doc; \
             hooks: {} calls, {} items, {:.1} ms ({:.4} ms/item, worker start included)",
            task.docs().len(),
            1e3 * loaded,
            1e3 * loaded / N as f64,
            1e3 * total / N as f64,
            s.calls,
            s.items,
            1e3 * s.seconds,
            1e3 * s.seconds / s.items.max(1) as f64,
        );
    };
    run("by_template", Path::new("python3"));
    run("by_hook", Path::new("python3"));
    // Warm calls on one worker: start-up (and `import datasets`) apart from the per-document cost.
    let docs: Vec<tasks::dataset::Doc> = task_docs(&reg, "by_template");
    let refs: Vec<&tasks::dataset::Doc> = docs.iter().collect();
    let f = |name: &str| tasks::config::Function {
        dir: dir.path().to_path_buf(),
        module: "utils".into(),
        name: name.into(),
    };
    let site = tasks::hooks::Site::docs(Path::new("x.yaml"), "x", "doc_to_text");
    let timed = |what: &str, n: usize, call: &mut dyn FnMut()| {
        let t0 = Instant::now();
        call();
        let ms = 1e3 * t0.elapsed().as_secs_f64();
        eprintln!("{what}: {ms:.1} ms ({:.4} ms/doc)", ms / n as f64);
    };
    let hooks = Hooks::new(Some("python3".into()));
    timed(
        "python3 worker start + doc_to_text on 1 doc",
        1,
        &mut || {
            hooks
                .doc_field(&f("question_text"), &refs[..1], &site)
                .unwrap();
        },
    );
    timed("doc_to_text on 10,000 docs (warm)", N, &mut || {
        hooks.doc_field(&f("question_text"), &refs, &site).unwrap();
    });
    if let Some(p) = lm_eval_python() {
        let hooks = Hooks::new(Some(p));
        timed(
            "datasets worker start + process_docs on 1 doc",
            1,
            &mut || {
                hooks
                    .process_docs(&f("process_docs"), &docs[..1], &site)
                    .unwrap();
            },
        );
        timed("process_docs on 10,000 docs (warm)", N, &mut || {
            hooks
                .process_docs(&f("process_docs"), &docs, &site)
                .unwrap();
        });
    }
    match lm_eval_python() {
        Some(p) => run("by_process_docs", &p),
        None => eprintln!("by_process_docs: skipped"),
    }
}

/// A hook file in a temporary folder whose imports record, in `ran.txt`, which module bodies ran.
fn deferred_imports_task(dir: &Path) -> Task {
    let w = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    let record = "import os\nopen(os.path.join(os.path.dirname(__file__), 'ran.txt'), 'a').write(__name__ + '\\n')\n";
    for m in ["heavy", "side_effects", "guarded", "unused_heavy"] {
        w(&format!("{m}.py"), &format!("{record}VALUE = '{m}'\n"));
    }
    w(
        "hook_imports.py",
        "import os, sys\n\
         sys.path.insert(0, os.path.dirname(__file__))\n\
         import heavy\n\
         import unused_heavy\n\
         import side_effects  # imported for its side effects only\n\
         try:\n    import guarded\nexcept ImportError:\n    guarded = None\n\
         def text(doc):\n    return doc['question'] + ' ' + heavy.VALUE\n\
         def never_called(doc):\n    return unused_heavy.VALUE\n",
    );
    w(
        "data.jsonl",
        "{\"question\": \"q1\", \"answer\": 0}\n{\"question\": \"q2\", \"answer\": 1}\n",
    );
    w(
        "deferred.yaml",
        "task: deferred\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n\
         output_type: multiple_choice\ntest_split: test\ndoc_to_text: !function hook_imports.text\n\
         doc_to_target: \"{{answer}}\"\ndoc_to_choice: [\"a\", \"b\"]\nmetric_list:\n  - metric: acc\n",
    );
    let reg = Registry::scan(&[dir.to_path_buf()]).unwrap();
    let cfg = reg.task_config("deferred", Path::new(".")).unwrap();
    let opts = with_python("python3");
    let functions = tasks::check::hook_functions(&cfg).unwrap();
    opts.hooks.warm(functions.iter().map(|(_, f)| f), false);
    Task::load(cfg, &opts).unwrap()
}

fn bodies_run(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("ran.txt")).unwrap_or_default();
    let mut ran: Vec<String> = text.lines().map(str::to_string).collect();
    ran.sort();
    ran
}

#[test]
fn a_hook_files_imports_run_when_first_used_and_once() {
    let dir = tempfile::tempdir().unwrap();
    let task = deferred_imports_task(dir.path());
    let prompts = task.instances(1234).unwrap();
    assert!(
        prompts[0].context.ends_with("q1 heavy"),
        "{}",
        prompts[0].context
    );
    // `heavy` ran when `text` used it; `unused_heavy` never did; the side-effect-only and the
    // guarded imports ran at import time, as Python runs them; the preload imported the file
    // once (each body ran once).
    assert_eq!(bodies_run(dir.path()), ["guarded", "heavy", "side_effects"]);

    // MOEVAL_HOOKS_EAGER_IMPORTS=1 imports as Python does. (Other tests' workers started meanwhile
    // import eagerly too, which changes none of their results.)
    std::env::set_var("MOEVAL_HOOKS_EAGER_IMPORTS", "1");
    let eager = tempfile::tempdir().unwrap();
    let task = deferred_imports_task(eager.path());
    std::env::remove_var("MOEVAL_HOOKS_EAGER_IMPORTS");
    task.instances(1234).unwrap();
    assert_eq!(
        bodies_run(eager.path()),
        ["guarded", "heavy", "side_effects", "unused_heavy"]
    );
}

#[test]
fn a_hook_file_that_fails_to_import_in_the_background_fails_the_first_call() {
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    w(
        "broken.py",
        "raise RuntimeError('broken at import')\ndef text(doc):\n    return 'x'\n",
    );
    w("data.jsonl", "{\"question\": \"q1\", \"answer\": 0}\n");
    w(
        "broken.yaml",
        "task: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n\
         output_type: multiple_choice\ntest_split: test\ndoc_to_text: !function broken.text\n\
         doc_to_target: \"{{answer}}\"\ndoc_to_choice: [\"a\", \"b\"]\nmetric_list:\n  - metric: acc\n",
    );
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let cfg = reg.task_config("broken", Path::new(".")).unwrap();
    let opts = with_python("python3");
    let functions = tasks::check::hook_functions(&cfg).unwrap();
    // doc_to_text, and the few-shot examples' doc_to_text, which defaults to it.
    let fields: Vec<&str> = functions.iter().map(|(field, _)| *field).collect();
    assert_eq!(fields, ["doc_to_text", "fewshot_config.doc_to_text"]);
    opts.hooks.warm([&functions[0].1], false);
    let e = Task::load(cfg, &opts)
        .err()
        .expect("import fails")
        .to_string();
    for want in [
        "broken.yaml",
        "doc_to_text",
        "broken.py",
        "RuntimeError: broken at import",
    ] {
        assert!(e.contains(want), "`{want}` missing from: {e}");
    }
}
