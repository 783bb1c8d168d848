//! `GET /v1/models`, `/v1/models/{id}` and `/v1/experts`.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::AppState;

use super::{respond, Shared};

impl AppState {
    fn model_card(&self) -> Value {
        json!({
            "id": self.settings.name, "object": "model", "created": self.created, "owned_by": "moeval",
            "max_model_len": self.model.config().max_position_embeddings,
        })
    }
}

pub async fn models(State(s): Shared) -> Json<Value> {
    Json(json!({"object": "list", "data": [s.model_card()]}))
}

/// `GET /v1/models/{id}`.
pub async fn model(State(s): Shared, Path(id): Path<String>) -> Response {
    let r = s
        .check_model(&Some(id))
        .map(|()| Json(s.model_card()).into_response());
    respond(&s, "models", r)
}

/// Names, owners, domains and current policy status of every expert.
pub async fn experts(State(s): Shared) -> Response {
    let r = (|| {
        let Some(registry) = s.model.registry() else {
            return Ok(Json(json!({"object": "list", "data": []})).into_response());
        };
        let policy = s.policy()?;
        let loaded = s.model.loaded_experts();
        let data: Vec<Value> = registry
            .experts()
            .iter()
            .map(|e| {
                let out = policy.opted_out().iter().find(|p| p.expert == e.name);
                json!({
                    "index": e.index, "name": e.name, "owner": e.owner, "domain": e.domain,
                    "description": e.description,
                    "status": if out.is_some() { "opted-out" } else { "active" },
                    "reason": out.map(|o| &o.reason), "since": out.map(|o| &o.since),
                    "loaded": loaded.is_some_and(|m| m.is_allowed(e.index)),
                })
            })
            .collect();
        Ok(Json(json!({"object": "list", "data": data})).into_response())
    })();
    respond(&s, "experts", r)
}
