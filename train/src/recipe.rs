//! FlexOlmo's recipe as three steps over plain settings ([`public`], [`expert`], [`router`]), each
//! reading JSON Lines documents, training, and writing a checkpoint with its tokenizer. Each step
//! reports its training loss through a callback and returns what it measured; `moeval train` prints.
//!
//! Invariant: a step that writes over an existing model directory never leaves it half-written:
//! router tuning stages its output and moves it into place whole.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::DType;
use engine::config::{Architecture, Config};
use engine::{LoadOptions, Model, Tokenizer};

use crate::trainer::{mean_loss, noise_stream, token_stream};
use crate::{TrainModel, TrainOptions};

/// Receives `(step, loss)` after every optimiser step.
pub type OnStep<'a> = &'a mut dyn FnMut(usize, f32);

/// What a training step measured.
#[derive(Clone, Debug)]
pub struct Fit {
    /// Tokens in the training stream.
    pub tokens: usize,
    /// Mean held-out loss before and after training (when held-out documents were given).
    pub held_out: Option<(f32, f32)>,
}

/// `moeval train public`: a dense OLMo2 model on public text.
#[derive(Clone, Debug)]
pub struct PublicSettings {
    pub tokenizer: PathBuf,
    pub data: Vec<PathBuf>,
    pub valid: Option<PathBuf>,
    pub out: PathBuf,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub options: TrainOptions,
    /// Weights on disk.
    pub dtype: DType,
}

/// `moeval train expert`: one owner's 2-expert model from the public model.
#[derive(Clone, Debug)]
pub struct ExpertSettings {
    pub public: PathBuf,
    pub data: Vec<PathBuf>,
    pub valid: Option<PathBuf>,
    /// Public documents shown to the router as negatives (with as many random tokens).
    pub public_data: Option<PathBuf>,
    pub router_samples: PathBuf,
    pub public_samples: PathBuf,
    pub out: PathBuf,
    /// `options.routing_weight` weighs the routing loss on the negatives.
    pub options: TrainOptions,
    pub dtype: DType,
}

/// `moeval train router`: the routers of a merged model, tuned on proxy samples.
#[derive(Clone, Debug)]
pub struct RouterSettings {
    pub model: PathBuf,
    pub proxy: Vec<PathBuf>,
    pub opt_out_rate: f64,
    pub out: PathBuf,
    pub options: TrainOptions,
    pub dtype: DType,
}

/// What router tuning measured.
#[derive(Clone, Debug)]
pub struct RouterFit {
    pub experts: usize,
    /// Each proxy file's mean loss before and after tuning.
    pub proxy_losses: Vec<(PathBuf, f32, f32)>,
}

/// The documents (`text` fields) of JSON Lines files; an error when there are none.
pub fn read_texts(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for file in files {
        out.extend(crate::merge::jsonl_texts(file)?);
    }
    ensure!(!out.is_empty(), "no documents in {files:?}");
    Ok(out)
}

/// The token stream of one JSON Lines file.
fn stream_of(tok: &Tokenizer, file: &Path, eos: u32) -> Result<Vec<u32>> {
    Ok(token_stream(tok, &read_texts(&[file.to_path_buf()])?, eos)?)
}

fn eos_id(tok: &Tokenizer) -> Result<u32> {
    tok.token_id(crate::vocab::EOS).with_context(|| {
        format!(
            "the tokenizer has no `{}` token to separate documents",
            crate::vocab::EOS
        )
    })
}

/// Trains `model` and measures held-out loss before and after.
fn fit(
    model: &TrainModel,
    train_stream: &[u32],
    negatives: Option<&[u32]>,
    valid: Option<&[u32]>,
    opts: &TrainOptions,
    on_step: OnStep,
) -> Result<Fit> {
    let held_out = |m: &TrainModel| -> Result<Option<f32>> {
        valid
            .map(|v| mean_loss(m, v, opts.seq_len, 64))
            .transpose()
            .map_err(Into::into)
    };
    let before = held_out(model)?;
    crate::train(model, train_stream, negatives, opts, on_step)?;
    let after = held_out(model)?;
    Ok(Fit {
        tokens: train_stream.len(),
        held_out: before.zip(after),
    })
}

fn copy_tokenizer(from: &Path, out: &Path) -> Result<()> {
    std::fs::copy(from, out.join("tokenizer.json"))
        .with_context(|| format!("cannot copy {} into {}", from.display(), out.display()))?;
    Ok(())
}

/// Step 1: trains and writes the public model.
pub fn public(s: &PublicSettings, on_step: OnStep) -> Result<Fit> {
    let tok = Tokenizer::from_file(&s.tokenizer)?;
    let eos = eos_id(&tok)?;
    ensure!(
        s.heads > 0 && s.hidden.is_multiple_of(s.heads) && (s.hidden / s.heads).is_multiple_of(2),
        "--hidden must be a multiple of --heads with an even head size"
    );
    let config = Config {
        architecture: Architecture::Olmo2,
        vocab_size: tok.vocab_size(),
        hidden_size: s.hidden,
        intermediate_size: s.intermediate,
        num_hidden_layers: s.layers,
        num_attention_heads: s.heads,
        num_key_value_heads: s.heads,
        head_dim: s.hidden / s.heads,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        num_experts: 0,
        num_experts_per_tok: 0,
        norm_topk_prob: false,
        tie_word_embeddings: false,
        clip_qkv: None,
        max_position_embeddings: 4096,
        eos_token_ids: vec![eos],
        pad_token_id: tok.token_id(crate::vocab::PAD),
        bos_token_id: None,
    };
    let stream = token_stream(&tok, &read_texts(&s.data)?, eos)?;
    let valid = s
        .valid
        .as_ref()
        .map(|v| stream_of(&tok, v, eos))
        .transpose()?;
    let model = TrainModel::init_public(config, s.options.seed)?;
    let fit = fit(&model, &stream, None, valid.as_deref(), &s.options, on_step)?;
    model.save(&s.out, s.dtype)?;
    copy_tokenizer(&s.tokenizer, &s.out)?;
    Ok(fit)
}

/// Step 2: trains and writes one owner's expert (with its router row) from the public model.
pub fn expert(s: &ExpertSettings, on_step: OnStep) -> Result<Fit> {
    let public = Model::load(&s.public, &LoadOptions::default())
        .with_context(|| format!("cannot load the public model {}", s.public.display()))?;
    ensure!(
        public.config().architecture == Architecture::Olmo2,
        "{}: the public model must be a dense olmo2 checkpoint (from `moeval train public`)",
        s.public.display()
    );
    // FlexOlmo's domain-informed router: each row is a domain's mean embedding under the public model,
    // computed exactly as `moeval merge --router domain-embeddings` does.
    let public_row = crate::merge::domain_embedding(&public, &s.public_samples)?;
    let owner_row = crate::merge::domain_embedding(&public, &s.router_samples)?;
    let tok = public.require_tokenizer()?;
    let eos = eos_id(tok)?;
    let stream = token_stream(tok, &read_texts(&s.data)?, eos)?;
    let valid = s
        .valid
        .as_ref()
        .map(|v| stream_of(tok, v, eos))
        .transpose()?;
    let negatives = match &s.public_data {
        Some(p) => {
            let mut neg = stream_of(tok, p, eos)?;
            // Token ids above the special tokens (end of text, padding, unknown).
            let first = 3.min(public.config().vocab_size as u32 - 1);
            let vocab = public.config().vocab_size as u32;
            neg.extend(noise_stream(first, vocab, neg.len(), s.options.seed));
            Some(neg)
        }
        None => None,
    };
    let tensors = crate::model::read_tensors(&s.public)?;
    let model =
        TrainModel::expert_from_public(public.config(), &tensors, [&public_row, &owner_row])?;
    drop(public);
    let fit = fit(
        &model,
        &stream,
        negatives.as_deref(),
        valid.as_deref(),
        &s.options,
        on_step,
    )?;
    model.save(&s.out, s.dtype)?;
    copy_tokenizer(&s.public.join("tokenizer.json"), &s.out)?;
    Ok(fit)
}

/// Step 4 (optional): tunes the routers of a merged model and writes it whole to `out`.
pub fn router(s: &RouterSettings, on_step: OnStep) -> Result<RouterFit> {
    ensure!(
        (0.0..=1.0).contains(&s.opt_out_rate),
        "--opt-out-rate {} must be between 0 and 1",
        s.opt_out_rate
    );
    ensure!(
        s.out != s.model,
        "--out must differ from --model: tuning writes a new model"
    );
    ensure!(
        !s.out.exists() || std::fs::read_dir(&s.out)?.next().is_none(),
        "{} exists and is not empty; choose a new --out directory",
        s.out.display()
    );
    let model = TrainModel::load(&s.model)
        .and_then(TrainModel::with_trained_routers)
        .with_context(|| format!("cannot load {} for router tuning", s.model.display()))?;
    let tok = Tokenizer::from_file(&s.model.join("tokenizer.json"))?;
    let eos = eos_id(&tok)?;
    let streams = s
        .proxy
        .iter()
        .map(|p| stream_of(&tok, p, eos))
        .collect::<Result<Vec<_>>>()?;
    let opts = &s.options;
    for (p, st) in s.proxy.iter().zip(&streams) {
        ensure!(
            st.len() > opts.seq_len + 1,
            "{}: {} tokens of proxy text; router tuning needs more than --seq-len + 1 = {}",
            p.display(),
            st.len(),
            opts.seq_len + 1
        );
    }
    let losses = |m: &TrainModel| -> Result<Vec<f32>> {
        streams
            .iter()
            .map(|st| Ok(mean_loss(m, st, opts.seq_len, 32)?))
            .collect()
    };
    let before = losses(&model)?;
    crate::tune_routers(&model, &streams, s.opt_out_rate, opts, on_step)?;
    let proxy_losses = s
        .proxy
        .iter()
        .zip(before)
        .zip(losses(&model)?)
        .map(|((p, b), a)| (p.clone(), b, a))
        .collect();
    // Written under a hidden name and moved into place when complete: a killed run leaves no
    // half-written model at --out, and running it again (deterministic) gives the same weights.
    let staged = durable::StagedDir::new(&s.out)
        .with_context(|| format!("cannot write {}", s.out.display()))?;
    model.save(staged.path(), s.dtype)?;
    durable::fault::point("train-router.saved");
    for file in ["tokenizer.json", routers::EXPERTS_FILE] {
        let from = s.model.join(file);
        if from.exists() {
            std::fs::copy(&from, staged.path().join(file)).with_context(|| {
                format!("cannot copy {} into {}", from.display(), s.out.display())
            })?;
        }
    }
    staged
        .commit()
        .with_context(|| format!("cannot move the tuned model into {}", s.out.display()))?;
    Ok(RouterFit {
        experts: model.config().num_experts,
        proxy_losses,
    })
}
