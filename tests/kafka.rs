//! The Kafka backend against a real Kafka-protocol broker (cargo feature `kafka`).
//!
//! `scripts/test` starts a `tansu` broker on a free loopback port and passes its address in
//! `FRESHET_KAFKA_BROKERS`; without the feature this file compiles to nothing. With the
//! feature but no broker, the tests fail and say how to start one: a missing broker must not
//! read as a pass.
#![cfg(feature = "kafka")]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_actors::event::{JoinedSample, SAMPLES_TOPIC};
use freshet_actors::stream::{conformance, KafkaConfig, KafkaLog, LogError, StreamLog};

mod common;
use common::{ok, read_all};

fn brokers() -> String {
    std::env::var("FRESHET_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "FRESHET_KAFKA_BROKERS is not set: run the suite with `scripts/test`, which starts a \
             broker, or point it at one (host:port)"
        )
    })
}

/// A topic prefix no other test or run shares, so tests need not delete topics.
fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{test}-{}-{nanos}-", std::process::id())
}

fn config(test: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers(),
        topic_prefix: unique_prefix(test),
        timeout_ms: 30_000,
        options: broker_workarounds(),
        ..KafkaConfig::default()
    }
}

/// tansu 0.6 answers ListOffsets(latest) with the base offset of the partition's last record
/// batch plus one, not the last record's offset plus one, so a multi-record batch hides all
/// but its first record from the high watermark. One record per produce request keeps every
/// high watermark exact on it; a real Kafka cluster needs no such setting.
fn broker_workarounds() -> std::collections::BTreeMap<String, String> {
    [("batch.num.messages".to_owned(), "1".to_owned())].into()
}

#[test]
fn kafka_log_passes_the_conformance_suite() {
    let cfg = config("conf");
    conformance::run_all(&|name, partitions| {
        Arc::new(KafkaLog::open(&cfg, name, partitions).expect("open topic")) as Arc<dyn StreamLog>
    });
}

#[test]
fn offsets_are_kafkas_own_and_seeks_are_exact() {
    let cfg = config("seek");
    let log = KafkaLog::open(&cfg, "t", 2).unwrap();
    let recs: Vec<Vec<u8>> = (0..500u32).map(|i| i.to_le_bytes().to_vec()).collect();
    for chunk in recs.chunks(100) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        log.append(1, &refs).unwrap();
    }
    // A second handle (a restarted process) sees the same offsets and reads from any of them.
    let other = KafkaLog::open(&cfg, "t", 2).unwrap();
    assert_eq!(other.high_watermark(1).unwrap(), 500);
    for from in [499, 0, 250, 251, 17, 400] {
        let got = other.read(1, from, 3).unwrap();
        assert!(!got.is_empty());
        for (k, r) in got.iter().enumerate() {
            assert_eq!(r.offset, from + k as u64);
            assert_eq!(
                r.payload, recs[r.offset as usize],
                "payload at {}",
                r.offset
            );
        }
    }
    // Reopening with another partition count is refused: keys would move.
    match KafkaLog::open(&cfg, "t", 3) {
        Err(LogError::Mismatch { detail, .. }) => {
            assert!(detail.contains("2 partitions"), "{detail}")
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[test]
fn an_unreachable_cluster_fails_with_an_error_naming_it() {
    // Port 1 on loopback: nothing listens there.
    let cfg = KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        timeout_ms: 1_000,
        ..KafkaConfig::default()
    };
    let t = Instant::now();
    let err = KafkaLog::open(&cfg, "t", 1).unwrap_err().to_string();
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
}

/// `freshet` in `dir`, configured by a `freshet.toml` there for Kafka under `prefix`.
fn freshet_on_kafka(dir: &Path, prefix: &str) -> Command {
    let options: String = broker_workarounds()
        .iter()
        .map(|(k, v)| format!("{k:?} = {v:?}\n"))
        .collect();
    let toml = format!(
        "[log]\nbackend = \"kafka\"\npartitions = 2\n\n[log.kafka]\nbrokers = {:?}\n\
         topic_prefix = {prefix:?}\n\n[log.kafka.options]\n{options}",
        brokers()
    );
    std::fs::write(dir.join("freshet.toml"), toml).expect("write freshet.toml");
    common::freshet(dir)
}

#[test]
fn simulate_and_join_run_on_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("cli");
    let sim = ok(&freshet_on_kafka(dir.path(), &prefix)
        .args(["simulate", "--fast", "--impressions", "3000"])
        .output()
        .unwrap());
    assert_eq!(sim["impressions"], 3000);
    let clicks = sim["clicks"].as_u64().expect("clicks");
    let joined = ok(&freshet_on_kafka(dir.path(), &prefix)
        .args(["join", "--until-caught-up"])
        .output()
        .unwrap());
    let parts = joined["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    let written: u64 = parts
        .iter()
        .map(|p| p["task"]["samples_written"].as_u64().unwrap())
        .sum();
    assert!(written > 0, "{joined}");

    // The samples are in Kafka, one per written sample, and decode.
    let cfg = KafkaConfig {
        topic_prefix: prefix.clone(),
        ..config("cli")
    };
    let samples = KafkaLog::open(&cfg, SAMPLES_TOPIC, 2).unwrap();
    let samples: Vec<JoinedSample> = read_all(&samples)
        .iter()
        .map(|b| JoinedSample::from_msgpack(b).expect("a joined sample"))
        .collect();
    let total = samples.len() as u64;
    let positives = samples.iter().filter(|s| s.labels["click"] == 1.0).count() as u64;
    assert_eq!(total, written);
    // The fast run spans 3 s of event time against a 10-minute window: every sample so far is
    // a positive, one per clicked (request, item) in the simulator's ground truth.
    let truth = std::fs::read_to_string(dir.path().join("data/truth-1.tsv")).unwrap();
    let mut clicked = std::collections::BTreeMap::<(&str, &str), bool>::new();
    for l in truth.lines() {
        let c: Vec<&str> = l.split('\t').collect();
        *clicked.entry((c[0], c[1])).or_default() |= c[4] == "1";
    }
    let clicked = clicked.values().filter(|&&c| c).count() as u64;
    assert!(clicked > 0 && clicked <= clicks);
    assert_eq!(positives, clicked, "one positive per clicked impression");
    assert_eq!(total, positives);

    // A second join resumes from its checkpoint against Kafka's offsets: nothing twice.
    let again = ok(&freshet_on_kafka(dir.path(), &prefix)
        .args(["join", "--until-caught-up"])
        .output()
        .unwrap());
    let rewritten: u64 = again["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["task"]["samples_written"].as_u64().unwrap())
        .sum();
    assert_eq!(rewritten, 0, "{again}");
}
