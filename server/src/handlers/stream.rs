//! Server-sent events for streamed completions: text deltas that never leak a stop string.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use engine::generate::TokenLogprob;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::ApiError;
use crate::worker::{self, Event};
use crate::AppState;

use super::generate::{finish_reason, unix_now, JobSpec, LogprobsBuilder};

/// Whose chunks a stream sends.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum StreamKind {
    Completion,
    Chat,
}

/// Turns generated tokens into text deltas. Text that could still turn out to begin a stop string, or
/// that ends in an unfinished UTF-8 character, is held back until it is certain; text from a stop string
/// on is never sent.
pub struct TextDelta {
    pub(super) tokens: Vec<u32>,
    pub(super) sent: usize,
    pub(super) hold: usize,
    pub(super) stop: Vec<String>,
}

impl TextDelta {
    pub fn new(stop: &[String]) -> Self {
        Self {
            tokens: Vec::new(),
            sent: 0,
            hold: stop.iter().map(|s| s.len()).max().unwrap_or(1) - 1,
            stop: stop.to_vec(),
        }
    }

    pub fn push(&mut self, text_of: impl Fn(&[u32]) -> String, token: u32) -> String {
        self.tokens.push(token);
        let text = text_of(&self.tokens);
        // The token that completes a stop string arrives before the engine reports the stop.
        let mut end = match self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            Some(cut) => cut,
            None => text.len().saturating_sub(self.hold),
        };
        while end > 0 && !text.is_char_boundary(end) {
            end -= 1;
        }
        // A trailing U+FFFD may be a character whose remaining bytes come with the next token; a U+FFFD
        // followed by other text is final.
        if end == text.len() {
            end = text.trim_end_matches('\u{FFFD}').len();
        }
        if end <= self.sent || !text.is_char_boundary(self.sent) {
            return String::new();
        }
        let out = text[self.sent..end].to_string();
        self.sent = end;
        out
    }

    /// The rest of the final text.
    pub fn finish(&mut self, final_text: &str) -> String {
        let out = final_text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = final_text.len().max(self.sent);
        out
    }
}

/// How a stream's chunks look.
pub(super) struct StreamOut {
    pub(super) kind: StreamKind,
    pub(super) id: String,
    /// The `moeval` object of the last chunk.
    pub(super) report: Value,
    /// Chunks carry the log-probabilities of their tokens.
    pub(super) logprobs: bool,
    /// `stream_options.include_usage`: the prompt's token count, for the usage chunk.
    pub(super) usage: Option<usize>,
}

pub(super) struct StreamState {
    pub(super) app: Arc<AppState>,
    pub(super) rx: mpsc::UnboundedReceiver<Event>,
    pub(super) out: StreamOut,
    pub(super) deadline: Instant,
    pub(super) delta: TextDelta,
    /// Tokens whose log-probabilities have not gone out yet (they ride with the next text).
    pub(super) tokens: Vec<TokenLogprob>,
    /// Length of the text sent so far (the completions `text_offset` of the next token).
    pub(super) offset: usize,
    pub(super) pending: VecDeque<String>,
    pub(super) ended: bool,
}

impl StreamState {
    pub(super) fn chunk(
        &mut self,
        text: Option<&str>,
        finish: Option<&str>,
        first: bool,
    ) -> String {
        let tokens = std::mem::take(&mut self.tokens);
        let logprobs = match (self.out.logprobs, self.out.kind) {
            (false, _) => Value::Null,
            (true, StreamKind::Completion) => {
                let mut lp = LogprobsBuilder {
                    offset: self.offset,
                    ..LogprobsBuilder::default()
                };
                for t in &tokens {
                    lp.push(&self.app, t.token, Some(t.logprob), Some(&t.top));
                }
                lp.into_json()
            }
            (true, StreamKind::Chat) => json!({"content": tokens.iter()
                .map(|t| self.app.chat_logprob(t)).collect::<Vec<_>>()}),
        };
        self.offset += text.map_or(0, str::len);
        let out = &self.out;
        let base = |object: &str, choice: Value| {
            json!({"id": out.id, "object": object, "created": unix_now(),
                   "model": self.app.settings.name, "choices": [choice]})
        };
        let mut v = match out.kind {
            StreamKind::Completion => base(
                "text_completion",
                json!({"index": 0, "text": text.unwrap_or_default(), "logprobs": logprobs,
                       "finish_reason": finish}),
            ),
            StreamKind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                base(
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}),
                )
            }
        };
        if out.usage.is_some() {
            // As OpenAI: every chunk has `usage: null` but the last, which has only the counts.
            v["usage"] = Value::Null;
        }
        if finish.is_some() {
            // The whole `moeval` object: the effective mask, and retrieval's sources when on.
            v["moeval"] = out.report.clone();
        }
        v.to_string()
    }

    pub(super) fn usage_chunk(&self, completion_tokens: usize) -> Option<String> {
        let prompt_tokens = self.out.usage?;
        let object = match self.out.kind {
            StreamKind::Completion => "text_completion",
            StreamKind::Chat => "chat.completion.chunk",
        };
        Some(
            json!({"id": self.out.id, "object": object, "created": unix_now(),
                   "model": self.app.settings.name, "choices": [],
                   "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}})
            .to_string(),
        )
    }

    pub(super) async fn next_lines(&mut self) {
        let grace = tokio::time::Instant::from_std(self.deadline);
        let ev = match tokio::time::timeout_at(grace, self.rx.recv()).await {
            Err(_) => Event::Failed {
                timeout: true,
                message: String::new(),
            },
            Ok(None) => Event::Failed {
                timeout: false,
                message: "the engine stopped".into(),
            },
            Ok(Some(ev)) => ev,
        };
        match ev {
            Event::Prompt(_) => {}
            Event::Token(t) => {
                let tok = self.app.model.tokenizer();
                let text = self.delta.push(
                    |ids| tok.and_then(|k| k.decode(ids).ok()).unwrap_or_default(),
                    t.token,
                );
                self.tokens.push(t);
                if !text.is_empty() {
                    let line = self.chunk(Some(&text), None, false);
                    self.pending.push_back(line);
                }
            }
            Event::Done(g) => {
                if self.out.kind == StreamKind::Chat {
                    // Chat log-probabilities cover the content's tokens, not the EOS that ended it.
                    let sent = self.delta.tokens.len() - self.tokens.len();
                    self.tokens.truncate(g.tokens.len().saturating_sub(sent));
                }
                let rest = self.delta.finish(&g.text);
                if !rest.is_empty() || !self.tokens.is_empty() {
                    let line = self.chunk(Some(&rest), None, false);
                    self.pending.push_back(line);
                }
                let line = self.chunk(None, Some(finish_reason(&g)), false);
                self.pending.push_back(line);
                if let Some(line) = self.usage_chunk(g.tokens.len()) {
                    self.pending.push_back(line);
                }
                self.pending.push_back("[DONE]".into());
                self.ended = true;
            }
            Event::Failed { timeout, message } => {
                let e = if timeout {
                    worker::timeout_error()
                } else {
                    ApiError::internal(message)
                };
                self.pending.push_back(e.body().to_string());
                self.pending.push_back("[DONE]".into());
                self.ended = true;
            }
        }
    }
}

impl AppState {
    /// Server-sent events: one chunk per text delta (with its tokens' log-probabilities when asked), a
    /// final chunk with the finish reason and the effective mask, a usage chunk when asked, then
    /// `[DONE]`. Dropping the stream (client gone) drops the receiver, which cancels the sequence.
    pub(super) fn stream(
        self: Arc<Self>,
        rx: mpsc::UnboundedReceiver<Event>,
        out: StreamOut,
        spec: JobSpec,
    ) -> Response {
        let kind = out.kind;
        let mut st = StreamState {
            app: self,
            rx,
            out,
            deadline: spec.deadline,
            delta: TextDelta::new(&spec.params.stop),
            tokens: Vec::new(),
            offset: 0,
            pending: VecDeque::new(),
            ended: false,
        };
        if kind == StreamKind::Chat {
            let first = st.chunk(None, None, true);
            st.pending.push_back(first);
        }
        let stream = futures_util::stream::unfold(st, |mut st| async move {
            while st.pending.is_empty() && !st.ended {
                st.next_lines().await;
            }
            let line = st.pending.pop_front()?;
            Some((Ok::<_, Infallible>(SseEvent::default().data(line)), st))
        });
        Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::TextDelta;

    #[test]
    pub(super) fn deltas_hold_back_possible_stop_strings() {
        // Each "token" is one character of this text.
        let text = "ab\nc";
        let decode = |ids: &[u32]| {
            ids.iter()
                .map(|&i| &text[i as usize..i as usize + 1])
                .collect()
        };
        let mut d = TextDelta::new(&["\nc".into()]);
        let mut out = String::new();
        for i in 0..3 {
            out.push_str(&d.push(decode, i));
        }
        // "\n" may begin the stop string: held back.
        assert_eq!(out, "ab");
        out.push_str(&d.finish("ab"));
        assert_eq!(out, "ab");
        let mut d = TextDelta::new(&[]);
        let mut out: String = (0..4).map(|i| d.push(decode, i)).collect();
        out.push_str(&d.finish(text));
        assert_eq!(out, text);
    }

    #[test]
    pub(super) fn a_completed_stop_string_never_leaks_its_first_character() {
        let text = "ab\nc";
        let decode = |ids: &[u32]| {
            ids.iter()
                .map(|&i| &text[i as usize..i as usize + 1])
                .collect()
        };
        let mut d = TextDelta::new(&["\nc".into()]);
        // The token completing the stop string arrives before the engine's stop.
        let out: String = (0..4).map(|i| d.push(decode, i)).collect();
        assert_eq!(out, "ab");
    }

    #[test]
    pub(super) fn only_a_trailing_replacement_character_is_held_back() {
        // Token 1 is the first byte of a two-byte character that token 2 completes; token 0 holds a
        // U+FFFD for good.
        let decode = |ids: &[u32]| match ids.len() {
            1 => "x\u{FFFD}y".to_string(),
            2 => "x\u{FFFD}yz\u{FFFD}".to_string(),
            _ => "x\u{FFFD}yzé!".to_string(),
        };
        let mut d = TextDelta::new(&[]);
        assert_eq!(d.push(decode, 0), "x\u{FFFD}y");
        assert_eq!(d.push(decode, 1), "z");
        assert_eq!(d.push(decode, 2), "é!");
    }
}
