//! Crash safety for the store's writers: one writer at a time, and opt-out as a recoverable
//! transaction.
//!
//! Invariants:
//! - Every writer (`opt_out`, kNN keys) holds `write.lock` for its whole run.
//! - An opt-out first writes its intent (`opt-out.pending.json`: owners, documents, reason, and the
//!   block ids to remove, found before anything is deleted), then its audit line, then deletes. Each
//!   step can be redone: deleting deleted blocks is a no-op. The intent is removed last, after the
//!   completion's audit line.
//! - While an intent exists the store does not serve: [`Datastore::open`](crate::Datastore::open)
//!   completes the pending opt-out first (or fails saying so), so no reader ever sees a half-applied
//!   opt-out, and a retry always completes it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The writers' lock file, in the store directory.
pub(crate) const LOCK: &str = "write.lock";
/// A pending opt-out, in the store directory.
pub(crate) const INTENT: &str = "opt-out.pending.json";

/// An opt-out that has started and not yet completed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Intent {
    /// Identifies the opt-out in the audit log (its `started` and `completed` lines).
    pub id: String,
    pub owners: Vec<String>,
    pub documents: Vec<String>,
    pub reason: String,
    /// Who acted (see [`OptOut::actor`](crate::OptOut::actor)).
    #[serde(default)]
    pub actor: String,
    /// Blocks of those owners and documents, found before anything was deleted.
    pub blocks: Vec<u64>,
    pub identity_before: String,
    /// kNN entries before the opt-out (0 without kNN keys).
    pub knn_entries_before: u64,
}

/// Holds the store's writers' lock.
pub(crate) fn lock(dir: &Path) -> Result<durable::Lock> {
    let path = dir.join(LOCK);
    durable::Lock::acquire(&path).map_err(Error::io(path))
}

pub(crate) fn intent_path(dir: &Path) -> PathBuf {
    dir.join(INTENT)
}

/// The pending opt-out, if any.
pub(crate) fn pending(dir: &Path) -> Result<Option<Intent>> {
    let path = intent_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Input {
                path,
                message: format!("invalid pending opt-out: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io { path, source: e }),
    }
}

pub(crate) fn write_intent(dir: &Path, intent: &Intent) -> Result<()> {
    let path = intent_path(dir);
    let json = serde_json::to_vec_pretty(intent).map_err(|e| Error::store(dir, e.to_string()))?;
    durable::write_atomic(&path, &json).map_err(Error::io(path))
}

pub(crate) fn clear_intent(dir: &Path) -> Result<()> {
    let path = intent_path(dir);
    std::fs::remove_file(&path).map_err(Error::io(&path))?;
    durable::sync_dir(dir).map_err(Error::io(dir))
}

/// Whether the audit log already has `action` for opt-out `id` (a redone step must not log twice).
pub(crate) fn logged(dir: &Path, id: &str, action: &str) -> Result<bool> {
    let path = dir.join(crate::store::AUDIT);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::Io { path, source: e }),
    };
    Ok(text.lines().any(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
            v.get("opt_out_id").and_then(|x| x.as_str()) == Some(id)
                && v.get("action").and_then(|x| x.as_str()) == Some(action)
        })
    }))
}
