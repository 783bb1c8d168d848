//! `y = x W^T` for row-major `x [m, k]` and weights `W [n, k]` (the layout checkpoints store), the matmul
//! behind every projection.
//!
//! Each output element is one dot product of two contiguous rows, computed by the same instruction sequence
//! wherever it falls in a tile: 16 lane-wise FMA accumulators over `k`, a fixed-order lane reduction, then
//! the tail. A row's result is therefore bit-identical whatever else is in the batch, so scores cannot
//! depend on batch size, and routing decisions cannot flip with it. Weights are read in place, without the
//! packing copy a general GEMM makes, which matters most when decoding (few rows, every weight read once).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows of `x` per parallel work item; a block of `x` stays in L2 while weight rows stream past it.
const M_BLOCK: usize = 64;
/// Weight rows per parallel work item.
const N_BLOCK: usize = 64;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: work items write disjoint (row block, column block) rectangles of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// A projection `y = x W^T` with the weight kept as `[out, in]`.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x [m, in] -> [m, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let (n, kw) = self.weight.dims2()?;
        if k != kw {
            return Err(Error::Input(format!("matmul: input width {k} but weight width {kw}")));
        }
        let x = x.contiguous()?;
        let out = with_f32(&x, |xs| self.forward_rows(xs, m))??;
        Ok(Tensor::from_vec(out, (m, n), &Device::Cpu)?)
    }

    /// `m` rows of `x` (each `in` wide) -> `m` rows of `out` values.
    pub fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = self.weight.dims2()?;
        if x.len() != m * k {
            return Err(Error::Input(format!("matmul: {} inputs for {m} rows of width {k}", x.len())));
        }
        with_f32(&self.weight, |ws| matmul_nt(x, ws, m, n, k))
    }
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let cpu = match &*storage {
        candle_core::Storage::Cpu(c) => c,
        _ => return Err(Error::Input("the CPU engine needs CPU tensors".into())),
    };
    let all = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    if !layout.is_contiguous() {
        return Err(Error::Input("internal: expected a contiguous tensor".into()));
    }
    Ok(f(&all[start..start + t.elem_count()]))
}

/// `x [m, k] . w [n, k]^T -> [m, n]`.
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    let mut out = vec![0f32; m * n];
    let ptr = OutPtr(out.as_mut_ptr());
    let blocks: Vec<(usize, usize)> = (0..m.div_ceil(M_BLOCK))
        .flat_map(|mb| (0..n.div_ceil(N_BLOCK)).map(move |nb| (mb, nb)))
        .collect();
    let kernel = Kernel::detect();
    blocks.par_iter().for_each(|&(mb, nb)| {
        let rows = mb * M_BLOCK..((mb + 1) * M_BLOCK).min(m);
        let cols = nb * N_BLOCK..((nb + 1) * N_BLOCK).min(n);
        let p = ptr;
        // SAFETY: this item writes only out[rows, cols]; `out` outlives the parallel loop.
        unsafe { kernel.block(x, w, k, n, rows, cols, p.0) };
    });
    out
}

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Computes `out[r, c] = dot(x[r], w[c])` for `r in rows`, `c in cols`, in 4 x 4 tiles.
    ///
    /// # Safety
    /// `out` must be valid for writes of `rows.end * ldo` floats.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        self,
        x: &[f32],
        w: &[f32],
        k: usize,
        ldo: usize,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        let mut c = cols.start;
        while c < cols.end {
            let nc = (cols.end - c).min(4);
            let mut r = rows.start;
            while r < rows.end {
                let nr = (rows.end - r).min(4);
                let mut acc = [[0f32; 4]; 4];
                match self {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512 => avx512::tile(x, w, k, r, nr, c, nc, &mut acc),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => avx2::tile(x, w, k, r, nr, c, nc, &mut acc),
                    Kernel::Portable => portable_tile(x, w, k, r, nr, c, nc, &mut acc),
                }
                for (i, row) in acc.iter().enumerate().take(nr) {
                    for (j, &v) in row.iter().enumerate().take(nc) {
                        *out.add((r + i) * ldo + c + j) = v;
                    }
                }
                r += nr;
            }
            c += nc;
        }
    }
}

/// Reference kernel for CPUs without AVX2: 16 lane accumulators per element, like the SIMD kernels.
#[allow(clippy::too_many_arguments)]
fn portable_tile(x: &[f32], w: &[f32], k: usize, r: usize, nr: usize, c: usize, nc: usize, acc: &mut [[f32; 4]; 4]) {
    for i in 0..nr {
        for j in 0..nc {
            let xr = &x[(r + i) * k..(r + i + 1) * k];
            let wr = &w[(c + j) * k..(c + j + 1) * k];
            let mut lanes = [0f32; 16];
            let body = k / 16 * 16;
            for (xc, wc) in xr[..body].chunks_exact(16).zip(wr[..body].chunks_exact(16)) {
                for l in 0..16 {
                    lanes[l] = xc[l].mul_add(wc[l], lanes[l]);
                }
            }
            let mut s = lanes.iter().sum::<f32>();
            for t in body..k {
                s = xr[t].mul_add(wr[t], s);
            }
            acc[i][j] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Dot products of up to 4 rows of `x` with up to 4 rows of `w`, 16 lanes at a time.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tile(x: &[f32], w: &[f32], k: usize, r: usize, nr: usize, c: usize, nc: usize, acc: &mut [[f32; 4]; 4]) {
        // SAFETY: the caller checked for AVX-512F; all loads are within the rows sliced below.
        unsafe { tile_impl(x, w, k, r, nr, c, nc, acc) }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_impl(x: &[f32], w: &[f32], k: usize, r: usize, nr: usize, c: usize, nc: usize, acc: &mut [[f32; 4]; 4]) {
        let xs: [&[f32]; 4] = std::array::from_fn(|i| &x[(r + i.min(nr - 1)) * k..][..k]);
        let ws: [&[f32]; 4] = std::array::from_fn(|j| &w[(c + j.min(nc - 1)) * k..][..k]);
        let mut a = [[_mm512_setzero_ps(); 4]; 4];
        let body = k / 16 * 16;
        let mut t = 0;
        // The next tile's weight rows follow these four in memory: fetch them while this tile computes.
        let ahead = w.as_ptr().wrapping_add((c + 4) * k);
        while t < body {
            for j in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(j * k + t) as *const i8);
            }
            // Plain loads, not `array::from_fn`: closures do not inherit `target_feature` and would not inline.
            let wv = [
                _mm512_loadu_ps(ws[0].as_ptr().add(t)),
                _mm512_loadu_ps(ws[1].as_ptr().add(t)),
                _mm512_loadu_ps(ws[2].as_ptr().add(t)),
                _mm512_loadu_ps(ws[3].as_ptr().add(t)),
            ];
            for i in 0..4 {
                let xv = _mm512_loadu_ps(xs[i].as_ptr().add(t));
                for j in 0..4 {
                    a[i][j] = _mm512_fmadd_ps(xv, wv[j], a[i][j]);
                }
            }
            t += 16;
        }
        for i in 0..nr {
            for j in 0..nc {
                let mut s = _mm512_reduce_add_ps(a[i][j]);
                for u in body..k {
                    s = xs[i][u].mul_add(ws[j][u], s);
                }
                acc[i][j] = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Dot products of up to 4 rows of `x` with up to 4 rows of `w`, as two 8-lane halves per 16 floats so
    /// each element sees the same 16-lane accumulation pattern as the other kernels.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tile(x: &[f32], w: &[f32], k: usize, r: usize, nr: usize, c: usize, nc: usize, acc: &mut [[f32; 4]; 4]) {
        // SAFETY: the caller checked for AVX2 and FMA; all loads are within the rows sliced below.
        unsafe { tile_impl(x, w, k, r, nr, c, nc, acc) }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_impl(x: &[f32], w: &[f32], k: usize, r: usize, nr: usize, c: usize, nc: usize, acc: &mut [[f32; 4]; 4]) {
        for i in 0..nr {
            let xr = &x[(r + i) * k..][..k];
            for j in 0..nc {
                let wr = &w[(c + j) * k..][..k];
                let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let body = k / 16 * 16;
                let mut t = 0;
                while t < body {
                    lo = _mm256_fmadd_ps(_mm256_loadu_ps(xr.as_ptr().add(t)), _mm256_loadu_ps(wr.as_ptr().add(t)), lo);
                    hi = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xr.as_ptr().add(t + 8)),
                        _mm256_loadu_ps(wr.as_ptr().add(t + 8)),
                        hi,
                    );
                    t += 16;
                }
                let mut lanes = [0f32; 16];
                _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
                let mut s = lanes.iter().sum::<f32>();
                for u in body..k {
                    s = xr[u].mul_add(wr[u], s);
                }
                acc[i][j] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn matches_naive_and_is_row_independent() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 17), (9, 70, 64), (70, 7, 130), (130, 131, 40)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let y = matmul_nt(&x, &w, m, n, k);
            for i in 0..m {
                for j in 0..n {
                    let naive: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                    assert!((y[i * n + j] as f64 - naive).abs() < 1e-4, "{m}x{n}x{k} at {i},{j}");
                }
            }
            // Any row alone gives bit-identical results.
            for i in [0, m / 2, m - 1] {
                let alone = matmul_nt(&x[i * k..(i + 1) * k], &w, 1, n, k);
                assert_eq!(alone, y[i * n..(i + 1) * n].to_vec(), "{m}x{n}x{k} row {i}");
            }
        }
    }
}
