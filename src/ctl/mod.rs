//! `freshet ctl`: the admin API of a running node, from the command line.
//!
//! It prints a summary line and aligned tables (`render`), or with `--json` the node's answer
//! unchanged, for scripts. An error is one line: the command, the request, the status, the
//! node's reason and what to do.
//!
//! A plain HTTP/1.1 client over one TCP connection per command: the admin API is a handful of
//! small JSON requests on a trusted network, which does not justify an HTTP client crate.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

mod render;

#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// The node's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "FRESHET_URL")]
    url: String,
    /// Bearer token for the admin API, when the node requires one.
    #[arg(long, env = "FRESHET_ADMIN_TOKEN")]
    token: Option<String>,
    /// Seconds to wait for an answer (a rollback waits for the trainer to restore).
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Print the node's JSON answer as it came, for scripts, instead of tables.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// The supervisor's children (each with the node it runs on, in a cluster), the trainer,
    /// validator, replicas and joiners.
    Status,
    /// Every node of the cluster: roles, state, address, time since its last heartbeat, memory
    /// in use and available, and the shards it hosts.
    Nodes,
    /// The newest versions (20, or every one with --all), one line each: kind, age, rows
    /// trained, AUC, marks (serving, rolled back, calibrated, replayed) and verdict.
    Versions {
        /// How many of the newest versions to list.
        #[arg(long, default_value_t = 20)]
        newest: usize,
        /// List every version kept.
        #[arg(long, conflicts_with = "newest")]
        all: bool,
    },
    /// Serve version V at once, and retrain from it (later versions are kept, marked).
    Rollback { version: u64 },
    /// Move the shards whose node the placement would choose differently now (a shard node
    /// joined or came back): a version at the next step boundary, then those shards restored
    /// on their new nodes. Prints the moves and how long training paused.
    Rebalance,
    /// Re-consume sample-log offsets [FROM, TO) of a partition, optionally skipping C..D.
    Replay {
        #[arg(long)]
        from: u64,
        #[arg(long)]
        to: u64,
        #[arg(long, default_value_t = 0)]
        partition: u32,
        /// A sub-range `C..D` to leave out.
        #[arg(long, value_parser = parse_range)]
        skip: Option<(u64, u64)>,
    },
    /// Install a base model (a store written by `freshet train --from-log`) as the online
    /// model, resuming from its sample-log offsets.
    Calibrate {
        #[arg(long)]
        base: PathBuf,
        /// The base store's version (default: its newest).
        #[arg(long)]
        version: Option<u64>,
    },
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range C..D"))?;
    let a = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    Ok((a, b))
}

pub(crate) fn run(args: CtlArgs) -> anyhow::Result<()> {
    let (method, path, body) = match &args.command {
        CtlCommand::Status => ("GET", "/v1/admin/status", None),
        CtlCommand::Nodes => ("GET", "/v1/admin/nodes", None),
        CtlCommand::Versions { .. } => ("GET", "/v1/models", None),
        CtlCommand::Rollback { version } => (
            "POST",
            "/v1/admin/rollback",
            Some(serde_json::json!({ "version": version })),
        ),
        CtlCommand::Rebalance => ("POST", "/v1/admin/rebalance", Some(serde_json::json!({}))),
        CtlCommand::Replay {
            from,
            to,
            partition,
            skip,
        } => (
            "POST",
            "/v1/admin/replay",
            Some(serde_json::json!({"partition": partition, "from": from, "to": to, "skip": skip})),
        ),
        CtlCommand::Calibrate { base, version } => {
            // The node opens the path itself: make it absolute from here.
            let base = std::path::absolute(base)
                .with_context(|| format!("resolving {}", base.display()))?;
            (
                "POST",
                "/v1/admin/calibrate",
                Some(serde_json::json!({"base": base, "version": version})),
            )
        }
    };
    let (status, text) = request(
        &args.url,
        method,
        path,
        body.as_ref(),
        args.token.as_deref(),
        Duration::from_secs(args.timeout),
    )?;
    let name = args.command.name();
    if !(200..300).contains(&status) {
        let why = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(text);
        bail!(
            "ctl {name}: {method} {path}: HTTP {status}: {why}; {}",
            render::hint(status, name)
        )
    }
    let answer = serde_json::from_str::<serde_json::Value>(&text);
    match answer {
        Ok(a) if !args.json => {
            let now = freshet_actors::stream::now_ms();
            let shown = match &args.command {
                CtlCommand::Status => render::status(&a),
                CtlCommand::Nodes => render::nodes(&a),
                CtlCommand::Versions { newest, all } => {
                    render::versions(&a, (!all).then_some(*newest), now)
                }
                _ => render::answer(name, &a) + "\n",
            };
            print!("{shown}");
        }
        // As it came: `--json`, or an answer that is not JSON.
        _ => println!("{text}"),
    }
    Ok(())
}

impl CtlCommand {
    fn name(&self) -> &'static str {
        match self {
            CtlCommand::Status => "status",
            CtlCommand::Nodes => "nodes",
            CtlCommand::Versions { .. } => "versions",
            CtlCommand::Rollback { .. } => "rollback",
            CtlCommand::Rebalance => "rebalance",
            CtlCommand::Replay { .. } => "replay",
            CtlCommand::Calibrate { .. } => "calibrate",
        }
    }
}

/// One request; returns the status and the body.
pub(crate) fn request(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    token: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url}: only http:// addresses are supported"))?;
    let (host, prefix) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    let prefix = if prefix == "/" { String::new() } else { prefix };
    let mut stream = TcpStream::connect(host).with_context(|| {
        format!(
            "cannot reach the node at {host}: is it running, and is --url (or FRESHET_URL) its \
             HTTP address?"
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!(
        "{method} {prefix}{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the answer from {host}"))?;
    parse_response(&raw)
}

/// Status and body of an HTTP/1.1 response read to the end of the connection.
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let (status, _, body) = parse_response_full(raw)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An HTTP/1.1 response: status, headers (names in lower case) and body.
pub(crate) type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// A [`Response`] read to the end of the connection; a chunked body is put back together.
pub(crate) fn parse_response_full(raw: &[u8]) -> anyhow::Result<Response> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the answer is not HTTP: no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("the answer's headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .with_context(|| format!("a header line without a colon: {l:?}"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let mut body = raw[split + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    } else if let Some((_, n)) = headers.iter().find(|(k, _)| k == "content-length") {
        let n: usize = n.parse().with_context(|| format!("Content-Length {n:?}"))?;
        anyhow::ensure!(
            body.len() >= n,
            "the body is cut short: {} of {n} bytes",
            body.len()
        );
        body.truncate(n);
    }
    Ok((status, headers, body))
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("a chunk size line without its end")?;
        let size_text = std::str::from_utf8(&b[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        anyhow::ensure!(
            size.checked_add(2).is_some_and(|n| b.len() >= n),
            "a chunk is cut short"
        );
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_plain_and_chunked_and_garbage_is_refused() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".into()));
        let chunked =
            b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab\r\n\r\n3;x=y\r\ncde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (409, "ab\r\ncde".into()));
        for bad in [
            &b"garbage"[..],
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nab\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse_range("3..9").unwrap(), (3, 9));
        assert!(parse_range("3-9").is_err());
        assert!(parse_range("a..9").is_err());
    }
}
