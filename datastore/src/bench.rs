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

/// Approximate against exact kNN search (`moeval datastore knn-bench`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KnnBenchReport {
    pub entries: usize,
    pub dim: usize,
    pub queries: usize,
    pub k: usize,
    pub threads: usize,
    /// The index's settings (`None`: the store searches exactly, and only exact search is timed).
    pub index: Option<crate::AnnSettings>,
    /// Mean over queries of the share of the exact top k that the index found: a found key counts
    /// when it is no farther than the k-th exact neighbour (keys tied at that distance are equally right).
    pub recall: Option<f64>,
    pub exact_queries_per_second: f64,
    pub index_queries_per_second: Option<f64>,
}

/// Searches `queries` query vectors (keys of `from`, evenly spaced) for their `k` nearest keys of
/// `knn`, exactly and, when `knn` has one, through its approximate index; both timed over the thread
/// pool. Vectors of the wrong dimension are refused.
pub fn knn_recall(
    knn: &crate::knn::KnnIndex,
    from: &crate::knn::KnnIndex,
    queries: usize,
    k: usize,
) -> Result<KnnBenchReport> {
    if from.dim() != knn.dim() {
        return Err(Error::Usage(format!(
            "query keys have {} dimensions, the store's {}",
            from.dim(),
            knn.dim()
        )));
    }
    let n = queries.min(from.len());
    let qs: Vec<Vec<f32>> = (0..n).map(|i| from.key(i * from.len() / n)).collect();
    let start = Instant::now();
    let exact: Vec<Vec<f32>> = qs
        .iter()
        .map(|q| knn.search_exact(q, k).iter().map(|h| h.distance).collect())
        .collect();
    let exact_qps = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let (recall, index_qps) = match knn.index_settings() {
        Some(_) => {
            let start = Instant::now();
            let approx: Vec<Vec<f32>> = qs
                .par_iter()
                .map(|q| Ok(knn.search(q, k)?.iter().map(|h| h.distance).collect()))
                .collect::<Result<_>>()?;
            let qps = n as f64 / start.elapsed().as_secs_f64().max(1e-9);
            let found: f64 = exact
                .iter()
                .zip(&approx)
                .map(|(e, a)| {
                    // A found key counts when it is as near as the k-th exact neighbour (distances
                    // are exact on both sides): keys tied at that distance are equally correct.
                    let kth = e.last().copied().unwrap_or(f32::INFINITY);
                    let hit = a.iter().filter(|&&d| d <= kth).count().min(e.len());
                    hit as f64 / e.len().max(1) as f64
                })
                .sum();
            (Some(found / n.max(1) as f64), Some(qps))
        }
        None => (None, None),
    };
    Ok(KnnBenchReport {
        entries: knn.len(),
        dim: knn.dim(),
        queries: n,
        k,
        threads: rayon::current_num_threads(),
        index: knn.index_settings(),
        recall,
        exact_queries_per_second: exact_qps,
        index_queries_per_second: index_qps,
    })
}
