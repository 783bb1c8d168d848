//! Retrieval-augmented evaluation: an engine model composed with a SILO-style datastore, as a
//! [`tasks::LanguageModel`].
//!
//! - RIC-LM (`--retrieval ric`): the query is the last `--query-tokens` context tokens before the scored
//!   span (decoded, bag of words); the top-k blocks' tokens are prepended to the context and never scored.
//!   The combined context is cut from the left to the model's length, so retrieved tokens go first.
//! - kNN-LM (`--retrieval knn`): p = (1 - lambda) p_LM + lambda p_kNN, p_kNN = softmax over the k nearest
//!   keys' negative squared L2 distances / temperature, summed per next token (exact search). An empty
//!   key set (every owner opted out) leaves p_LM untouched.
//! - SILO's perplexity protocol (`--ppl-window W --ppl-stride S`) for rolling log-likelihood: windows of
//!   W tokens every S tokens, only each window's newest S tokens scored (all W in the first).
//!
//! Every prediction that used the datastore records its sources (document, owner, license, weight);
//! [`Retrieval::write_run_records`] writes them with the store's identity into the run directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use datastore::knn::neighbor_weights;
use datastore::Datastore;
use engine::generate::{
    generate_requests, generate_routed, GenParams, Picker, SeqRequest, TokenPicker,
};
use engine::score::{loglikelihood_routed, ScoreOptions, ScoreRequest};
use engine::{ExpertMask, Model, RoutedTokens, SeqInput, Tokenizer};
use rayon::prelude::*;
use reports::tables::AttributionRow;
use tasks::lm::{encode_pair, rolling_windows, truncate_left};
use tasks::{
    AnsweringModel, Answers, Contribution, GenerateRequest, Loglikelihood, LoglikelihoodRequest,
    ModelError, Sources, TaskResult,
};

/// Per job: its log-likelihood and sources; with the tokens the forward passes routed.
type Scored = (Vec<(Loglikelihood, Sources)>, RoutedTokens);

/// How the datastore is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Retrieval in context: BM25 top-k blocks prepended to the context.
    Ric,
    /// kNN-LM: interpolate with a distribution over the nearest datastore positions.
    Knn,
}

/// Retrieval settings of a run (`moeval eval --retrieval ...`). [`Default`] is no retrieval with the
/// command line's defaults for the rest.
#[derive(Clone, Debug)]
pub struct RetrievalSettings {
    /// How the datastore is used; `None`: no datastore.
    pub retrieval: Option<Mode>,
    /// Datastore directory (`moeval datastore build`).
    pub datastore: Option<PathBuf>,
    /// Blocks to prepend (ric, default 1) or neighbours (knn, default 1024).
    pub k: Option<usize>,
    /// kNN-LM interpolation weight of p_kNN.
    pub lambda: f64,
    /// kNN-LM softmax temperature over negative squared L2 distances.
    pub temperature: f32,
    /// RIC-LM query: this many context tokens before the scored span.
    pub query_tokens: usize,
    /// SILO perplexity protocol for rolling log-likelihood: windows of this many tokens ...
    pub ppl_window: Option<usize>,
    /// ... every this many tokens; only each window's newest tokens are scored.
    pub ppl_stride: Option<usize>,
}

impl Default for RetrievalSettings {
    fn default() -> Self {
        RetrievalSettings {
            retrieval: None,
            datastore: None,
            k: None,
            lambda: 0.3,
            temperature: 10.0,
            query_tokens: 512,
            ppl_window: None,
            ppl_stride: None,
        }
    }
}

impl RetrievalSettings {
    /// The options a run recorded in its manifest (`--resume` reruns with exactly these).
    pub fn from_scoring(s: &reports::manifest::Scoring) -> Result<RetrievalSettings> {
        let retrieval = match s.retrieval_mode.as_deref() {
            None => None,
            Some("ric") => Some(Mode::Ric),
            Some("knn") => Some(Mode::Knn),
            Some(other) => bail!("unknown retrieval mode `{other}` (known: ric, knn)"),
        };
        Ok(RetrievalSettings {
            retrieval,
            datastore: s.datastore.as_ref().map(PathBuf::from),
            k: s.k,
            lambda: s.lambda,
            temperature: s.temperature,
            query_tokens: s.query_tokens,
            ppl_window: s.ppl_window,
            ppl_stride: s.ppl_stride,
        })
    }

    /// These options as the manifest records them (`max_length`, `device` and `dtype` are the
    /// caller's); `retrieval` is the opened datastore, if any.
    pub fn scoring(&self, retrieval: Option<&Retrieval>) -> reports::manifest::Scoring {
        let r = retrieval.filter(|r| r.mode.is_some());
        reports::manifest::Scoring {
            retrieval_mode: r.and(self.retrieval).map(|m| m.name().to_string()),
            datastore: r.and_then(|r| r.store.as_ref()).map(|s| {
                std::path::absolute(s.dir())
                    .unwrap_or_else(|_| s.dir().to_path_buf())
                    .display()
                    .to_string()
            }),
            datastore_identity: r.and_then(|r| r.store.as_ref()).map(|s| s.identity()),
            k: r.map(|r| r.k),
            lambda: self.lambda,
            temperature: self.temperature,
            query_tokens: self.query_tokens,
            ppl_window: self.ppl_window,
            ppl_stride: self.ppl_stride,
            ..Default::default()
        }
    }
}

impl Mode {
    /// The mode's name on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ric => "ric",
            Mode::Knn => "knn",
        }
    }
}

/// A datastore opened for a run, with its settings.
pub struct Retrieval {
    store: Option<Arc<Datastore>>,
    mode: Option<Mode>,
    k: usize,
    lambda: f64,
    temperature: f32,
    query_tokens: usize,
    window: Option<(usize, usize)>,
}

impl Retrieval {
    /// Opens the datastore named by the options; `None` when neither retrieval nor the SILO
    /// perplexity protocol is asked for (the plain engine model then serves the run).
    pub fn open(model: &Model, a: &RetrievalSettings) -> Result<Option<Retrieval>> {
        let window = a.ppl_window.zip(a.ppl_stride);
        if a.retrieval.is_none() && window.is_none() {
            return Ok(None);
        }
        let max = model.config().max_position_embeddings;
        if let Some((w, s)) = window {
            if w == 0 || s == 0 || s > w || w > max {
                bail!("--ppl-window {w} --ppl-stride {s}: need 0 < stride <= window <= the model's context ({max})");
            }
        }
        if !(0.0..=1.0).contains(&a.lambda) {
            bail!("--lambda must be within [0, 1]");
        }
        let store = match (&a.retrieval, &a.datastore) {
            (Some(_), Some(dir)) => {
                Some(Arc::new(Datastore::open(dir).with_context(|| {
                    format!("cannot open the datastore {}", dir.display())
                })?))
            }
            _ => None,
        };
        if let (Some(Mode::Knn), Some(s)) = (a.retrieval, &store) {
            let Some(knn) = s.knn() else {
                bail!(
                    "{} has no kNN-LM keys; build them with `moeval datastore knn {} --model DIR`",
                    s.dir().display(),
                    s.dir().display()
                );
            };
            let h = model.config().hidden_size;
            if knn.dim() != h {
                bail!(
                    "the datastore's kNN keys have {} dimensions, the model's hidden states {h}",
                    knn.dim()
                );
            }
            if let (Some(info), Some(dir)) = (&s.manifest().knn, model.dir()) {
                if info.model_sha256 != model_fingerprint(dir)? {
                    eprintln!(
                        "warning: the kNN keys were computed with another model ({}); neighbours may be meaningless",
                        info.model
                    );
                }
            }
        }
        Ok(Some(Retrieval {
            store,
            mode: a.retrieval,
            k: a.k.unwrap_or(match a.retrieval {
                Some(Mode::Knn) => 1024,
                _ => 1,
            }),
            lambda: a.lambda,
            temperature: a.temperature,
            query_tokens: a.query_tokens,
            window,
        }))
    }

    /// The `retrieval` column of the run's rows: the mode with the settings that change its numbers
    /// and the datastore (folder name @ the first 12 digits of its identity), then the SILO scoring
    /// window; `none` when neither is used. E.g.
    /// `knn:k=1024,lambda=0.3,temperature=10,datastore=news@0a1b2c3d4e5f`, `ppl_window=64,ppl_stride=32`.
    pub fn label(&self) -> String {
        let store = || {
            self.store.as_ref().map_or_else(String::new, |s| {
                let name = s
                    .dir()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let id = s.identity();
                format!(",datastore={name}@{}", &id[..12.min(id.len())])
            })
        };
        let mut parts = Vec::new();
        match self.mode {
            Some(Mode::Knn) => parts.push(format!(
                "knn:k={},lambda={},temperature={}{}{}",
                self.k,
                self.lambda,
                self.temperature,
                if self.knn_index().is_some() {
                    ",search=hnsw"
                } else {
                    ""
                },
                store()
            )),
            Some(Mode::Ric) => parts.push(format!(
                "ric:k={},query_tokens={}{}",
                self.k,
                self.query_tokens,
                store()
            )),
            None => {}
        }
        if let Some((w, s)) = self.window {
            parts.push(format!("ppl_window={w},ppl_stride={s}"));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(";")
        }
    }

    /// The approximate index kNN-LM searches through, when the store's keys have one.
    fn knn_index(&self) -> Option<datastore::AnnSettings> {
        self.store.as_ref()?.knn()?.index_settings()
    }

    /// A request-cache scope that separates these settings and this datastore state from any other.
    pub fn cache_scope(&self, base: &str) -> String {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(self.settings_json().to_string());
        let hex: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("{base}-retrieval-{hex}")
    }

    fn settings_json(&self) -> serde_json::Value {
        let m = self.store.as_ref().map(|s| s.manifest());
        serde_json::json!({
            "mode": self.mode,
            "datastore": self.store.as_ref().map(|s| s.dir().display().to_string()),
            "datastore_identity": self.store.as_ref().map(|s| s.identity()),
            "excluded_owners": m.map(|m| m.excluded_owners.clone()).unwrap_or_default(),
            "excluded_documents": m.map(|m| m.excluded_documents.clone()).unwrap_or_default(),
            "blocks": m.map(|m| m.blocks),
            "knn_entries": self.store.as_ref().and_then(|s| s.knn()).map(|k| k.len()),
            "search": match (self.mode, self.knn_index()) {
                (Some(Mode::Ric), _) => Some("bm25 (tantivy, k1 = 1.2, b = 0.75)".to_string()),
                (Some(Mode::Knn), None) => Some("exact (squared L2 over all keys)".to_string()),
                (Some(Mode::Knn), Some(i)) => Some(format!(
                    "hnsw (usearch, f16 vectors; connectivity {}, expansion_add {}, expansion_search {}, \
                     {} entries per part; candidates re-ranked by exact squared L2)",
                    i.connectivity, i.expansion_add, i.expansion_search, i.part_entries
                )),
                (None, _) => None,
            },
            "k": self.mode.map(|_| self.k),
            "lambda": (self.mode == Some(Mode::Knn)).then_some(self.lambda),
            "temperature": (self.mode == Some(Mode::Knn)).then_some(self.temperature),
            "query_tokens": (self.mode == Some(Mode::Ric)).then_some(self.query_tokens),
            "ppl_window": self.window.map(|w| w.0),
            "ppl_stride": self.window.map(|w| w.1),
        })
    }

    /// The language model for one expert mask (`None`: every loaded expert).
    pub fn lm<'a>(&'a self, model: &'a Model, mask: Option<ExpertMask>) -> Result<RetrievalLm<'a>> {
        let cfg = model.config();
        let prefix = cfg
            .bos_token_id
            .or_else(|| cfg.eos_token_ids.first().copied())
            .context(
                "the model has neither a BOS nor an EOS token to prefix empty contexts with",
            )?;
        Ok(RetrievalLm {
            model,
            tokenizer: model.require_tokenizer()?,
            prefix,
            max_length: cfg.max_position_embeddings,
            mask,
            r: self,
        })
    }

    /// Writes `retrieval.json` (datastore identity, excluded owners, settings) and, when a datastore
    /// was used, `attribution.parquet` (per sample: each contributing document's mean weight over the
    /// sample's scored units) and `attribution_units.parquet` (per scored window or token), from the
    /// sources each sample's answers carry. `variants` pairs each variant label with its results.
    /// Requests answered from an earlier process's cache have no sources.
    pub fn write_run_records(
        &self,
        run_dir: &Path,
        variants: &[(&str, &[TaskResult])],
    ) -> Result<()> {
        reports::tables::write_json(&run_dir.join("retrieval.json"), &self.settings_json())?;
        if self.store.is_none() {
            return Ok(());
        }
        let mut per_sample = Vec::new();
        let mut per_unit = Vec::new();
        for (label, results) in variants {
            for r in results.iter() {
                for sample in &r.samples {
                    // Mean weight per document over all scored units of the sample's requests.
                    let mut units = 0u32;
                    let mut sums: BTreeMap<(String, String, String), f64> = BTreeMap::new();
                    for (ri, a) in sample.sources.iter().enumerate() {
                        units += a.units;
                        for c in &a.contributions {
                            *sums
                                .entry((c.doc_id.clone(), c.owner.clone(), c.license.clone()))
                                .or_default() += c.weight;
                            push_row(
                                &mut per_unit,
                                label,
                                &r.task,
                                sample.doc_id,
                                ri,
                                Some(c.unit),
                                c,
                            );
                        }
                    }
                    for ((doc, owner, license), w) in sums {
                        let c = Contribution {
                            unit: 0,
                            block_id: 0,
                            doc_id: doc,
                            owner,
                            license,
                            weight: w / f64::from(units.max(1)),
                        };
                        push_row(&mut per_sample, label, &r.task, sample.doc_id, 0, None, &c);
                    }
                }
            }
        }
        reports::tables::write_attribution(
            &run_dir.join("attribution.parquet"),
            &per_sample,
            false,
        )?;
        reports::tables::write_attribution(
            &run_dir.join("attribution_units.parquet"),
            &per_unit,
            true,
        )?;
        Ok(())
    }
}

/// Adds one attribution row.
fn push_row(
    rows: &mut Vec<AttributionRow>,
    variant: &str,
    task: &str,
    doc: usize,
    request: usize,
    unit: Option<u32>,
    c: &Contribution,
) {
    rows.push(AttributionRow {
        variant: variant.to_string(),
        task: task.to_string(),
        doc_id: doc,
        request,
        unit: unit.unwrap_or(0),
        block_id: c.block_id,
        source_doc_id: c.doc_id.clone(),
        owner: c.owner.clone(),
        license: c.license.clone(),
        weight: c.weight,
    });
}

/// An engine model with a datastore (or only the SILO perplexity protocol).
pub struct RetrievalLm<'a> {
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    prefix: u32,
    max_length: usize,
    mask: Option<ExpertMask>,
    r: &'a Retrieval,
}

/// A token-level scoring job: context, continuation, and the sources of the retrieved prefix.
struct Job {
    ctx: Vec<u32>,
    cont: Vec<u32>,
    sources: Vec<Contribution>,
}

/// SILO's evaluation windows: the first scores its `window` tokens after `prefix`; each later one
/// scores the next `stride` tokens with the preceding `window - stride` as context. The scored spans
/// tile the tokens exactly once.
pub fn silo_windows(
    tokens: &[u32],
    prefix: u32,
    window: usize,
    stride: usize,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut out = Vec::new();
    if tokens.is_empty() || window == 0 || stride == 0 {
        return out;
    }
    let first = window.min(tokens.len());
    out.push((vec![prefix], tokens[..first].to_vec()));
    let mut end = first;
    while end < tokens.len() {
        let next = (end + stride).min(tokens.len());
        let start = next.saturating_sub(window).min(end - 1);
        out.push((tokens[start..end].to_vec(), tokens[end..next].to_vec()));
        end = next;
    }
    out
}

/// One block that RIC-LM retrieved for a context.
#[derive(Clone, Debug, PartialEq)]
pub struct RetrievedBlock {
    pub block_id: u64,
    pub doc_id: String,
    pub owner: String,
    pub license: String,
    /// BM25 score.
    pub score: f32,
    /// Share of the retrieved blocks' summed BM25 score.
    pub weight: f64,
    /// The block's tokens, to prepend to the context (best block first).
    pub tokens: Vec<u32>,
}

/// RIC-LM retrieval exactly as `moeval eval --retrieval ric` does it: the query is the last
/// `query_tokens` of `before`, decoded (special tokens dropped) and searched with BM25 for the top `k`
/// blocks. Shared with the server so both retrieve the same blocks for the same tokens.
pub fn ric_retrieve(
    store: &Datastore,
    tokenizer: &Tokenizer,
    before: &[u32],
    k: usize,
    query_tokens: usize,
) -> Result<Vec<RetrievedBlock>, ModelError> {
    let q = &before[before.len().saturating_sub(query_tokens)..];
    // Special tokens (the BOS/EOS prefix) are left out of the query.
    let text = tokenizer.decode(q)?;
    let hits = store.search(&text, k)?;
    let total: f64 = hits.iter().map(|h| f64::from(h.score)).sum();
    Ok(hits
        .into_iter()
        .map(|h| RetrievedBlock {
            block_id: h.block_id,
            weight: f64::from(h.score) / total.max(f64::MIN_POSITIVE),
            score: h.score,
            doc_id: h.doc_id,
            owner: h.owner,
            license: h.license,
            tokens: h.tokens,
        })
        .collect())
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

impl RetrievalLm<'_> {
    fn store(&self) -> Option<&Datastore> {
        self.r.store.as_deref()
    }

    /// The kNN-LM interpolation, when the store has kNN keys.
    fn knn_mix(&self) -> Option<KnnMix> {
        let store = self.r.store.clone().filter(|s| s.knn().is_some())?;
        Some(KnnMix {
            store,
            k: self.r.k,
            lambda: self.r.lambda,
            temperature: self.r.temperature,
        })
    }

    /// RIC-LM: retrieves for the tokens before a scored span; returns the prefix tokens and sources.
    fn retrieve(&self, before: &[u32]) -> Result<(Vec<u32>, Vec<Contribution>), ModelError> {
        let (Some(store), Some(Mode::Ric)) = (self.store(), self.r.mode) else {
            return Ok((Vec::new(), Vec::new()));
        };
        let blocks = ric_retrieve(store, self.tokenizer, before, self.r.k, self.r.query_tokens)?;
        let mut prefix = Vec::new();
        let mut sources = Vec::new();
        for b in blocks {
            sources.push(Contribution {
                unit: 0,
                block_id: b.block_id,
                doc_id: b.doc_id,
                owner: b.owner,
                license: b.license,
                weight: b.weight,
            });
            prefix.extend(b.tokens);
        }
        Ok((prefix, sources))
    }

    /// Builds the jobs of (context, continuation) pairs: retrieval prepended (RIC-LM), then the
    /// harness's left truncation to the model's length.
    fn jobs(&self, pairs: Vec<(Vec<u32>, Vec<u32>)>) -> Result<Vec<Job>, ModelError> {
        pairs
            .into_par_iter()
            .map(|(ctx, cont)| {
                // The first rolling window's context is only the prefix token: nothing to retrieve with.
                let real_context = !(ctx.len() == 1 && ctx[0] == self.prefix);
                let (mut pre, sources) = if real_context {
                    self.retrieve(&ctx)?
                } else {
                    (Vec::new(), Vec::new())
                };
                pre.extend(ctx);
                let (ctx, cont) = truncate_left(pre, cont, self.max_length);
                Ok(Job { ctx, cont, sources })
            })
            .collect()
    }

    /// Scores jobs; returns per job the summed log-likelihood, greediness and per-token sources.
    fn score(&self, jobs: &[Job]) -> Result<Scored, ModelError> {
        if self.r.mode == Some(Mode::Knn) {
            return self.score_knn(jobs);
        }
        let live: Vec<usize> = (0..jobs.len())
            .filter(|&i| !jobs[i].cont.is_empty())
            .collect();
        let batch: Vec<ScoreRequest> = live
            .iter()
            .map(|&i| ScoreRequest {
                context: jobs[i].ctx.clone(),
                continuation: jobs[i].cont.clone(),
            })
            .collect();
        let opts = ScoreOptions {
            mask: self.mask.clone(),
            ..ScoreOptions::default()
        };
        let (scores, routed) = loglikelihood_routed(self.model, &batch, &opts)?;
        let mut out: Vec<(Loglikelihood, Sources)> = jobs
            .iter()
            .map(|_| {
                (
                    Loglikelihood {
                        logprob: 0.0,
                        is_greedy: true,
                    },
                    Sources::default(),
                )
            })
            .collect();
        for (&i, s) in live.iter().zip(scores) {
            out[i].0 = Loglikelihood {
                logprob: s.total(),
                is_greedy: s.is_greedy(),
            };
        }
        for (o, j) in out.iter_mut().zip(jobs) {
            o.1 = Sources {
                units: 1,
                contributions: j.sources.clone(),
            };
        }
        Ok((out, routed))
    }

    /// kNN-LM scoring: one forward pass per job over context + continuation (but its last token).
    fn score_knn(&self, jobs: &[Job]) -> Result<Scored, ModelError> {
        let mut routed = RoutedTokens::default();
        let out = jobs
            .iter()
            .map(|j| {
                if j.cont.is_empty() {
                    return Ok((
                        Loglikelihood {
                            logprob: 0.0,
                            is_greedy: true,
                        },
                        Sources::default(),
                    ));
                }
                let mut seq = j.ctx.clone();
                seq.extend_from_slice(&j.cont[..j.cont.len() - 1]);
                let mut cache = self.model.new_cache();
                let fwd = self.model.forward(
                    &mut [SeqInput {
                        tokens: &seq,
                        cache: &mut cache,
                        mask: self.mask.as_ref(),
                    }],
                    false,
                )?;
                routed.add(&fwd.routed);
                let rows = fwd.hidden.narrow(0, j.ctx.len() - 1, j.cont.len())?;
                let logits = self.model.logits(&rows)?.to_vec2::<f32>()?;
                let keys = rows.to_vec2::<f32>()?;
                let per_token: Vec<(f64, bool, Vec<Contribution>)> = keys
                    .par_iter()
                    .zip(logits.par_iter())
                    .zip(j.cont.par_iter())
                    .enumerate()
                    .map(|(u, ((key, logits), &y))| self.knn_token(u as u32, key, logits, y))
                    .collect::<Result<_, ModelError>>()?;
                let logprob = per_token.iter().map(|t| t.0).sum();
                let is_greedy = per_token.iter().all(|t| t.1);
                let contributions = per_token.into_iter().flat_map(|t| t.2).collect();
                Ok((
                    Loglikelihood { logprob, is_greedy },
                    Sources {
                        units: j.cont.len() as u32,
                        contributions,
                    },
                ))
            })
            .collect::<Result<_, ModelError>>()?;
        Ok((out, routed))
    }

    /// The mixed distribution at one position: (log p(y), whether y is its argmax, sources).
    fn knn_token(
        &self,
        unit: u32,
        key: &[f32],
        logits: &[f32],
        y: u32,
    ) -> Result<(f64, bool, Vec<Contribution>), ModelError> {
        let lp = log_softmax(logits);
        let (mixed, sources) = self.mix(key, &lp, unit)?;
        let lp_y = mixed.as_ref().map_or(lp[y as usize], |m| m[y as usize]);
        let dist = mixed.as_ref().unwrap_or(&lp);
        let best = argmax(dist);
        Ok((lp_y, best == y as usize, sources))
    }

    /// log p over the vocabulary after interpolation (`None`: no neighbours, p_LM unchanged).
    fn mix(&self, key: &[f32], lp: &[f64], unit: u32) -> Result<Mixed, ModelError> {
        match self.knn_mix() {
            Some(m) => m.mix(key, lp, unit),
            None => Ok((None, Vec::new())),
        }
    }

    /// kNN-LM generation: greedy, through the engine's decoder with a [`KnnPicker`] per request.
    fn generate_knn(
        &self,
        requests: &[GenerateRequest],
        prompts: Vec<(Vec<u32>, Vec<Contribution>)>,
    ) -> Result<Answers<String>, ModelError> {
        if requests
            .iter()
            .any(|r| r.temperature > 0.0 || r.num_beams > 1)
        {
            return Err(
                "kNN-LM generation supports greedy decoding only (do_sample: false, num_beams: 1)"
                    .into(),
            );
        }
        let mut pickers = Vec::with_capacity(requests.len());
        let mut reqs = Vec::with_capacity(requests.len());
        for (r, (ids, _)) in requests.iter().zip(prompts) {
            let picker = Arc::new(KnnPicker {
                mix: self
                    .knn_mix()
                    .ok_or("kNN-LM needs a datastore with kNN keys")?,
                sources: Mutex::new(Sources::default()),
            });
            let mut params = crate::lm::gen_params(r);
            // Generation stops once the sequence fills the model's context.
            let room = (self.max_length + 1).saturating_sub(ids.len()).max(1);
            params.max_new_tokens = params.max_new_tokens.min(room);
            reqs.push(SeqRequest {
                prompt: ids,
                params,
                mask: self.mask.clone(),
                picker: Some(Picker(picker.clone())),
                ..SeqRequest::default()
            });
            pickers.push(picker);
        }
        let (out, routed) = generate_requests(self.model, reqs)?;
        let sources = pickers.iter().map(|p| p.take_sources()).collect();
        Ok(Answers {
            values: out.into_iter().map(|g| g.text).collect(),
            sources,
            routed: routed.0,
            cached: 0,
        })
    }

    fn windows(&self, tokens: &[u32]) -> Vec<(Vec<u32>, Vec<u32>)> {
        match self.r.window {
            Some((w, s)) => silo_windows(tokens, self.prefix, w, s),
            None => rolling_windows(tokens, self.prefix, self.max_length),
        }
    }
}

/// log p after kNN-LM interpolation (`None`: p_LM unchanged) and each contributing document.
type Mixed = (Option<Vec<f64>>, Vec<Contribution>);

/// kNN-LM's interpolation of the model's distribution with its datastore neighbours' (owned, so a
/// decoding [`TokenPicker`] can hold it).
#[derive(Clone)]
struct KnnMix {
    store: Arc<Datastore>,
    k: usize,
    lambda: f64,
    temperature: f32,
}

impl KnnMix {
    /// log p over the vocabulary after interpolation (`None`: no neighbours, p_LM unchanged) and
    /// the documents behind it.
    fn mix(&self, key: &[f32], lp: &[f64], unit: u32) -> Result<Mixed, ModelError> {
        let store = &self.store;
        let Some(knn) = store.knn() else {
            return Ok((None, Vec::new()));
        };
        let nn = knn.search(key, self.k)?;
        if nn.is_empty() || self.lambda == 0.0 {
            return Ok((None, Vec::new()));
        }
        let w = neighbor_weights(&nn, self.temperature);
        let mut p_knn = vec![0.0f64; lp.len()];
        // Sources: lambda x weight, summed per document.
        let mut per_doc: BTreeMap<u64, f64> = BTreeMap::new();
        for (n, &wi) in nn.iter().zip(&w) {
            let v = knn.value(n.entry) as usize;
            if v < p_knn.len() {
                p_knn[v] += wi;
            }
            *per_doc.entry(knn.block(n.entry)).or_default() += self.lambda * wi;
        }
        let l = self.lambda;
        let mixed = lp
            .iter()
            .zip(&p_knn)
            .map(|(&a, &b)| ((1.0 - l) * a.exp() + l * b).ln())
            .collect();
        let mut sources: Vec<Contribution> = Vec::new();
        for (block, weight) in per_doc {
            let src = store
                .source(block)?
                .cloned()
                .unwrap_or_else(|| datastore::Source {
                    doc_id: format!("block {block}"),
                    owner: String::new(),
                    license: String::new(),
                });
            // Several blocks of one document: one row per document.
            match sources.iter_mut().find(|c| c.doc_id == src.doc_id) {
                Some(c) => c.weight += weight,
                None => sources.push(Contribution {
                    unit,
                    block_id: block,
                    doc_id: src.doc_id,
                    owner: src.owner,
                    license: src.license,
                    weight,
                }),
            }
        }
        Ok((Some(mixed), sources))
    }
}

/// kNN-LM greedy decoding through the engine's decoder: each next token is the argmax of the mixed
/// distribution; the documents behind every step are kept for the answer's sources. `moeval eval`
/// and `moeval serve` decode kNN-LM through it.
pub struct KnnPicker {
    mix: KnnMix,
    sources: Mutex<Sources>,
}

impl KnnPicker {
    /// A picker mixing `store`'s `k` nearest neighbours in with weight `lambda` (neighbour weights:
    /// softmax of -distance / `temperature`). The store must have kNN keys.
    pub fn new(
        store: Arc<Datastore>,
        k: usize,
        lambda: f64,
        temperature: f32,
    ) -> Result<KnnPicker> {
        if store.knn().is_none() {
            bail!(
                "{} has no kNN-LM keys; build them with `moeval datastore knn`",
                store.dir().display()
            );
        }
        Ok(KnnPicker {
            mix: KnnMix {
                store,
                k,
                lambda,
                temperature,
            },
            sources: Mutex::new(Sources::default()),
        })
    }

    /// The documents behind the tokens picked so far (one unit per token), emptied.
    pub fn take_sources(&self) -> Sources {
        std::mem::take(&mut *self.sources.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl TokenPicker for KnnPicker {
    fn pick(&self, step: usize, hidden: &[f32], logits: &[f32]) -> engine::Result<u32> {
        let lp = log_softmax(logits);
        let (mixed, contributions) = self
            .mix
            .mix(hidden, &lp, step as u32)
            .map_err(|e| engine::Error::Input(format!("kNN-LM: {e}")))?;
        let mut s = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        s.units += 1;
        s.contributions.extend(contributions);
        Ok(argmax(mixed.as_ref().unwrap_or(&lp)) as u32)
    }
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

impl AnsweringModel for RetrievalLm<'_> {
    fn answer_loglikelihood(
        &self,
        requests: &[LoglikelihoodRequest],
    ) -> Result<Answers<Loglikelihood>, ModelError> {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = requests
            .par_iter()
            .map(|r| {
                encode_pair(
                    |s| self.tokenizer.encode(s),
                    &r.context,
                    &r.continuation,
                    self.prefix,
                )
            })
            .collect::<Result<_, engine::Error>>()?;
        let jobs = self.jobs(pairs)?;
        let (scored, routed) = self.score(&jobs)?;
        let (values, sources) = scored.into_iter().unzip();
        Ok(Answers {
            values,
            sources,
            routed: routed.0,
            cached: 0,
        })
    }

    fn answer_rolling(&self, texts: &[String]) -> Result<Answers<f64>, ModelError> {
        let windows: Vec<Vec<(Vec<u32>, Vec<u32>)>> = texts
            .par_iter()
            .map(|t| Ok(self.windows(&self.tokenizer.encode(t)?)))
            .collect::<Result<_, engine::Error>>()?;
        let counts: Vec<usize> = windows.iter().map(Vec::len).collect();
        let jobs = self.jobs(windows.into_iter().flatten().collect())?;
        let (scored, routed) = self.score(&jobs)?;
        let mut it = scored.into_iter();
        let (values, sources) = counts
            .into_iter()
            .map(|n| {
                let mut total = 0.0;
                let mut att = Sources::default();
                for (ll, a) in it.by_ref().take(n) {
                    total += ll.logprob;
                    // Units count up across the text's windows.
                    let base = att.units;
                    att.units += a.units;
                    att.contributions
                        .extend(a.contributions.into_iter().map(|mut c| {
                            c.unit += base;
                            c
                        }));
                }
                (total, att)
            })
            .unzip();
        Ok(Answers {
            values,
            sources,
            routed: routed.0,
            cached: 0,
        })
    }

    fn answer_generate(&self, requests: &[GenerateRequest]) -> Result<Answers<String>, ModelError> {
        let prompts: Vec<(Vec<u32>, Vec<Contribution>)> = requests
            .par_iter()
            .map(|r| {
                let mut ids = self.tokenizer.encode(&r.context)?;
                // The harness keeps the last max_length - max_gen_toks context tokens.
                let keep = self.max_length.saturating_sub(r.max_gen_toks).max(1);
                let (mut pre, sources) = if ids.is_empty() {
                    (Vec::new(), Vec::new())
                } else {
                    self.retrieve(&ids)?
                };
                pre.append(&mut ids);
                if pre.len() > keep {
                    pre.drain(..pre.len() - keep);
                }
                if pre.is_empty() {
                    pre.push(self.prefix);
                }
                Ok((pre, sources))
            })
            .collect::<Result<_, ModelError>>()?;
        if self.r.mode == Some(Mode::Knn) {
            return self.generate_knn(requests, prompts);
        }
        let batch: Vec<(Vec<u32>, GenParams)> = requests
            .iter()
            .zip(&prompts)
            .map(|(r, (ids, _))| (ids.clone(), crate::lm::gen_params(r)))
            .collect();
        let (out, routed) = generate_routed(self.model, &batch, self.mask.as_ref())?;
        let (values, sources) = prompts
            .into_iter()
            .zip(out)
            .map(|((_, contributions), g)| {
                let s = Sources {
                    units: 1,
                    contributions,
                };
                (g.text, s)
            })
            .unzip();
        Ok(Answers {
            values,
            sources,
            routed: routed.0,
            cached: 0,
        })
    }
}

/// SHA-256 over a model's `config.json` and its weight files' names and sizes: identifies the model
/// whose hidden states are a store's kNN keys without reading gigabytes.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let cfg = dir.join("config.json");
    h.update(std::fs::read(&cfg).with_context(|| format!("cannot read {}", cfg.display()))?);
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().map(|m| m.len()).unwrap_or(0),
            )
        })
        .collect();
    files.sort();
    for (name, len) in files {
        h.update(format!("{name}:{len}\n"));
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What [`build_knn_keys`] reports progress on: blocks whose keys are computed, then entries in the
/// approximate index (when one is built).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KnnStage {
    Keys,
    Index,
}

/// Computes kNN-LM keys for every position of a store (`moeval datastore knn`). Each block supplies
/// the positions the previous block of its document did not, so every next-token target appears once,
/// with at least `block - stride` tokens of context. Returns the number of entries.
pub fn build_knn_keys(
    store_dir: &Path,
    model: &Model,
    model_dir: &Path,
    search: datastore::knn::Search,
    progress: &(dyn Fn(KnnStage, u64, u64) + Sync),
) -> Result<u64> {
    // The writer holds the store's lock from here to `finish`: no opt-out can slip in between reading
    // the blocks and committing their keys.
    let mut w = datastore::knn::KnnWriter::create(store_dir, model.config().hidden_size)?
        .with_search(search);
    let store = Datastore::open(store_dir)?;
    let m = store.manifest().clone();
    let max = model.config().max_position_embeddings;
    if m.block > max {
        bail!("blocks of {} tokens do not fit the model's context of {max}; rebuild the store with --block {max} or less", m.block);
    }
    let vocab = model.config().vocab_size as u32;
    let blocks = store.blocks()?;
    drop(store);
    let total = blocks.len() as u64;
    // Several blocks per forward pass; rows come back in input order.
    for (ci, chunk) in blocks.chunks(16).enumerate() {
        if let Some(b) = chunk.iter().find(|b| b.tokens.iter().any(|&t| t >= vocab)) {
            bail!("block {} has token ids outside the model's vocabulary: was the store built with this model's tokenizer?", b.block_id);
        }
        let mut caches: Vec<_> = chunk.iter().map(|_| model.new_cache()).collect();
        let mut inputs: Vec<SeqInput> = chunk
            .iter()
            .zip(caches.iter_mut())
            .map(|(b, cache)| SeqInput {
                tokens: &b.tokens,
                cache,
                mask: None,
            })
            .collect();
        let fwd = model.forward(&mut inputs, false)?;
        drop(inputs);
        for (b, &s) in chunk.iter().zip(&fwd.starts) {
            let n = b.tokens.len();
            let lo = if b.start == 0 {
                0
            } else {
                (m.block - m.stride).saturating_sub(1)
            };
            if n < 2 || lo >= n - 1 {
                continue;
            }
            let rows = fwd.hidden.narrow(0, s + lo, n - 1 - lo)?;
            let keys: Vec<f32> = rows.flatten_all()?.to_vec1()?;
            w.push(b.block_id, &keys, &b.tokens[lo + 1..])?;
        }
        progress(
            KnnStage::Keys,
            ((ci + 1) * 16).min(blocks.len()) as u64,
            total,
        );
    }
    let name = model_dir
        .canonicalize()
        .unwrap_or_else(|_| model_dir.to_path_buf());
    Ok(w.finish_with(
        &name.display().to_string(),
        &model_fingerprint(model_dir)?,
        &|done, total| progress(KnnStage::Index, done, total),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silo_windows_tile_the_tokens() {
        let toks: Vec<u32> = (10..30).collect();
        let w = silo_windows(&toks, 0, 8, 4);
        assert_eq!(w[0], (vec![0], (10..18).collect::<Vec<_>>()));
        assert_eq!(
            w[1],
            ((14..18).collect::<Vec<_>>(), (18..22).collect::<Vec<_>>())
        );
        let scored: Vec<u32> = w.iter().flat_map(|p| p.1.clone()).collect();
        assert_eq!(scored, toks);
        // Every window (context + scored) spans at most 8 tokens.
        assert!(w.iter().skip(1).all(|(c, s)| c.len() + s.len() <= 8));
        // The last, shorter step keeps a full window of context.
        let w = silo_windows(&toks[..19], 0, 8, 4);
        let last = w.last().unwrap();
        assert_eq!(last.0, (21..26).collect::<Vec<u32>>());
        assert_eq!(last.1, (26..29).collect::<Vec<u32>>());
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0]);
        let s: f64 = lp.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
    }
}
