//! What every generation request goes through before it reaches the engine: the model name, the
//! expert mask (policy, opt-outs, `experts`), retrieval, tokenisation, the context limit and the queue.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::StatusCode;
use engine::ExpertMask;
use routers::{effective_mask, Policy, RouterError};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{ApiError, Extension};
use crate::retrieval;
use crate::worker::Job;
use crate::AppState;

/// A request's expert mask and the report of it that responses carry.
pub(super) struct MaskChoice {
    pub(super) mask: Option<ExpertMask>,
    pub(super) report: Value,
}

impl AppState {
    pub(super) fn policy(&self) -> Result<Policy, ApiError> {
        if let Some(file) = &self.settings.policy {
            // `--policy FILE`: read on every admission too; the admin API records changes in it.
            return Policy::load_file(file)
                .map_err(|e| ApiError::internal(format!("cannot read the policy: {e}")));
        }
        let dir = self
            .model
            .dir()
            .ok_or_else(|| ApiError::internal("the model has no directory"))?;
        // Read on every admission, so changes through the CLI or the admin API apply to the next request.
        Policy::load(dir).map_err(|e| ApiError::internal(format!("cannot read the policy: {e}")))
    }

    /// Combines the current policy, the loaded experts and the request's opt-out / allow-list.
    pub(super) fn mask_for(&self, ext: &Extension) -> Result<MaskChoice, ApiError> {
        let (Some(registry), Some(loaded)) = (self.model.registry(), self.model.loaded_experts())
        else {
            if ext.opt_out.is_empty() && ext.experts.is_empty() {
                return Ok(MaskChoice {
                    mask: None,
                    report: Value::Null,
                });
            }
            return Err(ApiError::param(
                "moeval",
                "this model is dense: it has no experts to opt out or select",
            ));
        };
        let policy = self.policy()?;
        let eff =
            effective_mask(registry, &policy, &ext.opt_out, &ext.experts).map_err(|e| match e {
                RouterError::RefusedByPolicy { .. } => {
                    ApiError::new(StatusCode::FORBIDDEN, "permission_error", e.to_string())
                }
                other => ApiError::param("moeval", other.to_string()),
            })?;
        let requested = registry
            .resolve_list(&ext.experts)
            .map_err(|e| ApiError::param("moeval.experts", e.to_string()))?;
        if let Some(&i) = requested.iter().find(|i| self.server_removed.contains(i)) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "expert `{}` is not served: the server was started without it (--opt-out / --experts)",
                    registry.name(i)
                ),
            ));
        }
        if let Some(&i) = requested.iter().find(|&&i| !loaded.is_allowed(i)) {
            return Err(ApiError::param(
                "moeval.experts",
                format!(
                    "expert `{}` was not loaded when the server started (it was opted out then); \
                     restart the server to serve it",
                    registry.name(i)
                ),
            ));
        }
        // Experts opted in after start are allowed by the policy but have no weights in memory.
        // The server's own --opt-out / --experts narrow every request (their weights are not loaded).
        let by_server: Vec<usize> = eff
            .mask
            .allowed()
            .filter(|i| self.server_removed.contains(i))
            .collect();
        let not_loaded: Vec<usize> = eff
            .mask
            .allowed()
            .filter(|&i| !loaded.is_allowed(i) && !by_server.contains(&i))
            .collect();
        let removed: Vec<usize> = eff
            .mask
            .removed()
            .chain(by_server.iter().copied())
            .chain(not_loaded.iter().copied())
            .collect();
        let mask = ExpertMask::all(registry.len())
            .without(&removed)
            .map_err(|e| ApiError::param("moeval", e.to_string()))?;
        let names = |v: &mut dyn Iterator<Item = usize>| -> Vec<String> {
            v.map(|i| registry.name(i).to_string()).collect()
        };
        let report = json!({
            "experts": names(&mut mask.allowed()),
            "opted_out_by_policy": names(&mut eff.by_policy.iter().copied()),
            "opted_out_by_request": names(&mut eff.by_request.iter().copied()),
            "opted_out_by_server": names(&mut by_server.iter().copied()),
            "not_loaded": names(&mut not_loaded.iter().copied()),
        });
        Ok(MaskChoice {
            mask: Some(mask),
            report,
        })
    }

    /// The request's retrieval settings and the store as it is now (`None`: no retrieval asked for).
    /// kNN-LM needs keys of the model's hidden size, greedy decoding and no log-probabilities (the
    /// engine reports the model's own, not the mixed distribution's).
    pub(super) fn retrieval_for(
        &self,
        ext: &Extension,
        greedy: bool,
        logprobs: bool,
        stream: bool,
    ) -> Result<Option<(retrieval::Mode, Arc<datastore::Datastore>)>, ApiError> {
        let Some(v) = &ext.retrieval else {
            return Ok(None);
        };
        let mode = retrieval::Mode::parse(v, self.store.is_some())?;
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| ApiError::internal("no datastore"))?
            .get()?;
        if let retrieval::Mode::Knn(_) = mode {
            const P: &str = "moeval.retrieval";
            let Some(knn) = store.knn() else {
                return Err(ApiError::param(
                    P,
                    "this server's datastore has no kNN-LM keys; build them with \
                     `moeval datastore knn DIR --model MODEL`, or use \"mode\": \"ric\"",
                ));
            };
            let hidden = self.model.config().hidden_size;
            if knn.dim() != hidden {
                return Err(ApiError::param(
                    P,
                    format!(
                        "the datastore's kNN keys have {} dimensions, the model's hidden states {hidden}",
                        knn.dim()
                    ),
                ));
            }
            if !greedy {
                return Err(ApiError::param(
                    "temperature",
                    "kNN-LM decodes greedily: set \"temperature\": 0",
                ));
            }
            if logprobs {
                return Err(ApiError::param(
                    "logprobs",
                    "log-probabilities are not reported with kNN-LM (they would be the model's, not \
                     the mixed distribution's); score with `moeval eval --retrieval knn`",
                ));
            }
            if stream {
                return Err(ApiError::param(
                    "stream",
                    "kNN-LM responses are not streamed: the documents behind them are known at the end",
                ));
            }
        }
        Ok(Some((mode, store)))
    }

    /// Retrieves for each (already checked) prompt; the blocks' tokens are cut from the left so that
    /// retrieved + prompt + `max_tokens` fit the context and retrieved + prompt the prompt limit.
    /// BM25 search blocks, so it runs off the async workers.
    pub(super) async fn retrieve_all(
        self: &Arc<Self>,
        ric: retrieval::Ric,
        store: &Arc<datastore::Datastore>,
        prompts: Vec<Vec<u32>>,
        max_tokens: usize,
    ) -> Result<Vec<retrieval::Retrieved>, ApiError> {
        let (app, store) = (self.clone(), store.clone());
        tokio::task::spawn_blocking(move || {
            let tok = app.tokenizer()?;
            let cfg = app.model.config();
            let limit = cfg
                .max_position_embeddings
                .saturating_sub(max_tokens)
                .min(app.settings.max_prompt_tokens);
            prompts
                .iter()
                .map(|ids| {
                    let room = limit.saturating_sub(ids.len());
                    retrieval::retrieve(&store, tok, ids, ric, room, cfg.vocab_size)
                })
                .collect()
        })
        .await
        .map_err(|e| ApiError::internal(format!("retrieval failed: {e}")))?
    }

    pub(super) fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
        match model {
            Some(m) if !m.is_empty() && *m != self.settings.name => Err(ApiError {
                param: Some("model"),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "the model `{m}` does not exist; this server serves `{}`",
                        self.settings.name
                    ),
                )
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn tokenizer(&self) -> Result<&engine::Tokenizer, ApiError> {
        self.model
            .require_tokenizer()
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let mut ids = self
            .tokenizer()?
            .encode(text)
            .map_err(|e| ApiError::param("prompt", e.to_string()))?;
        if ids.is_empty() {
            ids.push(self.prefix);
        }
        Ok(ids)
    }

    /// Checks a prompt's tokens and length against the vocabulary and the limits.
    pub(super) fn check_prompt(&self, ids: &[u32], max_tokens: usize) -> Result<(), ApiError> {
        let v = self.model.config().vocab_size as u32;
        if let Some(&t) = ids.iter().find(|&&t| t >= v) {
            return Err(ApiError::param(
                "prompt",
                format!("token id {t} is outside the vocabulary (size {v})"),
            ));
        }
        if ids.len() > self.settings.max_prompt_tokens {
            return Err(ApiError::param(
                "prompt",
                format!(
                    "the prompt has {} tokens, above this server's limit of {}",
                    ids.len(),
                    self.settings.max_prompt_tokens
                ),
            ));
        }
        let context = self.model.config().max_position_embeddings;
        if ids.len() + max_tokens > context {
            return Err(ApiError::param(
                "max_tokens",
                format!(
                    "this model's maximum context length is {context} tokens; the request asks for {} \
                     ({} in the prompt, {max_tokens} for the completion)",
                    ids.len() + max_tokens,
                    ids.len()
                ),
            ));
        }
        Ok(())
    }

    /// Queues one job; 429 when the queue is full.
    pub(super) fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        format!(
                            "the server is busy: {} requests are already waiting; retry later",
                            self.settings.max_queue
                        ),
                    ),
                    mpsc::error::TrySendError::Closed(_) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "the server is shutting down",
                    ),
                })
            }
        }
    }

    pub(super) fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    pub(super) fn token_text(&self, t: u32) -> String {
        self.model
            .tokenizer()
            .and_then(|tok| tok.decode(&[t]).ok())
            .unwrap_or_default()
    }
}
