//! Criterion bench of the embedding hot paths, each beside its baseline from the same run:
//! the table against `HashMap<u64, Vec<f32>>` (ahash), and lookups against the memory probe.
//! Criterion prints both throughputs per group; the ratio is their quotient.
//!
//! `cargo bench --bench embedding`. The full-size figures (10M keys) come from
//! `freshet bench embedding`; this bench uses 1M keys to stay short.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use freshet_actors::embedding::bench::{key_of_rank, zipf_batches, HashMapBaseline, MemoryProbe};
use freshet_actors::embedding::{Table, TableConfig, TrainCtx};
use freshet_actors::TableName;

const KEYS: u64 = 1_000_000;
const DIM: usize = 16;
const BATCH: usize = 4096;

fn setup() -> (Table, HashMapBaseline, Vec<Vec<u64>>, Vec<f32>) {
    let mut t =
        Table::new(TableName::new("bench"), TableConfig::with_dim(DIM), None).expect("table");
    let mut map = HashMapBaseline::new(DIM, KEYS as usize);
    let all: Vec<u64> = (0..KEYS).map(|r| key_of_rank(r, 1)).collect();
    let mut out = Vec::new();
    for c in all.chunks(65_536) {
        out.clear();
        t.lookup_for_training(c, &TrainCtx::default(), &mut out)
            .expect("populate");
    }
    for &k in &all {
        map.insert(k);
    }
    let batches = zipf_batches(KEYS, 1.1, BATCH, 32, 1);
    let grads = vec![0.001f32; BATCH * DIM];
    (t, map, batches, grads)
}

fn bench(c: &mut Criterion) {
    let (mut t, mut map, batches, grads) = setup();
    let probe = MemoryProbe::new(t.stats().hot_bytes as usize + t.stats().index_bytes as usize);
    let probe_batches = probe.batches(BATCH, 32, 1);
    let mut out = Vec::with_capacity(BATCH * DIM);

    let mut g = c.benchmark_group("lookup");
    g.throughput(Throughput::Elements((BATCH * batches.len()) as u64));
    g.bench_function("table", |b| {
        b.iter(|| {
            for k in &batches {
                out.clear();
                t.lookup(k, &mut out).expect("lookup");
            }
        })
    });
    g.bench_function("hashmap_baseline", |b| {
        b.iter(|| {
            for k in &batches {
                out.clear();
                map.lookup(k, &mut out);
            }
        })
    });
    g.bench_function("memory_probe", |b| {
        b.iter(|| {
            for k in &probe_batches {
                out.clear();
                probe.read(k, DIM, &mut out);
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("lookup_adagrad_update");
    g.throughput(Throughput::Elements((BATCH * batches.len()) as u64));
    let mut step = 0;
    g.bench_function("table", |b| {
        b.iter_batched(
            || (),
            |()| {
                for k in &batches {
                    step += 1;
                    let ctx = TrainCtx::at_step(step);
                    out.clear();
                    t.lookup_for_training(k, &ctx, &mut out).expect("lookup");
                    t.apply_gradients(k, &grads, &ctx).expect("apply");
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("hashmap_baseline", |b| {
        b.iter(|| {
            for k in &batches {
                out.clear();
                map.lookup(k, &mut out);
                map.adagrad(k, &grads, 0.05);
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
