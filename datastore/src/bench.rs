//! The retrieval benchmark behind `moeval datastore bench`: RIC-LM's query (the last N tokens of
//! each text) timed over a thread pool, with optional exports of the analyzed terms so that another
//! BM25 implementation can be run side by side on exactly the same input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use crate::{analyze, Datastore, Error, Result, Tokenizer};

/// What to benchmark and what to export.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    /// JSON Lines with a `text` field: one query each.
    pub queries: PathBuf,
    /// Tokens kept from the end of each query.
    pub query_tokens: usize,
    /// Each block's analyzed terms (JSON Lines, block id order).
    pub export_blocks: Option<PathBuf>,
    /// Each query's analyzed terms (JSON Lines).
    pub export_queries: Option<PathBuf>,
    /// The top-1 block id and score of each query (JSON Lines).
    pub top1: Option<PathBuf>,
}

/// Throughput of the timed search.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub queries: usize,
    pub threads: usize,
    pub seconds: f64,
    pub queries_per_second: f64,
    pub blocks: u64,
}

fn write_lines(path: &Path, lines: impl Iterator<Item = String>) -> Result<()> {
    let f = std::fs::File::create(path).map_err(Error::io(path))?;
    let mut w = std::io::BufWriter::new(f);
    for l in lines {
        writeln!(w, "{l}").map_err(Error::io(path))?;
    }
    w.flush().map_err(Error::io(path))
}

fn read_queries(s: &BenchSettings, tok: &Tokenizer) -> Result<Vec<String>> {
    let path = &s.queries;
    let raw = std::fs::read_to_string(path).map_err(Error::io(path))?;
    let mut queries = Vec::new();
    for (i, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |reason: &str| Error::Malformed {
            path: path.clone(),
            line: i as u64 + 1,
            reason: reason.to_string(),
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|_| bad("not valid JSON"))?;
        let text = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad("no string field `text`"))?;
        // RIC-LM's query: the last N tokens, decoded.
        let ids = tok.encode(text)?;
        queries.push(tok.decode(&ids[ids.len().saturating_sub(s.query_tokens)..])?);
    }
    Ok(queries)
}

/// Times the top-1 search of every query on the current rayon pool (after a short warm-up).
pub fn run(store: &Datastore, tok: &Tokenizer, s: &BenchSettings) -> Result<BenchReport> {
    let queries = read_queries(s, tok)?;
    if let Some(p) = &s.export_blocks {
        let texts: Vec<String> = store
            .blocks()?
            .par_iter()
            .map(|b| {
                let text = tok.decode(&b.tokens)?;
                Ok(serde_json::json!({"block_id": b.block_id, "doc_id": b.doc_id, "terms": analyze(&text)})
                    .to_string())
            })
            .collect::<Result<_>>()?;
        write_lines(p, texts.into_iter())?;
    }
    if let Some(p) = &s.export_queries {
        let lines = queries
            .iter()
            .map(|q| serde_json::json!({"terms": analyze(q)}).to_string());
        write_lines(p, lines)?;
    }
    // Warm the page cache and the term dictionary once, then time.
    for q in queries.iter().take(8) {
        store.search_ids(q, 1)?;
    }
    let start = Instant::now();
    let top: Vec<Option<(u64, f32)>> = queries
        .par_iter()
        .map(|q| store.search_ids(q, 1).map(|h| h.first().copied()))
        .collect::<Result<_>>()?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(p) = &s.top1 {
        let lines = top.iter().map(|t| {
            serde_json::json!({"block_id": t.map(|x| x.0), "score": t.map(|x| x.1)}).to_string()
        });
        write_lines(p, lines)?;
    }
    Ok(BenchReport {
        queries: queries.len(),
        threads: rayon::current_num_threads(),
        seconds,
        queries_per_second: queries.len() as f64 / seconds.max(1e-9),
        blocks: store.num_blocks(),
    })
}
