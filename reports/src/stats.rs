//! Paired statistics: bootstrap confidence intervals and McNemar's exact test.

/// SplitMix64: a tiny seeded generator, so intervals are reproducible without a dependency.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0), by rejection so it has no modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return (x % n) as usize;
            }
        }
    }
}

/// A paired difference `mean(b - a)` with a percentile-bootstrap 95% interval and a two-sided
/// bootstrap p-value (how often a resampled mean lies at least |mean| from the observed one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairedDiff {
    pub n: usize,
    pub mean_a: f64,
    pub mean_b: f64,
    pub diff: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub p_bootstrap: f64,
}

pub const BOOTSTRAP_ITERS: usize = 1000;
pub const BOOTSTRAP_SEED: u64 = 1234;

/// Paired bootstrap over `(a_i, b_i)` pairs. Empty input gives NaNs.
pub fn paired_bootstrap(pairs: &[(f64, f64)], iters: usize, seed: u64) -> PairedDiff {
    let n = pairs.len();
    let mean = |xs: &mut dyn Iterator<Item = f64>| {
        let (s, k) = xs.fold((0.0, 0usize), |(s, k), x| (s + x, k + 1));
        s / k as f64
    };
    let d: Vec<f64> = pairs.iter().map(|(a, b)| b - a).collect();
    let diff = mean(&mut d.iter().copied());
    let mut out = PairedDiff {
        n,
        mean_a: mean(&mut pairs.iter().map(|p| p.0)),
        mean_b: mean(&mut pairs.iter().map(|p| p.1)),
        diff,
        ci_low: f64::NAN,
        ci_high: f64::NAN,
        p_bootstrap: f64::NAN,
    };
    if n == 0 || iters == 0 {
        return out;
    }
    let mut rng = SplitMix::new(seed);
    let mut means: Vec<f64> = (0..iters)
        .map(|_| (0..n).map(|_| d[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    let extreme = means
        .iter()
        .filter(|m| (*m - diff).abs() >= diff.abs() - 1e-12)
        .count();
    means.sort_by(f64::total_cmp);
    let q = |p: f64| means[((p * (iters - 1) as f64).round() as usize).min(iters - 1)];
    out.ci_low = q(0.025);
    out.ci_high = q(0.975);
    out.p_bootstrap = if diff == 0.0 {
        1.0
    } else {
        (extreme as f64 + 1.0) / (iters as f64 + 1.0)
    };
    out
}

/// McNemar's exact test: `b` = pairs only A got right, `c` = pairs only B got right. Two-sided
/// binomial p-value of min(b, c) under p = 1/2, computed in log space so large counts do not
/// underflow.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    let ln2 = std::f64::consts::LN_2;
    let mut ln_choose = 0.0; // ln C(n, 0)
    let mut terms = Vec::with_capacity(k + 1);
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        terms.push(ln_choose - n as f64 * ln2);
    }
    let mx = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let tail = mx.exp() * terms.iter().map(|t| (t - mx).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_the_binomial() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // b=1, c=5, n=6: 2 * (1 + 6) / 64 = 0.21875.
        assert!((mcnemar_exact(1, 5) - 0.21875).abs() < 1e-12);
        assert!((mcnemar_exact(5, 1) - 0.21875).abs() < 1e-12);
        // b=0, c=10: 2 / 1024.
        assert!((mcnemar_exact(0, 10) - 2.0 / 1024.0).abs() < 1e-15);
        assert_eq!(mcnemar_exact(7, 7), 1.0);
        // Large counts do not underflow.
        let p = mcnemar_exact(900, 1100);
        assert!(p > 0.0 && p < 1e-4, "{p}");
    }

    #[test]
    fn bootstrap_interval_covers_a_clear_shift_and_not_zero() {
        let pairs: Vec<(f64, f64)> = (0..200)
            .map(|i| {
                let x = (i as f64 * 0.37).sin();
                (x, x + 0.5 + 0.1 * (i as f64 * 1.3).cos())
            })
            .collect();
        let d = paired_bootstrap(&pairs, 1000, 1);
        assert!((d.diff - 0.5).abs() < 0.02, "{d:?}");
        assert!(d.ci_low > 0.4 && d.ci_high < 0.6 && d.ci_low < d.diff && d.diff < d.ci_high);
        assert!(d.p_bootstrap < 0.01);
        // No difference at all: p = 1 and a zero-width interval.
        let same: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, i as f64)).collect();
        let d = paired_bootstrap(&same, 500, 1);
        assert_eq!(
            (d.diff, d.ci_low, d.ci_high, d.p_bootstrap),
            (0.0, 0.0, 0.0, 1.0)
        );
        // Seeded: identical on reruns.
        assert_eq!(
            paired_bootstrap(&pairs, 300, 9),
            paired_bootstrap(&pairs, 300, 9)
        );
    }
}
