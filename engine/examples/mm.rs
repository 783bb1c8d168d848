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
        // Enough distinct weights to defeat the caches, as in decoding.
        let copies = (400_000_000 / (n * k * 4)).clamp(1, 64);
        let x = vec![0.5f32; m * k];
        let ws: Vec<Vec<f32>> = (0..copies)
            .map(|c| vec![0.25f32 + c as f32; n.div_ceil(64) * 64 * k])
            .collect();
        let reps = 3 * copies;
        let t = std::time::Instant::now();
        for r in 0..reps {
            std::hint::black_box(engine::matmul::matmul_packed(
                &x,
                m,
                k,
                &ws[r % copies],
                n,
                k,
            ));
        }
        let d = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{m}x{n}x{k}: {:.3} ms, {:.1} GB/s weights, {:.1} GFLOP/s",
            d * 1e3,
            (n * k * 4) as f64 / d / 1e9,
            (2 * m * n * k) as f64 / d / 1e9
        );
    }
}
