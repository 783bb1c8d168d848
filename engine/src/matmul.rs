//! `y = x W^T` for row-major `x [m, k]` and weights `W [n, k]` (the layout checkpoints store): the matmul
//! behind every projection.
//!
//! Weights are repacked once at load time into panels of [`NR`] output columns, each panel `[k][NR]`
//! contiguous, so every pass over a weight streams memory in order (what decoding, which reads each weight
//! once per step, is bound by). The micro-kernel accumulates each output element as one fused multiply-add
//! chain over `k` in order, whatever tile or kernel computes it: a row's result is bit-identical whatever
//! else is in the batch (scores cannot depend on batch size, and routing cannot flip with it), and the
//! AVX-512, AVX2 and portable kernels agree exactly.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Output columns per packed panel (four 16-lane vectors).
const NR: usize = 64;
/// Rows of `x` per micro-kernel call.
const MR: usize = 6;
/// Rows of `x` per parallel work item: a block stays in L2 while panels stream past it.
const M_BLOCK: usize = 120;
/// Panels per parallel work item.
const P_BLOCK: usize = 2;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: work items write disjoint (row block, column block) rectangles of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// A projection `y = x W^T`, its weight `W [out, in]` held in packed panels.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    n: usize,
    k: usize,
    /// `ceil(n / NR)` panels of `k * NR` floats; panel `p` row `t` holds `W[p*NR .. p*NR+NR, t]`, zero-padded.
    panels: Vec<f32>,
}

impl Linear {
    /// Packs a row-major `[n, k]` weight in place (each panel is a contiguous run of `NR` rows already).
    pub fn new(mut values: Vec<f32>, n: usize, k: usize) -> Self {
        debug_assert_eq!(values.len(), n * k);
        values.resize(n.div_ceil(NR) * NR * k, 0.0);
        values.par_chunks_mut(NR * k).for_each(|panel| {
            let rows = panel.to_vec();
            for (j, row) in rows.chunks_exact(k).enumerate() {
                for (t, &v) in row.iter().enumerate() {
                    panel[t * NR + j] = v;
                }
            }
        });
        Self {
            n,
            k,
            panels: values,
        }
    }

    /// `x [m, in] -> [m, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, _) = x.dims2()?;
        let out = with_f32(&x.contiguous()?, |xs| self.forward_rows(xs, m))??;
        Ok(Tensor::from_vec(out, (m, self.n), &Device::Cpu)?)
    }

    /// `m` rows of `x` (each `in` wide) -> `m` rows of `out` values.
    pub fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if x.len() != m * self.k {
            return Err(Error::Input(format!(
                "matmul: {} inputs for {m} rows of width {}",
                x.len(),
                self.k
            )));
        }
        Ok(matmul_packed(x, m, self.k, &self.panels, self.n, self.k))
    }

    /// Like [`forward_rows`](Self::forward_rows) for rows `ldx` floats apart whose first `in` values are
    /// the input (the rest of each row is ignored).
    pub fn forward_strided(&self, x: &[f32], m: usize, ldx: usize) -> Result<Vec<f32>> {
        if ldx < self.k || (m > 0 && x.len() < (m - 1) * ldx + self.k) {
            return Err(Error::Input(format!(
                "matmul: {} inputs for {m} rows of width {} at stride {ldx}",
                x.len(),
                self.k
            )));
        }
        Ok(matmul_packed(x, m, ldx, &self.panels, self.n, self.k))
    }
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let cpu = match &*storage {
        candle_core::Storage::Cpu(c) => c,
        _ => return Err(Error::Input("the CPU engine needs CPU tensors".into())),
    };
    if !layout.is_contiguous() {
        return Err(Error::Input(
            "internal: expected a contiguous tensor".into(),
        ));
    }
    let all = cpu.as_slice::<f32>()?;
    let start = layout.start_offset();
    Ok(f(&all[start..start + t.elem_count()]))
}

/// `x [m, k] . W^T -> [m, n]` with `W` packed by [`Linear::new`]; row `i` of `x` starts at `i * ldx`.
pub fn matmul_packed(
    x: &[f32],
    m: usize,
    ldx: usize,
    panels: &[f32],
    n: usize,
    k: usize,
) -> Vec<f32> {
    // Every element is written below, so the buffer is not zeroed first.
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let ptr = OutPtr(out.as_mut_ptr());
    let n_panels = n.div_ceil(NR);
    let items: Vec<(usize, usize)> = (0..m.div_ceil(M_BLOCK))
        .flat_map(|mb| (0..n_panels.div_ceil(P_BLOCK)).map(move |pb| (mb, pb)))
        .collect();
    let kernel = Kernel::detect();
    items.par_iter().for_each(|&(mb, pb)| {
        let rows = mb * M_BLOCK..((mb + 1) * M_BLOCK).min(m);
        for p in pb * P_BLOCK..((pb + 1) * P_BLOCK).min(n_panels) {
            let panel = &panels[p * k * NR..][..k * NR];
            let cols = NR.min(n - p * NR);
            let mut r = rows.start;
            while r < rows.end {
                let nr = MR.min(rows.end - r);
                let mut tile = [[0f32; NR]; MR];
                kernel.tile(
                    &x[r * ldx..(r + nr - 1) * ldx + k],
                    nr,
                    k,
                    ldx,
                    panel,
                    &mut tile,
                );
                let o = ptr;
                for (i, vals) in tile.iter().enumerate().take(nr) {
                    // SAFETY: row r+i < m and columns p*NR..p*NR+cols < n belong to this item alone.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            vals.as_ptr(),
                            o.0.add((r + i) * n + p * NR),
                            cols,
                        );
                    }
                }
                r += nr;
            }
        }
    });
    // SAFETY: the row blocks cover 0..m and the panels cover 0..n, so all m * n elements were written.
    unsafe { out.set_len(m * n) };
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
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// `tile[i][j] = sum_t x[i][t] * panel[t][j]` for the `rows` (<= MR) rows of `x`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        self,
        x: &[f32],
        rows: usize,
        k: usize,
        ldx: usize,
        panel: &[f32],
        tile: &mut [[f32; NR]; MR],
    ) {
        assert!(
            (1..=MR).contains(&rows) && x.len() == (rows - 1) * ldx + k && panel.len() == k * NR
        );
        match self {
            // SAFETY: the features were detected at run time; the slices' lengths are checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::tile_avx512(x, rows, k, ldx, panel, tile) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::tile_avx2(x, rows, k, ldx, panel, tile) },
            Kernel::Portable => {
                for (i, out) in tile.iter_mut().enumerate().take(rows) {
                    let xr = &x[i * ldx..i * ldx + k];
                    for (t, &a) in xr.iter().enumerate() {
                        for (o, &b) in out.iter_mut().zip(&panel[t * NR..(t + 1) * NR]) {
                            *o = a.mul_add(b, *o);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Up to 6 rows x 64 columns in zmm accumulators, specialised per row count so small batches (decoding)
    /// do no wasted work.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(
        x: &[f32],
        rows: usize,
        k: usize,
        ldx: usize,
        panel: &[f32],
        tile: &mut [[f32; NR]; MR],
    ) {
        match rows {
            1 => rows_avx512::<1>(x, k, ldx, panel, tile),
            2 => rows_avx512::<2>(x, k, ldx, panel, tile),
            3 => rows_avx512::<3>(x, k, ldx, panel, tile),
            4 => rows_avx512::<4>(x, k, ldx, panel, tile),
            5 => rows_avx512::<5>(x, k, ldx, panel, tile),
            _ => rows_avx512::<6>(x, k, ldx, panel, tile),
        }
    }

    /// Floats ahead of the current panel row to prefetch: the hardware prefetcher stops at page boundaries.
    const PREFETCH: usize = 16 * NR;

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn rows_avx512<const R: usize>(
        x: &[f32],
        k: usize,
        ldx: usize,
        panel: &[f32],
        tile: &mut [[f32; NR]; MR],
    ) {
        let mut xp = [x.as_ptr(); R];
        for (i, p) in xp.iter_mut().enumerate() {
            *p = x.as_ptr().add(i * ldx);
        }
        let b = panel.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for t in 0..k {
            let ahead = b.wrapping_add(t * NR + PREFETCH);
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * l) as *const i8);
            }
            let bv = [
                _mm512_loadu_ps(b.add(t * NR)),
                _mm512_loadu_ps(b.add(t * NR + 16)),
                _mm512_loadu_ps(b.add(t * NR + 32)),
                _mm512_loadu_ps(b.add(t * NR + 48)),
            ];
            for i in 0..R {
                let a = _mm512_set1_ps(*xp[i].add(t));
                for j in 0..4 {
                    acc[i][j] = _mm512_fmadd_ps(a, bv[j], acc[i][j]);
                }
            }
        }
        for i in 0..R {
            for j in 0..4 {
                _mm512_storeu_ps(tile[i].as_mut_ptr().add(16 * j), acc[i][j]);
            }
        }
    }

    /// 4 rows x 32 columns at a time in 16 ymm accumulators, each half of a panel in turn.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn tile_avx2(
        x: &[f32],
        rows: usize,
        k: usize,
        ldx: usize,
        panel: &[f32],
        tile: &mut [[f32; NR]; MR],
    ) {
        let mut r0 = 0;
        while r0 < rows {
            for half in 0..NR / 32 {
                let b = panel.as_ptr().add(32 * half);
                let xp: [*const f32; 4] =
                    [0, 1, 2, 3].map(|i: usize| x.as_ptr().add((r0 + i).min(rows - 1) * ldx));
                let mut acc = [[_mm256_setzero_ps(); 4]; 4];
                for t in 0..k {
                    let bv = [
                        _mm256_loadu_ps(b.add(t * NR)),
                        _mm256_loadu_ps(b.add(t * NR + 8)),
                        _mm256_loadu_ps(b.add(t * NR + 16)),
                        _mm256_loadu_ps(b.add(t * NR + 24)),
                    ];
                    for i in 0..4 {
                        let a = _mm256_set1_ps(*xp[i].add(t));
                        for j in 0..4 {
                            acc[i][j] = _mm256_fmadd_ps(a, bv[j], acc[i][j]);
                        }
                    }
                }
                for i in 0..4.min(rows - r0) {
                    for j in 0..4 {
                        _mm256_storeu_ps(
                            tile[r0 + i].as_mut_ptr().add(32 * half + 8 * j),
                            acc[i][j],
                        );
                    }
                }
            }
            r0 += 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn kernels() -> Vec<Kernel> {
        let mut ks = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                ks.push(Kernel::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                ks.push(Kernel::Avx2);
            }
        }
        ks
    }

    #[test]
    fn matches_naive_and_is_row_independent() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (3, 5, 17),
            (9, 70, 64),
            (70, 33, 130),
            (300, 131, 40),
        ] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let panels = Linear::new(w.clone(), n, k).panels;
            let y = matmul_packed(&x, m, k, &panels, n, k);
            for i in 0..m {
                for j in 0..n {
                    let naive: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    assert!(
                        (y[i * n + j] as f64 - naive).abs() < 1e-4,
                        "{m}x{n}x{k} at {i},{j}"
                    );
                }
            }
            // Any row alone gives bit-identical results.
            for i in [0, m / 2, m - 1] {
                let alone = matmul_packed(&x[i * k..(i + 1) * k], 1, k, &panels, n, k);
                assert_eq!(alone, y[i * n..(i + 1) * n].to_vec(), "{m}x{n}x{k} row {i}");
            }
        }
    }

    #[test]
    fn kernels_agree_bit_for_bit() {
        let (m, k) = (MR - 1, 45);
        let x = data(m * k, 3);
        let panel = data(k * NR, 4);
        let results: Vec<_> = kernels()
            .into_iter()
            .map(|kern| {
                let mut tile = [[0f32; NR]; MR];
                kern.tile(&x, m, k, k, &panel, &mut tile);
                tile
            })
            .collect();
        for r in &results[1..] {
            assert_eq!(r, &results[0]);
        }
    }
}
