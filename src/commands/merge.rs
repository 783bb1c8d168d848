//! `moeval merge`: flags for [`train::merge`], and what it prints.

use std::path::PathBuf;

use anyhow::Result;

/// `moeval merge`: assemble one FlexOlmo model from experts that owners trained separately.
///
/// Each `--expert NAME=DIR` is a 2-expert FlexOlmo checkpoint trained from the same public model: expert 0
/// is the public FFN (frozen), expert 1 the owner's. Attention, embeddings, norms and the LM head must be
/// identical in every input and in the public model; the merged model's expert 0 is the public FFN and
/// expert i the i-th owner's, with router rows in the same order.
#[derive(clap::Args)]
#[command(after_help = "Example:
  moeval merge --public ./public --expert math=./flex-math --expert news=./flex-news --out ./merged")]
pub struct Args {
    /// The public model: a dense OLMo2 checkpoint, or a FlexOlmo checkpoint whose expert 0 is public.
    #[arg(long)]
    public: PathBuf,
    /// An owner's 2-expert FlexOlmo checkpoint, as NAME=DIR (repeat, in the order of the merged experts).
    #[arg(long = "expert", value_name = "NAME=DIR", required = true)]
    experts: Vec<String>,
    /// Output directory (created; must be empty or absent).
    #[arg(long)]
    out: PathBuf,
    /// Router rows: `from-experts` (each owner's trained row) or `domain-embeddings` (the mean final
    /// hidden state of the public model over each owner's `--samples`).
    #[arg(long, default_value = "from-experts")]
    router: String,
    /// Sample documents for domain-embedding router rows, as NAME=FILE.jsonl (a `text` field per line);
    /// `public=FILE` sets the public row too (otherwise it is taken from the first owner's checkpoint).
    #[arg(long, value_name = "NAME=FILE")]
    samples: Vec<String>,
    /// FlexOlmo's negative router bias for an owner's expert, as NAME=B (applied as min(B, 0)).
    #[arg(long, value_name = "NAME=B")]
    bias: Vec<String>,
    /// Experts per token in the merged model (default: the inputs' value, at most the expert count).
    #[arg(long)]
    top_k: Option<usize>,
    /// Owner recorded for the public expert in experts.toml.
    #[arg(long, default_value = "public")]
    public_owner: String,
}

pub fn run(a: Args) -> Result<()> {
    let s = train::merge::MergeSettings {
        public: a.public,
        experts: a.experts,
        out: a.out,
        router: a.router,
        samples: a.samples,
        bias: a.bias,
        top_k: a.top_k,
        public_owner: a.public_owner,
    };
    let m = train::merge::merge(&s)?;
    eprintln!(
        "merged public + {} experts ({}) into {} (top-{}, router: {})",
        m.experts.len(),
        m.experts.join(", "),
        s.out.display(),
        m.top_k,
        s.router
    );
    Ok(())
}
