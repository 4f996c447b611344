//! The `freshet` binary, driven as a real process: subcommands, layered configuration, bad
//! input, and the embedding bench's report.

use std::process::{Command, Output};

fn freshet(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Command::new(env!("CARGO_BIN_EXE_freshet"));
    // Run in an empty directory so that no freshet.toml from the checkout leaks in.
    c.current_dir(dir.path()).args(args);
    // Nothing from the caller's environment may leak in; only what the test sets.
    for (k, _) in std::env::vars() {
        if k.starts_with("FRESHET") {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run freshet");
    drop(dir);
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_lists_the_subcommands() {
    let o = freshet(&["--help"], &[]);
    assert!(o.status.success());
    let t = text(&o);
    for sub in [
        "bench", "config", "train", "gen", "simulate", "ingest", "join",
    ] {
        assert!(t.contains(sub), "--help lacks {sub}: {t}");
    }
    let o = freshet(&["bench", "--help"], &[]);
    assert!(text(&o).contains("embedding"));
}

#[test]
fn layers_apply_in_order_defaults_file_env_flags() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(
        &f,
        "[node]\ndata_dir = \"from-file\"\n[embedding]\nshards = 8\n",
    )
    .unwrap();
    let cfg = f.to_str().unwrap();
    let json = |o: &Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", text(o));
        serde_json::from_slice(&o.stdout).expect("config prints JSON")
    };
    let v = json(&freshet(&["config"], &[]));
    assert_eq!(v["embedding"]["shards"], 4, "built-in default");
    let v = json(&freshet(&["--config", cfg, "config"], &[]));
    assert_eq!(v["embedding"]["shards"], 8, "file beats default");
    let v = json(&freshet(
        &["--config", cfg, "config"],
        &[("FRESHET__EMBEDDING__SHARDS", "16")],
    ));
    assert_eq!(v["embedding"]["shards"], 16, "env beats file");
    assert_eq!(v["node"]["data_dir"], "from-file");
    let v = json(&freshet(
        &["--config", cfg, "--data-dir", "from-flag", "config"],
        &[("FRESHET__NODE__DATA_DIR", "from-env")],
    ));
    assert_eq!(v["node"]["data_dir"], "from-flag", "flag beats env");
    let v = json(&freshet(
        &["config"],
        &[("FRESHET__EMBEDDING__TABLES__DEFAULT__DIM", "32")],
    ));
    assert_eq!(
        v["embedding"]["tables"]["default"]["dim"], 32,
        "nested keys from env"
    );
}

#[test]
fn invalid_values_are_refused_naming_key_value_and_expectation() {
    for (env, want) in [
        (
            ("FRESHET__EMBEDDING__SHARDS", "lots"),
            ["embedding.shards", "lots", "expected"],
        ),
        (
            ("FRESHET__EMBEDDING__SHARDS", "0"),
            ["embedding.shards", "0", "1..=4096"],
        ),
        (
            ("FRESHET__EMBEDDING__TABLES__DEFAULT__DIM", "0"),
            ["embedding.tables.default.dim", "0", "expected"],
        ),
        (
            ("FRESHET__CHECKPOINT__EVERY_SECS", "0.5"),
            ["checkpoint.every_secs", "0.5", "1..=86400"],
        ),
        (
            ("FRESHET__CHECKPOINT__KEEP_FULL", "0"),
            ["checkpoint.keep_full", "0", "at least 1"],
        ),
    ] {
        let o = freshet(&["config"], &[env]);
        assert!(!o.status.success(), "{env:?} accepted");
        let t = text(&o);
        for w in want {
            assert!(t.contains(w), "{env:?}: {t:?} lacks {w:?}");
        }
    }
    let o = freshet(&["--config", "/nonexistent/freshet.toml", "config"], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("nonexistent"), "{}", text(&o));
}

#[test]
fn bench_embedding_reports_every_figure_with_its_baseline() {
    let o = freshet(
        &[
            "bench",
            "embedding",
            "--keys",
            "20000",
            "--batch",
            "512",
            "--batches",
            "8",
            "--rounds",
            "1",
            "--tier-fraction",
            "0.3",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for field in [
        "table_lookup_keys_per_s",
        "table_lookup_update_keys_per_s",
        "hashmap_lookup_keys_per_s",
        "hashmap_lookup_update_keys_per_s",
        "probe_reads_per_s",
        "lookup_update_vs_hashmap",
        "lookup_vs_probe",
    ] {
        let x = v[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{field} = {x}");
    }
    let tiered = &v["tiered"];
    assert!(
        tiered["cold_rows"].as_u64().unwrap() > 0,
        "the tiered run spilled: {tiered}"
    );
    assert!(tiered["vs_all_dram"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_checkpoint_reports_every_figure_with_its_baseline() {
    let o = freshet(
        &[
            "bench",
            "checkpoint",
            "--rows",
            "20000",
            "--changed",
            "2000",
            "--shards",
            "2",
            "--rounds",
            "2",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for field in [
        "delta_vs_rows",
        "delta_write_ms",
        "full_restore_mb_per_s",
        "disk_seq_read_mb_per_s",
        "restore_vs_seq_read",
        "fresh_memory_mb_per_s",
        "recycled_memory_restore_mb_per_s",
        "recycled_memory_restore_vs_seq_read",
    ] {
        let x = v[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing: {v}"));
        assert!(x.is_finite() && x > 0.0, "{field} = {x}");
    }
    // 20k rows of 128 bytes of weights and slots need at least that much table memory.
    let table_bytes = v["restored_table_bytes"].as_u64().unwrap_or(0);
    assert!(table_bytes >= 20_000 * 128, "{v}");
    // The delta holds the changed rows and the dense state, not the table.
    assert_eq!(v["changed_rows"].as_u64(), Some(2000));
    let rows_part = v["delta_row_part_vs_rows"].as_f64().unwrap();
    assert!(rows_part > 0.9 && rows_part < 1.2, "{v}");
}

#[test]
fn bench_dense_reports_step_and_peak_from_the_same_rounds() {
    let o = freshet(
        &[
            "bench", "dense", "--model", "deepfm", "--batch", "64", "--steps", "2", "--rounds",
            "3", "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let f = |k: &str| {
        v[k].as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .unwrap_or_else(|| panic!("{k} missing or not positive: {v}"))
    };
    assert_eq!(v["rounds"].as_u64(), Some(3), "{v}");
    // Best rounds are at least the medians, and each ratio is its two figures' quotient.
    assert!(f("step_gflops_best") >= f("step_gflops"), "{v}");
    assert!(f("sgemm_best_gflops") >= f("sgemm_peak_gflops"), "{v}");
    let ratio = f("step_gflops") / f("sgemm_peak_gflops");
    assert!((f("vs_sgemm_peak") - ratio).abs() < 1e-9, "{v}");
    let ratio = f("step_gflops_best") / f("sgemm_best_gflops");
    assert!((f("vs_sgemm_best") - ratio).abs() < 1e-9, "{v}");
    let shapes = v["sgemm_shapes"].as_array().expect("sgemm_shapes");
    assert_eq!(shapes.len(), 3, "2048^3 and the first two layers: {v}");
    for s in shapes {
        let (median, best) = (s[3].as_f64().unwrap(), s[4].as_f64().unwrap());
        assert!(median > 0.0 && best >= median, "{s}");
        assert!(
            median <= f("sgemm_peak_gflops"),
            "the peak is the fastest shape: {v}"
        );
    }
}

#[test]
fn bad_bench_arguments_get_a_clear_error() {
    for args in [
        &["bench", "embedding", "--zipf", "-1"][..],
        &["bench", "embedding", "--keys", "0"],
        &["bench", "embedding", "--keys", "many"],
        &["bench", "embedding", "--tier-fraction", "1.5"],
        &["bench", "checkpoint", "--rows", "10", "--changed", "20"],
        &["bench", "checkpoint", "--rounds", "0"],
        &["bench", "dense", "--rounds", "0"],
        &["bench", "dense", "--batch", "0"],
        &["bench", "dense", "--model", "resnet"],
    ] {
        let o = freshet(args, &[]);
        assert!(!o.status.success(), "{args:?} accepted");
        assert!(text(&o).contains("error"), "{args:?}: {}", text(&o));
    }
}

/// `docs/schema.md`'s worked example loads and trains: a custom schema with a multi-valued
/// field, a field sharing another's table, a crossed field, and table sections that inherit
/// from `default`.
#[test]
fn the_schema_example_in_the_docs_trains() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
    let cfg = docs.join("newsfeed.toml");
    let data = docs.join("newsfeed-samples.jsonl");
    let (cfg, data) = (cfg.to_str().unwrap(), data.to_str().unwrap());
    let o = freshet(&["--config", cfg, "config"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fields: Vec<&str> = v["schema"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["user", "item", "tags", "region_x_category"]);
    assert_eq!(v["schema"]["dense"].as_array().unwrap().len(), 4);
    let o = freshet(
        &[
            "--config", cfg, "train", "--format", "jsonl", "--data", data,
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (r["train_rows"].as_u64(), r["test_rows"].as_u64()),
        (Some(360), Some(40))
    );
    assert_eq!(r["rejected_rows"].as_u64(), Some(0), "{stdout}");
    assert!(r["test_logloss"].as_f64().is_some_and(f64::is_finite));
}

/// `bench online --data` on the docs' schema example, each sample given a time: every row is
/// accounted for (the malformed lines refused and counted), every model scores the second
/// half, and the online run scored every impression with a served version.
#[test]
fn bench_online_replays_a_timed_stream_through_a_node() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
    let cfg = docs.join("newsfeed.toml");
    let samples = std::fs::read_to_string(docs.join("newsfeed-samples.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("timed.jsonl");
    let mut timed = String::new();
    for (i, line) in samples.lines().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        // One impression a minute from an hour's start, a click 30 s after its impression.
        v["time_ms"] = (1_699_999_200_000i64 + 60_000 * i as i64).into();
        if v["labels"]["click"] == 1 {
            v["label_delay_ms"] = 30_000.into();
        }
        timed.push_str(&format!("{v}\n"));
    }
    timed.push_str("{\"time_ms\": \"noon\", \"labels\": {\"click\": 0}}\n{\"labels\":\n");
    std::fs::write(&data, timed).unwrap();
    let data_dir = dir.path().join("node");
    let o = freshet(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data_dir.to_str().unwrap(),
            "bench",
            "online",
            "--data",
            data.to_str().unwrap(),
            "--rates",
            "20000",
            "--period-ms",
            "3600000",
            "--json",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(r["rows"], 400, "{stdout}");
    assert_eq!(r["rejected_rows"], 2, "{stdout}");
    let (history, evaluated) = (
        r["history_rows"].as_u64().unwrap(),
        r["evaluated_rows"].as_u64().unwrap(),
    );
    assert_eq!(history + evaluated, 400);
    // 400 minutes split at the hour boundary nearest the middle row (the 200th): 180 rows.
    assert_eq!(history, 180);
    assert!(r["periods_evaluated"].as_u64().unwrap() >= 3, "{stdout}");
    let periods: u64 = r["periods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(periods, evaluated);
    for key in [
        "static_auc",
        "daily_auc",
        "zero_lag_auc",
        "zero_lag_logistic_auc",
    ] {
        let a = r[key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&a), "{key}: {stdout}");
    }
    let run = &r["online"][0];
    assert!(
        run["auc"]
            .as_f64()
            .is_some_and(|a| (0.0..=1.0).contains(&a)),
        "{stdout}"
    );
    assert_eq!(run["unserved_predictions"], 0, "{stdout}");
    assert!(run["versions_served"].as_u64().unwrap() >= 1, "{stdout}");
    assert!(
        run["lag_ms_p99"].as_f64().is_some_and(|l| l >= 0.0),
        "{stdout}"
    );
    // Without --data the simulator plays; a file that is not there is an error naming it.
    let o = freshet(&["bench", "online", "--data", "/nonexistent/s.jsonl"], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("/nonexistent/s.jsonl"), "{}", text(&o));
}
