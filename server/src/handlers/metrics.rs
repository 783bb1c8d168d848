//! `GET /metrics`: Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::Shared;

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
