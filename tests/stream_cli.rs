//! `freshet simulate`, `ingest` and `join` as real processes over one data directory,
//! including a writer killed mid-append.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;

use freshet_actors::event::{
    DeadLetter, Event, JoinedSample, EVENTS_TOPIC, INGEST_REJECTS_TOPIC, SAMPLES_TOPIC,
};
use freshet_actors::rng::Xoshiro256;
use freshet_actors::stream::{EmbeddedLog, LogConfig, StreamLog};
use freshet_actors::testkit;

mod common;
use common::{freshet, ok, read_all};

fn open(dir: &Path, topic: &str) -> EmbeddedLog {
    EmbeddedLog::open(&dir.join("data/log"), topic, LogConfig::default()).expect("open log")
}

#[test]
fn simulate_then_join_labels_every_click() {
    let dir = tempfile::tempdir().unwrap();
    let sim = ok(&freshet(dir.path())
        .args([
            "simulate",
            "--fast",
            "--impressions",
            "4000",
            "--click-delay-median-ms",
            "2000",
        ])
        .output()
        .unwrap());
    assert_eq!(sim["impressions"], 4000);
    assert!(sim["oracle_auc"].as_f64().unwrap() > 0.7, "{sim}");
    let truth = std::fs::read_to_string(dir.path().join("data/truth-1.tsv")).unwrap();
    assert_eq!(truth.lines().count(), 4000);

    let joined = ok(&freshet(dir.path())
        .args(["join", "--until-caught-up"])
        .output()
        .unwrap());
    let parts = joined["partitions"].as_array().unwrap();
    let sum = |f: &str| -> u64 { parts.iter().map(|p| p["window"][f].as_u64().unwrap()).sum() };
    // An item shown twice in one request is one impression to the joiner.
    let mut distinct = std::collections::BTreeMap::<(&str, &str), bool>::new();
    for l in truth.lines() {
        let c: Vec<&str> = l.split('\t').collect();
        *distinct.entry((c[0], c[1])).or_default() |= c[4] == "1";
    }
    assert_eq!(
        sum("impressions") - sum("duplicate_impressions"),
        distinct.len() as u64
    );
    assert!(sum("malformed") > 0 || sim["malformed"] == 0);
    // The fast run spans 4 s of event time against a 10-minute window: every sample so far is
    // a positive, one per clicked impression.
    let samples: Vec<JoinedSample> = read_all(&open(dir.path(), SAMPLES_TOPIC))
        .iter()
        .map(|b| JoinedSample::from_msgpack(b).unwrap())
        .collect();
    let clicked = distinct.values().filter(|&&c| c).count();
    let positives = samples.iter().filter(|s| s.labels["click"] == 1.0).count();
    assert_eq!(positives, clicked, "one positive per clicked impression");
    assert!(samples[0]
        .to_raw_sample()
        .unwrap()
        .sparse
        .contains_key("C1"));

    // A second join resumes from its checkpoint and finds nothing new.
    let again = ok(&freshet(dir.path())
        .args(["join", "--until-caught-up"])
        .output()
        .unwrap());
    let written: u64 = again["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["task"]["samples_written"].as_u64().unwrap())
        .sum();
    assert_eq!(written, 0);
}

#[test]
fn ingest_takes_json_lines_and_dead_letters_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let input = concat!(
        r#"{"type":"impression","request_id":"r1","time_ms":1700000000000,"user":"u","item":"a","features":{"dense":{"I1":1.5},"sparse":{"C1":"x"}}}"#,
        "\n",
        "\n",
        "not json\n",
        r#"{"type":"action","request_id":"r1","item":"a","time_ms":1700000001000,"kind":"click"}"#,
        "\n",
        r#"{"type":"action","request_id":"","item":"a","time_ms":1,"kind":"click"}"#,
        "\n",
        r#"{"type":"impression","request_id":"r2","time_ms":1,"user":"u","item":"a","features":{"dense":{"I1":1e300}}}"#,
        "\n",
    );
    let mut child = freshet(dir.path())
        .args(["ingest", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let report = ok(&child.wait_with_output().unwrap());
    assert_eq!(report["events"], 2);
    assert_eq!(report["rejected"], 3);
    assert_eq!(report["rejected_by_reason"]["undecodable"], 1);
    assert_eq!(report["rejected_by_reason"]["empty_field"], 1);
    assert_eq!(report["rejected_by_reason"]["bad_dense"], 1);
    let events = read_all(&open(dir.path(), EVENTS_TOPIC));
    assert_eq!(events.len(), 2);
    assert!(matches!(
        Event::from_msgpack(&events[0]).unwrap(),
        Event::Impression(_)
    ));
    let dead: Vec<DeadLetter> = read_all(&open(dir.path(), INGEST_REJECTS_TOPIC))
        .iter()
        .map(|b| DeadLetter::from_msgpack(b).unwrap())
        .collect();
    let lines: Vec<u64> = dead.iter().map(|d| d.offset).collect();
    assert_eq!(lines, [3, 5, 6], "dead letters carry their line numbers");
    assert_eq!(dead[0].payload, b"not json");
}

/// A line too large for any record is a dead letter like any other, and a rerun of the same
/// file appends nothing twice: the first run's mark says where it stopped.
#[test]
fn ingest_dead_letters_a_huge_line_and_a_rerun_continues_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let impression = |i: usize| {
        format!(
            r#"{{"type":"impression","request_id":"r{i}","time_ms":1700000000000,"user":"u","item":"a"}}"#
        )
    };
    let mut text = String::new();
    for i in 0..100 {
        text.push_str(&impression(i));
        text.push('\n');
    }
    text.push_str(&"{".repeat(2 << 20));
    text.push('\n');
    for i in 100..200 {
        text.push_str(&impression(i));
        text.push('\n');
    }
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, &text).unwrap();
    let file = file.to_str().unwrap();

    let out = freshet(dir.path())
        .args(["ingest", file, "--batch", "64", "--ack"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (acks, report) = lines.split_at(lines.len() - 1);
    let last = acks.last().expect("acks");
    assert_eq!(
        (last["acked"].as_u64(), last["appended"].as_u64()),
        (Some(201), Some(200))
    );
    assert_eq!(last["dead_lettered"], 1);
    assert!(
        acks.windows(2)
            .all(|w| w[0]["appended"].as_u64() <= w[1]["appended"].as_u64()),
        "{acks:?}"
    );
    assert_eq!(report[0]["events"], 200);
    assert_eq!(report[0]["rejected_by_reason"]["too_large"], 1);
    assert_eq!(read_all(&open(dir.path(), EVENTS_TOPIC)).len(), 200);
    let dead = read_all(&open(dir.path(), INGEST_REJECTS_TOPIC));
    assert_eq!(dead.len(), 1);
    let d = DeadLetter::from_msgpack(&dead[0]).unwrap();
    assert_eq!((d.offset, d.reason.as_str()), (101, "too_large"));
    assert!(
        d.payload.len() < 1 << 20,
        "cut to fit a record: {}",
        d.payload.len()
    );

    // The same file again: nothing new, nothing appended.
    let again = ok(&freshet(dir.path()).args(["ingest", file]).output().unwrap());
    assert_eq!(
        (again["events"].as_u64(), again["skipped_lines"].as_u64()),
        (Some(0), Some(201))
    );
    assert_eq!(read_all(&open(dir.path(), EVENTS_TOPIC)).len(), 200);

    // Grown: only the new lines, numbered after the old ones.
    let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
    writeln!(f, "{}", impression(200)).unwrap();
    writeln!(f, "not json").unwrap();
    drop(f);
    let more = ok(&freshet(dir.path()).args(["ingest", file]).output().unwrap());
    assert_eq!(
        (more["events"].as_u64(), more["rejected"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(read_all(&open(dir.path(), EVENTS_TOPIC)).len(), 201);
    let dead = read_all(&open(dir.path(), INGEST_REJECTS_TOPIC));
    assert_eq!(DeadLetter::from_msgpack(&dead[1]).unwrap().offset, 203);

    // --from-start is the explicit way to append it all again.
    let all = ok(&freshet(dir.path())
        .args(["ingest", file, "--from-start"])
        .output()
        .unwrap());
    assert_eq!(all["events"], 201);
}

/// A writer killed at a random moment loses nothing it acknowledged, and the log it leaves
/// opens (truncating any torn tail) and takes appends again.
#[test]
fn a_writer_killed_mid_append_loses_no_acknowledged_event() {
    let seed = testkit::seed("ingest_kill");
    let mut rng = Xoshiro256::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // One partition, so the log order is the input order and acknowledged lines are a prefix.
    std::fs::write(dir.path().join("freshet.toml"), "[log]\npartitions = 1\n").unwrap();
    let line = |i: u64| -> String {
        format!(
            r#"{{"type":"impression","request_id":"r{i}","time_ms":1700000000000,"user":"u{i}","item":"i","features":{{"sparse":{{"C1":"{}"}}}}}}"#,
            "v".repeat(200 + (i % 300) as usize)
        )
    };
    let mut child = freshet(dir.path())
        .args(["ingest", "-", "--batch", "2000", "--ack"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        // Until the pipe breaks (the child is killed).
        for i in 0.. {
            if writeln!(stdin, "{}", line(i)).is_err() {
                return;
            }
        }
    });
    let kill_after = 2 + rng.next_u64() % 20;
    let mut acked = 0u64;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut buf = String::new();
    for _ in 0..kill_after {
        buf.clear();
        if out.read_line(&mut buf).unwrap() == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&buf).unwrap();
        acked = v["acked"].as_u64().unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    writer.join().unwrap();
    assert!(acked > 0, "seed {seed}");

    let log = EmbeddedLog::open(
        &dir.path().join("data/log"),
        EVENTS_TOPIC,
        LogConfig {
            partitions: 1,
            ..LogConfig::default()
        },
    )
    .unwrap();
    let events = read_all(&log);
    assert!(
        events.len() as u64 >= acked,
        "{} events in the log, {acked} acknowledged (seed {seed})",
        events.len()
    );
    for (i, bytes) in events.iter().enumerate() {
        let e =
            Event::from_msgpack(bytes).unwrap_or_else(|e| panic!("record {i}: {e} (seed {seed})"));
        assert_eq!(e.request_id(), format!("r{i}"), "seed {seed}");
    }
    let hw = log.high_watermark(0).unwrap();
    assert_eq!(log.append(0, &[b"after"]).unwrap().first, hw);
}
