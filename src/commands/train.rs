use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use train::data::OWNERS;
use train::recipe::{self, Fit};
use train::TrainOptions;

/// `moeval train`: FlexOlmo's recipe on the CPU, step by step.
#[derive(clap::Args)]
#[command(after_help = "FlexOlmo's recipe, as `just train-default` runs it:
  moeval train data --seed 0 --out data/ --tasks-out assets/suite/data/trained
  moeval train public --data data/public/train.jsonl --valid data/public/valid.jsonl \\
      --tokenizer data/tokenizer.json --steps 1200 --out public/
  moeval train expert --public public/ --data data/math/train.jsonl --valid data/math/valid.jsonl \\
      --router-samples data/math/valid.jsonl --public-samples data/public/valid.jsonl \\
      --public-data data/public/train.jsonl --steps 1000 --out math/
  (one `train expert` per owner: its own data, plus public text and random tokens for the router)
  moeval merge --public public/ --expert math=math/ ... --router from-experts --out merged/
  moeval train router --model merged/ --proxy data/public/valid.jsonl --proxy data/math/valid.jsonl \
      ... --steps 1000 --batch 40 --lr 1e-2 --out tuned/
  (optional router tuning on the samples each owner already released for its router embedding)

With your own data: any JSON Lines files with a `text` field, and a tokenizer.json.")]
pub struct Args {
    #[command(subcommand)]
    step: Step,
}

#[derive(clap::Subcommand)]
enum Step {
    /// Generate the synthetic domains (public, math, code, news, reviews), the tokenizer and the
    /// evaluation data: deterministic for a seed.
    Data(DataArgs),
    /// Step 1: train a dense OLMo2 public model on public text.
    Public(PublicArgs),
    /// Step 2: train one owner's expert: a 2-expert FlexOlmo whose expert 0 is the public FFN (frozen)
    /// and expert 1 a copy trained, with its router row, on the owner's data only.
    Expert(ExpertArgs),
    /// Step 4 (optional, FlexOlmo's router tuning): train only the routers of a merged model on small
    /// proxy samples of every domain (optionally with random single-expert opt-outs); experts and
    /// everything else stay frozen.
    Router(RouterArgs),
    /// The ground-truth table of the trained suite (Markdown) from `just eval`'s runs: perplexity per
    /// domain and opt-out, capability and bias scores, routing shares, kNN-LM with the news datastore.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// Folder holding the runs `default` (trained suite, leave-one-out sweep), `own-<domain>` (the
    /// domain's perplexity with the public expert and its owner's alone), `knn-news` and
    /// `knn-news-optout` (news perplexity, news expert opted out, kNN-LM over the news datastore
    /// before and after the news owner left it).
    #[arg(long)]
    runs: PathBuf,
    /// Write the Markdown here (also printed).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DataArgs {
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Writes OUT/tokenizer.json and OUT/<domain>/{train,valid,test}.jsonl (`id`, `owner`, `text`).
    #[arg(long)]
    out: PathBuf,
    /// Training documents per domain.
    #[arg(long, default_value_t = 6000)]
    train_docs: usize,
    /// Validation and test documents per domain (each).
    #[arg(long, default_value_t = 200)]
    held_out: usize,
    /// Also write the evaluation data here: arithmetic and code multiple choice, the CALM-format bias
    /// rows, each domain's test documents (perplexity) and the news and public validation documents
    /// (the retrieval datastore).
    #[arg(long)]
    tasks_out: Option<PathBuf>,
    /// Test documents per domain in the perplexity tasks.
    #[arg(long, default_value_t = 40)]
    ppl_docs: usize,
}

/// Settings shared by both training steps.
#[derive(clap::Args)]
struct Optim {
    #[arg(long, default_value_t = 600)]
    steps: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Peak AdamW learning rate (linear warm-up, cosine decay to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seeds the initial weights (public step) and the order of training windows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weights on disk: bf16 (small) or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

impl Optim {
    fn options(&self) -> TrainOptions {
        TrainOptions {
            steps: self.steps,
            batch: self.batch,
            seq_len: self.seq_len,
            lr: self.lr,
            warmup: (self.steps / 20).max(1),
            seed: self.seed,
            ..TrainOptions::default()
        }
    }

    fn dtype(&self) -> Result<DType> {
        match self.dtype.as_str() {
            "bf16" => Ok(DType::BF16),
            "f32" => Ok(DType::F32),
            other => bail!("--dtype `{other}`: choose bf16 or f32"),
        }
    }
}

#[derive(clap::Args)]
struct PublicArgs {
    /// Training documents: JSON Lines with a `text` field (repeatable).
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Held-out documents whose loss is reported before and after training.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// The tokenizer.json the model uses (copied into --out). Token 0 must be `<|endoftext|>`.
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 96)]
    hidden: usize,
    #[arg(long, default_value_t = 256)]
    intermediate: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[command(flatten)]
    optim: Optim,
}

#[derive(clap::Args)]
struct ExpertArgs {
    /// The public model (a dense OLMo2 checkpoint from `train public`).
    #[arg(long)]
    public: PathBuf,
    /// The owner's training documents (JSON Lines, `text`; repeatable). Nothing else is read for training.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// The owner's held-out documents whose loss is reported before and after training.
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Public documents (JSON Lines, `text`) shown to the router as negatives, with as many tokens
    /// of random vocabulary: they train only the owner's router row, to prefer the public expert on
    /// text that is not the owner's (no language-model loss).
    #[arg(long)]
    public_data: Option<PathBuf>,
    /// Weight of that routing loss.
    #[arg(long, default_value_t = 1.0)]
    routing_weight: f64,
    /// Owner documents whose mean public-model embedding initialises the owner's router row (FlexOlmo's
    /// domain-informed router).
    #[arg(long)]
    router_samples: PathBuf,
    /// Public documents whose mean embedding is the public expert's router row (frozen). Every owner must
    /// use the same file, so that `moeval merge` finds identical public rows.
    #[arg(long)]
    public_samples: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    optim: Optim,
}

#[derive(clap::Args)]
struct RouterArgs {
    /// The merged model (`moeval merge`), a flex_olmo checkpoint.
    #[arg(long)]
    model: PathBuf,
    /// One domain's proxy documents (JSON Lines, `text`), repeatable: every step draws equally from
    /// each. Use the samples owners released for their router embeddings (`--router-samples`).
    #[arg(long, required = true)]
    proxy: Vec<PathBuf>,
    /// Share of steps that remove one owner's expert (chosen uniformly; never the public expert 0),
    /// so the routers learn to route around an opted-out owner (0.1 and 0.25 did not help the shipped
    /// model: plain tuning already keeps single opt-outs within 20% on other domains).
    #[arg(long, default_value_t = 0.0)]
    opt_out_rate: f64,
    /// The tuned model (weights, config, tokenizer and experts.toml).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    optim: Optim,
}

pub fn run(a: Args) -> Result<()> {
    match a.step {
        Step::Data(d) => run_data(d),
        Step::Public(p) => run_public(p),
        Step::Expert(e) => run_expert(e),
        Step::Router(r) => run_router(r),
        Step::Report(r) => report(&r.runs, r.out.as_deref()),
    }
}

/// Prints the loss at every tenth of `steps` (and the last) with the time since the first.
fn progress(steps: usize) -> impl FnMut(usize, f32) {
    let start = Instant::now();
    let every = (steps / 10).max(1);
    move |step, loss| {
        if step % every == 0 || step + 1 == steps {
            eprintln!(
                "step {:>5}/{steps}  loss {loss:.3}  {:.0}s",
                step + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
}

fn print_fit(fit: &Fit) {
    eprintln!("{} training tokens", fit.tokens);
    if let Some((before, after)) = fit.held_out {
        eprintln!("held-out loss before: {before:.3}");
        eprintln!("held-out loss after:  {after:.3}");
    }
}

fn run_data(a: DataArgs) -> Result<()> {
    let vocab = train::dataset::write(&train::dataset::DataSettings {
        seed: a.seed,
        out: a.out.clone(),
        train_docs: a.train_docs,
        held_out: a.held_out,
        tasks_out: a.tasks_out,
        ppl_docs: a.ppl_docs,
    })?;
    eprintln!(
        "wrote {} domains ({} training documents each) and a {vocab}-token tokenizer to {}",
        OWNERS.len() + 1,
        a.train_docs,
        a.out.display()
    );
    Ok(())
}

fn run_public(a: PublicArgs) -> Result<()> {
    let options = a.optim.options();
    eprintln!(
        "public model: hidden {}, {} layers, {} steps",
        a.hidden, a.layers, options.steps
    );
    let fit = recipe::public(
        &recipe::PublicSettings {
            tokenizer: a.tokenizer,
            data: a.data,
            valid: a.valid,
            out: a.out.clone(),
            hidden: a.hidden,
            intermediate: a.intermediate,
            layers: a.layers,
            heads: a.heads,
            dtype: a.optim.dtype()?,
            options,
        },
        &mut progress(a.optim.steps),
    )?;
    print_fit(&fit);
    eprintln!("wrote the public model to {}", a.out.display());
    Ok(())
}

fn run_expert(a: ExpertArgs) -> Result<()> {
    eprintln!("owner expert: {} steps", a.optim.steps);
    let fit = recipe::expert(
        &recipe::ExpertSettings {
            public: a.public,
            data: a.data,
            valid: a.valid,
            public_data: a.public_data,
            router_samples: a.router_samples,
            public_samples: a.public_samples,
            out: a.out.clone(),
            options: TrainOptions {
                routing_weight: a.routing_weight,
                ..a.optim.options()
            },
            dtype: a.optim.dtype()?,
        },
        &mut progress(a.optim.steps),
    )?;
    print_fit(&fit);
    eprintln!("wrote the owner's 2-expert model to {}", a.out.display());
    Ok(())
}

fn run_router(a: RouterArgs) -> Result<()> {
    eprintln!(
        "router tuning: {} proxy domains, {} steps",
        a.proxy.len(),
        a.optim.steps
    );
    let fit = recipe::router(
        &recipe::RouterSettings {
            model: a.model,
            proxy: a.proxy,
            opt_out_rate: a.opt_out_rate,
            out: a.out.clone(),
            options: a.optim.options(),
            dtype: a.optim.dtype()?,
        },
        &mut progress(a.optim.steps),
    )?;
    for (p, before, after) in &fit.proxy_losses {
        eprintln!("{}: proxy loss {before:.3} -> {after:.3}", p.display());
    }
    eprintln!(
        "wrote the router-tuned model ({} experts) to {}",
        fit.experts,
        a.out.display()
    );
    Ok(())
}

/// `moeval train report`: prints the ground-truth table and writes it to `out`.
fn report(runs: &Path, out: Option<&Path>) -> Result<()> {
    let md = train::report::markdown(runs)?;
    if let Some(path) = out {
        std::fs::write(path, &md).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{md}");
    Ok(())
}
