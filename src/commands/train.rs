use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use engine::config::{Architecture, Config};
use engine::{LoadOptions, Model, Tokenizer};
use train::data::OWNERS;
use train::trainer::{mean_loss, noise_stream, token_stream};
use train::{TrainModel, TrainOptions};

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

fn read_texts(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for file in files {
        out.extend(train::merge::jsonl_texts(file)?);
    }
    anyhow::ensure!(!out.is_empty(), "no documents in {files:?}");
    Ok(out)
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

/// The token stream of one JSON Lines file.
fn stream_of(tok: &Tokenizer, file: &Path, eos: u32) -> Result<Vec<u32>> {
    Ok(token_stream(tok, &read_texts(&[file.to_path_buf()])?, eos)?)
}

fn eos_id(tok: &Tokenizer) -> Result<u32> {
    tok.token_id(train::vocab::EOS).with_context(|| {
        format!(
            "the tokenizer has no `{}` token to separate documents",
            train::vocab::EOS
        )
    })
}

/// Logs the loss of every tenth of `steps` (and the last) with the time since the first.
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

/// Trains `model`, logging progress, and reports held-out loss before and after.
fn fit(
    model: &TrainModel,
    train_stream: &[u32],
    negatives: Option<&[u32]>,
    valid: Option<&[u32]>,
    opts: &TrainOptions,
) -> Result<()> {
    let held_out = |m: &TrainModel| -> Result<Option<f32>> {
        valid
            .map(|v| mean_loss(m, v, opts.seq_len, 64))
            .transpose()
            .map_err(Into::into)
    };
    if let Some(l) = held_out(model)? {
        eprintln!("held-out loss before: {l:.3}");
    }
    train::train(model, train_stream, negatives, opts, progress(opts.steps))?;
    if let Some(l) = held_out(model)? {
        eprintln!("held-out loss after:  {l:.3}");
    }
    Ok(())
}

fn copy_tokenizer(from: &Path, out: &Path) -> Result<()> {
    std::fs::copy(from, out.join("tokenizer.json"))
        .with_context(|| format!("cannot copy {} into {}", from.display(), out.display()))?;
    Ok(())
}

fn run_public(a: PublicArgs) -> Result<()> {
    let tok = Tokenizer::from_file(&a.tokenizer)?;
    let eos = eos_id(&tok)?;
    anyhow::ensure!(
        a.heads > 0 && a.hidden.is_multiple_of(a.heads) && (a.hidden / a.heads).is_multiple_of(2),
        "--hidden must be a multiple of --heads with an even head size"
    );
    let config = Config {
        architecture: Architecture::Olmo2,
        vocab_size: tok.vocab_size(),
        hidden_size: a.hidden,
        intermediate_size: a.intermediate,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        num_key_value_heads: a.heads,
        head_dim: a.hidden / a.heads,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        num_experts: 0,
        num_experts_per_tok: 0,
        norm_topk_prob: false,
        tie_word_embeddings: false,
        clip_qkv: None,
        max_position_embeddings: 4096,
        eos_token_ids: vec![eos],
        pad_token_id: tok.token_id(train::vocab::PAD),
        bos_token_id: None,
    };
    let stream = token_stream(&tok, &read_texts(&a.data)?, eos)?;
    let valid = a
        .valid
        .as_ref()
        .map(|v| stream_of(&tok, v, eos))
        .transpose()?;
    eprintln!(
        "public model: vocab {}, hidden {}, {} layers; {} training tokens",
        config.vocab_size,
        a.hidden,
        a.layers,
        stream.len()
    );
    let model = TrainModel::init_public(config, a.optim.seed)?;
    fit(&model, &stream, None, valid.as_deref(), &a.optim.options())?;
    model.save(&a.out, a.optim.dtype()?)?;
    copy_tokenizer(&a.tokenizer, &a.out)?;
    eprintln!("wrote the public model to {}", a.out.display());
    Ok(())
}

fn run_expert(a: ExpertArgs) -> Result<()> {
    let public = Model::load(&a.public, &LoadOptions::default())
        .with_context(|| format!("cannot load the public model {}", a.public.display()))?;
    anyhow::ensure!(
        public.config().architecture == Architecture::Olmo2,
        "{}: the public model must be a dense olmo2 checkpoint (from `moeval train public`)",
        a.public.display()
    );
    // FlexOlmo's domain-informed router: each row is a domain's mean embedding under the public model,
    // computed exactly as `moeval merge --router domain-embeddings` does.
    let public_row = train::merge::domain_embedding(&public, &a.public_samples)?;
    let owner_row = train::merge::domain_embedding(&public, &a.router_samples)?;
    let tok = public.require_tokenizer()?;
    let eos = eos_id(tok)?;
    let stream = token_stream(tok, &read_texts(&a.data)?, eos)?;
    let valid = a
        .valid
        .as_ref()
        .map(|v| stream_of(tok, v, eos))
        .transpose()?;
    let negatives = match &a.public_data {
        Some(p) => {
            let mut s = stream_of(tok, p, eos)?;
            // Token ids above the special tokens (end of text, padding, unknown).
            let first = 3.min(public.config().vocab_size as u32 - 1);
            let vocab = public.config().vocab_size as u32;
            s.extend(noise_stream(first, vocab, s.len(), a.optim.seed));
            Some(s)
        }
        None => None,
    };
    let tensors = train::model::read_tensors(&a.public)?;
    let model =
        TrainModel::expert_from_public(public.config(), &tensors, [&public_row, &owner_row])?;
    drop(public);
    eprintln!("owner expert: {} training tokens", stream.len());
    let opts = TrainOptions {
        routing_weight: a.routing_weight,
        ..a.optim.options()
    };
    fit(
        &model,
        &stream,
        negatives.as_deref(),
        valid.as_deref(),
        &opts,
    )?;
    model.save(&a.out, a.optim.dtype()?)?;
    copy_tokenizer(&a.public.join("tokenizer.json"), &a.out)?;
    eprintln!("wrote the owner's 2-expert model to {}", a.out.display());
    Ok(())
}

fn run_router(a: RouterArgs) -> Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.opt_out_rate),
        "--opt-out-rate {} must be between 0 and 1",
        a.opt_out_rate
    );
    anyhow::ensure!(
        a.out != a.model,
        "--out must differ from --model: tuning writes a new model"
    );
    anyhow::ensure!(
        !a.out.exists() || std::fs::read_dir(&a.out)?.next().is_none(),
        "{} exists and is not empty; choose a new --out directory",
        a.out.display()
    );
    let model = TrainModel::load(&a.model)
        .and_then(TrainModel::with_trained_routers)
        .with_context(|| format!("cannot load {} for router tuning", a.model.display()))?;
    let tok = Tokenizer::from_file(&a.model.join("tokenizer.json"))?;
    let eos = eos_id(&tok)?;
    let streams = a
        .proxy
        .iter()
        .map(|p| stream_of(&tok, p, eos))
        .collect::<Result<Vec<_>>>()?;
    let opts = a.optim.options();
    for (p, s) in a.proxy.iter().zip(&streams) {
        anyhow::ensure!(
            s.len() > opts.seq_len + 1,
            "{}: {} tokens of proxy text; router tuning needs more than --seq-len + 1 = {}",
            p.display(),
            s.len(),
            opts.seq_len + 1
        );
    }
    let losses = |m: &TrainModel| -> Result<Vec<f32>> {
        streams
            .iter()
            .map(|s| Ok(mean_loss(m, s, opts.seq_len, 32)?))
            .collect()
    };
    let before = losses(&model)?;
    eprintln!(
        "router tuning: {} experts, {} proxy domains, {} steps",
        model.config().num_experts,
        streams.len(),
        opts.steps
    );
    train::tune_routers(
        &model,
        &streams,
        a.opt_out_rate,
        &opts,
        progress(opts.steps),
    )?;
    for ((p, b), after) in a.proxy.iter().zip(&before).zip(losses(&model)?) {
        eprintln!("{}: proxy loss {b:.3} -> {after:.3}", p.display());
    }
    // Written under a hidden name and moved into place when complete: a killed run leaves no
    // half-written model at --out, and running it again (deterministic) gives the same weights.
    let staged = durable::StagedDir::new(&a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    model.save(staged.path(), a.optim.dtype()?)?;
    durable::fault::point("train-router.saved");
    for file in ["tokenizer.json", routers::EXPERTS_FILE] {
        let from = a.model.join(file);
        if from.exists() {
            std::fs::copy(&from, staged.path().join(file)).with_context(|| {
                format!("cannot copy {} into {}", from.display(), a.out.display())
            })?;
        }
    }
    staged
        .commit()
        .with_context(|| format!("cannot move the tuned model into {}", a.out.display()))?;
    eprintln!("wrote the router-tuned model to {}", a.out.display());
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
