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
    let counts = [2usize, 0, 11];
    let offsets: Vec<i32> = std::iter::once(0)
        .chain(counts.iter().scan(0, |a, &c| {
            *a += c as i32;
            Some(*a)
        }))
        .collect();
    let rows = offsets[3] as usize;
    let (x, xb) = rand_bf16(&mut rng, 20 * k);
    let row_map: Vec<i32> = (0..rows).map(|r| ((r * 7) % 20) as i32).collect();
    let mut weights = Vec::new();
    let mut slabs = Vec::new();
    for _ in 0..3 {
        let (w, wb) = rand_bf16(&mut rng, n_out * k);
        slabs.push(g.upload(&wb)?);
        weights.push(w);
    }
    let table: Vec<u64> = slabs.iter().map(|s| g.ptr(s)).collect();
    let (dx, dmap, dt, doff) = (
        g.upload(&xb)?,
        g.upload(&row_map)?,
        g.upload(&table)?,
        g.upload(&offsets)?,
    );
    let out = g.alloc::<f32>(rows * n_out)?;
    let (px, pm, pt, po, pout) = (
        g.ptr(&dx),
        g.ptr(&dmap),
        g.ptr(&dt),
        g.ptr(&doff),
        g.ptr(&out),
    );
    let (ni, ki) = (n_out as i32, k as i32);
    let cfg = LaunchConfig {
        grid_dim: (n_out.div_ceil(8) as u32, 3, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    launch!(&g, "grouped_matmul", cfg; px, pm, pt, po, pout, ni, ki)?;
    let got = g.download(&out)?;
    let mut want = vec![0f32; rows * n_out];
    for e in 0..3 {
        for r in offsets[e] as usize..offsets[e + 1] as usize {
            let src = row_map[r] as usize;
            for c in 0..n_out {
                want[r * n_out + c] = (0..k).map(|j| x[src * k + j] * weights[e][c * k + j]).sum();
            }
        }
    }
    close(&got, &want, 1e-4, "grouped_matmul");
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
        launch!(&g, "router_topk", cfg1(1, 64); pl, pb, pm, pi, pw, ni, ei, ki, normi)?;
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

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn moe_permute_sorts_stably_and_combine_weights() -> Result<()> {
    let g = gpu();
    let (n, k, e, h) = (6usize, 2usize, 4usize, 3usize);
    // Token 5's second slot has no expert (fewer allowed experts than k).
    let idx: Vec<i32> = vec![2, 0, 1, 2, 0, 3, 2, 1, 3, 0, 1, -1];
    let w: Vec<f32> = (0..n * k).map(|i| 0.1 * (i + 1) as f32).collect();
    let (di, dw) = (g.upload(&idx)?, g.upload(&w)?);
    let (off, sorted, entry) = (
        g.alloc::<i32>(e + 1)?,
        g.alloc::<i32>(n * k)?,
        g.alloc::<i32>(n * k)?,
    );
    let routed = g.alloc::<u64>(e)?;
    let (pi, po, ps, pe, pr) = (
        g.ptr(&di),
        g.ptr(&off),
        g.ptr(&sorted),
        g.ptr(&entry),
        g.ptr(&routed),
    );
    let (nki, ki, ei) = ((n * k) as i32, k as i32, e as i32);
    launch!(&g, "moe_permute", cfg1(1, 1024); pi, nki, ki, ei, po, ps, pe, pr)?;
    assert_eq!(g.download(&off)?, vec![0, 3, 6, 9, 11]);
    assert_eq!(
        g.download(&sorted)?[..11],
        [0, 2, 4, 1, 3, 5, 0, 1, 3, 2, 4]
    );
    assert_eq!(g.download(&routed)?, vec![3, 3, 3, 2]);
    let entry_rows = g.download(&entry)?;
    assert_eq!(entry_rows[11], -1);
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
    let di = g.upload(&idx)?;
    let (off, sorted, entry) = (
        g.alloc::<i32>(e + 1)?,
        g.alloc::<i32>(n * k)?,
        g.alloc::<i32>(n * k)?,
    );
    let routed = g.alloc::<u64>(e)?;
    let (pi, po, ps, pe, pr) = (
        g.ptr(&di),
        g.ptr(&off),
        g.ptr(&sorted),
        g.ptr(&entry),
        g.ptr(&routed),
    );
    let (nki, ki, ei) = ((n * k) as i32, k as i32, e as i32);
    launch!(&g, "moe_permute", cfg1(1, 1024); pi, nki, ki, ei, po, ps, pe, pr)?;
    // The reference: entries sorted by (expert, entry index).
    let mut order: Vec<usize> = (0..n * k).filter(|&i| idx[i] >= 0).collect();
    order.sort_by_key(|&i| (idx[i], i));
    let mut want_entry = vec![-1i32; n * k];
    for (r, &i) in order.iter().enumerate() {
        want_entry[i] = r as i32;
    }
    let want_sorted: Vec<i32> = order.iter().map(|&i| (i / k) as i32).collect();
    assert_eq!(g.download(&sorted)?[..order.len()], want_sorted[..]);
    assert_eq!(g.download(&entry)?, want_entry);
    let offsets = g.download(&off)?;
    assert_eq!(offsets[e] as usize, order.len());
    let counts = g.download(&routed)?;
    for x in 0..e {
        assert_eq!(counts[x] as i32, offsets[x + 1] - offsets[x], "expert {x}");
        assert_eq!(
            counts[x] as usize,
            idx.iter().filter(|&&v| v == x as i32).count()
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn attention_matches_naive() -> Result<()> {
    let g = gpu();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for hd in [16usize, 40, 128] {
        let (heads, kv_heads, layers, layer) = (4usize, 2usize, 2usize, 1usize);
        let kvw = kv_heads * hd;
        let row = layers * 2 * kvw;
        // Two sequences with 7 and 3 cached positions; the new tokens are each sequence's last ones.
        let lens = [7usize, 3];
        let mut caches = Vec::new();
        let mut host = Vec::new();
        for &len in &lens {
            let (vals, bits) = rand_bf16(&mut rng, len * row);
            caches.push(g.upload(&bits)?);
            host.push(vals);
        }
        let toks: Vec<(usize, usize)> = vec![(0, 5), (0, 6), (1, 2)];
        let n = toks.len();
        let q: Vec<f32> = (0..n * heads * hd)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let pos: Vec<i32> = toks.iter().map(|t| t.1 as i32).collect();
        let seq: Vec<i32> = toks.iter().map(|t| t.0 as i32).collect();
        let base: Vec<u64> = caches.iter().map(|c| g.ptr(c)).collect();
        let (dq, dp, ds, db) = (
            g.upload(&q)?,
            g.upload(&pos)?,
            g.upload(&seq)?,
            g.upload(&base)?,
        );
        let out = g.alloc::<u16>(n * heads * hd)?;
        let (pq, po, pp, ps, pb) = (g.ptr(&dq), g.ptr(&out), g.ptr(&dp), g.ptr(&ds), g.ptr(&db));
        let scale = 1.0 / (hd as f32).sqrt();
        let (ni, li, lsi, hi, kvi, hdi) = (
            n as i32,
            layer as i32,
            layers as i32,
            heads as i32,
            kv_heads as i32,
            hd as i32,
        );
        launch!(&g, "attention", cfg1((n * heads).div_ceil(8), 256);
            pq, po, pp, ps, pb, ni, li, lsi, hi, kvi, hdi, scale)?;
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
        close(&got, &want, 8e-3, &format!("attention hd={hd}"));
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
