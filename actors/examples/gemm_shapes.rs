//! Rate of every GEMM in the Wide&Deep training step, each alone, beside a 2048³ product.
//!
//! `cargo run --release -p freshet-actors --example gemm_shapes -- [THREADS]`
//!
//! Prints, per shape and operand layout (N: row-major as stored, T: read transposed), the best
//! and the mean GFLOP/s over half a second of back-to-back calls. The dense bench divides the
//! step's rate by the best of such runs, so this shows how far each GEMM alone is from it.

use std::time::Instant;

use freshet_actors::dense::gemm::{matmul, Op, Threads};

fn op(d: &[f32], transposed: bool) -> Op<'_> {
    if transposed {
        Op::t(d)
    } else {
        Op::n(d)
    }
}

fn main() -> anyhow::Result<()> {
    let threads: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 2,
    };
    let th = Threads::new(threads)?;
    // (name, m, n, k, a transposed, b transposed): forward x·W, weight gradient xᵀ·dy and
    // input gradient dy·Wᵀ of the 429-1024-512-256 tower at batch 512.
    let shapes: &[(&str, usize, usize, usize, bool, bool)] = &[
        ("2048^3 NN", 2048, 2048, 2048, false, false),
        ("fwd1 NN", 512, 1024, 429, false, false),
        ("fwd2 NN", 512, 512, 1024, false, false),
        ("fwd3 NN", 512, 256, 512, false, false),
        ("dW1 TN", 429, 1024, 512, true, false),
        ("dW2 TN", 1024, 512, 512, true, false),
        ("dW3 TN", 512, 256, 512, true, false),
        ("dX1 NT", 512, 429, 1024, false, true),
        ("dX2 NT", 512, 1024, 512, false, true),
        ("dX3 NT", 512, 512, 256, false, true),
        ("dX1 as NN", 512, 429, 1024, false, false),
        ("dX2 as NN", 512, 1024, 512, false, false),
        ("dX3 as NN", 512, 512, 256, false, false),
    ];
    th.install(|| {
        // The first pass warms the pool and the caches; the second is printed.
        for pass in 0..2 {
            for &(name, m, n, k, at, bt) in shapes {
                let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
                let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
                let mut c = vec![0f32; m * n];
                let flop = 2.0 * (m * n * k) as f64;
                let (mut best, mut total, mut calls) = (0f64, 0f64, 0u32);
                let start = Instant::now();
                while start.elapsed().as_secs_f64() < 0.5 {
                    let t = Instant::now();
                    matmul(&mut c, m, n, k, op(&a, at), op(&b, bt), false, &th);
                    let s = t.elapsed().as_secs_f64();
                    best = best.max(flop / s / 1e9);
                    total += s;
                    calls += 1;
                }
                if pass == 1 {
                    let mean = flop * f64::from(calls) / total / 1e9;
                    println!(
                        "{name:10} {m:5} x {n:5} x {k:5}  best {best:6.1}  mean {mean:6.1} GFLOP/s"
                    );
                }
            }
        }
    });
    Ok(())
}
