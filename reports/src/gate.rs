//! The regression gate: current headline metrics against a committed baseline.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{file_err, io, Error, Result};
use crate::fsutil::write_atomic;
use crate::leaderboard::Entry;

/// A committed baseline (`moeval gate --update` writes it).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    /// Free text: what produced the baseline.
    pub note: String,
    pub entries: Vec<BaselineEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BaselineEntry {
    pub mask: String,
    /// Retrieval settings of the row (`none` in baselines written before it was recorded).
    #[serde(default = "no_retrieval", skip_serializing_if = "is_no_retrieval")]
    pub retrieval: String,
    pub task: String,
    pub metric: String,
    pub value: f64,
    pub stderr: Option<f64>,
    pub higher_is_better: bool,
}

fn no_retrieval() -> String {
    "none".into()
}

fn is_no_retrieval(r: &String) -> bool {
    r == "none"
}

/// A baseline metric that dropped beyond its allowance, or that the runs no longer report.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub entry: BaselineEntry,
    pub current: Option<f64>,
    /// How much worse (in the metric's units, positive = worse).
    pub drop: f64,
    pub allowance: f64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = &self.entry;
        let row = match e.retrieval.as_str() {
            "none" => e.mask.clone(),
            r => format!("{}, {r}", e.mask),
        };
        match self.current {
            None => write!(
                f,
                "{} {} [{row}]: missing from the runs (baseline {:.4})",
                e.task, e.metric, e.value
            ),
            Some(c) => write!(
                f,
                "{} {} [{row}]: {:.4} -> {:.4} ({} by {:.4}, allowed {:.4})",
                e.task,
                e.metric,
                e.value,
                c,
                if e.higher_is_better { "fell" } else { "rose" },
                self.drop,
                self.allowance
            ),
        }
    }
}

/// (mask, retrieval, task, metric): what one baseline entry measures.
type Key = (String, String, String, String);

fn key(mask: &str, retrieval: &str, task: &str, metric: &str) -> Key {
    (
        mask.to_string(),
        retrieval.to_string(),
        task.to_string(),
        metric.to_string(),
    )
}

/// Current values by (mask, retrieval, task, metric); the same metric of the same model, mask and
/// retrieval in two runs is ambiguous.
fn current(entries: &[Entry]) -> Result<HashMap<Key, &Entry>> {
    let mut out: HashMap<Key, &Entry> = HashMap::new();
    for e in entries {
        if let Some(prev) = out.insert(key(&e.mask, &e.retrieval, &e.task, &e.metric), e) {
            if prev.run_id != e.run_id {
                return Err(Error::Invalid(format!(
                    "{} {} [mask {}, retrieval {}] is in runs `{}` and `{}`; gate one run per task",
                    e.task, e.metric, e.mask, e.retrieval, prev.run_id, e.run_id
                )));
            }
        }
    }
    Ok(out)
}

impl Baseline {
    pub fn read(path: &Path) -> Result<Baseline> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        serde_json::from_str(&text).map_err(|e| file_err(path, e))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).map_err(|e| file_err(path, e))?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// A baseline of every headline metric with a finite value.
    pub fn from_entries(entries: &[Entry], note: &str) -> Result<Baseline> {
        current(entries)?;
        Ok(Baseline {
            note: note.to_string(),
            entries: entries
                .iter()
                .filter_map(|e| {
                    let v = e.value.filter(|v| v.is_finite())?;
                    Some(BaselineEntry {
                        mask: e.mask.clone(),
                        retrieval: e.retrieval.clone(),
                        task: e.task.clone(),
                        metric: e.metric.clone(),
                        value: v,
                        stderr: e.stderr.filter(|s| s.is_finite()),
                        higher_is_better: e.higher_is_better,
                    })
                })
                .collect(),
        })
    }

    /// Checks every baseline metric. A metric fails when it got worse by more than
    /// `max_drop × max(1, |baseline|) + z × sqrt(se_baseline² + se_current²)`: `max_drop` is in the
    /// metric's units on 0–1 scales and relative for larger ones (perplexities, bias × 100), and
    /// the standard errors widen the allowance so noise alone does not fail the gate.
    pub fn check(&self, entries: &[Entry], max_drop: f64, z: f64) -> Result<Vec<Failure>> {
        let cur = current(entries)?;
        let mut out = Vec::new();
        for b in &self.entries {
            let c = cur.get(&key(&b.mask, &b.retrieval, &b.task, &b.metric));
            let value = c.and_then(|c| c.value).filter(|v| v.is_finite());
            let Some(v) = value else {
                out.push(Failure {
                    entry: b.clone(),
                    current: None,
                    drop: f64::INFINITY,
                    allowance: 0.0,
                });
                continue;
            };
            let se_b = b.stderr.unwrap_or(0.0);
            let se_c = c
                .and_then(|c| c.stderr)
                .filter(|s| s.is_finite())
                .unwrap_or(0.0);
            let allowance =
                max_drop * b.value.abs().max(1.0) + z * (se_b * se_b + se_c * se_c).sqrt();
            let drop = if b.higher_is_better {
                b.value - v
            } else {
                v - b.value
            };
            // A tiny epsilon keeps bit-identical reruns from failing on rounding in JSON.
            if drop > allowance + 1e-9 {
                out.push(Failure {
                    entry: b.clone(),
                    current: Some(v),
                    drop,
                    allowance,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(task: &str, metric: &str, v: f64, se: f64, hib: bool) -> Entry {
        Entry {
            run_id: "r".into(),
            model_id: "m".into(),
            weights_hash: "h".into(),
            mask: "full".into(),
            experts: String::new(),
            opted_out: String::new(),
            retrieval: "none".into(),
            task: task.into(),
            metric: metric.into(),
            value: Some(v),
            stderr: Some(se),
            n: 10,
            higher_is_better: hib,
            primary: true,
        }
    }

    #[test]
    fn gate_uses_direction_allowance_and_stderr() {
        let base = Baseline::from_entries(
            &[
                e("a", "acc", 0.80, 0.01, true),
                e("p", "word_perplexity", 100.0, 1.0, false),
                e("gone", "acc", 0.5, 0.0, true),
            ],
            "test",
        )
        .unwrap();
        // acc fell 0.10 (allowance 0.02 + 2 * sqrt(2) * 0.01 = 0.048): fails.
        // perplexity rose 3 (allowance 0.02 * 100 + 2 * sqrt(2) = 4.83): passes.
        let now = [
            e("a", "acc", 0.70, 0.01, true),
            e("p", "word_perplexity", 103.0, 1.0, false),
        ];
        let f = base.check(&now, 0.02, 2.0).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].entry.task, "a");
        assert!(f[0].to_string().contains("fell by 0.1000"), "{}", f[0]);
        assert_eq!(f[1].current, None);
        assert!(f[1].to_string().contains("missing"));
        // Perplexity rising by 10 fails; improvements never fail.
        let now = [
            e("a", "acc", 0.95, 0.01, true),
            e("p", "word_perplexity", 110.0, 1.0, false),
            e("gone", "acc", 0.5, 0.0, true),
        ];
        let f = base.check(&now, 0.02, 2.0).unwrap();
        assert_eq!(f.len(), 1);
        assert!(f[0].to_string().contains("rose"), "{}", f[0]);
        // Identical values pass with no allowance at all.
        let f = base
            .check(
                &[
                    e("a", "acc", 0.80, 0.01, true),
                    e("p", "word_perplexity", 100.0, 1.0, false),
                    e("gone", "acc", 0.5, 0.0, true),
                ],
                0.0,
                0.0,
            )
            .unwrap();
        assert!(f.is_empty());
    }

    #[test]
    fn retrieval_tells_rows_apart_and_old_baselines_mean_none() {
        let plain = e("ppl", "word_perplexity", 10.0, 0.0, false);
        let mut knn = e("ppl", "word_perplexity", 8.0, 0.0, false);
        knn.run_id = "knn".into();
        knn.retrieval = "knn:k=4".into();
        let base = Baseline::from_entries(&[plain.clone(), knn.clone()], "t").unwrap();
        assert_eq!(base.entries[1].retrieval, "knn:k=4");
        // The kNN row got worse; the plain one did not.
        knn.value = Some(12.0);
        let f = base.check(&[plain.clone(), knn.clone()], 0.0, 0.0).unwrap();
        assert_eq!(f.len(), 1);
        assert!(
            f[0].to_string()
                .contains("[full, knn:k=4]: 8.0000 -> 12.0000"),
            "{}",
            f[0]
        );
        // The same mask and retrieval from two runs is ambiguous.
        let mut twin = plain.clone();
        twin.run_id = "other".into();
        let err = base.check(&[plain, twin], 0.0, 0.0).unwrap_err();
        assert!(err.to_string().contains("runs `r` and `other`"), "{err}");
        // A baseline written before retrieval was recorded reads as `none`.
        let old: Baseline = serde_json::from_str(
            r#"{"note":"","entries":[{"mask":"full","task":"t","metric":"acc","value":1.0,"stderr":null,"higher_is_better":true}]}"#,
        )
        .unwrap();
        assert_eq!(old.entries[0].retrieval, "none");
    }
}
