//! Router math for Mixture-of-Experts layers, expert names, and owners' opt-out policy.
//!
//! FlexOlmo and OLMoE route each token with a softmax over *all* experts followed by a top-k choice.
//! An [`ExpertMask`] removes experts from that choice. Masked logits become `-inf` before the softmax,
//! which is mathematically identical to deleting the expert's router row and weights: the softmax over the
//! remaining experts is the same, and so is the top-k among them.
//!
//! ```
//! use routers::{ExpertMask, Routing};
//! let routing = Routing { top_k: 2, norm_topk_prob: false };
//! let mask = ExpertMask::all(4).without(&[2]).unwrap();
//! let chosen = routing.route(&[0.1, 0.3, 5.0, -1.0], &mask);
//! assert_eq!(chosen.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 0]);
//! ```
//!
//! Experts get names and owners from an `experts.toml` sidecar ([`Registry`]); owners' decisions live in a
//! [`Policy`] beside the checkpoint, and [`effective_mask`] combines both with a run's requests.

mod mask;
mod policy;
mod registry;
mod route;

use std::path::PathBuf;

pub use mask::{ExpertMask, MaskError};
pub use policy::{
    effective_mask, Action, AuditRecord, Decision, EffectiveMask, OptOutEntry, Policy, AUDIT_FILE,
    POLICY_FILE,
};
pub use registry::{ExpertInfo, Registry, EXPERTS_FILE};
pub use route::Routing;

/// Errors naming experts, reading sidecars and applying policy.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("unknown expert `{spec}`; this model's experts are: {}", known.join(", "))]
    UnknownExpert { spec: String, known: Vec<String> },
    #[error(
        "expert `{expert}` is opted out by its owner ({reason}); the policy in {} forbids using it",
        policy.display()
    )]
    RefusedByPolicy {
        expert: String,
        policy: PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Mask(#[from] MaskError),
    #[error("{0}")]
    Invalid(String),
}
