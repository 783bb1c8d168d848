//! The CUDA backend against the CPU engine and the Hugging Face references. Tests that need a GPU are
//! `#[ignore]`d with the reason; `scripts/device-check.sh` runs them on a GPU machine
//! (`cargo test -p engine --test cuda -- --include-ignored`).

mod common;

use candle_core::{Device as CpuDevice, Tensor};
use common::*;
use engine::generate::{generate, GenParams};
use engine::score::{loglikelihood, ScoreOptions, ScoreRequest};
use engine::{Device, LoadOptions, Model, SeqInput};

const FIXTURES: [&str; 4] = [
    "tiny-flexolmo",
    "tiny-flexolmo-bf16-sharded",
    "tiny-olmo2",
    "tiny-olmoe",
];

fn load(name: &str, device: Device, opt_out: &[usize]) -> Model {
    let mut opts = LoadOptions::opting_out(opt_out);
    opts.device = device;
    Model::load(&fixture(name), &opts).unwrap()
}

fn gpu(name: &str) -> Model {
    load(name, Device::Cuda(0), &[])
}

/// Logits of sequences run together in one forward pass, one tensor per sequence.
fn logits_batch(model: &Model, seqs: &[(&[u32], Option<&engine::ExpertMask>)]) -> Vec<Tensor> {
    let mut caches: Vec<_> = seqs.iter().map(|_| model.new_cache()).collect();
    let mut inputs: Vec<SeqInput> = seqs
        .iter()
        .zip(caches.iter_mut())
        .map(|(s, c)| SeqInput {
            tokens: s.0,
            cache: c,
            mask: s.1,
        })
        .collect();
    let fwd = model.forward(&mut inputs, false).unwrap();
    let logits = model.logits(&fwd.hidden).unwrap();
    seqs.iter()
        .zip(&fwd.starts)
        .map(|(s, &st)| logits.narrow(0, st, s.0.len()).unwrap())
        .collect()
}

fn logits(model: &Model, tokens: &[u32]) -> Tensor {
    logits_batch(model, &[(tokens, None)]).remove(0)
}

/// bf16 tolerance: bf16 keeps 8 significant bits, and weights, GEMM inputs and the KV cache are rounded
/// to it, so logits may differ by a few percent of their scale.
fn bf16_tol(reference: &Tensor) -> f32 {
    0.03 * max_abs(reference).max(1.0)
}

fn prompt_ids(name: &str, i: usize) -> Vec<u32> {
    ids(&reference(name)[&format!("input_ids.{i}")])
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    if driver_present() {
        eprintln!(
            "a CUDA driver is present: the no-driver message is checked on machines without one"
        );
        return;
    }
    let opts = LoadOptions {
        device: Device::Cuda(0),
        ..LoadOptions::default()
    };
    let err = Model::load(&fixture("tiny-flexolmo"), &opts)
        .err()
        .expect("loading on a GPU without a driver must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("no NVIDIA driver found") && msg.contains("--device cpu"),
        "{msg}"
    );
}

/// Whether libcuda can be opened, asked of the C library so the test does not lean on cudarc.
fn driver_present() -> bool {
    extern "C" {
        fn dlopen(filename: *const std::ffi::c_char, flag: i32) -> *mut std::ffi::c_void;
    }
    ["libcuda.so", "libcuda.so.1"].iter().any(|name| {
        let c = std::ffi::CString::new(*name).unwrap();
        // SAFETY: dlopen (RTLD_LAZY) of a library name; the handle is leaked on purpose.
        unsafe { !dlopen(c.as_ptr(), 1).is_null() }
    })
}

#[test]
fn kernels_compile_with_nvrtc() {
    if !engine::cuda::nvrtc_available() {
        assert!(
            std::env::var_os("MOEVAL_REQUIRE_NVRTC").is_none(),
            "MOEVAL_REQUIRE_NVRTC is set but libnvrtc was not found: put its folder on LD_LIBRARY_PATH"
        );
        eprintln!("libnvrtc not found: kernels not compiled (CI installs it and sets MOEVAL_REQUIRE_NVRTC)");
        return;
    }
    // Ampere and Hopper.
    for (major, minor) in [(8, 0), (9, 0)] {
        let ptx = engine::cuda::compile_kernels(major, minor).unwrap();
        assert!(ptx.contains(&format!(".target sm_{major}{minor}")));
        for k in engine::cuda::KERNEL_NAMES {
            assert!(
                ptx.contains(&format!(".entry {k}(")),
                "kernel {k} missing from the PTX"
            );
        }
    }
}

#[test]
fn device_names_parse() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
    let err = "tpu".parse::<Device>().unwrap_err().to_string();
    assert!(err.contains("cpu, cuda or cuda:N"), "{err}");
}

/// Positions whose routing is a near-tie on the CPU in some layer: the k-th and (k+1)-th largest router
/// logits closer than `delta`. bf16 rounding (in transformers' bf16 models as here) may send such a token
/// to the other expert, which changes its logits far beyond rounding error, and, through attention, the
/// positions after it a little.
fn near_ties(
    cpu: &Model,
    tokens: &[u32],
    mask: Option<&engine::ExpertMask>,
    delta: f32,
) -> Vec<bool> {
    let mut near = vec![false; tokens.len()];
    if !cpu.config().is_moe() {
        return near;
    }
    let k = cpu.config().num_experts_per_tok;
    let mut cache = cpu.new_cache();
    let fwd = cpu
        .forward(
            &mut [SeqInput {
                tokens,
                cache: &mut cache,
                mask,
            }],
            true,
        )
        .unwrap();
    for layer in fwd.router_logits.unwrap() {
        for (t, row) in layer.to_vec2::<f32>().unwrap().into_iter().enumerate() {
            let mut allowed: Vec<f32> = row
                .iter()
                .enumerate()
                .filter(|(e, _)| mask.is_none_or(|m| m.is_allowed(*e)))
                .map(|(_, &x)| x)
                .collect();
            allowed.sort_by(|a, b| b.total_cmp(a));
            if allowed.len() > k && allowed[k - 1] - allowed[k] < delta {
                near[t] = true;
            }
        }
    }
    near
}

/// Compares GPU logits with a reference `[tokens, vocab]`: every position must be within bf16
/// tolerance, except positions at or after a near-tie in the CPU's routing (see [`near_ties`]).
/// Returns (max diff, max diff where no near-tie excuses it, positions excused).
fn routing_aware_diff(got: &Tensor, want: &Tensor, near: &[bool]) -> (f32, f32, usize) {
    let (g, w) = (
        got.to_vec2::<f32>().unwrap(),
        want.to_vec2::<f32>().unwrap(),
    );
    let (mut all, mut strict, mut excused) = (0f32, 0f32, 0);
    let mut tie_seen = false;
    for (t, (g, w)) in g.iter().zip(&w).enumerate() {
        tie_seen |= near[t];
        let d = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        all = all.max(d);
        if tie_seen {
            excused += 1;
        } else {
            strict = strict.max(d);
        }
    }
    (all, strict, excused)
}

/// Router-logit noise in bf16 is a few hundredths on these models; ties closer than this may flip.
const TIE: f32 = 0.15;

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_logits_match_cpu_and_reference_on_every_fixture() {
    for name in FIXTURES {
        let cpu = load(name, Device::Cpu, &[]);
        let gpu = gpu(name);
        let reference = reference(name);
        let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt_ids(name, i)).collect();
        // Each prompt alone, then all four in one batch (many rows per expert: the one-GEMM-per-expert
        // path).
        let seqs: Vec<(&[u32], Option<&engine::ExpertMask>)> =
            prompts.iter().map(|p| (p.as_slice(), None)).collect();
        let batched = logits_batch(&gpu, &seqs);
        for (i, tokens) in prompts.iter().enumerate() {
            let want = logits(&cpu, tokens);
            let hf = &reference[&format!("logits.{i}")];
            let near = near_ties(&cpu, tokens, None, TIE);
            let tol = bf16_tol(&want);
            for (what, got) in [
                ("alone", logits(&gpu, tokens)),
                ("batched", batched[i].clone()),
            ] {
                let (d, strict, excused) = routing_aware_diff(&got, &want, &near);
                let (d_hf, strict_hf, _) = routing_aware_diff(&got, hf, &near);
                println!(
                    "PARITY {name} prompt {i} {what}: {} tokens, max|gpu-cpu| {d:.5} ({strict:.5} before \
                     any routing near-tie; {excused} positions at or after one), max|gpu-hf| {d_hf:.5} \
                     ({strict_hf:.5}), tol {tol:.4}",
                    tokens.len()
                );
                assert!(
                    strict <= tol,
                    "{name} prompt {i} {what}: GPU logits differ from the CPU's by {strict}"
                );
                assert!(
                    strict_hf <= tol,
                    "{name} prompt {i} {what}: GPU logits differ from HF by {strict_hf}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_router_logits_match_cpu() {
    // The first layer's router sees no earlier routing decision, so it must match everywhere.
    for name in ["tiny-flexolmo", "tiny-olmoe"] {
        let cpu = load(name, Device::Cpu, &[]);
        let gpu = gpu(name);
        let tokens = prompt_ids(name, 1);
        let run = |m: &Model| {
            let mut cache = m.new_cache();
            m.forward(
                &mut [SeqInput {
                    tokens: &tokens,
                    cache: &mut cache,
                    mask: None,
                }],
                true,
            )
            .unwrap()
            .router_logits
            .unwrap()
        };
        let (a, b) = (run(&cpu), run(&gpu));
        assert_eq!(a.len(), b.len());
        let d = max_abs_diff(&b[0], &a[0]);
        println!("ROUTER {name} layer 0: max|gpu-cpu| {d:.5}");
        assert!(
            d <= bf16_tol(&a[0]),
            "{name} layer 0: router logits differ by {d}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_incremental_decoding_matches_one_pass() {
    let model = gpu("tiny-flexolmo");
    let tokens = prompt_ids("tiny-flexolmo", 3);
    let whole = logits(&model, &tokens);
    let (steps, cached) = logits_in_steps(&model, &tokens, &[10, 1, 2, 3, 1, 1, 5, 1000]);
    let d = max_abs_diff(&steps, &whole);
    println!("INCREMENTAL max|steps-whole| {d:.6}");
    assert!(d <= bf16_tol(&whole), "incremental logits differ by {d}");
    assert_eq!(cached, tokens.len());
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_batch_results_equal_alone() {
    let model = gpu("tiny-flexolmo");
    let (a, b, c) = (
        prompt_ids("tiny-flexolmo", 0),
        prompt_ids("tiny-flexolmo", 1),
        prompt_ids("tiny-flexolmo", 3),
    );
    let together = logits_batch(&model, &[(&a, None), (&b, None), (&c, None)]);
    for (seq, got) in [&a, &b, &c].into_iter().zip(&together) {
        let alone = logits(&model, seq);
        let d = max_abs_diff(got, &alone);
        println!("BATCH max|batched-alone| {d:.6}");
        assert!(
            d <= bf16_tol(&alone),
            "batched logits differ from alone by {d}"
        );
    }
}

/// A copy of tiny-flexolmo with expert 2 physically removed (experts renumbered, router row dropped).
fn physically_removed(expert: usize) -> tempfile::TempDir {
    let dir = copy_fixture("tiny-flexolmo");
    let path = dir.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &CpuDevice::Cpu).unwrap();
    let mut out = std::collections::HashMap::new();
    for (name, t) in tensors {
        if let Some((head, rest)) = name.split_once(".mlp.experts.") {
            let (e, tail) = rest.split_once('.').unwrap();
            let e: usize = e.parse().unwrap();
            if e == expert {
                continue;
            }
            let e = if e > expert { e - 1 } else { e };
            out.insert(format!("{head}.mlp.experts.{e}.{tail}"), t);
        } else if name.ends_with(".mlp.gate.weight") {
            let keep: Vec<u32> = (0..t.dim(0).unwrap() as u32)
                .filter(|&r| r as usize != expert)
                .collect();
            let idx = Tensor::new(keep.as_slice(), &CpuDevice::Cpu).unwrap();
            out.insert(name, t.index_select(&idx, 0).unwrap());
        } else {
            out.insert(name, t);
        }
    }
    candle_core::safetensors::save(&out, &path).unwrap();
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let e = cfg["num_experts"].as_u64().unwrap();
    cfg["num_experts"] = (e - 1).into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    dir
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_opt_out_equals_physical_removal() {
    let opted = load("tiny-flexolmo", Device::Cuda(0), &[2]);
    let removed_dir = physically_removed(2);
    let opts = LoadOptions {
        device: Device::Cuda(0),
        ..LoadOptions::default()
    };
    let removed = Model::load(removed_dir.path(), &opts).unwrap();
    let reference = reference("tiny-flexolmo");
    for i in 0..4 {
        let tokens = prompt_ids("tiny-flexolmo", i);
        let (a, b) = (logits(&opted, &tokens), logits(&removed, &tokens));
        let d = max_abs_diff(&a, &b);
        let hf = &reference[&format!("optout2.logits.{i}")];
        let cpu = load("tiny-flexolmo", Device::Cpu, &[2]);
        let near = near_ties(&cpu, &tokens, cpu.loaded_experts(), TIE);
        let (d_hf, strict_hf, excused) = routing_aware_diff(&a, hf, &near);
        println!(
            "OPTOUT prompt {i}: max|opt-out - removed| {d:.6}, max|opt-out - hf removed| {d_hf:.5} \
             ({strict_hf:.5} before any routing near-tie, {excused} positions after one)"
        );
        assert!(
            d <= 1e-3,
            "prompt {i}: opt-out differs from physical removal by {d}"
        );
        assert!(
            strict_hf <= bf16_tol(hf),
            "prompt {i}: opt-out differs from HF's removal by {strict_hf}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_never_uploads_opted_out_experts() {
    // Expert 2's weights set to NaN: with expert 2 opted out nothing of them may reach the logits.
    let dir = copy_fixture("tiny-flexolmo");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &CpuDevice::Cpu).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name.contains(".mlp.experts.2.") {
            *t = (t.ones_like().unwrap() * f64::NAN).unwrap();
        }
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let mut opts = LoadOptions::opting_out(&[2]);
    opts.device = Device::Cuda(0);
    let poisoned = Model::load(dir.path(), &opts).unwrap();
    let clean = load("tiny-flexolmo", Device::Cuda(0), &[2]);
    let tokens = prompt_ids("tiny-flexolmo", 2);
    let (a, b) = (logits(&poisoned, &tokens), logits(&clean, &tokens));
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_per_sequence_masks_equal_each_mask_alone() {
    let full = gpu("tiny-flexolmo");
    let opted = load("tiny-flexolmo", Device::Cuda(0), &[2]);
    let mask = full.loaded_experts().unwrap().without(&[2]).unwrap();
    let (a, b) = (
        prompt_ids("tiny-flexolmo", 0),
        prompt_ids("tiny-flexolmo", 1),
    );
    let out = logits_batch(&full, &[(&a, Some(&mask)), (&b, None)]);
    let d_masked = max_abs_diff(&out[0], &logits(&opted, &a));
    let d_full = max_abs_diff(&out[1], &logits(&full, &b));
    println!("MASKS masked vs opted-out model {d_masked:.6}, unmasked vs alone {d_full:.6}");
    assert!(d_masked <= 1e-3 && d_full <= 1e-3, "{d_masked} {d_full}");
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_routing_counts_match_cpu() {
    let cpu = load("tiny-olmoe", Device::Cpu, &[]);
    let gpu = gpu("tiny-olmoe");
    let tokens = prompt_ids("tiny-olmoe", 3);
    let routed = |m: &Model| {
        let mut cache = m.new_cache();
        let fwd = m
            .forward(
                &mut [SeqInput {
                    tokens: &tokens,
                    cache: &mut cache,
                    mask: None,
                }],
                false,
            )
            .unwrap();
        fwd.routed.0
    };
    let (a, b) = (routed(&cpu), routed(&gpu));
    let k = cpu.config().num_experts_per_tok as u64;
    for (l, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(b.iter().sum::<u64>(), tokens.len() as u64 * k, "layer {l}");
        let moved: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).sum();
        println!("ROUTING layer {l}: cpu {a:?} gpu {b:?}");
        // Near-ties in the router may go either way in bf16; most tokens must route identically.
        assert!(
            moved * 10 <= tokens.len() as u64 * k,
            "layer {l}: {a:?} vs {b:?}"
        );
    }
    // Each pass reads its own counts back: a second pass reports the same, not the sum.
    assert_eq!(routed(&gpu), b);
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_scores_match_logits_and_cpu() {
    for name in ["tiny-flexolmo", "tiny-olmo2"] {
        let cpu = load(name, Device::Cpu, &[]);
        let gpu = gpu(name);
        let tok = cpu.require_tokenizer().unwrap();
        let reqs: Vec<ScoreRequest> = [
            ("Alice is a doctor. Bob is a", " nurse."),
            ("Alice is a doctor. Bob is a", " doctor too"),
            ("The quick brown fox", " jumps over the lazy dog."),
        ]
        .iter()
        .map(|(c, x)| ScoreRequest {
            context: tok.encode(c).unwrap(),
            continuation: tok.encode(x).unwrap(),
        })
        .collect();
        let a = loglikelihood(&cpu, &reqs, &ScoreOptions::default()).unwrap();
        let b = loglikelihood(&gpu, &reqs, &ScoreOptions::default()).unwrap();
        for (i, (r, (a, b))) in reqs.iter().zip(a.iter().zip(&b)).enumerate() {
            // The GPU's scores are the log-softmax of its own logits over the whole sequence.
            let mut seq = r.context.clone();
            seq.extend_from_slice(&r.continuation);
            let rows = logits(&gpu, &seq).to_vec2::<f32>().unwrap();
            let n = r.context.len();
            for (j, (&t, &lp)) in r.continuation.iter().zip(&b.logprobs).enumerate() {
                let row = &rows[n + j - 1];
                let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = row.iter().map(|&x| ((x - mx) as f64).exp()).sum();
                let want = (row[t as usize] - mx) as f64 - z.ln();
                assert!(
                    (lp as f64 - want).abs() < 2e-3,
                    "{name} request {i} token {j}: {lp} vs {want}"
                );
                let first_max = row.iter().position(|&x| x == mx).unwrap();
                assert_eq!(
                    b.greedy[j],
                    first_max == t as usize,
                    "{name} request {i} token {j} greedy"
                );
            }
            let d = a
                .logprobs
                .iter()
                .zip(&b.logprobs)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            println!(
                "SCORE {name} request {i}: cpu {:.4} gpu {:.4} max token diff {d:.5}",
                a.total(),
                b.total()
            );
            assert_eq!(a.logprobs.len(), b.logprobs.len());
            // The dense model has no routing to flip: its scores match the CPU's within bf16 noise.
            if !cpu.config().is_moe() {
                assert!(
                    d <= 0.05,
                    "{name} request {i}: token log-probabilities differ by {d}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_greedy_generation_matches_cpu() {
    // Greedy paths must agree token for token, except where the CPU's own top two logits are closer
    // than bf16 can resolve (then either choice is right, and the paths may part there).
    for name in FIXTURES {
        let cpu = load(name, Device::Cpu, &[]);
        let gpu = gpu(name);
        let greedy = GenParams {
            max_new_tokens: 16,
            stop_at_eos: false,
            ..GenParams::default()
        };
        for i in 0..4 {
            let prompt = prompt_ids(name, i);
            let a = &generate(&cpu, &[(prompt.clone(), greedy.clone())], None).unwrap()[0];
            let b = &generate(&gpu, &[(prompt.clone(), greedy.clone())], None).unwrap()[0];
            let same = a
                .tokens
                .iter()
                .zip(&b.tokens)
                .take_while(|(x, y)| x == y)
                .count();
            println!(
                "GREEDY {name} prompt {i}: {same} of {} tokens equal",
                a.tokens.len()
            );
            if same < a.tokens.len() {
                let mut ctx = prompt.clone();
                ctx.extend_from_slice(&a.tokens[..same]);
                let row = logits(&cpu, &ctx);
                let last = row.get(ctx.len() - 1).unwrap().to_vec1::<f32>().unwrap();
                let gap = last[a.tokens[same] as usize] - last[b.tokens[same] as usize];
                let tol = 0.03 * last.iter().fold(1.0f32, |m, x| m.max(x.abs()));
                println!("GREEDY {name} prompt {i}: paths part at token {same}, CPU logit gap {gap:.5} (tol {tol:.4})");
                assert!(
                    gap <= tol,
                    "{name} prompt {i}: GPU picked a clearly worse token at {same}"
                );
            }
        }
    }
}

/// Hidden states of `steps` decoding steps of `batch` sequences (each fed its own token ids).
fn decode_hidden(model: &Model, batch: usize, steps: usize) -> Vec<Vec<f32>> {
    let prompt = prompt_ids("tiny-olmoe", 0);
    let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| prompt.iter().map(|&t| (t + b as u32) % 512).collect())
        .collect();
    let mut inputs: Vec<SeqInput> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, c)| SeqInput {
            tokens: p,
            cache: c,
            mask: None,
        })
        .collect();
    model.forward_last(&mut inputs).unwrap();
    let mut out = Vec::new();
    for step in 0..steps {
        let feeds: Vec<[u32; 1]> = (0..batch).map(|b| [(7 * b + step) as u32 % 512]).collect();
        let mut inputs: Vec<SeqInput> = feeds
            .iter()
            .zip(caches.iter_mut())
            .map(|(f, c)| SeqInput {
                tokens: f,
                cache: c,
                mask: None,
            })
            .collect();
        let fwd = model.forward(&mut inputs, false).unwrap();
        out.push(fwd.hidden.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_graph_replay_equals_kernel_by_kernel() {
    // Decoding steps replay as CUDA graphs; the same steps launched one kernel at a time must give
    // the same bits (1 sequence: GEMVs; 20: cuBLAS for the dense matmuls inside the graph).
    let graphs = gpu("tiny-olmoe");
    std::env::set_var("MOEVAL_CUDA_GRAPHS", "0");
    let eager = gpu("tiny-olmoe");
    std::env::remove_var("MOEVAL_CUDA_GRAPHS");
    for batch in [1, 4, 20] {
        let before = engine::cuda::graphs_captured();
        let (a, b) = (
            decode_hidden(&graphs, batch, 4),
            decode_hidden(&eager, batch, 4),
        );
        assert_eq!(
            engine::cuda::graphs_captured(),
            before + 1,
            "batch {batch}: the decoding step was not captured as a graph"
        );
        assert_eq!(
            a, b,
            "batch {batch}: graph replay differs from kernel-by-kernel launches"
        );
        println!("GRAPHS batch {batch}: 4 steps identical");
    }
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/device-check.sh runs it"]
fn cuda_argmax_matches_logits() {
    let model = gpu("tiny-olmoe");
    let tokens = prompt_ids("tiny-olmoe", 0);
    let mut cache = model.new_cache();
    let fwd = model
        .forward(
            &mut [SeqInput {
                tokens: &tokens,
                cache: &mut cache,
                mask: None,
            }],
            false,
        )
        .unwrap();
    let want = model.logits(&fwd.hidden).unwrap().argmax(1).unwrap();
    assert_eq!(
        model.argmax(&fwd.hidden).unwrap(),
        want.to_vec1::<u32>().unwrap()
    );
}
