//! `moeval experts route`: which experts each layer sends the tokens of some documents to, per
//! group of documents, from the routed-token counts the model's forward passes return.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use engine::{Model, RoutedTokens, SeqInput};
use reports::tables::GroupRoutingRow;

/// Documents to route and how to batch them.
#[derive(Clone, Debug)]
pub struct RouteSettings {
    /// JSON Lines, one document per line.
    pub input: PathBuf,
    /// Field holding the text.
    pub field: String,
    /// Field to group by; all documents form the group `all` without it.
    pub group_by: Option<String>,
    /// Tokens per forward call.
    pub batch_tokens: usize,
}

/// One group's routing.
#[derive(Clone, Debug)]
pub struct GroupRouting {
    pub group: String,
    /// Tokens of the group's documents.
    pub tokens: u64,
    /// Tokens sent to each expert, `[layer][expert]`.
    pub routed: RoutedTokens,
}

struct Doc {
    group: String,
    tokens: Vec<u32>,
}

fn read_docs(s: &RouteSettings, model: &Model) -> Result<Vec<Doc>> {
    let file = std::fs::File::open(&s.input)
        .with_context(|| format!("cannot open {}", s.input.display()))?;
    let tok = model.require_tokenizer()?;
    let mut docs = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}: cannot read line {}", s.input.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", s.input.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: invalid JSON", at()))?;
        let text = v
            .get(&s.field)
            .and_then(|t| t.as_str())
            .with_context(|| format!("{}: no string field `{}`", at(), s.field))?;
        let group = match &s.group_by {
            Some(g) => match v.get(g) {
                Some(serde_json::Value::String(x)) => x.clone(),
                Some(other) if !other.is_null() => other.to_string(),
                _ => bail!("{}: no field `{g}` to group by", at()),
            },
            None => "all".to_string(),
        };
        let tokens = tok.encode(text)?;
        if !tokens.is_empty() {
            docs.push(Doc { group, tokens });
        }
    }
    ensure!(
        !docs.is_empty(),
        "{} has no documents with text",
        s.input.display()
    );
    Ok(docs)
}

/// Routes every document (in batches that never mix groups) and returns each group's counts, in
/// group order.
pub fn route(model: &Model, s: &RouteSettings) -> Result<Vec<GroupRouting>> {
    ensure!(
        model.registry().is_some(),
        "a dense model has no experts to route to"
    );
    let mut docs = read_docs(s, model)?;
    docs.sort_by(|x, y| x.group.cmp(&y.group));
    let mut groups: BTreeMap<String, GroupRouting> = BTreeMap::new();
    let mut start = 0;
    while start < docs.len() {
        let group = &docs[start].group;
        let mut end = start;
        let mut budget = 0;
        while end < docs.len()
            && &docs[end].group == group
            && (end == start || budget + docs[end].tokens.len() <= s.batch_tokens)
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
        let fwd = model.forward(&mut inputs, false)?;
        let g = groups.entry(group.clone()).or_insert_with(|| GroupRouting {
            group: group.clone(),
            tokens: 0,
            routed: RoutedTokens::default(),
        });
        g.routed.add(&fwd.routed);
        g.tokens += budget as u64;
        start = end;
    }
    Ok(groups.into_values().collect())
}

/// The rows of `experts route --out`: one per group, layer and expert, with the share of the
/// group's tokens.
pub fn rows(model: &Model, groups: &[GroupRouting]) -> Vec<GroupRoutingRow> {
    let mut out = Vec::new();
    for g in groups {
        for (layer, counts) in g.routed.0.iter().enumerate() {
            for (expert, &tokens) in counts.iter().enumerate() {
                out.push(GroupRoutingRow {
                    group: g.group.clone(),
                    layer,
                    expert,
                    expert_name: model
                        .registry()
                        .map(|r| r.name(expert).to_string())
                        .unwrap_or_else(|| expert.to_string()),
                    tokens,
                    share: tokens as f64 / g.tokens as f64,
                });
            }
        }
    }
    out
}
