use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use engine::Config;
use routers::{effective_mask, Action, Policy, Registry};

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

pub fn run(a: Args, device: engine::Device) -> Result<()> {
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
        Sub::Route(a) => super::route::run(a, device),
    }
}

/// The config, expert names and policy of an MoE checkpoint, without loading weights.
pub fn describe(dir: &Path) -> Result<(Config, Registry, Policy)> {
    let config = Config::from_file(&dir.join("config.json"))?;
    anyhow::ensure!(
        config.is_moe(),
        "{} is a dense {} model: it has no experts",
        dir.display(),
        config.architecture.model_type()
    );
    let registry = Registry::load(dir, config.num_experts)?;
    let policy = Policy::load(dir)?;
    Ok((config, registry, policy))
}

fn list(dir: &Path, json: bool) -> Result<()> {
    let (config, registry, policy) = describe(dir)?;
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
    anyhow::ensure!(
        !reason.trim().is_empty(),
        "--reason must say why (it goes into the audit log)"
    );
    let (_, registry, mut policy) = describe(dir)?;
    let index = registry.resolve(expert)?;
    let name = registry.name(index).to_string();
    let owner = registry.experts()[index].owner.clone().unwrap_or_default();
    let actor = format!("cli:{}", cli_user());
    let record = policy
        .record(routers::Decision {
            expert: &name,
            owner: &owner,
            actor: &actor,
            action,
            reason,
        })
        .with_context(|| format!("cannot update the policy of {}", dir.display()))?;
    let verb = match action {
        Action::OptOut => "opted out",
        Action::OptIn => "opted back in",
    };
    println!(
        "expert {index} ({name}) {verb} at {}; recorded in {} and {}",
        record.time,
        policy.path().display(),
        dir.join(routers::AUDIT_FILE).display()
    );
    Ok(())
}

/// The login name of whoever ran the command, for the audit log.
pub(super) fn cli_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}
