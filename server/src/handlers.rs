//! HTTP handlers: requests become engine jobs, engine events become OpenAI-shaped responses.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::generate::{FinishReason, GenParams, Generation, TokenLogprob};
use engine::ExpertMask;
use routers::{effective_mask, Action, Policy, RouterError};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Extension, Prompt};
use super::retrieval;
use super::worker::{self, Event, Job};
use super::AppState;

type Shared = State<Arc<AppState>>;

/// Counts the response in the metrics and sends it.
fn respond(s: &AppState, endpoint: &'static str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    s.metrics.count_request(endpoint, resp.status().as_u16());
    resp
}

/// Largest request body, as OpenAI's and vLLM's servers accept by default.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// Reads every request's body before routing: within `--read-timeout-secs` (408 otherwise, so a slow
/// client cannot hold a connection open forever) and at most [`MAX_BODY`] bytes (413), both errors in
/// OpenAI's shape.
pub async fn read_body(
    State(s): Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use futures_util::StreamExt;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {MAX_BODY} bytes"),
        )
        .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(s.settings.read_timeout, async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if buf.len() + chunk.len() > MAX_BODY {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok::<_, String>(true)
    })
    .await;
    match read {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return too_large(),
        Ok(Err(e)) => {
            return ApiError::invalid(format!("cannot read the request body: {e}")).into_response()
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "the request body did not arrive within the server's --read-timeout-secs",
            )
            .into_response()
        }
    }
    next.run(axum::extract::Request::from_parts(parts, buf.into()))
        .await
}

/// With `--api-key`, the /v1 endpoints need `Authorization: Bearer KEY` (401 otherwise).
pub async fn require_api_key(
    State(s): Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use sha2::Digest;
    let Some(want) = &s.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Digests of equal length compared in full, so timing does not tell how much of the key matched.
    let ok = given.is_some_and(|g| {
        let got: [u8; 32] = sha2::Sha256::digest(g.as_bytes()).into();
        got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if ok {
        return next.run(req).await;
    }
    let mut r = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "this server needs an API key: send `Authorization: Bearer KEY`",
    )
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this endpoint does not accept that method",
    )
}

impl AppState {
    fn model_card(&self) -> Value {
        json!({
            "id": self.settings.name, "object": "model", "created": self.created, "owned_by": "moeval",
            "max_model_len": self.model.config().max_position_embeddings,
        })
    }
}

pub async fn models(State(s): Shared) -> Json<Value> {
    Json(json!({"object": "list", "data": [s.model_card()]}))
}

/// `GET /v1/models/{id}`.
pub async fn model(State(s): Shared, Path(id): Path<String>) -> Response {
    let r = s
        .check_model(&Some(id))
        .map(|()| Json(s.model_card()).into_response());
    respond(&s, "models", r)
}

/// Names, owners, domains and current policy status of every expert.
pub async fn experts(State(s): Shared) -> Response {
    let r = (|| {
        let Some(registry) = s.model.registry() else {
            return Ok(Json(json!({"object": "list", "data": []})).into_response());
        };
        let policy = s.policy()?;
        let loaded = s.model.loaded_experts();
        let data: Vec<Value> = registry
            .experts()
            .iter()
            .map(|e| {
                let out = policy.opted_out().iter().find(|p| p.expert == e.name);
                json!({
                    "index": e.index, "name": e.name, "owner": e.owner, "domain": e.domain,
                    "description": e.description,
                    "status": if out.is_some() { "opted-out" } else { "active" },
                    "reason": out.map(|o| &o.reason), "since": out.map(|o| &o.since),
                    "loaded": loaded.is_some_and(|m| m.is_allowed(e.index)),
                })
            })
            .collect();
        Ok(Json(json!({"object": "list", "data": data})).into_response())
    })();
    respond(&s, "experts", r)
}

pub async fn metrics(State(s): Shared) -> Response {
    let m = &s.metrics;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let mut reqs: Vec<((&str, u16), u64)> = m
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect();
    reqs.sort();
    metric(
        "moeval_requests_total",
        "counter",
        "HTTP responses by endpoint and status code.",
        reqs.into_iter()
            .map(|((e, c), n)| (format!("{{endpoint=\"{e}\",code=\"{c}\"}}"), n as f64))
            .collect(),
    );
    let plain = |v: f64| vec![(String::new(), v)];
    let generated = m.generated_tokens.load(Ordering::Relaxed);
    let busy = m.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
    metric(
        "moeval_prompt_tokens_total",
        "counter",
        "Prompt tokens admitted to the engine.",
        plain(m.prompt_tokens.load(Ordering::Relaxed) as f64),
    );
    metric(
        "moeval_generation_tokens_total",
        "counter",
        "Tokens generated.",
        plain(generated as f64),
    );
    metric(
        "moeval_generation_tokens_per_second",
        "gauge",
        "Tokens generated per second of engine time since start.",
        plain(if busy > 0.0 {
            generated as f64 / busy
        } else {
            0.0
        }),
    );
    metric(
        "moeval_engine_busy_seconds_total",
        "counter",
        "Seconds the engine spent in decode steps.",
        plain(busy),
    );
    metric(
        "moeval_decode_steps_total",
        "counter",
        "Decode steps (one forward pass over the running batch each).",
        plain(m.steps.load(Ordering::Relaxed) as f64),
    );
    metric(
        "moeval_queue_depth",
        "gauge",
        "Requests waiting for a batch slot.",
        plain(m.queued.load(Ordering::Relaxed) as f64),
    );
    metric(
        "moeval_running_sequences",
        "gauge",
        "Sequences in the running batch.",
        plain(m.running.load(Ordering::Relaxed) as f64),
    );
    metric(
        "moeval_cancelled_total",
        "counter",
        "Sequences cancelled because their client went away.",
        plain(m.cancelled.load(Ordering::Relaxed) as f64),
    );
    metric(
        "moeval_timeouts_total",
        "counter",
        "Sequences that ran past the request timeout.",
        plain(m.timeouts.load(Ordering::Relaxed) as f64),
    );
    if let Some(registry) = s.model.registry() {
        let routed = m.routed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        metric(
            "moeval_expert_routed_tokens_total",
            "counter",
            "Tokens routed to each expert, counted once per MoE layer.",
            registry
                .experts()
                .iter()
                .map(|e| {
                    let n = routed.get(e.index).copied().unwrap_or(0);
                    (
                        format!("{{expert=\"{}\"}}", escape_label(&e.name)),
                        n as f64,
                    )
                })
                .collect(),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A request's expert mask and the report of it that responses carry.
struct MaskChoice {
    mask: Option<ExpertMask>,
    report: Value,
}

impl AppState {
    fn policy(&self) -> Result<Policy, ApiError> {
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
    fn mask_for(&self, ext: &Extension) -> Result<MaskChoice, ApiError> {
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

    /// The request's RIC-LM settings and the store as it is now (`None`: no retrieval asked for).
    fn retrieval_for(
        &self,
        ext: &Extension,
    ) -> Result<Option<(retrieval::Ric, Arc<datastore::Datastore>)>, ApiError> {
        let Some(v) = &ext.retrieval else {
            return Ok(None);
        };
        let ric = retrieval::Ric::parse(v, self.store.is_some())?;
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| ApiError::internal("no datastore"))?
            .get()?;
        Ok(Some((ric, store)))
    }

    /// Retrieves for each (already checked) prompt; the blocks' tokens are cut from the left so that
    /// retrieved + prompt + `max_tokens` fit the context and retrieved + prompt the prompt limit.
    /// BM25 search blocks, so it runs off the async workers.
    async fn retrieve_all(
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

    fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
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

    fn tokenizer(&self) -> Result<&engine::Tokenizer, ApiError> {
        self.model
            .require_tokenizer()
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
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
    fn check_prompt(&self, ids: &[u32], max_tokens: usize) -> Result<(), ApiError> {
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
    fn submit(&self, job: Job) -> Result<(), ApiError> {
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

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn token_text(&self, t: u32) -> String {
        self.model
            .tokenizer()
            .and_then(|tok| tok.decode(&[t]).ok())
            .unwrap_or_default()
    }
}

fn finish_reason(g: &Generation) -> &'static str {
    match g.finish {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
}

/// What one prompt of a request needs besides its tokens.
struct JobSpec {
    params: GenParams,
    mask: Option<ExpertMask>,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
    deadline: Instant,
}

fn job(prompt: Vec<u32>, spec: &JobSpec) -> (Job, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Job {
            prompt,
            params: spec.params.clone(),
            mask: spec.mask.clone(),
            logprobs: spec.logprobs,
            prompt_logprobs: spec.prompt_logprobs,
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
    async fn completions(self: Arc<Self>, body: &[u8]) -> Result<Response, ApiError> {
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
        let retrieval = self.retrieval_for(&ext)?;
        let retrieved = match &retrieval {
            Some((ric, store)) => {
                let ids = prompts.iter().map(|p| p.0.clone()).collect();
                self.retrieve_all(*ric, store, ids, max_tokens).await?
            }
            None => Vec::new(),
        };
        let mut report = json!({"effective_mask": choice.report});
        if let Some((ric, store)) = &retrieval {
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
        for (i, p) in prompts.iter().enumerate() {
            let mut ids = retrieved.get(i).map_or_else(Vec::new, |r| r.tokens.clone());
            ids.extend_from_slice(&p.0);
            let (j, rx) = job(ids, &spec);
            self.submit(j)?;
            rxs.push(rx);
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
        Ok(Json(json!({
            "id": id, "object": "text_completion", "created": unix_now(), "model": self.settings.name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "moeval": report,
        }))
        .into_response())
    }

    async fn chat(self: Arc<Self>, body: &[u8]) -> Result<Response, ApiError> {
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
        let retrieval = self.retrieval_for(&ext)?;
        let mut report = json!({"effective_mask": choice.report});
        let mut full = ids.clone();
        if let Some((ric, store)) = &retrieval {
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
        let (j, mut rx) = job(full, &spec);
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

    fn chat_logprob(&self, t: &TokenLogprob) -> Value {
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The legacy completions `logprobs` object.
#[derive(Default)]
struct LogprobsBuilder {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    text_offset: Vec<usize>,
    offset: usize,
}

impl LogprobsBuilder {
    fn push(&mut self, s: &AppState, token: u32, lp: Option<f32>, top: Option<&[(u32, f32)]>) {
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

    fn into_json(self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }
}

#[derive(Clone, Copy, PartialEq)]
enum StreamKind {
    Completion,
    Chat,
}

/// Turns generated tokens into text deltas. Text that could still turn out to begin a stop string, or
/// that ends in an unfinished UTF-8 character, is held back until it is certain; text from a stop string
/// on is never sent.
pub struct TextDelta {
    tokens: Vec<u32>,
    sent: usize,
    hold: usize,
    stop: Vec<String>,
}

impl TextDelta {
    pub fn new(stop: &[String]) -> Self {
        Self {
            tokens: Vec::new(),
            sent: 0,
            hold: stop.iter().map(|s| s.len()).max().unwrap_or(1) - 1,
            stop: stop.to_vec(),
        }
    }

    pub fn push(&mut self, text_of: impl Fn(&[u32]) -> String, token: u32) -> String {
        self.tokens.push(token);
        let text = text_of(&self.tokens);
        // The token that completes a stop string arrives before the engine reports the stop.
        let mut end = match self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            Some(cut) => cut,
            None => text.len().saturating_sub(self.hold),
        };
        while end > 0 && !text.is_char_boundary(end) {
            end -= 1;
        }
        // A trailing U+FFFD may be a character whose remaining bytes come with the next token; a U+FFFD
        // followed by other text is final.
        if end == text.len() {
            end = text.trim_end_matches('\u{FFFD}').len();
        }
        if end <= self.sent || !text.is_char_boundary(self.sent) {
            return String::new();
        }
        let out = text[self.sent..end].to_string();
        self.sent = end;
        out
    }

    /// The rest of the final text.
    pub fn finish(&mut self, final_text: &str) -> String {
        let out = final_text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = final_text.len().max(self.sent);
        out
    }
}

/// How a stream's chunks look.
struct StreamOut {
    kind: StreamKind,
    id: String,
    /// The `moeval` object of the last chunk.
    report: Value,
    /// Chunks carry the log-probabilities of their tokens.
    logprobs: bool,
    /// `stream_options.include_usage`: the prompt's token count, for the usage chunk.
    usage: Option<usize>,
}

struct StreamState {
    app: Arc<AppState>,
    rx: mpsc::UnboundedReceiver<Event>,
    out: StreamOut,
    deadline: Instant,
    delta: TextDelta,
    /// Tokens whose log-probabilities have not gone out yet (they ride with the next text).
    tokens: Vec<TokenLogprob>,
    /// Length of the text sent so far (the completions `text_offset` of the next token).
    offset: usize,
    pending: VecDeque<String>,
    ended: bool,
}

impl StreamState {
    fn chunk(&mut self, text: Option<&str>, finish: Option<&str>, first: bool) -> String {
        let tokens = std::mem::take(&mut self.tokens);
        let logprobs = match (self.out.logprobs, self.out.kind) {
            (false, _) => Value::Null,
            (true, StreamKind::Completion) => {
                let mut lp = LogprobsBuilder {
                    offset: self.offset,
                    ..LogprobsBuilder::default()
                };
                for t in &tokens {
                    lp.push(&self.app, t.token, Some(t.logprob), Some(&t.top));
                }
                lp.into_json()
            }
            (true, StreamKind::Chat) => json!({"content": tokens.iter()
                .map(|t| self.app.chat_logprob(t)).collect::<Vec<_>>()}),
        };
        self.offset += text.map_or(0, str::len);
        let out = &self.out;
        let base = |object: &str, choice: Value| {
            json!({"id": out.id, "object": object, "created": unix_now(),
                   "model": self.app.settings.name, "choices": [choice]})
        };
        let mut v = match out.kind {
            StreamKind::Completion => base(
                "text_completion",
                json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": logprobs,
                       "finish_reason": finish}),
            ),
            StreamKind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                base(
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}),
                )
            }
        };
        if out.usage.is_some() {
            // As OpenAI: every chunk has `usage: null` but the last, which has only the counts.
            v["usage"] = Value::Null;
        }
        if finish.is_some() {
            // The whole `moeval` object: the effective mask, and retrieval's sources when on.
            v["moeval"] = out.report.clone();
        }
        v.to_string()
    }

    fn usage_chunk(&self, completion_tokens: usize) -> Option<String> {
        let prompt_tokens = self.out.usage?;
        let object = match self.out.kind {
            StreamKind::Completion => "text_completion",
            StreamKind::Chat => "chat.completion.chunk",
        };
        Some(
            json!({"id": self.out.id, "object": object, "created": unix_now(),
                   "model": self.app.settings.name, "choices": [],
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}})
            .to_string(),
        )
    }

    async fn next_lines(&mut self) {
        let grace = tokio::time::Instant::from_std(self.deadline);
        let ev = match tokio::time::timeout_at(grace, self.rx.recv()).await {
            Err(_) => Event::Failed {
                timeout: true,
                message: String::new(),
            },
            Ok(None) => Event::Failed {
                timeout: false,
                message: "the engine stopped".into(),
            },
            Ok(Some(ev)) => ev,
        };
        match ev {
            Event::Prompt(_) => {}
            Event::Token(t) => {
                let tok = self.app.model.tokenizer();
                let text = self.delta.push(
                    |ids| tok.and_then(|k| k.decode(ids).ok()).unwrap_or_default(),
                    t.token,
                );
                self.tokens.push(t);
                if !text.is_empty() {
                    let line = self.chunk(Some(&text), None, false);
                    self.pending.push_back(line);
                }
            }
            Event::Done(g) => {
                if self.out.kind == StreamKind::Chat {
                    // Chat log-probabilities cover the content's tokens, not the EOS that ended it.
                    let sent = self.delta.tokens.len() - self.tokens.len();
                    self.tokens.truncate(g.tokens.len().saturating_sub(sent));
                }
                let rest = self.delta.finish(&g.text);
                if !rest.is_empty() || !self.tokens.is_empty() {
                    let line = self.chunk(Some(&rest), None, false);
                    self.pending.push_back(line);
                }
                let line = self.chunk(None, Some(finish_reason(&g)), false);
                self.pending.push_back(line);
                if let Some(line) = self.usage_chunk(g.tokens.len()) {
                    self.pending.push_back(line);
                }
                self.pending.push_back("[DONE]".into());
                self.ended = true;
            }
            Event::Failed { timeout, message } => {
                let e = if timeout {
                    worker::timeout_error()
                } else {
                    ApiError::internal(message)
                };
                self.pending.push_back(e.body().to_string());
                self.pending.push_back("[DONE]".into());
                self.ended = true;
            }
        }
    }
}

impl AppState {
    /// Server-sent events: one chunk per text delta (with its tokens' log-probabilities when asked), a
    /// final chunk with the finish reason and the effective mask, a usage chunk when asked, then
    /// `[DONE]`. Dropping the stream (client gone) drops the receiver, which cancels the sequence.
    fn stream(
        self: Arc<Self>,
        rx: mpsc::UnboundedReceiver<Event>,
        out: StreamOut,
        spec: JobSpec,
    ) -> Response {
        let kind = out.kind;
        let mut st = StreamState {
            app: self,
            rx,
            out,
            deadline: spec.deadline,
            delta: TextDelta::new(&spec.params.stop),
            tokens: Vec::new(),
            offset: 0,
            pending: VecDeque::new(),
            ended: false,
        };
        if kind == StreamKind::Chat {
            let first = st.chunk(None, None, true);
            st.pending.push_back(first);
        }
        let stream = futures_util::stream::unfold(st, |mut st| async move {
            while st.pending.is_empty() && !st.ended {
                st.next_lines().await;
            }
            let line = st.pending.pop_front()?;
            Some((Ok::<_, Infallible>(SseEvent::default().data(line)), st))
        });
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}

/// `POST /admin/experts/{name}/opt-out` and `/opt-in`, body `{"reason": "..."}` (optional).
pub async fn admin(
    State(s): Shared,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = s.admin_change(&name, &action, &headers, &body);
    respond(&s, "admin", r)
}

impl AppState {
    fn admin_change(
        &self,
        name: &str,
        action: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Response, ApiError> {
        let Some(tokens) = &self.admin else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "the admin API is off; start the server with --admin-tokens FILE",
            ));
        };
        let action = match action {
            "opt-out" => Action::OptOut,
            "opt-in" => Action::OptIn,
            _ => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "no such endpoint: use /admin/experts/{name}/opt-out or /opt-in",
                ))
            }
        };
        let unauthorized = |m: &str| {
            let mut r =
                ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", m).into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Ok(r)
        };
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return unauthorized("send the owner's token as `Authorization: Bearer TOKEN`");
        };
        let Some(owner) = tokens.owner_of(token.trim()) else {
            return unauthorized("the bearer token is not valid");
        };
        let registry = self.model.registry().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "this model is dense: it has no experts",
            )
        })?;
        let index = registry.resolve(name).map_err(|e| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                e.to_string(),
            )
        })?;
        let info = &registry.experts()[index];
        if info.owner.as_deref() != Some(owner) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "owner `{owner}` does not own expert `{}`; an owner can change only its own experts",
                    info.name
                ),
            ));
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct ChangeBody {
            #[serde(default)]
            reason: String,
        }
        let change: ChangeBody = if body.iter().all(u8::is_ascii_whitespace) {
            ChangeBody::default()
        } else {
            api::parse(body)?
        };
        let _guard = self.policy_write.lock().unwrap_or_else(|p| p.into_inner());
        let mut policy = self.policy()?;
        let reason = if change.reason.is_empty() {
            format!("by {owner} through the admin API")
        } else {
            change.reason
        };
        let actor = format!("admin:{owner}");
        let record = policy
            .record(routers::Decision {
                expert: &info.name,
                owner,
                actor: &actor,
                action,
                reason: &reason,
            })
            .map_err(|e| match e {
                RouterError::Invalid(m) => {
                    ApiError::new(StatusCode::CONFLICT, "invalid_request_error", m)
                }
                other => ApiError::internal(other.to_string()),
            })?;
        let loaded = self
            .model
            .loaded_experts()
            .is_some_and(|m| m.is_allowed(index));
        Ok(Json(json!({
            "expert": record.expert, "action": record.action, "time": record.time,
            "reason": record.reason, "owner": owner,
            "applies_to": "requests admitted from now on",
            "loaded": loaded,
            "note": if action == Action::OptIn && !loaded {
                Some("the expert's weights were not loaded at start; restart the server to serve it")
            } else { None },
        }))
        .into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::TextDelta;

    #[test]
    fn deltas_hold_back_possible_stop_strings() {
        // Each "token" is one character of this text.
        let text = "ab\nc";
        let decode = |ids: &[u32]| {
            ids.iter()
                .map(|&i| &text[i as usize..i as usize + 1])
                .collect()
        };
        let mut d = TextDelta::new(&["\nc".into()]);
        let mut out = String::new();
        for i in 0..3 {
            out.push_str(&d.push(decode, i));
        }
        // "\n" may begin the stop string: held back.
        assert_eq!(out, "ab");
        out.push_str(&d.finish("ab"));
        assert_eq!(out, "ab");
        let mut d = TextDelta::new(&[]);
        let mut out: String = (0..4).map(|i| d.push(decode, i)).collect();
        out.push_str(&d.finish(text));
        assert_eq!(out, text);
    }

    #[test]
    fn a_completed_stop_string_never_leaks_its_first_character() {
        let text = "ab\nc";
        let decode = |ids: &[u32]| {
            ids.iter()
                .map(|&i| &text[i as usize..i as usize + 1])
                .collect()
        };
        let mut d = TextDelta::new(&["\nc".into()]);
        // The token completing the stop string arrives before the engine's stop.
        let out: String = (0..4).map(|i| d.push(decode, i)).collect();
        assert_eq!(out, "ab");
    }

    #[test]
    fn only_a_trailing_replacement_character_is_held_back() {
        // Token 1 is the first byte of a two-byte character that token 2 completes; token 0 holds a
        // U+FFFD for good.
        let decode = |ids: &[u32]| match ids.len() {
            1 => "x\u{FFFD}y".to_string(),
            2 => "x\u{FFFD}yz\u{FFFD}".to_string(),
            _ => "x\u{FFFD}yzé!".to_string(),
        };
        let mut d = TextDelta::new(&[]);
        assert_eq!(d.push(decode, 0), "x\u{FFFD}y");
        assert_eq!(d.push(decode, 1), "z");
        assert_eq!(d.push(decode, 2), "é!");
    }
}
