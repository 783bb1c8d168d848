//! Fault injection: every state-changing command killed (as by kill -9) at each of its steps, through
//! the test-only `MOEVAL_TEST_FAULT` crash points (see the `durable` crate). Afterwards either the
//! result equals an uninterrupted run or a retry completes it; never a silent half-state. After an
//! interrupted datastore opt-out, the owner's text, token ids and kNN entries are absent from every
//! file of the store, deleted documents of every segment included.

mod serve_common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serve_common::Server;
use tantivy::schema::Value;
use tantivy::TantivyDocument;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn default_model() -> PathBuf {
    Path::new(ROOT).join("assets/default-model")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the binary, with the crash point `fault` armed when given.
fn run(fault: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moeval"));
    c.args(["--threads", "2"]).args(args);
    c.env_remove("MOEVAL_TEST_FAULT");
    if let Some(f) = fault {
        c.env("MOEVAL_TEST_FAULT", f);
    }
    c.output().expect("moeval runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command died at its crash point (killed, not a clean error exit).
fn killed(out: &Output, point: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_none() && err.contains(&format!("fault point {point}")),
        "expected a crash at {point}: {:?}\n{err}",
        out.status
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A quarter of the shipped datastore documents: public and news owners.
fn corpus(dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(ROOT).join("assets/suite/data/trained/datastore.jsonl"))
            .unwrap();
    let lines: Vec<&str> = text.lines().step_by(4).collect();
    let path = dir.join("docs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn build_store(input: &Path, out: &Path, fault: Option<&str>) -> Output {
    let model = default_model();
    run(
        fault,
        &[
            "datastore",
            "build",
            "--input",
            s(input),
            "--tokenizer",
            s(&model),
            "--out",
            s(out),
            "--block",
            "64",
            "--stride",
            "32",
        ],
    )
}

/// An approximate index in parts of 1,024 keys (several parts even for this small store).
const HNSW: &[&str] = &["--knn-index", "hnsw", "--knn-part-mib", "0"];

fn knn_with(store: &Path, fault: Option<&str>, index: &[&str]) -> Output {
    let model = default_model();
    let args = [&["datastore", "knn", s(store), "--model", s(&model)], index].concat();
    run(fault, &args)
}

/// The current key folder's index: its layout and every graph file's bytes (builds are
/// deterministic, so a redone step must give the same files).
fn knn_index_files(store: &Path) -> Vec<(String, Vec<u8>)> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    let dir = store.join(m["knn"]["dir"].as_str().unwrap_or("knn"));
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "usearch" || x == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// The raw key bytes (f16) of the entries of `blocks` in the store's current key folder.
fn keys_of(store: &Path, blocks: &HashSet<u64>) -> Vec<Vec<u8>> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    let dir = store.join(m["knn"]["dir"].as_str().unwrap_or("knn"));
    let dim = m["knn"]["dim"].as_u64().unwrap() as usize;
    let keys = std::fs::read(dir.join("keys.f16")).unwrap();
    knn_entries(store)
        .0
        .iter()
        .enumerate()
        .filter(|(_, (_, b))| blocks.contains(b))
        .map(|(i, _)| keys[i * dim * 2..(i + 1) * dim * 2].to_vec())
        .collect()
}

fn opt_out_news(store: &Path, fault: Option<&str>) -> Output {
    run(
        fault,
        &[
            "datastore",
            "opt-out",
            s(store),
            "--owner",
            "news",
            "--reason",
            "left",
        ],
    )
}

/// Every stored block of every segment, deleted ones included: (owner, text, token bytes).
fn all_stored_blocks(store: &Path) -> Vec<(String, String, Vec<u8>)> {
    let index = tantivy::Index::open_in_dir(store.join("index")).unwrap();
    let schema = index.schema();
    let (owner, text, tokens) = (
        schema.get_field("owner").unwrap(),
        schema.get_field("text").unwrap(),
        schema.get_field("tokens").unwrap(),
    );
    let mut out = Vec::new();
    for meta in index.searchable_segment_metas().unwrap() {
        let segment = index.segment(meta);
        let reader = tantivy::SegmentReader::open(&segment).unwrap();
        let docs = reader.get_store_reader(0).unwrap();
        for doc in docs.iter::<TantivyDocument>(None) {
            let doc = doc.unwrap();
            let get_str = |f| {
                doc.get_first(f)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            let bytes = doc
                .get_first(tokens)
                .and_then(|v| v.as_bytes())
                .unwrap_or(&[])
                .to_vec();
            out.push((get_str(owner), get_str(text), bytes));
        }
    }
    out
}

/// kNN entries (value, block id) of the store's current key folder, and the key folders present.
fn knn_entries(store: &Path) -> (Vec<(u32, u64)>, Vec<String>) {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    let dir = m["knn"]["dir"].as_str().unwrap_or("knn").to_string();
    let bytes = std::fs::read(store.join(&dir).join("entries.bin")).unwrap();
    let entries = bytes
        .chunks_exact(12)
        .map(|c| {
            (
                u32::from_le_bytes(c[..4].try_into().unwrap()),
                u64::from_le_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect();
    let mut dirs: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("knn"))
        .collect();
    dirs.sort();
    (entries, dirs)
}

/// Block ids of the news owner before the opt-out (kNN entries refer to them).
fn news_block_ids(store: &Path) -> HashSet<u64> {
    let q = run(None, &["datastore", "stats", s(store), "--json"]);
    ok(&q);
    let index = tantivy::Index::open_in_dir(store.join("index")).unwrap();
    let reader = index.reader().unwrap();
    let searcher = reader.searcher();
    let schema = index.schema();
    let (owner, block) = (
        schema.get_field("owner").unwrap(),
        schema.get_field("block_id").unwrap(),
    );
    let mut ids = HashSet::new();
    for seg in searcher.segment_readers() {
        let docs = seg.get_store_reader(0).unwrap();
        for doc in docs.iter::<TantivyDocument>(seg.alive_bitset()) {
            let doc = doc.unwrap();
            if doc.get_first(owner).and_then(|v| v.as_str()) == Some("news") {
                ids.insert(doc.get_first(block).and_then(|v| v.as_u64()).unwrap());
            }
        }
    }
    ids
}

/// The owner's blocks are nowhere in the store: not in any segment's stored documents (deleted ones
/// included), not as raw text or token bytes in any file, not in the kNN entries, their kNN keys in
/// no file (key files and index graphs alike), and no stale key folder is left.
fn assert_canary_absent(
    store: &Path,
    canary: &[(String, String, Vec<u8>)],
    blocks: &HashSet<u64>,
    keys: &[Vec<u8>],
) {
    let stored = all_stored_blocks(store);
    assert!(
        stored.iter().all(|(o, _, _)| o != "news"),
        "a news block is still stored"
    );
    let texts: HashSet<&str> = stored.iter().map(|(_, t, _)| t.as_str()).collect();
    let file_bytes: Vec<(PathBuf, Vec<u8>)> = files(store)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    for (_, text, tokens) in canary {
        // Text shared word for word with a block of another owner is not the owner's to remove.
        if texts.contains(text.as_str()) || tokens.len() < 32 {
            continue;
        }
        for (path, bytes) in &file_bytes {
            assert!(
                !bytes.windows(tokens.len()).any(|w| w == tokens.as_slice()),
                "news token ids found in {}",
                path.display()
            );
            assert!(
                !bytes.windows(text.len()).any(|w| w == text.as_bytes()),
                "news text found in {}",
                path.display()
            );
        }
    }
    for key in keys.iter().step_by(7) {
        for (path, bytes) in &file_bytes {
            assert!(
                !bytes.windows(key.len()).any(|w| w == key.as_slice()),
                "a news kNN key found in {}",
                path.display()
            );
        }
    }
    let (entries, dirs) = knn_entries(store);
    assert!(
        entries.iter().all(|(_, b)| !blocks.contains(b)),
        "news kNN entries remain"
    );
    assert_eq!(dirs.len(), 1, "stale kNN folders: {dirs:?}");
    assert!(!store.join("opt-out.pending.json").exists());
}

fn stats_json(store: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&ok(&run(None, &["datastore", "stats", s(store), "--json"]))).unwrap();
    // The store's identity names its key folder, which differs after a redone step.
    if let Some(o) = v.as_object_mut() {
        o.remove("identity");
        o.remove("dir");
    }
    v
}

#[test]
fn datastore_opt_out_survives_a_crash_at_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let input = corpus(tmp.path());
    let base = tmp.path().join("base");
    ok(&build_store(&input, &base, None));
    // With an approximate index, so that the opt-out has graphs to rebuild too.
    ok(&knn_with(&base, None, HNSW));
    let canary: Vec<_> = all_stored_blocks(&base)
        .into_iter()
        .filter(|(o, _, _)| o == "news")
        .collect();
    assert!(!canary.is_empty());
    let blocks = news_block_ids(&base);
    let keys = keys_of(&base, &blocks);
    assert!(!keys.is_empty());
    let reference = tmp.path().join("reference");
    copy_tree(&base, &reference);
    ok(&opt_out_news(&reference, None));
    assert_canary_absent(&reference, &canary, &blocks, &keys);
    let want = (
        stats_json(&reference),
        knn_entries(&reference).0,
        knn_index_files(&reference),
    );
    assert!(want.2.len() > 2, "several index parts: {:?}", want.2.len());

    let points = [
        "datastore.opt-out.intent",
        "datastore.opt-out.logged",
        "datastore.opt-out.deleted",
        "datastore.opt-out.merged",
        // The owner's keys sit in one or two parts: crash while rebuilding the first.
        "knn.index.part",
        "datastore.opt-out.knn",
        "datastore.opt-out.manifest",
    ];
    for (i, point) in points.iter().enumerate() {
        let store = tmp.path().join(format!("crash-{i}"));
        copy_tree(&base, &store);
        killed(
            &opt_out_news(&store, Some(point)),
            point.split('@').next().unwrap(),
        );
        assert!(
            store.join("opt-out.pending.json").exists(),
            "{point}: no intent"
        );
        // The audit line exists before anything is deleted (from the second step on).
        if i > 0 {
            let audit = std::fs::read_to_string(store.join("audit.jsonl")).unwrap();
            assert!(audit.contains("\"opt-out-started\""), "{point}: {audit}");
        }
        // Recovery: alternately any reader (stats) and a retry of the same command.
        if i % 2 == 0 {
            stats_json(&store);
        } else {
            ok(&opt_out_news(&store, None));
        }
        assert_canary_absent(&store, &canary, &blocks, &keys);
        assert_eq!(
            (
                stats_json(&store),
                knn_entries(&store).0,
                knn_index_files(&store)
            ),
            want,
            "{point}: differs from an uninterrupted opt-out"
        );
        let audit = std::fs::read_to_string(store.join("audit.jsonl")).unwrap();
        let count = |a: &str| audit.matches(&format!("\"action\":\"{a}\"")).count();
        assert_eq!(
            (count("opt-out-started"), count("opt-out")),
            (1, 1),
            "{point}: {audit}"
        );
        assert!(audit.contains("\"actor\":\"cli:"), "{point}: {audit}");
    }
}

#[test]
fn killed_knn_and_build_leave_usable_stores_and_retries_complete_them() {
    let tmp = tempfile::tempdir().unwrap();
    let input = corpus(tmp.path());
    let base = tmp.path().join("base");
    ok(&build_store(&input, &base, None));
    let plain = stats_json(&base);
    // A killed build leaves nothing at --out; the retry builds the same store.
    let out = tmp.path().join("rebuilt");
    killed(
        &build_store(&input, &out, Some("staged.commit")),
        "staged.commit",
    );
    assert!(!out.exists());
    ok(&build_store(&input, &out, None));
    assert_eq!(stats_json(&out), plain);

    let reference = tmp.path().join("reference");
    copy_tree(&base, &reference);
    ok(&knn_with(&reference, None, HNSW));
    let want = (knn_entries(&reference).0, knn_index_files(&reference));
    for (i, point) in [
        "knn.push@3",
        "knn.written",
        "knn.index.part@2",
        "knn.committed",
    ]
    .iter()
    .enumerate()
    {
        // Killed while computing keys for a store with none, and while replacing existing keys.
        for with_keys in [false, true] {
            let store = tmp.path().join(format!("knn-{i}-{with_keys}"));
            copy_tree(if with_keys { &reference } else { &base }, &store);
            killed(
                &knn_with(&store, Some(point), HNSW),
                point.split('@').next().unwrap(),
            );
            // Still a usable store: it opens and answers queries.
            stats_json(&store);
            ok(&run(
                None,
                &["datastore", "query", s(&store), "--text", "news", "--json"],
            ));
            ok(&knn_with(&store, None, HNSW));
            assert_eq!(
                (knn_entries(&store).0, knn_index_files(&store)),
                want,
                "{point}"
            );
            assert_eq!(knn_entries(&store).1.len(), 1, "{point}: stale key folders");
        }
    }
    // Dropping the index and building it again on the same keys, killed half-way: the store keeps
    // searching with what it had, and the retry gives the same graphs.
    let store = tmp.path().join("reindexed");
    copy_tree(&reference, &store);
    let reindex = |fault, index: &[&str]| {
        run(
            fault,
            &[&["datastore", "reindex", s(&store)], index].concat(),
        )
    };
    ok(&reindex(None, &["--knn-index", "exact"]));
    assert!(knn_index_files(&store).is_empty());
    for point in ["knn.index.part@2", "knn.index.committed"] {
        killed(
            &reindex(Some(point), HNSW),
            point.split('@').next().unwrap(),
        );
        stats_json(&store);
    }
    ok(&reindex(None, HNSW));
    assert_eq!(
        (knn_entries(&store).0, knn_index_files(&store)),
        want,
        "reindexed"
    );
    assert_eq!(knn_entries(&store).1.len(), 1, "stale key folders");
}

#[test]
fn policy_decision_logged_before_a_crash_is_in_force_and_completed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_tree(&default_model(), &model);
    let out = run(
        Some("policy.logged"),
        &[
            "experts",
            "opt-out",
            "news",
            "--model",
            s(&model),
            "--reason",
            "withdrawn",
        ],
    );
    killed(&out, "policy.logged");
    // The audit line names the expert, its owner and who acted, and the decision is in force.
    let log = std::fs::read_to_string(model.join("expert-policy.log.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(
        (
            rec["expert"].as_str(),
            rec["owner"].as_str(),
            rec["action"].as_str(),
            rec["seq"].as_u64()
        ),
        (Some("news"), Some("news"), Some("opt-out"), Some(1))
    );
    assert!(rec["actor"].as_str().unwrap().starts_with("cli:"));
    let list: serde_json::Value = serde_json::from_str(&ok(&run(
        None,
        &["experts", "list", "--model", s(&model), "--json"],
    )))
    .unwrap();
    let text = list.to_string();
    assert!(text.contains("withdrawn"), "{text}");
    // A run honours it.
    let fwd = tmp.path().join("fwd.safetensors");
    let e = run(
        None,
        &[
            "forward",
            "--model",
            s(&model),
            "--experts",
            "public,news",
            "--prompt",
            "The",
            "--out",
            s(&fwd),
        ],
    );
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("opted out by its owner"),
        "{err}"
    );
    // The next decision writes the policy file up to date.
    ok(&run(
        None,
        &[
            "experts",
            "opt-out",
            "math",
            "--model",
            s(&model),
            "--reason",
            "r",
        ],
    ));
    let policy = std::fs::read_to_string(model.join("expert-policy.json")).unwrap();
    assert!(
        policy.contains("\"news\"")
            && policy.contains("\"math\"")
            && policy.contains("\"applied\": 2"),
        "{policy}"
    );

    // Killed after the policy file was written: nothing is half done.
    let out = run(
        Some("policy.written"),
        &[
            "experts",
            "opt-in",
            "news",
            "--model",
            s(&model),
            "--reason",
            "back",
        ],
    );
    killed(&out, "policy.written");
    let policy = std::fs::read_to_string(model.join("expert-policy.json")).unwrap();
    assert!(
        !policy.contains("\"news\"") && policy.contains("\"applied\": 3"),
        "{policy}"
    );
}

#[test]
fn concurrent_cli_opt_outs_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let owners = ["math", "code", "news", "reviews"];
    for trial in 0..20 {
        let model = tmp.path().join(format!("m{trial}"));
        std::fs::create_dir_all(&model).unwrap();
        for f in ["config.json", "experts.toml"] {
            std::fs::copy(default_model().join(f), model.join(f)).unwrap();
        }
        // All four owners at once, then all four back at once: every reported change is kept.
        for (action, expect) in [("opt-out", 4), ("opt-in", 8)] {
            let children: Vec<_> = owners
                .iter()
                .map(|o| {
                    Command::new(env!("CARGO_BIN_EXE_moeval"))
                        .args([
                            "experts",
                            action,
                            o,
                            "--model",
                            s(&model),
                            "--reason",
                            "parallel",
                        ])
                        .env_remove("MOEVAL_TEST_FAULT")
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            for c in children {
                ok(&c.wait_with_output().unwrap());
            }
            let policy: serde_json::Value =
                serde_json::from_slice(&std::fs::read(model.join("expert-policy.json")).unwrap())
                    .unwrap();
            let out = policy["opted_out"].as_array().unwrap().len();
            assert_eq!(
                out,
                if action == "opt-out" { 4 } else { 0 },
                "trial {trial}: {policy}"
            );
            assert_eq!(policy["applied"], expect, "trial {trial}: {policy}");
        }
        let log = std::fs::read_to_string(model.join("expert-policy.log.jsonl")).unwrap();
        let seqs: Vec<u64> = log
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "trial {trial}: {log}");
    }
}

#[test]
fn cli_and_admin_api_interleaved_lose_no_change() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_tree(&default_model(), &model);
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(b"news-secret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let tokens = tmp.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!("[[owner]]\nname = \"news\"\ntoken_sha256 = \"{digest}\"\n"),
    )
    .unwrap();
    let server = Server::start(&model, &["--admin-tokens", s(&tokens)]);
    const ROUNDS: usize = 12;
    let cli = {
        let model = model.clone();
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                let action = if i % 2 == 0 { "opt-out" } else { "opt-in" };
                ok(&run(
                    None,
                    &[
                        "experts",
                        action,
                        "math",
                        "--model",
                        s(&model),
                        "--reason",
                        "cli",
                    ],
                ));
            }
        })
    };
    for i in 0..ROUNDS {
        let action = if i % 2 == 0 { "opt-out" } else { "opt-in" };
        let r = server.post_raw(
            &format!("/admin/experts/news/{action}"),
            br#"{"reason": "admin"}"#,
            &[("Authorization", "Bearer news-secret")],
        );
        assert_eq!(r.status, 200, "round {i}: {}", r.text());
    }
    cli.join().unwrap();
    drop(server);
    let log = std::fs::read_to_string(model.join("expert-policy.log.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=2 * ROUNDS as u64).collect::<Vec<_>>());
    for (expert, actor) in [("math", "cli:"), ("news", "admin:news")] {
        let mine: Vec<_> = records.iter().filter(|r| r["expert"] == expert).collect();
        assert_eq!(mine.len(), ROUNDS, "{expert}");
        assert!(mine
            .iter()
            .all(|r| r["actor"].as_str().unwrap().starts_with(actor) && r["owner"] == expert));
    }
    let policy: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("expert-policy.json")).unwrap()).unwrap();
    assert_eq!(policy["opted_out"], serde_json::json!([]));
    assert_eq!(policy["applied"], 2 * ROUNDS as u64);
}

#[test]
fn a_running_server_never_serves_an_interrupted_opt_outs_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let input = corpus(tmp.path());
    let store = tmp.path().join("store");
    ok(&build_store(&input, &store, None));
    let news_text = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["owner"] == "news")
        .unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    let server = Server::start(&default_model(), &["--datastore", s(&store)]);
    let body = serde_json::json!({"prompt": news_text, "max_tokens": 1, "temperature": 0,
        "moeval": {"retrieval": {"mode": "ric", "k": 16}}});
    let owners = || -> (Vec<String>, serde_json::Value) {
        let r = server.post("/v1/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let info = &v["moeval"]["retrieval"];
        let owners = info["documents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["owner"].as_str().unwrap().to_string())
            .collect();
        (owners, info["datastore"]["excluded_owners"].clone())
    };
    let (before, _) = owners();
    assert!(before.iter().any(|o| o == "news"), "{before:?}");
    // Killed after the index delete was committed, before the manifest changed.
    killed(
        &opt_out_news(&store, Some("datastore.opt-out.deleted")),
        "datastore.opt-out.deleted",
    );
    let (after, excluded) = owners();
    drop(server);
    assert!(after.iter().all(|o| o != "news"), "{after:?}");
    assert_eq!(excluded, serde_json::json!(["news"]));
    assert!(!store.join("opt-out.pending.json").exists());
}
