//! A loaded causal language model: embeddings, decoder blocks of one architecture, final norm and head.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::Tensor;
use routers::{effective_mask, EffectiveMask, ExpertMask, Policy, Registry};

use crate::attention::{KvCache, SeqSpan};
use crate::config::{Architecture, Config};
use crate::cuda::{CudaModel, Gpu};
use crate::layers::{self, Batch, Holding, RmsNorm, TensorSource, WeightDtype};
use crate::matmul::Linear;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;
use crate::{flex_olmo, olmo2, olmoe, Error, Result};

enum Block {
    FlexOlmo(flex_olmo::Block),
    Olmoe(olmoe::Block),
    Olmo2(olmo2::Block),
}

impl Block {
    fn forward(&self, x: &Tensor, layer: usize, batch: &mut Batch<'_>) -> Result<Tensor> {
        match self {
            Block::FlexOlmo(b) => b.forward(x, layer, batch),
            Block::Olmoe(b) => b.forward(x, layer, batch),
            Block::Olmo2(b) => b.forward(x, layer, batch),
        }
    }
}

/// Where a model's forward passes run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// The CPU, in f32.
    #[default]
    Cpu,
    /// CUDA GPU `n`: bf16 weights and activations, f32 accumulation.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::Input(format!(
                        "unknown device `{s}`: use cpu, cuda or cuda:N (N = GPU index)"
                    ))
                }),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Options for [`Model::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Experts to leave out, by name (from `experts.toml`) or index; comma-separated lists are accepted.
    /// Their weights are never read, and no sequence can route to them.
    pub opt_out: Vec<String>,
    /// When non-empty, use only these experts (names or indices). Naming an expert that its owner opted
    /// out in the checkpoint's policy is an error.
    pub experts: Vec<String>,
    /// Where to run (default: the CPU).
    pub device: Device,
    /// How the CPU holds projection weights (`--dtype`; default: as the checkpoint stores them).
    pub dtype: WeightDtype,
}

impl LoadOptions {
    /// Options that opt out the given expert indices.
    pub fn opting_out(indices: &[usize]) -> Self {
        Self {
            opt_out: indices.iter().map(|i| i.to_string()).collect(),
            ..Self::default()
        }
    }
}

/// One sequence of a forward call: new tokens, the cache they extend, and optionally a narrower expert mask.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Experts this sequence may use; `None` means every loaded expert. Must be within the loaded experts.
    pub mask: Option<&'a ExpertMask>,
}

/// What a forward call returns.
pub struct Forward {
    /// Final hidden states (after the final norm, the input of the LM head), one row per new token, sequences
    /// concatenated in input order.
    pub hidden: Tensor,
    /// First row of each sequence in `hidden`.
    pub starts: Vec<usize>,
    /// Router logits `[tokens, experts]` per MoE layer, when asked for.
    pub router_logits: Option<Vec<Tensor>>,
    /// Tokens this pass routed to each expert (empty for dense models).
    pub routed: RoutedTokens,
}

/// Tokens routed to each expert, `[layer][expert]`, each token counted once per expert it is sent
/// to. Empty for dense models. Forward passes return theirs; callers add them up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutedTokens(pub Vec<Vec<u64>>);

impl RoutedTokens {
    /// Adds `other`'s counts (growing to its shape).
    pub fn add(&mut self, other: &RoutedTokens) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), Vec::new());
        }
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            if mine.len() < theirs.len() {
                mine.resize(theirs.len(), 0);
            }
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m += t;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

enum Backend {
    Cpu {
        /// `[vocab, hidden]`, held as the projections are (rows widened to f32 when looked up).
        embed_tokens: crate::matmul::Weight,
        blocks: Vec<Block>,
        norm: RmsNorm,
        lm_head: Linear,
    },
    Cuda(Box<CudaModel>),
}

/// A FlexOlmo, OLMoE or OLMo2 model, on the CPU (f32) or a CUDA GPU (bf16).
pub struct Model {
    config: Config,
    backend: Backend,
    device: Device,
    loaded: Option<ExpertMask>,
    experts: Option<(Registry, EffectiveMask)>,
    tokenizer: Option<Tokenizer>,
    dir: Option<PathBuf>,
    /// The dtype(s) the projection weights are held in (`f32`, `bf16`, `bf16+f32`).
    weights_dtype: String,
    /// True when `--dtype bf16` rounded wider weights (numbers differ from the checkpoint's).
    weights_rounded: bool,
}

impl Model {
    /// Loads a Hugging Face model directory: `config.json`, `tokenizer.json` and the safetensors weights.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Input(format!(
                "model directory {} does not exist",
                dir.display()
            )));
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let experts = if config.is_moe() {
            let registry = Registry::load(dir, config.num_experts)?;
            let policy = Policy::load(dir)?;
            let effective = effective_mask(&registry, &policy, &opts.opt_out, &opts.experts)?;
            Some((registry, effective))
        } else {
            Self::check_dense(&config, opts)?;
            None
        };
        let weights = Weights::open(dir)?;
        let mut model = Self::build(config, &weights, experts, opts)?;
        model.tokenizer = Some(tokenizer);
        model.dir = Some(dir.to_path_buf());
        Ok(model)
    }

    /// Builds a model from any tensor source (random-weight presets, or weights without a directory's
    /// tokenizer and policy). Experts are unnamed (`expert-N`) and no policy applies.
    pub fn from_source(config: Config, src: &dyn TensorSource, opts: &LoadOptions) -> Result<Self> {
        let experts = if config.is_moe() {
            let registry = Registry::unnamed(config.num_experts);
            let mut by_request = registry.resolve_list(&opts.opt_out)?;
            let only = registry.resolve_list(&opts.experts)?;
            if !only.is_empty() {
                by_request.extend((0..config.num_experts).filter(|i| !only.contains(i)));
            }
            by_request.sort_unstable();
            by_request.dedup();
            let mask = ExpertMask::all(config.num_experts).without(&by_request)?;
            let effective = EffectiveMask {
                mask,
                by_policy: Vec::new(),
                by_request,
            };
            Some((registry, effective))
        } else {
            Self::check_dense(&config, opts)?;
            None
        };
        Self::build(config, src, experts, opts)
    }

    fn check_dense(config: &Config, opts: &LoadOptions) -> Result<()> {
        if opts.opt_out.is_empty() && opts.experts.is_empty() {
            return Ok(());
        }
        Err(Error::Input(format!(
            "this {} model is dense: it has no experts to opt out or select",
            config.architecture.model_type()
        )))
    }

    fn build(
        config: Config,
        src: &dyn TensorSource,
        experts: Option<(Registry, EffectiveMask)>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let device = opts.device;
        let loaded = experts.as_ref().map(|(_, e)| e.mask.clone());
        let biases = experts
            .as_ref()
            .map(|(r, _)| r.router_biases())
            .unwrap_or_default();
        let mut weights_dtype = String::from("bf16");
        let mut weights_rounded = false;
        let backend = match device {
            Device::Cpu => {
                let held = Holding::new(src, opts.dtype);
                let b = Self::build_cpu(&config, &held, loaded.as_ref(), &biases)?;
                weights_dtype = held.held();
                weights_rounded = held.rounded.into_inner();
                b
            }
            Device::Cuda(ordinal) => Backend::Cuda(Box::new(CudaModel::load(
                Arc::new(Gpu::open(ordinal)?),
                &config,
                src,
                loaded.as_ref(),
                &biases,
            )?)),
        };
        Ok(Self {
            config,
            backend,
            device,
            loaded,
            experts,
            tokenizer: None,
            dir: None,
            weights_dtype,
            weights_rounded,
        })
    }

    fn build_cpu(
        config: &Config,
        src: &dyn TensorSource,
        loaded: Option<&ExpertMask>,
        biases: &[f32],
    ) -> Result<Backend> {
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embed = src.weight("model.embed_tokens.weight", &[v, h])?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let block = match (config.architecture, loaded) {
                (Architecture::FlexOlmo, Some(m)) => {
                    Block::FlexOlmo(flex_olmo::Block::load(src, config, layer, m, biases)?)
                }
                (Architecture::Olmoe, Some(m)) => {
                    Block::Olmoe(olmoe::Block::load(src, config, layer, m, biases)?)
                }
                _ => Block::Olmo2(olmo2::Block::load(src, config, layer)?),
            };
            blocks.push(block);
        }
        let norm = RmsNorm::load(src, "model.norm", h, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings && !src.contains("lm_head.weight") {
            Linear::from_weight(embed.clone(), v, h)
        } else {
            layers::linear(src, "lm_head", v, h)?
        };
        let embed_tokens = embed;
        Ok(Backend::Cpu {
            embed_tokens,
            blocks,
            norm,
            lm_head,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The dtype(s) the projection weights are held in on the CPU (`f32`, `bf16`, `f16`, or several
    /// `+`-joined); compute is f32 either way. `bf16` on a GPU.
    pub fn weights_dtype(&self) -> &str {
        &self.weights_dtype
    }

    /// True when loading rounded wider weights to bf16 (`--dtype bf16` on an f32 or f16
    /// checkpoint): its answers are not the checkpoint's f32 answers.
    pub fn weights_rounded(&self) -> bool {
        self.weights_rounded
    }

    /// Where the model runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The device's own name (`cpu`, or the GPU's name).
    pub fn device_name(&self) -> String {
        match &self.backend {
            Backend::Cpu { .. } => "cpu".into(),
            Backend::Cuda(c) => c.device_name().to_string(),
        }
    }

    /// The tokenizer, when the model was loaded from a directory.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The tokenizer, or an error saying the model has none.
    pub fn require_tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Input("this model has no tokenizer (random-weight preset)".into())
        })
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Experts loaded (all minus the opted-out ones); `None` for dense models.
    pub fn loaded_experts(&self) -> Option<&ExpertMask> {
        self.loaded.as_ref()
    }

    /// Names and owners of the experts (from `experts.toml`, or `expert-N`); `None` for dense models.
    pub fn registry(&self) -> Option<&Registry> {
        self.experts.as_ref().map(|(r, _)| r)
    }

    /// The experts this model may use and why the others are out (policy or request); `None` for dense
    /// models. Runs record it with their results.
    pub fn effective_mask(&self) -> Option<&EffectiveMask> {
        self.experts.as_ref().map(|(_, e)| e)
    }

    /// An empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        match &self.backend {
            Backend::Cpu { .. } => layers::new_cache(&self.config),
            Backend::Cuda(c) => KvCache::on_gpu(c.cache_row()),
        }
    }

    /// Runs new tokens of several sequences through the model, extending each sequence's cache.
    ///
    /// Sequences are never padded: each one's result is the same whatever else is in the batch.
    pub fn forward(
        &self,
        seqs: &mut [SeqInput<'_>],
        record_router_logits: bool,
    ) -> Result<Forward> {
        self.run(seqs, record_router_logits, false)
    }

    /// Like [`forward`](Self::forward), but `hidden` holds only each sequence's last row (`starts[i] ==
    /// i`): what generation and the context pass of scoring need. On a GPU the other rows never leave it.
    pub fn forward_last(&self, seqs: &mut [SeqInput<'_>]) -> Result<Forward> {
        self.run(seqs, false, true)
    }

    fn run(
        &self,
        seqs: &mut [SeqInput<'_>],
        record_router_logits: bool,
        last_only: bool,
    ) -> Result<Forward> {
        let v = self.config.vocab_size as u32;
        let mut ids = Vec::new();
        let mut starts = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            if s.tokens.is_empty() {
                return Err(Error::Input(
                    "a sequence in the batch has no new tokens".into(),
                ));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t >= v) {
                return Err(Error::Input(format!(
                    "token id {bad} is outside the vocabulary (size {v})"
                )));
            }
            if let (Some(m), Some(loaded)) = (s.mask, &self.loaded) {
                if m.num_experts() != loaded.num_experts() || !m.is_subset_of(loaded) {
                    return Err(Error::Input(format!(
                        "expert mask {m:?} asks for experts that were not loaded ({loaded:?})"
                    )));
                }
            }
            starts.push(ids.len());
            ids.extend_from_slice(s.tokens);
        }
        let (embed_tokens, blocks, norm) = match &self.backend {
            Backend::Cpu {
                embed_tokens,
                blocks,
                norm,
                ..
            } => (embed_tokens, blocks, norm),
            Backend::Cuda(c) => {
                let (hidden, router, routed) = c.forward(seqs, record_router_logits, last_only)?;
                let routed = RoutedTokens(routed);
                let n = hidden.len() / self.config.hidden_size;
                let tokens: usize = seqs.iter().map(|s| s.tokens.len()).sum();
                let e = self.config.num_experts;
                let router_logits = router
                    .map(|layers| {
                        layers
                            .into_iter()
                            .map(|l| Tensor::from_vec(l, (tokens, e), &candle_core::Device::Cpu))
                            .collect::<candle_core::Result<Vec<_>>>()
                    })
                    .transpose()?;
                return Ok(Forward {
                    hidden: Tensor::from_vec(
                        hidden,
                        (n, self.config.hidden_size),
                        &candle_core::Device::Cpu,
                    )?,
                    starts: if last_only {
                        (0..seqs.len()).collect()
                    } else {
                        starts
                    },
                    router_logits,
                    routed,
                });
            }
        };
        let n_seqs = seqs.len();
        let last_rows: Vec<u32> = starts
            .iter()
            .zip(seqs.iter())
            .map(|(&st, s)| (st + s.tokens.len() - 1) as u32)
            .collect();
        let mut token_masks = Vec::new();
        if let Some(loaded) = &self.loaded {
            for s in seqs.iter() {
                let m = s.mask.unwrap_or(loaded);
                token_masks.extend(std::iter::repeat_n(m, s.tokens.len()));
            }
        }
        let spans = seqs
            .iter_mut()
            .zip(&starts)
            .map(|(s, &start)| SeqSpan {
                start,
                len: s.tokens.len(),
                cache: &mut *s.cache,
            })
            .collect();
        let mut batch = Batch {
            spans,
            token_masks,
            router_logits: (record_router_logits && self.loaded.is_some()).then(Vec::new),
            layer: 0,
            routed_tokens: if self.loaded.is_some() {
                vec![vec![0; self.config.num_experts]; self.config.num_hidden_layers]
            } else {
                Vec::new()
            },
        };
        let n = ids.len();
        let h = self.config.hidden_size;
        let mut rows = Vec::with_capacity(n * h);
        for &id in &ids {
            let id = id as usize;
            if id >= self.config.vocab_size {
                return Err(Error::Input(format!(
                    "token id {id} is outside the vocabulary ({})",
                    self.config.vocab_size
                )));
            }
            embed_tokens.extend_row_f32(id, h, &mut rows);
        }
        let mut x = Tensor::from_vec(rows, (n, h), &candle_core::Device::Cpu)?;
        for (layer, block) in blocks.iter().enumerate() {
            batch.layer = layer;
            x = block.forward(&x, layer, &mut batch)?;
        }
        if last_only {
            let idx = Tensor::from_vec(last_rows, n_seqs, &candle_core::Device::Cpu)?;
            x = x.index_select(&idx, 0)?;
        }
        Ok(Forward {
            hidden: norm.forward(&x)?,
            starts: if last_only {
                (0..n_seqs).collect()
            } else {
                starts
            },
            router_logits: batch.router_logits,
            routed: RoutedTokens(batch.routed_tokens),
        })
    }

    /// Logits `[rows, vocab]` for rows of final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Cpu { lm_head, .. } => lm_head.forward(hidden),
            Backend::Cuda(c) => {
                let rows = hidden.dim(0)?;
                let flat = hidden.flatten_all()?.to_vec1::<f32>()?;
                let v = self.config.vocab_size;
                Ok(Tensor::from_vec(
                    c.logits(&flat)?,
                    (rows, v),
                    &candle_core::Device::Cpu,
                )?)
            }
        }
    }

    /// The most likely next token (first maximum of the logits) for each row of final hidden states;
    /// on a GPU the logits never leave it.
    pub fn argmax(&self, hidden: &Tensor) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Cpu { .. } => Ok(self.logits(hidden)?.argmax(1)?.to_vec1::<u32>()?),
            Backend::Cuda(c) => c.argmax(&hidden.flatten_all()?.to_vec1::<f32>()?),
        }
    }

    /// The GPU model, when the model runs on one.
    pub(crate) fn cuda(&self) -> Option<&CudaModel> {
        match &self.backend {
            Backend::Cuda(c) => Some(c),
            Backend::Cpu { .. } => None,
        }
    }
}
