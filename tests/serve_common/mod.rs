//! A `moeval serve` child process for the end-to-end server tests: loopback only, a free port, killed
//! when the test ends, every request with a timeout.
#![allow(dead_code)]

pub use server::client;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use client::HttpResponse;
use serde_json::Value;

pub const TIMEOUT: Duration = Duration::from_secs(60);

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    /// `moeval --threads 2 serve --model MODEL EXTRA...` on 127.0.0.1 and a free port.
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moeval"))
            .args([
                "--threads",
                "2",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ])
            .arg("--model")
            .arg(model)
            .args(extra)
            .env_remove("MOEVAL_TEST_FAULT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("moeval starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Server {
            child,
            addr,
            _stdout: stdout,
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> HttpResponse {
        client::post_json(self.addr, path, body, TIMEOUT).unwrap()
    }

    pub fn post_raw(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> HttpResponse {
        self.request("POST", path, headers, body)
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, &[], b"")
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        client::request(self.addr, method, path, headers, body, TIMEOUT).unwrap()
    }

    /// A Prometheus counter or gauge from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OpenAI-shaped error with this status whose message names `needle`.
pub fn assert_error(r: &HttpResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(v["error"]["type"].is_string(), "{}", r.text());
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}
