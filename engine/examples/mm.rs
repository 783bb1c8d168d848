fn main() {
    let (m, n, k) = (8usize, 50304usize, 512usize);
    let x = vec![0.5f32; m * k];
    let w = vec![0.25f32; n * k];
    for (m, n, k) in [(1, 50304, 512), (4, 50304, 512), (8, 50304, 512), (16, 50304, 512), (4, 2048, 512), (4, 512, 1024), (2048, 2048, 512)] {
        let x = vec![0.5f32; m * k];
        let w = vec![0.25f32; n * k];
        let t = std::time::Instant::now();
        let reps = 20;
        for _ in 0..reps { std::hint::black_box(engine::matmul::matmul_nt(&x, &w, m, n, k)); }
        let d = t.elapsed().as_secs_f64() / reps as f64;
        println!("{m}x{n}x{k}: {:.2} ms, {:.1} GB/s weights, {:.1} GFLOP/s", d * 1e3, (n * k * 4) as f64 / d / 1e9, (2 * m * n * k) as f64 / d / 1e9);
    }
    let _ = (x, w, m, n, k);
}
