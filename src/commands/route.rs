use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::{ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray};
use engine::SeqInput;

/// `moeval experts route`: which experts each layer sends the tokens of some documents to.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// JSON Lines file, one document per line.
    #[arg(long)]
    input: PathBuf,
    /// Field holding the text.
    #[arg(long, default_value = "text")]
    field: String,
    /// Field to group the statistics by (e.g. `domain`); without it all documents form one group.
    #[arg(long)]
    group_by: Option<String>,
    /// Parquet file for the statistics (columns group, layer, expert, expert_name, tokens, share).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Tokens per forward call.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    #[command(flatten)]
    experts: super::ExpertArgs,
}

struct Doc {
    group: String,
    tokens: Vec<u32>,
}

fn read_docs(a: &Args, model: &engine::Model) -> Result<Vec<Doc>> {
    let file = std::fs::File::open(&a.input)
        .with_context(|| format!("cannot open {}", a.input.display()))?;
    let tok = model.require_tokenizer()?;
    let mut docs = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}: cannot read line {}", a.input.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", a.input.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: invalid JSON", at()))?;
        let text = v
            .get(&a.field)
            .and_then(|t| t.as_str())
            .with_context(|| format!("{}: no string field `{}`", at(), a.field))?;
        let group = match &a.group_by {
            Some(g) => match v.get(g) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) if !other.is_null() => other.to_string(),
                _ => anyhow::bail!("{}: no field `{g}` to group by", at()),
            },
            None => "all".to_string(),
        };
        let tokens = tok.encode(text)?;
        if !tokens.is_empty() {
            docs.push(Doc { group, tokens });
        }
    }
    anyhow::ensure!(
        !docs.is_empty(),
        "{} has no documents with text",
        a.input.display()
    );
    Ok(docs)
}

pub fn run(a: Args, device: engine::Device) -> Result<()> {
    let model = super::load_model_with(&a.model, &a.experts, device)?;
    let registry = model
        .registry()
        .context("a dense model has no experts to route to")?
        .clone();
    let mut docs = read_docs(&a, &model)?;
    // Batches never mix groups, so the engine's own routed-token counters (the routing the forward pass
    // really did) can be read per group after each batch.
    docs.sort_by(|x, y| x.group.cmp(&y.group));
    let layers = model.config().num_hidden_layers;
    let n_experts = model.config().num_experts;
    // (group, layer) -> tokens routed to each expert (each token counts once per expert it is sent to).
    let mut counts: BTreeMap<(String, usize), Vec<u64>> = BTreeMap::new();
    let mut tokens_per_group: BTreeMap<String, u64> = BTreeMap::new();
    model.take_routed_tokens();
    let mut start = 0;
    while start < docs.len() {
        let group = &docs[start].group;
        let mut end = start;
        let mut budget = 0;
        while end < docs.len()
            && &docs[end].group == group
            && (end == start || budget + docs[end].tokens.len() <= a.batch_tokens)
        {
            budget += docs[end].tokens.len();
            end += 1;
        }
        let batch = &docs[start..end];
        let mut caches: Vec<_> = batch.iter().map(|_| model.new_cache()).collect();
        let mut inputs: Vec<SeqInput> = batch
            .iter()
            .zip(caches.iter_mut())
            .map(|(d, cache)| SeqInput {
                tokens: &d.tokens,
                cache,
                mask: None,
            })
            .collect();
        model.forward(&mut inputs, false)?;
        for (layer, routed) in model.take_routed_tokens().into_iter().enumerate() {
            let c = counts
                .entry((group.clone(), layer))
                .or_insert_with(|| vec![0; n_experts]);
            for (total, n) in c.iter_mut().zip(routed) {
                *total += n;
            }
        }
        *tokens_per_group.entry(group.clone()).or_default() += budget as u64;
        start = end;
    }
    let (mut g_col, mut l_col, mut e_col, mut n_col, mut t_col, mut s_col) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for ((group, layer), c) in &counts {
        let total = tokens_per_group[group] as f64;
        for (e, &n) in c.iter().enumerate() {
            g_col.push(group.clone());
            l_col.push(*layer as i32);
            e_col.push(e as i32);
            n_col.push(registry.name(e).to_string());
            t_col.push(n as i64);
            s_col.push(n as f64 / total);
        }
    }
    // Table: one row per (group, layer), one column per expert.
    print!("{:<16} {:>5}", "group", "layer");
    for e in 0..n_experts {
        print!(" {:>12}", registry.name(e));
    }
    println!();
    for ((group, layer), c) in &counts {
        print!("{group:<16} {layer:>5}");
        let total = tokens_per_group[group] as f64;
        for &n in c {
            print!(" {:>11.1}%", 100.0 * n as f64 / total);
        }
        println!();
    }
    println!(
        "share = tokens sent to the expert / tokens in the group (each token goes to top-{} experts); {} layers",
        model.config().num_experts_per_tok,
        layers
    );
    if let Some(out) = &a.out {
        let batch = RecordBatch::try_from_iter([
            ("group", Arc::new(StringArray::from(g_col)) as ArrayRef),
            ("layer", Arc::new(Int32Array::from(l_col)) as ArrayRef),
            ("expert", Arc::new(Int32Array::from(e_col)) as ArrayRef),
            (
                "expert_name",
                Arc::new(StringArray::from(n_col)) as ArrayRef,
            ),
            ("tokens", Arc::new(Int64Array::from(t_col)) as ArrayRef),
            ("share", Arc::new(Float64Array::from(s_col)) as ArrayRef),
        ])?;
        reports::tables::write_parquet_atomic(out, &batch)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
