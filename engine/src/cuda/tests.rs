//! Each kernel against a CPU reference on small random inputs. They need a GPU, so they are ignored by
//! default; `scripts/device-check.sh` runs them (`cargo test -p engine --lib cuda -- --include-ignored`).

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use routers::{ExpertMask, Routing};

use super::{bf16_bits, cfg1, device_err, Gpu};
use crate::Result;

fn gpu() -> Gpu {
    Gpu::open(0).expect("a CUDA GPU")
}

/// Random values that bf16 holds exactly, so inputs are the same on both sides.
fn rand_bf16(rng: &mut ChaCha8Rng, n: usize) -> (Vec<f32>, Vec<u16>) {
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let bits = bf16_bits(&v);
    let exact = bits
        .iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect();
    (exact, bits)
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    println!("KERNEL {what}: max diff {d:.2e}");
    assert!(d <= tol, "{what}: max diff {d}");
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn gemm_matches_naive() -> Result<()> {
    let g = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (m, n, k) = (5, 7, 24);
    let (x, xb) = rand_bf16(&mut rng, m * k);
    let (w, wb) = rand_bf16(&mut rng, n * k);
    let y0: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
    let (dx, dw, dy) = (g.upload(&xb)?, g.upload(&wb)?, g.upload(&y0)?);
    g.gemm(g.ptr(&dx), g.ptr(&dw), g.ptr(&dy), m, n, k, 1.0)?;
    let got = g.download(&dy)?;
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            y0[i] + (0..k).map(|j| x[r * k + j] * w[c * k + j]).sum::<f32>()
        })
        .collect();
    close(&got, &want, 1e-4, "gemm");
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn grouped_matmul_matches_naive() -> Result<()> {
    let g = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n_out, k) = (5usize, 16usize);
    let counts = [2usize, 0, 11, 1, 5];
    let offsets: Vec<i32> = std::iter::once(0)
        .chain(counts.iter().scan(0, |a, &c| {
            *a += c as i32;
            Some(*a)
        }))
        .collect();
    let rows = offsets[5] as usize;
    let (x, xb) = rand_bf16(&mut rng, 20 * k);
    let row_map: Vec<i32> = (0..rows).map(|r| ((r * 7) % 20) as i32).collect();
    let mut weights = Vec::new();
    let mut slabs = Vec::new();
    for _ in 0..5 {
        let (w, wb) = rand_bf16(&mut rng, n_out * k);
        slabs.push(g.upload(&wb)?);
        weights.push(w);
    }
    let table: Vec<u64> = slabs.iter().map(|s| g.ptr(s)).collect();
    // Rows per expert 2, 0, 11, 1, 5 take every row-count path (1, 2, 4, 8 and a remainder); the
    // fifth block row has no expert and must do nothing.
    let active = vec![4i32, 0, 2, 3, 4];
    let (dx, dmap, dt, doff, dact) = (
        g.upload(&xb)?,
        g.upload(&row_map)?,
        g.upload(&table)?,
        g.upload(&offsets)?,
        g.upload(&active)?,
    );
    let out = g.alloc::<f32>(rows * n_out)?;
    let (px, pm, pt, po, pa, pout) = (
        g.ptr(&dx),
        g.ptr(&dmap),
        g.ptr(&dt),
        g.ptr(&doff),
        g.ptr(&dact),
        g.ptr(&out),
    );
    let (ni, ki) = (n_out as i32, k as i32);
    let cfg = LaunchConfig {
        grid_dim: (n_out.div_ceil(8) as u32, 5, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (write, add) = (0i32, 1i32);
    launch!(&g, "grouped_matmul", cfg; px, pm, pt, po, pa, pout, ni, ki, write)?;
    let got = g.download(&out)?;
    let mut want = vec![0f32; rows * n_out];
    for e in 0..5 {
        for r in offsets[e] as usize..offsets[e + 1] as usize {
            let src = row_map[r] as usize;
            for c in 0..n_out {
                want[r * n_out + c] = (0..k).map(|j| x[src * k + j] * weights[e][c * k + j]).sum();
            }
        }
    }
    close(&got, &want, 1e-4, "grouped_matmul");
    // Accumulating adds the same products again.
    launch!(&g, "grouped_matmul", cfg; px, pm, pt, po, pa, pout, ni, ki, add)?;
    let twice: Vec<f32> = want.iter().map(|w| 2.0 * w).collect();
    close(
        &g.download(&out)?,
        &twice,
        2e-4,
        "grouped_matmul accumulate",
    );
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn grouped_mma_matches_naive() -> Result<()> {
    let g = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // N not a multiple of the 128-column tile, K not of the 64-deep stage; 1, 0, 64 and 70 rows.
    let (n_out, k) = (200usize, 48usize);
    let counts = [1usize, 0, 64, 70];
    let mut offsets = vec![0i32];
    for c in counts {
        offsets.push(offsets.last().unwrap() + c as i32);
    }
    let rows = *offsets.last().unwrap() as usize;
    let (x, xb) = rand_bf16(&mut rng, 150 * k);
    let row_map: Vec<i32> = (0..rows).map(|r| ((r * 11) % 150) as i32).collect();
    let mut weights = Vec::new();
    let mut slabs = Vec::new();
    for _ in 0..counts.len() {
        let (w, wb) = rand_bf16(&mut rng, n_out * k);
        slabs.push(g.upload(&wb)?);
        weights.push(w);
    }
    let table: Vec<u64> = slabs.iter().map(|s| g.ptr(s)).collect();
    let mut tiles = Vec::new();
    for (e, w) in offsets.windows(2).enumerate() {
        for r in (w[0]..w[1]).step_by(64) {
            tiles.extend([e as i32, r]);
        }
    }
    let (dx, dm, dt, doff, dtl) = (
        g.upload(&xb)?,
        g.upload(&row_map)?,
        g.upload(&table)?,
        g.upload(&offsets)?,
        g.upload(&tiles)?,
    );
    let out = g.alloc::<f32>(rows * n_out)?;
    let (px, pm, pt, po, ptl, pout) = (
        g.ptr(&dx),
        g.ptr(&dm),
        g.ptr(&dt),
        g.ptr(&doff),
        g.ptr(&dtl),
        g.ptr(&out),
    );
    let (ni, ki) = (n_out as i32, k as i32);
    let cfg = LaunchConfig {
        grid_dim: (n_out.div_ceil(128) as u32, (tiles.len() / 2) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(&g, "grouped_mma", cfg; px, pm, pt, po, ptl, pout, ni, ki)?;
    let got = g.download(&out)?;
    let mut want = vec![0f32; rows * n_out];
    for e in 0..counts.len() {
        for r in offsets[e] as usize..offsets[e + 1] as usize {
            let src = row_map[r] as usize;
            for c in 0..n_out {
                want[r * n_out + c] = (0..k).map(|j| x[src * k + j] * weights[e][c * k + j]).sum();
            }
        }
    }
    close(&got, &want, 1e-4, "grouped_mma");
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn router_topk_matches_cpu_routing() -> Result<()> {
    let g = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, e, k) = (40usize, 6usize, 2usize);
    let logits: Vec<f32> = (0..n * e).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let bias: Vec<f32> = (0..e).map(|i| if i == 1 { -0.5 } else { 0.0 }).collect();
    let masks: Vec<ExpertMask> = (0..n)
        .map(|t| {
            ExpertMask::all(e)
                .without(&[t % e, (t * 3 + 1) % e])
                .unwrap()
        })
        .collect();
    let mask_bytes: Vec<u8> = masks
        .iter()
        .flat_map(|m| (0..e).map(move |x| m.is_allowed(x) as u8))
        .collect();
    for norm in [false, true] {
        let (dl, db, dm) = (g.upload(&logits)?, g.upload(&bias)?, g.upload(&mask_bytes)?);
        let (idx, w) = (g.alloc::<i32>(n * k)?, g.alloc::<f32>(n * k)?);
        let (pl, pb, pm, pi, pw) = (g.ptr(&dl), g.ptr(&db), g.ptr(&dm), g.ptr(&idx), g.ptr(&w));
        let (ni, ei, ki, normi) = (n as i32, e as i32, k as i32, norm as i32);
        launch!(&g, "router_topk", cfg1(n.div_ceil(4), 128); pl, pb, pm, pi, pw, ni, ei, ki, normi)?;
        let (gi, gw) = (g.download(&idx)?, g.download(&w)?);
        let routing = Routing {
            top_k: k,
            norm_topk_prob: norm,
        };
        for t in 0..n {
            let row: Vec<f32> = (0..e).map(|x| logits[t * e + x] + bias[x]).collect();
            let want = routing.route(&row, &masks[t]);
            for (j, (we, ww)) in want.iter().enumerate() {
                assert_eq!(
                    gi[t * k + j],
                    *we as i32,
                    "token {t} slot {j} (norm {norm})"
                );
                assert!(
                    (gw[t * k + j] - ww).abs() < 1e-5,
                    "token {t} slot {j} weight"
                );
            }
        }
    }
    Ok(())
}

/// What `moe_permute` produced, downloaded.
struct Permuted {
    offsets: Vec<i32>,
    active: Vec<i32>,
    sorted: Vec<i32>,
    entry_rows: Vec<i32>,
    routed: Vec<u64>,
}

/// Runs `moe_permute` on top-k expert indices (`k` per token, `e` experts).
fn permute(g: &Gpu, idx: &[i32], k: usize, e: usize) -> Result<Permuted> {
    let nk = idx.len();
    let di = g.upload(idx)?;
    let (off, active) = (g.alloc::<i32>(e + 1)?, g.alloc::<i32>(e + 1)?);
    let (sorted, entry) = (g.alloc::<i32>(nk)?, g.alloc::<i32>(nk)?);
    let routed = g.alloc::<u64>(e)?;
    let (pi, po, pa, ps, pe, pr) = (
        g.ptr(&di),
        g.ptr(&off),
        g.ptr(&active),
        g.ptr(&sorted),
        g.ptr(&entry),
        g.ptr(&routed),
    );
    let (nki, ki, ei) = (nk as i32, k as i32, e as i32);
    launch!(g, "moe_permute", cfg1(1, 1024); pi, nki, ki, ei, po, pa, ps, pe, pr)?;
    Ok(Permuted {
        offsets: g.download(&off)?,
        active: g.download(&active)?,
        sorted: g.download(&sorted)?,
        entry_rows: g.download(&entry)?,
        routed: g.download(&routed)?,
    })
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn moe_permute_sorts_stably_and_combine_weights() -> Result<()> {
    let g = gpu();
    let (n, k, e, h) = (6usize, 2usize, 4usize, 3usize);
    // Token 5's second slot has no expert (fewer allowed experts than k).
    let idx: Vec<i32> = vec![2, 0, 1, 2, 0, 3, 2, 1, 3, 0, 1, -1];
    let w: Vec<f32> = (0..n * k).map(|i| 0.1 * (i + 1) as f32).collect();
    let dw = g.upload(&w)?;
    let p = permute(&g, &idx, k, e)?;
    assert_eq!(p.offsets, vec![0, 3, 6, 9, 11]);
    assert_eq!(p.active, vec![4, 0, 1, 2, 3]);
    assert_eq!(p.sorted[..11], [0, 2, 4, 1, 3, 5, 0, 1, 3, 2, 4]);
    assert_eq!(p.routed, vec![3, 3, 3, 2]);
    let entry_rows = p.entry_rows.clone();
    assert_eq!(entry_rows[11], -1);
    let (di, de) = (g.upload(&idx)?, g.upload(&entry_rows)?);
    let (pi, pe, ki) = (g.ptr(&di), g.ptr(&de), k as i32);
    // Expert outputs: row r is [r, r, r]; each token's output is the weighted sum of its rows.
    let eo: Vec<f32> = (0..n * k).flat_map(|r| [r as f32; 3]).collect();
    let deo = g.upload(&eo)?;
    let out = g.alloc::<f32>(n * h)?;
    let (pout, peo, pw, hi, acc) = (g.ptr(&out), g.ptr(&deo), g.ptr(&dw), h as i32, 0i32);
    launch!(&g, "moe_combine", cfg1(n, 32); pout, peo, pi, pw, pe, ki, hi, acc)?;
    let got = g.download(&out)?;
    for t in 0..n {
        let want: f32 = (0..k)
            .filter(|&j| idx[t * k + j] >= 0)
            .map(|j| w[t * k + j] * entry_rows[t * k + j] as f32)
            .sum();
        assert!(
            (got[t * h] - want).abs() < 1e-5,
            "token {t}: {} vs {want}",
            got[t * h]
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn moe_permute_matches_a_stable_sort_at_scale() -> Result<()> {
    let g = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    // A prefill's worth of entries (several 1024-entry chunks), 64 experts, some slots empty.
    let (n, k, e) = (700usize, 8usize, 64usize);
    let idx: Vec<i32> = (0..n * k)
        .map(|_| {
            if rng.random_range(0..50) == 0 {
                -1
            } else {
                rng.random_range(0..e as i32)
            }
        })
        .collect();
    let p = permute(&g, &idx, k, e)?;
    // The reference: entries sorted by (expert, entry index).
    let mut order: Vec<usize> = (0..n * k).filter(|&i| idx[i] >= 0).collect();
    order.sort_by_key(|&i| (idx[i], i));
    let mut want_entry = vec![-1i32; n * k];
    for (r, &i) in order.iter().enumerate() {
        want_entry[i] = r as i32;
    }
    let want_sorted: Vec<i32> = order.iter().map(|&i| (i / k) as i32).collect();
    assert_eq!(p.sorted[..order.len()], want_sorted[..]);
    assert_eq!(p.entry_rows, want_entry);
    let (offsets, counts, act) = (p.offsets, p.routed, p.active);
    assert_eq!(offsets[e] as usize, order.len());
    let used: Vec<i32> = (0..e as i32).filter(|&x| counts[x as usize] > 0).collect();
    assert_eq!(act[0] as usize, used.len());
    assert_eq!(act[1..=used.len()], used[..]);
    for x in 0..e {
        assert_eq!(counts[x] as i32, offsets[x + 1] - offsets[x], "expert {x}");
        assert_eq!(
            counts[x] as usize,
            idx.iter().filter(|&&v| v == x as i32).count()
        );
    }
    Ok(())
}

/// Runs one attention kernel over random caches (`lens` positions each) for `toks` = (sequence,
/// position) and compares with a naive softmax attention. `tiles` selects `attention_prefill`.
fn check_attention(
    g: &Gpu,
    hd: usize,
    lens: &[usize],
    toks: &[(usize, usize)],
    tiles: Option<&[i32]>,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4 + hd as u64);
    let (heads, kv_heads, layers, layer) = (4usize, 2usize, 2usize, 1usize);
    let kvw = kv_heads * hd;
    let row = layers * 2 * kvw;
    let mut caches = Vec::new();
    let mut host = Vec::new();
    for &len in lens {
        let (vals, bits) = rand_bf16(&mut rng, len * row);
        caches.push(g.upload(&bits)?);
        host.push(vals);
    }
    let n = toks.len();
    let q: Vec<f32> = (0..n * heads * hd)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let pos: Vec<i32> = toks.iter().map(|t| t.1 as i32).collect();
    let seq: Vec<i32> = toks.iter().map(|t| t.0 as i32).collect();
    let base: Vec<u64> = caches.iter().map(|c| g.ptr(c)).collect();
    let list: Vec<i32> = match tiles {
        Some(t) => t.to_vec(),
        None => (0..n as i32).collect(),
    };
    let (dq, dp, ds, db, dl) = (
        g.upload(&q)?,
        g.upload(&pos)?,
        g.upload(&seq)?,
        g.upload(&base)?,
        g.upload(&list)?,
    );
    let out = g.alloc::<u16>(n * heads * hd)?;
    let (pq, po, pp, ps, pb, pl) = (
        g.ptr(&dq),
        g.ptr(&out),
        g.ptr(&dp),
        g.ptr(&ds),
        g.ptr(&db),
        g.ptr(&dl),
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let (li, lsi, hi, kvi, hdi) = (
        layer as i32,
        layers as i32,
        heads as i32,
        kv_heads as i32,
        hd as i32,
    );
    match tiles {
        Some(t) => {
            let cfg = LaunchConfig {
                grid_dim: ((t.len() / 2) as u32, heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(g, "attention_prefill", cfg; pq, po, pp, ps, pb, pl, li, lsi, hi, kvi, hdi, scale)?;
        }
        None => {
            launch!(g, "attention", cfg1(n * heads, super::model::ATT_THREADS); pq, po, pp, ps, pb, pl, li, lsi, hi, kvi, hdi, scale)?
        }
    }
    let got: Vec<f32> = g
        .download(&out)?
        .iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect();
    let mut want = Vec::new();
    for (t, &(s, p)) in toks.iter().enumerate() {
        for head in 0..heads {
            let kvh = head / (heads / kv_heads);
            let qv = &q[(t * heads + head) * hd..][..hd];
            let key = |j: usize| &host[s][j * row + layer * 2 * kvw + kvh * hd..][..hd];
            let val = |j: usize| &host[s][j * row + layer * 2 * kvw + kvw + kvh * hd..][..hd];
            let scores: Vec<f32> = (0..=p)
                .map(|j| qv.iter().zip(key(j)).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let ex: Vec<f32> = scores.iter().map(|s| (s - mx).exp()).collect();
            let z: f32 = ex.iter().sum();
            for d in 0..hd {
                want.push((0..=p).map(|j| ex[j] / z * val(j)[d]).sum::<f32>());
            }
        }
    }
    // The output is bf16: half an ulp of bf16 at |x| <= 1.
    let what = format!(
        "{} hd={hd}",
        if tiles.is_some() {
            "attention_prefill"
        } else {
            "attention"
        }
    );
    close(&got, &want, 8e-3, &what);
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn attention_matches_naive() -> Result<()> {
    let g = gpu();
    for hd in [16usize, 40, 128] {
        // Three caches of 7, 3 and 100 positions; several chunks of keys per warp for the long one.
        let toks = [(0, 5), (0, 6), (1, 2), (2, 99), (2, 37)];
        check_attention(&g, hd, &[7, 3, 100], &toks, None)?;
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn attention_prefill_matches_naive() -> Result<()> {
    let g = gpu();
    for hd in [16usize, 64, 128] {
        // Sequence 0: 45 new tokens at positions 20..65 after 20 cached; sequence 1: 40 from position 0.
        let mut toks: Vec<(usize, usize)> = (20..65).map(|p| (0, p)).collect();
        toks.extend((0..40).map(|p| (1, p)));
        let tiles = [0, 32, 32, 13, 45, 32, 77, 8];
        check_attention(&g, hd, &[65, 40], &toks, Some(&tiles))?;
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn gemm_throughput_probe() -> Result<()> {
    // Not a check: prints what cuBLAS reaches on a prefill-sized projection, f32 vs bf16 output.
    let g = gpu();
    let (m, n, k) = (4096usize, 6144usize, 2048usize);
    let x = g.alloc::<u16>(m * k)?;
    let w = g.alloc::<u16>(n * k)?;
    let y = g.alloc::<f32>(m * n)?;
    let (px, pw, py) = (g.ptr(&x), g.ptr(&w), g.ptr(&y));
    for out_bf16 in [false, true] {
        let run = || -> Result<()> {
            let (alpha, beta) = (1.0f32, 0.0f32);
            let ty = if out_bf16 {
                cudarc::cublas::sys::cudaDataType::CUDA_R_16BF
            } else {
                cudarc::cublas::sys::cudaDataType::CUDA_R_32F
            };
            // SAFETY: buffers sized above.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *g.blas.handle(),
                    cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
                    cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    pw as *const _,
                    cudarc::cublas::sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    px as *const _,
                    cudarc::cublas::sys::cudaDataType::CUDA_R_16BF,
                    k as i32,
                    &beta as *const f32 as *const _,
                    py as *mut _,
                    ty,
                    n as i32,
                    cudarc::cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cudarc::cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| device_err("probe", e))
        };
        run()?;
        g.stream.synchronize().map_err(|e| device_err("probe", e))?;
        let t = std::time::Instant::now();
        for _ in 0..20 {
            run()?;
        }
        g.stream.synchronize().map_err(|e| device_err("probe", e))?;
        let secs = t.elapsed().as_secs_f64() / 20.0;
        println!(
            "PROBE gemm {m}x{n}x{k} bf16 in, {} out: {:.3} ms, {:.0} TFLOP/s",
            if out_bf16 { "bf16" } else { "f32" },
            secs * 1e3,
            2.0 * (m * n * k) as f64 / secs / 1e12
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn logprob_gather_and_argmax_match_cpu() -> Result<()> {
    let g = gpu();
    let v = 3000usize;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut logits: Vec<f32> = (0..3 * v).map(|_| rng.random_range(-5.0f32..5.0)).collect();
    // Row 1 has two equal maxima: argmax is the first.
    logits[v + 10] = 9.0;
    logits[v + 2000] = 9.0;
    let targets = vec![7i32, 2000, 42];
    let (dl, dt) = (g.upload(&logits)?, g.upload(&targets)?);
    let (lp, gr, am) = (g.alloc::<f32>(3)?, g.alloc::<i32>(3)?, g.alloc::<i32>(3)?);
    let (pl, pt, plp, pg, pa, vi) = (
        g.ptr(&dl),
        g.ptr(&dt),
        g.ptr(&lp),
        g.ptr(&gr),
        g.ptr(&am),
        v as i32,
    );
    launch!(&g, "logprob_gather", cfg1(3, 1024); pl, pt, plp, pg, vi)?;
    launch!(&g, "argmax_rows", cfg1(3, 1024); pl, pa, vi)?;
    let (lp, gr, am) = (g.download(&lp)?, g.download(&gr)?, g.download(&am)?);
    for r in 0..3 {
        let row = &logits[r * v..(r + 1) * v];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let first = row.iter().position(|&x| x == mx).unwrap();
        let z: f64 = row.iter().map(|&x| ((x - mx) as f64).exp()).sum();
        let want = (row[targets[r] as usize] - mx) as f64 - z.ln();
        assert!(
            (lp[r] as f64 - want).abs() < 1e-4,
            "row {r}: {} vs {want}",
            lp[r]
        );
        assert_eq!(am[r] as usize, first, "row {r} argmax");
        assert_eq!(
            gr[r] != 0,
            targets[r] as usize == first,
            "row {r} greedy flag"
        );
    }
    Ok(())
}
