//! `moeval serve`: an OpenAI-compatible HTTP server over one engine model, with per-request expert
//! opt-out, the owners' policy enforced on every request, an owners' admin API, and continuous batching.
//!
//! Layout: `api` parses and validates bodies, `worker` is the engine loop (one thread owning the
//! decoder), `handlers` turns requests into jobs and jobs into OpenAI responses, `chat` renders chat
//! templates, `admin` checks owners' tokens, `retrieval` runs RIC-LM over `--datastore`, `client` is a tiny loopback HTTP client for the load test.

pub mod admin;
pub mod api;
pub mod bench;
pub mod chat;
pub mod client;
mod handlers;
pub mod retrieval;
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
    created: u64,
    next_id: AtomicU64,
}

/// `moeval serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, tokenizer.json, safetensors weights, experts.toml, policy).
    #[arg(long)]
    pub model: PathBuf,
    /// Retrieval datastore (`moeval datastore build`) for requests' `"moeval": {"retrieval": ...}`.
    #[arg(long)]
    pub datastore: Option<PathBuf>,
    /// Owners' policy file to enforce and to record admin changes in (default: the model directory's
    /// expert-policy.json). Its audit log is written beside it.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Address to bind. The default is loopback; binding elsewhere exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0 picks a free one; the address is printed on start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model name in the API (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; more are refused with 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Longest prompt in tokens (default: the model's context window).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Requests unfinished after this many seconds fail with 504.
    #[arg(long, default_value_t = 300.0)]
    pub timeout_secs: f64,
    /// Owners' bearer-token digests (TOML); enables POST /admin/experts/{name}/opt-out and /opt-in.
    #[arg(long, value_name = "FILE")]
    pub admin_tokens: Option<PathBuf>,
    /// Jinja chat template to use instead of tokenizer_config.json's `chat_template`.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

impl Args {
    /// The settings these flags describe, for a model with `context` positions.
    fn settings(&self, context: usize) -> Result<Settings> {
        anyhow::ensure!(self.max_batch > 0, "--max-batch must be at least 1");
        anyhow::ensure!(self.max_queue > 0, "--max-queue must be at least 1");
        anyhow::ensure!(
            self.timeout_secs > 0.0 && self.timeout_secs <= 86_400.0,
            "--timeout-secs must be positive and at most a day"
        );
        let name = match &self.served_model_name {
            Some(n) => n.clone(),
            None => self
                .model
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into()),
        };
        Ok(Settings {
            name,
            max_batch: self.max_batch,
            max_queue: self.max_queue,
            max_tokens: self.max_tokens,
            max_prompt_tokens: self.max_prompt_tokens.unwrap_or(context).min(context),
            timeout: Duration::from_secs_f64(self.timeout_secs),
            admin_tokens: self.admin_tokens.clone(),
            chat_template: self.chat_template.clone(),
            policy: self.policy.clone(),
            datastore: self.datastore.clone(),
        })
    }
}

/// A running server: its address, and how to stop it and wait for it to drain.
pub struct Server {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
    engine: std::thread::JoinHandle<()>,
}

impl Server {
    /// Binds `addr` and serves `model` until [`Server::shutdown`] (or the future `signal` resolves).
    pub async fn start(
        model: Arc<Model>,
        settings: Settings,
        addr: SocketAddr,
        signal: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<Self> {
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
        let metrics = Arc::new(Metrics::default());
        let (jobs, engine) = worker::spawn(
            model.clone(),
            settings.max_batch,
            settings.max_queue,
            metrics.clone(),
        );
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
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    tokio::select! {
                        _ = stopped => {}
                        _ = signal => {}
                    }
                })
                .await
                .context("the server failed")
        });
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

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .route("/v1/models", get(handlers::models))
        .route("/v1/experts", get(handlers::experts))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/admin/experts/{name}/{action}", post(handlers::admin))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
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

pub fn run(a: Args) -> Result<()> {
    // Experts opted out in an explicit --policy file are not loaded either (the checkpoint's own
    // expert-policy.json always applies at load, as for every command).
    let mut experts = crate::commands::ExpertArgs::default();
    if let Some(p) = &a.policy {
        let policy = routers::Policy::load_file(p)
            .with_context(|| format!("cannot read the policy {}", p.display()))?;
        experts.opt_out = policy
            .opted_out()
            .iter()
            .map(|e| e.expert.clone())
            .collect();
    }
    let model = Arc::new(crate::commands::load_model_with(&a.model, &experts)?);
    let settings = a.settings(model.config().max_position_embeddings)?;
    let ip: std::net::IpAddr = a
        .host
        .parse()
        .with_context(|| format!("--host {} is not an IP address", a.host))?;
    if !ip.is_loopback() {
        eprintln!("warning: listening on {ip}, which is reachable from other machines");
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let server = Server::start(
            model,
            settings,
            SocketAddr::new(ip, a.port),
            shutdown_signal(),
        )
        .await?;
        // Tests and scripts read this line to find the port.
        println!("listening on http://{}", server.addr);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        server.wait().await?;
        eprintln!("server stopped");
        Ok(())
    })
}
