//! Builds Hugging Face Hub caches in their real layout for tests (no network): per repository
//! `datasets--OWNER--NAME/` with `blobs/SHA256` holding the bytes, `snapshots/COMMIT/PATH` as
//! relative symbolic links into `blobs/`, and `refs/REVISION` holding the commit, as huggingface_hub
//! and hf-hub write them. Shared by tasks/tests/hub.rs and tests/hub_cli.rs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch, StringArray, StructArray};
use sha2::{Digest, Sha256};

/// One repository of a cache root.
pub struct Repo {
    pub folder: PathBuf,
}

impl Repo {
    pub fn new(root: &Path, repo_id: &str) -> Repo {
        Repo {
            folder: root.join(format!("datasets--{}", repo_id.replace('/', "--"))),
        }
    }

    /// Adds `rel` with `bytes` to the snapshot of `commit` (blob + relative link).
    pub fn add(&self, commit: &str, rel: &str, bytes: &[u8]) -> PathBuf {
        let hash = format!("{:x}", Sha256::digest(bytes));
        let blob = self.folder.join("blobs").join(&hash);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, bytes).unwrap();
        let link = self.folder.join("snapshots").join(commit).join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        // snapshots/COMMIT/a/b -> ../../../blobs/HASH: one `..` per folder below the repository.
        let depth = 2 + rel.matches('/').count();
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(&hash);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, &link).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).unwrap();
        link
    }

    /// Points `refs/REVISION` (`main`, `refs/convert/parquet`, …) at `commit`.
    pub fn set_ref(&self, revision: &str, commit: &str) {
        let p = self.folder.join("refs").join(revision);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, commit).unwrap();
    }
}

/// A 40-hex-digit commit id made from a label.
pub fn commit(label: &str) -> String {
    format!("{:x}", Sha256::digest(label.as_bytes()))[..40].to_string()
}

/// One ai2_arc row: id, question, choices {text, label}, answerKey.
pub struct ArcRow<'a> {
    pub id: &'a str,
    pub question: &'a str,
    pub choices: &'a [&'a str],
    pub labels: &'a [&'a str],
    pub answer: &'a str,
}

/// Parquet bytes with ai2_arc's column schema (`id`, `question`, `choices: struct<text:
/// list<string>, label: list<string>>`, `answerKey`).
pub fn arc_parquet(rows: &[ArcRow]) -> Vec<u8> {
    fn strings(v: Vec<&str>) -> ArrayRef {
        Arc::new(StringArray::from(v))
    }
    fn list(v: Vec<&[&str]>) -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for item in v {
            for s in item {
                b.values().append_value(s);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    }
    let choices = StructArray::try_from(vec![
        ("text", list(rows.iter().map(|r| r.choices).collect())),
        ("label", list(rows.iter().map(|r| r.labels).collect())),
    ])
    .unwrap();
    let batch = RecordBatch::try_from_iter(vec![
        ("id", strings(rows.iter().map(|r| r.id).collect())),
        (
            "question",
            strings(rows.iter().map(|r| r.question).collect()),
        ),
        ("choices", Arc::new(choices) as ArrayRef),
        (
            "answerKey",
            strings(rows.iter().map(|r| r.answer).collect()),
        ),
    ])
    .unwrap();
    let mut out = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    out
}

/// The README.md of ai2_arc (its `configs:` front matter), for the two configurations.
pub const ARC_README: &str = "---\nlanguage:\n- en\nconfigs:\n- config_name: ARC-Challenge\n  data_files:\n  - split: train\n    path: ARC-Challenge/train-*\n  - split: test\n    path: ARC-Challenge/test-*\n  - split: validation\n    path: ARC-Challenge/validation-*\n- config_name: ARC-Easy\n  data_files:\n  - split: train\n    path: ARC-Easy/train-*\n  - split: test\n    path: ARC-Easy/test-*\n  - split: validation\n    path: ARC-Easy/validation-*\n---\n\n# Dataset Card for \"ai2_arc\"\n";

/// A small ai2_arc-like repository at `main`: README.md and, per configuration, train /
/// validation / test Parquet files of a few rows. Returns the commit.
pub fn write_arc(root: &Path) -> String {
    let repo = Repo::new(root, "allenai/ai2_arc");
    let c = commit("ai2_arc");
    repo.add(&c, "README.md", ARC_README.as_bytes());
    repo.add(
        &c,
        ".gitattributes",
        b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
    );
    for config in ["ARC-Easy", "ARC-Challenge"] {
        for (split, n) in [("train", 3), ("validation", 2), ("test", 4)] {
            let ids: Vec<String> = (0..n).map(|i| format!("{config}/{split}/{i}")).collect();
            let qs: Vec<String> = (0..n)
                .map(|i| format!("Which {config} {split} question is number {i}?"))
                .collect();
            let rows: Vec<ArcRow> = (0..n)
                .map(|i| ArcRow {
                    id: &ids[i],
                    question: &qs[i],
                    choices: &["red", "green", "blue", "black"],
                    labels: &["A", "B", "C", "D"],
                    answer: ["A", "B", "C", "D"][i % 4],
                })
                .collect();
            repo.add(
                &c,
                &format!("{config}/{split}-00000-of-00001.parquet"),
                &arc_parquet(&rows),
            );
        }
    }
    repo.set_ref("main", &c);
    c
}
