//! What an evaluation run is and does, as plain functions over settings structs (no command-line
//! types): the engine model as a [`tasks::LanguageModel`] ([`lm`]), the retrieval-augmented models
//! composed on it ([`retrieval`]), run execution with resume ([`run`]), shards and their merge
//! ([`shards`]), routing statistics over documents ([`route`]), experts and owners' decisions
//! ([`experts`]), one prompt's tensors for parity checks ([`inspect`]) and dataset downloads
//! ([`download`]). The `moeval` binary parses arguments, shows progress and prints what these return.
//!
//! Invariants:
//! - A run's numbers depend only on what its manifest records (model hashes, masks, tasks and their
//!   data, scoring and retrieval settings, device); `--resume` reproduces them or refuses.
//! - One process writes a run directory at a time (`run.lock`), and a run's manifest says `complete`
//!   only after every other file of the run is in place.
//! - A merged sharded run equals the run done unsharded: it is re-scored from the shards' request
//!   journals, without a model.
//! - What a model did (tokens routed to each expert, retrieved sources) reaches the results through
//!   the answers that carry it, never through counters read afterwards.

pub mod download;
pub mod experts;
pub mod inspect;
pub mod lm;
pub mod load;
pub mod retrieval;
pub mod route;
pub mod run;
pub mod runs;
pub mod shards;

pub use load::{load_model, Experts};
pub use run::{evaluate, task_registry, EvalSettings, Outcome, Start, Sweep, VariantResult};
