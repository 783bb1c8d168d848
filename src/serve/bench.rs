//! `moeval serve-bench`: a bounded load test of the server over loopback. It starts the server in this
//! process on 127.0.0.1 (a free port), runs closed-loop clients at each concurrency level (each client
//! sends its next request when the previous one returns), and reports requests/s, generated tokens/s
//! and latency percentiles, plus the ratio of batched to one-at-a-time throughput.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use super::client;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory to serve.
    #[arg(long)]
    model: PathBuf,
    /// Concurrent clients per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Requests each client sends per level.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// Prompt length in tokens (token ids are sent, so any tokenizer works).
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens generated per request (EOS is ignored, so every request generates exactly this many).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Server's batch limit.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// A level stops sending new requests after this many seconds.
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// One concurrency level's results.
#[derive(Debug, Clone)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub seconds: f64,
    pub tokens: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Level {
    pub fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn prompt(n: usize, seed: usize, vocab: usize) -> Vec<u32> {
    // Distinct, deterministic prompts; ids from 2 up skip the fixture tokenizers' special tokens.
    let span = vocab.clamp(3, 50_000) - 2;
    (0..n)
        .map(|i| (2 + (i * 7919 + seed * 104_729) % span) as u32)
        .collect()
}

/// Runs one level against `addr`.
fn level(addr: SocketAddr, a: &Args, concurrency: usize, vocab: usize) -> Level {
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(a.max_seconds);
    let handles: Vec<_> = (0..concurrency)
        .map(|c| {
            let (per, pt, mt) = (a.requests_per_client, a.prompt_tokens, a.max_tokens);
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for r in 0..per {
                    if Instant::now() >= stop_at {
                        break;
                    }
                    let body = json!({
                        "prompt": prompt(pt, c * per + r, vocab), "max_tokens": mt,
                        "temperature": 0, "moeval": {"ignore_eos": true},
                    });
                    let t0 = Instant::now();
                    let resp =
                        client::post_json(addr, "/v1/completions", &body, Duration::from_secs(600));
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    out.push(match resp {
                        Ok(r) if r.status == 200 => {
                            let n = r.json()["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                            Some((ms, n as usize))
                        }
                        _ => None,
                    });
                }
                out
            })
        })
        .collect();
    let results: Vec<Option<(f64, usize)>> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let seconds = start.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = results.iter().flatten().map(|r| r.0).collect();
    lat.sort_by(f64::total_cmp);
    Level {
        concurrency,
        requests: lat.len(),
        errors: results.iter().filter(|r| r.is_none()).count(),
        seconds,
        tokens: results.iter().flatten().map(|r| r.1).sum(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

pub fn run(a: Args, device: engine::Device) -> Result<()> {
    anyhow::ensure!(
        a.concurrency.iter().all(|&c| (1..=256).contains(&c)),
        "--concurrency levels must be between 1 and 256"
    );
    anyhow::ensure!(
        a.requests_per_client > 0 && a.requests_per_client <= 1000,
        "--requests-per-client must be between 1 and 1000"
    );
    anyhow::ensure!(a.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    let model = Arc::new(crate::commands::load_model_with(
        &a.model,
        &crate::commands::ExpertArgs::default(),
        device,
    )?);
    let vocab = model.config().vocab_size;
    let max_c = a.concurrency.iter().copied().max().unwrap_or(1);
    let settings = super::Settings {
        max_batch: a.max_batch,
        max_queue: max_c * 2,
        max_tokens: a.max_tokens.max(1),
        timeout: Duration::from_secs(600),
        ..super::Settings::new("bench", model.config().max_position_embeddings)
    };
    let rt = super::runtime()?;
    let server = rt.block_on(super::Server::start(
        model,
        settings,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        std::future::pending(),
    ))?;
    let addr = server.addr;
    // Warm-up: page in the weights and fill the allocator before timing.
    let warm = client::post_json(
        addr,
        "/v1/completions",
        &json!({"prompt": prompt(a.prompt_tokens, 999_999, vocab), "max_tokens": 2, "temperature": 0}),
        Duration::from_secs(600),
    )
    .context("the warm-up request failed")?;
    anyhow::ensure!(warm.status == 200, "warm-up: {}", warm.text());
    let levels: Vec<Level> = a
        .concurrency
        .iter()
        .map(|&c| level(addr, &a, c, vocab))
        .collect();
    rt.block_on(server.shutdown())?;
    let base = levels.iter().find(|l| l.concurrency == 1);
    let best = levels.iter().max_by_key(|l| l.concurrency);
    let ratio = match (base, best) {
        (Some(b), Some(m)) if b.tokens > 0 => Some(m.tokens_per_s() / b.tokens_per_s()),
        _ => None,
    };
    if a.json {
        let rows: Vec<_> = levels
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
                   "max_batch": a.max_batch, "levels": rows, "batched_over_single_throughput": ratio})
        );
    } else {
        println!(
            "prompt {} tokens, {} generated per request, max batch {}",
            a.prompt_tokens, a.max_tokens, a.max_batch
        );
        println!("clients  requests  errors   req/s    tok/s   p50 ms   p99 ms");
        for l in &levels {
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
        if let Some(r) = ratio {
            println!("batched ({max_c} clients) / one-at-a-time throughput: {r:.2}x");
        }
    }
    Ok(())
}
