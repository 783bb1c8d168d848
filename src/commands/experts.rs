use std::path::{Path, PathBuf};

use anyhow::Result;
use routers::{effective_mask, Action};

/// `moeval experts`: who the experts are, and owners' opt-out decisions.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// List experts: index, name, owner, domain, parameters, opt-out status.
    List {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Record an owner's decision to withdraw an expert; every later run leaves it out.
    OptOut {
        /// Expert name (from experts.toml) or index.
        expert: String,
        #[arg(long)]
        model: PathBuf,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Record an owner's decision to allow an expert again.
    OptIn {
        /// Expert name (from experts.toml) or index.
        expert: String,
        #[arg(long)]
        model: PathBuf,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Routing statistics: the share of tokens each layer sends to each expert.
    Route(super::route::Args),
}

pub fn run(a: Args, at: super::Placement) -> Result<()> {
    match a.command {
        Sub::List { model, json } => list(&model, json),
        Sub::OptOut {
            expert,
            model,
            reason,
        } => decide(&model, &expert, Action::OptOut, &reason),
        Sub::OptIn {
            expert,
            model,
            reason,
        } => decide(&model, &expert, Action::OptIn, &reason),
        Sub::Route(a) => super::route::run(a, at),
    }
}

fn list(dir: &Path, json: bool) -> Result<()> {
    let (config, registry, policy) = harness::experts::describe(dir)?;
    // Validates the policy against the names (an unknown name in the policy is an error).
    effective_mask(&registry, &policy, &[] as &[&str], &[] as &[&str])?;
    let params = 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers;
    let rows: Vec<serde_json::Value> = registry
        .experts()
        .iter()
        .map(|e| {
            let decision = policy.opted_out().iter().find(|o| o.expert == e.name);
            serde_json::json!({
                "index": e.index,
                "name": e.name,
                "owner": e.owner,
                "domain": e.domain,
                "description": e.description,
                "params": params,
                "router_bias": e.router_bias,
                "opted_out": decision.is_some(),
                "opt_out_reason": decision.map(|d| d.reason.clone()),
                "opted_out_since": decision.map(|d| d.since.clone()),
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:>5}  {:<16} {:<18} {:<14} {:>12}  status",
        "index", "name", "owner", "domain", "parameters"
    );
    for (e, row) in registry.experts().iter().zip(&rows) {
        let status = match row["opt_out_reason"].as_str() {
            Some(reason) => format!("opted out by owner: {reason}"),
            None => "active".to_string(),
        };
        println!(
            "{:>5}  {:<16} {:<18} {:<14} {:>12}  {status}",
            e.index,
            e.name,
            e.owner.as_deref().unwrap_or("-"),
            e.domain.as_deref().unwrap_or("-"),
            params
        );
    }
    println!(
        "top-{} routing over {} experts; names from {}; policy {}",
        config.num_experts_per_tok,
        config.num_experts,
        registry
            .source()
            .map_or("defaults (no experts.toml)".to_string(), |p| p
                .display()
                .to_string()),
        policy.path().display()
    );
    Ok(())
}

fn decide(dir: &Path, expert: &str, action: Action, reason: &str) -> Result<()> {
    let actor = format!("cli:{}", harness::experts::user());
    let d = harness::experts::decide(dir, expert, action, reason, &actor)?;
    let verb = match action {
        Action::OptOut => "opted out",
        Action::OptIn => "opted back in",
    };
    println!(
        "expert {} ({}) {verb} at {}; recorded in {} and {}",
        d.index,
        d.name,
        d.record.time,
        d.policy.display(),
        d.audit.display()
    );
    Ok(())
}
