//! `moeval serve` and `moeval serve-bench`: flags for the server crate ([`server::Settings`],
//! [`server::bench`]), and what they print.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

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
    /// Server-wide expert selection, applied to every request (a request can only narrow it further).
    #[command(flatten)]
    pub experts: super::ExpertArgs,
    /// Require `Authorization: Bearer KEY` on the /v1 endpoints (/health and /metrics stay open).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Most open connections; more are closed as soon as they are accepted.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers, and then its body.
    #[arg(long, default_value_t = 30.0)]
    pub read_timeout_secs: f64,
    /// Seconds to wait for open connections after Ctrl-C / SIGTERM before closing them.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout_secs: f64,
    /// Most prompt tokens prefilled per engine step; longer prompts are prefilled in chunks between
    /// decode steps.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
}

/// A duration flag in seconds: positive and at most a day.
/// Seconds as a duration; out-of-range values are refused by [`server::Settings::validate`].
fn secs(v: f64) -> Duration {
    Duration::try_from_secs_f64(v).unwrap_or(Duration::ZERO)
}

impl Args {
    /// The settings these flags describe, for a model with `context` positions.
    fn settings(&self, context: usize) -> Result<server::Settings> {
        let name = match &self.served_model_name {
            Some(n) => n.clone(),
            None => self
                .model
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "model".into()),
        };
        Ok(server::Settings {
            name,
            max_batch: self.max_batch,
            max_queue: self.max_queue,
            max_tokens: self.max_tokens,
            max_prompt_tokens: self.max_prompt_tokens.unwrap_or(context).min(context),
            timeout: secs(self.timeout_secs),
            admin_tokens: self.admin_tokens.clone(),
            chat_template: self.chat_template.clone(),
            policy: self.policy.clone(),
            datastore: self.datastore.clone(),
            max_connections: self.max_connections,
            read_timeout: secs(self.read_timeout_secs),
            shutdown_timeout: secs(self.shutdown_timeout_secs),
            prefill_chunk: self.prefill_chunk,
            api_key: self.api_key.clone(),
            experts: self.experts.clone().into(),
        })
    }
}

pub fn run(a: Args, at: super::Placement) -> Result<()> {
    // Validated before the (slow) load; the model decides the prompt limit.
    let probe = a.settings(usize::MAX)?;
    probe.validate()?;
    let model = Arc::new(harness::load_model(
        &a.model,
        &probe.experts_to_load()?,
        at.device,
        at.dtype,
    )?);
    let settings = a.settings(model.config().max_position_embeddings)?;
    let ip: std::net::IpAddr = a
        .host
        .parse()
        .with_context(|| format!("--host {} is not an IP address", a.host))?;
    if !ip.is_loopback() {
        eprintln!("warning: listening on {ip}, which is reachable from other machines");
    }
    let rt = server::runtime()?;
    rt.block_on(async move {
        let server = server::Server::start(
            model,
            settings,
            SocketAddr::new(ip, a.port),
            server::shutdown_signal(),
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

/// `moeval serve-bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model directory to serve.
    #[arg(long)]
    pub model: PathBuf,
    /// Concurrent clients per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Requests each client sends per level.
    #[arg(long, default_value_t = 4)]
    pub requests_per_client: usize,
    /// Prompt length in tokens (token ids are sent, so any tokenizer works).
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Tokens generated per request (EOS is ignored, so every request generates exactly this many).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Server's batch limit.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// A level stops sending new requests after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub max_seconds: u64,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_bench(a: BenchArgs, at: super::Placement) -> Result<()> {
    let opts = server::bench::BenchOptions {
        concurrency: a.concurrency.clone(),
        requests_per_client: a.requests_per_client,
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        max_batch: a.max_batch,
        max_seconds: a.max_seconds,
    };
    let model = Arc::new(super::load_model_with(
        &a.model,
        &super::ExpertArgs::default(),
        at,
    )?);
    let r = server::bench::run(model, &opts)?;
    let max_c = a.concurrency.iter().copied().max().unwrap_or(1);
    if a.json {
        let rows: Vec<_> = r
            .levels
            .iter()
            .map(|l| {
                json!({"concurrency": l.concurrency, "requests": l.requests, "errors": l.errors,
                       "seconds": l.seconds, "requests_per_s": l.requests_per_s(),
                       "tokens_per_s": l.tokens_per_s(), "p50_ms": l.p50_ms, "p99_ms": l.p99_ms})
            })
            .collect();
        println!(
            "{}",
            json!({"prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens,
                   "max_batch": a.max_batch, "levels": rows, "batched_over_single_throughput": r.batched_over_single})
        );
    } else {
        println!(
            "prompt {} tokens, {} generated per request, max batch {}",
            a.prompt_tokens, a.max_tokens, a.max_batch
        );
        println!("clients  requests  errors   req/s    tok/s   p50 ms   p99 ms");
        for l in &r.levels {
            println!(
                "{:>7}  {:>8}  {:>6}  {:>6.2}  {:>7.1}  {:>7.0}  {:>7.0}",
                l.concurrency,
                l.requests,
                l.errors,
                l.requests_per_s(),
                l.tokens_per_s(),
                l.p50_ms,
                l.p99_ms
            );
        }
        if let Some(x) = r.batched_over_single {
            println!("batched ({max_c} clients) / one-at-a-time throughput: {x:.2}x");
        }
    }
    Ok(())
}
