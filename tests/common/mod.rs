//! Helpers shared by the process-level tests (each test file includes this module).
#![allow(dead_code)] // each test binary uses its own subset

pub(crate) mod nodes;
pub(crate) mod otlp;

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

/// A running server process, killed when dropped.
pub(crate) struct Server {
    pub(crate) child: std::process::Child,
    pub(crate) addr: String,
    /// Its stderr lines, as they come.
    pub(crate) log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` (a server) and waits for its "listening on http://ADDR" line on stderr.
pub(crate) fn spawn_listening(mut cmd: Command) -> Server {
    use std::io::BufRead;
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the server");
    let mut lines = std::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (tx, log) = std::sync::mpsc::channel();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server exited before listening")
            .expect("stderr");
        if let Some(a) = line.strip_prefix("listening on http://") {
            break a.trim().to_string();
        }
        let _ = tx.send(line);
    };
    // Keep draining its log so that a full pipe never blocks the server.
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    Server { child, addr, log }
}

/// One HTTP/1.1 request; returns the status and the body.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    http_with(addr, method, path, content_type, &[], body)
}

/// [`http`] with extra header lines (`Name: value`).
pub(crate) fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let (status, _, body) = http_full(addr, method, path, content_type, headers, body);
    (status, body)
}

/// [`http_with`] that also returns the response's head (status line and headers).
pub(crate) fn http_full(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write");
    // A server may answer (413) before it reads a large body; a failed write is fine then.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&out[..text_end]).to_string();
    assert!(
        !head.to_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, head, out[text_end + 4..].to_vec())
}

/// A JSON POST; the status and the answer as JSON (`null` when it is not JSON).
pub(crate) fn post(addr: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (code, b) = http(addr, "POST", path, "application/json", body.as_bytes());
    (
        code,
        serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
    )
}

pub(crate) fn get(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = http(addr, "GET", path, "text/plain", b"");
    (
        code,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Polls `f` every 50 ms until it yields a value; fails the test, naming `what`, after `secs`.
pub(crate) fn wait<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
