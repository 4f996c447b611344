//! Helpers shared by the process-level tests (each test file includes this module).
#![allow(dead_code)] // each test binary uses its own subset

use std::path::Path;
use std::process::{Command, Output};

use freshet_actors::stream::StreamLog;

/// `freshet` run in `dir` with data under `dir/data`, and no `FRESHET*` variable from the
/// environment of the test run.
pub(crate) fn freshet(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freshet"));
    c.current_dir(dir).args(["--data-dir", "data"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("FRESHET") {
            c.env_remove(k);
        }
    }
    c
}

/// A small W&D model in 2 shards, trained in batches of 100: fast enough for process tests.
pub(crate) const SMALL_MODEL_CONFIG: &str = r#"
[embedding]
shards = 2
[model]
hidden = [16]
[train]
batch = 100
"#;

/// A directory with [`SMALL_MODEL_CONFIG`] as its `freshet.toml` and 3000 generated rows in
/// `train.tsv` (seed 4, 500 values per field).
pub(crate) fn small_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("freshet.toml"), SMALL_MODEL_CONFIG).expect("config");
    ok(&freshet(dir.path())
        .args(["gen", "--rows", "3000", "--seed", "4", "--vocab", "500"])
        .args(["--out", "train.tsv"])
        .output()
        .expect("run"));
    dir
}

/// Asserts the run succeeded (printing its output if not) and parses its last stdout line,
/// the JSON report.
pub(crate) fn ok(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let last = o
        .stdout
        .split(|&b| b == b'\n')
        .rfind(|l| !l.is_empty())
        .expect("output");
    serde_json::from_slice(last).expect("a JSON report")
}

/// Every record of every partition, from the low watermark on.
pub(crate) fn read_all(log: &dyn StreamLog) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for p in 0..log.partitions() {
        let hw = log.high_watermark(p).unwrap();
        let mut at = log.low_watermark(p).unwrap();
        while at < hw {
            for r in log.read(p, at, 1000).unwrap() {
                at = r.offset + 1;
                out.push(r.payload);
            }
        }
    }
    out
}
