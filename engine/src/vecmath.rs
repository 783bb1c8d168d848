//! Element-wise kernels of the forward pass (softmax rows, SwiGLU), written so the compiler vectorises
//! them, and compiled twice: for AVX-512 (picked at run time) and for the baseline target. Both builds do
//! the same per-element arithmetic, so they give identical results.

/// `e^x` in f32 (Cephes-style range reduction and polynomial, ~1 ulp on the range that matters here).
/// Branch-free so it vectorises; inputs below -87.3 give the smallest normal instead of 0, which is
/// harmless for softmax and SiLU.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick: no call, no SSE4.1 needed.
    let shifted = x * std::f32::consts::LOG2_E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(0x4B40_0000);
    // r = x - n ln2, with ln2 split in two for precision.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n_int + 127) << 23) as u32)
}

#[inline(always)]
fn softmax_body(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    // 16 partial sums in a fixed order: vectorisable, and the same in every build.
    let mut lanes = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..16 {
            lanes[l] += c[l];
        }
    }
    let inv = 1.0 / (lanes.iter().sum::<f32>() + tail);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    #[target_feature(enable = "avx512f")]
    pub(super) fn softmax(row: &mut [f32]) {
        super::softmax_body(row)
    }
    #[target_feature(enable = "avx512f")]
    pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        super::silu_mul_body(gate, up)
    }
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Softmax of one row in place.
pub(crate) fn softmax(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F was detected at run time.
        return unsafe { avx512::softmax(row) };
    }
    softmax_body(row)
}

/// `gate = silu(gate) * up`, element-wise.
pub(crate) fn silu_mul_in_place(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F was detected at run time.
        return unsafe { avx512::silu_mul(gate, up) };
    }
    silu_mul_body(gate, up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            assert!(((a - b) / b).abs() < 3e-7, "exp({x}) = {a}, want {b}");
            x += 0.013;
        }
        assert!(exp(-1000.0) < 1e-37);
    }

    #[test]
    fn builds_agree_and_softmax_sums_to_one() {
        let mut a: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let mut b = a.clone();
        softmax(&mut a);
        softmax_body(&mut b);
        assert_eq!(a, b);
        assert!((a.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let g: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 9.0).collect();
        let (mut o1, mut o2) = (g.clone(), g.clone());
        silu_mul_in_place(&mut o1, &g);
        silu_mul_body(&mut o2, &g);
        assert_eq!(o1, o2);
    }
}
