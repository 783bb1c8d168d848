//! Paired comparison of two runs (or two masks of one run) on the samples they share.

use std::collections::HashMap;

use crate::results::SampleRow;
use crate::stats::{mcnemar_exact, paired_bootstrap, PairedDiff, BOOTSTRAP_ITERS, BOOTSTRAP_SEED};

/// The difference B − A of one metric of one task.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub task: String,
    pub metric: String,
    pub diff: PairedDiff,
    /// McNemar's exact test for 0/1 metrics, else the paired bootstrap.
    pub test: &'static str,
    pub p_value: f64,
    /// 0/1 metrics: samples only A got right, only B got right.
    pub only_a: usize,
    pub only_b: usize,
    pub higher_is_better: bool,
}

/// Compares per-sample metrics of `a` and `b` on the samples both have: the same task, document
/// and prompt (by prompt hash, so a changed few-shot context is not paired). Tasks and metrics
/// come out in `a`'s order.
pub fn compare(
    a: &[&SampleRow],
    b: &[&SampleRow],
    higher_is_better: impl Fn(&str, &str) -> bool,
) -> Vec<Comparison> {
    let index: HashMap<(&str, i64, &str), &SampleRow> = b
        .iter()
        .map(|s| ((s.task.as_str(), s.doc_id, s.prompt_hash.as_str()), *s))
        .collect();
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut pairs: HashMap<(String, String), Vec<(f64, f64)>> = HashMap::new();
    for s in a {
        let Some(t) = index.get(&(s.task.as_str(), s.doc_id, s.prompt_hash.as_str())) else {
            continue;
        };
        for (m, va) in &s.metrics {
            let Some(vb) = t.metrics.iter().find(|(n, _)| n == m).map(|x| x.1) else {
                continue;
            };
            if !(va.is_finite() && vb.is_finite()) {
                continue;
            }
            let k = (s.task.clone(), m.clone());
            if !pairs.contains_key(&k) {
                keys.push(k.clone());
            }
            pairs.entry(k).or_default().push((*va, vb));
        }
    }
    keys.into_iter()
        .map(|k| {
            let p = &pairs[&k];
            let diff = paired_bootstrap(p, BOOTSTRAP_ITERS, BOOTSTRAP_SEED);
            let binary = p
                .iter()
                .all(|(x, y)| (*x == 0.0 || *x == 1.0) && (*y == 0.0 || *y == 1.0));
            let only_a = p.iter().filter(|(x, y)| *x == 1.0 && *y == 0.0).count();
            let only_b = p.iter().filter(|(x, y)| *x == 0.0 && *y == 1.0).count();
            let (test, p_value) = if binary {
                ("mcnemar", mcnemar_exact(only_a, only_b))
            } else {
                ("bootstrap", diff.p_bootstrap)
            };
            Comparison {
                higher_is_better: higher_is_better(&k.0, &k.1),
                task: k.0,
                metric: k.1,
                diff,
                test,
                p_value,
                only_a: if binary { only_a } else { 0 },
                only_b: if binary { only_b } else { 0 },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(task: &str, doc: i64, acc: f64, prompt: &str) -> SampleRow {
        SampleRow {
            task: task.into(),
            doc_id: doc,
            prompt_hash: prompt.into(),
            metrics: vec![("acc".into(), acc), ("ppl".into(), acc * 2.0 + doc as f64)],
            ..SampleRow::default()
        }
    }

    #[test]
    fn pairs_on_task_doc_and_prompt() {
        let a: Vec<SampleRow> = (0..20).map(|i| row("t", i, (i % 2) as f64, "p")).collect();
        let mut b: Vec<SampleRow> = (0..20).map(|i| row("t", i, 1.0, "p")).collect();
        // A different prompt is not the same sample.
        b[0].prompt_hash = "other".into();
        let ra: Vec<&SampleRow> = a.iter().collect();
        let rb: Vec<&SampleRow> = b.iter().collect();
        let c = compare(&ra, &rb, |_, m| tasks::metrics::higher_is_better(m));
        assert_eq!(c.len(), 2);
        let acc = &c[0];
        assert_eq!(
            (acc.metric.as_str(), acc.test, acc.diff.n),
            ("acc", "mcnemar", 19)
        );
        assert_eq!((acc.only_a, acc.only_b), (0, 9));
        assert!((acc.p_value - mcnemar_exact(0, 9)).abs() < 1e-15);
        assert!(acc.diff.diff > 0.0 && acc.diff.ci_low > 0.0);
        assert_eq!(c[1].test, "bootstrap");
        // A run against itself: no difference.
        let same = compare(&ra, &ra, |_, m| tasks::metrics::higher_is_better(m));
        assert!(same.iter().all(|c| c.diff.diff == 0.0 && c.p_value == 1.0));
    }
}
