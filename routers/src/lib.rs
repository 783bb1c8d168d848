//! Router math for Mixture-of-Experts layers.
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

mod mask;
mod route;

pub use mask::{ExpertMask, MaskError};
pub use route::Routing;
