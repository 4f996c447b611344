//! What `freshet ctl` prints by default: a summary line, then aligned tables, from the same
//! JSON that `--json` prints unchanged. Pure functions of the answer (and the clock, passed in),
//! so each layout is tested without a node.
//!
//! A field the answer lacks, or holds in another shape, prints as `-`: an older or newer node
//! still gets a readable table, and nothing here fails on a node's answer.

use serde_json::Value;

/// Rows of cells under a header, each column as wide as its widest cell; columns whose every
/// cell is a number (or `-`) are right-aligned.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let number = |c: &str| c.replace(',', "").parse::<f64>().is_ok();
    let numeric: Vec<bool> = (0..cols)
        .map(|i| {
            let cells = || rows.iter().filter_map(|r| r.get(i));
            cells().any(|c| number(c)) && cells().all(|c| c == "-" || number(c))
        })
        .collect();
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            let last = i + 1 == cols;
            if numeric[i] {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                if !last {
                    l.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                l.push_str("  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        let cells: Vec<&str> = (0..cols)
            .map(|i| r.get(i).map_or("-", String::as_str))
            .collect();
        line(cells, &mut out);
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) if x.is_empty() => "-".into(),
        Value::String(x) => x.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => match n.as_u64() {
            Some(u) => thousands(u),
            None => n
                .as_f64()
                .map_or_else(|| n.to_string(), |f| format!("{f:.4}")),
        },
        other => other.to_string(),
    }
}

/// `12,345`.
pub(crate) fn thousands(n: u64) -> String {
    let d = n.to_string();
    let mut out = String::new();
    for (i, ch) in d.chars().enumerate() {
        if i > 0 && (d.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn float(v: &Value, digits: usize) -> String {
    v.as_f64()
        .filter(|f| f.is_finite())
        .map_or("-".into(), |f| format!("{f:.digits$}"))
}

/// `850 ms`, `12 s`, `5 min`, `3 h`, `2 d`.
pub(crate) fn age(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.0} s", ms as f64 / 1e3),
        60_000..3_600_000 => format!("{:.0} min", ms as f64 / 6e4),
        3_600_000..86_400_000 => format!("{:.0} h", ms as f64 / 3.6e6),
        _ => format!("{:.0} d", ms as f64 / 8.64e7),
    }
}

/// `512 MiB`, `1.5 GiB`.
pub(crate) fn bytes(v: &Value) -> String {
    let Some(b) = v.as_u64() else {
        return "-".into();
    };
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.0} MiB", b / (1024.0 * 1024.0))
    }
}

/// `GET /v1/admin/status`.
pub(crate) fn status(st: &Value) -> String {
    let children = st["children"].as_array().map_or(&[][..], Vec::as_slice);
    let running = children.iter().filter(|c| c["running"] == true).count();
    let serving: Vec<String> = (st["replicas"].as_array().into_iter().flatten())
        .map(|r| s(&r["version"]))
        .collect();
    let t = &st["trainer"];
    let v = &st["validator"];
    let mut out = format!(
        "serving version {}; trainer at step {}, lag {} samples, {} samples/s; {running} of {} children running; {}\n",
        if serving.is_empty() { "-".into() } else { serving.join(", ") },
        s(&t["step"]),
        s(&t["lag"]),
        float(&t["samples_per_sec"], 0),
        children.len(),
        if v["alert"] == true {
            format!("VALIDATION ALERT ({} failures in a row)", s(&v["consecutive_failures"]))
        } else {
            "no validation alert".into()
        },
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = children
        .iter()
        .map(|c| {
            vec![
                s(&c["name"]),
                if c["running"] == true {
                    "running"
                } else {
                    "stopped"
                }
                .into(),
                s(&c["restarts"]),
                s(&c["node"]),
                s(&c["last_failure"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &["CHILD", "STATE", "RESTARTS", "NODE", "LAST FAILURE"],
        &rows,
    ));
    out.push('\n');
    out.push_str(&table(
        &[
            "TRAINER",
            "STEP",
            "ROWS TRAINED",
            "LAG",
            "SAMPLES/S",
            "LOSS",
            "REPLAYING",
            "REJECTED",
        ],
        &[vec![
            "trainer".into(),
            s(&t["step"]),
            s(&t["rows_trained"]),
            s(&t["lag"]),
            float(&t["samples_per_sec"], 0),
            float(&t["loss"], 4),
            s(&t["replaying"]),
            s(&t["samples_rejected"]),
        ]],
    ));
    out.push('\n');
    let w = &v["serving_window"];
    out.push_str(&table(
        &[
            "VALIDATOR",
            "EVALUATED",
            "PASSED",
            "FAILED",
            "PUBLISHED",
            "WITHDRAWN",
            "LAST PASSED",
            "AUC",
            "LOGLOSS",
            "CALIBRATION",
        ],
        &[vec![
            "validator".into(),
            s(&v["evaluated"]),
            s(&v["passed"]),
            s(&v["failed"]),
            s(&v["published"]),
            s(&v["withdrawn"]),
            s(&v["last_passed"]),
            float(&w["auc"], 4),
            float(&w["logloss"], 4),
            float(&w["calibration"], 3),
        ]],
    ));
    let replicas: Vec<Vec<String>> = (st["replicas"].as_array().into_iter().flatten())
        .map(|r| {
            vec![
                s(&r["name"]),
                s(&r["version"]),
                s(&r["rows"]),
                s(&r["publishes"]),
                s(&r["full_loads"]),
                s(&r["failures"]),
                s(&r["last_error"]),
            ]
        })
        .collect();
    if !replicas.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "REPLICA",
                "VERSION",
                "ROWS",
                "PUBLISHES",
                "FULL LOADS",
                "FAILURES",
                "LAST ERROR",
            ],
            &replicas,
        ));
    }
    let joiners: Vec<Vec<String>> = (st["joiners"].as_array().into_iter().flatten())
        .map(|j| {
            let w = &j["window"];
            let late = w["late_dropped"].as_u64().unwrap_or(0)
                + w["late_impressions"].as_u64().unwrap_or(0)
                + w["corrections"].as_u64().unwrap_or(0);
            let dups = w["duplicate_impressions"].as_u64().unwrap_or(0)
                + w["duplicate_actions"].as_u64().unwrap_or(0);
            vec![
                s(&j["partition"]),
                s(&j["task"]["samples_written"]),
                s(&w["positives"]),
                s(&w["negatives"]),
                thousands(late),
                thousands(dups),
                s(&j["task"]["dead_letters_written"]),
            ]
        })
        .collect();
    if !joiners.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "JOINER",
                "JOINED",
                "POSITIVES",
                "NEGATIVES",
                "LATE",
                "DUPLICATES",
                "DEAD LETTERS",
            ],
            &joiners,
        ));
    }
    out
}

/// `GET /v1/models`: the newest `newest` versions (every one when `None`), newest first.
pub(crate) fn versions(m: &Value, newest: Option<usize>, now_ms: i64) -> String {
    let all = m["versions"].as_array().map_or(&[][..], Vec::as_slice);
    let shown: Vec<&Value> = all
        .iter()
        .rev()
        .take(newest.unwrap_or(usize::MAX))
        .collect();
    let serving = &m["serving"];
    let serving_row = all.iter().find(|v| v["serving"] == true);
    let mut out = format!(
        "{} versions kept, serving {}{}; {}\n\n",
        all.len(),
        s(serving),
        serving_row.map_or(String::new(), |v| format!(
            " ({}, {} old)",
            s(&v["kind"]),
            v["created_unix_ms"]
                .as_i64()
                .map_or("-".into(), |t| age(now_ms - t))
        )),
        if shown.len() < all.len() {
            format!("the newest {} below (--all for every one)", shown.len())
        } else {
            "all below".into()
        },
    );
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|v| {
            let val = &v["validation"];
            let verdict = match val["passed"].as_bool() {
                Some(true) => "passed".to_owned(),
                Some(false) => format!("failed: {}", s(&val["reason"])),
                None => "-".into(),
            };
            let mut marks = Vec::new();
            if v["serving"] == true {
                marks.push("serving".to_owned());
            }
            if let Some(to) = v["rolled_back"]["to"].as_u64() {
                marks.push(format!("rolled back to {to}"));
            }
            if v["calibrated_from"].is_object() {
                marks.push(format!(
                    "calibrated from {}",
                    v["calibrated_from"]["version"]
                        .as_u64()
                        .map_or("a base".into(), |b| format!("base version {b}"))
                ));
            }
            if v["replays"].as_array().is_some_and(|r| !r.is_empty()) {
                marks.push("replayed".into());
            }
            vec![
                s(&v["version"]),
                s(&v["kind"]),
                v["created_unix_ms"]
                    .as_i64()
                    .map_or("-".into(), |t| age(now_ms - t)),
                s(&v["rows_trained"]),
                float(&val["metrics"]["auc"], 4),
                if marks.is_empty() {
                    "-".into()
                } else {
                    marks.join(", ")
                },
                verdict,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "VERSION",
            "KIND",
            "AGE",
            "ROWS TRAINED",
            "AUC",
            "MARKS",
            "VERDICT",
        ],
        &rows,
    ));
    out
}

/// `GET /v1/admin/nodes`.
pub(crate) fn nodes(n: &Value) -> String {
    let nodes = n["nodes"].as_array().map_or(&[][..], Vec::as_slice);
    let up = nodes.iter().filter(|x| x["state"] == "up").count();
    let shards: usize = nodes
        .iter()
        .map(|x| x["shards"].as_array().map_or(0, Vec::len))
        .sum();
    let mut out = format!(
        "{} node{}, {up} up; {shards} shards placed\n\n",
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" }
    );
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|x| {
            let held: Vec<String> = (x["shards"].as_array().into_iter().flatten())
                .map(|sh| s(&sh["shard"]))
                .collect();
            vec![
                s(&x["node"]),
                s(&x["roles"]),
                s(&x["state"]),
                s(&x["addr"]),
                x["heard_ms_ago"]
                    .as_i64()
                    .map_or("-".into(), |ms| format!("{} ago", age(ms))),
                bytes(&x["memory_used_bytes"]),
                bytes(&x["memory_available_bytes"]),
                if held.is_empty() {
                    "-".into()
                } else {
                    held.join(",")
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "NODE",
            "ROLES",
            "STATE",
            "ADDRESS",
            "HEARD",
            "MEMORY USED",
            "AVAILABLE",
            "SHARDS",
        ],
        &rows,
    ));
    out
}

/// The answer of a command (rollback, replay, calibrate, rebalance): one line.
pub(crate) fn answer(command: &str, a: &Value) -> String {
    match command {
        "rollback" => format!(
            "rolled back to version {}; serving {}",
            s(&a["rolled_back_to"]),
            s(&a["serving"])
        ),
        "replay" => {
            let r = &a["replaying"];
            let skip = match r["skip"].as_array().map(Vec::as_slice) {
                Some([c, d]) => format!(", skipping {}..{}", s(c), s(d)),
                _ => String::new(),
            };
            format!(
                "replaying partition {} offsets {}..{}{skip}: {} samples",
                s(&r["partition"]),
                s(&r["from"]),
                s(&r["to"]),
                s(&a["samples"])
            )
        }
        _ => {
            // The fields as `key value`, by name.
            let fields = a.as_object().map_or_else(
                || s(a),
                |o| {
                    o.iter()
                        .map(|(k, v)| format!("{k} {}", s(v)))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            );
            format!("{command}: {fields}")
        }
    }
}

/// What to do about an error answer, after the node's reason.
pub(crate) fn hint(status: u16, command: &str) -> &'static str {
    match (status, command) {
        (401, _) => "give the node's admin token with --token or FRESHET_ADMIN_TOKEN",
        (404, "rollback") | (404, "calibrate") => {
            "`freshet ctl versions` lists the versions the node keeps"
        }
        (404, _) => {
            "is --url the node's HTTP address (a node without the pipeline has no admin API)?"
        }
        (409, _) => "the node's state does not allow it now; `freshet ctl status` shows that state",
        (403, _) => "give a base store under the node's node.bases_dir",
        (400, _) => "`freshet ctl <command> --help` shows the arguments",
        (503, _) => {
            "the node is not ready or stopped training; `freshet ctl status` and /healthz say why"
        }
        _ => "the node's log has the details",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_table_aligns_its_columns_and_right_aligns_numbers() {
        let t = table(
            &["NAME", "COUNT", "NOTE"],
            &[
                vec!["a".into(), "1,234".into(), "x".into()],
                vec!["longer".into(), "5".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME    COUNT  NOTE\na       1,234  x\nlonger      5  -\n"
        );
        // A short row prints `-` for its missing cells.
        assert_eq!(table(&["A", "B"], &[vec!["x".into()]]), "A  B\nx  -\n");
    }

    #[test]
    fn numbers_ages_and_sizes_read_at_a_glance() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(12_400), "12 s");
        assert_eq!(age(5 * 60_000), "5 min");
        assert_eq!(age(-5), "0 ms");
        assert_eq!(bytes(&json!(512u64 << 20)), "512 MiB");
        assert_eq!(bytes(&json!(3u64 << 29)), "1.5 GiB");
        assert_eq!(bytes(&json!("x")), "-");
    }

    #[test]
    fn versions_show_the_newest_first_with_verdicts_and_marks() {
        let now = 1_000_000;
        let m = json!({"serving": 3, "versions": [
            {"version": 1, "kind": "full", "created_unix_ms": now - 120_000, "rows_trained": 0,
             "validation": null, "rolled_back": null, "calibrated_from": null, "replays": [],
             "serving": false},
            {"version": 2, "kind": "delta", "created_unix_ms": now - 60_000, "rows_trained": 1500,
             "validation": {"passed": false, "reason": "calibration 0.2 on 900 clicks",
                            "metrics": {"auc": 0.61}},
             "rolled_back": {"to": 1, "at_unix_ms": now}, "calibrated_from": null,
             "replays": [], "serving": false},
            {"version": 3, "kind": "delta", "created_unix_ms": now - 2_000, "rows_trained": 2500,
             "validation": {"passed": true, "metrics": {"auc": 0.7}}, "rolled_back": null,
             "calibrated_from": {"version": 1}, "replays": [{}], "serving": true},
        ]});
        let out = versions(&m, Some(2), now);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "3 versions kept, serving 3 (delta, 2 s old); the newest 2 below (--all for every one)"
        );
        assert!(lines[2].starts_with("VERSION  KIND "), "{out}");
        assert!(lines[3].starts_with("      3  delta"), "{out}");
        assert!(
            lines[3].contains("serving, calibrated from base version 1, replayed")
                && lines[3].ends_with("passed"),
            "{out}"
        );
        assert!(
            lines[4].contains("1,500") && lines[4].contains("0.6100"),
            "{out}"
        );
        assert!(
            lines[4].contains("rolled back to 1")
                && lines[4].ends_with("failed: calibration 0.2 on 900 clicks"),
            "{out}"
        );
        assert_eq!(lines.len(), 5, "{out}");
        assert!(versions(&m, None, now).lines().count() == 6);
    }

    #[test]
    fn status_and_nodes_summarise_first_and_survive_a_strange_answer() {
        let st = json!({
            "children": [
                {"name": "trainer", "running": true, "restarts": 2, "last_failure": "boom", "node": null},
                {"name": "joiner-0", "running": false, "restarts": 0, "last_failure": null, "node": "n1"}],
            "trainer": {"step": 1180, "rows_trained": 3236, "lag": 12, "samples_per_sec": 284.8,
                        "loss": 0.004, "replaying": false, "samples_rejected": 0},
            "validator": {"evaluated": 2, "passed": 1, "failed": 1, "alert": true,
                          "consecutive_failures": 3, "serving_window": {"auc": 0.71}},
            "replicas": [{"name": "replica-0", "version": 53, "rows": 36750}],
            "joiners": [{"partition": 0, "window": {"positives": 806, "negatives": 10,
                          "late_dropped": 1, "duplicate_actions": 11, "duplicate_impressions": 169},
                         "task": {"samples_written": 816, "dead_letters_written": 6}}],
        });
        let out = status(&st);
        let first = out.lines().next().unwrap();
        assert_eq!(
            first,
            "serving version 53; trainer at step 1,180, lag 12 samples, 285 samples/s; 1 of 2 children running; VALIDATION ALERT (3 failures in a row)"
        );
        assert!(out.contains("joiner-0  stopped         0  n1"), "{out}");
        // A column of dashes alone is not a number column.
        assert!(out.contains("replica-0       53  36,750  -"), "{out}");
        assert!(out.contains("0.7100"), "{out}");
        // Joiners: joined, positives, negatives, late, duplicates, dead letters.
        let joiner = out.lines().last().unwrap();
        assert_eq!(
            joiner.split_whitespace().collect::<Vec<_>>(),
            ["0", "816", "806", "10", "1", "180", "6"],
            "{out}"
        );
        // Anything else: dashes, never a failure.
        for odd in [
            json!(null),
            json!([]),
            json!({"children": 3, "trainer": "x"}),
        ] {
            assert!(status(&odd).starts_with("serving version -;"), "{odd}");
            assert!(nodes(&odd).starts_with("0 nodes, 0 up"), "{odd}");
            assert!(
                versions(&odd, Some(20), 0).starts_with("0 versions kept"),
                "{odd}"
            );
        }
        let n = json!({"nodes": [
            {"node": "dev", "roles": "shards,trainer", "state": "up", "addr": "",
             "heard_ms_ago": null, "memory_used_bytes": 404127744u64,
             "memory_available_bytes": 23802077184u64,
             "shards": [{"shard": 0}, {"shard": 1}]},
            {"node": "s1", "roles": "shards", "state": "down", "addr": "127.0.0.1:7402",
             "heard_ms_ago": 3200, "shards": []}]});
        let out = nodes(&n);
        assert!(out.starts_with("2 nodes, 1 up; 2 shards placed\n"), "{out}");
        assert!(
            out.contains("385 MiB") && out.contains("22.2 GiB") && out.contains("0,1"),
            "{out}"
        );
        assert!(out.contains("3 s ago"), "{out}");
    }

    #[test]
    fn a_command_answers_in_one_line() {
        assert_eq!(
            answer("rollback", &json!({"rolled_back_to": 21, "serving": 21})),
            "rolled back to version 21; serving 21"
        );
        assert_eq!(
            answer(
                "replay",
                &json!({"replaying": {"partition": 0, "from": 0, "to": 40, "skip": [10, 20]}, "samples": 30})
            ),
            "replaying partition 0 offsets 0..40, skipping 10..20: 30 samples"
        );
        assert_eq!(
            answer("calibrate", &json!({"installed_version": 7, "base": "/b"})),
            "calibrate: base /b; installed_version 7"
        );
    }
}
