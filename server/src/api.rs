//! OpenAI-compatible request bodies, their validation, and OpenAI-shaped errors.
//!
//! Bodies are parsed from raw bytes here (not by an extractor) so that every malformed input becomes a
//! 400 in OpenAI's error shape, and so the parser can be fuzzed directly.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error response: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the offending parameter.
    pub fn param(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::invalid(message)
        }
    }

    /// 500 `server_error`. The full message goes to the server's log; the client gets its first line
    /// only, so a backtrace attached to an error never reaches a response.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        eprintln!("error: {message}");
        let first = message.lines().next().unwrap_or_default().to_string();
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", first)
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status.as_u16().to_string(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `prompt`: a string, several strings, token ids, or several lists of token ids (lm-evaluation-harness
/// sends token ids).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// The `"moeval"` extension object of a request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// Experts to leave out of this request (names or indices).
    #[serde(default)]
    pub opt_out: Vec<String>,
    /// Use only these experts. Naming an expert its owner opted out is refused.
    #[serde(default)]
    pub experts: Vec<String>,
    /// Retrieval from a datastore (not supported yet: refused with 400).
    #[serde(default)]
    pub retrieval: Option<Value>,
    /// Keep generating past EOS (for load tests on random weights).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// Sampling settings common to both endpoints.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

/// `stream_options`: with `include_usage`, a stream ends with a chunk holding the token counts.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Top alternatives to report per token (0 reports only the chosen token's log-probability).
    pub logprobs: Option<usize>,
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub moeval: Option<Extension>,
}

/// One chat message; `content` may be a string or a list of text parts.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_completion_tokens: Option<usize>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<usize>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub moeval: Option<Extension>,
}

impl ChatMessage {
    /// The message's text: a string, or its text parts joined.
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(
                    |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        _ => Err(ApiError::param(
                            "messages",
                            "only text content parts are supported",
                        )),
                    },
                )
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
            Some(_) => Err(ApiError::param(
                "messages",
                "message content must be a string or a list of text parts",
            )),
        }
    }
}

/// Parses a JSON body into `T`, mapping every failure to a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid("the request body is empty; send JSON"));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "the request body is not valid JSON for this endpoint: {e}"
        ))
    })
}

/// Sampling settings after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// `None` when the client left it to the server (a default that depends on the endpoint).
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Streams end with a usage chunk.
    pub include_usage: bool,
}

/// Most stop strings a request may give.
const MAX_STOP: usize = 16;

/// Temperatures below this are greedy: dividing logits by a smaller one overflows f32 (and the
/// distribution is already the argmax), as vLLM treats them.
pub const MIN_TEMPERATURE: f64 = 1e-5;

/// `top_p` is raised to at least this: a smaller nucleus rounds to zero in f32 and keeps no token. For
/// any vocabulary under 100,000 tokens the nucleus is then the most likely token alone.
pub const MIN_TOP_P: f64 = 1e-5;

impl Sampling {
    /// Validates ranges the way OpenAI documents them; an unset seed is drawn from the clock.
    pub fn check(self, max_tokens_limit: usize) -> Result<Checked, ApiError> {
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::param("n", "only n = 1 is supported"));
            }
        }
        if let Some(m) = self.max_tokens {
            if m > max_tokens_limit {
                return Err(ApiError::param(
                    "max_tokens",
                    format!("max_tokens is {m}, above this server's limit of {max_tokens_limit}"),
                ));
            }
        }
        let mut temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::param(
                "temperature",
                "temperature must be between 0 and 2",
            ));
        }
        if temperature < MIN_TEMPERATURE {
            temperature = 0.0;
        }
        let top_p = match self.top_p {
            None => None,
            Some(p) if p > 0.0 && p < 1.0 => Some(p.max(MIN_TOP_P)),
            Some(1.0) => None,
            Some(_) => return Err(ApiError::param("top_p", "top_p must be in (0, 1]")),
        };
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::param(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        let stop: Vec<String> = self
            .stop
            .map(Stop::into_vec)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect();
        if stop.len() > MAX_STOP {
            return Err(ApiError::param(
                "stop",
                format!("at most {MAX_STOP} stop strings are allowed"),
            ));
        }
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Ok(Checked {
            max_tokens: self.max_tokens,
            temperature,
            top_p,
            seed,
            stop,
            stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
        })
    }
}

/// Most alternatives a request may ask for per token.
pub const MAX_LOGPROBS: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_of_every_shape() {
        let r: CompletionRequest = parse(br#"{"prompt": [[1, 2], [3]], "max_tokens": 0}"#).unwrap();
        assert!(matches!(r.prompt, Prompt::TokenLists(ref v) if v.len() == 2));
        let r: CompletionRequest = parse(br#"{"prompt": [5, 6]}"#).unwrap();
        assert!(matches!(r.prompt, Prompt::Tokens(_)));
        let r: CompletionRequest = parse(br#"{"prompt": ["a", "b"], "stop": "x"}"#).unwrap();
        assert!(matches!(r.prompt, Prompt::Texts(_)));
        let r: CompletionRequest =
            parse(br#"{"prompt": "a", "moeval": {"opt_out": ["math"]}, "user": "u"}"#).unwrap();
        assert_eq!(r.moeval.unwrap().opt_out, vec!["math"]);
        assert!(parse::<CompletionRequest>(br#"{"prompt": [-1]}"#).is_err());
        assert!(parse::<CompletionRequest>(br#"{"prompt": "a", "moeval": {"bogus": 1}}"#).is_err());
        assert!(parse::<CompletionRequest>(b"").is_err());
    }

    #[test]
    fn sampling_ranges() {
        let s = |j: &str| serde_json::from_str::<Sampling>(j).unwrap().check(100);
        assert!(s(r#"{"temperature": 3}"#).is_err());
        assert!(s(r#"{"top_p": 0}"#).is_err());
        assert!(s(r#"{"n": 2}"#).is_err());
        let e = s(r#"{"max_tokens": 101}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("limit of 100"));
        let ok = s(r#"{"temperature": 0, "top_p": 1, "seed": 3, "stop": ["", "\n"]}"#).unwrap();
        assert_eq!(ok.top_p, None);
        assert_eq!(ok.stop, vec!["\n"]);
        assert_eq!(ok.seed, 3);
        // Tiny values inside the accepted ranges become greedy / the smallest usable nucleus.
        let tiny = s(r#"{"temperature": 1e-38, "top_p": 1e-50}"#).unwrap();
        assert_eq!(tiny.temperature, 0.0);
        assert_eq!(tiny.top_p, Some(MIN_TOP_P));
        assert!(s(r#"{"stream_options": {"include_usage": true}}"#).is_err());
        assert!(
            s(r#"{"stream": true, "stream_options": {"include_usage": true}}"#)
                .unwrap()
                .include_usage
        );
    }

    #[test]
    fn internal_errors_keep_only_their_first_line() {
        let e = ApiError::internal("boom\nstack backtrace:\n   0: src/main.rs:1");
        assert_eq!(e.message, "boom");
    }

    /// Arbitrary bytes (and mutations of valid bodies) never panic the parsers or the checks.
    #[test]
    fn fuzz_parsers_with_arbitrary_bytes() {
        let seeds: [&[u8]; 4] = [
            br#"{"prompt": "hi", "max_tokens": 3, "stop": ["a"], "logprobs": 2, "echo": true}"#,
            br#"{"prompt": [[1,2],[3]], "moeval": {"opt_out": ["x"], "experts": ["0"]}}"#,
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}"#,
            br#"{"messages": [{"role": "user", "content": "x"}], "stream": true, "top_p": 0.5}"#,
        ];
        // A small xorshift generator keeps the test deterministic without another dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..20_000 {
            let mut bytes: Vec<u8> = if i % 2 == 0 {
                seeds[(next() % 4) as usize].to_vec()
            } else {
                (0..next() % 200).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 6) {
                if bytes.is_empty() {
                    break;
                }
                let at = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[at] = next() as u8,
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, b"{}[]\",:0-9e\\"[(next() % 12) as usize]),
                }
            }
            if let Ok(r) = parse::<CompletionRequest>(&bytes) {
                let _ = r.sampling.check(64);
            }
            if let Ok(r) = parse::<ChatRequest>(&bytes) {
                for m in &r.messages {
                    let _ = m.text();
                }
                let _ = r.sampling.check(64);
            }
        }
    }
}
