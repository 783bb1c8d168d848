//! Data owners' opt-out decisions, kept beside the checkpoint and honoured by every run.
//!
//! Invariants:
//! - The append-only audit log (`expert-policy.log.jsonl`) is the write-ahead log: a decision's line
//!   (time, expert, owner, who acted, action, reason, sequence number) is synced to disk before the
//!   decision takes effect, so no opt-out is ever in force without its audit line.
//! - `expert-policy.json` is the log applied up to `applied` records (and the log's size then). Every
//!   reader replays records past `applied` (parsing the log only when it has grown since), so a decision whose writer died after logging it is in force for every run from then
//!   on, and the next writer makes the file catch up: an opt-out is never half-applied and never lost.
//! - Writers (CLI and server alike) hold `expert-policy.lock` while they re-read, log and write, so
//!   concurrent decisions are serialised and none is lost.
//!
//! A run removes every opted-out expert, and a request to use one anyway is refused with a message
//! naming the policy file.

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
    /// Position in the log, from 1 (absent in logs written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub time: String,
    pub expert: String,
    /// The expert's owner (experts.toml), empty when it names none.
    #[serde(default)]
    pub owner: String,
    /// Who acted: `cli:USER` for the command line, `admin:OWNER` for the admin API.
    #[serde(default)]
    pub actor: String,
    pub action: Action,
    pub reason: String,
}

/// An owner's decision about one expert, as [`Policy::record`] takes it.
#[derive(Clone, Copy, Debug)]
pub struct Decision<'a> {
    /// The expert's canonical name.
    pub expert: &'a str,
    /// The expert's owner.
    pub owner: &'a str,
    /// Who acted (see [`AuditRecord::actor`]).
    pub actor: &'a str,
    pub action: Action,
    pub reason: &'a str,
}

#[derive(Default, Serialize, Deserialize)]
struct PolicyFile {
    opted_out: Vec<OptOutEntry>,
    /// Audit records applied to `opted_out`; absent in files written before it was recorded, which
    /// are taken as having applied the whole log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    applied: Option<u64>,
    /// The audit log's size in bytes when `applied` was written. While the log still has this size,
    /// nothing is pending and readers (the server, at every admission) need not parse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log_bytes: Option<u64>,
}

/// The opt-out policy of one checkpoint directory (or of an explicit policy file).
#[derive(Clone, Debug)]
pub struct Policy {
    /// The policy file.
    file: PathBuf,
    /// The audit log, beside the policy file.
    audit: PathBuf,
    /// Writers' lock, beside the policy file.
    lock: PathBuf,
    opted_out: Vec<OptOutEntry>,
    /// Records in the audit log, all of them applied to `opted_out`.
    records: u64,
}

impl Policy {
    /// Reads the policy of `model_dir` (empty when there is none).
    pub fn load(model_dir: &Path) -> Result<Self, RouterError> {
        Self::read(
            model_dir.join(POLICY_FILE),
            model_dir.join(AUDIT_FILE),
            model_dir.join("expert-policy.lock"),
        )
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
        let stem = stem.to_string_lossy();
        let audit = file.with_file_name(format!("{stem}.log.jsonl"));
        let lock = file.with_file_name(format!("{stem}.lock"));
        Self::read(file.to_path_buf(), audit, lock)
    }

    fn read(path: PathBuf, audit: PathBuf, lock: PathBuf) -> Result<Self, RouterError> {
        let stored = if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| RouterError::File {
                path: path.clone(),
                message: format!("cannot read: {e}"),
            })?;
            serde_json::from_str::<PolicyFile>(&text).map_err(|e| RouterError::File {
                path: path.clone(),
                message: format!("invalid policy file: {e}"),
            })?
        } else {
            // No file yet: nothing applied, so every logged decision is pending.
            PolicyFile {
                opted_out: Vec::new(),
                applied: Some(0),
                log_bytes: None,
            }
        };
        if let (Some(applied), Some(bytes)) = (stored.applied, stored.log_bytes) {
            let now = match std::fs::metadata(&audit) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => {
                    return Err(RouterError::File {
                        path: audit,
                        message: format!("cannot read: {e}"),
                    })
                }
            };
            if now == bytes {
                return Ok(Self {
                    file: path,
                    audit,
                    lock,
                    opted_out: stored.opted_out,
                    records: applied,
                });
            }
        }
        let log = read_log(&audit)?;
        let records = log.len() as u64;
        let applied = stored.applied.unwrap_or(records);
        if applied > records {
            return Err(RouterError::File {
                path: path.clone(),
                message: format!(
                    "has applied {applied} audit records but {} holds {records}: the audit log was \
                     truncated or replaced; restore it before changing or using this policy",
                    audit.display()
                ),
            });
        }
        let mut policy = Self {
            file: path,
            audit,
            lock,
            opted_out: stored.opted_out,
            records,
        };
        // Decisions logged by a writer that died before updating the policy file are in force.
        for r in &log[applied as usize..] {
            policy.apply(r);
        }
        Ok(policy)
    }

    fn apply(&mut self, r: &AuditRecord) {
        match r.action {
            Action::OptOut if !self.is_opted_out(&r.expert) => self.opted_out.push(OptOutEntry {
                expert: r.expert.clone(),
                reason: r.reason.clone(),
                since: r.time.clone(),
            }),
            Action::OptOut => {}
            Action::OptIn => self.opted_out.retain(|e| e.expert != r.expert),
        }
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

    /// Records an owner's decision: under the writers' lock, re-reads the policy (so a concurrent
    /// writer's decision is kept), appends the audit line and syncs it, then rewrites the policy file
    /// atomically. Opting out an expert that is already out, or in one that is in, is an error.
    pub fn record(&mut self, d: Decision<'_>) -> Result<AuditRecord, RouterError> {
        let file_err = |path: &Path, e: std::io::Error| RouterError::File {
            path: path.to_path_buf(),
            message: format!("cannot write: {e}"),
        };
        let _lock = durable::Lock::acquire(&self.lock).map_err(|e| file_err(&self.lock, e))?;
        *self = Self::read(self.file.clone(), self.audit.clone(), self.lock.clone())?;
        match d.action {
            Action::OptOut if self.is_opted_out(d.expert) => {
                return Err(RouterError::Invalid(format!(
                    "expert `{}` is already opted out",
                    d.expert
                )))
            }
            Action::OptIn if !self.is_opted_out(d.expert) => {
                return Err(RouterError::Invalid(format!(
                    "expert `{}` is not opted out",
                    d.expert
                )))
            }
            _ => {}
        }
        let record = AuditRecord {
            seq: Some(self.records + 1),
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            expert: d.expert.to_string(),
            owner: d.owner.to_string(),
            actor: d.actor.to_string(),
            action: d.action,
            reason: d.reason.to_string(),
        };
        let line =
            serde_json::to_string(&record).map_err(|e| RouterError::Invalid(e.to_string()))?;
        drop_torn_tail(&self.audit).map_err(|e| file_err(&self.audit, e))?;
        durable::append_line(&self.audit, &line).map_err(|e| file_err(&self.audit, e))?;
        durable::fault::point("policy.logged");
        self.apply(&record);
        self.records += 1;
        let log_bytes = std::fs::metadata(&self.audit)
            .map_err(|e| file_err(&self.audit, e))?
            .len();
        let text = serde_json::to_string_pretty(&PolicyFile {
            opted_out: self.opted_out.clone(),
            applied: Some(self.records),
            log_bytes: Some(log_bytes),
        })
        .map_err(|e| RouterError::Invalid(e.to_string()))?;
        durable::write_atomic(&self.file, text.as_bytes()).map_err(|e| file_err(&self.file, e))?;
        durable::fault::point("policy.written");
        Ok(record)
    }

    /// The audit log's records, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditRecord>, RouterError> {
        read_log(&self.audit)
    }
}

/// The complete lines of an audit log. A last line without its newline is an append cut short by a
/// crash: its decision never took effect (the writer had not returned), so it is not a record.
fn read_log(path: &Path) -> Result<Vec<AuditRecord>, RouterError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(RouterError::File {
                path: path.to_path_buf(),
                message: format!("cannot read: {e}"),
            })
        }
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| RouterError::File {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Cuts a torn last line (see [`read_log`]) so the next record starts on a line of its own.
fn drop_torn_tail(path: &Path) -> std::io::Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(keep as u64)?;
        f.sync_all()?;
    }
    Ok(())
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

    fn decision<'a>(expert: &'a str, action: Action, reason: &'a str) -> Decision<'a> {
        Decision {
            expert,
            owner: "Owner",
            actor: "cli:test",
            action,
            reason,
        }
    }

    #[test]
    fn decisions_persist_audit_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::unnamed(4);
        let mut p = Policy::load(dir.path()).unwrap();
        p.record(decision("expert-2", Action::OptOut, "licence withdrawn"))
            .unwrap();
        assert!(p
            .record(decision("expert-2", Action::OptOut, "again"))
            .is_err());
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
        p.record(decision("expert-2", Action::OptIn, "licence renewed"))
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
        p.record(decision("expert-1", Action::OptOut, "withdrawn"))
            .unwrap();
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

    #[test]
    fn logged_decision_is_in_force_before_the_policy_file_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Policy::load(dir.path()).unwrap();
        p.record(decision("a", Action::OptOut, "one")).unwrap();
        // A writer that died between its audit line and the policy file: the line alone is in force.
        let line = r#"{"seq":2,"time":"2026-01-01T00:00:00Z","expert":"b","owner":"B","actor":"cli:x","action":"opt-out","reason":"two"}"#;
        durable::append_line(&dir.path().join(AUDIT_FILE), line).unwrap();
        let mut p = Policy::load(dir.path()).unwrap();
        assert!(p.is_opted_out("a") && p.is_opted_out("b"));
        // The next writer writes the file up to date and numbers its record after the pending one.
        let r = p.record(decision("a", Action::OptIn, "back")).unwrap();
        assert_eq!(r.seq, Some(3));
        let text = std::fs::read_to_string(dir.path().join(POLICY_FILE)).unwrap();
        assert!(
            text.contains("\"applied\": 3") && text.contains("\"b\""),
            "{text}"
        );
    }

    #[test]
    fn torn_last_line_is_no_decision_and_is_cut_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(AUDIT_FILE);
        let mut p = Policy::load(dir.path()).unwrap();
        p.record(decision("a", Action::OptOut, "one")).unwrap();
        let mut bytes = std::fs::read(&log).unwrap();
        bytes.extend_from_slice(br#"{"seq":2,"time":"x","exp"#);
        std::fs::write(&log, &bytes).unwrap();
        let mut p = Policy::load(dir.path()).unwrap();
        assert_eq!(p.audit_log().unwrap().len(), 1);
        p.record(decision("c", Action::OptOut, "two")).unwrap();
        let records = Policy::load(dir.path()).unwrap().audit_log().unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(
            (records[1].seq, records[1].owner.as_str()),
            (Some(2), "Owner")
        );
    }

    #[test]
    fn truncated_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Policy::load(dir.path()).unwrap();
        p.record(decision("a", Action::OptOut, "one")).unwrap();
        std::fs::write(dir.path().join(AUDIT_FILE), "").unwrap();
        let e = Policy::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains(AUDIT_FILE), "{e}");
    }

    #[test]
    fn legacy_policy_without_applied_takes_the_whole_log_as_applied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(POLICY_FILE),
            r#"{"opted_out": [{"expert": "a", "reason": "r", "since": "t"}]}"#,
        )
        .unwrap();
        let old = r#"{"time":"t","expert":"expert-policy.json","action":"opt-out","reason":"r"}"#;
        durable::append_line(&dir.path().join(AUDIT_FILE), old).unwrap();
        let p = Policy::load(dir.path()).unwrap();
        assert_eq!(p.opted_out().len(), 1);
        assert!(p.is_opted_out("a"));
    }
}
