//! Building a store: read rows, cut each document into token blocks, index the blocks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use tantivy::{doc, Index, IndexWriter, TantivyDocument};

use crate::analyzer::{count_terms, english_analyzer, length_analyzer, ANALYZER};
use crate::input::{self, Fields, Outcome, Row};
use crate::manifest::{sha256_file, InputFile, Manifest, FORMAT};
use crate::store::{audit, fields, schema, tokens_to_bytes, Datastore, INDEX_DIR};
use crate::{Error, Result, Tokenizer};

/// How to read the input and cut blocks.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub text_field: String,
    pub owner_field: String,
    pub license_field: String,
    /// Field holding the document id; rows without one get `FILE:LINE`.
    pub id_field: String,
    /// Tokens per block and between block starts (SILO: 1024 and 512).
    pub block: usize,
    pub stride: usize,
    /// Stop at the first malformed row instead of skipping it.
    pub strict: bool,
    /// Indexing threads.
    pub threads: usize,
    /// Indexing memory budget in bytes (all threads together); input is streamed.
    pub memory_budget: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            text_field: "text".into(),
            owner_field: "owner".into(),
            license_field: "license".into(),
            id_field: "id".into(),
            block: 1024,
            stride: 512,
            strict: false,
            threads: 2,
            memory_budget: 256 << 20,
        }
    }
}

/// A skipped input row.
#[derive(Clone, Debug, PartialEq)]
pub struct Malformed {
    pub path: PathBuf,
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.reason)
    }
}

/// What a build did.
#[derive(Clone, Debug)]
pub struct BuildReport {
    pub documents: u64,
    pub blocks: u64,
    pub tokens: u64,
    /// Input bytes read.
    pub bytes: u64,
    /// Every malformed row that was skipped (empty with `strict`, which fails on the first).
    pub skipped: Vec<Malformed>,
    pub seconds: f64,
    pub identity: String,
}

/// Block start offsets: every `stride` tokens until a block reaches the end of the document.
pub(crate) fn block_starts(n: usize, block: usize, stride: usize) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut s = 0;
    while s < n {
        starts.push(s);
        if s + block >= n {
            break;
        }
        s += stride;
    }
    starts
}

/// Rows are tokenised in parallel in chunks of about this many text bytes.
const CHUNK_BYTES: usize = 4 << 20;

/// Builds a store in `out` (which must not exist yet, or be empty) from JSON Lines / Parquet files.
/// `progress` receives the number of input bytes read since its last call.
pub fn build(
    inputs: &[PathBuf],
    tokenizer: &Tokenizer,
    out: &Path,
    opts: &BuildOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<BuildReport> {
    let started = Instant::now();
    if opts.block == 0 || opts.stride == 0 || opts.stride > opts.block {
        return Err(Error::Usage(format!(
            "block {} / stride {}: both must be positive and stride <= block",
            opts.block, opts.stride
        )));
    }
    if inputs.is_empty() {
        return Err(Error::Usage("no input files".into()));
    }
    // Built in a hidden folder beside `out` (which must not exist or be empty) and renamed into place
    // when complete, so a killed build leaves no half store at `out` and a retry starts afresh.
    let staged = durable::StagedDir::new(out).map_err(|e| Error::store(out, e.to_string()))?;
    let final_out = out;
    let out = staged.path();
    let index_dir = out.join(INDEX_DIR);
    std::fs::create_dir_all(&index_dir).map_err(Error::io(&index_dir))?;
    let index = Index::create_in_dir(&index_dir, schema())?;
    index.tokenizers().register(ANALYZER, english_analyzer());
    let f = fields(&index.schema(), out)?;
    let threads = opts.threads.max(1);
    // tantivy needs at least 15 MB per indexing thread.
    let budget = opts.memory_budget.max(threads * (16 << 20));
    let writer: IndexWriter<TantivyDocument> = index.writer_with_num_threads(threads, budget)?;
    // One final merge below; no background merges meanwhile.
    writer.set_merge_policy(Box::new(tantivy::indexer::NoMergePolicy));

    let fields_in = Fields {
        text: &opts.text_field,
        owner: &opts.owner_field,
        license: &opts.license_field,
        id: &opts.id_field,
    };
    let mut report = BuildReport {
        documents: 0,
        blocks: 0,
        tokens: 0,
        bytes: 0,
        skipped: Vec::new(),
        seconds: 0.0,
        identity: String::new(),
    };
    let mut next_block = 0u64;
    let mut chunk: Vec<Row> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut inputs_meta = Vec::new();
    // Document id -> (owner, file, line) of its first row: `opt-out --document ID` removes every block
    // with that id, so one id under two owners would let one owner's opt-out delete another's text.
    let mut doc_owners: HashMap<String, (String, PathBuf, u64)> = HashMap::new();
    let mut flush = |chunk: &mut Vec<Row>, report: &mut BuildReport| -> Result<()> {
        let rows = std::mem::take(chunk);
        // Tokenise, decode and count BM25 terms in parallel; ids are assigned in input order below.
        // (start, token ids, text, analyzed terms)
        type Cut = (usize, Vec<u32>, String, u64);
        let cuts: Vec<Result<(usize, Vec<Cut>)>> = rows
            .par_iter()
            .map_init(length_analyzer, |analyzer, row| {
                let ids = tokenizer.encode(&row.text)?;
                let blocks = block_starts(ids.len(), opts.block, opts.stride)
                    .into_iter()
                    .map(|s| {
                        let blk = ids[s..(s + opts.block).min(ids.len())].to_vec();
                        let text = tokenizer.decode(&blk)?;
                        // Exact length for re-scoring: the index only keeps a 1-byte quantised one.
                        let terms = count_terms(analyzer, &text);
                        Ok((s, blk, text, terms))
                    })
                    .collect::<Result<_>>()?;
                Ok((ids.len(), blocks))
            })
            .collect();
        for (row, cut) in rows.iter().zip(cuts) {
            let (len, blocks) = cut?;
            if blocks.is_empty() {
                continue;
            }
            report.documents += 1;
            report.tokens += len as u64;
            for (start, ids, text, terms) in blocks {
                writer.add_document(doc!(
                    f.block_id => next_block,
                    f.doc_id => row.doc_id.as_str(),
                    f.owner => row.owner.as_str(),
                    f.license => row.license.as_str(),
                    f.text => text,
                    f.tokens => tokens_to_bytes(&ids),
                    f.start => start as u64,
                    f.doc_len => len as u64,
                    f.text_len => terms,
                ))?;
                next_block += 1;
                report.blocks += 1;
            }
        }
        Ok(())
    };
    for path in inputs {
        let mut sink = |o: Outcome| -> Result<()> {
            match o {
                Outcome::Row(r) if r.text.is_empty() => {
                    report.skipped.push(Malformed {
                        path: path.clone(),
                        line: r.line,
                        reason: format!("document `{}` has an empty text", r.doc_id),
                    });
                }
                Outcome::Row(r) => {
                    match doc_owners.get(&r.doc_id) {
                        Some((owner, file, line)) if *owner != r.owner => {
                            return Err(Error::Malformed {
                                path: path.clone(),
                                line: r.line,
                                reason: format!(
                                    "document id `{}` of owner `{}` is already used by owner `{owner}` \
                                     ({}:{line}); document ids must be unique across owners, because \
                                     `datastore opt-out --document` removes every block with the id",
                                    r.doc_id,
                                    r.owner,
                                    file.display()
                                ),
                            });
                        }
                        Some(_) => {}
                        None => {
                            doc_owners
                                .insert(r.doc_id.clone(), (r.owner.clone(), path.clone(), r.line));
                        }
                    }
                    chunk_bytes += r.text.len();
                    chunk.push(r);
                    if chunk_bytes >= CHUNK_BYTES {
                        chunk_bytes = 0;
                        flush(&mut chunk, &mut report)?;
                    }
                }
                Outcome::Malformed { line, reason } => {
                    if opts.strict {
                        return Err(Error::Malformed {
                            path: path.clone(),
                            line,
                            reason,
                        });
                    }
                    report.skipped.push(Malformed {
                        path: path.clone(),
                        line,
                        reason,
                    });
                }
            }
            Ok(())
        };
        let mut bytes = 0u64;
        input::read(path, &fields_in, &mut sink, &mut |n| {
            bytes += n;
            progress(n)
        })?;
        report.bytes += bytes;
        inputs_meta.push(InputFile {
            path: path.display().to_string(),
            bytes,
            sha256: sha256_file(path)?,
        });
    }
    flush(&mut chunk, &mut report)?;
    let mut writer = writer;
    writer.commit()?;
    // One segment: searching is faster and statistics do not depend on how indexing was split.
    let segments = index.searchable_segment_ids()?;
    if segments.len() > 1 {
        writer.merge(&segments).wait()?;
    }
    writer.wait_merging_threads()?;

    let tokenizer_sha256 = if tokenizer.path().is_file() {
        sha256_file(tokenizer.path())?
    } else {
        "bytes".into()
    };
    let manifest = Manifest {
        format: FORMAT,
        block: opts.block,
        stride: opts.stride,
        tokenizer: tokenizer.path().display().to_string(),
        tokenizer_sha256,
        analyzer: "simple tokenizer, remove tokens > 40 bytes, lowercase, Lucene English stopwords, Snowball English stemmer".into(),
        bm25: "BM25 (k1 = 1.2, b = 0.75, Lucene idf, bag of distinct query terms): tantivy's top candidates re-scored with exact block lengths".into(),
        inputs: inputs_meta,
        documents: report.documents,
        blocks: report.blocks,
        tokens: report.tokens,
        skipped_rows: report.skipped.len() as u64,
        knn: None,
        excluded_owners: Vec::new(),
        excluded_documents: Vec::new(),
    };
    manifest.write(out)?;
    audit(
        out,
        serde_json::json!({
            "action": "build",
            "documents": report.documents,
            "blocks": report.blocks,
            "skipped_rows": report.skipped.len(),
            "identity": manifest.identity(),
        }),
    )?;
    let out = staged.commit().map_err(Error::io(final_out))?;
    let out = out.as_path();
    // Sanity: the store opens.
    Datastore::open(out)?;
    report.identity = manifest.identity();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::block_starts;

    #[test]
    fn blocks_cover_the_document() {
        assert_eq!(block_starts(0, 4, 2), Vec::<usize>::new());
        assert_eq!(block_starts(3, 4, 2), vec![0]);
        assert_eq!(block_starts(4, 4, 2), vec![0]);
        assert_eq!(block_starts(5, 4, 2), vec![0, 2]);
        assert_eq!(block_starts(10, 4, 2), vec![0, 2, 4, 6]);
    }
}
