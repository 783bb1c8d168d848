//! Training for moeval's shipped default model: synthetic domains with known ground truth ([`data`]),
//! a word-level tokenizer over them ([`vocab`]), the OLMo2 / FlexOlmo forward pass in candle
//! ([`model`]) and an AdamW training loop ([`trainer`]) for FlexOlmo's recipe: a dense public model,
//! then, per data owner and independently, a 2-expert model whose only trained parts are the owner's
//! expert and router row; after `moeval merge` joins the experts, optional router tuning on small proxy
//! samples of every domain. [`merge`] assembles one FlexOlmo model from the separately trained
//! experts (`moeval merge`); [`report`] turns the runs of `just eval` into the ground-truth table.
//! [`recipe`] runs the steps over plain settings; `moeval train` exposes them.

pub mod data;
pub mod dataset;
pub mod merge;
pub mod model;
pub mod recipe;
pub mod report;
pub mod trainer;
pub mod vocab;

use std::path::{Path, PathBuf};

pub use model::TrainModel;
pub use trainer::{train, tune_routers, TrainOptions};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Engine(#[from] engine::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Input(String),
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
