//! `freshet serve` as a real process, spoken to over real HTTP on 127.0.0.1: predictions in
//! JSON and msgpack, following the versions a training run writes, and malformed, oversized
//! and overload requests answered with a reason while the server keeps serving.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{freshet, get, http, ok, small_model_dir, spawn_listening, Server};
use serde_json::{json, Value};

/// A store with versions 1 (full), 2 and 3 (deltas) of a trained W&D model.
fn setup() -> tempfile::TempDir {
    let dir = small_model_dir();
    train(dir.path());
    dir
}

fn train(d: &Path) {
    ok(&freshet(d)
        .args([
            "train",
            "--data",
            "train.tsv",
            "--format",
            "criteo",
            "--model",
            "wdl",
        ])
        .args(["--out", "store", "--ckpt-every-steps", "10"])
        .output()
        .expect("run"));
}

fn serve(d: &Path, extra: &[&str]) -> Server {
    let mut cmd = freshet(d);
    cmd.args(["serve", "--store", "store", "--listen", "127.0.0.1:0"])
        .args(["--poll-ms", "50"])
        .args(extra);
    spawn_listening(cmd)
}

fn post_json(addr: &str, body: &Value) -> (u16, Value) {
    let (code, body) = http(
        addr,
        "POST",
        "/v1/predict",
        "application/json",
        body.to_string().as_bytes(),
    );
    (code, serde_json::from_slice(&body).expect("a JSON answer"))
}

/// Waits until the server serves `v` (the store follower publishes within its poll).
fn wait_serving(addr: &str, v: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = get(addr, "/healthz");
        if code == 200 && body["serving"] == v {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not serving version {v} after 60 s: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Candidates whose C3 values come from `d/train.tsv` when there is one, so the model knows
/// them (Criteo layout: label, I1..I13, then C1..C26, so C3 is column 16).
fn request(d: &Path, candidates: usize) -> Value {
    let data = std::fs::read_to_string(d.join("train.tsv")).unwrap_or_default();
    let mut values: Vec<&str> = data
        .lines()
        .filter_map(|l| l.split('\t').nth(16))
        .filter(|v| !v.is_empty())
        .collect();
    values.sort_unstable();
    values.dedup();
    json!({
        "sparse": {"C1": "68fd1e64"},
        "dense": {"I1": 1.0, "I2": 3.0},
        "candidates": (0..candidates)
            .map(|i| {
                let v = values.get(i % values.len().max(1)).copied().unwrap_or("none");
                json!({"sparse": {"C3": v, "C4": ["a", "b"]}})
            })
            .collect::<Vec<_>>(),
    })
}

#[test]
fn serves_json_and_msgpack_and_follows_new_versions() {
    let dir = setup();
    let d = dir.path();
    let srv = serve(d, &[]);
    wait_serving(&srv.addr, 3);
    let (code, r) = post_json(&srv.addr, &request(d, 100));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["version"], 3);
    let scores: Vec<f32> = r["scores"]
        .as_array()
        .expect("scores")
        .iter()
        .map(|s| s.as_f64().expect("a score") as f32)
        .collect();
    assert_eq!(scores.len(), 100);
    assert!(scores.iter().all(|s| *s > 0.0 && *s < 1.0), "{scores:?}");
    // Candidates the model has seen score differently from one another.
    assert!(scores.iter().any(|s| *s != scores[0]), "{scores:?}");
    // The same request as msgpack gets the same scores, as msgpack.
    let req: freshet_actors::serving::PredictRequest =
        serde_json::from_value(request(d, 100)).expect("a request");
    let (code, body) = http(
        &srv.addr,
        "POST",
        "/v1/predict",
        "application/msgpack",
        &rmp_serde::to_vec_named(&req).expect("encode"),
    );
    assert_eq!(code, 200);
    let m: freshet_actors::serving::PredictResponse =
        rmp_serde::from_slice(&body).expect("a msgpack answer");
    assert_eq!(m.version, 3);
    assert_eq!(m.scores, scores);

    // A second training run writes versions 4 (full), 5 and 6: the server follows them.
    train(d);
    wait_serving(&srv.addr, 6);
    let (code, models) = get(&srv.addr, "/v1/models");
    assert_eq!(code, 200);
    assert_eq!(models["serving"], 6);
    let listed: Vec<(u64, bool)> = models["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| (v["version"].as_u64().expect("v"), v["serving"] == true))
        .collect();
    assert_eq!(
        listed,
        vec![
            (1, false),
            (2, false),
            (3, false),
            (4, false),
            (5, false),
            (6, true)
        ]
    );
    let (code, r) = post_json(&srv.addr, &request(d, 10));
    assert_eq!((code, r["version"].as_u64()), (200, Some(6)));
    // Deltas 5 and 6 were applied to the served model, not restored whole.
    let (code, body) = http(&srv.addr, "GET", "/metrics", "text/plain", b"");
    assert_eq!(code, 200);
    let metrics = String::from_utf8_lossy(&body).to_string();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert_eq!(value("freshet_serving_version "), 6.0);
    assert!(
        value("freshet_serving_deltas_applied_total ") >= 2.0,
        "{metrics}"
    );
    assert_eq!(value("freshet_predict_items_total "), 210.0);
}

#[test]
fn malformed_oversized_and_overload_requests_get_a_reason_and_the_server_keeps_serving() {
    let dir = setup();
    let d = dir.path();
    let srv = serve(d, &["--max-candidates", "5", "--max-body-bytes", "4000"]);
    wait_serving(&srv.addr, 3);
    let bad = |body: &[u8], content_type: &str, want_code: u16, want: &str| {
        let (code, b) = http(&srv.addr, "POST", "/v1/predict", content_type, body);
        let text = String::from_utf8_lossy(&b).to_string();
        assert_eq!(code, want_code, "{text}");
        assert!(text.contains(want), "{want} not in {text}");
    };
    bad(b"", "application/json", 400, "not a predict request");
    bad(
        b"{not json",
        "application/json",
        400,
        "not a predict request (JSON)",
    );
    bad(&[0xc1, 0xff, 0x00], "application/msgpack", 400, "msgpack");
    bad(
        br#"{"candidates": 7}"#,
        "application/json",
        400,
        "not a predict request",
    );
    bad(
        br#"{"candidates": []}"#,
        "application/json",
        400,
        "no candidates",
    );
    bad(
        request(d, 6).to_string().as_bytes(),
        "application/json",
        400,
        "at most 5",
    );
    bad(
        br#"{"candidates": [{"sparse": {"C77": "x"}}]}"#,
        "application/json",
        400,
        "unknown column C77",
    );
    bad(
        br#"{"sparse": {"C3": "x"}, "candidates": [{"sparse": {"C3": "y"}}]}"#,
        "application/json",
        400,
        "field C3 is also given",
    );
    bad(
        br#"{"dense": {"I1": 1e300}, "candidates": [{}]}"#,
        "application/json",
        400,
        "I1",
    );
    bad(
        br#"{"candidates": [{}], "extra": 1}"#,
        "application/json",
        400,
        "unknown field",
    );
    let big = format!(
        r#"{{"candidates": [{{}}], "sparse": {{"C1": "{}"}}}}"#,
        "x".repeat(5000)
    );
    let (code, _) = http(
        &srv.addr,
        "POST",
        "/v1/predict",
        "application/json",
        big.as_bytes(),
    );
    assert_eq!(code, 413);
    assert_eq!(get(&srv.addr, "/v1/nothing").0, 404);
    let (code, _) = http(&srv.addr, "GET", "/v1/predict", "text/plain", b"");
    assert!(code == 404 || code == 405, "{code}");
    // Still serving, and the bad requests were counted.
    let (code, r) = post_json(&srv.addr, &request(d, 5));
    assert_eq!((code, r["scores"].as_array().map(Vec::len)), (200, Some(5)));
    let (_, body) = http(&srv.addr, "GET", "/metrics", "text/plain", b"");
    let metrics = String::from_utf8_lossy(&body).to_string();
    assert!(
        metrics.contains("freshet_predict_requests_total{outcome=\"bad_request\"} 10"),
        "{metrics}"
    );
    drop(srv);

    // No room for any request in flight: every predict is shed with 503, never queued.
    let shed = serve(d, &["--max-in-flight", "0"]);
    wait_serving(&shed.addr, 3);
    let (code, r) = post_json(&shed.addr, &request(d, 3));
    assert_eq!(code, 503, "{r}");
    assert!(r["error"].as_str().expect("error").contains("overloaded"));
}

#[test]
fn a_server_without_a_model_says_so_and_a_missing_store_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let o = freshet(d)
        .args(["serve", "--store", "nowhere", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nowhere"));
    // An empty store: healthy process, but no model to serve yet.
    std::fs::create_dir(d.join("store")).expect("mkdir");
    let srv = serve(d, &[]);
    let (code, body) = get(&srv.addr, "/healthz");
    assert_eq!(code, 503, "{body}");
    let (code, r) = post_json(&srv.addr, &request(d, 2));
    assert_eq!(code, 503, "{r}");
}
