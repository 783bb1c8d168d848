//! `y = x W^T` for row-major `x [m, k]` and weights `W [n, k]` (the layout checkpoints store): the matmul
//! behind every projection.
//!
//! Weights are repacked once at load time into panels of [`NR`] output columns, each panel `[k][NR]`
//! contiguous, so every pass over a weight streams memory in order (what decoding, which reads each weight
//! once per step, is bound by). The micro-kernel accumulates each output element as one fused multiply-add
//! chain over `k` in order, whatever tile or kernel computes it: a row's result is bit-identical whatever
//! else is in the batch (scores cannot depend on batch size, and routing cannot flip with it), and the
//! AVX-512, AVX2 and portable kernels agree exactly.
//!
//! Weights stay in the dtype they are given ([`Weight`]: f32, bf16 or f16 bits); the kernels widen
//! each loaded panel row to f32 in registers. Both widenings are exact, so a bf16 or f16 weight
//! held as such gives bit for bit the result of the same weight upcast to f32 at load, at half the
//! memory and half the bytes streamed per decoding step.

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

/// A weight's values as the engine holds them: f32, or the bits of bf16 / f16 values.
#[derive(Clone, Debug, PartialEq)]
pub enum Weight {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    F16(Vec<u16>),
}

impl Weight {
    pub fn len(&self) -> usize {
        match self {
            Weight::F32(v) => v.len(),
            Weight::Bf16(v) | Weight::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (exact).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Weight::F32(v) => v.clone(),
            Weight::Bf16(v) => v.iter().map(|&b| bf16_to_f32(b)).collect(),
            Weight::F16(v) => v.iter().map(|&b| f16_to_f32(b)).collect(),
        }
    }

    /// `self` followed by `other` (rows of a fused projection); upcast to f32 when their dtypes
    /// differ.
    pub fn concat(self, other: Weight) -> Weight {
        match (self, other) {
            (Weight::F32(mut a), Weight::F32(b)) => {
                a.extend(b);
                Weight::F32(a)
            }
            (Weight::Bf16(mut a), Weight::Bf16(b)) => {
                a.extend(b);
                Weight::Bf16(a)
            }
            (Weight::F16(mut a), Weight::F16(b)) => {
                a.extend(b);
                Weight::F16(a)
            }
            (a, b) => {
                let mut v = a.to_f32();
                v.extend(b.to_f32());
                Weight::F32(v)
            }
        }
    }

    /// Appends row `r` of a `[_, width]` matrix as f32 to `out`.
    pub fn extend_row_f32(&self, r: usize, width: usize, out: &mut Vec<f32>) {
        let span = r * width..(r + 1) * width;
        match self {
            Weight::F32(v) => out.extend_from_slice(&v[span]),
            Weight::Bf16(v) => out.extend(v[span].iter().map(|&b| bf16_to_f32(b))),
            Weight::F16(v) => out.extend(v[span].iter().map(|&b| f16_to_f32(b))),
        }
    }

    /// The dtype's name (`f32`, `bf16`, `f16`).
    pub fn dtype(&self) -> &'static str {
        match self {
            Weight::F32(_) => "f32",
            Weight::Bf16(_) => "bf16",
            Weight::F16(_) => "f16",
        }
    }
}

fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

fn f16_to_f32(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// The micro-kernel this CPU runs (`avx512`, `avx2` or `portable`), for manifests and benchmarks.
pub fn kernel_name() -> &'static str {
    Kernel::detect().name()
}

/// A projection `y = x W^T`, its weight `W [out, in]` held in packed panels.
#[derive(Clone, Debug)]
pub struct Linear {
    n: usize,
    k: usize,
    /// `ceil(n / NR)` panels of `k * NR` values in the weight's own dtype; panel `p` row `t` holds
    /// `W[p*NR .. p*NR+NR, t]`, zero-padded.
    panels: Weight,
}

/// Packs a row-major `[n, k]` weight in place (each panel is a contiguous run of `NR` rows already).
fn pack<T: Copy + Default + Send + Sync>(mut values: Vec<T>, n: usize, k: usize) -> Vec<T> {
    debug_assert_eq!(values.len(), n * k);
    values.resize(n.div_ceil(NR) * NR * k, T::default());
    values.par_chunks_mut(NR * k).for_each(|panel| {
        let rows = panel.to_vec();
        for (j, row) in rows.chunks_exact(k).enumerate() {
            for (t, &v) in row.iter().enumerate() {
                panel[t * NR + j] = v;
            }
        }
    });
    values
}

impl Linear {
    /// An f32 projection from a row-major `[n, k]` weight.
    pub fn new(values: Vec<f32>, n: usize, k: usize) -> Self {
        Self::from_weight(Weight::F32(values), n, k)
    }

    /// A projection holding a row-major `[n, k]` weight in its own dtype.
    pub fn from_weight(w: Weight, n: usize, k: usize) -> Self {
        let panels = match w {
            Weight::F32(v) => Weight::F32(pack(v, n, k)),
            Weight::Bf16(v) => Weight::Bf16(pack(v, n, k)),
            Weight::F16(v) => Weight::F16(pack(v, n, k)),
        };
        Self { n, k, panels }
    }

    /// Bytes the packed weight occupies.
    pub fn bytes(&self) -> usize {
        let width = if let Weight::F32(_) = self.panels {
            4
        } else {
            2
        };
        width * self.panels.len()
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
        Ok(self.matmul(x, m, self.k))
    }

    fn matmul(&self, x: &[f32], m: usize, ldx: usize) -> Vec<f32> {
        let panels = match &self.panels {
            Weight::F32(p) => PanelRef::F32(p),
            Weight::Bf16(p) => PanelRef::Bf16(p),
            Weight::F16(p) => PanelRef::F16(p),
        };
        matmul_packed(x, m, ldx, panels, self.n, self.k)
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
        Ok(self.matmul(x, m, ldx))
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

/// Packed panels of one dtype, borrowed.
#[derive(Clone, Copy)]
enum PanelRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl<'a> PanelRef<'a> {
    /// Panel `p` (`k * NR` values).
    fn panel(self, p: usize, k: usize) -> PanelRef<'a> {
        let r = p * k * NR..(p + 1) * k * NR;
        match self {
            PanelRef::F32(v) => PanelRef::F32(&v[r]),
            PanelRef::Bf16(v) => PanelRef::Bf16(&v[r]),
            PanelRef::F16(v) => PanelRef::F16(&v[r]),
        }
    }

    fn len(self) -> usize {
        match self {
            PanelRef::F32(v) => v.len(),
            PanelRef::Bf16(v) | PanelRef::F16(v) => v.len(),
        }
    }
}

/// `x [m, k] . W^T -> [m, n]` with `W` packed by [`Linear`]; row `i` of `x` starts at `i * ldx`.
fn matmul_packed(
    x: &[f32],
    m: usize,
    ldx: usize,
    panels: PanelRef<'_>,
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
            let panel = panels.panel(p, k);
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
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// The kernel's name, for manifests and benchmarks.
    fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => "avx512",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// `tile[i][j] = sum_t x[i][t] * panel[t][j]` for the `rows` (<= MR) rows of `x`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        self,
        x: &[f32],
        rows: usize,
        k: usize,
        ldx: usize,
        panel: PanelRef<'_>,
        tile: &mut [[f32; NR]; MR],
    ) {
        assert!(
            (1..=MR).contains(&rows) && x.len() == (rows - 1) * ldx + k && panel.len() == k * NR
        );
        #[cfg(target_arch = "x86_64")]
        {
            use x86::{F16, F32};
            // SAFETY: the features were detected at run time; the slices' lengths are checked above.
            unsafe {
                match (self, panel) {
                    (Kernel::Avx512, PanelRef::F32(p)) => {
                        return x86::tile_avx512::<F32>(x, rows, k, ldx, p.as_ptr().cast(), tile)
                    }
                    (Kernel::Avx512, PanelRef::Bf16(p)) => {
                        return x86::tile_avx512::<BF16>(x, rows, k, ldx, p.as_ptr().cast(), tile)
                    }
                    (Kernel::Avx512, PanelRef::F16(p)) => {
                        return x86::tile_avx512::<F16>(x, rows, k, ldx, p.as_ptr().cast(), tile)
                    }
                    (Kernel::Avx2, PanelRef::F32(p)) => {
                        return x86::tile_avx2::<F32>(x, rows, k, ldx, p.as_ptr().cast(), tile)
                    }
                    (Kernel::Avx2, PanelRef::Bf16(p)) => {
                        return x86::tile_avx2::<BF16>(x, rows, k, ldx, p.as_ptr().cast(), tile)
                    }
                    (Kernel::Avx2, PanelRef::F16(p)) => {
                        return x86::tile_avx2::<F16>(x, rows, k, ldx, p.as_ptr().cast(), tile)
                    }
                    (Kernel::Portable, _) => {}
                }
            }
        }
        match panel {
            PanelRef::F32(p) => portable(x, rows, k, ldx, tile, |t| p[t]),
            PanelRef::Bf16(p) => portable(x, rows, k, ldx, tile, |t| bf16_to_f32(p[t])),
            PanelRef::F16(p) => portable(x, rows, k, ldx, tile, |t| f16_to_f32(p[t])),
        }
    }
}

/// The portable kernel: one fused multiply-add chain over `k` per element, `b(i)` giving panel
/// value `i` as f32.
fn portable(
    x: &[f32],
    rows: usize,
    k: usize,
    ldx: usize,
    tile: &mut [[f32; NR]; MR],
    b: impl Fn(usize) -> f32,
) {
    for (i, out) in tile.iter_mut().enumerate().take(rows) {
        let xr = &x[i * ldx..i * ldx + k];
        for (t, &a) in xr.iter().enumerate() {
            for (j, o) in out.iter_mut().enumerate() {
                *o = a.mul_add(b(t * NR + j), *o);
            }
        }
    }
}

/// Panel dtypes the x86 kernels read (`BF16` is outside `x86` so the portable path names it too).
#[cfg(target_arch = "x86_64")]
const BF16: u8 = x86::BF16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// The panel dtype a kernel is compiled for (a const parameter, so each is its own loop).
    pub(super) const F32: u8 = 0;
    pub(super) const BF16: u8 = 1;
    pub(super) const F16: u8 = 2;

    /// 16 panel values at element `i` of `b` as f32 (bf16: the bits shifted up; f16: vcvtph2ps).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const D: u8>(b: *const u8, i: usize) -> __m512 {
        match D {
            F32 => _mm512_loadu_ps(b.cast::<f32>().add(i)),
            BF16 => {
                let h = _mm256_loadu_si256(b.cast::<u16>().add(i).cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            _ => _mm512_cvtph_ps(_mm256_loadu_si256(b.cast::<u16>().add(i).cast())),
        }
    }

    /// 8 panel values at element `i` of `b` as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const D: u8>(b: *const u8, i: usize) -> __m256 {
        match D {
            F32 => _mm256_loadu_ps(b.cast::<f32>().add(i)),
            BF16 => {
                let h = _mm_loadu_si128(b.cast::<u16>().add(i).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            _ => _mm256_cvtph_ps(_mm_loadu_si128(b.cast::<u16>().add(i).cast())),
        }
    }

    /// Bytes per panel value.
    const fn width<const D: u8>() -> usize {
        if D == F32 {
            4
        } else {
            2
        }
    }

    /// Up to 6 rows x 64 columns in zmm accumulators, specialised per row count so small batches (decoding)
    /// do no wasted work.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512<const D: u8>(
        x: &[f32],
        rows: usize,
        k: usize,
        ldx: usize,
        panel: *const u8,
        tile: &mut [[f32; NR]; MR],
    ) {
        match rows {
            1 => rows_avx512::<1, D>(x, k, ldx, panel, tile),
            2 => rows_avx512::<2, D>(x, k, ldx, panel, tile),
            3 => rows_avx512::<3, D>(x, k, ldx, panel, tile),
            4 => rows_avx512::<4, D>(x, k, ldx, panel, tile),
            5 => rows_avx512::<5, D>(x, k, ldx, panel, tile),
            _ => rows_avx512::<6, D>(x, k, ldx, panel, tile),
        }
    }

    /// Panel rows ahead of the current one to prefetch: the hardware prefetcher stops at page
    /// boundaries.
    const PREFETCH_ROWS: usize = 16;

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn rows_avx512<const R: usize, const D: u8>(
        x: &[f32],
        k: usize,
        ldx: usize,
        b: *const u8,
        tile: &mut [[f32; NR]; MR],
    ) {
        let mut xp = [x.as_ptr(); R];
        for (i, p) in xp.iter_mut().enumerate() {
            *p = x.as_ptr().add(i * ldx);
        }
        let row_bytes = NR * width::<D>();
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for t in 0..k {
            // One 64-byte line per prefetch: four for an f32 row, two for a 16-bit one.
            let ahead = b.wrapping_add((t + PREFETCH_ROWS) * row_bytes);
            for l in 0..row_bytes / 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
            }
            let bv = [
                load16::<D>(b, t * NR),
                load16::<D>(b, t * NR + 16),
                load16::<D>(b, t * NR + 32),
                load16::<D>(b, t * NR + 48),
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
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn tile_avx2<const D: u8>(
        x: &[f32],
        rows: usize,
        k: usize,
        ldx: usize,
        panel: *const u8,
        tile: &mut [[f32; NR]; MR],
    ) {
        let mut r0 = 0;
        while r0 < rows {
            for half in 0..NR / 32 {
                let b = panel.add(32 * half * width::<D>());
                let xp: [*const f32; 4] =
                    [0, 1, 2, 3].map(|i: usize| x.as_ptr().add((r0 + i).min(rows - 1) * ldx));
                let mut acc = [[_mm256_setzero_ps(); 4]; 4];
                for t in 0..k {
                    let bv = [
                        load8::<D>(b, t * NR),
                        load8::<D>(b, t * NR + 8),
                        load8::<D>(b, t * NR + 16),
                        load8::<D>(b, t * NR + 24),
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
                && std::arch::is_x86_feature_detected!("f16c")
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
            let lin = Linear::new(w.clone(), n, k);
            let y = lin.forward_rows(&x, m).unwrap();
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
                let alone = lin.forward_rows(&x[i * k..(i + 1) * k], 1).unwrap();
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
                kern.tile(&x, m, k, k, PanelRef::F32(&panel), &mut tile);
                tile
            })
            .collect();
        for r in &results[1..] {
            assert_eq!(r, &results[0]);
        }
    }

    /// A weight held as bf16 or f16 gives bit for bit what the same values upcast to f32 give, with
    /// every kernel, for batch sizes that take each row-count specialisation.
    #[test]
    fn half_precision_weights_equal_their_f32_upcast_exactly() {
        let (n, k) = (70, 45);
        let w = data(n * k, 5);
        let bf: Vec<u16> = w
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let hf: Vec<u16> = w
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        for weight in [Weight::Bf16(bf), Weight::F16(hf)] {
            let upcast = Linear::new(weight.to_f32(), n, k);
            let resident = Linear::from_weight(weight.clone(), n, k);
            assert_eq!(resident.bytes() * 2, upcast.bytes());
            for m in [1, 2, 3, 4, 5, 6, 7, 13] {
                let x = data(m * k, 6);
                let want = upcast.forward_rows(&x, m).unwrap();
                assert_eq!(
                    resident.forward_rows(&x, m).unwrap(),
                    want,
                    "{} m={m}",
                    weight.dtype()
                );
                for kern in kernels() {
                    let (mut a, mut b) = ([[0f32; NR]; MR], [[0f32; NR]; MR]);
                    let rows = m.min(MR);
                    let p32 = match &upcast.panels {
                        Weight::F32(p) => p[..k * NR].to_vec(),
                        _ => unreachable!(),
                    };
                    kern.tile(
                        &x[..(rows - 1) * k + k],
                        rows,
                        k,
                        k,
                        PanelRef::F32(&p32),
                        &mut a,
                    );
                    let half = match &resident.panels {
                        Weight::Bf16(p) => PanelRef::Bf16(&p[..k * NR]),
                        Weight::F16(p) => PanelRef::F16(&p[..k * NR]),
                        Weight::F32(_) => unreachable!(),
                    };
                    kern.tile(&x[..(rows - 1) * k + k], rows, k, k, half, &mut b);
                    assert_eq!(
                        a,
                        b,
                        "{} kernel {} rows {rows}",
                        weight.dtype(),
                        kern.name()
                    );
                }
            }
        }
    }
}
