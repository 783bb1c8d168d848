//! `POST /admin/experts/{name}/opt-out` and `/opt-in`: an owner's opt-out through the server.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use routers::{Action, RouterError};
use serde_json::json;

use crate::api::{self, ApiError};
use crate::AppState;

use super::{respond, Shared};

/// `POST /admin/experts/{name}/opt-out` and `/opt-in`, body `{"reason": "..."}` (optional).
pub async fn admin(
    State(s): Shared,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = s.admin_change(&name, &action, &headers, &body);
    respond(&s, "admin", r)
}

impl AppState {
    fn admin_change(
        &self,
        name: &str,
        action: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Response, ApiError> {
        let Some(tokens) = &self.admin else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "the admin API is off; start the server with --admin-tokens FILE",
            ));
        };
        let action = match action {
            "opt-out" => Action::OptOut,
            "opt-in" => Action::OptIn,
            _ => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "no such endpoint: use /admin/experts/{name}/opt-out or /opt-in",
                ))
            }
        };
        let unauthorized = |m: &str| {
            let mut r =
                ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", m).into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Ok(r)
        };
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return unauthorized("send the owner's token as `Authorization: Bearer TOKEN`");
        };
        let Some(owner) = tokens.owner_of(token.trim()) else {
            return unauthorized("the bearer token is not valid");
        };
        let registry = self.model.registry().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "this model is dense: it has no experts",
            )
        })?;
        let index = registry.resolve(name).map_err(|e| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                e.to_string(),
            )
        })?;
        let info = &registry.experts()[index];
        if info.owner.as_deref() != Some(owner) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "owner `{owner}` does not own expert `{}`; an owner can change only its own experts",
                    info.name
                ),
            ));
        }
        #[derive(serde::Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct ChangeBody {
            #[serde(default)]
            reason: String,
        }
        let change: ChangeBody = if body.iter().all(u8::is_ascii_whitespace) {
            ChangeBody::default()
        } else {
            api::parse(body)?
        };
        let _guard = self.policy_write.lock().unwrap_or_else(|p| p.into_inner());
        let mut policy = self.policy()?;
        let reason = if change.reason.is_empty() {
            format!("by {owner} through the admin API")
        } else {
            change.reason
        };
        let actor = format!("admin:{owner}");
        let record = policy
            .record(routers::Decision {
                expert: &info.name,
                owner,
                actor: &actor,
                action,
                reason: &reason,
            })
            .map_err(|e| match e {
                RouterError::Invalid(m) => {
                    ApiError::new(StatusCode::CONFLICT, "invalid_request_error", m)
                }
                other => ApiError::internal(other.to_string()),
            })?;
        let loaded = self
            .model
            .loaded_experts()
            .is_some_and(|m| m.is_allowed(index));
        Ok(Json(json!({
            "expert": record.expert, "action": record.action, "time": record.time,
            "reason": record.reason, "owner": owner,
            "applies_to": "requests admitted from now on",
            "loaded": loaded,
            "note": if action == Action::OptIn && !loaded {
                Some("the expert's weights were not loaded at start; restart the server to serve it")
            } else { None },
        }))
        .into_response())
    }
}
