use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use engine::{Architecture, Config, LoadOptions, Model, SeqInput, Weights};
use routers::{ExpertInfo, Registry};
use safetensors::Dtype;

/// What `moeval merge` assembles: one FlexOlmo model from experts that owners trained separately.
///
/// Each expert is a 2-expert FlexOlmo checkpoint trained from the same public model: expert 0 is the
/// public FFN (frozen), expert 1 the owner's. Attention, embeddings, norms and the LM head must be
/// identical in every input and in the public model; the merged model's expert 0 is the public FFN
/// and expert i the i-th owner's, with router rows in the same order. Name-value lists are given as
/// `NAME=VALUE` strings, as on the command line, and errors name their flag.
#[derive(Clone, Debug)]
pub struct MergeSettings {
    /// The public model: a dense OLMo2 checkpoint, or a FlexOlmo checkpoint whose expert 0 is public.
    pub public: PathBuf,
    /// Owners' checkpoints as `NAME=DIR`, in the order of the merged experts (`--expert`).
    pub experts: Vec<String>,
    /// Output directory (created; must be empty or absent).
    pub out: PathBuf,
    /// Router rows: `from-experts` or `domain-embeddings`.
    pub router: String,
    /// Sample documents for domain-embedding router rows, as `NAME=FILE.jsonl` (`--samples`).
    pub samples: Vec<String>,
    /// FlexOlmo's negative router bias for an owner's expert, as `NAME=B` (`--bias`).
    pub bias: Vec<String>,
    /// Experts per token in the merged model (default: the inputs' value, at most the expert count).
    pub top_k: Option<usize>,
    /// Owner recorded for the public expert in experts.toml.
    pub public_owner: String,
}

/// What a merge wrote.
#[derive(Clone, Debug)]
pub struct Merged {
    /// The owners' expert names, in order (expert 0 is the public one).
    pub experts: Vec<String>,
    pub top_k: usize,
}

fn pair(s: &str, what: &str) -> Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("{what} `{s}`: expected NAME=VALUE"))?;
    anyhow::ensure!(
        !k.trim().is_empty() && !v.trim().is_empty(),
        "{what} `{s}`: expected NAME=VALUE"
    );
    Ok((k.trim().to_string(), v.trim().to_string()))
}

struct Input {
    name: String,
    dir: PathBuf,
    config: Config,
    raw: serde_json::Value,
    weights: Weights,
}

fn open(name: &str, dir: &Path) -> Result<Input> {
    let path = dir.join("config.json");
    let config = Config::from_file(&path)?;
    let raw = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let weights = Weights::open(dir)?;
    Ok(Input {
        name: name.to_string(),
        dir: dir.to_path_buf(),
        config,
        raw,
        weights,
    })
}

/// Values of two stored tensors are equal (bytes when the dtypes agree, f32 values otherwise).
fn same(a: (Dtype, Vec<usize>, &[u8]), b: (Dtype, Vec<usize>, &[u8])) -> bool {
    if a.1 != b.1 {
        return false;
    }
    if a.0 == b.0 {
        return a.2 == b.2;
    }
    matches!((engine::to_f32(a.0, a.2), engine::to_f32(b.0, b.2)), (Some(x), Some(y)) if x == y)
}

/// Domain-embedding router rows: the public row when samples were given, then one row per owner.
type DomainRows = (Option<Vec<f32>>, Vec<Vec<f32>>);

/// An output tensor: its dtype, shape and bytes.
type Out = (Dtype, Vec<usize>, Vec<u8>);

fn from_f32(dtype: Dtype, values: &[f32]) -> Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        other => bail!("cannot write router rows as {other:?}"),
    })
}

/// Mean of the public model's final hidden states over every token of every document in `file`.
pub fn domain_embedding(model: &Model, file: &Path) -> Result<Vec<f32>> {
    let tok = model.require_tokenizer()?;
    let h = model.config().hidden_size;
    let mut sum = vec![0f64; h];
    let mut docs = 0usize;
    for text in jsonl_texts(file)? {
        let ids = tok.encode(&text)?;
        if ids.is_empty() {
            continue;
        }
        let mut cache = model.new_cache();
        let fwd = model.forward(
            &mut [SeqInput {
                tokens: &ids,
                cache: &mut cache,
                mask: None,
            }],
            false,
        )?;
        // Mean-pool the document, then average documents, so long documents do not dominate.
        let rows = fwd.hidden.to_vec2::<f32>()?;
        for (s, col) in sum.iter_mut().zip(0..h) {
            *s += rows.iter().map(|r| r[col] as f64).sum::<f64>() / rows.len() as f64;
        }
        docs += 1;
    }
    anyhow::ensure!(docs > 0, "{} has no documents with text", file.display());
    Ok(sum.into_iter().map(|s| (s / docs as f64) as f32).collect())
}

/// Merges the experts into `a.out` (written under a hidden name and moved into place when complete).
pub fn merge(a: &MergeSettings) -> Result<Merged> {
    anyhow::ensure!(
        !a.out.exists() || std::fs::read_dir(&a.out)?.next().is_none(),
        "{} exists and is not empty; choose a new --out directory",
        a.out.display()
    );
    let public = open("public", &a.public)?;
    let mut inputs = Vec::new();
    for spec in &a.experts {
        let (name, dir) = pair(spec, "--expert")?;
        anyhow::ensure!(
            name != "public",
            "--expert name `public` is reserved for the public expert"
        );
        anyhow::ensure!(
            !inputs.iter().any(|i: &Input| i.name == name),
            "--expert `{name}` is given twice"
        );
        let input = open(&name, Path::new(&dir))?;
        anyhow::ensure!(
            input.config.architecture == Architecture::FlexOlmo && input.config.num_experts == 2,
            "{}: expected a 2-expert flex_olmo checkpoint (public expert + the owner's), found {} with {} experts",
            input.dir.display(),
            input.config.architecture.model_type(),
            input.config.num_experts
        );
        inputs.push(input);
    }
    let first = &inputs[0];
    let shape = |c: &Config| {
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
        )
    };
    for i in std::iter::once(&public).chain(&inputs) {
        anyhow::ensure!(
            shape(&i.config) == shape(&first.config),
            "{}: model shape differs from {} (vocab, hidden, intermediate, layers, heads, kv heads)",
            i.dir.display(),
            first.dir.display()
        );
    }
    let public_ffn = |layer: usize, proj: &str| match public.config.architecture {
        Architecture::Olmo2 => format!("model.layers.{layer}.mlp.{proj}.weight"),
        _ => format!("model.layers.{layer}.mlp.experts.0.{proj}.weight"),
    };
    let is_moe_tensor = |n: &str| n.contains(".mlp.gate.weight") || n.contains(".mlp.experts.");
    let mut out: BTreeMap<String, Out> = BTreeMap::new();
    // 1. Shared tensors: identical in every input and in the public model.
    let mut names: Vec<&str> = first
        .weights
        .names()
        .filter(|n| !is_moe_tensor(n))
        .collect();
    names.sort_unstable();
    for name in names {
        let reference = first.weights.raw(name)?;
        for other in inputs.iter().skip(1).chain(std::iter::once(&public)) {
            if !other.weights.contains(name) {
                bail!(
                    "{}: tensor `{name}` is missing (it is in {})",
                    other.dir.display(),
                    first.dir.display()
                );
            }
            if !same(reference.clone(), other.weights.raw(name)?) {
                bail!(
                    "tensor `{name}` differs between {} and {}: experts must be trained from the same public model with shared weights frozen",
                    first.dir.display(),
                    other.dir.display()
                );
            }
        }
        out.insert(
            name.to_string(),
            (reference.0, reference.1, reference.2.to_vec()),
        );
    }
    // 2. Experts: the public FFN, then each owner's expert 1.
    let layers = first.config.num_hidden_layers;
    for layer in 0..layers {
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            let public_tensor = public.weights.raw(&public_ffn(layer, proj))?;
            for i in &inputs {
                let name = format!("model.layers.{layer}.mlp.experts.0.{proj}.weight");
                if !same(public_tensor.clone(), i.weights.raw(&name)?) {
                    bail!(
                        "{}: expert 0 (`{name}`) is not the public model's FFN ({}); was the public expert trained?",
                        i.dir.display(),
                        public.dir.display()
                    );
                }
            }
            let t = public_tensor;
            out.insert(
                format!("model.layers.{layer}.mlp.experts.0.{proj}.weight"),
                (t.0, t.1, t.2.to_vec()),
            );
            for (j, i) in inputs.iter().enumerate() {
                let t = i
                    .weights
                    .raw(&format!("model.layers.{layer}.mlp.experts.1.{proj}.weight"))?;
                out.insert(
                    format!("model.layers.{layer}.mlp.experts.{}.{proj}.weight", j + 1),
                    (t.0, t.1, t.2.to_vec()),
                );
            }
        }
    }
    // 3. Router rows.
    let h = first.config.hidden_size;
    let n_experts = inputs.len() + 1;
    let domain_rows: Option<DomainRows> = match a.router.as_str() {
        "from-experts" => {
            anyhow::ensure!(
                a.samples.is_empty(),
                "--samples is only used with --router domain-embeddings"
            );
            None
        }
        "domain-embeddings" => {
            let samples: HashMap<String, String> = a
                .samples
                .iter()
                .map(|s| pair(s, "--samples"))
                .collect::<Result<_>>()?;
            let model = Model::load(&a.public, &LoadOptions::default()).with_context(|| {
                format!(
                    "cannot load the public model {} to embed samples",
                    a.public.display()
                )
            })?;
            let rows = inputs
                .iter()
                .map(|i| {
                    let file = samples.get(&i.name).with_context(|| {
                        format!(
                            "--router domain-embeddings needs --samples {}=FILE.jsonl",
                            i.name
                        )
                    })?;
                    domain_embedding(&model, Path::new(file))
                })
                .collect::<Result<Vec<_>>>()?;
            let public_row = samples
                .get("public")
                .map(|f| domain_embedding(&model, Path::new(f)))
                .transpose()?;
            Some((public_row, rows))
        }
        other => bail!("--router `{other}`: choose from-experts or domain-embeddings"),
    };
    for layer in 0..layers {
        let name = format!("model.layers.{layer}.mlp.gate.weight");
        let (dtype, _, bytes) = first.weights.raw(&name)?;
        let first_rows = engine::to_f32(dtype, bytes)
            .with_context(|| format!("`{name}` has an unsupported dtype"))?;
        let mut rows = first_rows[..h].to_vec();
        for (j, i) in inputs.iter().enumerate() {
            let (dt, _, b) = i.weights.raw(&name)?;
            let r = engine::to_f32(dt, b)
                .with_context(|| format!("`{name}` has an unsupported dtype"))?;
            match &domain_rows {
                None => rows.extend_from_slice(&r[h..2 * h]),
                Some((_, d)) => rows.extend_from_slice(&d[j]),
            }
        }
        if let Some((Some(p), _)) = &domain_rows {
            rows[..h].copy_from_slice(p);
        }
        out.insert(name, (dtype, vec![n_experts, h], from_f32(dtype, &rows)?));
    }
    // 4. Experts file, config, tokenizer, weights.
    let biases: HashMap<String, f32> = a
        .bias
        .iter()
        .map(|s| {
            let (k, v) = pair(s, "--bias")?;
            Ok((
                k,
                v.parse::<f32>()
                    .with_context(|| format!("--bias `{s}`: not a number"))?,
            ))
        })
        .collect::<Result<_>>()?;
    if let Some(unknown) = biases
        .keys()
        .find(|k| !inputs.iter().any(|i| &i.name == *k))
    {
        bail!("--bias names `{unknown}`, which is not an --expert");
    }
    let mut experts = vec![ExpertInfo {
        index: 0,
        name: "public".into(),
        owner: Some(a.public_owner.clone()),
        domain: None,
        description: Some(format!("public FFN from {}", a.public.display())),
        router_bias: None,
    }];
    for (j, i) in inputs.iter().enumerate() {
        experts.push(ExpertInfo {
            index: j + 1,
            name: i.name.clone(),
            owner: Some(i.name.clone()),
            domain: None,
            description: Some(format!("expert 1 of {}", i.dir.display())),
            router_bias: biases.get(&i.name).copied(),
        });
    }
    let top_k = a
        .top_k
        .unwrap_or(first.config.num_experts_per_tok)
        .min(n_experts);
    anyhow::ensure!(top_k > 0, "--top-k must be at least 1");
    let mut config = first.raw.clone();
    config["num_experts"] = n_experts.into();
    config["num_experts_per_tok"] = top_k.into();
    // Written under a hidden name and moved into place when complete: a killed merge leaves no
    // half-merged model at --out, and running it again starts afresh.
    let staged = durable::StagedDir::new(&a.out)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    let dir = staged.path();
    write_shards(&out, layers, dir)?;
    durable::fault::point("merge.shards");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        if first.dir.join(f).exists() {
            std::fs::copy(first.dir.join(f), dir.join(f))
                .with_context(|| format!("cannot copy {f}"))?;
        }
    }
    Registry::from_experts(experts)?.write(&dir.join(routers::EXPERTS_FILE))?;
    staged
        .commit()
        .with_context(|| format!("cannot move the merged model into {}", a.out.display()))?;
    Ok(Merged {
        experts: inputs.iter().map(|i| i.name.clone()).collect(),
        top_k,
    })
}

/// The `text` field of every non-blank line of a JSON Lines file; errors name the file and line.
pub fn jsonl_texts(file: &Path) -> Result<Vec<String>> {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: invalid JSON", file.display(), i + 1))?;
        let text = v["text"].as_str().with_context(|| {
            format!("{} line {}: no string field `text`", file.display(), i + 1)
        })?;
        out.push(text.to_string());
    }
    Ok(out)
}

/// Writes one shard per layer plus one for the other tensors, and the index.
fn write_shards(tensors: &BTreeMap<String, Out>, layers: usize, dir: &Path) -> Result<()> {
    let shard_of = |name: &str| -> usize {
        name.strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok())
            .map_or(0, |l| l + 1)
    };
    let count = layers + 1;
    let file = |s: usize| format!("model-{:05}-of-{count:05}.safetensors", s + 1);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for s in 0..count {
        let views = tensors
            .iter()
            .filter(|(n, _)| shard_of(n) == s)
            .map(|(n, (dt, shape, bytes))| {
                weight_map.insert(n.clone(), file(s).into());
                total += bytes.len();
                safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                    .map(|v| (n.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let path = dir.join(file(s));
        durable::write_atomic_with(&path, |tmp| {
            safetensors::serialize_to_file(views, None, tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))
        })
        .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    Ok(())
}
