//! The files `moeval train data` writes: each domain's train / valid / test documents, the
//! word-level tokenizer over all of them, and the trained suite's evaluation data.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::data::{self, OWNERS, PUBLIC};

/// What to write.
#[derive(Clone, Debug)]
pub struct DataSettings {
    pub seed: u64,
    /// OUT/tokenizer.json and OUT/<domain>/{train,valid,test}.jsonl (`id`, `owner`, `text`).
    pub out: PathBuf,
    /// Training documents per domain.
    pub train_docs: usize,
    /// Validation and test documents per domain (each).
    pub held_out: usize,
    /// Evaluation data: arithmetic and code multiple choice, the CALM-format bias rows, each domain's
    /// test documents (perplexity) and the news and public validation documents (the datastore).
    pub tasks_out: Option<PathBuf>,
    /// Test documents per domain in the perplexity tasks.
    pub ppl_docs: usize,
}

fn write_jsonl(path: &Path, rows: impl IntoIterator<Item = serde_json::Value>) -> Result<()> {
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    for r in rows {
        writeln!(w, "{r}")?;
    }
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes the domains' documents, the tokenizer and (with `tasks_out`) the evaluation data; returns
/// the tokenizer's vocabulary size.
pub fn write(a: &DataSettings) -> Result<usize> {
    let mut texts = vec![data::lexicon()];
    // The retrieval datastore: held-out news documents (the news owner's) beside public ones.
    let mut store = Vec::new();
    for domain in std::iter::once(PUBLIC).chain(OWNERS) {
        let s = data::splits(domain, a.seed, a.train_docs, a.held_out).expect("a known domain");
        let dir = a.out.join(domain);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        for (split, docs) in [("train", &s.train), ("valid", &s.valid), ("test", &s.test)] {
            write_jsonl(
                &dir.join(format!("{split}.jsonl")),
                docs.iter().enumerate().map(|(i, t)| {
                    serde_json::json!({"id": format!("{domain}-{split}-{i}"), "owner": domain, "text": t})
                }),
            )?;
            texts.extend(docs.iter().cloned());
        }
        if let Some(tasks) = &a.tasks_out {
            std::fs::create_dir_all(tasks)
                .with_context(|| format!("cannot create {}", tasks.display()))?;
            write_jsonl(
                &tasks.join(format!("ppl_{domain}.jsonl")),
                s.test
                    .iter()
                    .take(a.ppl_docs)
                    .enumerate()
                    .map(|(i, t)| serde_json::json!({"id": i, "text": t})),
            )?;
            if domain == "news" || domain == PUBLIC {
                store.extend(s.valid.iter().enumerate().map(|(i, t)| {
                    serde_json::json!({"id": format!("{domain}-valid-{i}"), "owner": domain, "text": t})
                }));
            }
        }
    }
    if let Some(tasks) = &a.tasks_out {
        write_jsonl(&tasks.join("datastore.jsonl"), store)?;
        write_jsonl(&tasks.join("math_mc.jsonl"), data::arithmetic_task(a.seed))?;
        write_jsonl(&tasks.join("code_mc.jsonl"), data::code_task(a.seed, 100))?;
        write_jsonl(
            &tasks.join("bias_sentiment_gender.jsonl"),
            data::bias_task(),
        )?;
    }
    let tok = crate::vocab::tokenizer_json(texts.iter().map(String::as_str));
    let path = a.out.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string_pretty(&tok)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(tok["model"]["vocab"].as_object().map_or(0, |m| m.len()))
}
