//! `moeval serve` against misbehaving and exacting clients: exact echoed log-probabilities (EOS
//! included), sampling settings that cannot break a batch, slow and idle connections, shutdown with a
//! client that never reads, streaming details, body limits, API keys and a server-wide expert selection.
//! Servers run on the tiny-flexolmo fixture, over loopback, killed when their test ends.

mod serve_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::client::{self, HttpResponse};
use serve_common::{assert_error, Server, TIMEOUT};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-flexolmo")
}

/// A writable copy of the fixture with named experts and a chat template; `config` edits config.json.
fn model_dir(config: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    std::fs::write(
        dir.path().join("experts.toml"),
        "[[expert]]\nindex = 0\nname = \"public\"\n[[expert]]\nindex = 1\nname = \"math\"\n\
         [[expert]]\nindex = 2\nname = \"news\"\n[[expert]]\nindex = 3\nname = \"code\"\n",
    )
    .unwrap();
    let edit = |name: &str, f: &mut dyn FnMut(&mut Value)| {
        let p = dir.path().join(name);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
    };
    edit("tokenizer_config.json", &mut |v| {
        v["chat_template"] = json!("{% for m in messages %}{{ m.content }}{% endfor %}");
    });
    let mut config = Some(config);
    edit("config.json", &mut |v| {
        if let Some(f) = config.take() {
            f(v)
        }
    });
    dir
}

fn no_internals(body: &str) {
    for bad in ["backtrace", ".rs:", "panicked", "\\n   "] {
        assert!(!body.contains(bad), "{bad:?} in {body}");
    }
}

#[test]
fn echoed_logprobs_keep_a_generated_eos() {
    let prompt = "The quick brown fox";
    let echo = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                      "echo": true});
    // The greedy next token of this prompt (its bytes, from chat log-probabilities: the template
    // renders the content alone), made the model's EOS in a second copy.
    let plain = model_dir(|_| {});
    let s = Server::start(plain.path(), &[]);
    let r = s.post("/v1/completions", &echo);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let scores = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    let prompt_len = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(scores.len(), prompt_len + 1);
    let chat = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 1,
                "temperature": 0, "logprobs": true, "moeval": {"ignore_eos": true}}),
    );
    let bytes: Vec<u8> = serde_json::from_value(
        chat.json()["choices"][0]["logprobs"]["content"][0]["bytes"].clone(),
    )
    .unwrap();
    let eos_id = byte_level_id(&plain, &bytes);
    drop(s);

    let eos = model_dir(|v| v["eos_token_id"] = json!(eos_id));
    let s = Server::start(eos.path(), &[]);
    let v = s.post("/v1/completions", &echo).json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let got = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    // Every prompt token and the EOS: a client dropping the last entry keeps the whole prompt.
    assert_eq!(got.len(), prompt_len + 1, "{v}");
    assert_eq!(got[..], scores[..]);
}

/// The id of a byte-level BPE token from its bytes (printable bytes spell themselves, the others the
/// characters from U+0100 on, in byte order).
fn byte_level_id(dir: &tempfile::TempDir, bytes: &[u8]) -> u32 {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    let alphabet: Vec<char> = (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect();
    let spelled: String = bytes.iter().map(|&b| alphabet[b as usize]).collect();
    let t: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap())
            .unwrap();
    t["model"]["vocab"][&spelled]
        .as_u64()
        .unwrap_or_else(|| panic!("no token {spelled:?}")) as u32
}

#[test]
fn tiny_temperature_and_top_p_cannot_break_a_batch() {
    let dir = model_dir(|_| {});
    let s = Server::start(dir.path(), &[]);
    let addr = s.addr;
    let bodies = [
        json!({"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 1e-38, "seed": 1}),
        json!({"prompt": [5, 6, 8], "max_tokens": 8, "temperature": 1.0, "top_p": 1e-50, "seed": 2}),
        json!({"prompt": [5, 6, 9], "max_tokens": 8, "temperature": 0.7, "seed": 3}),
        json!({"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0}),
    ];
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| {
            std::thread::spawn(move || client::post_json(addr, "/v1/completions", &b, TIMEOUT))
        })
        .collect();
    let out: Vec<HttpResponse> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    for r in &out {
        assert_eq!(r.status, 200, "{}", r.text());
        no_internals(&r.text());
    }
    // A temperature too small to divide by is greedy.
    assert_eq!(
        out[0].json()["choices"][0]["text"],
        out[3].json()["choices"][0]["text"]
    );
    assert_error(
        &s.post(
            "/v1/completions",
            &json!({"prompt": "a", "temperature": -1}),
        ),
        400,
        "temperature",
    );
    assert_eq!(
        s.post("/v1/completions", &json!({"prompt": "a", "top_p": 1.5}))
            .json()["error"]["param"],
        "top_p"
    );
}

#[test]
fn streams_carry_logprobs_usage_and_never_leak_a_stop_string() {
    let dir = model_dir(|_| {});
    let s = Server::start(dir.path(), &[]);
    let base = json!({"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0,
                      "moeval": {"ignore_eos": true}});
    let full = s.post("/v1/completions", &base).json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop at a string of two characters from the middle of the text.
    let at = full
        .char_indices()
        .map(|(i, _)| i)
        .nth(full.chars().count() / 2)
        .unwrap();
    let stop: String = full[at..].chars().take(2).collect();
    let cut = &full[..full.find(&stop).unwrap()];
    for (path, body) in [
        ("/v1/completions", base.clone()),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "The quick brown fox"}],
                   "max_tokens": 24, "temperature": 0, "moeval": {"ignore_eos": true}}),
        ),
    ] {
        let chat = path.contains("chat");
        let mut b = body.clone();
        b["stop"] = json!([stop]);
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
        if chat {
            b["logprobs"] = json!(true);
            b["top_logprobs"] = json!(2);
        } else {
            b["logprobs"] = json!(2);
        }
        let r = s.post(path, &b);
        assert_eq!(r.status, 200, "{}", r.text());
        let events = client::sse_data(&r.body);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let (mut text, mut logprobs) = (String::new(), 0);
        for c in &chunks {
            let Some(choice) = c["choices"].get(0) else {
                continue;
            };
            let piece = if chat {
                choice["delta"]["content"].as_str()
            } else {
                choice["text"].as_str()
            };
            text.push_str(piece.unwrap_or_default());
            let lp = &choice["logprobs"];
            logprobs += if chat {
                lp["content"].as_array().map_or(0, Vec::len)
            } else {
                lp["tokens"].as_array().map_or(0, Vec::len)
            };
        }
        if !chat {
            assert_eq!(text, cut, "{events:?}");
        }
        assert!(!text.contains(&stop), "{text:?} holds {stop:?}");
        assert!(logprobs > 0, "no logprobs in {events:?}");
        // The last chunk holds only the usage.
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        let u = &usage["usage"];
        assert!(u["prompt_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            u["total_tokens"].as_u64(),
            Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
        );
        assert_eq!(logprobs as u64, u["completion_tokens"].as_u64().unwrap());
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c["usage"].is_null()));
    }
}

#[test]
fn bodies_models_api_key_and_server_wide_experts() {
    let dir = model_dir(|_| {});
    let s = Server::start(
        dir.path(),
        &[
            "--api-key",
            "sekrit",
            "--opt-out",
            "news",
            "--served-model-name",
            "tiny",
        ],
    );
    let auth = [("Authorization", "Bearer sekrit")];
    let post = |body: &Value, headers: &[(&str, &str)]| {
        s.request(
            "POST",
            "/v1/completions",
            headers,
            body.to_string().as_bytes(),
        )
    };
    let body = json!({"prompt": "hello", "max_tokens": 2, "temperature": 0});
    // API key: the inference endpoints need it, /health does not.
    assert_error(&post(&body, &[]), 401, "API key");
    assert_error(
        &post(&body, &[("Authorization", "Bearer nope")]),
        401,
        "API key",
    );
    assert_error(&s.request("GET", "/v1/models", &[], b""), 401, "API key");
    assert_eq!(s.request("GET", "/health", &[], b"").status, 200);
    // GET /v1/models/{id}.
    let m = s.request("GET", "/v1/models/tiny", &auth, b"");
    assert_eq!(m.status, 200, "{}", m.text());
    assert_eq!(m.json()["id"], "tiny");
    assert_error(
        &s.request("GET", "/v1/models/other", &auth, b""),
        404,
        "does not exist",
    );
    // Over-limit bodies: an OpenAI-shaped 413.
    // The server answers as soon as it sees the length and closes, so the client may fail to write the
    // rest: send the head alone and read the answer.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\n\
         Content-Length: {}\r\n\r\n",
        2 * 1024 * 1024 + 1
    )
    .unwrap();
    let mut got = String::new();
    let _ = c.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 413"), "{got:?}");
    let answer = &got[got.find("\r\n\r\n").unwrap() + 4..];
    let v: Value = serde_json::from_str(answer).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than"),
        "{v}"
    );
    // The server's --opt-out applies to every request; a request can narrow but not widen it.
    let r = post(&body, &auth);
    assert_eq!(r.status, 200, "{}", r.text());
    let mask = &r.json()["moeval"]["effective_mask"];
    assert_eq!(mask["experts"], json!(["public", "math", "code"]));
    assert_eq!(mask["opted_out_by_server"], json!(["news"]));
    let mut narrower = body.clone();
    narrower["moeval"] = json!({"opt_out": ["math"]});
    let r = post(&narrower, &auth);
    assert_eq!(
        r.json()["moeval"]["effective_mask"]["experts"],
        json!(["public", "code"])
    );
    let mut wider = body.clone();
    wider["moeval"] = json!({"experts": ["public", "news"]});
    assert_error(&post(&wider, &auth), 403, "news");
    // The same as a request's own opt-out on a server without one.
    drop(s);
    let s = Server::start(dir.path(), &[]);
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 2, "temperature": 0,
                                              "logprobs": 0, "moeval": {"opt_out": ["news"]}}),
    );
    drop(s);
    let s = Server::start(dir.path(), &["--opt-out", "news"]);
    let r3 = s.post(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 2, "temperature": 0,
                                               "logprobs": 0}),
    );
    assert_eq!(
        r.json()["choices"][0]["logprobs"]["token_logprobs"],
        r3.json()["choices"][0]["logprobs"]["token_logprobs"]
    );
}

/// Open descriptors of a process (Linux).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn idle_and_slow_clients_are_bounded_and_shutdown_has_a_deadline() {
    let dir = model_dir(|_| {});
    let s = Server::start(
        dir.path(),
        &[
            "--max-connections",
            "8",
            "--read-timeout-secs",
            "1",
            "--shutdown-timeout-secs",
            "1",
        ],
    );
    let pid = s.child.id();
    let before = open_fds(pid);
    // Many connections that never send a byte: at most 8 are kept, each for at most the read timeout.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(s.addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        open_fds(pid) <= before + 8 + 2,
        "{} descriptors open, {before} before",
        open_fds(pid)
    );
    // /health answers again once the idle ones have timed out.
    let start = Instant::now();
    let health = loop {
        match client::request(s.addr, "GET", "/health", &[], b"", Duration::from_secs(5)) {
            Ok(r) => break r,
            Err(_) if start.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("/health never answered: {e}"),
        }
    };
    assert_eq!(health.status, 200);
    drop(idle);
    // A body that never finishes: 408 after the read timeout.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
        .unwrap();
    let mut got = String::new();
    let _ = c.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
    // A streaming client that stops reading cannot keep a SIGTERM'd server alive.
    let mut slow = TcpStream::connect(s.addr).unwrap();
    let body = json!({"prompt": [5, 6], "max_tokens": 200, "stream": true, "temperature": 0,
                      "moeval": {"ignore_eos": true}})
    .to_string();
    write!(
        slow,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 16];
    slow.read_exact(&mut first).unwrap();
    let mut s = s;
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let start = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the server is still running 15 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(slow);
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_with_the_same_scores() {
    let dir = model_dir(|_| {});
    let prompt: Vec<u32> = (0..120).map(|i| 5 + (i * 37) % 400).collect();
    let body =
        json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": true});
    let whole = Server::start(dir.path(), &[])
        .post("/v1/completions", &body)
        .json();
    let chunked = Server::start(dir.path(), &["--prefill-chunk", "7"])
        .post("/v1/completions", &body)
        .json();
    let lps = |v: &Value| -> Vec<f64> {
        v["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    assert_eq!(whole["choices"][0]["text"], chunked["choices"][0]["text"]);
    let (a, b) = (lps(&whole), lps(&chunked));
    assert_eq!(a.len(), prompt.len() - 1 + 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}
