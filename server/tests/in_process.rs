//! The server as a library: started in this process (no child process, no command line) on a free
//! loopback port, answering a completion and refusing a bad request with an OpenAI-shaped error.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use server::{client, Server, Settings};

#[test]
fn a_library_server_answers_and_refuses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default-model");
    let model = harness::load_model(
        &dir,
        &harness::Experts::default(),
        engine::Device::Cpu,
        engine::WeightDtype::default(),
    )
    .expect("the default model loads");
    let settings = Settings::new("default", model.config().max_position_embeddings);
    let rt = server::runtime().unwrap();
    let server = rt
        .block_on(Server::start(
            Arc::new(model),
            settings,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            std::future::pending(),
        ))
        .unwrap();
    let t = Duration::from_secs(60);
    let ok = client::post_json(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "the", "max_tokens": 3, "temperature": 0}),
        t,
    )
    .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["object"], "text_completion");
    assert!(ok.json()["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
    let bad = client::post_json(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "the", "max_tokens": -1}),
        t,
    )
    .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.json()["error"]["message"].as_str().is_some());
    rt.block_on(server.shutdown()).unwrap();
}
