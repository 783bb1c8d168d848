use crate::ExpertMask;

/// How a MoE layer turns router logits into expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    /// Experts per token (`num_experts_per_tok`). Capped at the number of allowed experts.
    pub top_k: usize,
    /// Renormalise the top-k probabilities to sum to one (`norm_topk_prob`).
    pub norm_topk_prob: bool,
}

impl Routing {
    /// Chooses experts for one token from its router logits (length = the mask's expert count).
    ///
    /// Softmax in f32 over the allowed experts (masked logits are `-inf`), then the `min(top_k, allowed)`
    /// largest probabilities, in descending order; ties go to the lower index, as `torch.topk` does on CPU.
    pub fn route(&self, logits: &[f32], mask: &ExpertMask) -> Vec<(usize, f32)> {
        debug_assert_eq!(logits.len(), mask.num_experts());
        let max = mask
            .allowed()
            .map(|e| logits[e])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f32)> = mask
            .allowed()
            .map(|e| (e, (logits[e] - max).exp()))
            .collect();
        let sum: f32 = probs.iter().map(|p| p.1).sum();
        for p in &mut probs {
            p.1 /= sum;
        }
        // Stable sort keeps the lower index first among equal probabilities.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        probs.truncate(self.top_k.min(probs.len()));
        if self.norm_topk_prob {
            let top: f32 = probs.iter().map(|p| p.1).sum();
            for p in &mut probs {
                p.1 /= top;
            }
        }
        probs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_equals_removed() {
        let r = Routing {
            top_k: 2,
            norm_topk_prob: false,
        };
        let logits = [0.5f32, 2.0, 1.0, -0.5];
        let masked = r.route(&logits, &ExpertMask::all(4).without(&[1]).unwrap());
        let removed = r.route(&[0.5, 1.0, -0.5], &ExpertMask::all(3));
        // Index 2 in the full model is index 1 once expert 1 is deleted.
        assert_eq!(masked.len(), 2);
        assert_eq!(masked[0].0, 2);
        assert_eq!(removed[0].0, 1);
        assert!((masked[0].1 - removed[0].1).abs() < 1e-7);
        assert!((masked[1].1 - removed[1].1).abs() < 1e-7);
    }

    #[test]
    fn top_k_capped_and_normalised() {
        let r = Routing {
            top_k: 3,
            norm_topk_prob: true,
        };
        let out = r.route(&[1.0, 2.0], &ExpertMask::all(2));
        assert_eq!(out.len(), 2);
        assert!((out.iter().map(|p| p.1).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
