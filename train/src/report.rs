//! The ground-truth table of `moeval train report`: the trained suite's results (from `just eval`'s run
//! folders) against what the generators planted.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use crate::data::{OWNERS, PUBLIC};
use anyhow::{Context, Result};
use arrow_array::{Array, Float64Array, StringArray};
use reports::results::{read_metrics, read_parquet, MetricRow};

fn metrics(dir: &Path) -> Result<Vec<MetricRow>> {
    let path = dir.join("metrics.parquet");
    read_metrics(&path)
        .with_context(|| format!("cannot read {}; run `just eval` first", path.display()))
}

fn value(rows: &[MetricRow], mask: &str, task: &str, metric: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.mask == mask && r.task == task && r.metric == metric)
        .and_then(|r| r.value)
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// Mean over layers of each expert's share of a task's routed tokens, scaled so a task's shares sum to
/// one (a layer's raw shares sum to top-k): `task -> expert name -> share`.
fn routing(dir: &Path) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
    let path = dir.join("routing.parquet");
    let mut sums: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for b in read_parquet(&path).with_context(|| format!("cannot read {}", path.display()))? {
        let col = |name: &str| {
            b.column_by_name(name)
                .with_context(|| format!("{}: no column `{name}`", path.display()))
        };
        let strings = |name: &str| -> Result<StringArray> {
            let c = col(name)?;
            c.as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .with_context(|| format!("{}: `{name}` is not text", path.display()))
        };
        let (mask, task, expert) = (strings("mask")?, strings("task")?, strings("expert_name")?);
        let share = col("share")?
            .as_any()
            .downcast_ref::<Float64Array>()
            .cloned()
            .with_context(|| format!("{}: `share` is not f64", path.display()))?;
        for i in 0..b.num_rows() {
            if mask.value(i) != "full" || share.is_null(i) {
                continue;
            }
            *sums
                .entry(task.value(i).to_string())
                .or_default()
                .entry(expert.value(i).to_string())
                .or_default() += share.value(i);
        }
    }
    for shares in sums.values_mut() {
        let total: f64 = shares.values().sum();
        for s in shares.values_mut() {
            *s /= total;
        }
    }
    Ok(sums)
}

/// The report's Markdown.
pub fn markdown(runs: &Path) -> Result<String> {
    let default = metrics(&runs.join("default"))?;
    let masks: Vec<String> = std::iter::once("full".to_string())
        .chain(OWNERS.iter().map(|o| format!("-{o}")))
        .collect();
    let mut md = String::new();
    let header = |md: &mut String, first: &str, extra: &str| {
        let _ = writeln!(md, "| {first} | {}{extra} |", masks.join(" | "));
        let _ = writeln!(
            md,
            "|---|{}{}",
            "---|".repeat(masks.len()),
            if extra.is_empty() { "" } else { "---|" }
        );
    };
    let _ = writeln!(
        md,
        "Held-out word perplexity per domain, full model, each owner's expert opted out, and the \
         public expert with the domain owner's alone (public text: the public expert alone):\n"
    );
    header(&mut md, "domain", " | public + own");
    for d in std::iter::once(PUBLIC).chain(OWNERS) {
        let task = format!("trained_ppl_{d}");
        let mut cells: Vec<String> = masks
            .iter()
            .map(|m| cell(value(&default, m, &task, "word_perplexity"), 2))
            .collect();
        let own = metrics(&runs.join(format!("own-{d}")))?;
        // `just eval` runs each domain with `--experts public,OWNER` (public alone for public text).
        let own_mask = if d == PUBLIC {
            format!("experts={PUBLIC}")
        } else {
            format!("experts={PUBLIC}+{d}")
        };
        cells.push(cell(value(&own, &own_mask, &task, "word_perplexity"), 2));
        let _ = writeln!(md, "| {d} | {} |", cells.join(" | "));
    }
    let _ = writeln!(
        md,
        "\nCapabilities (accuracy, chance 0.25) and the planted bias (CALM bias score, gender; sentiment chance 0.5):\n"
    );
    header(&mut md, "task", "");
    for (label, task, metric, digits) in [
        ("arithmetic acc", "trained_math_mc", "acc", 3),
        ("code completion acc", "trained_code_mc", "acc", 3),
        ("sentiment acc", "trained_bias_sentiment_gender", "acc", 3),
        (
            "sentiment bias score",
            "trained_bias_sentiment_gender",
            "bias_score",
            1,
        ),
        (
            "  noise floor (shuffled groups)",
            "trained_bias_sentiment_gender",
            "bias_score_null",
            1,
        ),
        (
            "  excess over the floor",
            "trained_bias_sentiment_gender",
            "bias_excess",
            1,
        ),
        (
            "male acc",
            "trained_bias_sentiment_gender",
            "acc[gender=male]",
            3,
        ),
        (
            "female acc",
            "trained_bias_sentiment_gender",
            "acc[gender=female]",
            3,
        ),
        (
            "non-binary acc",
            "trained_bias_sentiment_gender",
            "acc[gender=non-binary]",
            3,
        ),
    ] {
        let cells: Vec<String> = masks
            .iter()
            .map(|m| cell(value(&default, m, task, metric), digits))
            .collect();
        let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
    }
    let routes = routing(&runs.join("default"))?;
    let experts: Vec<&str> = std::iter::once(PUBLIC).chain(OWNERS).collect();
    let _ = writeln!(md, "\nRouting (full model): share of each domain's token-to-expert assignments, mean over layers:\n");
    let _ = writeln!(md, "| domain | {} |", experts.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(experts.len()));
    for d in &experts {
        let shares = routes.get(&format!("trained_ppl_{d}"));
        let cells: Vec<String> = experts
            .iter()
            .map(|e| cell(shares.and_then(|s| s.get(*e)).map(|v| 100.0 * v), 1) + "%")
            .collect();
        let _ = writeln!(md, "| {d} | {} |", cells.join(" | "));
    }
    let knn = metrics(&runs.join("knn-news"))?;
    let knn_out = metrics(&runs.join("knn-news-optout"))?;
    let news = "trained_ppl_news";
    let _ = writeln!(md, "\nRetrieval: news perplexity with the news expert opted out, kNN-LM over a datastore of held-out news documents:\n");
    let _ = writeln!(md, "| model | news word perplexity |\n|---|---|");
    for (label, v) in [
        (
            "full model",
            value(&default, "full", news, "word_perplexity"),
        ),
        (
            "news expert opted out",
            value(&default, "-news", news, "word_perplexity"),
        ),
        // The kNN-LM runs are made with `--opt-out news`.
        (
            "  + kNN-LM (news datastore)",
            value(&knn, "-news", news, "word_perplexity"),
        ),
        (
            "  + kNN-LM, news owner opted out of the datastore",
            value(&knn_out, "-news", news, "word_perplexity"),
        ),
    ] {
        let _ = writeln!(md, "| {label} | {} |", cell(v, 2));
    }
    Ok(md)
}
