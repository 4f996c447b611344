//! The behaviour every [`StreamLog`] implementation must show, as one suite.
//!
//! The embedded log runs it in its unit tests; the Kafka log runs it against a real
//! Kafka-protocol broker in `tests/kafka.rs`. Each check gets a fresh topic from the factory,
//! so implementations need not support deleting topics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{LogError, StreamLog, MAX_RECORD_BYTES};

/// Makes a fresh, empty topic with `partitions` partitions. `name` is unique per call.
pub type Factory<'a> = dyn Fn(&str, u32) -> Arc<dyn StreamLog> + 'a;

type Check = fn(&Factory<'_>);

/// Runs every check; panics with the check's name on the first failure.
pub fn run_all(factory: &Factory<'_>) {
    let checks: [(&str, Check); 7] = [
        ("append_and_read_back", append_and_read_back),
        ("partitions_are_independent", partitions_are_independent),
        ("reads_respect_bounds", reads_respect_bounds),
        ("wait_for_wakes_on_append", wait_for_wakes_on_append),
        ("committed_offsets", committed_offsets),
        ("bad_arguments_are_refused", bad_arguments_are_refused),
        ("chunked_reads_see_every_record_once", chunked_reads),
    ];
    for (name, check) in checks {
        let t = Instant::now();
        check(factory);
        tracing::info!(
            check = name,
            elapsed_ms = t.elapsed().as_millis() as u64,
            "conformance check passed"
        );
    }
}

fn topic_name(check: &str) -> String {
    let nonce = super::now_ms();
    format!("conf-{check}-{nonce}-{}", std::process::id())
}

fn rec(i: u64) -> Vec<u8> {
    format!("r{i}:{}", "p".repeat((i % 13) as usize)).into_bytes()
}

fn append_all(log: &dyn StreamLog, partition: u32, range: std::ops::Range<u64>) {
    let recs: Vec<Vec<u8>> = range.clone().map(rec).collect();
    let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
    let ack = log.append(partition, &refs).expect("append");
    assert_eq!(ack.partition, partition);
    assert_eq!(ack.first, range.start, "offsets are contiguous from 0");
    assert_eq!(ack.next, range.end);
}

fn read_all(log: &dyn StreamLog, partition: u32, from: u64) -> Vec<super::Record> {
    let hw = log.high_watermark(partition).expect("high watermark");
    let mut out = Vec::new();
    let mut at = from;
    while at < hw {
        let got = log.read(partition, at, 1000).expect("read");
        assert!(
            !got.is_empty(),
            "read at {at} below the high watermark {hw} returned nothing"
        );
        at = got.last().expect("non-empty").offset + 1;
        out.extend(got);
    }
    out
}

fn append_and_read_back(factory: &Factory<'_>) {
    let log = factory(&topic_name("rw"), 1);
    assert_eq!(log.partitions(), 1);
    assert_eq!(log.high_watermark(0).unwrap(), 0);
    assert_eq!(log.low_watermark(0).unwrap(), 0);
    append_all(&*log, 0, 0..10);
    append_all(&*log, 0, 10..11);
    // An empty payload is a record like any other.
    let ack = log.append(0, &[b""]).unwrap();
    assert_eq!((ack.first, ack.next), (11, 12));
    let all = read_all(&*log, 0, 0);
    assert_eq!(all.len(), 12);
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        let want = if i == 11 { Vec::new() } else { rec(i as u64) };
        assert_eq!(r.payload, want, "payload at {i}");
        assert!(
            r.timestamp_ms > 1_600_000_000_000,
            "timestamp {}",
            r.timestamp_ms
        );
    }
    let mid = log.read(0, 5, 2).unwrap();
    assert_eq!(mid.iter().map(|r| r.offset).collect::<Vec<_>>(), [5, 6]);
}

fn partitions_are_independent(factory: &Factory<'_>) {
    let log = factory(&topic_name("parts"), 3);
    assert_eq!(log.partitions(), 3);
    append_all(&*log, 2, 0..4);
    append_all(&*log, 0, 0..2);
    assert_eq!(log.high_watermark(0).unwrap(), 2);
    assert_eq!(log.high_watermark(1).unwrap(), 0);
    assert_eq!(log.high_watermark(2).unwrap(), 4);
    assert_eq!(read_all(&*log, 2, 0).len(), 4);
    assert!(log.read(1, 0, 10).unwrap().is_empty());
}

fn reads_respect_bounds(factory: &Factory<'_>) {
    let log = factory(&topic_name("bounds"), 1);
    append_all(&*log, 0, 0..3);
    assert!(
        log.read(0, 3, 10).unwrap().is_empty(),
        "reading at the end is empty"
    );
    assert!(log.read(0, 0, 0).unwrap().is_empty());
    match log.read(0, 4, 10) {
        Err(LogError::OffsetOutOfRange {
            requested, high, ..
        }) => assert_eq!((requested, high), (4, 3)),
        other => panic!("read past the end gave {other:?}"),
    }
}

fn wait_for_wakes_on_append(factory: &Factory<'_>) {
    let log = factory(&topic_name("wait"), 1);
    // Nothing arrives: the wait ends at its timeout with the unchanged high watermark.
    let t = Instant::now();
    assert_eq!(log.wait_for(0, 0, Duration::from_millis(200)).unwrap(), 0);
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "returned early without data"
    );
    // Data already there: no wait at all.
    append_all(&*log, 0, 0..1);
    assert_eq!(log.wait_for(0, 0, Duration::from_secs(30)).unwrap(), 1);
    // A writer appends while a reader waits: the reader wakes long before its timeout.
    let writer = log.clone();
    let h = std::thread::spawn(move || {
        // Give the reader time to block; correctness does not depend on it.
        std::thread::sleep(Duration::from_millis(50));
        append_all(&*writer, 0, 1..2);
    });
    let t = Instant::now();
    let hw = log.wait_for(0, 1, Duration::from_secs(30)).unwrap();
    assert_eq!(hw, 2);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "wait did not wake on append"
    );
    h.join().expect("writer thread");
}

fn committed_offsets(factory: &Factory<'_>) {
    let log = factory(&topic_name("groups"), 2);
    append_all(&*log, 0, 0..5);
    assert_eq!(log.committed("g1", 0).unwrap(), None);
    log.commit("g1", 0, 3).unwrap();
    log.commit("g1", 1, 0).unwrap();
    log.commit("g2", 0, 5).unwrap();
    assert_eq!(log.committed("g1", 0).unwrap(), Some(3));
    assert_eq!(log.committed("g1", 1).unwrap(), Some(0));
    assert_eq!(log.committed("g2", 0).unwrap(), Some(5));
    assert_eq!(log.committed("g2", 1).unwrap(), None);
    log.commit("g1", 0, 4).unwrap();
    assert_eq!(
        log.committed("g1", 0).unwrap(),
        Some(4),
        "a later commit replaces"
    );
}

fn bad_arguments_are_refused(factory: &Factory<'_>) {
    let log = factory(&topic_name("bad"), 2);
    assert!(matches!(
        log.append(2, &[b"x"]),
        Err(LogError::NoSuchPartition { partition: 2, .. })
    ));
    assert!(matches!(
        log.read(5, 0, 1),
        Err(LogError::NoSuchPartition { .. })
    ));
    let big = vec![0u8; MAX_RECORD_BYTES + 1];
    assert!(matches!(
        log.append(0, &[b"ok", &big]),
        Err(LogError::RecordTooLarge { .. })
    ));
    assert_eq!(
        log.high_watermark(0).unwrap(),
        0,
        "a refused batch appends nothing"
    );
    assert!(matches!(
        log.commit("a/b", 0, 1),
        Err(LogError::BadGroup(_))
    ));
}

fn chunked_reads(factory: &Factory<'_>) {
    let log = factory(&topic_name("chunks"), 1);
    for start in (0..2000).step_by(250) {
        append_all(&*log, 0, start..start + 250);
    }
    let mut at = 0;
    let mut seen = 0;
    while at < 2000 {
        let got = log.read(0, at, 333).unwrap();
        assert!(!got.is_empty() && got.len() <= 333);
        for r in got {
            assert_eq!(r.offset, at);
            assert_eq!(r.payload, rec(at));
            at += 1;
            seen += 1;
        }
    }
    assert_eq!(seen, 2000);
}
