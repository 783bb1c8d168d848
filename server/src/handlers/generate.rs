//! `POST /v1/completions` and `/v1/chat/completions`, answered whole (streaming: `stream.rs`).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::generate::{FinishReason, GenParams, Generation, TokenLogprob};
use engine::ExpertMask;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{self, ApiError, ChatRequest, CompletionRequest, Prompt};
use crate::retrieval;
use crate::worker::{self, Event, Job};
use crate::AppState;
use harness::retrieval::KnnPicker;

use super::stream::{StreamKind, StreamOut};
use super::{respond, Shared};

pub(super) fn finish_reason(g: &Generation) -> &'static str {
    match g.finish {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
}

/// What one prompt of a request needs besides its tokens.
pub(super) struct JobSpec {
    pub(super) params: GenParams,
    pub(super) mask: Option<ExpertMask>,
    pub(super) logprobs: Option<usize>,
    pub(super) prompt_logprobs: bool,
    pub(super) deadline: Instant,
}

/// A queued job, its event stream and, for kNN-LM, the picker that holds its sources.
type KnnJob = (Job, mpsc::UnboundedReceiver<Event>, Option<Arc<KnnPicker>>);

/// A job for `prompt`, decoded through a kNN-LM picker when `knn` is given (the picker is returned
/// for its sources).
pub(super) fn knn_job(
    prompt: Vec<u32>,
    spec: &JobSpec,
    knn: Option<(&Arc<datastore::Datastore>, retrieval::Knn)>,
) -> Result<KnnJob, ApiError> {
    let (mut j, rx) = job(prompt, spec);
    let picker = match knn {
        Some((store, k)) => Some(retrieval::knn_picker(store, k)?),
        None => None,
    };
    j.picker = picker
        .clone()
        .map(|p| engine::generate::Picker(p as Arc<dyn engine::generate::TokenPicker>));
    Ok((j, rx, picker))
}

pub(super) fn job(prompt: Vec<u32>, spec: &JobSpec) -> (Job, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Job {
            prompt,
            params: spec.params.clone(),
            mask: spec.mask.clone(),
            logprobs: spec.logprobs,
            prompt_logprobs: spec.prompt_logprobs,
            picker: None,
            deadline: spec.deadline,
            events: tx,
        },
        rx,
    )
}

pub async fn completions(State(s): Shared, body: Bytes) -> Response {
    let r = s.clone().completions(&body).await;
    respond(&s, "completions", r)
}

pub async fn chat_completions(State(s): Shared, body: Bytes) -> Response {
    let r = s.clone().chat(&body).await;
    respond(&s, "chat_completions", r)
}

impl AppState {
    pub(super) async fn completions(self: Arc<Self>, body: &[u8]) -> Result<Response, ApiError> {
        let req: CompletionRequest = api::parse(body)?;
        self.check_model(&req.model)?;
        let ext = req.moeval.unwrap_or_default();
        let choice = self.mask_for(&ext)?;
        let sampling = req.sampling.check(self.settings.max_tokens)?;
        if let Some(n) = req.logprobs {
            if n > api::MAX_LOGPROBS {
                return Err(ApiError::param(
                    "logprobs",
                    format!("logprobs must be at most {}", api::MAX_LOGPROBS),
                ));
            }
        }
        let echo = req.echo.unwrap_or(false);
        let max_tokens = sampling.max_tokens.unwrap_or(16);
        // (token ids, the prompt's text when the client sent text)
        let prompts: Vec<(Vec<u32>, Option<String>)> = match req.prompt {
            Prompt::Text(t) => vec![(self.encode(&t)?, Some(t))],
            Prompt::Texts(ts) => ts
                .into_iter()
                .map(|t| Ok((self.encode(&t)?, Some(t))))
                .collect::<Result<_, ApiError>>()?,
            Prompt::Tokens(ids) => vec![(ids, None)],
            Prompt::TokenLists(l) => l.into_iter().map(|ids| (ids, None)).collect(),
        };
        if prompts.is_empty() || prompts.iter().any(|p| p.0.is_empty()) {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        if prompts.len() > self.settings.max_queue {
            return Err(ApiError::param(
                "prompt",
                format!("at most {} prompts per request", self.settings.max_queue),
            ));
        }
        for p in &prompts {
            self.check_prompt(&p.0, max_tokens)?;
        }
        if sampling.stream && (prompts.len() != 1 || echo) {
            return Err(ApiError::param(
                "stream",
                "streaming supports one prompt without echo",
            ));
        }
        let retrieval = self.retrieval_for(
            &ext,
            sampling.temperature == 0.0,
            req.logprobs.is_some(),
            sampling.stream,
        )?;
        let retrieved = match &retrieval {
            Some((retrieval::Mode::Ric(ric), store)) => {
                let ids = prompts.iter().map(|p| p.0.clone()).collect();
                self.retrieve_all(*ric, store, ids, max_tokens).await?
            }
            _ => Vec::new(),
        };
        let knn = match &retrieval {
            Some((retrieval::Mode::Knn(k), store)) => Some((store, *k)),
            _ => None,
        };
        let mut report = json!({"effective_mask": choice.report});
        if let Some((retrieval::Mode::Ric(ric), store)) = &retrieval {
            report["retrieval"] = retrieval::report(store, *ric, &retrieved);
        }
        // Tokens put before each prompt: never echoed nor scored.
        let prefix_len = |i: usize| -> usize {
            retrieved
                .get(i)
                .map_or(0, |r: &retrieval::Retrieved| r.tokens.len())
        };
        let spec = JobSpec {
            params: GenParams {
                max_new_tokens: max_tokens,
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                seed: sampling.seed,
                stop: sampling.stop.clone(),
                stop_at_eos: !ext.ignore_eos,
                ..GenParams::default()
            },
            mask: choice.mask,
            logprobs: req.logprobs,
            prompt_logprobs: echo && req.logprobs.is_some(),
            deadline: Instant::now() + self.settings.timeout,
        };
        let mut rxs = Vec::with_capacity(prompts.len());
        let mut pickers = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let mut ids = retrieved.get(i).map_or_else(Vec::new, |r| r.tokens.clone());
            ids.extend_from_slice(&p.0);
            let (j, rx, picker) = knn_job(ids, &spec, knn)?;
            self.submit(j)?;
            rxs.push(rx);
            pickers.extend(picker);
        }
        let id = self.id("cmpl");
        if sampling.stream {
            let rx = rxs.pop().ok_or_else(|| ApiError::internal("no job"))?;
            let out = StreamOut {
                kind: StreamKind::Completion,
                id,
                report,
                logprobs: req.logprobs.is_some(),
                usage: sampling.include_usage.then_some(prompts[0].0.len()),
            };
            return Ok(self.stream(rx, out, spec));
        }
        let mut choices = Vec::with_capacity(prompts.len());
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for (index, ((ids, text), rx)) in prompts.into_iter().zip(rxs.iter_mut()).enumerate() {
            let got = worker::collect(rx, spec.deadline).await?;
            let g = got
                .generation
                .ok_or_else(|| ApiError::internal("no result"))?;
            prompt_tokens += ids.len();
            completion_tokens += g.tokens.len();
            let mut out_text = String::new();
            if echo {
                match text {
                    Some(t) => out_text.push_str(&t),
                    None => out_text.push_str(
                        &self
                            .tokenizer()?
                            .decode(&ids)
                            .map_err(|e| ApiError::internal(e.to_string()))?,
                    ),
                }
            }
            out_text.push_str(&g.text);
            let logprobs = req.logprobs.map(|_| {
                let mut lp = LogprobsBuilder::default();
                if echo {
                    lp.push(&self, ids[0], None, None);
                    // Entries for the retrieved tokens (and for the prompt's first token after
                    // them) are skipped: only the prompt's own tokens 1.. are scored.
                    for t in got.prompt_logprobs.iter().flatten().skip(prefix_len(index)) {
                        lp.push(&self, t.token, Some(t.logprob), Some(&t.top));
                    }
                }
                // Every generated token, an EOS that ended the sequence included (as vLLM): clients
                // such as lm-evaluation-harness drop the last entry as the generated one.
                for t in &got.tokens {
                    lp.push(&self, t.token, Some(t.logprob), Some(&t.top));
                }
                lp.into_json()
            });
            choices.push(json!({
                "index": index, "text": out_text, "logprobs": logprobs,
                "finish_reason": finish_reason(&g),
            }));
        }
        if let Some((store, k)) = knn {
            let sources: Vec<_> = pickers.iter().map(|p| p.take_sources()).collect();
            report["retrieval"] = retrieval::knn_report(store, k, &sources);
        }
        Ok(Json(json!({
            "id": id, "object": "text_completion", "created": unix_now(), "model": self.settings.name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "moeval": report,
        }))
        .into_response())
    }

    pub(super) async fn chat(self: Arc<Self>, body: &[u8]) -> Result<Response, ApiError> {
        let req: ChatRequest = api::parse(body)?;
        self.check_model(&req.model)?;
        let template = self.chat.as_ref().ok_or_else(|| {
            ApiError::invalid(
                "this model has no chat template (tokenizer_config.json has no `chat_template`); \
                 use /v1/completions or start the server with --chat-template FILE",
            )
        })?;
        if req.messages.is_empty() {
            return Err(ApiError::param("messages", "messages must not be empty"));
        }
        let ext = req.moeval.unwrap_or_default();
        let choice = self.mask_for(&ext)?;
        let mut sampling = req.sampling;
        if req.max_completion_tokens.is_some() {
            sampling.max_tokens = req.max_completion_tokens;
        }
        let sampling = sampling.check(self.settings.max_tokens)?;
        let top = req.top_logprobs.unwrap_or(0);
        if top > api::MAX_LOGPROBS {
            return Err(ApiError::param(
                "top_logprobs",
                format!("top_logprobs must be at most {}", api::MAX_LOGPROBS),
            ));
        }
        let logprobs = req.logprobs.unwrap_or(false).then_some(top);
        let messages: Vec<(String, String)> = req
            .messages
            .iter()
            .map(|m| Ok((m.role.clone(), m.text()?)))
            .collect::<Result<_, ApiError>>()?;
        let text = template
            .render(&messages)
            .map_err(|e| ApiError::param("messages", e))?;
        let ids = self.encode(&text)?;
        let context = self.model.config().max_position_embeddings;
        let max_tokens = sampling.max_tokens.unwrap_or_else(|| {
            context
                .saturating_sub(ids.len())
                .min(self.settings.max_tokens)
        });
        self.check_prompt(&ids, max_tokens)?;
        let retrieval = self.retrieval_for(
            &ext,
            sampling.temperature == 0.0,
            logprobs.is_some(),
            sampling.stream,
        )?;
        let knn = match &retrieval {
            Some((retrieval::Mode::Knn(k), store)) => Some((store, *k)),
            _ => None,
        };
        let mut report = json!({"effective_mask": choice.report});
        let mut full = ids.clone();
        if let Some((retrieval::Mode::Ric(ric), store)) = &retrieval {
            let got = self
                .retrieve_all(*ric, store, vec![ids.clone()], max_tokens)
                .await?;
            report["retrieval"] = retrieval::report(store, *ric, &got);
            full = got.into_iter().flat_map(|r| r.tokens).collect();
            full.extend_from_slice(&ids);
        }
        let spec = JobSpec {
            params: GenParams {
                max_new_tokens: max_tokens,
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                seed: sampling.seed,
                stop: sampling.stop.clone(),
                stop_at_eos: !ext.ignore_eos,
                ..GenParams::default()
            },
            mask: choice.mask,
            logprobs,
            prompt_logprobs: false,
            deadline: Instant::now() + self.settings.timeout,
        };
        let (j, mut rx, picker) = knn_job(full, &spec, knn)?;
        self.submit(j)?;
        let id = self.id("chatcmpl");
        if sampling.stream {
            let out = StreamOut {
                kind: StreamKind::Chat,
                id,
                report,
                logprobs: logprobs.is_some(),
                usage: sampling.include_usage.then_some(ids.len()),
            };
            return Ok(self.stream(rx, out, spec));
        }
        let got = worker::collect(&mut rx, spec.deadline).await?;
        let g = got
            .generation
            .ok_or_else(|| ApiError::internal("no result"))?;
        let lp = logprobs.map(|_| {
            json!({"content": got.tokens.iter().take(g.tokens.len())
                .map(|t| self.chat_logprob(t)).collect::<Vec<_>>()})
        });
        if let (Some((store, k)), Some(p)) = (knn, picker) {
            report["retrieval"] = retrieval::knn_report(store, k, &[p.take_sources()]);
        }
        Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": unix_now(), "model": self.settings.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                         "logprobs": lp, "finish_reason": finish_reason(&g)}],
            "usage": {"prompt_tokens": ids.len(), "completion_tokens": g.tokens.len(),
                      "total_tokens": ids.len() + g.tokens.len()},
            "moeval": report,
        }))
        .into_response())
    }

    pub(super) fn chat_logprob(&self, t: &TokenLogprob) -> Value {
        let entry = |tok: u32, lp: f32| {
            let s = self.token_text(tok);
            // A token holding part of a UTF-8 character decodes to U+FFFD; its own bytes are exact.
            let bytes = self
                .token_bytes
                .get(&tok)
                .cloned()
                .unwrap_or_else(|| s.as_bytes().to_vec());
            json!({"token": s, "logprob": lp, "bytes": bytes})
        };
        let mut v = entry(t.token, t.logprob);
        v["top_logprobs"] = Value::Array(t.top.iter().map(|&(k, lp)| entry(k, lp)).collect());
        v
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The legacy completions `logprobs` object.
#[derive(Default)]
pub(super) struct LogprobsBuilder {
    pub(super) tokens: Vec<String>,
    pub(super) token_logprobs: Vec<Option<f32>>,
    pub(super) top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    pub(super) text_offset: Vec<usize>,
    pub(super) offset: usize,
}

impl LogprobsBuilder {
    pub(super) fn push(
        &mut self,
        s: &AppState,
        token: u32,
        lp: Option<f32>,
        top: Option<&[(u32, f32)]>,
    ) {
        let text = s.token_text(token);
        self.text_offset.push(self.offset);
        self.offset += text.len();
        self.tokens.push(text);
        self.token_logprobs.push(lp);
        self.top_logprobs.push(top.map(|top| {
            top.iter()
                .map(|&(t, lp)| (s.token_text(t), json!(lp)))
                .collect()
        }));
    }

    pub(super) fn into_json(self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }
}
