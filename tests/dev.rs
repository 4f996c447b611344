//! `freshet dev` and `freshet ctl` as real processes over real HTTP on 127.0.0.1: events in
//! (good and malformed), predictions out, the admin commands, the token, Ctrl-C and resume.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    freshet, get, http, http_with, post, spawn_listening, wait, Server, SMALL_MODEL_CONFIG,
};
use serde_json::{json, Value};

/// The small model, a quick and loose gate, and two log partitions.
fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{SMALL_MODEL_CONFIG}\n[log]\npartitions = 2\n[validation]\nmin_samples = 300\n\
         max_auc_drop = 0.5\nmax_logloss_ratio = 10.0\nmax_calibration_error = 10.0\n"
    );
    std::fs::write(dir.path().join("freshet.toml"), config).unwrap();
    dir
}

fn dev(d: &Path, extra: &[&str]) -> Server {
    let mut cmd = freshet(d);
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--status-every", "1"])
        .args(["--window-ms", "1000", "--delta-ms", "400"])
        .args(extra);
    spawn_listening(cmd)
}

fn ctl(d: &Path, addr: &str, args: &[&str]) -> std::process::Output {
    freshet(d)
        .args(["ctl", "--json", "--url", &format!("http://{addr}")])
        .args(args)
        .output()
        .unwrap()
}

/// Waits for `child` to exit after a signal; a node that ignores it fails the test (and is
/// killed) instead of hanging the suite.
fn exits_within(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node had not exited {secs} s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dev_learns_serves_and_obeys_ctl_then_stops_cleanly_and_resumes() {
    let d = setup();
    let mut node = dev(d.path(), &["--sim-rate", "1500", "--sim-seed", "5"]);
    let addr = node.addr.clone();

    // Events: good lines are appended, malformed ones answered and dead-lettered.
    let body = concat!(
        r#"{"type":"impression","request_id":"t1","time_ms":1700000000000,"user":"u","item":"a","features":{"dense":{"I1":1.5},"sparse":{"C1":"x"}}}"#,
        "\nnot json\n",
        r#"{"type":"action","request_id":"","item":"a","time_ms":1,"kind":"click"}"#,
        "\n"
    );
    let (code, r) = post(&addr, "/v1/events", body);
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        (r["accepted"].as_u64(), r["rejected"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(r["refused"][0]["line"], 2);
    let (code, r) = post(&addr, "/v1/events", "{\"type\":\"nope\"}\n[1,2]\n");
    assert_eq!(code, 400, "{r}");
    assert_eq!(r["accepted"], 0);
    assert_eq!(post(&addr, "/v1/events", "\n\n").0, 200);

    // A model is served within seconds, and predictions name their version.
    wait(60, "a served version", || {
        (get(&addr, "/healthz").0 == 200).then_some(())
    });
    let req = json!({
        "sparse": {"C1": "u1"}, "dense": {"I1": 0.5},
        "candidates": [{"sparse": {"C2": "i1"}}, {"sparse": {"C2": "i2"}}],
    });
    let (code, p) = post(&addr, "/v1/predict", &req.to_string());
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["scores"].as_array().unwrap().len(), 2);
    let (code, p) = post(&addr, "/v1/predict", "{\"candidates\": 3}");
    assert_eq!(code, 400, "{p}");

    // Versions with their validation; one is serving.
    let versions = wait(60, "three validated versions", || {
        let (_, m) = get(&addr, "/v1/models");
        let passed: Vec<u64> = m["versions"]
            .as_array()?
            .iter()
            .filter(|v| v["validation"]["passed"] == true)
            .map(|v| v["version"].as_u64().unwrap())
            .collect();
        (passed.len() >= 3).then_some(passed)
    });
    let o = ctl(d.path(), &addr, &["versions"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(listed["versions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["serving"] == true));

    let o = ctl(d.path(), &addr, &["status"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st: Value = serde_json::from_slice(&o.stdout).unwrap();
    let children = st["children"].as_array().unwrap();
    assert!(children.iter().all(|c| c["running"] == true), "{st}");
    for kind in [
        "replica-0",
        "joiner-1",
        "shard-1",
        "writer",
        "trainer",
        "validator",
    ] {
        assert!(children.iter().any(|c| c["name"] == kind), "{kind} missing");
    }
    // One process, every role, every shard here.
    let o = ctl(d.path(), &addr, &["nodes"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let nodes: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = nodes["nodes"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{nodes}");
    assert_eq!(rows[0]["roles"], "shards,trainer,serving,joiner", "{nodes}");
    assert_eq!(rows[0]["shards"].as_array().unwrap().len(), 2, "{nodes}");
    assert!(rows[0]["memory_used_bytes"].as_u64() > Some(0), "{nodes}");

    // Rollback: serving switches, later versions are marked.
    let target = versions[0];
    let o = ctl(d.path(), &addr, &["rollback", &target.to_string()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(get(&addr, "/healthz").1["serving"], target);
    let (_, m) = get(&addr, "/v1/models");
    let marked = m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["rolled_back"]["to"] == target)
        .count();
    assert!(marked >= 2, "{m}");

    // Replay, and refusals with the reason and a failing exit.
    let o = ctl(
        d.path(),
        &addr,
        &["replay", "--from", "0", "--to", "40", "--skip", "10..20"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (args, want) in [
        (vec!["replay", "--from", "5", "--to", "5"], "empty range"),
        (vec!["rollback", "999999"], "404"),
        (
            vec!["replay", "--from", "1", "--to", "9", "--skip", "x"],
            "not a range",
        ),
    ] {
        let o = ctl(d.path(), &addr, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
    for (path, body) in [
        ("/v1/admin/rollback", "{"),
        ("/v1/admin/rollback", "{\"version\": \"x\"}"),
        ("/v1/admin/replay", "{\"from\": 1}"),
        ("/v1/admin/calibrate", "{\"base\": 3}"),
        ("/v1/admin/rebalance", "{\"shards\": 8}"),
        ("/v1/admin/rebalance", "[]"),
    ] {
        let (code, r) = post(&addr, path, body);
        assert_eq!(code, 400, "{path} {body}: {r}");
        assert!(r["error"].as_str().unwrap().contains("bad request body"));
    }
    // One process holds every shard: nothing to rebalance, and `ctl` says why.
    let o = ctl(d.path(), &addr, &["rebalance"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("409") && err.contains("nothing to rebalance"),
        "{err}"
    );
    // A base outside node.bases_dir (the node's working directory here) gets one answer,
    // whether the path exists or not: the endpoint tells nothing of the file system.
    let (code, r) = post(
        &addr,
        "/v1/admin/calibrate",
        "{\"base\": \"/nonexistent/x\"}",
    );
    assert_eq!(code, 403, "{r}");
    let (code, etc) = post(&addr, "/v1/admin/calibrate", "{\"base\": \"/etc\"}");
    assert_eq!((code, &etc), (403, &r));
    // Inside it, a missing store is named.
    let missing = d.path().join("no-such-base");
    let (code, r) = post(
        &addr,
        "/v1/admin/calibrate",
        &serde_json::json!({"base": missing}).to_string(),
    );
    assert_eq!(code, 404, "{r}");
    let (_, metrics) = http(&addr, "GET", "/metrics", "text/plain", b"");
    let metrics = String::from_utf8(metrics).unwrap();
    for name in [
        "freshet_validation_alert",
        "freshet_events_rejected_total 4",
        "freshet_trainer_lag_samples",
    ] {
        assert!(metrics.contains(name), "{name} not in /metrics");
    }
    // The status line.
    wait(30, "a status line", || {
        node.log
            .try_iter()
            .find(|l| l.starts_with("events ") && l.contains("serving v"))
    });

    // Every other command that opens the logs is refused while the node runs, naming the
    // lock and the node's PID, before it touches a file: a second appender or a recovery of
    // the log under the node's feet would corrupt it.
    let events = d.path().join("more.jsonl");
    std::fs::write(
        &events,
        "{\"type\": \"impression\", \"request_id\": \"x\", \"time_ms\": 1, \"user\": \"u\", \"item\": \"i\"}\n",
    )
    .unwrap();
    let pid = format!("pid {}", node.child.id());
    for args in [
        vec!["train", "--from-log"],
        vec!["ingest", events.to_str().unwrap()],
        vec!["join", "--until-caught-up"],
        vec!["simulate", "--impressions", "10"],
    ] {
        let o = freshet(d.path()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success()
                && err.contains("in use by another Freshet process")
                && err.contains(&pid)
                && err.contains("node.lock"),
            "{args:?}: {err}"
        );
    }

    // Ctrl-C: a last version, a clean exit.
    // SAFETY: the child is ours and alive; SIGINT is what Ctrl-C sends.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(node.child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let status = exits_within(&mut node.child, 60);
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(node.child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    let last = summary["last_version"].as_u64().unwrap();

    // A base model trained offline on the node's sample log records where it ends: the
    // first 90% of each partition, the rest held out for its test metrics.
    let o = freshet(d.path())
        .args(["train", "--from-log", "--out", "base", "--batch", "100"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    // (The tail of a log a node just wrote is mostly positives: the negatives of its newest
    // impressions wait in the join window. So only the logloss is sure to exist here.)
    assert!(report["test_logloss"].as_f64().is_some(), "{report}");
    let base: Value = serde_json::from_slice(
        &std::fs::read(d.path().join("base/v000000000001/manifest.json")).unwrap(),
    )
    .unwrap();
    let offsets = base["sample_offsets"].as_object().unwrap();
    assert_eq!(offsets.len(), 2, "{base}");
    let consumed: u64 = offsets.values().map(|o| o.as_u64().unwrap()).sum();
    // Every offset below the recorded ones is a trained row or a refusal, once.
    assert_eq!(
        base["rows_trained"].as_u64().unwrap() + base["samples_rejected"].as_u64().unwrap(),
        consumed,
        "{base}"
    );
    assert_eq!(
        report["train_rows"].as_u64().unwrap(),
        base["rows_trained"].as_u64().unwrap()
    );
    assert!(report["test_rows"].as_u64().unwrap() > 0);

    // The same data directory resumes from there.
    let again = dev(d.path(), &["--no-simulate"]);
    let resumed = wait(30, "the resume line", || {
        again
            .log
            .try_iter()
            .find(|l| l.starts_with("resuming from version"))
    });
    assert_eq!(resumed, format!("resuming from version {last}"));

    // Calibration installs the base and online training resumes at its offsets: the held-out
    // tail is trained online, and the accounting still covers every offset exactly once.
    let addr = again.addr.clone();
    let base_dir = d.path().join("base");
    let o = ctl(
        d.path(),
        &addr,
        &["calibrate", "--base", base_dir.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let installed = serde_json::from_slice::<Value>(&o.stdout).unwrap()["installed_version"]
        .as_u64()
        .unwrap();
    let (_, m) = get(&addr, "/v1/models");
    let row = m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == installed)
        .cloned()
        .unwrap();
    assert_eq!(row["calibrated_from"]["version"], 1, "{row}");
    assert_eq!(row["sample_offsets"], base["sample_offsets"]);
    let manifest = |v: u64| -> Value {
        serde_json::from_slice(
            &std::fs::read(d.path().join(format!("data/models/v{v:012}/manifest.json"))).unwrap(),
        )
        .unwrap()
    };
    let after = wait(60, "a version that trained the held-out tail", || {
        let (_, m) = get(&addr, "/v1/models");
        m["versions"]
            .as_array()?
            .iter()
            .filter_map(|v| v["version"].as_u64())
            .filter(|&v| v > installed)
            .map(manifest)
            .find(|m| m["rows_trained"].as_u64() > base["rows_trained"].as_u64())
    });
    let consumed: u64 = after["sample_offsets"]
        .as_object()
        .unwrap()
        .values()
        .map(|o| o.as_u64().unwrap())
        .sum();
    assert_eq!(
        after["rows_trained"].as_u64().unwrap() + after["samples_rejected"].as_u64().unwrap(),
        consumed,
        "{after}"
    );
}

#[test]
fn admin_endpoints_need_the_token_when_one_is_set() {
    let d = setup();
    let node = dev(d.path(), &["--no-simulate", "--admin-token", "s3cret"]);
    let addr = node.addr.clone();
    for path in ["/v1/admin/status", "/v1/admin/nodes"] {
        assert_eq!(get(&addr, path).0, 401, "{path}");
    }
    assert_eq!(post(&addr, "/v1/admin/rebalance", "{}").0, 401);
    let (code, _) = http_with(
        &addr,
        "GET",
        "/v1/admin/status",
        "text/plain",
        &["Authorization: Bearer wrong"],
        b"",
    );
    assert_eq!(code, 401);
    let (code, _) = http_with(
        &addr,
        "GET",
        "/v1/admin/status",
        "text/plain",
        &["Authorization: Bearer s3cret"],
        b"",
    );
    assert_eq!(code, 200);
    // Serving endpoints stay open.
    assert_eq!(get(&addr, "/v1/models").0, 200);
    let o = ctl(d.path(), &addr, &["status"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"));
    let o = ctl(d.path(), &addr, &["--token", "s3cret", "status"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A trainer that fails at every step (`FRESHET_FAULTS`, the fault-injection hook for whole
/// processes) exhausts the supervisor's restarts: the node then says on `/healthz` and on
/// `POST /v1/events` that it stopped training for good, accepts no event, and exits with the
/// reason on Ctrl-C.
#[test]
fn a_trainer_that_fails_for_good_stops_the_node_taking_events() {
    let d = setup();
    let mut config = std::fs::read_to_string(d.path().join("freshet.toml")).unwrap();
    config.push_str("[supervisor]\nmax_restarts = 2\nbackoff_min_ms = 10\nbackoff_max_ms = 20\n");
    std::fs::write(d.path().join("freshet.toml"), config).unwrap();
    let mut cmd = freshet(d.path());
    cmd.env("FRESHET_FAULTS", "trainer.batch")
        .args(["dev", "--listen", "127.0.0.1:0", "--status-every", "1"])
        .args(["--window-ms", "1000", "--delta-ms", "400", "--no-simulate"]);
    let mut node = spawn_listening(cmd);
    let addr = node.addr.clone();
    let body = wait(30, "/healthz to say training stopped", || {
        let (code, body) = get(&addr, "/healthz");
        (code == 503 && body["status"] == "down").then_some(body)
    });
    let why = body["error"].as_str().unwrap();
    assert!(why.contains("stopped training for good"), "{body}");
    assert!(why.contains("trainer"), "{body}");
    let event = r#"{"type":"impression","request_id":"r1","user":"u","item":"i","time_ms":1700000000000,"features":{}}"#;
    let (code, body) = post(&addr, "/v1/events", event);
    assert_eq!(code, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("accepts no event"),
        "{body}"
    );
    // SAFETY: the child is ours and alive; SIGINT is what Ctrl-C sends.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(node.child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    let status = exits_within(&mut node.child, 60);
    assert!(
        !status.success(),
        "a node that stopped training exits with an error"
    );
    let log: Vec<String> = node.log.try_iter().collect();
    assert!(
        log.iter().any(|l| l.contains("stopped training for good")),
        "{log:?}"
    );
}

/// The default gate, join window and delta interval on a node killed with SIGKILL twice
/// (`freshet bench restarts`, on the small model): after each restart the simulator continues
/// the event log, the versions pass the gate, and serving stays within a few versions of the
/// newest. Before the restarts kept event time without a gap, most verdicts of the 23 s after
/// a restart failed (calibrations from 0.06 to 9.5) and serving fell up to 35 versions behind.
#[test]
fn through_two_kill_9_restarts_versions_pass_the_default_gate_and_serving_keeps_up() {
    // A withdrawn version costs the versions written until a candidate passes (a few a
    // second); chance fails one now and then.
    const PASS_RATE: f64 = 0.9;
    const MAX_LAG: u64 = 25;
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("freshet.toml"), SMALL_MODEL_CONFIG).unwrap();
    let out = freshet(d.path())
        .args(["bench", "restarts", "--runs", "3", "--secs", "40", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The figures, for whoever reads the test's output.
    println!("{r:#}");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[0]["continued_log"], false, "{r}");
    for (i, run) in runs.iter().enumerate().skip(1) {
        assert_eq!(run["continued_log"], true, "run {i}: {run}");
        let verdicts = run["passed"].as_u64().unwrap() + run["failed"].as_u64().unwrap();
        assert!(verdicts >= 5, "run {i} had {verdicts} verdicts: {run}");
    }
    let rate = r["restarted_pass_rate"].as_f64().unwrap();
    assert!(
        rate >= PASS_RATE,
        "pass rate {rate} after the restarts: {r}"
    );
    let lag = r["restarted_max_lag_versions"].as_u64().unwrap();
    assert!(
        lag <= MAX_LAG,
        "serving {lag} versions behind after a restart: {r}"
    );
}

/// A `/metrics` counter's value (the first line that starts with `series`).
fn counter(addr: &str, series: &str) -> Option<f64> {
    let (code, body) = http(addr, "GET", "/metrics", "text/plain", b"");
    assert_eq!(code, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_trace_receiver_that_is_down_never_holds_the_pipeline_and_its_drops_are_counted() {
    let d = setup();
    // A port nothing listens on: bound, learnt, closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = freshet(d.path());
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--status-every", "1"])
        .args(["--window-ms", "1000", "--delta-ms", "400"])
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_TRACES_SAMPLER", "always_on");
    let node = spawn_listening(cmd);
    let addr = node.addr.clone();
    wait(60, "a served version", || {
        (get(&addr, "/healthz").0 == 200).then_some(())
    });
    let dropped = "freshet_trace_spans_dropped_total{reason=\"export_failed\"} ";
    wait(30, "spans counted as dropped", || {
        (counter(&addr, dropped)? > 0.0).then_some(())
    });
    assert_eq!(
        counter(&addr, "freshet_trace_spans_exported_total "),
        Some(0.0)
    );
    // Training and serving go on: new versions keep being served while every export fails.
    let served = |a: &str| counter(a, "freshet_serving_version ");
    let first = served(&addr).expect("a served version");
    wait(60, "a newer version served", || {
        (served(&addr)? > first).then_some(())
    });
    // Predictions are traced all the same, and answer at once.
    let tp = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = json!({"sparse": {"C1": "u1"}, "candidates": [{"sparse": {"C2": "i1"}}]});
    let t0 = Instant::now();
    let (code, head, _) = common::http_full(
        &addr,
        "POST",
        "/v1/predict",
        "application/json",
        &[tp],
        req.to_string().as_bytes(),
    );
    assert_eq!(code, 200);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(
        head.to_lowercase()
            .contains("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{head}"
    );
    drop(node);
}
