//! Hugging Face Hub datasets from the local cache (no network): resolution against the `datasets`
//! library's own answers, and tasks loading from caches built in the real layout.

#[path = "support/hub_cache.rs"]
mod hub_cache;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use tasks::hub::{self, DatasetRef, Listing, Unresolved};
use tasks::{Error, LoadOptions, Registry, Task};

fn data(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hub")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        _ => panic!("not a path list: {v}"),
    }
}

/// Every layout of cases.json resolves to the files `datasets` 5.2 resolves (recorded by
/// scripts/hub_resolution_reference.py), and where `datasets` refuses, moeval refuses too.
#[test]
fn resolution_matches_the_datasets_library() {
    let cases = data("cases.json");
    let reference = data("resolution_reference.json");
    assert_eq!(reference["datasets_version"], "5.2.0");
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let readme = case["readme"].as_str().map(str::to_string);
        let mut files = strings(&case["files"]);
        if readme.is_some() {
            files.push("README.md".into());
        }
        let listing = Listing::new(files, readme);
        let results = reference["results"][name].as_array().unwrap();
        for (q, want) in case["queries"].as_array().unwrap().iter().zip(results) {
            let d = DatasetRef {
                repo: format!("test/{name}"),
                config: q["config"].as_str().map(str::to_string),
                revision: "main".into(),
                data_dir: q["data_dir"].as_str().map(str::to_string),
                data_files: q.get("data_files").map(|df| {
                    df.as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), strings(v)))
                        .collect()
                }),
            };
            for split in q["splits"].as_array().unwrap() {
                let split = split.as_str().unwrap();
                let got = hub::resolve_files(&listing, &d, split);
                let ctx = format!("{name} {q} split {split}: got {got:?}, want {want}");
                if want.get("error").is_some() {
                    assert!(matches!(got, Err(Unresolved::Invalid(_))), "{ctx}");
                } else {
                    match &want["splits"][split] {
                        Value::Null => assert!(got.is_err(), "{ctx}"),
                        w => assert_eq!(got.as_ref().ok(), Some(&strings(w)), "{ctx}"),
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "{checked}");
}

/// One cache for every test of this file (the cache folder is read from the environment):
/// ai2_arc at `main`, an automatic-pattern repository, and a repository whose data exist only in
/// the Parquet export.
fn cache() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("moeval-hub-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        hub_cache::write_arc(&root);
        // data/train-*.parquet and data/test-*.parquet, no README.md: the automatic patterns.
        let auto = hub_cache::Repo::new(&root, "someone/auto");
        let c = hub_cache::commit("auto");
        let row = |id: &'static str| hub_cache::ArcRow {
            id,
            question: "q?",
            choices: &["x", "y"],
            labels: &["A", "B"],
            answer: "A",
        };
        auto.add(
            &c,
            "data/train-00000-of-00002.parquet",
            &hub_cache::arc_parquet(&[row("t0")]),
        );
        auto.add(
            &c,
            "data/train-00001-of-00002.parquet",
            &hub_cache::arc_parquet(&[row("t1"), row("t2")]),
        );
        auto.add(
            &c,
            "data/test-00000-of-00001.parquet",
            &hub_cache::arc_parquet(&[row("e0")]),
        );
        auto.set_ref("main", &c);
        // A loading script at `main` (no data files): the Parquet export has the data.
        let script = hub_cache::Repo::new(&root, "someone/scripted");
        let c = hub_cache::commit("scripted");
        script.add(&c, "README.md", b"---\nlicense: mit\n---\n# scripted\n");
        script.add(&c, "scripted.py", b"# a loading script\n");
        script.set_ref("main", &c);
        let e = hub_cache::commit("scripted-export");
        script.add(
            &e,
            "plain/test/0000.parquet",
            &hub_cache::arc_parquet(&[row("p0"), row("p1")]),
        );
        script.add(
            &e,
            "plain/test/0001.parquet",
            &hub_cache::arc_parquet(&[row("p2")]),
        );
        script.add(
            &e,
            "plain/partial-train/0000.parquet",
            &hub_cache::arc_parquet(&[row("p3")]),
        );
        script.set_ref(hub::PARQUET_EXPORT, &e);
        std::env::set_var("HF_HUB_CACHE", &root);
        root
    })
}

/// Loads `yaml` (a task named `t`) from a fresh folder.
fn load(yaml: &str, opts: &LoadOptions) -> tasks::Result<Task> {
    cache();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.yaml"), yaml).unwrap();
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    Task::load(reg.task_config("t", Path::new(".")).unwrap(), opts)
}

const ARC_EASY: &str = "task: t\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\noutput_type: multiple_choice\ntraining_split: train\nvalidation_split: validation\ntest_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: 0\ndoc_to_choice: \"{{choices.text}}\"\n";

#[test]
fn arc_easy_reads_its_readme_config_from_the_cache() {
    let opts = LoadOptions {
        num_fewshot: Some(1),
        ..LoadOptions::default()
    };
    let t = load(ARC_EASY, &opts).unwrap();
    let docs = t.docs();
    assert_eq!(docs.len(), 4);
    assert_eq!(docs[0]["id"], "ARC-Easy/test/0");
    assert_eq!(docs[1]["answerKey"], "B");
    assert_eq!(
        docs[2]["choices"],
        serde_json::json!({"text": ["red", "green", "blue", "black"], "label": ["A", "B", "C", "D"]})
    );
    assert_eq!(
        t.doc_to_text(&docs[3], 3).unwrap(),
        "Question: Which ARC-Easy test question is number 3?\nAnswer:"
    );
    assert_eq!(
        t.doc_to_choice(&docs[0], 0).unwrap(),
        ["red", "green", "blue", "black"]
    );
    // The few-shot exemplar comes from the training split of the same configuration.
    let inst = t.instances(1234).unwrap();
    let prompt = format!("{:?}", inst[0]);
    assert!(prompt.contains("ARC-Easy train question"), "{prompt}");
}

#[test]
fn automatic_patterns_read_every_shard_in_order() {
    let yaml = "task: t\ndataset_path: someone/auto\noutput_type: multiple_choice\ntest_split: train\ndoc_to_text: \"{{question}}\"\ndoc_to_target: 0\ndoc_to_choice: \"{{choices.text}}\"\n";
    let t = load(yaml, &LoadOptions::default()).unwrap();
    let ids: Vec<&str> = t.docs().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["t0", "t1", "t2"]);
}

#[test]
fn parquet_export_serves_a_scripted_dataset() {
    let yaml = "task: t\ndataset_path: someone/scripted\ndataset_name: plain\noutput_type: multiple_choice\ntraining_split: train\ntest_split: test\ndoc_to_text: \"{{question}}\"\ndoc_to_target: 0\ndoc_to_choice: \"{{choices.text}}\"\n";
    let opts = LoadOptions {
        num_fewshot: Some(1),
        ..LoadOptions::default()
    };
    let t = load(yaml, &opts).unwrap();
    let ids: Vec<&str> = t.docs().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["p0", "p1", "p2"]);
    // `partial-train` stands in for `train`.
    let found = hub::find(cache(), &DatasetRef::of_task(&t.config).unwrap(), "train").unwrap();
    assert_eq!(found.revision, hub::PARQUET_EXPORT);
    assert!(found.paths[0].ends_with("plain/partial-train/0000.parquet"));
}

#[test]
fn a_missing_dataset_names_repo_config_split_revision_and_the_fix() {
    let yaml = ARC_EASY.replace("allenai/ai2_arc", "nobody/absent");
    let err = load(&yaml, &LoadOptions::default()).err().unwrap();
    let Error::HubMissing(m) = &err else {
        panic!("not a HubMissing: {err}");
    };
    assert_eq!(m.repo, "nobody/absent");
    assert_eq!(m.task.as_deref(), Some("t"));
    let msg = err.to_string();
    for part in [
        "nobody/absent",
        "`ARC-Easy`",
        "split `test`",
        "revision `main`",
        "datasets--nobody--absent",
        "no `refs/main`",
        "moeval download --tasks t",
        "HF_HUB_OFFLINE",
    ] {
        assert!(msg.contains(part), "`{part}` not in: {msg}");
    }
}

#[test]
fn a_missing_shard_or_file_is_named_and_nothing_partial_is_read() {
    cache();
    let root = tempfile::tempdir().unwrap();
    let repo = hub_cache::Repo::new(root.path(), "o/partial");
    let c = hub_cache::commit("partial");
    let row = hub_cache::ArcRow {
        id: "a",
        question: "q",
        choices: &["x"],
        labels: &["A"],
        answer: "A",
    };
    repo.add(&c, "README.md", hub_cache::ARC_README.as_bytes());
    repo.add(
        &c,
        "ARC-Easy/test-00000-of-00002.parquet",
        &hub_cache::arc_parquet(&[row]),
    );
    repo.set_ref("main", &c);
    let mut d = DatasetRef {
        repo: "o/partial".into(),
        config: Some("ARC-Easy".into()),
        revision: "main".into(),
        data_dir: None,
        data_files: None,
    };
    let msg = hub::find(root.path(), &d, "test").unwrap_err().to_string();
    assert!(
        msg.contains("ARC-Easy/test-00001-of-00002.parquet"),
        "{msg}"
    );
    let msg = hub::find(root.path(), &d, "train").unwrap_err().to_string();
    assert!(msg.contains("ARC-Easy/train-*"), "{msg}");
    // A split the README's configuration does not have is not "missing": it cannot exist.
    let err = hub::find(root.path(), &d, "dev").unwrap_err();
    assert!(matches!(err, Error::Hub { .. }), "{err}");
    d.config = Some("ARC-Hard".into());
    let msg = hub::find(root.path(), &d, "test").unwrap_err().to_string();
    assert!(
        msg.contains("no configuration `ARC-Hard`") && msg.contains("`ARC-Easy`"),
        "{msg}"
    );
}

#[test]
fn a_local_folder_is_a_dataset_too() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("mydata")).unwrap();
    std::fs::write(
        dir.path().join("mydata/test.jsonl"),
        "{\"q\": \"a\"}\n{\"q\": \"b\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("t.yaml"),
        "task: t\ndataset_path: mydata\noutput_type: loglikelihood\ntest_split: test\ndoc_to_text: \"{{q}}\"\ndoc_to_target: \" x\"\n",
    )
    .unwrap();
    let reg = Registry::scan(&[dir.path().to_path_buf()]).unwrap();
    let t = Task::load(
        reg.task_config("t", Path::new(".")).unwrap(),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(t.docs().len(), 2);
}

#[test]
fn cache_root_follows_huggingface_hub() {
    // Only checks the pure parts: the repository folder name and the layout `find` reads.
    let root = Path::new("/c");
    assert_eq!(
        hub::repo_folder(root, "allenai/ai2_arc"),
        Path::new("/c/datasets--allenai--ai2_arc")
    );
    assert!(hub::snapshot(cache(), "allenai/ai2_arc", "main").is_some());
    let c = hub_cache::commit("ai2_arc");
    assert_eq!(hub::snapshot(cache(), "allenai/ai2_arc", &c).unwrap().0, c);
}
