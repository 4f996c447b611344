//! `freshet gen` and `freshet train` as real processes: known-answer data, training through the
//! shard actors, the JSON report, malformed rows, saving and resuming a model, corruption.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn freshet(dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freshet"));
    c.current_dir(dir).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("FRESHET") {
            c.env_remove(k);
        }
    }
    c.output().expect("run freshet")
}

fn ok_json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().last().expect("one JSON line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A small model so the test trains in seconds: 2 shards, narrow layers.
const CONFIG: &str = r#"
[embedding]
shards = 2
[model]
hidden = [32, 16]
[train]
batch = 128
"#;

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("freshet.toml"), CONFIG).expect("config");
    for (rows, seed, name) in [("6000", "1", "train.tsv"), ("1500", "2", "test.tsv")] {
        let g = ok_json(&freshet(
            dir.path(),
            &[
                "gen", "--rows", rows, "--seed", seed, "--vocab", "2000", "--out", name,
            ],
        ));
        assert_eq!(
            g["rows"].as_u64().map(|r| r.to_string()),
            Some(rows.to_string())
        );
        let oracle = g["oracle_auc"].as_f64().expect("oracle auc");
        assert!(oracle > 0.75, "oracle {oracle}");
    }
    dir
}

#[test]
fn gen_train_save_resume() {
    let dir = setup();
    let d = dir.path();
    let probs = std::fs::read_to_string(d.join("train.tsv.prob")).expect("prob file");
    assert_eq!(probs.lines().count(), 6000);

    let r = ok_json(&freshet(
        d,
        &[
            "train",
            "--data",
            "train.tsv",
            "--test",
            "test.tsv",
            "--out",
            "m1",
        ],
    ));
    assert_eq!(r["model"], "wdl");
    assert_eq!(
        (r["train_rows"].as_u64(), r["test_rows"].as_u64()),
        (Some(6000), Some(1500))
    );
    assert_eq!(r["rejected_rows"].as_u64(), Some(0));
    assert_eq!(r["steps"].as_u64(), Some(47));
    assert!(r["samples_per_sec"].as_f64().unwrap() > 0.0);
    let auc1 = r["test_auc"].as_f64().expect("auc");
    let oracle = r["oracle_auc"]
        .as_f64()
        .expect("oracle beside the test data");
    assert!(auc1 > 0.55 && auc1 < oracle, "auc {auc1}, oracle {oracle}");
    assert!(r["test_calibration"].as_f64().is_some());
    assert_eq!(
        r["version"].as_u64(),
        Some(1),
        "a new store's first version"
    );
    let v1 = d.join("m1/v000000000001");
    assert!(v1.join("manifest.json").exists() && v1.join("shard-1.snapshot").exists());

    // Reserving rows up front moves allocation before the clock and changes nothing else.
    let o = freshet(
        d,
        &[
            "train",
            "--data",
            "train.tsv",
            "--test",
            "test.tsv",
            "--reserve-rows",
            "50000",
        ],
    );
    let reserved = ok_json(&o);
    assert_eq!(reserved["test_auc"].as_f64(), Some(auc1));
    assert_eq!(reserved["train_logloss"], r["train_logloss"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shards reserved their rows"), "{err}");

    // Resuming continues the step count and improves on the same data.
    let r2 = ok_json(&freshet(
        d,
        &[
            "train",
            "--data",
            "train.tsv",
            "--test",
            "test.tsv",
            "--init",
            "m1",
            "--out",
            "m2",
        ],
    ));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(d.join("m2/v000000000001/manifest.json")).unwrap())
            .unwrap();
    // 47 steps a pass, plus one: the first pass ended with part of a dense update pending
    // (the last 112 of its 6,000 rows), and the second pass's first step takes just the 16 rows
    // that complete it, so that every dense update holds a whole batch.
    assert_eq!(manifest["step"].as_u64(), Some(95));
    assert_eq!(manifest["rows_trained"].as_u64(), Some(12000));
    let auc2 = r2["test_auc"].as_f64().unwrap();
    assert!(auc2 > auc1, "a second pass should help: {auc1} -> {auc2}");

    // A model of another kind cannot resume this one.
    let o = freshet(
        d,
        &[
            "train",
            "--data",
            "train.tsv",
            "--init",
            "m1",
            "--model",
            "lr",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--model lr but the model in --init is wdl")
    );

    // A manifest edited by hand (a table's dim changed) is refused by its checksum before
    // any lookup. (`training::trainer_at` also checks the tables against the model, for a
    // sealed manifest that does not fit; its unit test is in `scorer.rs`.)
    let mpath = d.join("m2/v000000000001/manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    let mut m: Value = serde_json::from_str(&text).unwrap();
    m["tables"]["emb"]["dim"] = Value::from(5);
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let o = freshet(d, &["train", "--data", "train.tsv", "--init", "m2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("manifest.json is corrupt: checksum"),
        "{err}"
    );

    // A flipped byte in a shard file is named, and nothing trains.
    let p = d.join("m1/v000000000001/shard-0.snapshot");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let o = freshet(d, &["train", "--data", "train.tsv", "--init", "m1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("shard-0.snapshot is corrupt"),
        "{err}"
    );
}

/// An offline evaluation needs no server (`--predictions`), and a daily job started from a
/// version trains on the whole day unless it asks for a hold-out.
#[test]
fn predictions_are_written_and_an_incremental_job_holds_nothing_out() {
    let dir = setup();
    let d = dir.path();
    let r = ok_json(&freshet(
        d,
        &[
            "train",
            "--data",
            "train.tsv",
            "--test",
            "test.tsv",
            "--out",
            "m1",
            "--predictions",
            "p.txt",
        ],
    ));
    let text = std::fs::read_to_string(d.join("p.txt")).expect("predictions");
    let preds: Vec<f32> = text.lines().map(|l| l.parse().expect("a number")).collect();
    assert_eq!(preds.len(), 1500, "one line per test row");
    assert!(preds.iter().all(|p| (0.0..=1.0).contains(p)));
    let labels: Vec<f32> = std::fs::read_to_string(d.join("test.tsv"))
        .unwrap()
        .lines()
        .map(|l| l.split('\t').next().unwrap().parse().unwrap())
        .collect();
    let auc = freshet_actors::metrics::auc(&preds, &labels).unwrap();
    let reported = r["test_auc"].as_f64().unwrap();
    // The file holds the scores the report's AUC was computed from (to 6 decimals).
    assert!((auc - reported).abs() < 1e-3, "{auc} against {reported}");

    let r = ok_json(&freshet(
        d,
        &["train", "--data", "train.tsv", "--init", "m1"],
    ));
    assert_eq!(
        (r["train_rows"].as_u64(), r["test_rows"].as_u64()),
        (Some(6000), Some(0))
    );
    let r = ok_json(&freshet(
        d,
        &["train", "--data", "train.tsv", "--holdout", "0.25"],
    ));
    assert_eq!(
        (r["train_rows"].as_u64(), r["test_rows"].as_u64()),
        (Some(4500), Some(1500))
    );
    let o = freshet(d, &["train", "--data", "train.tsv", "--holdout", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--holdout"), "{err}");
}

#[test]
fn malformed_rows_are_refused_counted_and_kept() {
    let dir = setup();
    let d = dir.path();
    let mut text = std::fs::read_to_string(d.join("train.tsv")).unwrap();
    let good = text.lines().next().unwrap().to_string();
    text.push_str("1\tonly three\tcolumns\n");
    text.push_str(&good.replacen('\t', "\tNaN", 1));
    text.push('\n');
    text.push_str(&format!("7{}", &good[1..]));
    text.push('\n');
    std::fs::write(d.join("dirty.tsv"), text).unwrap();
    let r = ok_json(&freshet(
        d,
        &[
            "train",
            "--data",
            "dirty.tsv",
            "--model",
            "lr",
            "--rejects",
            "bad.tsv",
        ],
    ));
    assert_eq!(r["rejected_rows"].as_u64(), Some(3));
    assert_eq!(r["rows"].as_u64(), Some(6000));
    let rejects = std::fs::read_to_string(d.join("bad.tsv")).unwrap();
    let lines: Vec<&str> = rejects.lines().collect();
    assert_eq!(lines.len(), 3, "{rejects}");
    assert!(lines[0].starts_with("dirty.tsv:6001\texpected 40 tab-separated columns, found 3"));
    assert!(lines[1].starts_with("dirty.tsv:6002\t"), "{}", lines[1]);
    assert_eq!(r["rejects"]["by_reason"]["column_count"].as_u64(), Some(1));
    // Without --test the last 10% are held out, and no oracle is claimed for a file with
    // refused rows (rows and probabilities would not line up).
    assert_eq!(r["test_rows"].as_u64(), Some(600));
    assert!(r["oracle_auc"].is_null());
}

#[test]
fn bad_train_arguments_get_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = freshet(dir.path(), &["train", "--data", "missing.tsv"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("missing.tsv"), "{err}");
    let o = freshet(dir.path(), &["train", "--data", "x", "--model", "gbdt"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("unknown model \"gbdt\""),
        "{err}"
    );
    let o = freshet(
        dir.path(),
        &["train", "--data", "x", "--reserve-rows", "99999999999999"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("--reserve-rows 99999999999999")
            && err.contains("embedding.tables.emb.reserve_rows")
            && err.contains("rows per shard"),
        "{err}"
    );
    let o = freshet(dir.path(), &["train", "--data", "x", "--format", "parquet"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected criteo, jsonl or msgpack"));
    // --from-log: one epoch only, not with files, and an empty log says so.
    for (args, want) in [
        (
            vec!["train", "--from-log", "--epochs", "2"],
            "use --epochs 1",
        ),
        (
            vec!["train", "--from-log", "--data", "x.tsv"],
            "cannot be used with",
        ),
        (vec!["train", "--from-log"], "no samples to train on"),
        (vec!["train"], "--data <FILE>"),
    ] {
        let o = freshet(dir.path(), &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
    let o = freshet(
        dir.path(),
        &["gen", "--rows", "10", "--out", "g.tsv", "--zipf=-1"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--zipf"), "{err}");
}
