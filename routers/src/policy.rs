//! Data owners' opt-out decisions, kept beside the checkpoint and honoured by every run.
//!
//! `expert-policy.json` holds the current decisions; `expert-policy.log.jsonl` is an append-only audit log
//! with one line per decision (time, expert, action, reason). A run removes every opted-out expert, and a
//! request to use one anyway is refused with a message naming the policy file.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ExpertMask, Registry, RouterError};

/// Current decisions, beside the checkpoint.
pub const POLICY_FILE: &str = "expert-policy.json";
/// Append-only audit log, beside the checkpoint.
pub const AUDIT_FILE: &str = "expert-policy.log.jsonl";

/// What an owner decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    OptOut,
    OptIn,
}

/// One opted-out expert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptOutEntry {
    pub expert: String,
    pub reason: String,
    /// RFC 3339 time of the decision.
    pub since: String,
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub time: String,
    pub expert: String,
    pub action: Action,
    pub reason: String,
}

#[derive(Default, Serialize, Deserialize)]
struct PolicyFile {
    opted_out: Vec<OptOutEntry>,
}

/// The opt-out policy of one checkpoint directory (or of an explicit policy file).
#[derive(Clone, Debug)]
pub struct Policy {
    /// The policy file.
    file: PathBuf,
    /// The audit log, beside the policy file.
    audit: PathBuf,
    opted_out: Vec<OptOutEntry>,
}

impl Policy {
    /// Reads the policy of `model_dir` (empty when there is none).
    pub fn load(model_dir: &Path) -> Result<Self, RouterError> {
        Self::read(model_dir.join(POLICY_FILE), model_dir.join(AUDIT_FILE))
    }

    /// Reads the policy kept in `file` (empty when it does not exist yet), e.g. a server's `--policy`.
    /// Its audit log lies beside it, named after it: `policy.json` logs to `policy.log.jsonl` (so a
    /// checkpoint's `expert-policy.json` keeps its usual `expert-policy.log.jsonl`).
    pub fn load_file(file: &Path) -> Result<Self, RouterError> {
        let stem = file
            .file_stem()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| RouterError::File {
                path: file.to_path_buf(),
                message: "not a file path".into(),
            })?;
        let audit = file.with_file_name(format!("{}.log.jsonl", stem.to_string_lossy()));
        Self::read(file.to_path_buf(), audit)
    }

    fn read(path: PathBuf, audit: PathBuf) -> Result<Self, RouterError> {
        let opted_out = if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| RouterError::File {
                path: path.clone(),
                message: format!("cannot read: {e}"),
            })?;
            serde_json::from_str::<PolicyFile>(&text)
                .map_err(|e| RouterError::File {
                    path: path.clone(),
                    message: format!("invalid policy file: {e}"),
                })?
                .opted_out
        } else {
            Vec::new()
        };
        Ok(Self {
            file: path,
            audit,
            opted_out,
        })
    }

    /// Path of the policy file (whether or not it exists yet).
    pub fn path(&self) -> PathBuf {
        self.file.clone()
    }

    /// Path of the audit log (whether or not it exists yet).
    pub fn audit_path(&self) -> PathBuf {
        self.audit.clone()
    }

    pub fn opted_out(&self) -> &[OptOutEntry] {
        &self.opted_out
    }

    pub fn is_opted_out(&self, name: &str) -> bool {
        self.opted_out.iter().any(|e| e.expert == name)
    }

    /// Records an owner's decision for expert `name`: updates the policy file (atomically) and appends to
    /// the audit log. Opting out an expert that is already out, or in one that is in, is an error.
    pub fn record(
        &mut self,
        name: &str,
        action: Action,
        reason: &str,
    ) -> Result<AuditRecord, RouterError> {
        let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        match action {
            Action::OptOut if self.is_opted_out(name) => {
                return Err(RouterError::Invalid(format!(
                    "expert `{name}` is already opted out"
                )))
            }
            Action::OptIn if !self.is_opted_out(name) => {
                return Err(RouterError::Invalid(format!(
                    "expert `{name}` is not opted out"
                )))
            }
            Action::OptOut => self.opted_out.push(OptOutEntry {
                expert: name.to_string(),
                reason: reason.to_string(),
                since: time.clone(),
            }),
            Action::OptIn => self.opted_out.retain(|e| e.expert != name),
        }
        let path = self.path();
        let file_err = |path: &Path, e: std::io::Error| RouterError::File {
            path: path.to_path_buf(),
            message: format!("cannot write: {e}"),
        };
        let text = serde_json::to_string_pretty(&PolicyFile {
            opted_out: self.opted_out.clone(),
        })
        .map_err(|e| RouterError::Invalid(e.to_string()))?;
        // The temporary file sits beside the policy file so that the rename is atomic.
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| POLICY_FILE.to_string());
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| file_err(&path, e))?;
        let record = AuditRecord {
            time,
            expert: name.to_string(),
            action,
            reason: reason.to_string(),
        };
        let audit = self.audit.clone();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&audit)
            .map_err(|e| file_err(&audit, e))?;
        let line =
            serde_json::to_string(&record).map_err(|e| RouterError::Invalid(e.to_string()))?;
        writeln!(log, "{line}").map_err(|e| file_err(&audit, e))?;
        Ok(record)
    }

    /// The audit log's records, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditRecord>, RouterError> {
        let path = self.audit.clone();
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| RouterError::File {
            path: path.clone(),
            message: format!("cannot read: {e}"),
        })?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| RouterError::File {
                    path: path.clone(),
                    message: format!("line {}: {e}", i + 1),
                })
            })
            .collect()
    }
}

/// The experts a run may use: all, minus the owners' policy, narrowed by the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectiveMask {
    pub mask: ExpertMask,
    /// Experts removed by the policy file.
    pub by_policy: Vec<usize>,
    /// Experts removed on the command line (`--opt-out`, or left out of `--experts`).
    pub by_request: Vec<usize>,
}

/// Combines the policy with a run's `--opt-out` and `--experts` (allow-list) requests. Asking for a
/// policy-opted-out expert in `--experts` is refused; so is a policy naming an unknown expert.
pub fn effective_mask<S: AsRef<str>>(
    registry: &Registry,
    policy: &Policy,
    opt_out: &[S],
    only: &[S],
) -> Result<EffectiveMask, RouterError> {
    let n = registry.len();
    let mut by_policy = Vec::new();
    for entry in policy.opted_out() {
        let index = registry
            .resolve(&entry.expert)
            .map_err(|_| RouterError::File {
                path: policy.path(),
                message: format!(
                    "opts out `{}`, which is not an expert of this model",
                    entry.expert
                ),
            })?;
        by_policy.push(index);
    }
    let requested = registry.resolve_list(only)?;
    if let Some(&refused) = requested.iter().find(|i| by_policy.contains(i)) {
        let entry = &policy.opted_out()[by_policy.iter().position(|&p| p == refused).unwrap_or(0)];
        return Err(RouterError::RefusedByPolicy {
            expert: registry.name(refused).to_string(),
            policy: policy.path(),
            reason: entry.reason.clone(),
        });
    }
    let mut by_request = registry.resolve_list(opt_out)?;
    if !requested.is_empty() {
        by_request.extend((0..n).filter(|i| !requested.contains(i) && !by_policy.contains(i)));
    }
    by_request.retain(|i| !by_policy.contains(i));
    by_request.sort_unstable();
    by_request.dedup();
    let removed: Vec<usize> = by_policy.iter().chain(&by_request).copied().collect();
    let mask = ExpertMask::all(n).without(&removed)?;
    Ok(EffectiveMask {
        mask,
        by_policy,
        by_request,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_persist_audit_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::unnamed(4);
        let mut p = Policy::load(dir.path()).unwrap();
        p.record("expert-2", Action::OptOut, "licence withdrawn")
            .unwrap();
        assert!(p.record("expert-2", Action::OptOut, "again").is_err());
        let p = Policy::load(dir.path()).unwrap();
        assert!(p.is_opted_out("expert-2"));
        let m = effective_mask(&reg, &p, &["3"], &[] as &[&str]).unwrap();
        assert_eq!(m.mask.allowed().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(
            (m.by_policy.clone(), m.by_request.clone()),
            (vec![2], vec![3])
        );
        let e = effective_mask(&reg, &p, &[] as &[&str], &["0,2"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expert-2") && e.contains(POLICY_FILE) && e.contains("licence withdrawn"),
            "{e}"
        );
        let only = effective_mask(&reg, &p, &[] as &[&str], &["0,1"]).unwrap();
        assert_eq!(only.mask.allowed().collect::<Vec<_>>(), vec![0, 1]);
        let mut p = p;
        p.record("expert-2", Action::OptIn, "licence renewed")
            .unwrap();
        let log = Policy::load(dir.path()).unwrap().audit_log().unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(
            (log[0].action, log[1].action),
            (Action::OptOut, Action::OptIn)
        );
        assert_eq!(log[1].reason, "licence renewed");
        assert!(!Policy::load(dir.path()).unwrap().is_opted_out("expert-2"));
    }

    #[test]
    fn explicit_policy_file_keeps_its_log_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("owners").join("serve-policy.json");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        // A file that does not exist yet is an empty policy.
        let mut p = Policy::load_file(&file).unwrap();
        assert!(p.opted_out().is_empty());
        assert_eq!(p.path(), file);
        p.record("expert-1", Action::OptOut, "withdrawn").unwrap();
        let p = Policy::load_file(&file).unwrap();
        assert!(p.is_opted_out("expert-1"));
        let log = file.with_file_name("serve-policy.log.jsonl");
        assert_eq!(p.audit_path(), log);
        assert_eq!(p.audit_log().unwrap().len(), 1);
        // Nothing is written where a checkpoint's own policy would be.
        let dir_policy = Policy::load(file.parent().unwrap()).unwrap();
        assert!(dir_policy.opted_out().is_empty());
        assert!(dir_policy.audit_log().unwrap().is_empty());
        // The checkpoint's default file name maps to the usual audit log name.
        let d = Policy::load_file(&dir.path().join(POLICY_FILE)).unwrap();
        assert_eq!(d.audit_path(), dir.path().join(AUDIT_FILE));
        assert!(Policy::load_file(Path::new("/")).is_err());
    }
}
