//! An OpenAI-compatible HTTP server over one engine model (`moeval serve`), with per-request expert
//! opt-out, the owners' policy enforced on every request, an owners' admin API, and continuous batching.
//! Start it with [`Server::start`] (a [`Settings`] and a loaded model); tests do the same in-process.
//!
//! Invariants: one client can never fail another's request (a failing request fails alone, queues and
//! connections are bounded); an expert opted out by its owner or the server is never used, whatever a
//! request asks; the policy is re-read at every admission, so an admin opt-out holds from the next
//! request on.
//!
//! Layout: `api` parses and validates bodies, `worker` is the engine loop (one thread owning the
//! decoder), `handlers` turns requests into jobs and jobs into OpenAI responses (one file per endpoint family), `chat` renders chat
//! templates, `admin` checks owners' tokens, `retrieval` runs RIC-LM over `--datastore`, `token_bytes` gives
//! tokens' raw bytes for log-probabilities, `client` is a tiny loopback HTTP client, `bench` the loopback load test (`moeval serve-bench`).

pub mod admin;
pub mod api;
pub mod bench;
pub mod chat;
pub mod client;
mod handlers;
pub mod retrieval;
mod token_bytes;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::routing::{get, post};
use axum::Router;
use engine::Model;
use sha2::Digest;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use worker::{Job, Metrics};

/// Serving limits and settings that do not come from the model.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Name reported by `/v1/models` and checked against requests' `model`.
    pub name: String,
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Requests waiting for a batch slot at most; more get 429.
    pub max_queue: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Longest prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// A request still unfinished after this long fails with 504.
    pub timeout: Duration,
    pub admin_tokens: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    /// Owners' policy file (default: the model directory's `expert-policy.json`).
    pub policy: Option<PathBuf>,
    /// Retrieval datastore for requests' `moeval.retrieval`.
    pub datastore: Option<PathBuf>,
    /// Open connections at most; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// A client must send a request's headers, and then its body, within this long.
    pub read_timeout: Duration,
    /// After a shutdown signal, connections still open after this long are closed.
    pub shutdown_timeout: Duration,
    /// Prompt tokens prefilled per engine step at most, so long prompts do not stall the others.
    pub prefill_chunk: usize,
    /// Bearer key the inference endpoints require (`--api-key`).
    pub api_key: Option<String>,
    /// Server-wide `--opt-out` / `--experts`, applied to every request.
    pub experts: harness::Experts,
}

impl Settings {
    /// Defaults for everything but the name and the model-dependent limits.
    pub fn new(name: impl Into<String>, max_prompt_tokens: usize) -> Self {
        Self {
            name: name.into(),
            max_batch: 32,
            max_queue: 256,
            max_tokens: 1024,
            max_prompt_tokens,
            timeout: Duration::from_secs(300),
            admin_tokens: None,
            chat_template: None,
            policy: None,
            datastore: None,
            max_connections: 1024,
            read_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            prefill_chunk: 512,
            api_key: None,
            experts: Default::default(),
        }
    }

    /// Refuses settings no server can run with, naming the flag.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.max_batch > 0, "--max-batch must be at least 1");
        anyhow::ensure!(self.max_queue > 0, "--max-queue must be at least 1");
        anyhow::ensure!(
            self.max_connections > 0,
            "--max-connections must be at least 1"
        );
        anyhow::ensure!(self.prefill_chunk > 0, "--prefill-chunk must be at least 1");
        anyhow::ensure!(
            self.api_key.as_ref().is_none_or(|k| !k.trim().is_empty()),
            "--api-key must not be empty"
        );
        for (flag, d) in [
            ("--timeout-secs", self.timeout),
            ("--read-timeout-secs", self.read_timeout),
            ("--shutdown-timeout-secs", self.shutdown_timeout),
        ] {
            anyhow::ensure!(
                !d.is_zero() && d <= Duration::from_secs(86_400),
                "{flag} must be positive and at most a day"
            );
        }
        Ok(())
    }

    /// The experts to load: the server-wide selection plus, with `policy`, the experts that file
    /// opts out, so their weights are never read (the checkpoint's own policy applies at load).
    pub fn experts_to_load(&self) -> Result<harness::Experts> {
        let mut experts = self.experts.clone();
        if let Some(p) = &self.policy {
            let policy = routers::Policy::load_file(p)
                .with_context(|| format!("cannot read the policy {}", p.display()))?;
            experts
                .opt_out
                .extend(policy.opted_out().iter().map(|e| e.expert.clone()));
        }
        Ok(experts)
    }
}

/// Everything the handlers share.
pub struct AppState {
    model: Arc<Model>,
    settings: Settings,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    chat: Option<chat::ChatTemplate>,
    admin: Option<admin::AdminTokens>,
    /// Serialises policy changes (each one rewrites the policy file).
    policy_write: Mutex<()>,
    /// The datastore, with `--datastore`.
    store: Option<retrieval::Store>,
    /// Prefix of an empty prompt: BOS if the model has one, else EOS.
    prefix: u32,
    /// Experts the server's `--opt-out` / `--experts` leave out of every request.
    server_removed: Vec<usize>,
    /// SHA-256 of `--api-key`.
    api_key: Option<[u8; 32]>,
    /// Tokens' own bytes where their text does not give them.
    token_bytes: std::collections::HashMap<u32, Vec<u8>>,
    created: u64,
    next_id: AtomicU64,
}

/// A running server: its address, and how to stop it and wait for it to drain.
pub struct Server {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
    engine: std::thread::JoinHandle<()>,
}

/// What the accept loop needs besides the app.
struct Limits {
    max_connections: usize,
    read_timeout: Duration,
    shutdown_timeout: Duration,
}

impl Server {
    /// Binds `addr` and serves `model` until [`Server::shutdown`] (or the future `signal` resolves).
    pub async fn start(
        model: Arc<Model>,
        settings: Settings,
        addr: SocketAddr,
        signal: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Self> {
        settings.validate()?;
        let dir = model
            .dir()
            .context("the server needs a model loaded from a directory")?
            .to_path_buf();
        let chat = chat::ChatTemplate::load(&dir, settings.chat_template.as_deref())?;
        let admin = match &settings.admin_tokens {
            Some(p) => Some(admin::AdminTokens::load(p)?),
            None => None,
        };
        let store = match &settings.datastore {
            Some(d) => Some(retrieval::Store::open(d, &dir)?),
            None => None,
        };
        if let Some(p) = &settings.policy {
            // Fail at start rather than on every request.
            routers::Policy::load_file(p)
                .with_context(|| format!("cannot read the policy {}", p.display()))?;
        }
        let cfg = model.config();
        let prefix = cfg
            .bos_token_id
            .or_else(|| cfg.eos_token_ids.first().copied())
            .context("the model has neither a BOS nor an EOS token to start empty prompts with")?;
        let server_removed = match model.registry() {
            Some(registry) => {
                let e = &settings.experts;
                let mut removed = registry.resolve_list(&e.opt_out)?;
                let only = registry.resolve_list(&e.experts)?;
                if !only.is_empty() {
                    removed.extend((0..registry.len()).filter(|i| !only.contains(i)));
                }
                removed.sort_unstable();
                removed.dedup();
                anyhow::ensure!(
                    removed.len() < registry.len(),
                    "--opt-out / --experts leave no expert to serve"
                );
                removed
            }
            None => {
                anyhow::ensure!(
                    settings.experts.opt_out.is_empty() && settings.experts.experts.is_empty(),
                    "this model is dense: it has no experts for --opt-out / --experts"
                );
                Vec::new()
            }
        };
        let api_key = settings
            .api_key
            .as_ref()
            .map(|k| sha2::Sha256::digest(k.as_bytes()).into());
        let metrics = Arc::new(Metrics::default());
        let (jobs, engine) = worker::spawn(
            model.clone(),
            worker::EngineSettings {
                max_batch: settings.max_batch,
                max_queue: settings.max_queue,
                prefill_chunk: settings.prefill_chunk,
            },
            metrics.clone(),
        );
        let limits = Limits {
            max_connections: settings.max_connections,
            read_timeout: settings.read_timeout,
            shutdown_timeout: settings.shutdown_timeout,
        };
        let state = Arc::new(AppState {
            model,
            settings,
            jobs,
            metrics,
            chat,
            admin,
            policy_write: Mutex::new(()),
            store,
            prefix,
            server_removed,
            api_key,
            token_bytes: token_bytes::table(&dir.join("tokenizer.json")),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            next_id: AtomicU64::new(0),
        });
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(state);
        let task = tokio::spawn(serve(listener, app, limits, async move {
            tokio::select! {
                _ = stopped => {}
                _ = signal => {}
            }
        }));
        Ok(Self {
            addr,
            stop,
            task,
            engine,
        })
    }

    /// Stops accepting connections, lets in-flight requests finish, then stops the engine thread.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(());
        drain(self.task, self.engine).await
    }

    /// Waits until the server has stopped (after its signal) and drained.
    pub async fn wait(self) -> Result<()> {
        drain(self.task, self.engine).await
    }
}

async fn drain(
    task: tokio::task::JoinHandle<Result<()>>,
    engine: std::thread::JoinHandle<()>,
) -> Result<()> {
    task.await.context("the server task panicked")??;
    // The last handler dropped the job queue; the engine finishes what it holds and exits.
    tokio::task::spawn_blocking(move || engine.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))
}

/// The accept loop: HTTP/1 connections with a header read timeout, at most `max_connections` open at
/// once (more are closed at accept, so idle or half-open clients cannot exhaust file descriptors), and
/// after `shutdown` resolves, a graceful drain bounded by `shutdown_timeout`.
async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Reap finished connections so the set does not grow.
        while conns.try_join_next().is_some() {}
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: wait a moment rather
                    // than spin, then carry on.
                    eprintln!("warning: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        conns.spawn(async move {
            // A connection's own I/O errors (resets, timeouts) concern only that client.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            eprintln!(
                "closing {} connection(s) still open after the shutdown timeout",
                conns.len()
            );
        }
    }
    // Dropping the connections drops their requests' event receivers, which cancels their sequences.
    conns.shutdown().await;
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    let inference = Router::new()
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{id}", get(handlers::model))
        .route("/v1/experts", get(handlers::experts))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::require_api_key,
        ));
    Router::new()
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/admin/experts/{name}/{action}", post(handlers::admin))
        .merge(inference)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::read_body,
        ))
        .with_state(state)
}

/// Resolves on Ctrl-C or SIGTERM: the signal `moeval serve` stops on.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// A multi-threaded runtime for the HTTP side; model math runs on the engine thread and rayon's pool.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
