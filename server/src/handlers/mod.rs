//! HTTP handlers, one file per endpoint family: requests become engine jobs, engine events become
//! OpenAI-shaped responses. This file holds what every endpoint shares: body limits, the API key,
//! response counting and the fallbacks.

mod admin;
mod admission;
mod generate;
mod metrics;
mod models;
mod stream;

pub use admin::admin;
pub use generate::{chat_completions, completions};
pub use metrics::metrics;
pub use models::{experts, model, models};

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::api::ApiError;
use crate::AppState;

pub(crate) type Shared = State<Arc<AppState>>;

/// Counts the response in the metrics and sends it.
pub(crate) fn respond(
    s: &AppState,
    endpoint: &'static str,
    r: Result<Response, ApiError>,
) -> Response {
    let resp = r.unwrap_or_else(IntoResponse::into_response);
    s.metrics.count_request(endpoint, resp.status().as_u16());
    resp
}

/// Largest request body, as OpenAI's and vLLM's servers accept by default.
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// Reads every request's body before routing: within `--read-timeout-secs` (408 otherwise, so a slow
/// client cannot hold a connection open forever) and at most [`MAX_BODY`] bytes (413), both errors in
/// OpenAI's shape.
pub async fn read_body(
    State(s): Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use futures_util::StreamExt;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {MAX_BODY} bytes"),
        )
        .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(s.settings.read_timeout, async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if buf.len() + chunk.len() > MAX_BODY {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok::<_, String>(true)
    })
    .await;
    match read {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return too_large(),
        Ok(Err(e)) => {
            return ApiError::invalid(format!("cannot read the request body: {e}")).into_response()
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "the request body did not arrive within the server's --read-timeout-secs",
            )
            .into_response()
        }
    }
    next.run(axum::extract::Request::from_parts(parts, buf.into()))
        .await
}

/// With `--api-key`, the /v1 endpoints need `Authorization: Bearer KEY` (401 otherwise).
pub async fn require_api_key(
    State(s): Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use sha2::Digest;
    let Some(want) = &s.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Digests of equal length compared in full, so timing does not tell how much of the key matched.
    let ok = given.is_some_and(|g| {
        let got: [u8; 32] = sha2::Sha256::digest(g.as_bytes()).into();
        got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if ok {
        return next.run(req).await;
    }
    let mut r = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "this server needs an API key: send `Authorization: Bearer KEY`",
    )
    .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this endpoint does not accept that method",
    )
}
