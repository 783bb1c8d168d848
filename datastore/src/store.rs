//! Opening, querying, inspecting and opting documents out of a store.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tantivy::collector::{Count, TopDocs};
use tantivy::postings::Postings;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, FAST, INDEXED, STORED,
    STRING,
};
use tantivy::tokenizer::TextAnalyzer;
use tantivy::{
    DocAddress, DocId, DocSet, Index, IndexReader, ReloadPolicy, Searcher, TantivyDocument, Term,
};

use crate::analyzer::{analyze_with, english_analyzer, ANALYZER};
use crate::knn::KnnIndex;
use crate::manifest::Manifest;
use crate::{Error, Result};

pub(crate) const INDEX_DIR: &str = "index";
pub(crate) const AUDIT: &str = "audit.jsonl";

/// The index's fields.
#[derive(Clone, Copy)]
pub(crate) struct Fields {
    pub block_id: Field,
    pub doc_id: Field,
    pub owner: Field,
    pub license: Field,
    pub text: Field,
    pub tokens: Field,
    pub start: Field,
    pub doc_len: Field,
    /// Exact number of analyzed terms of `text` (its BM25 length).
    pub text_len: Field,
}

pub(crate) fn schema() -> Schema {
    let mut b = Schema::builder();
    b.add_u64_field("block_id", INDEXED | STORED | FAST);
    // Raw (untokenised) strings, so opt-out can delete by exact owner or document id.
    b.add_text_field("doc_id", STRING | STORED);
    b.add_text_field("owner", STRING | STORED);
    b.add_text_field("license", STRING | STORED);
    let text = TextOptions::default().set_stored().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqs),
    );
    b.add_text_field("text", text);
    b.add_bytes_field("tokens", STORED);
    b.add_u64_field("start", STORED);
    b.add_u64_field("doc_len", STORED);
    // tantivy's own length (fieldnorm) is quantised to one byte; re-scoring needs the exact one.
    b.add_u64_field("text_len", FAST);
    b.build()
}

pub(crate) fn fields(schema: &Schema, dir: &Path) -> Result<Fields> {
    let f = |name: &str| {
        schema.get_field(name).map_err(|_| {
            Error::store(
                dir,
                format!("the index has no field `{name}`; rebuild the store"),
            )
        })
    };
    Ok(Fields {
        block_id: f("block_id")?,
        doc_id: f("doc_id")?,
        owner: f("owner")?,
        license: f("license")?,
        text: f("text")?,
        tokens: f("tokens")?,
        start: f("start")?,
        doc_len: f("doc_len")?,
        text_len: f("text_len")?,
    })
}

pub(crate) fn tokens_to_bytes(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn bytes_to_tokens(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A retrieved block.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hit {
    pub block_id: u64,
    pub doc_id: String,
    pub owner: String,
    pub license: String,
    /// Offset of the block's first token in its document.
    pub start: u64,
    /// Exact BM25 score (k1 = 1.2, b = 0.75, Lucene idf, times 1 + k1 as in tantivy).
    pub score: f32,
    pub text: String,
    pub tokens: Vec<u32>,
}

/// A stored block without its text.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub block_id: u64,
    pub doc_id: String,
    pub owner: String,
    pub license: String,
    pub start: u64,
    /// Tokens in the whole document.
    pub doc_len: u64,
    pub tokens: Vec<u32>,
}

/// Who a block belongs to (for attribution).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Source {
    pub doc_id: String,
    pub owner: String,
    pub license: String,
}

/// Documents, blocks and tokens (each document counted once).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    pub documents: u64,
    pub blocks: u64,
    pub tokens: u64,
}

/// What a store holds, overall and per owner and license.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub total: Counts,
    pub owners: BTreeMap<String, Counts>,
    pub licenses: BTreeMap<String, Counts>,
    pub knn_entries: u64,
}

/// Documents to remove: every block of these owners and of these document ids.
#[derive(Clone, Debug, Default)]
pub struct OptOut {
    pub owners: Vec<String>,
    pub documents: Vec<String>,
    pub reason: String,
    /// Who acted, for the audit log (`cli:USER` from the command line).
    pub actor: String,
}

impl OptOut {
    /// All documents of one owner.
    pub fn owner(name: &str, reason: &str) -> Self {
        OptOut {
            owners: vec![name.to_string()],
            documents: Vec::new(),
            reason: reason.to_string(),
            actor: String::new(),
        }
    }

    /// Documents by id.
    pub fn documents(ids: &[&str], reason: &str) -> Self {
        OptOut {
            owners: Vec::new(),
            documents: ids.iter().map(|s| s.to_string()).collect(),
            reason: reason.to_string(),
            actor: String::new(),
        }
    }
}

/// What an opt-out removed, and the store's identity before and after.
#[derive(Clone, Debug, Serialize)]
pub struct OptOutReport {
    pub blocks_removed: u64,
    pub knn_entries_removed: u64,
    pub identity_before: String,
    pub identity_after: String,
}

/// BM25 statistics: (documents, tokens of the text field, document frequency of each term).
pub type Bm25Statistics = (u64, u64, Vec<(String, u64)>);

/// An open store (read-only; opting out goes through [`Datastore::opt_out`]).
pub struct Datastore {
    dir: PathBuf,
    index: Index,
    reader: IndexReader,
    fields: Fields,
    manifest: Manifest,
    analyzer: TextAnalyzer,
    knn: Option<KnnIndex>,
    sources: OnceLock<HashMap<u64, Source>>,
    /// Live blocks and their mean exact length (BM25's N and avgdl for re-scoring).
    live_blocks: u64,
    avg_len: f64,
}

/// BM25 parameters (tantivy's, and bm25s' `method="lucene"` in the benchmark).
const K1: f64 = 1.2;
const B: f64 = 0.75;
/// tantivy's candidates beyond `k` that are re-scored exactly: quantised lengths move scores by a few
/// percent at most, so the exact top-k is among them.
const RERANK_EXTRA: usize = 8;

/// Sum of exact lengths and number of live blocks (deleted blocks are skipped).
fn live_lengths(searcher: &Searcher, dir: &Path) -> Result<(u64, u64)> {
    let (mut total, mut n) = (0u64, 0u64);
    for seg in searcher.segment_readers() {
        let col = seg.fast_fields().u64("text_len")?;
        for doc in seg.doc_ids_alive() {
            total += col
                .first(doc)
                .ok_or_else(|| Error::store(dir, "a block has no length; rebuild the store"))?;
            n += 1;
        }
    }
    Ok((total, n))
}

pub(crate) fn open_index(dir: &Path) -> Result<(Index, Fields)> {
    let path = dir.join(INDEX_DIR);
    let index = Index::open_in_dir(&path).map_err(|e| {
        Error::store(
            dir,
            format!("cannot open the index in {}: {e}", path.display()),
        )
    })?;
    // Custom analyzers are not persisted with the index: register it on every open.
    index.tokenizers().register(ANALYZER, english_analyzer());
    let fields = fields(&index.schema(), dir)?;
    Ok((index, fields))
}

impl Datastore {
    /// Opens the store in `dir` (with its kNN keys, when it has them). An opt-out that was interrupted
    /// is completed first: a store never serves a half-applied opt-out.
    pub fn open(dir: &Path) -> Result<Datastore> {
        if crate::txn::pending(dir)?.is_some() {
            let _lock = crate::txn::lock(dir)?;
            complete_pending(dir)?;
        }
        Self::open_unchecked(dir)
    }

    /// Whether an opt-out of the store in `dir` has started and not completed (it is completed by the
    /// next [`Datastore::open`]).
    pub fn opt_out_pending(dir: &Path) -> bool {
        crate::txn::intent_path(dir).exists()
    }

    /// Opens without looking for a pending opt-out (writers, under the lock, mid-transaction).
    fn open_unchecked(dir: &Path) -> Result<Datastore> {
        Self::open_with(dir, Manifest::read(dir)?)
    }

    /// Opens with `manifest` in place of the one on disk (an opt-out, before it writes its own).
    fn open_with(dir: &Path, manifest: Manifest) -> Result<Datastore> {
        let (index, fields) = open_index(dir)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let knn = match &manifest.knn {
            Some(k) => Some(KnnIndex::open_in(dir, &k.dir)?),
            None => None,
        };
        let (total_len, live_blocks) = live_lengths(&reader.searcher(), dir)?;
        Ok(Datastore {
            dir: dir.to_path_buf(),
            index,
            reader,
            fields,
            manifest,
            analyzer: english_analyzer(),
            knn,
            sources: OnceLock::new(),
            live_blocks,
            avg_len: total_len as f64 / live_blocks.max(1) as f64,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the manifest: changes with every build and opt-out.
    pub fn identity(&self) -> String {
        self.manifest.identity()
    }

    /// The kNN-LM keys, when the store was built with them.
    pub fn knn(&self) -> Option<&KnnIndex> {
        self.knn.as_ref()
    }

    /// The query's distinct analyzed terms, in order of first occurrence (a bag of words).
    fn terms(&self, text: &str) -> Vec<Term> {
        let mut analyzer = self.analyzer.clone();
        let mut seen = HashSet::new();
        analyze_with(&mut analyzer, text)
            .into_iter()
            .filter(|t| seen.insert(t.clone()))
            .map(|t| Term::from_field_text(self.fields.text, &t))
            .collect()
    }

    /// Exact BM25 of the candidates. tantivy scores with 1-byte quantised block lengths, and
    /// overlapping neighbouring blocks score within a fraction of a percent of each other, so the
    /// quantisation alone reorders them; here lengths are the stored exact ones, term frequencies come
    /// from the postings, and N / avgdl are over live blocks. Terms are summed in query order, so equal
    /// statistics give bit-identical scores (a store after opt-out equals one built without the owner).
    fn rescore(
        &self,
        searcher: &Searcher,
        terms: &[Term],
        cands: &[(DocAddress, u64)],
    ) -> Result<Vec<f64>> {
        let n = self.live_blocks as f64;
        let segs = searcher.segment_readers();
        // Term infos per segment (one dictionary lookup each) give both df and the postings.
        let mut infos = Vec::with_capacity(segs.len());
        for seg in segs {
            let inv = seg.inverted_index(self.fields.text)?;
            let ti = terms
                .iter()
                .map(|t| inv.get_term_info(t))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(Error::io(self.dir.join(INDEX_DIR)))?;
            infos.push((inv, ti));
        }
        let idf: Vec<f64> = (0..terms.len())
            .map(|i| {
                let df: u64 = infos
                    .iter()
                    .filter_map(|(_, ti)| ti[i].as_ref())
                    .map(|t| u64::from(t.doc_freq))
                    .sum();
                let df = df as f64;
                (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
            })
            .collect();
        let mut scores = vec![0.0f64; cands.len()];
        for (seg_ord, (inv, ti)) in infos.iter().enumerate() {
            // This segment's candidates in doc id order: postings only seek forward.
            let mut mine: Vec<(DocId, usize)> = cands
                .iter()
                .enumerate()
                .filter(|(_, (a, _))| a.segment_ord as usize == seg_ord)
                .map(|(i, (a, _))| (a.doc_id, i))
                .collect();
            if mine.is_empty() {
                continue;
            }
            mine.sort_unstable();
            let col = segs[seg_ord].fast_fields().u64("text_len")?;
            let norms: Vec<f64> = mine
                .iter()
                .map(|&(doc, _)| {
                    let len = col.first(doc).unwrap_or(0) as f64;
                    K1 * (1.0 - B + B * len / self.avg_len)
                })
                .collect();
            // Per candidate, term contributions in query order (not per term across candidates),
            // so the summation order never depends on the segment layout.
            let mut tfs = vec![0u32; mine.len() * terms.len()];
            for (j, info) in ti.iter().enumerate() {
                let Some(info) = info else { continue };
                let mut p = inv
                    .read_postings_from_terminfo(info, IndexRecordOption::WithFreqs)
                    .map_err(Error::io(self.dir.join(INDEX_DIR)))?;
                for (c, &(doc, _)) in mine.iter().enumerate() {
                    if p.doc() < doc {
                        p.seek(doc);
                    }
                    if p.doc() == doc {
                        tfs[c * terms.len() + j] = p.term_freq();
                    }
                }
            }
            for (c, &(_, i)) in mine.iter().enumerate() {
                let mut s = 0.0;
                for (j, &tf) in tfs[c * terms.len()..(c + 1) * terms.len()]
                    .iter()
                    .enumerate()
                {
                    if tf > 0 {
                        let tf = f64::from(tf);
                        s += idf[j] * (1.0 + K1) * tf / (tf + norms[c]);
                    }
                }
                scores[i] = s;
            }
        }
        Ok(scores)
    }

    /// The `k` best blocks for `text` by BM25, as (block id, score); ties go to the lower block id.
    pub fn search_ids(&self, text: &str, k: usize) -> Result<Vec<(u64, f32)>> {
        Ok(self
            .search_addresses(text, k)?
            .into_iter()
            .map(|(s, _, id)| (id, s))
            .collect())
    }

    fn search_addresses(&self, text: &str, k: usize) -> Result<Vec<(f32, DocAddress, u64)>> {
        let terms = self.terms(text);
        if terms.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms
            .iter()
            .map(|t| {
                let q: Box<dyn Query> =
                    Box::new(TermQuery::new(t.clone(), IndexRecordOption::WithFreqs));
                (Occur::Should, q)
            })
            .collect();
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        // tantivy finds the candidates (fast, with quantised lengths); exact BM25 orders them.
        let limit = k.saturating_add(RERANK_EXTRA);
        let top = searcher.search(&query, &TopDocs::with_limit(limit).order_by_score())?;
        let mut cands = Vec::with_capacity(top.len());
        for (_, addr) in top {
            let col = searcher
                .segment_reader(addr.segment_ord)
                .fast_fields()
                .u64("block_id")?;
            let id = col
                .first(addr.doc_id)
                .ok_or_else(|| Error::store(&self.dir, "a block has no block id"))?;
            cands.push((addr, id));
        }
        let scores = self.rescore(&searcher, &terms, &cands)?;
        let mut out: Vec<(f64, DocAddress, u64)> = scores
            .into_iter()
            .zip(cands)
            .map(|(s, (addr, id))| (s, addr, id))
            .collect();
        // Ties go to the lower block id, independent of segment layout.
        out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)));
        out.truncate(k);
        Ok(out
            .into_iter()
            .map(|(s, addr, id)| (s as f32, addr, id))
            .collect())
    }

    /// The `k` best blocks for `text` by BM25 (bag of distinct analyzed terms): tantivy's top `k + 8`
    /// re-scored with exact block lengths (tantivy's are quantised) and sorted; ties go to the lower
    /// block id.
    ///
    /// Returns nothing when the text has no indexable term.
    pub fn search(&self, text: &str, k: usize) -> Result<Vec<Hit>> {
        let searcher = self.reader.searcher();
        self.search_addresses(text, k)?
            .into_iter()
            .map(|(score, addr, _)| {
                let doc: TantivyDocument = searcher.doc(addr)?;
                let b = self.block_of(&doc);
                let text = doc
                    .get_first(self.fields.text)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                Ok(Hit {
                    block_id: b.block_id,
                    doc_id: b.doc_id,
                    owner: b.owner,
                    license: b.license,
                    start: b.start,
                    score,
                    text,
                    tokens: b.tokens,
                })
            })
            .collect()
    }

    fn block_of(&self, doc: &TantivyDocument) -> Block {
        let f = &self.fields;
        let s = |field| {
            doc.get_first(field)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let u = |field| doc.get_first(field).and_then(|v| v.as_u64()).unwrap_or(0);
        Block {
            block_id: u(f.block_id),
            doc_id: s(f.doc_id),
            owner: s(f.owner),
            license: s(f.license),
            start: u(f.start),
            doc_len: u(f.doc_len),
            tokens: doc
                .get_first(f.tokens)
                .and_then(|v| v.as_bytes())
                .map(bytes_to_tokens)
                .unwrap_or_default(),
        }
    }

    /// Every block, by block id.
    pub fn blocks(&self) -> Result<Vec<Block>> {
        let searcher = self.reader.searcher();
        let mut out = Vec::new();
        for seg in searcher.segment_readers() {
            let store = seg
                .get_store_reader(16)
                .map_err(Error::io(self.dir.join(INDEX_DIR)))?;
            for doc in store.iter::<TantivyDocument>(seg.alive_bitset()) {
                out.push(self.block_of(&doc?));
            }
        }
        out.sort_by_key(|b| b.block_id);
        Ok(out)
    }

    /// Document, owner and license of a block (loaded for all blocks on first use).
    pub fn source(&self, block_id: u64) -> Result<Option<&Source>> {
        if self.sources.get().is_none() {
            let map = self
                .blocks()?
                .into_iter()
                .map(|b| {
                    let src = Source {
                        doc_id: b.doc_id,
                        owner: b.owner,
                        license: b.license,
                    };
                    (b.block_id, src)
                })
                .collect();
            let _ = self.sources.set(map);
        }
        Ok(self.sources.get().and_then(|m| m.get(&block_id)))
    }

    /// Documents, blocks and tokens per owner and license.
    pub fn stats(&self) -> Result<Stats> {
        let mut st = Stats::default();
        let mut seen: HashSet<String> = HashSet::new();
        for b in self.blocks()? {
            let first = seen.insert(b.doc_id.clone());
            for c in [
                &mut st.total,
                st.owners.entry(b.owner.clone()).or_default(),
                st.licenses.entry(b.license.clone()).or_default(),
            ] {
                c.blocks += 1;
                if first {
                    c.documents += 1;
                    c.tokens += b.doc_len;
                }
            }
        }
        st.knn_entries = self.knn.as_ref().map_or(0, |k| k.len() as u64);
        Ok(st)
    }

    /// Removes every block (and kNN entry) of the given owners and documents, then merges the index
    /// into one segment so that BM25 statistics (document count, document frequencies, average length)
    /// no longer count them: afterwards the store scores every query as one built without them would.
    ///
    /// A recoverable transaction (see the `txn` module): the intent and the audit line are on disk
    /// before anything is deleted, and an interrupted opt-out is completed by the next writer or
    /// reader, so it is never half-applied and a retry always completes it.
    ///
    /// Naming an owner or document the store never had is an error; naming one already opted out is not.
    pub fn opt_out(dir: &Path, req: &OptOut) -> Result<OptOutReport> {
        if req.owners.is_empty() && req.documents.is_empty() {
            return Err(Error::Usage(
                "name an owner or a document id to opt out".into(),
            ));
        }
        let _lock = crate::txn::lock(dir)?;
        // An earlier opt-out killed half-way is finished before this one starts.
        complete_pending(dir)?;
        let manifest = Manifest::read(dir)?;
        let (index, f) = open_index(dir)?;
        let reader: IndexReader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let searcher = reader.searcher();
        // Block ids to remove (kNN entries refer to them), found before anything is deleted.
        let mut removed: HashSet<u64> = HashSet::new();
        for (name, is_owner) in req
            .owners
            .iter()
            .map(|o| (o, true))
            .chain(req.documents.iter().map(|d| (d, false)))
        {
            let field = if is_owner { f.owner } else { f.doc_id };
            let q = TermQuery::new(Term::from_field_text(field, name), IndexRecordOption::Basic);
            let n = searcher.search(&q, &Count)?;
            let already = if is_owner {
                manifest.excluded_owners.contains(name)
            } else {
                manifest.excluded_documents.contains(name)
            };
            if n == 0 && !already {
                let what = if is_owner { "owner" } else { "document" };
                return Err(Error::store(dir, format!("no blocks of {what} `{name}`")));
            }
            if n > 0 {
                let top = searcher.search(&q, &TopDocs::with_limit(n).order_by_score())?;
                for (_, addr) in top {
                    let col = searcher
                        .segment_reader(addr.segment_ord)
                        .fast_fields()
                        .u64("block_id")?;
                    removed.extend(col.first(addr.doc_id));
                }
            }
        }
        drop(searcher);
        drop(reader);
        drop(index);
        let mut blocks: Vec<u64> = removed.into_iter().collect();
        blocks.sort_unstable();
        if blocks.is_empty() {
            // Everything named was opted out already (a retry after a crash, for one): nothing to do.
            return Ok(OptOutReport {
                blocks_removed: 0,
                knn_entries_removed: 0,
                identity_before: manifest.identity(),
                identity_after: manifest.identity(),
            });
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let intent = crate::txn::Intent {
            id: format!(
                "{}-{}-{}",
                now.as_secs(),
                now.subsec_nanos(),
                std::process::id()
            ),
            owners: req.owners.clone(),
            documents: req.documents.clone(),
            reason: req.reason.clone(),
            actor: req.actor.clone(),
            blocks,
            identity_before: manifest.identity(),
            knn_entries_before: manifest.knn.as_ref().map_or(0, |k| k.entries),
        };
        crate::txn::write_intent(dir, &intent)?;
        durable::fault::point("datastore.opt-out.intent");
        complete(dir, &intent)
    }

    /// Number of blocks (live documents of the index).
    pub fn num_blocks(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// The statistics BM25 uses for `text`'s terms: (documents, tokens of the text field, document
    /// frequency of each distinct analyzed term in order).
    pub fn bm25_statistics(&self, text: &str) -> Result<Bm25Statistics> {
        let searcher = self.reader.searcher();
        let mut tokens = 0;
        for seg in searcher.segment_readers() {
            tokens += seg.inverted_index(self.fields.text)?.total_num_tokens();
        }
        let mut seen = HashSet::new();
        let mut freqs = Vec::new();
        for t in analyze_with(&mut self.analyzer.clone(), text) {
            if seen.insert(t.clone()) {
                let df = searcher.doc_freq(&Term::from_field_text(self.fields.text, &t))?;
                freqs.push((t, df));
            }
        }
        // Deleted blocks count here until their segment is merged: this is what opt-out must fix.
        let docs = searcher
            .segment_readers()
            .iter()
            .map(|s| u64::from(s.max_doc()))
            .sum();
        Ok((docs, tokens, freqs))
    }

    #[doc(hidden)]
    pub fn index(&self) -> &Index {
        &self.index
    }
}

/// Appends one JSON line with a timestamp to the store's audit log.
pub(crate) fn audit(dir: &Path, mut entry: serde_json::Value) -> Result<()> {
    use std::io::Write;
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Some(o) = entry.as_object_mut() {
        o.insert("unix_time".into(), secs.into());
    }
    let path = dir.join(AUDIT);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(Error::io(&path))?;
    writeln!(f, "{entry}").map_err(Error::io(&path))?;
    f.sync_all().map_err(Error::io(&path))
}

/// Completes the pending opt-out, if any. Writers only, under the store's lock.
pub(crate) fn complete_pending(dir: &Path) -> Result<()> {
    if let Some(intent) = crate::txn::pending(dir)? {
        complete(dir, &intent).map_err(|e| {
            Error::store(
                dir,
                format!(
                    "an interrupted opt-out (owners {:?}, documents {:?}) is pending in {} and could \
                     not be completed: {e}. The store cannot be used until it is; fix the cause and \
                     run `moeval datastore stats` on the store (any command that opens it completes \
                     the opt-out)",
                    intent.owners,
                    intent.documents,
                    crate::txn::INTENT
                ),
            )
        })?;
    }
    Ok(())
}

/// Carries out an opt-out whose intent is on disk. Every step can be redone after a crash.
fn complete(dir: &Path, intent: &crate::txn::Intent) -> Result<OptOutReport> {
    if !crate::txn::logged(dir, &intent.id, "opt-out-started")? {
        audit(
            dir,
            serde_json::json!({
                "action": "opt-out-started",
                "opt_out_id": intent.id,
                "owners": intent.owners,
                "documents": intent.documents,
                "reason": intent.reason,
                "actor": intent.actor,
                "blocks": intent.blocks.len(),
                "identity_before": intent.identity_before,
            }),
        )?;
    }
    durable::fault::point("datastore.opt-out.logged");
    let (index, f) = open_index(dir)?;
    let mut writer: tantivy::IndexWriter<TantivyDocument> =
        index.writer_with_num_threads(1, 64 << 20)?;
    for o in &intent.owners {
        writer.delete_term(Term::from_field_text(f.owner, o));
    }
    for d in &intent.documents {
        writer.delete_term(Term::from_field_text(f.doc_id, d));
    }
    writer.commit()?;
    durable::fault::point("datastore.opt-out.deleted");
    // Deleted blocks still count in BM25 statistics, and their text stays in the segment files, until
    // their segment is rewritten.
    let segments = index.searchable_segment_ids()?;
    if !segments.is_empty() {
        writer.merge(&segments).wait()?;
    }
    writer.wait_merging_threads()?;
    let writer: tantivy::IndexWriter<TantivyDocument> =
        index.writer_with_num_threads(1, 15 << 20)?;
    writer.garbage_collect_files().wait()?;
    drop(writer);
    drop(index);
    durable::fault::point("datastore.opt-out.merged");

    let mut manifest = Manifest::read(dir)?;
    if let Some(k) = &mut manifest.knn {
        let blocks: HashSet<u64> = intent.blocks.iter().copied().collect();
        let (name, _) = crate::knn::remove_blocks(dir, &k.dir, &blocks)?;
        k.dir = name;
    }
    durable::fault::point("datastore.opt-out.knn");
    for o in &intent.owners {
        if !manifest.excluded_owners.contains(o) {
            manifest.excluded_owners.push(o.clone());
        }
    }
    for d in &intent.documents {
        if !manifest.excluded_documents.contains(d) {
            manifest.excluded_documents.push(d.clone());
        }
    }
    let store = Datastore::open_with(dir, manifest.clone())?;
    let st = store.stats()?;
    drop(store);
    manifest.documents = st.total.documents;
    manifest.blocks = st.total.blocks;
    manifest.tokens = st.total.tokens;
    if let Some(k) = &mut manifest.knn {
        k.entries = st.knn_entries;
    }
    manifest.write(dir)?;
    durable::fault::point("datastore.opt-out.manifest");
    crate::knn::remove_stale(dir, manifest.knn.as_ref().map(|k| k.dir.as_str()))?;
    let report = OptOutReport {
        blocks_removed: intent.blocks.len() as u64,
        knn_entries_removed: intent.knn_entries_before.saturating_sub(st.knn_entries),
        identity_before: intent.identity_before.clone(),
        identity_after: manifest.identity(),
    };
    if !crate::txn::logged(dir, &intent.id, "opt-out")? {
        audit(
            dir,
            serde_json::json!({
                "action": "opt-out",
                "opt_out_id": intent.id,
                "owners": intent.owners,
                "documents": intent.documents,
                "reason": intent.reason,
                "actor": intent.actor,
                "blocks_removed": report.blocks_removed,
                "knn_entries_removed": report.knn_entries_removed,
                "identity_before": report.identity_before,
                "identity_after": report.identity_after,
            }),
        )?;
    }
    crate::txn::clear_intent(dir)?;
    Ok(report)
}
