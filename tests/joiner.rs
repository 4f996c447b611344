//! The SampleJoiner end to end over the embedded log: exactly once across injected crashes,
//! one sample per impression, dead letters for bad input, and the actor.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use freshet_actors::event::{DeadLetter, Event, Impression, JoinedSample, SampleKind};
use freshet_actors::joiner::{
    CheckpointEvery, JoinArgs, JoinConfig, JoinTask, JoinerHandle, Phase,
};
use freshet_actors::rng::Xoshiro256;
use freshet_actors::simulate::{SimConfig, Simulator, Truth};
use freshet_actors::stream::{partition_of, EmbeddedLog, FsyncPolicy, LogConfig, StreamLog};
use freshet_actors::testkit;

const PARTITIONS: u32 = 2;

fn log_cfg() -> LogConfig {
    LogConfig {
        partitions: PARTITIONS,
        segment_bytes: 256 << 10,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

fn join_cfg() -> JoinConfig {
    JoinConfig {
        window_ms: 20_000,
        allowed_lateness_ms: 3_000,
        remember_closed_ms: 20_000,
        ..JoinConfig::default()
    }
}

struct Logs {
    events: Arc<dyn StreamLog>,
    samples: Arc<dyn StreamLog>,
    dead: Arc<dyn StreamLog>,
}

fn open_logs(root: &Path) -> Logs {
    let open = |t: &str| -> Arc<dyn StreamLog> {
        Arc::new(EmbeddedLog::open(root, t, log_cfg()).unwrap())
    };
    Logs {
        events: open("events"),
        samples: open("samples"),
        dead: open("dead-letters"),
    }
}

/// Simulated traffic with every fault turned up, then one sentinel impression per partition far
/// enough ahead to close every window.
fn traffic(requests: u64, seed: u64) -> (Vec<(String, Vec<u8>)>, Vec<Truth>) {
    let mut sim = Simulator::new(SimConfig {
        seed,
        rate: 200.0,
        duplicate_rate: 0.03,
        out_of_order_rate: 0.05,
        malformed_rate: 0.01,
        click_delay_median_ms: 4000.0,
        ..SimConfig::default()
    })
    .unwrap();
    let (mut out, mut truth) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        sim.next_request(&mut out, &mut truth);
    }
    sim.finish(&mut out);
    let mut recs: Vec<(String, Vec<u8>)> = out.into_iter().map(|r| (r.key, r.payload)).collect();
    let end = sim.clock_ms() + 10 * 60_000;
    for p in 0..PARTITIONS {
        let key = (0..)
            .map(|i| format!("sentinel-{i}"))
            .find(|k| partition_of(k, PARTITIONS) == p)
            .unwrap();
        let e = Event::Impression(Impression {
            request_id: key.clone(),
            time_ms: end,
            user: "u".into(),
            item: "end".into(),
            features: Default::default(),
            traceparent: None,
        });
        recs.push((key, e.to_msgpack()));
    }
    (recs, truth)
}

fn append_traffic(log: &dyn StreamLog, recs: &[(String, Vec<u8>)], rng: &mut Xoshiro256) {
    let mut i = 0;
    while i < recs.len() {
        let n = (1 + rng.next_u64() % 300) as usize;
        let chunk = &recs[i..(i + n).min(recs.len())];
        for p in 0..PARTITIONS {
            let batch: Vec<&[u8]> = chunk
                .iter()
                .filter(|(k, _)| partition_of(k, PARTITIONS) == p)
                .map(|(_, v)| v.as_slice())
                .collect();
            log.append(p, &batch).unwrap();
        }
        i += n;
    }
}

fn args(logs: &Logs, dir: &Path, p: u32, every: u64, batch: usize) -> JoinArgs {
    JoinArgs {
        partition: p,
        events: logs.events.clone(),
        samples: logs.samples.clone(),
        dead_letters: logs.dead.clone(),
        checkpoint_dir: dir.join("ckpt"),
        config: join_cfg(),
        checkpoint_every: CheckpointEvery {
            records: every,
            ms: 60_000,
        },
        group: "joiner".into(),
        batch,
        faults: Default::default(),
    }
}

fn read_all(log: &dyn StreamLog, p: u32) -> Vec<Vec<u8>> {
    let hw = log.high_watermark(p).unwrap();
    let mut at = log.low_watermark(p).unwrap();
    let mut out = Vec::new();
    while at < hw {
        for r in log.read(p, at, 1000).unwrap() {
            at = r.offset + 1;
            out.push(r.payload);
        }
    }
    out
}

/// Flips a byte in the middle of partition `p`'s current joiner checkpoint.
fn corrupt_checkpoint(dir: &Path, p: u32) {
    let ck = dir.join("ckpt").join(format!("joiner-{p}.ckpt"));
    let mut bytes = std::fs::read(&ck).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&ck, bytes).unwrap();
}

/// Runs every partition's joiner to the end of its input, without faults.
fn join_clean(logs: &Logs, dir: &Path) {
    for p in 0..PARTITIONS {
        let mut t = JoinTask::open(args(logs, dir, p, 1000, 256)).unwrap();
        while t.step().unwrap() > 0 {}
        t.checkpoint().unwrap();
    }
}

#[test]
fn crashes_at_random_points_neither_lose_nor_duplicate_samples() {
    let seed = testkit::seed("joiner_crashes");
    let (recs, truth) = traffic(1500, seed % 1000);
    let mut rng = Xoshiro256::seed_from_u64(seed);

    let clean_dir = tempfile::tempdir().unwrap();
    let clean = open_logs(clean_dir.path());
    append_traffic(&*clean.events, &recs, &mut rng);
    join_clean(&clean, clean_dir.path());

    let dir = tempfile::tempdir().unwrap();
    let logs = open_logs(dir.path());
    append_traffic(&*logs.events, &recs, &mut rng);
    let phases = [
        Phase::Joined,
        Phase::SamplesWritten,
        Phase::OutputsWritten,
        Phase::CheckpointStaged,
        Phase::CheckpointDone,
    ];
    let mut crashes = 0u32;
    for p in 0..PARTITIONS {
        let hw = logs.events.high_watermark(p).unwrap();
        let mut crashes_here = 0;
        loop {
            // Each restart gets its own batch size and checkpoint interval: neither may change
            // what comes out.
            let every = 20 + rng.next_u64() % 400;
            let batch = (1 + rng.next_u64() % 200) as usize;
            let mut t = JoinTask::open(args(&logs, dir.path(), p, every, batch)).unwrap();
            // Crash at the n-th pass through a phase: any phase, or one of the checkpoint phases
            // (rarer, so targeted half the time). After 25 crashes a partition runs clean.
            if crashes_here < 25 {
                let target = if rng.next_u64().is_multiple_of(2) {
                    None
                } else {
                    Some(phases[3 + (rng.next_u64() % 2) as usize])
                };
                let mut countdown = match target {
                    None => 1 + rng.next_u64() % 40,
                    Some(_) => 1 + rng.next_u64() % 3,
                };
                t.set_fault_hook(Box::new(move |phase| {
                    if target.is_none_or(|t| t == phase) {
                        countdown -= 1;
                        if countdown == 0 {
                            anyhow::bail!("injected crash at {phase:?}");
                        }
                    }
                    Ok(())
                }));
            }
            let crashed = loop {
                match t.step() {
                    Ok(0) => break false,
                    Ok(_) => {}
                    Err(_) => break true,
                }
            };
            if !crashed {
                assert_eq!(t.input_next(), hw);
                break;
            }
            crashes += 1;
            crashes_here += 1;
            // Dropping the task loses its memory, as a killed process would.
            drop(t);
        }
    }
    assert!(
        crashes >= 8,
        "only {crashes} crashes were injected (seed {seed})"
    );

    for p in 0..PARTITIONS {
        let want = read_all(&*clean.samples, p);
        let got = read_all(&*logs.samples, p);
        assert_eq!(
            got.len(),
            want.len(),
            "partition {p}: {} samples after {crashes} crashes, {} without (seed {seed})",
            got.len(),
            want.len()
        );
        // Deterministic replay gives more than equal multisets: the same sequence.
        assert!(
            got == want,
            "partition {p}: sample sequences differ (seed {seed})"
        );
        assert_eq!(
            read_all(&*logs.dead, p),
            read_all(&*clean.dead, p),
            "partition {p}: dead letters differ (seed {seed})"
        );
    }

    // Every impression yielded exactly one first sample (positive or negative), and every
    // clicked one is labelled positive, by a positive or a correction.
    let mut firsts: BTreeMap<(String, String), u32> = BTreeMap::new();
    let mut clicked: BTreeMap<(String, String), bool> = BTreeMap::new();
    for p in 0..PARTITIONS {
        for bytes in read_all(&*logs.samples, p) {
            let s = JoinedSample::from_msgpack(&bytes).unwrap();
            let k = (s.request_id.clone(), s.item.clone());
            if s.kind != SampleKind::Correction {
                *firsts.entry(k.clone()).or_default() += 1;
            }
            if s.labels["click"] == 1.0 {
                clicked.insert(k, true);
            }
        }
    }
    // A click later than the window plus the time a closed impression is remembered is set
    // aside as an orphan: not lost, but not a label either.
    let mut orphaned = std::collections::BTreeSet::new();
    for p in 0..PARTITIONS {
        for bytes in read_all(&*logs.dead, p) {
            let d = DeadLetter::from_msgpack(&bytes).unwrap();
            if d.reason == "no_impression" {
                if let Ok(Event::Action(a)) = Event::from_msgpack(&d.payload) {
                    orphaned.insert((a.request_id, a.item));
                }
            }
        }
    }
    let mut distinct = std::collections::BTreeSet::new();
    for t in &truth {
        let k = (t.request_id.clone(), t.item.clone());
        if !distinct.insert(k.clone()) {
            continue; // The same item twice in one request is one impression.
        }
        assert_eq!(firsts.get(&k), Some(&1), "{k:?} (seed {seed})");
        if t.clicked {
            assert!(
                clicked.contains_key(&k) || orphaned.contains(&k),
                "click on {k:?} neither labelled nor dead-lettered (seed {seed})"
            );
        }
    }
    // Nothing else: the sentinels' own windows never close.
    assert_eq!(firsts.len(), distinct.len());
}

#[test]
fn malformed_events_and_orphans_are_dead_lettered_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let logs = open_logs(dir.path());
    let good = Event::Impression(Impression {
        request_id: "r1".into(),
        time_ms: 1_700_000_000_000,
        user: "u".into(),
        item: "i".into(),
        features: Default::default(),
        traceparent: None,
    })
    .to_msgpack();
    let p = partition_of("r1", PARTITIONS);
    let orphan = br#"{"type":"action","request_id":"r1","item":"nope","time_ms":1700000000001,"kind":"click"}"#;
    let orphan = Event::from_json(orphan).unwrap().to_msgpack();
    let future = Event::from_json(
        br#"{"type":"action","request_id":"r1","item":"i","time_ms":99999999999999,"kind":"click"}"#,
    )
    .unwrap()
    .to_msgpack();
    let like = Event::from_json(
        br#"{"type":"action","request_id":"r1","item":"i","time_ms":1700000000002,"kind":"like"}"#,
    )
    .unwrap()
    .to_msgpack();
    let closer = Event::Impression(Impression {
        request_id: "r1".into(),
        time_ms: 1_700_000_100_000,
        user: "u".into(),
        item: "later".into(),
        features: Default::default(),
        traceparent: None,
    })
    .to_msgpack();
    let recs: Vec<&[u8]> = vec![&good, b"\xc1garbage", &orphan, &future, &like, &closer];
    logs.events.append(p, &recs).unwrap();
    let mut t = JoinTask::open(args(&logs, dir.path(), p, 1000, 100)).unwrap();
    while t.step().unwrap() > 0 {}
    let dead: Vec<DeadLetter> = read_all(&*logs.dead, p)
        .iter()
        .map(|b| DeadLetter::from_msgpack(b).unwrap())
        .collect();
    let got: Vec<(u64, &str)> = dead.iter().map(|d| (d.offset, d.reason.as_str())).collect();
    assert_eq!(
        got,
        [
            (1, "undecodable"),
            (3, "future_time"),
            (4, "unknown_kind"),
            (2, "no_impression")
        ]
    );
    assert_eq!(dead[0].payload, b"\xc1garbage", "the raw record is kept");
    let s = t.stats();
    assert_eq!(s.window.malformed, 3);
    assert_eq!(s.window.orphan_actions, 1);
    assert_eq!(s.window.negatives, 1, "r1/i closed by the later impression");
    assert_eq!(
        s.input_next, 6,
        "the joiner kept going past every bad record"
    );
}

#[test]
fn a_wiped_checkpoint_is_refused_rather_than_duplicating_samples() {
    let dir = tempfile::tempdir().unwrap();
    let logs = open_logs(dir.path());
    let (recs, _) = traffic(100, 3);
    append_traffic(&*logs.events, &recs, &mut Xoshiro256::seed_from_u64(1));
    join_clean(&logs, dir.path());
    std::fs::remove_dir_all(dir.path().join("ckpt")).unwrap();
    let err = JoinTask::open(args(&logs, dir.path(), 0, 1000, 100)).unwrap_err();
    assert!(format!("{err:#}").contains("twice"), "{err:#}");
}

#[test]
fn a_corrupt_checkpoint_falls_back_to_the_previous_one() {
    let seed = testkit::seed("joiner_corrupt_checkpoint");
    let (recs, _) = traffic(400, seed % 100);
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = open_logs(clean_dir.path());
    append_traffic(&*clean.events, &recs, &mut Xoshiro256::seed_from_u64(seed));
    join_clean(&clean, clean_dir.path());

    let dir = tempfile::tempdir().unwrap();
    let logs = open_logs(dir.path());
    append_traffic(&*logs.events, &recs, &mut Xoshiro256::seed_from_u64(seed));
    let mut t = JoinTask::open(args(&logs, dir.path(), 0, 100, 50)).unwrap();
    for _ in 0..10 {
        t.step().unwrap();
    }
    drop(t);
    corrupt_checkpoint(dir.path(), 0);
    let mut t = JoinTask::open(args(&logs, dir.path(), 0, 100, 50)).unwrap();
    while t.step().unwrap() > 0 {}
    assert!(
        t.stats().task.replayed_outputs > 0,
        "the fallback replayed outputs"
    );
    assert_eq!(t.stats().task.replay_mismatches, 0);
    assert!(
        read_all(&*logs.samples, 0) == read_all(&*clean.samples, 0),
        "seed {seed}"
    );
}

/// Windows of 1 s, forgotten 1 s after they close: over 10 s of traffic most impressions are
/// closed and forgotten long before the end, so holds move and retention has work.
fn short(a: JoinArgs) -> JoinArgs {
    JoinArgs {
        config: JoinConfig {
            window_ms: 1_000,
            allowed_lateness_ms: 200,
            remember_closed_ms: 1_000,
            ..join_cfg()
        },
        ..a
    }
}

/// `recs` joined in one go with [`short`] windows, on logs without retention: what a joiner
/// under retention and restarts must write.
fn joined_with_short_windows(recs: &[(String, Vec<u8>)], seed: u64) -> (tempfile::TempDir, Logs) {
    let dir = tempfile::tempdir().unwrap();
    let logs = open_logs(dir.path());
    append_traffic(&*logs.events, recs, &mut Xoshiro256::seed_from_u64(seed));
    let mut t = JoinTask::open(short(args(&logs, dir.path(), 0, 1000, 256))).unwrap();
    while t.step().unwrap() > 0 {}
    t.checkpoint().unwrap();
    (dir, logs)
}

/// Logs far smaller than the traffic: 4 KiB segments, 16 KiB a partition.
fn small_retention() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        retention_bytes: Some(16 << 10),
        ..log_cfg()
    }
}

#[test]
fn retention_by_bytes_never_deletes_what_a_restarted_joiner_reads_again() {
    let seed = testkit::seed("joiner_retention_holds");
    // 10 s of traffic against 1 s windows: most impressions are closed and forgotten long
    // before the end, so holds move and retention has something to delete.
    let (recs, _) = traffic(2000, seed % 100);
    let (_clean_dir, clean) = joined_with_short_windows(&recs, seed);

    // Logs far smaller than the traffic: without the joiner's holds, retention would delete
    // events it has not read, and the impressions a restored window reads back.
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_retention();
    let open = |t: &str| Arc::new(EmbeddedLog::open(dir.path(), t, cfg.clone()).unwrap());
    let (events, samples, dead) = (open("events"), open("samples"), open("dead-letters"));
    let logs = Logs {
        events: events.clone(),
        samples: samples.clone(),
        dead: dead.clone(),
    };
    let retain = || {
        for l in [&events, &samples, &dead] {
            l.enforce_retention().unwrap();
        }
    };
    // Opened before the traffic arrives, so its first checkpoint holds the logs from the start.
    let mut t = JoinTask::open(short(args(&logs, dir.path(), 0, 100, 50))).unwrap();
    append_traffic(&*logs.events, &recs, &mut Xoshiro256::seed_from_u64(seed));
    let half = events.high_watermark(0).unwrap() / 2;
    while t.input_next() < half {
        t.step().unwrap();
        retain();
    }
    assert!(
        events.low_watermark(0).unwrap() > 0,
        "retention deleted nothing; the test would prove nothing (seed {seed})"
    );
    drop(t);
    // The restart falls back to the previous checkpoint, the one the holds were kept at.
    corrupt_checkpoint(dir.path(), 0);
    retain();
    let mut t = JoinTask::open(short(args(&logs, dir.path(), 0, 100, 50)))
        .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    while t.step().unwrap() > 0 {
        retain();
    }
    t.checkpoint().unwrap();
    assert!(t.stats().task.replayed_outputs > 0, "seed {seed}");
    assert_eq!(t.stats().task.replay_mismatches, 0, "seed {seed}");
    let low = samples.low_watermark(0).unwrap();
    assert!(low > 0, "the sample log was never trimmed (seed {seed})");
    let want = read_all(&*clean.samples, 0);
    let got = read_all(&*logs.samples, 0);
    assert_eq!(low as usize + got.len(), want.len(), "seed {seed}");
    assert!(got == want[low as usize..], "seed {seed}");
}

#[test]
fn a_joiner_whose_hold_files_are_gone_holds_its_checkpoints_before_it_reads() {
    let seed = testkit::seed("joiner_holds_lost");
    let (recs, _) = traffic(2000, seed % 100);
    let (first, second) = recs.split_at(recs.len() / 2);
    let (_clean_dir, clean) = joined_with_short_windows(&recs, seed);

    let dir = tempfile::tempdir().unwrap();
    let cfg = small_retention();
    let open = |t: &str| Arc::new(EmbeddedLog::open(dir.path(), t, cfg.clone()).unwrap());
    let topics = ["events", "samples", "dead-letters"];
    let mut rng = Xoshiro256::seed_from_u64(seed);
    {
        let logs = Logs {
            events: open("events"),
            samples: open("samples"),
            dead: open("dead-letters"),
        };
        let mut t = JoinTask::open(short(args(&logs, dir.path(), 0, 100, 50))).unwrap();
        append_traffic(&*logs.events, first, &mut rng);
        while t.step().unwrap() > 0 {}
        t.checkpoint().unwrap();
    }
    // A data directory from before retention holds, or one whose hold files were removed.
    for topic in topics {
        std::fs::remove_file(dir.path().join(topic).join("holds").join("joiner.json")).unwrap();
    }
    let (events, samples, dead) = (open("events"), open("samples"), open("dead-letters"));
    assert!(events.holds().is_empty(), "{:?}", events.holds());
    let logs = Logs {
        events: events.clone(),
        samples: samples.clone(),
        dead: dead.clone(),
    };
    let t = JoinTask::open(short(args(&logs, dir.path(), 0, 100, 50))).unwrap();
    for log in [&events, &samples, &dead] {
        assert!(
            log.holds()
                .contains_key(freshet_actors::joiner::RETENTION_HOLDER),
            "opening held nothing of {}",
            log.topic()
        );
    }
    drop(t);
    // More traffic, retained to its bound; then the newest checkpoint is lost, and the
    // restart falls back to the previous one, which the open held.
    append_traffic(&*logs.events, second, &mut rng);
    for l in [&events, &samples, &dead] {
        l.enforce_retention().unwrap();
    }
    assert!(
        events.low_watermark(0).unwrap() > 0,
        "retention deleted nothing; the test would prove nothing (seed {seed})"
    );
    corrupt_checkpoint(dir.path(), 0);
    let mut t = JoinTask::open(short(args(&logs, dir.path(), 0, 100, 50)))
        .unwrap_or_else(|e| panic!("seed {seed}: {e:#}"));
    while t.step().unwrap() > 0 {}
    t.checkpoint().unwrap();
    assert_eq!(t.stats().task.replay_mismatches, 0, "seed {seed}");
    let low = samples.low_watermark(0).unwrap() as usize;
    let want = read_all(&*clean.samples, 0);
    let got = read_all(&*logs.samples, 0);
    assert_eq!(low + got.len(), want.len(), "seed {seed}");
    assert!(got == want[low..], "seed {seed}");
}

#[test]
fn the_actor_follows_the_log_and_reports_its_counters() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let logs = open_logs(dir.path());
        let (recs, _) = traffic(300, 5);
        let (first, second) = recs.split_at(recs.len() / 2);
        let mut rng = Xoshiro256::seed_from_u64(9);
        append_traffic(&*logs.events, first, &mut rng);
        let mut handles = Vec::new();
        for p in 0..PARTITIONS {
            handles.push(
                JoinerHandle::spawn(args(&logs, dir.path(), p, 500, 128))
                    .await
                    .unwrap(),
            );
        }
        // The joiners are now waiting on the log; more traffic must wake them.
        append_traffic(&*logs.events, second, &mut rng);
        for (p, (h, _)) in handles.iter().enumerate() {
            let hw = logs.events.high_watermark(p as u32).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let s = h.stats().await.unwrap();
                if s.input_next == hw {
                    assert!(s.window.impressions > 0 && s.window.positives > 0);
                    assert_eq!(
                        s.samples_next,
                        logs.samples.high_watermark(p as u32).unwrap()
                    );
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "joiner {p} stalled at {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for (h, j) in handles {
            h.stop(j).await;
        }
        // Stopping checkpointed: a restart replays nothing.
        for p in 0..PARTITIONS {
            let t = JoinTask::open(args(&logs, dir.path(), p, 500, 128)).unwrap();
            assert_eq!(t.input_next(), logs.events.high_watermark(p).unwrap());
        }
    });
}
