//! Hugging Face Hub datasets through the `moeval` binary, without the network: a task reading
//! ai2_arc from a cache built in the real layout, the offline missing-file error (exit code 1, no
//! results), `moeval download --tasks`, and a download from a local stand-in for the Hub
//! (`HF_ENDPOINT`) into an empty cache.

#[path = "../tasks/tests/support/hub_cache.rs"]
mod hub_cache;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/tiny-flexolmo"
    ))
}

/// lm-evaluation-harness's arc_easy, with a target the tiny test data supports.
const ARC_TASK: &str = "task: arc_tiny\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\noutput_type: multiple_choice\ntraining_split: train\nvalidation_split: validation\ntest_split: test\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: 0\ndoc_to_choice: \"{{choices.text}}\"\nmetric_list:\n  - metric: acc\n";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tasks")).unwrap();
        std::fs::write(dir.path().join("tasks/arc_tiny.yaml"), ARC_TASK).unwrap();
        std::fs::create_dir_all(dir.path().join("cache")).unwrap();
        Env { dir }
    }
    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    fn moeval(&self, offline: bool, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_moeval"));
        c.args(args)
            .env("HF_HUB_CACHE", self.cache())
            .env("HF_HOME", self.dir.path().join("hf-home"))
            .env_remove("HF_TOKEN")
            .env_remove("HF_ENDPOINT")
            .env_remove("TRANSFORMERS_OFFLINE");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        c.output().expect("moeval runs")
    }
    fn eval(&self, offline: bool, run_id: &str) -> Output {
        let tasks = self.dir.path().join("tasks");
        let out = self.out();
        self.moeval(
            offline,
            &[
                "--threads",
                "2",
                "eval",
                "--model",
                fixture().to_str().unwrap(),
                "--tasks",
                "arc_tiny",
                "--include-path",
                tasks.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--run-id",
                run_id,
            ],
        )
    }
}

fn text(o: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn offline_a_missing_dataset_fails_with_exit_code_1_and_writes_no_results() {
    let env = Env::new();
    let o = env.eval(true, "r1");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for part in [
        "allenai/ai2_arc",
        "`ARC-Easy`",
        "split `test`",
        "revision `main`",
        "datasets--allenai--ai2_arc",
        "moeval download --tasks arc_tiny",
    ] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
    assert!(!env.out().join("r1").exists());
    // `moeval download --tasks` offline only checks, and fails the same way.
    let tasks = env.dir.path().join("tasks");
    let o = env.moeval(
        true,
        &[
            "download",
            "--tasks",
            "arc_tiny",
            "--include-path",
            tasks.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no `refs/main`"),
        "{}",
        text(&o)
    );
    // With README.md cached but not the split's file, the pattern that matched nothing is named.
    let repo = hub_cache::Repo::new(&env.cache(), "allenai/ai2_arc");
    let c = hub_cache::commit("partial");
    repo.add(&c, "README.md", hub_cache::ARC_README.as_bytes());
    repo.set_ref("main", &c);
    let o = env.eval(true, "r1");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no file matches `ARC-Easy/test-*`"),
        "{}",
        text(&o)
    );
    assert!(!env.out().join("r1").exists());
}

#[test]
fn offline_eval_reads_the_cached_hub_dataset_and_records_its_files() {
    let env = Env::new();
    hub_cache::write_arc(&env.cache());
    let o = env.eval(true, "r1");
    assert!(o.status.success(), "{}", text(&o));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(env.out().join("r1/manifest.json")).unwrap())
            .unwrap();
    let s = manifest.to_string();
    assert!(s.contains("ARC-Easy/test-00000-of-00001.parquet"), "{s}");
    let tasks = env.dir.path().join("tasks");
    let o = env.moeval(
        true,
        &[
            "download",
            "--tasks",
            "arc_tiny",
            "--include-path",
            tasks.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
}

/// A stand-in for the Hub's two endpoints hf-hub uses: the revision's file list
/// (`/api/datasets/ID/revision/REV`) and file downloads (`/datasets/ID/resolve/REV/PATH`, with the
/// `etag`, `x-repo-commit` and `content-range` headers). Serves one repository from a folder.
fn serve(
    repo_id: &'static str,
    sha: String,
    root: PathBuf,
) -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().to_string());
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let _ = tx.send(path.clone());
            let list_prefix = format!("/api/datasets/{repo_id}/revision/");
            let file_prefix = format!("/datasets/{repo_id}/resolve/main/");
            let (status, headers, body): (&str, String, Vec<u8>) = if path.starts_with(&list_prefix)
                && path.ends_with("/main")
            {
                let mut files = Vec::new();
                let mut stack = vec![root.clone()];
                while let Some(d) = stack.pop() {
                    for e in std::fs::read_dir(&d).unwrap() {
                        let p = e.unwrap().path();
                        if p.is_dir() {
                            stack.push(p);
                        } else {
                            let rel = p
                                .strip_prefix(&root)
                                .unwrap()
                                .to_string_lossy()
                                .replace('\\', "/");
                            files.push(serde_json::json!({"rfilename": rel}));
                        }
                    }
                }
                let body = serde_json::json!({"sha": sha, "siblings": files}).to_string();
                (
                    "200 OK",
                    "Content-Type: application/json\r\n".into(),
                    body.into_bytes(),
                )
            } else if let Some(rel) = path.strip_prefix(&file_prefix) {
                match std::fs::read(root.join(rel)) {
                    Ok(bytes) => {
                        let etag = format!("{:x}", bytes.len() * 7919 + rel.len());
                        let start: usize = range
                            .as_deref()
                            .and_then(|r| r.split('-').next())
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        let end = if range.as_deref() == Some("0-0") {
                            1
                        } else {
                            bytes.len()
                        };
                        let body = bytes[start.min(bytes.len())..end.min(bytes.len())].to_vec();
                        let h = format!(
                                "ETag: \"{etag}\"\r\nX-Repo-Commit: {sha}\r\nContent-Range: bytes {start}-{}/{}\r\n",
                                end.saturating_sub(1),
                                bytes.len()
                            );
                        ("206 Partial Content", h, body)
                    }
                    Err(_) => ("404 Not Found", String::new(), Vec::new()),
                }
            } else {
                ("404 Not Found", String::new(), Vec::new())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(&body);
        }
    });
    (addr, rx)
}

#[test]
fn eval_downloads_a_missing_dataset_from_the_hub_endpoint_into_the_cache() {
    let env = Env::new();
    // The repository's files, as the Hub would serve them: build a cache elsewhere and serve its
    // snapshot folder.
    let source = tempfile::tempdir().unwrap();
    let sha = hub_cache::write_arc(source.path());
    let snapshot = source
        .path()
        .join("datasets--allenai--ai2_arc/snapshots")
        .join(&sha);
    let (endpoint, requests) = serve("allenai/ai2_arc", sha.clone(), snapshot);
    let mut c = Command::new(env!("CARGO_BIN_EXE_moeval"));
    let tasks = env.dir.path().join("tasks");
    let o = c
        .args(["--threads", "2", "eval", "--model"])
        .arg(fixture())
        .args(["--tasks", "arc_tiny", "--include-path"])
        .arg(&tasks)
        .arg("--output")
        .arg(env.out())
        .args(["--run-id", "r1"])
        .env("HF_HUB_CACHE", env.cache())
        .env("HF_HOME", env.dir.path().join("hf-home"))
        .env("HF_ENDPOINT", &endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "downloading dataset allenai/ai2_arc: main:ARC-Easy/test-00000-of-00001.parquet"
        ),
        "{err}"
    );
    // Only README.md and the ARC-Easy files the task's splits read were fetched.
    let fetched: Vec<String> = requests
        .try_iter()
        .filter(|p| p.contains("/resolve/"))
        .collect();
    assert!(
        fetched
            .iter()
            .all(|p| p.contains("README.md") || p.contains("/ARC-Easy/")),
        "{fetched:?}"
    );
    assert!(
        !fetched.iter().any(|p| p.contains("ARC-Challenge")),
        "{fetched:?}"
    );
    // The cache has the real layout: refs/main -> commit, snapshot links into blobs/.
    let repo = env.cache().join("datasets--allenai--ai2_arc");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        sha
    );
    let link = repo
        .join("snapshots")
        .join(&sha)
        .join("ARC-Easy/test-00000-of-00001.parquet");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    // Offline now, the same run reads the cache.
    let o = env.eval(true, "r2");
    assert!(o.status.success(), "{}", text(&o));
}
