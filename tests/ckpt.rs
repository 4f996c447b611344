//! The model store through the CLI, as real processes: versions written during training,
//! `freshet ckpt ls|inspect|verify|export`, restore into another shard count, corruption, and
//! a writer killed in the middle of a version.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use common::{freshet, ok, small_model_dir};

fn run(d: &Path, args: &[&str]) -> std::process::Output {
    freshet(d).args(args).output().expect("run freshet")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn versions_during_training_list_verify_export_and_restore_resharded() {
    let dir = small_model_dir();
    let d = dir.path();
    // 2700 training rows in batches of 100: 27 steps; versions at 10 and 20, then the final.
    let r = ok(&run(
        d,
        &[
            "train",
            "--data",
            "train.tsv",
            "--out",
            "store",
            "--ckpt-every-steps",
            "10",
        ],
    ));
    assert_eq!(r["steps"].as_u64(), Some(27));
    assert_eq!(r["version"].as_u64(), Some(3));

    let o = run(d, &["ckpt", "--store", "store", "ls", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: Vec<(u64, String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["version"].as_u64().unwrap(),
                r["kind"].as_str().unwrap().to_string(),
                r["step"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "full".into(), 10),
            (2, "delta".into(), 20),
            (3, "delta".into(), 27)
        ]
    );
    assert_eq!(rows[2]["rows_trained"].as_u64(), Some(2700));
    let table = run(d, &["ckpt", "--store", "store", "ls"]);
    assert!(text(&table).contains("delta"), "{}", text(&table));

    let o = run(d, &["ckpt", "--store", "store", "inspect", "3"]);
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect prints JSON");
    assert_eq!(m["restores_from"], serde_json::json!([1, 2, 3]));
    assert_eq!(m["parent"].as_u64(), Some(2));
    assert!(m["files"]["shard-0.delta.msgpack"]["crc32c"].is_u64());
    let o = run(d, &["ckpt", "--store", "store", "inspect", "9"]);
    assert!(
        !o.status.success() && text(&o).contains("v000000000009"),
        "{}",
        text(&o)
    );

    let o = run(d, &["ckpt", "--store", "store", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("all 3 versions verified"));

    let e = ok(&run(
        d,
        &[
            "ckpt",
            "--store",
            "store",
            "export",
            "3",
            "--serving",
            "--out",
            "serving",
        ],
    ));
    assert_eq!(e["shards"].as_u64(), Some(2));
    assert!(d.join("serving/manifest.json").exists());
    let full = rows[0]["bytes"].as_u64().unwrap();
    assert!(
        e["bytes"].as_u64().unwrap() < full,
        "a serving export has no optimizer state"
    );

    // Resume from the store into 3 shards: the rows are re-routed. The same 10% hold-out as
    // the first run, so that the steps add up the same way.
    let o = freshet(d)
        .env("FRESHET__EMBEDDING__SHARDS", "3")
        .args([
            "train",
            "--data",
            "train.tsv",
            "--init",
            "store",
            "--out",
            "store3",
            "--holdout",
            "0.1",
        ])
        .output()
        .unwrap();
    let r = ok(&o);
    assert!(text(&o).contains("restored version 3"), "{}", text(&o));
    assert_eq!(r["shards"].as_u64(), Some(3));
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.join("store3/v000000000001/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["step"].as_u64(), Some(54));
    assert_eq!(m["shards"].as_u64(), Some(3));

    // A flipped byte in the middle of the chain is named, and every version on it is refused.
    let p = d.join("store/v000000000002/shard-1.delta.msgpack");
    let good = std::fs::read(&p).unwrap();
    let mut bytes = good.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&p, bytes).unwrap();
    let o = run(d, &["ckpt", "--store", "store", "verify"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("version 1: ok"), "{out}");
    assert!(out.contains("shard-1.delta.msgpack is corrupt"), "{out}");
    assert!(
        out.contains("version 3: BAD: it restores through bad version 2"),
        "{out}"
    );
    assert!(out.contains("2 of 3 versions cannot be restored"), "{out}");
    let o = run(d, &["train", "--data", "train.tsv", "--init", "store"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("shard-1.delta.msgpack is corrupt"),
        "{}",
        text(&o)
    );
    // The newest good version still trains.
    ok(&run(
        d,
        &[
            "train",
            "--data",
            "train.tsv",
            "--init",
            "store",
            "--init-version",
            "1",
        ],
    ));

    // One digit of a manifest's sample offsets changed: the version would retrain or skip
    // samples, so verify and restore refuse it by its checksum.
    std::fs::write(&p, &good).unwrap();
    let o = run(d, &["ckpt", "--store", "store", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    let mpath = d.join("store/v000000000003/manifest.json");
    let manifest = std::fs::read_to_string(&mpath).unwrap();
    let at = manifest.find("\"sample_offsets\"").unwrap();
    let digit = at + manifest[at..].find(|c: char| c.is_ascii_digit()).unwrap();
    let mut edited = manifest.clone().into_bytes();
    edited[digit] = if edited[digit] == b'9' {
        b'1'
    } else {
        edited[digit] + 1
    };
    std::fs::write(&mpath, edited).unwrap();
    let o = run(d, &["ckpt", "--store", "store", "verify"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("v000000000003/manifest.json is corrupt: checksum"),
        "{out}"
    );
    let o = run(d, &["train", "--data", "train.tsv", "--init", "store"]);
    assert!(
        !o.status.success() && text(&o).contains("checksum"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_writer_killed_mid_version_leaves_the_previous_versions_loadable() {
    let dir = small_model_dir();
    let d = dir.path();
    // The writer of version 3 stops after its first file (fault injection), as a process
    // killed at that moment would; then the process is killed for real.
    let mut child = freshet(d)
        .env("FRESHET_FAULT_CKPT_STALL", "3")
        .args([
            "train",
            "--data",
            "train.tsv",
            "--out",
            "store",
            "--ckpt-every-steps",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("stderr line");
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("stalled writing version 3") {
            break;
        }
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(seen.contains("stalled writing version 3"), "{seen}");
    let half: Vec<_> = std::fs::read_dir(d.join("store"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-3-"))
        .collect();
    assert_eq!(half.len(), 1, "the half-written version is on disk");

    let o = run(d, &["ckpt", "--store", "store", "ls", "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        2,
        "{}",
        text(&o)
    );
    let o = run(d, &["ckpt", "--store", "store", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("all 2 versions verified"));

    // The next writer of the store starts from version 2 and clears the leftover.
    let o = run(
        d,
        &[
            "train",
            "--data",
            "train.tsv",
            "--init",
            "store",
            "--out",
            "store",
        ],
    );
    let r = ok(&o);
    assert!(text(&o).contains("restored version 2"), "{}", text(&o));
    assert_eq!(r["version"].as_u64(), Some(3));
    assert!(!d.join("store").join(half[0].file_name()).exists());
}
