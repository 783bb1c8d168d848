//! End-to-end: `moeval serve` on a copy of the tiny-flexolmo fixture, over loopback only. Every server
//! is a child process on a free port, killed when its test ends; every request has a timeout.

mod serve_common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::client::{self, HttpResponse};
use serve_common::{assert_error, Server, TIMEOUT};
use sha2::{Digest, Sha256};
use tasks::dataset::{read, Format, Source};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-flexolmo")
}

const TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
                        {% if add_generation_prompt %}<|assistant|>{% endif %}";

/// A writable copy of the fixture with named experts, owners and a chat template.
fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    std::fs::write(
        dir.path().join("experts.toml"),
        r#"
[[expert]]
index = 0
name = "public"
owner = "Lab"
[[expert]]
index = 1
name = "math"
owner = "Math Owner"
domain = "math"
[[expert]]
index = 2
name = "news"
owner = "News Owner"
domain = "news"
[[expert]]
index = 3
name = "code"
owner = "Math Owner"
domain = "code"
"#,
    )
    .unwrap();
    let cfg_path = dir.path().join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = json!(TEMPLATE);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    dir
}

fn mask_of(r: &HttpResponse) -> Vec<String> {
    r.json()["moeval"]["effective_mask"]["experts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn openai_endpoints_masks_policy_and_errors() {
    let dir = model_dir();
    let s = Server::start(dir.path(), &["--max-tokens", "64"]);
    assert_eq!(s.get("/health").status, 200);
    let models = s.get("/v1/models").json();
    let name = models["data"][0]["id"].as_str().unwrap().to_string();
    let experts = s.get("/v1/experts").json();
    assert_eq!(experts["data"].as_array().unwrap().len(), 4);
    assert_eq!(experts["data"][1]["owner"], "Math Owner");
    assert_eq!(experts["data"][1]["status"], "active");

    let body = json!({"model": name, "prompt": "The sky is", "max_tokens": 5, "temperature": 0});
    let r = s.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 5);
    assert_eq!(mask_of(&r), ["public", "math", "news", "code"]);

    let mut opt = body.clone();
    opt["moeval"] = json!({"opt_out": ["news"]});
    let r = s.post("/v1/completions", &opt);
    assert_eq!(mask_of(&r), ["public", "math", "code"]);
    assert_eq!(
        r.json()["moeval"]["effective_mask"]["opted_out_by_request"],
        json!(["news"])
    );

    // The owner's policy (the file the CLI writes) applies to the next request and cannot be undone
    // by a request.
    let mut policy = routers::Policy::load(dir.path()).unwrap();
    policy
        .record(routers::Decision {
            expert: "news",
            owner: "News Owner",
            actor: "cli:test",
            action: routers::Action::OptOut,
            reason: "withdrawn",
        })
        .unwrap();
    assert_eq!(
        mask_of(&s.post("/v1/completions", &body)),
        ["public", "math", "code"]
    );
    let mut force = body.clone();
    force["moeval"] = json!({"experts": ["public", "news"]});
    assert_error(
        &s.post("/v1/completions", &force),
        403,
        "opted out by its owner",
    );
    assert_eq!(
        s.get("/v1/experts").json()["data"][2]["status"],
        "opted-out"
    );
    policy
        .record(routers::Decision {
            expert: "news",
            owner: "News Owner",
            actor: "cli:test",
            action: routers::Action::OptIn,
            reason: "back",
        })
        .unwrap();
    assert_eq!(
        mask_of(&s.post("/v1/completions", &force)),
        ["public", "news"]
    );

    // Errors, in OpenAI's shape.
    assert_error(
        &s.post_raw("/v1/completions", b"{not json", &[]),
        400,
        "not valid JSON",
    );
    assert_error(&s.post_raw("/v1/completions", b"", &[]), 400, "empty");
    let mut bad = body.clone();
    bad["moeval"] = json!({"opt_out": ["weather"]});
    assert_error(
        &s.post("/v1/completions", &bad),
        400,
        "unknown expert `weather`",
    );
    bad["moeval"] = json!({"opt_out": ["0,1,2,3"]});
    assert_error(&s.post("/v1/completions", &bad), 400, "at least one expert");
    bad["moeval"] = json!({"retrieval": {"mode": "knn"}});
    // No datastore: the server says how to start one.
    assert_error(&s.post("/v1/completions", &bad), 400, "--datastore");
    let mut big = body.clone();
    big["max_tokens"] = json!(65);
    assert_error(&s.post("/v1/completions", &big), 400, "limit of 64");
    big["max_tokens"] = json!(10);
    big["prompt"] = json!(vec![5; 250]);
    assert_error(
        &s.post("/v1/completions", &big),
        400,
        "maximum context length is 256",
    );
    big["prompt"] = json!([5, 512]);
    assert_error(
        &s.post("/v1/completions", &big),
        400,
        "outside the vocabulary",
    );
    let mut other = body.clone();
    other["model"] = json!("gpt-4");
    assert_error(&s.post("/v1/completions", &other), 404, "does not exist");
    assert_error(&s.get("/v1/nothing"), 404, "no such endpoint");
    assert_error(&s.get("/v1/completions"), 405, "method");
    assert_error(
        &s.post("/admin/experts/math/opt-out", &json!({})),
        404,
        "admin API is off",
    );

    // Several prompts (text and token ids) in one request.
    let multi = s.post(
        "/v1/completions",
        &json!({"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(multi.json()["choices"].as_array().unwrap().len(), 2);
    assert_eq!(multi.json()["usage"]["prompt_tokens"], 5);

    // Streaming gives the same text as a plain request.
    let long =
        json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "stop": ["\n\n"]});
    let plain = s.post("/v1/completions", &long).json()["choices"][0]["text"].clone();
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let r = s.post("/v1/completions", &streamed);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let events = client::sse_data(&r.body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(Value::String(text), plain);
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // Chat: the template renders the prompt; the answer equals the completion of the rendered text.
    let chat = json!({"messages": [{"role": "user", "content": "Who is the doctor?"}],
                      "max_tokens": 12, "temperature": 0, "moeval": {"opt_out": ["math"]}});
    let r = s.post("/v1/chat/completions", &chat);
    assert_eq!(r.status, 200, "{}", r.text());
    let content = r.json()["choices"][0]["message"]["content"].clone();
    let same = s.post(
        "/v1/completions",
        &json!({"prompt": "<|user|>Who is the doctor?\n<|assistant|>", "max_tokens": 12,
                "temperature": 0, "moeval": {"opt_out": ["math"]}}),
    );
    assert_eq!(content, same.json()["choices"][0]["text"]);
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = json!(true);
    let events = client::sse_data(&s.post("/v1/chat/completions", &chat_stream).body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(Value::String(text), content);

    let metrics = s.get("/metrics").text();
    for needle in [
        "moeval_requests_total{endpoint=\"completions\",code=\"200\"}",
        "moeval_requests_total{endpoint=\"completions\",code=\"400\"}",
        "moeval_generation_tokens_per_second",
        "moeval_queue_depth 0",
        "moeval_expert_routed_tokens_total{expert=\"news\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    assert!(s.metric("moeval_expert_routed_tokens_total{expert=\"math\"}") > 0.0);
}

#[test]
fn concurrent_requests_with_different_masks_equal_single_requests() {
    let dir = model_dir();
    let s = Server::start(dir.path(), &["--max-batch", "16"]);
    let prompts = [
        "Alice is a doctor. Bob is a nurse.",
        "The quick brown fox",
        "def add(a, b):",
        "Once upon a time",
    ];
    let masks = [
        json!({}),
        json!({"opt_out": ["news"]}),
        json!({"experts": ["public", "math"]}),
        json!({"opt_out": ["code", "math"]}),
        json!({"opt_out": ["public"]}),
    ];
    let bodies: Vec<Value> = (0..15)
        .map(|i| {
            json!({"prompt": prompts[i % prompts.len()], "max_tokens": 10 + i,
                   "temperature": if i % 3 == 0 { 0.0 } else { 0.8 }, "seed": i, "logprobs": 2,
                   "moeval": masks[i % masks.len()]})
        })
        .collect();
    let alone: Vec<Value> = bodies
        .iter()
        .map(|b| s.post("/v1/completions", b).json()["choices"].clone())
        .collect();
    let steps_before = s.metric("moeval_decode_steps_total");
    let barrier = Arc::new(Barrier::new(bodies.len()));
    let addr = s.addr;
    let together: Vec<Value> = bodies
        .iter()
        .cloned()
        .map(|b| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let r = client::post_json(addr, "/v1/completions", &b, TIMEOUT).unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()["choices"].clone()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i} differs when batched");
    }
    // The batch really was shared: fewer steps than tokens generated.
    let steps = s.metric("moeval_decode_steps_total") - steps_before;
    let tokens: u64 = together
        .iter()
        .map(|c| c[0]["logprobs"]["tokens"].as_array().unwrap().len() as u64)
        .sum();
    assert!(steps < tokens as f64, "{steps} steps for {tokens} tokens");
}

/// What lm-evaluation-harness's `local-completions` does for a log-likelihood request: token ids of
/// context + continuation, `echo`, `logprobs`, no new tokens; the continuation's log-probs are summed.
fn served_loglikelihood(s: &Server, ctx: &[u32], cont: &[u32], mask: &Value) -> f64 {
    let ids: Vec<u32> = ctx.iter().chain(cont).copied().collect();
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": [ids], "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0,
                "moeval": mask}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let lps = r.json()["choices"][0]["logprobs"]["token_logprobs"].clone();
    let lps = lps.as_array().unwrap();
    assert_eq!(lps.len(), ids.len());
    assert!(lps[0].is_null());
    lps[ctx.len()..].iter().map(|v| v.as_f64().unwrap()).sum()
}

#[test]
fn loglikelihoods_equal_moeval_eval() {
    let dir = model_dir();
    let s = Server::start(dir.path(), &[]);
    let tok = engine::Tokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    let docs: Vec<Value> = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tasks/mc_tiny.jsonl"),
    )
    .unwrap()
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    for (opt_out, mask) in [
        (None, json!({})),
        (Some("news"), json!({"opt_out": ["news"]})),
    ] {
        let out = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moeval"));
        cmd.args(["--threads", "2", "eval", "--model"])
            .arg(dir.path())
            .args(["--tasks", "mc_tiny", "--run-id", "r", "--include-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tasks"))
            .arg("--output")
            .arg(out.path());
        if let Some(o) = opt_out {
            cmd.args(["--opt-out", o]);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let samples = read(
            &Source::parse(out.path().join("r/samples.parquet").to_str().unwrap(), &[]),
            Format::Parquet,
        )
        .unwrap();
        assert_eq!(samples.len(), docs.len());
        for sample in &samples {
            let doc = &docs[sample["doc_id"].as_u64().unwrap() as usize];
            let prompt = sample["prompt"].as_str().unwrap();
            let expected = sample["choice_loglikelihoods"].as_array().unwrap();
            for (choice, want) in doc["choices"].as_array().unwrap().iter().zip(expected) {
                let cont = format!(" {}", choice.as_str().unwrap());
                let (c, k) = tasks::lm::encode_pair(|t| tok.encode(t), prompt, &cont, 0).unwrap();
                let got = served_loglikelihood(&s, &c, &k, &mask);
                let want = want.as_f64().unwrap();
                assert!(
                    (got - want).abs() < 1e-4,
                    "{prompt:?} {cont:?}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn admin_api_tokens_owners_and_audit() {
    let dir = model_dir();
    let hex = |t: &str| -> String {
        Sha256::digest(t.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let tokens = dir.path().join("admin-tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[owner]]\nname = \"Math Owner\"\ntoken_sha256 = \"{}\"\n\n[[owner]]\nname = \"News Owner\"\ntoken_sha256 = \"{}\"\n",
            hex("math-secret"),
            hex("news-secret")
        ),
    )
    .unwrap();
    assert!(!std::fs::read_to_string(&tokens)
        .unwrap()
        .contains("math-secret"));
    let s = Server::start(dir.path(), &["--admin-tokens", tokens.to_str().unwrap()]);
    let bearer = |t: &str| format!("Bearer {t}");
    let change = |path: &str, token: Option<&str>, body: &[u8]| {
        let auth = token.map(bearer);
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        s.post_raw(path, body, &headers)
    };
    assert_error(
        &change("/admin/experts/math/opt-out", None, b""),
        401,
        "Bearer",
    );
    assert_error(
        &change("/admin/experts/math/opt-out", Some("guess"), b""),
        401,
        "not valid",
    );
    assert_error(
        &change("/admin/experts/news/opt-out", Some("math-secret"), b""),
        403,
        "only its own experts",
    );
    assert_error(
        &change("/admin/experts/weather/opt-out", Some("math-secret"), b""),
        404,
        "unknown expert",
    );
    assert_error(
        &change("/admin/experts/math/opt-out", Some("math-secret"), b"{bad"),
        400,
        "not valid JSON",
    );
    let body = json!({"prompt": "The sky is", "max_tokens": 3, "temperature": 0});
    assert_eq!(mask_of(&s.post("/v1/completions", &body)).len(), 4);
    let r = change(
        "/admin/experts/math/opt-out",
        Some("math-secret"),
        br#"{"reason": "licence withdrawn"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["action"], "opt-out");
    // Requests admitted after the change cannot use the expert.
    assert_eq!(
        mask_of(&s.post("/v1/completions", &body)),
        ["public", "news", "code"]
    );
    let mut force = body.clone();
    force["moeval"] = json!({"experts": ["math"]});
    assert_error(&s.post("/v1/completions", &force), 403, "licence withdrawn");
    assert_error(
        &change("/admin/experts/math/opt-out", Some("math-secret"), b""),
        409,
        "already opted out",
    );
    let r = change("/admin/experts/1/opt-in", Some("math-secret"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mask_of(&s.post("/v1/completions", &force)), ["math"]);
    let log = routers::Policy::load(dir.path())
        .unwrap()
        .audit_log()
        .unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].reason, "licence withdrawn");
    assert_eq!(log[1].action, routers::Action::OptIn);
}

#[test]
fn limits_backpressure_cancel_timeout_and_graceful_shutdown() {
    let dir = model_dir();
    let s = Server::start(
        dir.path(),
        &[
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--max-prompt-tokens",
            "32",
        ],
    );
    assert_error(
        &s.post(
            "/v1/completions",
            &json!({"prompt": vec![5; 33], "max_tokens": 1}),
        ),
        400,
        "limit of 32",
    );
    // One request runs, one waits, the rest are refused with 429.
    let n = 8;
    let barrier = Arc::new(Barrier::new(n));
    let addr = s.addr;
    let statuses: Vec<u16> = (0..n)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let b = json!({"prompt": [5, 6, i as u32 + 7], "max_tokens": 200, "temperature": 0,
                               "moeval": {"ignore_eos": true}});
                client::post_json(addr, "/v1/completions", &b, TIMEOUT)
                    .unwrap()
                    .status
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(
        statuses.contains(&429) && statuses.contains(&200),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&c| c == 200 || c == 429),
        "{statuses:?}"
    );

    // A client that goes away mid-stream cancels its sequence.
    let generated = s.metric("moeval_generation_tokens_total");
    let mut sock = client::connect(s.addr, TIMEOUT).unwrap();
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 240, "temperature": 0, "stream": true,
                      "moeval": {"ignore_eos": true}})
    .to_string();
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let _ = sock.read(&mut first).unwrap();
    drop(sock);
    let t0 = Instant::now();
    while s.metric("moeval_cancelled_total") < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the sequence was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.metric("moeval_generation_tokens_total") - generated < 240.0);
    drop(s);

    // A request that outlives --timeout-secs gets 504.
    let s = Server::start(dir.path(), &["--timeout-secs", "0.001"]);
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "max_tokens": 240, "moeval": {"ignore_eos": true}}),
    );
    assert_error(&r, 504, "did not finish");
    drop(s);

    // SIGTERM: the in-flight request still completes, then the server exits cleanly.
    let mut s = Server::start(dir.path(), &[]);
    let addr = s.addr;
    let inflight = std::thread::spawn(move || {
        let b = json!({"prompt": [5, 6, 7], "max_tokens": 240, "temperature": 0,
                       "moeval": {"ignore_eos": true}});
        client::post_json(addr, "/v1/completions", &b, TIMEOUT).unwrap()
    });
    let t0 = Instant::now();
    while s.metric("moeval_running_sequences") < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the request never ran"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 240);
    let t0 = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the server did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_bench_reports_throughput_and_latency() {
    let out = Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["--threads", "2", "serve-bench", "--model"])
        .arg(fixture())
        .args(["--concurrency", "1,4", "--requests-per-client", "2"])
        .args([
            "--max-tokens",
            "4",
            "--prompt-tokens",
            "8",
            "--max-seconds",
            "30",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    assert_eq!(levels[1]["requests"], 8);
    assert_eq!(levels[1]["errors"], 0);
    assert!(levels[0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["batched_over_single_throughput"].as_f64().unwrap() > 0.0);
}

/// Mutated request bodies over HTTP: every answer is a 2xx or 4xx in OpenAI's shape, and the server
/// stays up.
#[test]
fn fuzzed_bodies_never_crash_the_server() {
    let dir = model_dir();
    let s = Server::start(dir.path(), &["--max-tokens", "4"]);
    let seeds: [&[u8]; 3] = [
        br#"{"prompt": "The sky", "max_tokens": 2, "logprobs": 1, "echo": true, "stop": ["a"]}"#,
        br#"{"prompt": [[5, 6], [7]], "max_tokens": 0, "moeval": {"opt_out": ["news"]}}"#,
        br#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true}"#,
    ];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..300 {
        let seed = (next() % 3) as usize;
        let mut body = seeds[seed].to_vec();
        for _ in 0..(1 + next() % 4) {
            let at = (next() as usize) % body.len();
            match next() % 3 {
                0 => body[at] = next() as u8,
                1 => {
                    body.remove(at);
                }
                _ => body.insert(at, b"{}[]\",:09-e"[(next() % 11) as usize]),
            }
        }
        let path = if seed == 2 {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let r = s.post_raw(path, &body, &[]);
        assert!(
            r.status == 200 || (400..500).contains(&r.status),
            "body {i} {:?}: {} {}",
            String::from_utf8_lossy(&body),
            r.status,
            r.text()
        );
        if r.status != 200 {
            assert!(r.json()["error"]["message"].is_string(), "{}", r.text());
        }
    }
    assert_eq!(s.get("/health").status, 200);
}

/// Builds a datastore of `tests/data/datastore/{input}` with the fixture's tokenizer: 128-token blocks
/// every 64 tokens (the fixture's context is 256), as `tests/datastore_cli.rs` does.
fn build_store(input: &str, out: &Path) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/datastore");
    let o = Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["--threads", "2", "datastore", "build", "--input"])
        .arg(data.join(input))
        .arg("--tokenizer")
        .arg(fixture())
        .arg("--out")
        .arg(out)
        .args(["--block", "128", "--stride", "64"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn sha256_file(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn prompt_logprobs(r: &HttpResponse) -> Vec<Option<f64>> {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect()
}

#[test]
fn ric_retrieval_attributes_scores_only_the_prompt_and_honours_opt_out() {
    let dir = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    build_store("corpus.jsonl", &store);
    let s = Server::start(dir.path(), &["--datastore", store.to_str().unwrap()]);
    let tok = engine::Tokenizer::from_file(&fixture().join("tokenizer.json")).unwrap();
    let prompt: Vec<u32> = tok
        .encode("The river delta and estuary: tide, silt and sediment in the channel")
        .unwrap();
    let ric = json!({"mode": "ric", "k": 1, "query_tokens": 512});
    let scoring = |moeval: Value, ids: &[u32]| {
        json!({"prompt": [ids], "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0,
               "moeval": moeval})
    };
    let r = s.post(
        "/v1/completions",
        &scoring(json!({"retrieval": ric}), &prompt),
    );
    let with_ric = prompt_logprobs(&r);
    let v = r.json();
    let info = &v["moeval"]["retrieval"];
    // Attribution names the river document, with the store's identity and its (empty) exclusions.
    let docs = info["documents"].as_array().unwrap();
    assert_eq!(docs.len(), 1, "{info}");
    assert_eq!(docs[0]["owner"], "river_trust", "{info}");
    assert!(docs[0]["document_id"]
        .as_str()
        .unwrap()
        .starts_with("river_trust-"));
    assert_eq!(docs[0]["license"], "cc-by");
    assert!(docs[0]["score"].as_f64().unwrap() > 0.0);
    assert_eq!(
        info["datastore"]["identity"],
        sha256_file(&store.join("manifest.json"))
    );
    assert_eq!(info["datastore"]["excluded_owners"], json!([]));
    assert!(v["moeval"]["effective_mask"]["experts"].is_array());
    // Neither echoed nor counted: the prompt's own tokens only.
    assert_eq!(with_ric.len(), prompt.len());
    assert!(with_ric[0].is_none());
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap(),
        tok.decode(&prompt).unwrap()
    );

    // The prompt's log-probs equal scoring [retrieved block ++ prompt] without retrieval, read from
    // the prompt's second token on: the block is context, never scored.
    let block_id = docs[0]["block_id"].as_u64().unwrap();
    let block = datastore::Datastore::open(&store)
        .unwrap()
        .blocks()
        .unwrap()
        .into_iter()
        .find(|b| b.block_id == block_id)
        .unwrap()
        .tokens;
    assert_eq!(info["retrieved_tokens"], json!([block.len()]));
    let full: Vec<u32> = block.iter().chain(&prompt).copied().collect();
    let plain_full = prompt_logprobs(&s.post("/v1/completions", &scoring(json!({}), &full)));
    for (i, got) in with_ric.iter().enumerate().skip(1) {
        let want = plain_full[block.len() + i].unwrap();
        assert!(
            (got.unwrap() - want).abs() < 1e-4,
            "token {i}: {got:?} vs {want}"
        );
    }
    let plain = prompt_logprobs(&s.post("/v1/completions", &scoring(json!({}), &prompt)));
    assert_ne!(plain, with_ric, "retrieved context changes the scores");

    // Chat and generation use it too.
    let r = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "tide silt delta estuary"}],
                "max_tokens": 2, "temperature": 0, "moeval": {"retrieval": {"mode": "ric"}}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["moeval"]["retrieval"]["k"], 1);
    assert_eq!(
        r.json()["moeval"]["retrieval"]["documents"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Refusals: kNN-LM, bad settings.
    let bad = |ret: Value| {
        s.post(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 1, "moeval": {"retrieval": ret}}),
        )
    };
    assert_error(
        &bad(json!({"mode": "knn", "lambda": 0.3})),
        400,
        "no kNN-LM keys",
    );
    assert_error(&bad(json!({"mode": "ric", "k": 0})), 400, "k must be");
    assert_error(
        &bad(json!({"mode": "ric", "topk": 2})),
        400,
        "unknown field",
    );
    assert_error(&bad(json!({"mode": "bm99"})), 400, "unknown retrieval mode");

    // The river owner opts out of the store while the server runs: the next request never gets it.
    let o = Command::new(env!("CARGO_BIN_EXE_moeval"))
        .args(["datastore", "opt-out"])
        .arg(&store)
        .args(["--owner", "river_trust", "--reason", "withdrawn"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = s.post(
        "/v1/completions",
        &scoring(json!({"retrieval": {"mode": "ric", "k": 16}}), &prompt),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let info = r.json()["moeval"]["retrieval"].clone();
    assert_eq!(info["datastore"]["excluded_owners"], json!(["river_trust"]));
    assert_eq!(
        info["datastore"]["identity"],
        sha256_file(&store.join("manifest.json"))
    );
    let docs = info["documents"].as_array().unwrap();
    assert!(docs.iter().all(|d| d["owner"] != "river_trust"), "{info}");
}

#[test]
fn knn_lm_generation_equals_moeval_eval_and_honours_opt_out() {
    let dir = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    build_store("canary_corpus.jsonl", &store);
    let moeval = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_moeval"))
            .args(["--threads", "2"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (st, fx) = (store.to_str().unwrap(), fixture());
    // Through an approximate index (parts of 1,024 keys), as a large store would be searched.
    moeval(&[
        "datastore",
        "knn",
        st,
        "--model",
        fx.to_str().unwrap(),
        "--knn-index",
        "hnsw",
        "--knn-part-mib",
        "0",
    ]);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/datastore");
    let runs = tmp.path().join("runs");
    moeval(&[
        "eval",
        "--model",
        fx.to_str().unwrap(),
        "--include-path",
        data.to_str().unwrap(),
        "--tasks",
        "canary_gen",
        "--retrieval",
        "knn",
        "--datastore",
        st,
        "--k",
        "16",
        "--temperature",
        "1",
        "--lambda",
        "0.3",
        "--output",
        runs.to_str().unwrap(),
        "--run-id",
        "knn",
    ]);
    let samples = read(
        &Source::parse(runs.join("knn/samples.parquet").to_str().unwrap(), &[]),
        Format::Parquet,
    )
    .unwrap();
    assert!(samples[0]["retrieval"]
        .as_str()
        .unwrap()
        .contains("search=hnsw"));
    let s = Server::start(dir.path(), &["--datastore", st]);
    let knn = json!({"mode": "knn", "k": 16, "temperature": 1, "lambda": 0.3});
    for sample in &samples {
        let args: Value = serde_json::from_str(sample["arguments"].as_str().unwrap()).unwrap();
        let context = args["gen_args_0"]["arg_0"].as_str().unwrap();
        let r = s.post(
            "/v1/completions",
            &json!({"prompt": context, "max_tokens": 6, "temperature": 0,
                    "moeval": {"retrieval": knn}}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        // The same greedy kNN-LM decoding as `moeval eval`.
        assert_eq!(v["choices"][0]["text"], sample["prediction"], "{v}");
        let info = &v["moeval"]["retrieval"];
        assert_eq!(info["mode"], "knn");
        assert_eq!(info["datastore"]["search"], "hnsw");
        let docs = info["documents"].as_array().unwrap();
        assert!(docs.iter().any(|d| d["owner"] == "owner_x"), "{info}");
        let total: f64 = docs.iter().map(|d| d["weight"].as_f64().unwrap()).sum();
        assert!((total - 0.3).abs() < 1e-6, "lambda's share: {total}");
    }

    // Refusals: what kNN-LM cannot do in the server says so.
    let post = |body: Value| s.post("/v1/completions", &body);
    let with = |extra: Value| {
        let mut b = json!({"prompt": "The secret", "max_tokens": 2, "temperature": 0,
                           "moeval": {"retrieval": knn}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    assert_error(&post(with(json!({"temperature": 0.7}))), 400, "greedily");
    assert_error(&post(with(json!({"logprobs": 1}))), 400, "moeval eval");
    assert_error(&post(with(json!({"stream": true}))), 400, "not streamed");
    let bad_k = json!({"moeval": {"retrieval": {"mode": "knn", "k": 0}}});
    assert_error(&post(with(bad_k)), 400, "k must be");
    let bad_mix = json!({"moeval": {"retrieval": {"mode": "knn", "query_tokens": 5}}});
    assert_error(&post(with(bad_mix)), 400, "RIC-LM setting");

    // Owner X leaves while the server runs: the next answer has none of X's neighbours.
    moeval(&["datastore", "opt-out", st, "--owner", "owner_x"]);
    let args: Value = serde_json::from_str(samples[0]["arguments"].as_str().unwrap()).unwrap();
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": args["gen_args_0"]["arg_0"], "max_tokens": 6, "temperature": 0,
                "moeval": {"retrieval": knn}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let info = r.json()["moeval"]["retrieval"].clone();
    assert_eq!(info["datastore"]["excluded_owners"], json!(["owner_x"]));
    let docs = info["documents"].as_array().unwrap();
    assert!(docs.iter().all(|d| d["owner"] != "owner_x"), "{info}");
}

#[test]
fn explicit_policy_file_is_enforced_and_written_by_the_admin_api() {
    let dir = model_dir();
    let owners = tempfile::tempdir().unwrap();
    let policy = owners.path().join("owners-policy.json");
    std::fs::write(
        &policy,
        r#"{"opted_out": [{"expert": "news", "reason": "embargo", "since": "2024-01-01T00:00:00Z"}]}"#,
    )
    .unwrap();
    let tokens = owners.path().join("tokens.toml");
    let hex: String = Sha256::digest(b"math-secret")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        &tokens,
        format!("[[owner]]\nname = \"Math Owner\"\ntoken_sha256 = \"{hex}\"\n"),
    )
    .unwrap();
    let s = Server::start(
        dir.path(),
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--admin-tokens",
            tokens.to_str().unwrap(),
        ],
    );
    let experts = s.get("/v1/experts").json();
    let news = &experts["data"][2];
    assert_eq!(
        (
            news["name"].as_str(),
            news["status"].as_str(),
            news["loaded"].as_bool()
        ),
        (Some("news"), Some("opted-out"), Some(false)),
        "{experts}"
    );
    let body = json!({"prompt": "The sky is", "max_tokens": 2, "temperature": 0});
    assert_eq!(
        mask_of(&s.post("/v1/completions", &body)),
        ["public", "math", "code"]
    );
    let mut force = body.clone();
    force["moeval"] = json!({"experts": ["news"]});
    assert_error(&s.post("/v1/completions", &force), 403, "embargo");
    // Without --datastore, retrieval is refused with a clear message.
    let mut ret = body.clone();
    ret["moeval"] = json!({"retrieval": {"mode": "ric"}});
    assert_error(&s.post("/v1/completions", &ret), 400, "--datastore");

    let r = s.post_raw(
        "/admin/experts/math/opt-out",
        br#"{"reason": "licence withdrawn"}"#,
        &[("Authorization", "Bearer math-secret")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        mask_of(&s.post("/v1/completions", &body)),
        ["public", "code"]
    );
    // The change went to the --policy file and its audit log beside it, not to the model directory.
    let p = routers::Policy::load_file(&policy).unwrap();
    assert!(p.is_opted_out("math") && p.is_opted_out("news"));
    let log = p.audit_log().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].reason, "licence withdrawn");
    assert!(owners.path().join("owners-policy.log.jsonl").exists());
    assert!(!dir.path().join("expert-policy.json").exists());
    assert!(!dir.path().join("expert-policy.log.jsonl").exists());
}
