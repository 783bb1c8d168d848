//! `moeval serve-bench`: a bounded load test of the server over loopback. It starts the server in this
//! process on 127.0.0.1 (a free port), runs closed-loop clients at each concurrency level (each client
//! sends its next request when the previous one returns), and reports requests/s, generated tokens/s
//! and latency percentiles, plus the ratio of batched to one-at-a-time throughput.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::client;

/// What a load test runs: closed-loop clients at each concurrency level.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Concurrent clients per level.
    pub concurrency: Vec<usize>,
    /// Requests each client sends per level.
    pub requests_per_client: usize,
    /// Prompt length in tokens (token ids are sent, so any tokenizer works).
    pub prompt_tokens: usize,
    /// Tokens generated per request (EOS is ignored).
    pub max_tokens: usize,
    /// Server's batch limit.
    pub max_batch: usize,
    /// A level stops sending new requests after this many seconds.
    pub max_seconds: u64,
}

/// A load test's results.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub levels: Vec<Level>,
    /// Generated tokens/s at the highest concurrency over one-at-a-time (needs a level of 1).
    pub batched_over_single: Option<f64>,
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
fn level(addr: SocketAddr, a: &BenchOptions, concurrency: usize, vocab: usize) -> Level {
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

/// Serves `model` on a free loopback port in this process and runs the levels against it. Levels must
/// be 1..=256 clients and 1..=1000 requests per client, prompts at least 1 token.
pub fn run(model: Arc<engine::Model>, a: &BenchOptions) -> Result<BenchReport> {
    anyhow::ensure!(
        a.concurrency.iter().all(|&c| (1..=256).contains(&c)),
        "--concurrency levels must be between 1 and 256"
    );
    anyhow::ensure!(
        a.requests_per_client > 0 && a.requests_per_client <= 1000,
        "--requests-per-client must be between 1 and 1000"
    );
    anyhow::ensure!(a.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    let vocab = model.config().vocab_size;
    let max_c = a.concurrency.iter().copied().max().unwrap_or(1);
    let settings = crate::Settings {
        max_batch: a.max_batch,
        max_queue: max_c * 2,
        max_tokens: a.max_tokens.max(1),
        timeout: Duration::from_secs(600),
        ..crate::Settings::new("bench", model.config().max_position_embeddings)
    };
    let rt = crate::runtime()?;
    let server = rt.block_on(crate::Server::start(
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
        .map(|&c| level(addr, a, c, vocab))
        .collect();
    rt.block_on(server.shutdown())?;
    let base = levels.iter().find(|l| l.concurrency == 1);
    let best = levels.iter().max_by_key(|l| l.concurrency);
    let batched_over_single = match (base, best) {
        (Some(b), Some(m)) if b.tokens > 0 => Some(m.tokens_per_s() / b.tokens_per_s()),
        _ => None,
    };
    Ok(BenchReport {
        levels,
        batched_over_single,
    })
}
