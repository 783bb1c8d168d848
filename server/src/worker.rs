//! The engine loop: one thread owns the model's [`Decoder`] and runs continuous batching. Requests wait
//! in a bounded queue and join the running batch between decode steps, up to `max_batch` sequences;
//! each sequence has its own expert mask, sampler and stop conditions. A sequence whose client went away
//! (its event receiver was dropped) or whose deadline passed is cancelled before the next step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::generate::{Decoder, GenParams, Generation, SeqId, SeqRequest, TokenLogprob};
use engine::{ExpertMask, Model};
use tokio::sync::mpsc;

/// One sequence to run.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenParams,
    pub mask: Option<ExpertMask>,
    pub logprobs: Option<usize>,
    pub prompt_logprobs: bool,
    /// Picks each next token instead of the sampler (kNN-LM).
    pub picker: Option<engine::generate::Picker>,
    pub deadline: Instant,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the engine reports for a job, in order: optionally `Prompt`, then `Token`s, then `Done` or
/// `Failed`.
#[derive(Debug)]
pub enum Event {
    Prompt(Vec<TokenLogprob>),
    Token(TokenLogprob),
    Done(Generation),
    /// The job did not finish: it timed out, or the engine failed.
    Failed {
        timeout: bool,
        message: String,
    },
}

/// Counters for `/metrics`, shared by the HTTP handlers and the engine thread.
#[derive(Default)]
pub struct Metrics {
    /// Jobs in the queue, not yet in the batch.
    pub queued: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Nanoseconds the engine spent in decode steps.
    pub busy_ns: AtomicU64,
    pub cancelled: AtomicU64,
    pub timeouts: AtomicU64,
    /// Tokens routed to each expert (each token counted once per layer and chosen expert).
    pub routed: Mutex<Vec<u64>>,
    /// Responses by (endpoint, status code).
    pub requests: Mutex<HashMap<(&'static str, u16), u64>>,
}

impl Metrics {
    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((endpoint, status)).or_insert(0) += 1;
    }
}

/// How the engine loop batches.
pub struct EngineSettings {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Jobs waiting for a batch slot at most.
    pub max_queue: usize,
    /// Prompt tokens prefilled per step at most.
    pub prefill_chunk: usize,
}

/// Starts the engine thread. It runs until every sender of the returned queue is dropped and the last
/// running sequence has finished (graceful shutdown drains in-flight work).
pub fn spawn(
    model: Arc<Model>,
    settings: EngineSettings,
    metrics: Arc<Metrics>,
) -> (mpsc::Sender<Job>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(settings.max_queue.max(1));
    let handle = std::thread::Builder::new()
        .name("moeval-engine".into())
        .spawn(move || {
            let decoder = Decoder::with_prefill_chunk(&model, settings.prefill_chunk);
            run(decoder, rx, settings.max_batch.max(1), &metrics)
        })
        .expect("the engine thread starts");
    (tx, handle)
}

struct Running {
    events: mpsc::UnboundedSender<Event>,
    deadline: Instant,
}

fn run(mut decoder: Decoder<'_>, mut rx: mpsc::Receiver<Job>, max_batch: usize, metrics: &Metrics) {
    let mut running: HashMap<SeqId, Running> = HashMap::new();
    let mut open = true;
    loop {
        if decoder.is_empty() {
            if !open {
                return;
            }
            // Idle: wait for work (or for the server to close the queue).
            match rx.blocking_recv() {
                Some(job) => admit(&mut decoder, &mut running, job, metrics),
                None => return,
            }
        }
        while open && decoder.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => admit(&mut decoder, &mut running, job, metrics),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let now = Instant::now();
        let gone: Vec<(SeqId, bool)> = running
            .iter()
            .filter_map(|(&id, r)| {
                if r.events.is_closed() {
                    Some((id, false))
                } else if now >= r.deadline {
                    Some((id, true))
                } else {
                    None
                }
            })
            .collect();
        for (id, timeout) in gone {
            decoder.cancel(id);
            if let Some(r) = running.remove(&id) {
                if timeout {
                    metrics.timeouts.fetch_add(1, Ordering::Relaxed);
                    let _ = r.events.send(Event::Failed {
                        timeout: true,
                        message: "the request timed out".into(),
                    });
                } else {
                    metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        metrics.running.store(decoder.len(), Ordering::Relaxed);
        if decoder.is_empty() {
            continue;
        }
        let start = Instant::now();
        let result = decoder.step();
        metrics
            .busy_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        metrics.steps.fetch_add(1, Ordering::Relaxed);
        count_routing(&mut decoder, metrics);
        match result {
            Ok(progress) => {
                for p in progress {
                    let Some(r) = running.get(&p.id) else {
                        continue;
                    };
                    if let Some(lps) = p.prompt_logprobs {
                        let _ = r.events.send(Event::Prompt(lps));
                    }
                    if let Some(t) = p.token {
                        metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
                        let _ = r.events.send(Event::Token(t));
                    }
                    if let Some(message) = p.error {
                        let _ = r.events.send(Event::Failed {
                            timeout: false,
                            message,
                        });
                        running.remove(&p.id);
                        continue;
                    }
                    if let Some(g) = p.finished {
                        let _ = r.events.send(Event::Done(g));
                        running.remove(&p.id);
                    }
                }
            }
            Err(e) => {
                // Input is checked when a job is admitted and a sequence's own sampling failure fails
                // it alone, so a failing step is an engine fault: fail the batch rather than retry it
                // forever. The details (which may hold a backtrace) go to the server's log only.
                eprintln!("error: an engine step failed: {e:?}");
                for (id, r) in running.drain() {
                    decoder.cancel(id);
                    let _ = r.events.send(Event::Failed {
                        timeout: false,
                        message: "the engine failed; the server's log has the details".into(),
                    });
                }
            }
        }
        metrics.running.store(decoder.len(), Ordering::Relaxed);
    }
}

fn admit(
    decoder: &mut Decoder<'_>,
    running: &mut HashMap<SeqId, Running>,
    job: Job,
    metrics: &Metrics,
) {
    metrics.queued.fetch_sub(1, Ordering::Relaxed);
    if job.events.is_closed() {
        metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if Instant::now() >= job.deadline {
        metrics.timeouts.fetch_add(1, Ordering::Relaxed);
        let _ = job.events.send(Event::Failed {
            timeout: true,
            message: "the request timed out in the queue".into(),
        });
        return;
    }
    metrics
        .prompt_tokens
        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
    let req = SeqRequest {
        prompt: job.prompt,
        params: job.params,
        mask: job.mask,
        logprobs: job.logprobs,
        prompt_logprobs: job.prompt_logprobs,
        picker: job.picker,
    };
    match decoder.add(req) {
        Ok(id) => {
            running.insert(
                id,
                Running {
                    events: job.events,
                    deadline: job.deadline,
                },
            );
        }
        Err(e) => {
            let _ = job.events.send(Event::Failed {
                timeout: false,
                message: e.to_string(),
            });
        }
    }
}

/// Adds the step's routed tokens (returned by its forward pass) to the server's totals.
fn count_routing(decoder: &mut Decoder<'_>, metrics: &Metrics) {
    let per_layer = decoder.take_routed().0;
    let mut routed = metrics.routed.lock().unwrap_or_else(|p| p.into_inner());
    for layer in per_layer {
        if routed.len() < layer.len() {
            routed.resize(layer.len(), 0);
        }
        for (total, n) in routed.iter_mut().zip(layer) {
            *total += n;
        }
    }
}

/// Waits for a job's events until it finishes, fails, or the deadline passes.
pub async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    deadline: Instant,
) -> Result<Collected, super::api::ApiError> {
    let mut out = Collected::default();
    let grace = tokio::time::Instant::from_std(deadline + Duration::from_millis(250));
    loop {
        let ev = tokio::time::timeout_at(grace, rx.recv()).await;
        match ev {
            Err(_) => return Err(timeout_error()),
            Ok(None) => return Err(super::api::ApiError::internal("the engine stopped")),
            Ok(Some(Event::Prompt(p))) => out.prompt_logprobs = Some(p),
            Ok(Some(Event::Token(t))) => out.tokens.push(t),
            Ok(Some(Event::Done(g))) => {
                out.generation = Some(g);
                return Ok(out);
            }
            Ok(Some(Event::Failed { timeout, message })) => {
                return Err(if timeout {
                    timeout_error()
                } else {
                    super::api::ApiError::internal(message)
                })
            }
        }
    }
}

pub fn timeout_error() -> super::api::ApiError {
    super::api::ApiError::new(
        axum::http::StatusCode::GATEWAY_TIMEOUT,
        "timeout_error",
        "the request did not finish within the server's --timeout-secs",
    )
}

/// Everything a finished job reported.
#[derive(Default, Debug)]
pub struct Collected {
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    pub tokens: Vec<TokenLogprob>,
    pub generation: Option<Generation>,
}
