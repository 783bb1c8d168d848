use std::path::PathBuf;

use anyhow::{Context, Result};

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

pub fn run(a: Args, at: super::Placement) -> Result<()> {
    let model = super::load_model_with(&a.model, &a.experts, at)?;
    let groups = harness::route::route(
        &model,
        &harness::route::RouteSettings {
            input: a.input,
            field: a.field,
            group_by: a.group_by,
            batch_tokens: a.batch_tokens,
        },
    )?;
    let registry = model
        .registry()
        .context("a dense model has no experts to route to")?;
    let n_experts = model.config().num_experts;
    // Table: one row per (group, layer), one column per expert.
    print!("{:<16} {:>5}", "group", "layer");
    for e in 0..n_experts {
        print!(" {:>12}", registry.name(e));
    }
    println!();
    for g in &groups {
        for (layer, counts) in g.routed.0.iter().enumerate() {
            print!("{:<16} {layer:>5}", g.group);
            for &n in counts {
                print!(" {:>11.1}%", 100.0 * n as f64 / g.tokens as f64);
            }
            println!();
        }
    }
    println!(
        "share = tokens sent to the expert / tokens in the group (each token goes to top-{} experts); {} layers",
        model.config().num_experts_per_tok,
        model.config().num_hidden_layers
    );
    if let Some(out) = &a.out {
        reports::tables::write_group_routing(out, &harness::route::rows(&model, &groups))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}
