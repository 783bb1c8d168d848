//! The moeval engine: loads FlexOlmo, OLMoE and OLMo2 checkpoints in Hugging Face layout and runs them on
//! the CPU in f32 or on an NVIDIA GPU in bf16 ([`cuda`], chosen with [`LoadOptions::device`]), with a
//! per-sequence KV cache, batched log-likelihood scoring and step-wise generation.
//!
//! ```no_run
//! use engine::{Model, LoadOptions, score::{loglikelihood, ScoreRequest, ScoreOptions}};
//! let model = Model::load("path/to/model".as_ref(), &LoadOptions::opting_out(&[2]))?;
//! let tok = model.require_tokenizer()?;
//! let req = ScoreRequest { context: tok.encode("The capital of France is")?, continuation: tok.encode(" Paris")? };
//! let scores = loglikelihood(&model, &[req], &ScoreOptions::default())?;
//! println!("{}", scores[0].total());
//! # Ok::<(), engine::Error>(())
//! ```

mod attention;
pub mod bench;
pub mod config;
pub mod cuda;
mod error;
mod flex_olmo;
pub mod generate;
pub mod init;
mod layers;
pub mod matmul;
mod model;
mod olmo2;
mod olmoe;
pub mod score;
mod tokenizer;
mod vecmath;
mod weights;

pub use attention::KvCache;
pub use config::{Architecture, Config};
pub use error::{Error, Result};
pub use layers::{TensorSource, WeightDtype};
pub use model::{Device, Forward, LoadOptions, Model, RoutedTokens, SeqInput};
pub use routers::{EffectiveMask, ExpertMask, Registry};
pub use tokenizer::Tokenizer;
pub use weights::{to_f32, Weights};
