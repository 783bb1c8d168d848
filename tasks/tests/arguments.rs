//! The `arguments` column equals what lm-evaluation-harness 0.4.13's `--log_samples` wrote for the same
//! task files (`tests/data/tasks/lmeval_arguments.json`: `lm_eval --model dummy --tasks
//! mc_tiny,gen_beam,ppl_tiny,mc_tiny_fewshot --include_path tests/data/tasks --log_samples`, each
//! sample's `arguments` re-serialised with `json.dumps(..., ensure_ascii=False)`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tasks::{LoadOptions, Registry, Task};

fn task_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tasks")
}

fn load(name: &str) -> Task {
    let reg = Registry::scan(&[task_dir()]).unwrap();
    let cfg = reg.task_config(name, Path::new(".")).unwrap();
    Task::load(cfg, &LoadOptions::default()).unwrap()
}

#[test]
fn arguments_match_the_harness_log() {
    let text = std::fs::read_to_string(task_dir().join("lmeval_arguments.json")).unwrap();
    let reference: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(reference.len(), 4);
    for (name, docs) in &reference {
        let task = load(name);
        let inst = task.instances(1234).unwrap();
        let docs = docs.as_array().unwrap();
        assert_eq!(inst.len(), docs.len(), "{name}");
        for (i, want) in inst.iter().zip(docs) {
            let got = task.harness_arguments(&i.requests);
            // Byte for byte, generation_kwargs included (its keys in the YAML's order).
            assert_eq!(got, want.as_str().unwrap(), "{name} doc {}", i.doc_id);
        }
    }
}

#[test]
fn beam_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let write = |body: &str| {
        std::fs::write(
            dir.path().join("t.yaml"),
            format!(
                "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: x.jsonl\n\
                 output_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n\
                 generation_kwargs:\n{body}"
            ),
        )
        .unwrap();
        Registry::scan(&[dir.path().to_path_buf()])
            .and_then(|r| r.task_config("t", Path::new(".")))
            .map(|c| c.generation_kwargs.unwrap())
    };
    let g = write("  num_beams: 3\n  early_stopping: never\n  length_penalty: 0.5\n").unwrap();
    assert_eq!(g.num_beams, 3);
    assert_eq!(g.early_stopping, tasks::EarlyStopping::Never);
    assert_eq!(g.length_penalty, 0.5);
    assert_eq!(write("  until: [x]\n").unwrap().num_beams, 1);
    for (body, want) in [
        ("  num_beams: 0\n", "num_beams must be an integer >= 1"),
        ("  num_beams: 3\n  do_sample: true\n", "beam sampling"),
        ("  early_stopping: sometimes\n", "early_stopping must be"),
        (
            "  repetition_penalty: 1.2\n",
            "repetition_penalty is not supported",
        ),
    ] {
        let e = write(body).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("task `t`"), "{e}");
    }
}
