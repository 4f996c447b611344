//! Criterion bench of the dense training step beside its baseline from the same run: one
//! W&D step (429-1024-512-256-1, batch 512, 2 threads) against the sgemm of its first layer's
//! shape, both counted in FLOPs, so the throughputs criterion prints are directly comparable
//! and their quotient is the step's share of the sgemm rate.
//!
//! `cargo bench --bench dense`. `freshet bench dense --json` prints the same ratio against the
//! fastest of several sgemm shapes, timed in rounds interleaved with the step's.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use freshet_actors::dense::gemm::{matmul, Op};
use freshet_actors::dense::{DenseNet, InputShape, ModelConfig, ModelKind, Threads};

const BATCH: usize = 512;

fn bench(c: &mut Criterion) {
    let th = Threads::new(2).expect("threads");
    let shape = InputShape {
        fields: vec![16; 26],
        dense: 13,
    };
    let mut net = DenseNet::new(ModelConfig::new(ModelKind::Wdl), shape).expect("model");
    let (x, _) = net.inputs_mut(BATCH);
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((i * 7919) % 200) as f32 * 5e-4 - 0.05;
    }
    let labels: Vec<f32> = (0..BATCH)
        .map(|i| f32::from(u8::from(i % 4 == 0)))
        .collect();
    let weights = vec![1.0f32; BATCH];
    let flops = net.flops_per_sample() * BATCH as f64;

    let mut g = c.benchmark_group("dense_flops");
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function("wdl_train_step", |b| {
        th.install(|| b.iter(|| net.train_step(BATCH, &labels, &weights, &th)))
    });
    let (m, n, k) = (BATCH, 1024, 429);
    let a = vec![0.01f32; m * k];
    let w = vec![0.02f32; k * n];
    let mut out = vec![0f32; m * n];
    // The sgemm group counts the same number of FLOPs per iteration as the step, by running the
    // shape as many times as that takes.
    let reps = (flops / (2.0 * (m * n * k) as f64)).round().max(1.0) as usize;
    g.throughput(Throughput::Elements((reps * 2 * m * n * k) as u64));
    g.bench_function("sgemm_512x1024x429_baseline", |b| {
        th.install(|| {
            b.iter(|| {
                for _ in 0..reps {
                    matmul(&mut out, m, n, k, Op::n(&a), Op::n(&w), false, &th);
                }
            })
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
