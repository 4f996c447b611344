//! Criterion bench of the joiner's hot paths beside baselines from the same run, all counted
//! in events so criterion's throughputs compare directly:
//! - `window`: the pure join core on simulated traffic (decode, window, emit) against a plain
//!   `HashMap` doing the minimum a join needs (insert each impression's key, look up and remove
//!   it for each action) on the same events, already decoded;
//! - `log_append_read`: the embedded log appending and reading back the same records.
//!
//! `cargo bench --bench join`. `freshet bench join` measures the whole pipeline end to end.

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use freshet_actors::event::Event;
use freshet_actors::joiner::{JoinConfig, Window};
use freshet_actors::simulate::{SimConfig, Simulator};
use freshet_actors::stream::{EmbeddedLog, FsyncPolicy, LogConfig, StreamLog};

fn traffic(impressions: u64) -> Vec<Vec<u8>> {
    let mut sim = Simulator::new(SimConfig {
        click_scale: 0.4,
        ..SimConfig::default()
    })
    .expect("simulator");
    let (mut out, mut truth) = (Vec::new(), Vec::new());
    while sim.stats().impressions < impressions {
        sim.next_request(&mut out, &mut truth);
    }
    sim.finish(&mut out);
    out.into_iter().map(|r| r.payload).collect()
}

fn bench(c: &mut Criterion) {
    let records = traffic(50_000);
    let n = records.len() as u64;
    let mut g = c.benchmark_group("join_events");
    g.throughput(Throughput::Elements(n));
    g.sample_size(20);
    g.bench_function("window", |b| {
        b.iter_batched(
            || Window::new(JoinConfig::default()),
            |mut w| {
                let mut out = Vec::new();
                for (i, r) in records.iter().enumerate() {
                    if let Ok(e) = Event::from_msgpack(r) {
                        let _ = w.on_event(i as u64, e, &mut out);
                    }
                    out.clear();
                }
                w
            },
            BatchSize::LargeInput,
        )
    });
    let decoded: Vec<Event> = records
        .iter()
        .filter_map(|r| Event::from_msgpack(r).ok())
        .collect();
    g.bench_function("hashmap_baseline", |b| {
        b.iter(|| {
            let mut m: HashMap<(&str, &str), i64> = HashMap::new();
            let mut hits = 0u64;
            for e in &decoded {
                match e {
                    Event::Impression(i) => {
                        m.insert((&i.request_id, &i.item), i.time_ms);
                    }
                    Event::Action(a) => {
                        hits += u64::from(
                            m.remove(&(a.request_id.as_str(), a.item.as_str()))
                                .is_some(),
                        );
                    }
                }
            }
            hits
        })
    });
    g.bench_function("log_append_read", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("tempdir"),
            |dir| {
                let cfg = LogConfig {
                    partitions: 1,
                    fsync: FsyncPolicy::Never,
                    ..LogConfig::default()
                };
                let log = EmbeddedLog::open(dir.path(), "events", cfg).expect("log");
                for chunk in records.chunks(4096) {
                    let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
                    log.append(0, &refs).expect("append");
                }
                let mut at = 0;
                while at < n {
                    at += log.read(0, at, 4096).expect("read").len() as u64;
                }
                dir
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
