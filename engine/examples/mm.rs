//! Matmul throughput per weight dtype: `cargo run --release -p engine --example mm`.
use engine::matmul::{Linear, Weight};

fn main() {
    for (m, n, k) in [
        (1usize, 50304usize, 512usize),
        (8, 50304, 512),
        (4, 2048, 512),
        (4, 512, 1024),
        (8, 1536, 512),
        (2048, 2048, 512),
        (2048, 512, 1024),
    ] {
        for dtype in ["f32", "bf16"] {
            // Enough distinct weights to defeat the caches, as in decoding.
            let copies = (400_000_000 / (n * k * 4)).clamp(1, 64);
            let x = vec![0.5f32; m * k];
            let ws: Vec<Linear> = (0..copies)
                .map(|c| {
                    let v = 0.25f32 + c as f32;
                    let w = match dtype {
                        "f32" => Weight::F32(vec![v; n * k]),
                        _ => Weight::Bf16(vec![half::bf16::from_f32(v).to_bits(); n * k]),
                    };
                    Linear::from_weight(w, n, k)
                })
                .collect();
            let reps = 3 * copies;
            let t = std::time::Instant::now();
            for r in 0..reps {
                std::hint::black_box(ws[r % copies].forward_rows(&x, m).unwrap());
            }
            let d = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{m}x{n}x{k} {dtype}: {:.3} ms, {:.1} GB/s weights, {:.1} GFLOP/s",
                d * 1e3,
                ws[0].bytes() as f64 / d / 1e9,
                (2 * m * n * k) as f64 / d / 1e9
            );
        }
    }
}
