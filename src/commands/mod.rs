//! One module per subcommand.

pub mod bench;
pub mod compare;
pub mod datastore;
pub mod download;
pub mod eval;
pub mod experts;
pub mod forward;
pub mod gate;
pub mod generate;
pub mod init_model;
pub mod merge;
pub mod report;
pub mod route;
pub mod serve;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::Result;
use engine::Model;

/// The Python interpreter for task files' `!function` hooks, shared by the commands that load tasks.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PythonArg {
    /// Python interpreter that runs task files' `!function` hooks (lm-evaluation-harness task code:
    /// process_docs, doc_to_text, ...): an environment with the tasks' own dependencies, e.g.
    /// `datasets` for process_docs. Default: $MOEVAL_PYTHON, else python3 on PATH. Started once per
    /// run, and only when a task has hooks.
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
}

impl PythonArg {
    /// The hook handle (no process yet).
    pub fn hooks(&self) -> tasks::Hooks {
        tasks::Hooks::new(self.python.clone())
    }
}

/// Expert selection shared by every command that runs a model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ExpertArgs {
    /// Experts to leave out, by name (from experts.toml) or index: `--opt-out math,2`. Their weights are
    /// never read. Owners' opt-outs recorded with `moeval experts opt-out` always apply as well.
    #[arg(long, value_name = "EXPERTS")]
    pub opt_out: Vec<String>,
    /// Use only these experts (names or indices). Naming an expert its owner opted out is refused.
    #[arg(long, value_name = "EXPERTS")]
    pub experts: Vec<String>,
}

impl From<ExpertArgs> for harness::Experts {
    fn from(a: ExpertArgs) -> Self {
        harness::Experts {
            opt_out: a.opt_out,
            experts: a.experts,
        }
    }
}

/// Where and how commands run a model: the global `--device` and `--dtype`.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub device: engine::Device,
    pub dtype: engine::WeightDtype,
}

/// Loads a model directory with the given expert selection ([`harness::load_model`]).
pub fn load_model_with(dir: &Path, experts: &ExpertArgs, at: Placement) -> Result<Model> {
    harness::load_model(dir, &experts.clone().into(), at.device, at.dtype)
}

/// How `--retrieval` uses the datastore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Retrieval in context: BM25 top-k blocks prepended to the context.
    Ric,
    /// kNN-LM: interpolate with a distribution over the nearest datastore positions.
    Knn,
}

/// Retrieval options of `moeval eval` ([`harness::retrieval::RetrievalSettings`]).
#[derive(clap::Args, Clone, Debug)]
pub struct RetrievalArgs {
    /// Augment the model with a datastore: `ric` (BM25 blocks in context) or `knn` (kNN-LM).
    #[arg(long, value_enum, requires = "datastore")]
    pub retrieval: Option<ModeArg>,
    /// Datastore directory (`moeval datastore build`).
    #[arg(long, requires = "retrieval")]
    pub datastore: Option<PathBuf>,
    /// Blocks to prepend (ric, default 1) or neighbours (knn, default 1024).
    #[arg(long = "k", value_name = "K")]
    pub k: Option<usize>,
    /// kNN-LM interpolation weight of p_kNN.
    #[arg(long, default_value_t = 0.3)]
    pub lambda: f64,
    /// kNN-LM softmax temperature over negative squared L2 distances.
    #[arg(long, default_value_t = 10.0)]
    pub temperature: f32,
    /// RIC-LM query: this many context tokens before the scored span.
    #[arg(long, default_value_t = 512)]
    pub query_tokens: usize,
    /// SILO perplexity protocol for rolling log-likelihood: windows of this many tokens ...
    #[arg(long, requires = "ppl_stride")]
    pub ppl_window: Option<usize>,
    /// ... every this many tokens; only each window's newest tokens are scored.
    #[arg(long, requires = "ppl_window")]
    pub ppl_stride: Option<usize>,
}

impl From<RetrievalArgs> for harness::retrieval::RetrievalSettings {
    fn from(a: RetrievalArgs) -> Self {
        use harness::retrieval::Mode;
        harness::retrieval::RetrievalSettings {
            retrieval: a.retrieval.map(|m| match m {
                ModeArg::Ric => Mode::Ric,
                ModeArg::Knn => Mode::Knn,
            }),
            datastore: a.datastore,
            k: a.k,
            lambda: a.lambda,
            temperature: a.temperature,
            query_tokens: a.query_tokens,
            ppl_window: a.ppl_window,
            ppl_stride: a.ppl_stride,
        }
    }
}
