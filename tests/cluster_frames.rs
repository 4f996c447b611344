//! Frames between this test process, as a node, and a real `freshet node` process: a frame
//! corrupted on the way is answered with a fault and the session keeps working, messages
//! larger than one packet cross whole, requests in flight to a node stay within the bound, and
//! a second job cannot take a shard this one placed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use freshet_actors::embedding::{EmbeddingError, TableConfig};
use freshet_actors::ids::TableName;
use freshet_actors::shard::ShardError;
use freshet_cluster::membership::{Backoff, Lease, Roles};
use freshet_cluster::node::{ClusterNode, NodeAnswer, NodeCall, NodeConfig, RemoteShard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const COOKIE: &str = "frames-test";

struct Node {
    child: Child,
    addr: String,
    log: std::sync::mpsc::Receiver<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn logged(&self, part: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while let Ok(l) = self
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if l.contains(part) {
                return true;
            }
        }
        false
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }
}

fn start_node(dir: &Path, name: &str) -> Node {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freshet"));
    c.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("FRESHET") {
            c.env_remove(k);
        }
    }
    let mut child = c
        .args([
            "--data-dir",
            &format!("data-{name}"),
            "node",
            "--name",
            name,
        ])
        .args(["--roles", "shards", "--cluster-listen", "127.0.0.1:0"])
        .env("FRESHET_CLUSTER_COOKIE", COOKIE)
        .env("FRESHET_LOG", "info")
        // The probe heartbeats rarely (see `probe`); with this lease the node never takes it
        // for down during the test.
        .env("FRESHET__CLUSTER__LEASE_MS", "120000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn freshet node");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let (tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("stdout");
    let ready: serde_json::Value = serde_json::from_str(&line)
        .unwrap_or_else(|_| panic!("node {name} did not start: {line:?}"));
    let addr = ready["cluster"]
        .as_str()
        .expect("cluster address")
        .to_owned();
    Node { child, addr, log }
}

/// This process as a node. Its own heartbeats are rare, so that the only frames it sends
/// during a test are the test's requests.
async fn probe(name: &str, max_in_flight: usize) -> ClusterNode {
    let cfg = NodeConfig {
        name: name.into(),
        roles: "trainer".parse::<Roles>().expect("roles"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        seeds: vec![],
        cookie: COOKIE.into(),
        lease: Lease::new(60_000, 120_000).expect("lease"),
        reconnect: Backoff {
            base_ms: 100,
            max_ms: 1000,
        },
        max_in_flight,
        join_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(60),
        spill_dir: None,
        tls: None,
        faults: Default::default(),
    };
    ClusterNode::start(&cfg)
        .await
        .expect("start the probe node")
}

async fn host_one_shard(probe: &ClusterNode, node: &str) -> TableName {
    let table = TableName::new("emb");
    let call = NodeCall::HostShard {
        shard: 0,
        shard_count: 1,
        epoch: 1,
        tables: vec![(table.clone(), TableConfig::with_dim(4))],
        restore: None,
    };
    let a = probe.call_node(node, call).await.expect("host");
    assert!(matches!(a, NodeAnswer::Hosted), "{a:?}");
    table
}

/// A TCP proxy to `to` that, once `armed`, flips one byte in the payload of the next Freshet
/// frame going to `to`, leaving ractor's own framing intact.
async fn corrupting_proxy(to: String, armed: Arc<AtomicBool>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&to).await.expect("connect");
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let armed = armed.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                // The last bytes seen, so that a magic split across reads is still found, and
                // how many bytes to skip to reach the payload of a frame found.
                let mut window: Vec<u8> = Vec::new();
                let mut to_payload: Option<usize> = None;
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    for b in buf[..n].iter_mut() {
                        if let Some(left) = to_payload.as_mut() {
                            if *left == 0 {
                                *b ^= 0xff;
                                to_payload = None;
                                armed.store(false, Ordering::SeqCst);
                            } else {
                                *left -= 1;
                            }
                            continue;
                        }
                        window.push(*b);
                        if window.len() > 4 {
                            window.remove(0);
                        }
                        if window == b"FRW1" && armed.load(Ordering::SeqCst) {
                            // 32 more header bytes, then the first payload byte.
                            to_payload = Some(32);
                        }
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    addr
}

/// `freshet train --join` on a few generated rows: a second job placing its shards on `node`.
fn second_job(dir: &Path, node: &str) -> std::process::Output {
    let run = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_freshet"));
        c.current_dir(dir)
            .args(["--data-dir", "data-job"])
            .args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("FRESHET") {
                c.env_remove(k);
            }
        }
        c.env("FRESHET_CLUSTER_COOKIE", COOKIE)
            .output()
            .expect("run freshet")
    };
    let gen = run(&["gen", "--rows", "500", "--out", "job.tsv"]);
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    run(&["train", "--data", "job.tsv", "--join", node])
}

/// One session through a corrupting proxy, as one test: a node is one per process (process
/// groups are global), so the phases share this process's node and its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_through_one_session_are_checked_answered_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_node(dir.path(), "frames-a");
    let armed = Arc::new(AtomicBool::new(false));
    let proxy = corrupting_proxy(node.addr.clone(), armed.clone()).await;
    // At most 2 requests in flight to one node.
    let probe = probe("probe-frames", 2).await;
    let peer = match probe.join(&proxy, Duration::from_secs(10)).await {
        Ok(p) => p,
        Err(e) => {
            let more = || node.log.recv_timeout(Duration::from_millis(200)).ok();
            let logs: Vec<String> = std::iter::from_fn(more).collect();
            panic!("join: {e}\nthe node's log:\n{}", logs.join("\n"));
        }
    };
    assert_eq!(peer, "frames-a");
    let table = host_one_shard(&probe, &peer).await;
    let shard = RemoteShard::handle(&probe, &peer, 0, 1, None)
        .await
        .expect("handle");

    let rows = shard.lookup(&table, vec![1, 2, 3]).await.expect("lookup");
    assert_eq!(rows.len(), 12);

    // The owner answers only its placement's epoch: a stand-in of another is fenced.
    let other_epoch = RemoteShard::handle(&probe, &peer, 0, 2, None)
        .await
        .expect("handle");
    let err = other_epoch
        .lookup(&table, vec![1])
        .await
        .expect_err("a request of another epoch is fenced")
        .to_string();
    assert!(
        err.contains("fenced the placement") && err.contains("at placement epoch 1"),
        "{err}"
    );

    // The model calls: a shard node offers no model store and takes no publication, and
    // says why; the probe, which offers none either, is refused the same way.
    let err = probe
        .fetch_version(&peer, 1)
        .await
        .expect_err("a shard node has no store to fetch from")
        .to_string();
    assert!(err.contains("offers no model store"), "{err}");
    let err = probe
        .newest_published(&peer)
        .await
        .expect_err("nor a publication")
        .to_string();
    assert!(err.contains("offers no model store"), "{err}");
    let notice = freshet_cluster::node::Published {
        seq: 1,
        version: 1,
        trace: Default::default(),
    };
    let a = probe
        .call_node(&peer, NodeCall::Published(notice))
        .await
        .expect("answered");
    assert!(
        matches!(&a, NodeAnswer::Refused(r) if r.contains("does not have the serving role")),
        "{a:?}"
    );

    // Another job cannot take the shard this node placed while this node is up.
    let other = second_job(dir.path(), &node.addr);
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{err}");
    assert!(
        err.contains("refused to host shard 0") && err.contains("for node probe-frames"),
        "{err}"
    );
    let rows = shard
        .lookup(&table, vec![1, 2, 3])
        .await
        .expect("still ours");
    assert_eq!(rows.len(), 12);

    // A corrupted request is answered with a fault naming the check that failed.
    let faults = probe.stats().faults_received;
    armed.store(true, Ordering::SeqCst);
    let err = shard
        .lookup(&table, vec![4, 5, 6])
        .await
        .expect_err("a corrupted request is refused");
    match &err {
        ShardError::Embedding {
            source: EmbeddingError::Remote(m),
            ..
        } => assert!(m.contains("checksum mismatch"), "{m}"),
        other => panic!("{other}"),
    }
    assert!(!armed.load(Ordering::SeqCst), "the proxy corrupted nothing");
    assert!(node.logged("a malformed packet", Duration::from_secs(5)));
    assert_eq!(probe.stats().faults_received, faults + 1);

    // The same session answers the next request.
    let rows = shard
        .lookup(&table, vec![4, 5, 6])
        .await
        .expect("lookup after");
    assert_eq!(rows.len(), 12);

    // A message of several packets each way: 2.5M keys (20 MB) out, 10M floats (40 MB) back.
    let keys: Vec<u64> = (0..2_500_000).collect();
    let rows = shard.lookup(&table, keys).await.expect("a large lookup");
    assert_eq!(rows.len(), 10_000_000);
    let c = probe.stats();
    assert!(
        c.bytes_sent > 20_000_000 && c.bytes_received > 40_000_000,
        "{c:?}"
    );

    // The node stopped for 1 s, well inside this probe's lease (120 s): slow, not down. Of 40
    // lookups sent at once, only the bound's worth go out until it resumes; all are answered
    // after.
    let before = probe.stats().requests_sent;
    node.signal("-STOP");
    let stopped = Instant::now();
    let pending: Vec<_> = (0..40u64)
        .map(|k| shard.send_lookup(&table, vec![k]).expect("send"))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = probe.stats();
    node.signal("-CONT");
    for p in pending {
        assert_eq!(p.wait().await.expect("answered after SIGCONT").len(), 4);
    }
    assert!(stopped.elapsed() >= Duration::from_secs(1));
    assert!(during.requests_sent - before <= 2, "{during:?}");
    let after = probe.stats();
    assert_eq!(after.in_flight_peak, 2, "{after:?}");
    assert_eq!(after.requests_sent - before, 40, "{after:?}");
    probe.stop();
}
