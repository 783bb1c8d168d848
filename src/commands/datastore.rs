//! `moeval datastore`: build, inspect, query and opt documents out of a SILO-style datastore.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use datastore::knn::Search;
use datastore::{AnnSettings, BuildOptions, Datastore, OptOut, Tokenizer};
use harness::retrieval::KnnStage;
use indicatif::{ProgressBar, ProgressStyle};

/// `moeval datastore`: SILO-style nonparametric datastores.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Cut documents (JSON Lines or Parquet) into token blocks and index them for BM25 (and kNN-LM).
    Build(BuildArgs),
    /// Add kNN-LM keys (final hidden states of a model at every position) to a store.
    Knn {
        /// Datastore directory.
        dir: PathBuf,
        /// Model whose hidden states are the keys (the one you evaluate with).
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        index: IndexArgs,
    },
    /// Build (or drop, with --knn-index exact) the approximate index over a store's kNN-LM keys,
    /// keeping the keys.
    Reindex {
        dir: PathBuf,
        #[command(flatten)]
        index: IndexArgs,
    },
    /// Recall@k of the store's approximate kNN index against exact search, and queries per second of
    /// both, on query vectors taken from another store's keys (built with the same model).
    KnnBench {
        dir: PathBuf,
        /// Store whose kNN keys are the queries (e.g. one built from held-out text).
        #[arg(long)]
        queries: PathBuf,
        /// Queries (evenly spaced over the query store's keys).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long, default_value_t = 16)]
        k: usize,
    },
    /// Documents, blocks and tokens per owner and license.
    Stats {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The best blocks for a text by BM25, with owner, license, score and a snippet.
    Query {
        dir: PathBuf,
        #[arg(long)]
        text: String,
        #[arg(long, default_value_t = 5)]
        k: usize,
        #[arg(long)]
        json: bool,
    },
    /// Remove an owner's (or documents') blocks and kNN entries so the store equals one built without them.
    OptOut {
        dir: PathBuf,
        /// Owner whose documents leave (repeatable).
        #[arg(long)]
        owner: Vec<String>,
        /// Document id to remove (repeatable).
        #[arg(long)]
        document: Vec<String>,
        /// Why (kept in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Time BM25 queries (top-1, RIC-LM style: the last N tokens of each query text) at the global
    /// --threads; optionally export analyzed terms so other BM25 implementations see the same tokens.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Input files: .jsonl (JSON Lines) or .parquet.
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<PathBuf>,
    #[arg(long, default_value = "text")]
    text_field: String,
    #[arg(long, default_value = "owner")]
    owner_field: String,
    #[arg(long, default_value = "license")]
    license_field: String,
    /// Field with the document id (default: FILE:LINE).
    #[arg(long, default_value = "id")]
    id_field: String,
    /// Model directory whose tokenizer.json cuts the blocks.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output directory (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Tokens per block.
    #[arg(long, default_value_t = 1024)]
    block: usize,
    /// Tokens between block starts.
    #[arg(long, default_value_t = 512)]
    stride: usize,
    /// Fail on the first malformed row instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Indexing memory budget in MiB (input is streamed whatever its size).
    #[arg(long, default_value_t = 256)]
    memory_mb: usize,
    /// Also compute kNN-LM keys with --model.
    #[arg(long, requires = "model")]
    knn: bool,
    /// Model for the kNN-LM keys.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    index: IndexArgs,
}

/// How kNN-LM searches a store's keys.
#[derive(clap::Args, Clone, Copy)]
struct IndexArgs {
    /// `exact` scans every key; `hnsw` builds an approximate index (usearch HNSW graphs on disk,
    /// memory-mapped; candidates re-ranked with exact distances); `auto`: `hnsw` from 1,000,000 keys on.
    #[arg(long, value_enum, default_value_t = IndexKind::Auto)]
    knn_index: IndexKind,
    /// Memory of one part of the index in MiB: keys are indexed in parts of this size, each built on
    /// one thread (a build holds up to --threads parts at once).
    #[arg(long, default_value_t = 1024)]
    knn_part_mib: u64,
    /// Graph edges per key (HNSW's M).
    #[arg(long, default_value_t = AnnSettings::default().connectivity)]
    knn_connectivity: usize,
    /// Candidates kept while building (HNSW's efConstruction).
    #[arg(long, default_value_t = AnnSettings::default().expansion_add)]
    knn_expansion_add: usize,
    /// Candidates kept while searching (HNSW's ef; a search for k neighbours keeps at least k).
    /// `datastore reindex` changing only this keeps the graphs: no rebuild.
    #[arg(long, default_value_t = AnnSettings::default().expansion_search)]
    knn_expansion_search: usize,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum IndexKind {
    Auto,
    Exact,
    Hnsw,
}

impl IndexArgs {
    /// The search for keys of `dim` dimensions.
    fn search(self, dim: usize) -> Search {
        let settings = AnnSettings {
            connectivity: self.knn_connectivity,
            expansion_add: self.knn_expansion_add,
            expansion_search: self.knn_expansion_search,
            part_entries: AnnSettings::part_entries_for(
                self.knn_part_mib,
                dim,
                self.knn_connectivity,
            ),
        };
        match self.knn_index {
            IndexKind::Auto => Search::Auto(settings),
            IndexKind::Exact => Search::Exact,
            IndexKind::Hnsw => Search::Index(settings),
        }
    }
}

#[derive(clap::Args)]
struct BenchArgs {
    dir: PathBuf,
    /// JSON Lines with a `text` field: one query each.
    #[arg(long)]
    queries: PathBuf,
    /// Tokenizer (model directory) that cuts the last --query-tokens tokens of each query.
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long, default_value_t = 512)]
    query_tokens: usize,
    /// Write each block's analyzed terms here (JSON Lines, block id order).
    #[arg(long)]
    export_blocks: Option<PathBuf>,
    /// Write each query's analyzed terms here (JSON Lines).
    #[arg(long)]
    export_queries: Option<PathBuf>,
    /// Write the top-1 block id of each query here (JSON Lines).
    #[arg(long)]
    top1: Option<PathBuf>,
}

pub fn run(a: Args, at: super::Placement) -> Result<()> {
    match a.command {
        Sub::Build(b) => build(b, at),
        Sub::Knn { dir, model, index } => knn(&dir, &model, index, at),
        Sub::Reindex { dir, index } => reindex(&dir, index),
        Sub::KnnBench {
            dir,
            queries,
            limit,
            k,
        } => knn_bench(&dir, &queries, limit, k),
        Sub::Stats { dir, json } => stats(&dir, json),
        Sub::Query { dir, text, k, json } => query(&dir, &text, k, json),
        Sub::OptOut {
            dir,
            owner,
            document,
            reason,
        } => opt_out(&dir, owner, document, reason),
        Sub::Bench(b) => bench(b),
    }
}

fn bar(len: u64, template: &str) -> Result<ProgressBar> {
    Ok(ProgressBar::new(len).with_style(
        ProgressStyle::with_template(template)
            .context("progress bar template")?
            .progress_chars("=> "),
    ))
}

fn build(a: BuildArgs, at: super::Placement) -> Result<()> {
    let tok = Tokenizer::from_model_dir(&a.tokenizer)?;
    let total: u64 = a
        .input
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .with_context(|| format!("cannot read {}", p.display()))
        })
        .sum::<Result<u64>>()?;
    let opts = BuildOptions {
        text_field: a.text_field,
        owner_field: a.owner_field,
        license_field: a.license_field,
        id_field: a.id_field,
        block: a.block,
        stride: a.stride,
        strict: a.strict,
        threads: rayon::current_num_threads(),
        memory_budget: a.memory_mb << 20,
    };
    let pb = bar(
        total,
        "indexing [{bar:30}] {bytes}/{total_bytes}, {bytes_per_sec}, eta {eta}",
    )?;
    let report = datastore::build(&a.input, &tok, &a.out, &opts, &|n| pb.inc(n))?;
    pb.finish_and_clear();
    for m in report.skipped.iter().take(20) {
        eprintln!("skipped {m}");
    }
    if report.skipped.len() > 20 {
        eprintln!("... and {} more", report.skipped.len() - 20);
    }
    eprintln!(
        "{} documents, {} blocks, {} tokens from {:.1} MB in {:.1}s ({:.2} MB/s); {} malformed rows skipped; identity {}",
        report.documents,
        report.blocks,
        report.tokens,
        report.bytes as f64 / 1e6,
        report.seconds,
        report.bytes as f64 / 1e6 / report.seconds.max(1e-9),
        report.skipped.len(),
        &report.identity[..16]
    );
    if a.knn {
        if let Some(model) = &a.model {
            knn(&a.out, model, a.index, at)?;
        }
    }
    Ok(())
}

fn knn(dir: &Path, model_dir: &Path, index: IndexArgs, at: super::Placement) -> Result<()> {
    let model = super::load_model_with(model_dir, &super::ExpertArgs::default(), at)?;
    let search = index.search(model.config().hidden_size);
    let pb = bar(0, "kNN keys [{bar:30}] {pos}/{len} blocks, eta {eta}")?;
    let start = Instant::now();
    let stage = std::sync::Mutex::new(KnnStage::Keys);
    let n =
        harness::retrieval::build_knn_keys(dir, &model, model_dir, search, &|now, done, total| {
            let mut s = stage.lock().unwrap_or_else(|p| p.into_inner());
            if *s != now {
                *s = now;
                pb.set_style(
                    ProgressStyle::with_template(
                        "kNN index [{bar:30}] {pos}/{len} keys, eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
            }
            pb.set_length(total);
            pb.set_position(done);
        })?;
    pb.finish_and_clear();
    let how = match search.resolve(n) {
        Some(_) => "approximate index (hnsw)",
        None => "exact search",
    };
    eprintln!(
        "{n} kNN entries, {how}, in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn reindex(dir: &Path, index: IndexArgs) -> Result<()> {
    let dim = Datastore::open(dir)?
        .knn()
        .map(|k| k.dim())
        .with_context(|| {
            format!(
                "{} has no kNN-LM keys; build them with `moeval datastore knn {} --model DIR`",
                dir.display(),
                dir.display()
            )
        })?;
    let pb = bar(0, "kNN index [{bar:30}] {pos}/{len} keys, eta {eta}")?;
    let start = Instant::now();
    let m = datastore::knn::reindex(dir, index.search(dim), &|done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    let k = m.knn.as_ref().context("the store lost its kNN keys")?;
    eprintln!(
        "{} kNN entries, search {}, in {:.1}s; identity {}",
        k.entries,
        k.search,
        start.elapsed().as_secs_f64(),
        &m.identity()[..16]
    );
    Ok(())
}

fn knn_bench(dir: &Path, queries: &Path, limit: usize, k: usize) -> Result<()> {
    let store = Datastore::open(dir)?;
    let from = Datastore::open(queries)?;
    let missing = |s: &Datastore| {
        format!(
            "{} has no kNN-LM keys; build them with `moeval datastore knn`",
            s.dir().display()
        )
    };
    let knn = store.knn().with_context(|| missing(&store))?;
    let q = from.knn().with_context(|| missing(&from))?;
    let report = datastore::bench::knn_recall(knn, q, limit, k)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn stats(dir: &Path, json: bool) -> Result<()> {
    let store = Datastore::open(dir)?;
    let st = store.stats()?;
    let m = store.manifest();
    if json {
        let v = serde_json::json!({
            "identity": store.identity(),
            "stats": st,
            "excluded_owners": m.excluded_owners,
            "excluded_documents": m.excluded_documents,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "datastore {} (identity {})",
        dir.display(),
        &store.identity()[..16]
    );
    println!(
        "blocks of {} tokens every {}; kNN entries: {}",
        m.block, m.stride, st.knn_entries
    );
    println!(
        "{:<10} {:<28} {:>10} {:>10} {:>12}",
        "by", "name", "documents", "blocks", "tokens"
    );
    let rows = std::iter::once(("total", "", &st.total))
        .chain(st.owners.iter().map(|(k, v)| ("owner", k.as_str(), v)))
        .chain(st.licenses.iter().map(|(k, v)| ("license", k.as_str(), v)));
    for (by, name, c) in rows {
        println!(
            "{:<10} {:<28} {:>10} {:>10} {:>12}",
            by, name, c.documents, c.blocks, c.tokens
        );
    }
    if !m.excluded_owners.is_empty() || !m.excluded_documents.is_empty() {
        println!(
            "opted out: owners [{}], documents [{}]",
            m.excluded_owners.join(", "),
            m.excluded_documents.join(", ")
        );
    }
    Ok(())
}

fn snippet(text: &str, n: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &flat[..i]),
        None => flat,
    }
}

fn query(dir: &Path, text: &str, k: usize, json: bool) -> Result<()> {
    let store = Datastore::open(dir)?;
    let hits = store.search(text, k)?;
    if json {
        for h in &hits {
            let v = serde_json::json!({
                "block_id": h.block_id, "doc_id": h.doc_id, "owner": h.owner, "license": h.license,
                "start": h.start, "score": h.score, "text": h.text,
            });
            println!("{v}");
        }
        return Ok(());
    }
    if hits.is_empty() {
        eprintln!("no block matches (the query has no indexed term after stopwords)");
    }
    for (i, h) in hits.iter().enumerate() {
        println!(
            "{:>2}. {:>8.3}  {}  owner={} license={} block={} @{}\n    {}",
            i + 1,
            h.score,
            h.doc_id,
            h.owner,
            h.license,
            h.block_id,
            h.start,
            snippet(&h.text, 160)
        );
    }
    Ok(())
}

fn opt_out(dir: &Path, owners: Vec<String>, documents: Vec<String>, reason: String) -> Result<()> {
    if owners.is_empty() && documents.is_empty() {
        bail!("name at least one --owner or --document");
    }
    let req = OptOut {
        owners,
        documents,
        reason,
        actor: format!("cli:{}", harness::experts::user()),
    };
    let r = Datastore::opt_out(dir, &req)?;
    println!(
        "removed {} blocks and {} kNN entries; segments merged; identity {} -> {}",
        r.blocks_removed,
        r.knn_entries_removed,
        &r.identity_before[..16],
        &r.identity_after[..16]
    );
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let store = Datastore::open(&a.dir)?;
    let tok = Tokenizer::from_model_dir(&a.tokenizer)?;
    let report = datastore::bench::run(
        &store,
        &tok,
        &datastore::bench::BenchSettings {
            queries: a.queries,
            query_tokens: a.query_tokens,
            export_blocks: a.export_blocks,
            export_queries: a.export_queries,
            top1: a.top1,
        },
    )?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
