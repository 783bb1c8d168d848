//! Retrieval in the server (`--datastore DIR`), as `moeval eval --retrieval` does it: RIC-LM through
//! [`harness::retrieval::ric_retrieve`] (the retrieved blocks' tokens go before the prompt; they are
//! never echoed nor scored), and kNN-LM through [`harness::retrieval::KnnPicker`] (greedy decoding,
//! each token the argmax of the model's distribution mixed with its datastore neighbours'). Every
//! response names the documents it used.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use datastore::Datastore;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::ApiError;
use harness::retrieval::{ric_retrieve, KnnPicker, RetrievedBlock};

/// Most blocks one request may retrieve (each is a whole block of tokens in the context).
pub const MAX_K: usize = 16;
/// Most kNN-LM neighbours one request may ask for at every generated token.
pub const MAX_KNN_K: usize = 4096;

/// The `"retrieval"` member of a request's `"moeval"` object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    mode: String,
    k: Option<usize>,
    query_tokens: Option<usize>,
    lambda: Option<f64>,
    temperature: Option<f64>,
}

/// A request's RIC-LM settings.
#[derive(Clone, Copy, Debug)]
pub struct Ric {
    pub k: usize,
    pub query_tokens: usize,
}

/// A request's kNN-LM settings.
#[derive(Clone, Copy, Debug)]
pub struct Knn {
    pub k: usize,
    pub lambda: f64,
    pub temperature: f32,
}

/// What a request asks its datastore for.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Ric(Ric),
    Knn(Knn),
}

impl Mode {
    /// Parses and checks a request's `moeval.retrieval`, with `moeval eval`'s defaults (RIC-LM: k 1,
    /// 512 query tokens; kNN-LM: k 1024, lambda 0.3, temperature 10).
    pub fn parse(v: &Value, has_store: bool) -> Result<Mode, ApiError> {
        const P: &str = "moeval.retrieval";
        let b: Body = serde_json::from_value(v.clone())
            .map_err(|e| ApiError::param(P, format!("invalid retrieval settings: {e}")))?;
        if !has_store {
            return Err(ApiError::param(
                P,
                "this server has no datastore; start it with --datastore DIR",
            ));
        }
        match b.mode.as_str() {
            "ric" => {
                if b.lambda.is_some() || b.temperature.is_some() {
                    return Err(ApiError::param(
                        P,
                        "lambda and temperature are kNN-LM settings (\"mode\": \"knn\")",
                    ));
                }
                let k = b.k.unwrap_or(1);
                if k == 0 || k > MAX_K {
                    return Err(ApiError::param(
                        P,
                        format!("k must be between 1 and {MAX_K}"),
                    ));
                }
                let query_tokens = b.query_tokens.unwrap_or(512);
                if query_tokens == 0 {
                    return Err(ApiError::param(P, "query_tokens must be at least 1"));
                }
                Ok(Mode::Ric(Ric { k, query_tokens }))
            }
            "knn" => {
                if b.query_tokens.is_some() {
                    return Err(ApiError::param(
                        P,
                        "query_tokens is a RIC-LM setting (\"mode\": \"ric\")",
                    ));
                }
                let d = harness::retrieval::RetrievalSettings::default();
                let k = b.k.unwrap_or(1024);
                if k == 0 || k > MAX_KNN_K {
                    return Err(ApiError::param(
                        P,
                        format!("k must be between 1 and {MAX_KNN_K}"),
                    ));
                }
                let lambda = b.lambda.unwrap_or(d.lambda);
                if !(0.0..=1.0).contains(&lambda) {
                    return Err(ApiError::param(P, "lambda must be within [0, 1]"));
                }
                let temperature = b.temperature.unwrap_or(f64::from(d.temperature));
                if !(temperature > 0.0 && temperature.is_finite()) {
                    return Err(ApiError::param(P, "temperature must be positive"));
                }
                Ok(Mode::Knn(Knn {
                    k,
                    lambda,
                    temperature: temperature as f32,
                }))
            }
            other => Err(ApiError::param(
                P,
                format!("unknown retrieval mode `{other}`: use `ric` or `knn`"),
            )),
        }
    }
}

/// The open datastore, reopened when its manifest changes (a `moeval datastore opt-out` while the server
/// runs then applies to the next request, as policy changes do).
pub struct Store {
    dir: PathBuf,
    current: Mutex<(Vec<u8>, Arc<Datastore>)>,
}

impl Store {
    /// Opens `dir`, checking that its blocks were tokenized with the model's tokenizer.
    pub fn open(dir: &Path, model_dir: &Path) -> Result<Store> {
        let manifest = std::fs::read(dir.join("manifest.json"))
            .with_context(|| format!("{} is not a datastore (no manifest.json)", dir.display()))?;
        let store = Datastore::open(dir)
            .with_context(|| format!("cannot open the datastore {}", dir.display()))?;
        let tok = model_dir.join("tokenizer.json");
        let bytes =
            std::fs::read(&tok).with_context(|| format!("cannot read {}", tok.display()))?;
        let sha = {
            use sha2::{Digest, Sha256};
            Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        // Blocks are token ids: with another tokenizer they would be prepended as nonsense.
        anyhow::ensure!(
            store.manifest().tokenizer_sha256 == sha,
            "the datastore {} was built with another tokenizer ({}) than the model's {}; \
             rebuild it with --tokenizer {}",
            dir.display(),
            store.manifest().tokenizer,
            tok.display(),
            model_dir.display()
        );
        Ok(Store {
            dir: dir.to_path_buf(),
            current: Mutex::new((manifest, Arc::new(store))),
        })
    }

    /// The store as it is now: reopened if its manifest changed since the last request.
    pub fn get(&self) -> Result<Arc<Datastore>, ApiError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::fs::read(self.dir.join("manifest.json"))
            .map_err(|e| ApiError::internal(format!("cannot read the datastore manifest: {e}")))?;
        // A pending opt-out may already have deleted from the index under the open reader: reopening
        // completes it (waiting for the writer if it is still running), so no request sees its blocks.
        if now != cur.0 || Datastore::opt_out_pending(&self.dir) {
            let store = Datastore::open(&self.dir)
                .map_err(|e| ApiError::internal(format!("cannot reopen the datastore: {e}")))?;
            let manifest = store.manifest();
            let bytes = serde_json::to_vec_pretty(manifest).unwrap_or(now);
            *cur = (bytes, Arc::new(store));
        }
        Ok(cur.1.clone())
    }
}

/// What one prompt got from the datastore.
pub struct Retrieved {
    /// Tokens to put before the prompt (already cut to fit).
    pub tokens: Vec<u32>,
    pub blocks: Vec<RetrievedBlock>,
}

/// Retrieves for `prompt` (query: its last `query_tokens` tokens) and keeps at most `room` of the
/// retrieved tokens, cutting from the left as `moeval eval` does (the prompt itself is never cut).
pub fn retrieve(
    store: &Datastore,
    tokenizer: &engine::Tokenizer,
    prompt: &[u32],
    ric: Ric,
    room: usize,
    vocab: usize,
) -> Result<Retrieved, ApiError> {
    let blocks = ric_retrieve(store, tokenizer, prompt, ric.k, ric.query_tokens)
        .map_err(|e| ApiError::internal(format!("retrieval failed: {e}")))?;
    let mut tokens: Vec<u32> = blocks
        .iter()
        .flat_map(|b| b.tokens.iter().copied())
        .collect();
    if tokens.iter().any(|&t| t as usize >= vocab) {
        return Err(ApiError::internal(
            "the datastore holds token ids outside the model's vocabulary",
        ));
    }
    if tokens.len() > room {
        tokens.drain(..tokens.len() - room);
    }
    Ok(Retrieved { tokens, blocks })
}

/// The `"retrieval"` member of a response's `"moeval"` object: settings, store identity, excluded
/// owners, and per prompt (`choice`) the documents used.
pub fn report(store: &Datastore, ric: Ric, per_choice: &[Retrieved]) -> Value {
    let m = store.manifest();
    let documents: Vec<Value> = per_choice
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.blocks.iter().map(move |b| {
                json!({"choice": i, "document_id": b.doc_id, "owner": b.owner,
                       "license": b.license, "score": b.score, "weight": b.weight,
                       "block_id": b.block_id})
            })
        })
        .collect();
    json!({
        "mode": "ric", "k": ric.k, "query_tokens": ric.query_tokens,
        "datastore": {"identity": store.identity(), "excluded_owners": m.excluded_owners,
                      "excluded_documents": m.excluded_documents.len()},
        "documents": documents,
        "retrieved_tokens": per_choice.iter().map(|r| r.tokens.len()).collect::<Vec<_>>(),
    })
}

/// kNN-LM decoding for one prompt: the engine decodes through the picker, which keeps the documents
/// behind every generated token.
pub fn knn_picker(store: &Arc<Datastore>, knn: Knn) -> Result<Arc<KnnPicker>, ApiError> {
    KnnPicker::new(store.clone(), knn.k, knn.lambda, knn.temperature)
        .map(Arc::new)
        .map_err(|e| ApiError::invalid(e.to_string()))
}

/// The `"retrieval"` member of a kNN-LM response: settings, store identity and search, excluded
/// owners, and per prompt (`choice`) the documents whose neighbours shaped the generated tokens, with
/// `weight`: their share of the next-token probability (lambda x neighbour weight), averaged over the
/// generated tokens.
pub fn knn_report(store: &Datastore, knn: Knn, per_choice: &[tasks::lm::Sources]) -> Value {
    let m = store.manifest();
    let mut documents = Vec::new();
    for (i, s) in per_choice.iter().enumerate() {
        let mut per_doc: Vec<(&tasks::lm::Contribution, f64)> = Vec::new();
        for c in &s.contributions {
            match per_doc.iter_mut().find(|(d, _)| d.doc_id == c.doc_id) {
                Some(d) => d.1 += c.weight,
                None => per_doc.push((c, c.weight)),
            }
        }
        let units = f64::from(s.units.max(1));
        documents.extend(per_doc.into_iter().map(|(c, w)| {
            json!({"choice": i, "document_id": c.doc_id, "owner": c.owner, "license": c.license,
                   "weight": w / units, "block_id": c.block_id})
        }));
    }
    let search = m.knn.as_ref().map(|k| k.search.clone());
    json!({
        "mode": "knn", "k": knn.k, "lambda": knn.lambda, "temperature": knn.temperature,
        "datastore": {"identity": store.identity(), "excluded_owners": m.excluded_owners,
                      "excluded_documents": m.excluded_documents.len(), "search": search},
        "documents": documents,
    })
}
