//! An MoE checkpoint's experts and its owners' decisions, without loading weights: what
//! `moeval experts list | opt-out | opt-in` read and write.
//!
//! Invariant: a decision is recorded by [`routers::Policy::record`], which writes its audit line
//! before the policy that puts it in force.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use engine::Config;
use routers::{Action, AuditRecord, Policy, Registry};

/// The config, expert names and policy of an MoE checkpoint.
pub fn describe(dir: &Path) -> Result<(Config, Registry, Policy)> {
    let config = Config::from_file(&dir.join("config.json"))?;
    ensure!(
        config.is_moe(),
        "{} is a dense {} model: it has no experts",
        dir.display(),
        config.architecture.model_type()
    );
    let registry = Registry::load(dir, config.num_experts)?;
    let policy = Policy::load(dir)?;
    Ok((config, registry, policy))
}

/// A recorded decision and where it was written.
#[derive(Clone, Debug)]
pub struct Decided {
    pub index: usize,
    pub name: String,
    pub record: AuditRecord,
    pub policy: PathBuf,
    pub audit: PathBuf,
}

/// Opts an expert (by name or index) out or back in, for `actor`, with a reason for the audit log.
pub fn decide(
    dir: &Path,
    expert: &str,
    action: Action,
    reason: &str,
    actor: &str,
) -> Result<Decided> {
    ensure!(
        !reason.trim().is_empty(),
        "--reason must say why (it goes into the audit log)"
    );
    let (_, registry, mut policy) = describe(dir)?;
    let index = registry.resolve(expert)?;
    let name = registry.name(index).to_string();
    let owner = registry.experts()[index].owner.clone().unwrap_or_default();
    let record = policy
        .record(routers::Decision {
            expert: &name,
            owner: &owner,
            actor,
            action,
            reason,
        })
        .with_context(|| format!("cannot update the policy of {}", dir.display()))?;
    Ok(Decided {
        index,
        name,
        record,
        policy: policy.path().to_path_buf(),
        audit: dir.join(routers::AUDIT_FILE),
    })
}

/// The login name of whoever runs the process, for audit logs.
pub fn user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}
