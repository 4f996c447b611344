//! Nodes joined over the network, as real processes on loopback: shards on other nodes give
//! the same model, a wrong secret is refused by name, a stopped node is marked down within its
//! lease and up again when it resumes, lost shard nodes are failed over, serving nodes follow
//! the trainer node, and every flow is one trace across the nodes.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nodes::{
    copy_fixed_log, ctl, drain_and_stop, fixed_sample_log, host_of_shard_0, http_addr,
    node_with_roles, serving_command, spawn_node, trainer_status, version_placed, version_where,
    Node, COOKIE, PIPELINE_CONFIG,
};
use common::{freshet, get, ok, otlp, post, small_model_dir, wait, SMALL_MODEL_CONFIG};
use freshet_actors::ckpt::ModelStore;

/// `freshet node` in `dir` with its own data directory, on an unused loopback port.
fn node_command(dir: &Path, name: &str, cookie: &str, extra: &[&str]) -> Command {
    node_command_at(dir, name, cookie, "127.0.0.1:0", extra)
}

/// `freshet node` with its cluster port at `listen`.
fn node_command_at(dir: &Path, name: &str, cookie: &str, listen: &str, extra: &[&str]) -> Command {
    node_with_roles(dir, name, cookie, "shards", listen, extra)
}

/// Starts a node and waits for its ready line on stdout.
fn start_node(dir: &Path, name: &str, cookie: &str, extra: &[&str]) -> Node {
    spawn_node(node_command(dir, name, cookie, extra), name)
}

/// A node with the trainer role: the pipeline, its shards on the nodes at `seeds`, its HTTP
/// API on an unused loopback port.
fn coordinator_command(dir: &Path, name: &str, cookie: &str, seeds: &str) -> Command {
    let pipeline = [
        "--join",
        seeds,
        "--listen",
        "127.0.0.1:0",
        "--window-ms",
        "1000",
        "--delta-ms",
        "400",
        "--status-every",
        "1",
    ];
    let roles = "trainer,serving,joiner";
    node_with_roles(dir, name, cookie, roles, "127.0.0.1:0", &pipeline)
}

/// Every file under `dir`, by path relative to it.
fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("prefix").display().to_string();
                match std::fs::read(&p) {
                    Ok(bytes) => {
                        out.insert(rel, bytes);
                    }
                    // A temporary renamed away between the listing and the read (a manifest
                    // being rewritten): it was never one of the files compared.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel.contains(".tmp") => {}
                    Err(e) => panic!("reading {}: {e}", p.display()),
                }
            }
        }
    }
    out
}

#[test]
fn a_model_trained_with_its_shards_on_two_nodes_is_bit_identical_to_one_in_process() {
    let dir = small_model_dir();
    let d = dir.path();
    let a = start_node(d, "a", "s3cret", &[]);
    let b = start_node(d, "b", "s3cret", &[]);
    let train = ["train", "--data", "train.tsv", "--seed", "7"];
    let local = ok(&freshet(d)
        .args(train)
        .args(["--out", "local"])
        .output()
        .expect("run"));
    let joined = format!("{},{}", a.addr, b.addr);
    let remote = ok(&freshet(d)
        .args(train)
        .args(["--out", "remote", "--join", &joined])
        .env(COOKIE, "s3cret")
        .output()
        .expect("run"));
    assert_eq!(local["train_rows"], remote["train_rows"]);
    assert_eq!(local["train_logloss"], remote["train_logloss"]);
    assert_eq!(local["test_auc"], remote["test_auc"], "{local}\n{remote}");

    // Both nodes hosted shards (rendezvous over "a" and "b" places the 2 shards on both or on
    // one; either way the shards ran there, not in the trainer).
    let hosted = |n: &Node| n.wait_for(&["hosting a shard owner"], Duration::from_secs(5));
    let placed = [hosted(&a), hosted(&b)];
    assert!(placed.iter().any(Option::is_some), "no node hosted a shard");
    // The trainer said it leaves when it finished: neither node takes it for lost.
    for n in [&a, &b] {
        n.wait_for(&["node left", "node=train-"], Duration::from_secs(5))
            .expect("the trainer's leave is heard");
    }

    let (l, r) = (files(&d.join("local")), files(&d.join("remote")));
    assert_eq!(
        l.keys().collect::<Vec<_>>(),
        r.keys().collect::<Vec<_>>(),
        "the two stores hold different files"
    );
    let mut versions = 0;
    for (path, bytes) in &l {
        if path.ends_with("manifest.json") {
            // The manifests differ in their creation time and the placement; the model they
            // describe must not.
            let m =
                |b: &[u8]| -> serde_json::Value { serde_json::from_slice(b).expect("manifest") };
            let (lm, rm) = (m(bytes), m(&r[path]));
            for key in [
                "step",
                "rows_trained",
                "shards",
                "tables",
                "model",
                "schema",
            ] {
                assert_eq!(lm[key], rm[key], "{path}: {key}");
            }
            // The remote version says where its shards ran.
            assert!(lm.get("placement").is_none(), "{lm}");
            assert_eq!(rm["placement"]["epoch"], 1, "{rm}");
            let nodes = rm["placement"]["nodes"].as_array().expect("nodes");
            assert_eq!(nodes.len(), 2);
            assert!(nodes.iter().all(|n| n == "a" || n == "b"), "{rm}");
            versions += 1;
        } else if path.ends_with("dense.msgpack") {
            assert!(bytes == &r[path], "{path} differs between the two runs");
        }
    }
    assert!(versions >= 1);
    // A shard file lists its rows in the order of the table's hash index, whose seed is
    // random per process, and stamps each row's last update in wall-clock seconds; so two
    // runs in one process differ in those bytes too. Every row's bits must be the same.
    let (ls, rs) = (
        ModelStore::open(d.join("local")).expect("store"),
        ModelStore::open(d.join("remote")).expect("store"),
    );
    for v in ls.versions().expect("versions") {
        let (a, b) = (
            ls.restore(v, None).expect("local"),
            rs.restore(v, None).expect("remote"),
        );
        assert_eq!(
            rows_by_key(&a.shards),
            rows_by_key(&b.shards),
            "version {v}"
        );
        assert!(!rows_by_key(&a.shards).is_empty());
    }
}

/// Every row of every table: (table, key) -> its weights and optimizer state as bits, and its
/// version, update and access steps and frequency.
type Row = (Vec<u32>, u64, u32, u32, u32);

fn rows_by_key(
    shards: &[freshet_actors::embedding::ShardSnapshot],
) -> std::collections::BTreeMap<(String, u64), Row> {
    let mut out = std::collections::BTreeMap::new();
    for s in shards {
        for t in &s.tables {
            let rf = t.row_floats as usize;
            let b = &t.rows;
            for i in 0..b.keys.len() {
                let bits = b.row(i, rf).iter().map(|f| f.to_bits()).collect();
                let row = (
                    bits,
                    b.versions[i],
                    b.update_steps[i],
                    b.access_steps[i],
                    b.freqs[i],
                );
                out.insert((t.name.to_string(), b.keys[i]), row);
            }
        }
    }
    out
}

#[test]
fn a_node_with_a_wrong_cookie_is_refused_and_exits_naming_the_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let seed = start_node(d, "seed", "right", &[]);
    let started = Instant::now();
    let out = node_command(d, "intruder", "wrong", &["--join", &seed.addr])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "joined with a wrong cookie: {stderr}"
    );
    assert!(
        stderr.contains(&format!("seed {} refused authentication", seed.addr)),
        "{stderr}"
    );
    // It neither hangs nor retries until the join timeout.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // The seed logs the refused peer's address: 127.0.0.1 and a port.
    let line = seed
        .wait_for(
            &["refused a node that did not authenticate"],
            Duration::from_secs(5),
        )
        .expect("the seed logs the refusal");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");

    // No secret at all is refused before anything starts.
    let mut c = node_command(d, "nosecret", "", &[]);
    c.env_remove(COOKIE);
    let out = c.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--cookie-file") && stderr.contains(COOKIE),
        "{stderr}"
    );
}

#[test]
fn a_stopped_node_is_marked_down_within_its_lease_and_up_again_when_it_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // interval 200 ms, lease 1000 ms: down within 1.2 s of the last heartbeat.
    std::fs::write(
        d.join("freshet.toml"),
        "[cluster]\nheartbeat_ms = 200\nlease_ms = 1000\n",
    )
    .expect("config");
    let a = start_node(d, "a", "k", &[]);
    let b = start_node(d, "b", "k", &["--join", &a.addr]);
    a.wait_for(&["node joined", "node=b"], Duration::from_secs(5))
        .expect("a hears b");

    b.signal("-STOP");
    let stopped = Instant::now();
    let down = a.wait_for(&["node down", "node=b"], Duration::from_secs(5));
    let took = stopped.elapsed();
    b.signal("-CONT");
    assert!(down.is_some(), "b was never marked down");
    // Lease plus one interval, and a margin for two processes on a loaded machine.
    assert!(
        took <= Duration::from_millis(1200 + 800),
        "marked down after {took:?}"
    );
    // Not before the lease: the last heartbeat came at most one interval (and some jitter)
    // before the stop.
    assert!(
        took >= Duration::from_millis(500),
        "marked down after {took:?}, before its lease"
    );

    a.wait_for(&["node up", "node=b"], Duration::from_secs(5))
        .expect("b is up again after SIGCONT");
}

#[test]
fn a_shard_node_killed_mid_training_fails_the_trainer_fast_naming_the_shard() {
    let dir = small_model_dir();
    let d = dir.path();
    ok(&freshet(d)
        .args(["gen", "--rows", "100000", "--seed", "5", "--vocab", "5000"])
        .args(["--out", "big.tsv"])
        .output()
        .expect("run"));
    let a = start_node(d, "a", "k", &[]);
    let b = start_node(d, "b", "k", &[]);
    let mut train = freshet(d)
        .args(["train", "--data", "big.tsv", "--epochs", "20"])
        .args(["--join", &format!("{},{}", a.addr, b.addr)])
        .env(COOKIE, "k")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn train");
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = BufReader::new(train.stderr.take().expect("stderr"));
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(train.wait().expect("wait"));
    });
    // Training is under way once the trainer says so.
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.starts_with("training ")) {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("training never started:\n{}", log.join("\n")));
        log.push(line);
    }
    // Kill a node that hosts a shard.
    let hosts = |n: &Node| n.wait_for(&["hosting a shard owner"], Duration::from_secs(1));
    let (victim, name) = if hosts(&a).is_some() {
        (a, "a")
    } else {
        (b, "b")
    };
    let killed = Instant::now();
    drop(victim);
    let status = done
        .recv_timeout(Duration::from_secs(10))
        .expect("the trainer still runs 10 s after its shard node died");
    log.extend(std::iter::from_fn(|| {
        lines.recv_timeout(Duration::from_secs(1)).ok()
    }));
    let log = log.join("\n");
    assert!(!status.success(), "{log}");
    // Found by the closed session, not by the lease running out (3 s).
    assert!(
        log.contains("unavailable") && log.contains(&format!("node {name} lost its session")),
        "{log}"
    );
    eprintln!(
        "failed {:?} after the kill: {}",
        killed.elapsed(),
        log.lines().last().unwrap_or("")
    );
}

/// A CA named `ca` and, for each node, a certificate for 127.0.0.1 that it signed (usable as
/// server and as client), as PEM files `<ca>.pem`, `<node>.crt` and `<node>.key` in `dir`.
fn certificates(dir: &Path, ca: &str, nodes: &[&str]) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{ca} cluster CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    std::fs::write(dir.join(format!("{ca}.pem")), ca_cert.pem()).expect("write");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    for n in nodes {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        p.distinguished_name.push(DnType::CommonName, *n);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).expect("sign");
        std::fs::write(dir.join(format!("{n}.crt")), cert.pem()).expect("write");
        std::fs::write(dir.join(format!("{n}.key")), key.serialize_pem()).expect("write");
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn tls_flags(node: &str, ca: &str) -> [String; 6] {
    [
        "--tls-cert".into(),
        format!("{node}.crt"),
        "--tls-key".into(),
        format!("{node}.key"),
        "--tls-ca".into(),
        format!("{ca}.pem"),
    ]
}

#[test]
fn a_tls_cluster_takes_only_tls_nodes_its_ca_signed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    certificates(d, "ours", &["seed", "friend", "plain-tls"]);
    certificates(d, "theirs", &["stranger"]);
    let flags = |n: &str, ca: &str| tls_flags(n, ca).to_vec();
    let seed = start_node(d, "seed", "k", &strs(&flags("seed", "ours")));

    // A node of the same CA joins.
    let mut f = flags("friend", "ours");
    f.extend(["--join".into(), seed.addr.clone()]);
    let _friend = start_node(d, "friend", "k", &strs(&f));
    seed.wait_for(&["node joined", "node=friend"], Duration::from_secs(5))
        .expect("the seed hears its TLS peer");

    // A plaintext node is refused, naming the seed and TLS as a cause.
    let out = node_command(d, "plain", "k", &["--join", &seed.addr])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a plaintext node joined a TLS cluster: {err}"
    );
    assert!(
        err.contains(&format!("seed {} refused authentication", seed.addr)) && err.contains("TLS"),
        "{err}"
    );

    // A node whose certificate another CA signed fails the handshake.
    let mut f = flags("stranger", "theirs");
    f.extend(["--join".into(), seed.addr.clone()]);
    let out = node_command(d, "stranger", "k", &strs(&f))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("TLS handshake with seed"), "{err}");

    // A TLS node cannot join a plaintext seed either.
    let plain_seed = start_node(d, "plain-seed", "k", &[]);
    let mut f = flags("plain-tls", "ours");
    f.extend(["--join".into(), plain_seed.addr.clone()]);
    let out = node_command(d, "plain-tls", "k", &strs(&f))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("TLS handshake with seed"), "{err}");

    // Only some of the three files is a start-up mistake.
    let out = node_command(d, "half", "k", &["--tls-cert", "seed.crt"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("all three"), "{err}");
}

#[test]
fn a_killed_node_started_again_at_its_address_is_dialled_and_up_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(
        d.join("freshet.toml"),
        "[cluster]\nheartbeat_ms = 200\nlease_ms = 1000\nreconnect_base_ms = 100\nreconnect_max_ms = 400\n",
    )
    .expect("config");
    let a = start_node(d, "a", "k", &[]);
    let b = start_node(d, "b", "k", &["--join", &a.addr]);
    a.wait_for(&["node joined", "node=b"], Duration::from_secs(5))
        .expect("a hears b");
    let at = b.addr.clone();
    drop(b);
    a.wait_for(&["session lost", "node=b"], Duration::from_secs(5))
        .expect("a sees the session close");
    a.wait_for(&["node down", "node=b"], Duration::from_secs(5))
        .expect("b is marked down");
    // b comes back at its address without joining anyone: a dials it.
    let _b = spawn_node(node_command_at(d, "b", "k", &at, &[]), "b");
    a.wait_for(&["node up", "node=b"], Duration::from_secs(10))
        .expect("a reconnects to b and hears it again");
}

/// A directory with the pipeline's config, and two shard nodes `a` and `b` with secret `k`;
/// their addresses as `--join` takes them.
fn two_shard_nodes() -> (tempfile::TempDir, Node, Node, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!("{SMALL_MODEL_CONFIG}{PIPELINE_CONFIG}");
    std::fs::write(dir.path().join("freshet.toml"), config).expect("config");
    let a = start_node(dir.path(), "a", "k", &[]);
    let b = start_node(dir.path(), "b", "k", &[]);
    let seeds = format!("{},{}", a.addr, b.addr);
    (dir, a, b, seeds)
}

#[test]
fn a_trainer_node_trains_online_on_two_shard_nodes_and_accounts_each_sample_once_across_a_kill_9() {
    let (dir, a, b, seeds) = two_shard_nodes();
    let d = dir.path();
    let store = d.join("data-c/models");
    let c = spawn_node(coordinator_command(d, "c", "k", &seeds), "c");
    let http = http_addr(&c);

    // `ctl nodes`: all three, up, with their memory, and the two shards on the shard nodes.
    let nodes = wait(30, "both shards hosted in ctl nodes", || {
        let v = ctl(d, &http, &["nodes"]);
        let rows = v["nodes"].as_array()?.clone();
        let hosted: usize = rows
            .iter()
            .map(|r| r["shards"].as_array().map_or(0, Vec::len))
            .sum();
        (rows.len() == 3 && hosted == 2).then_some(rows)
    });
    let mut host_of = std::collections::BTreeMap::new();
    for r in &nodes {
        let name = r["node"].as_str().expect("name");
        assert_eq!(r["state"], "up", "{r}");
        assert!(r["memory_used_bytes"].as_u64() > Some(0), "{r}");
        assert!(r["memory_available_bytes"].as_u64() > Some(0), "{r}");
        let roles = if name == "c" {
            "trainer,serving,joiner"
        } else {
            "shards"
        };
        assert_eq!(r["roles"], roles, "{r}");
        assert_eq!(r["session"], true, "{r}");
        if name != "c" {
            assert!(r["heard_ms_ago"].as_u64() < Some(3000), "{r}");
        }
        for s in r["shards"].as_array().expect("shards") {
            assert_eq!(s["placed_by"], "c", "{r}");
            host_of.insert(format!("shard-{}", s["shard"]), name.to_owned());
        }
    }
    // `ctl status`: each shard child on the node that hosts it, the rest on the trainer node.
    let status = ctl(d, &http, &["status"]);
    for child in status["children"].as_array().expect("children") {
        let name = child["name"].as_str().expect("name");
        let on = host_of.get(name).map_or("c", String::as_str);
        assert_eq!(child["node"], on, "{status}");
    }

    // Versions come, each recording where its shards were.
    let first = wait(60, "a version with 500 samples trained", || {
        let s = ModelStore::open(&store).ok()?;
        let v = s.latest().ok()??;
        let m = s.manifest(v).ok()?;
        (m.rows_trained >= 500).then_some((v, m))
    });
    let placement = first.1.placement.clone().expect("the placement");
    for (i, node) in placement.nodes.iter().enumerate() {
        assert_eq!(Some(node), host_of.get(&format!("shard-{i}")));
    }

    // The trainer node dies at once; started again it resumes from its newest version and
    // places the shards again on the same nodes.
    drop(c);
    let hosts: Vec<&Node> = [("a", &a), ("b", &b)]
        .into_iter()
        .filter(|(name, _)| placement.nodes.iter().any(|n| n == name))
        .map(|(_, n)| n)
        .collect();
    for n in &hosts {
        while n.log.try_recv().is_ok() {}
    }
    let c = spawn_node(coordinator_command(d, "c", "k", &seeds), "c");
    let resumed = c
        .wait_for(&["resuming from version"], Duration::from_secs(60))
        .expect("the resume line");
    let from: u64 = resumed
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("version");
    assert!(from >= first.0, "{resumed}");
    // Each of the placement's nodes hosts its shards again: new owners, restored by the trainer.
    for n in &hosts {
        n.wait_for(&["hosting a shard owner"], Duration::from_secs(30))
            .expect("the shards hosted again");
    }
    let base = ModelStore::open(&store)
        .expect("store")
        .manifest(from)
        .expect("m");
    let next = wait(60, "a version trained past the resumed one", || {
        let s = ModelStore::open(&store).ok()?;
        let v = s.latest().ok()??;
        let m = s.manifest(v).ok()?;
        (v > from && m.rows_trained > base.rows_trained).then_some(m)
    });
    // It descends from the resumed version: its step goes on from there.
    assert!(next.step > base.step, "{} after {}", next.step, base.step);

    // A clean stop writes a last version and releases the shards.
    let mut c = c;
    c.interrupt();
    let mut line = String::new();
    c.stdout.read_line(&mut line).expect("stdout");
    let report: serde_json::Value = serde_json::from_str(&line).expect("the final report");
    let s = ModelStore::open(&store).expect("store");
    let last = s.latest().expect("latest").expect("a version");
    assert_eq!(report["last_version"], last, "{report}");
    let m = s.manifest(last).expect("manifest");
    let consumed: u64 = m.sample_offsets.values().sum();
    assert!(m.replays.is_empty());
    assert_eq!(m.rows_trained + m.samples_rejected, consumed, "{m:?}");
    assert!(
        consumed <= report["samples"].as_u64().expect("samples"),
        "{report}"
    );
    // The same nodes, placed anew by the restarted node: one epoch on.
    let again = m.placement.as_ref().expect("the placement");
    assert_eq!(again.nodes, placement.nodes);
    assert_eq!(again.epoch, placement.epoch + 1);
    for n in hosts {
        n.wait_for(
            &["released the shard owners", "node=c"],
            Duration::from_secs(10),
        )
        .expect("the shard owners released");
    }
}

#[test]
fn a_trainer_node_whose_only_shard_node_dies_stops_training_and_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let config = format!("{SMALL_MODEL_CONFIG}{PIPELINE_CONFIG}");
    std::fs::write(d.join("freshet.toml"), config).expect("config");
    let a = start_node(d, "a", "k", &[]);
    let mut cmd = coordinator_command(d, "c", "k", &a.addr);
    // Two restarts, then the supervisor gives up: seconds, not a minute.
    cmd.env("FRESHET__SUPERVISOR__MAX_RESTARTS", "2");
    let c = spawn_node(cmd, "c");
    let http = http_addr(&c);
    let serving = wait(60, "a version served", || {
        let (_, h) = get(&http, "/healthz");
        h["serving"].as_u64()
    });
    drop(a);
    // The failover finds no shard node to place on, and the restarts run out.
    c.wait_for(
        &["failing over", "node a lost its session"],
        Duration::from_secs(30),
    )
    .expect("the failover's start");
    let why = wait(90, "/healthz saying training stopped", || {
        let (code, h) = get(&http, "/healthz");
        (code == 503).then(|| h["error"].as_str().unwrap_or_default().to_owned())
    });
    assert!(why.contains("stopped training for good"), "{why}");
    assert!(
        why.contains("no node with the shards role is up") || why.contains("node a"),
        "{why}"
    );
    // Predictions go on from the last version served.
    let (_, h) = get(&http, "/healthz");
    assert!(h["serving"].as_u64() >= Some(serving), "{h}");
    // Its session closed at once; its lease (3 s) ran out after.
    let nodes = ctl(d, &http, &["nodes"]);
    let row = (nodes["nodes"].as_array().expect("rows").iter())
        .find(|r| r["node"] == "a")
        .cloned()
        .expect("the lost node's row");
    assert_eq!(row["session"], false, "{row}");
    assert_eq!(row["state"], "down", "{row}");
}

/// A trainer node `name` that trains on a copy of the fixed sample log only (no simulator,
/// no new event: its joiners start from the copied checkpoints, caught up), its shards on the
/// nodes at `seeds`.
fn coordinator_on_fixed_log(d: &Path, name: &str, seeds: &str) -> Node {
    copy_fixed_log(d, name);
    let mut cmd = coordinator_command(d, name, "k", seeds);
    cmd.arg("--no-simulate");
    spawn_node(cmd, name)
}

#[test]
fn a_shard_node_killed_mid_run_is_failed_over_and_the_model_is_bit_identical_to_a_run_without_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let samples = fixed_sample_log(d, 120_000);
    assert!(samples > 60_000, "{samples}");
    let a = start_node(d, "a", "k", &[]);
    let b = start_node(d, "b", "k", &[]);
    let seeds = format!("{},{}", a.addr, b.addr);

    // The run without a failure: three node processes, the log drained.
    let c = coordinator_on_fixed_log(d, "ref", &seeds);
    let reference = drain_and_stop(c, &d.join("data-ref/models"), samples);

    // The same log, the node of shard 0 killed once a version holds part of it.
    let c = coordinator_on_fixed_log(d, "c", &seeds);
    let http = http_addr(&c);
    let store = d.join("data-c/models");
    let lost = host_of_shard_0(d, &http);
    let first = version_where(&store, 60, "a version with part of the log", |m| {
        m.rows_trained >= 1000
    });
    let consumed_then: u64 = first.sample_offsets.values().sum();
    assert!(
        consumed_then < samples,
        "the log was drained before the kill: make it longer"
    );
    let (victim, survivor) = if lost == "a" { (a, "b") } else { (b, "a") };
    let killed = Instant::now();
    drop(victim);
    // Training resumes: a new trainer, restored from a version, has trained a step.
    wait(60, "the trainer resumed after the failover", || {
        let t = trainer_status(&http)?;
        (t["started_from"].is_u64() && t["steps"].as_u64() > Some(0)).then_some(())
    });
    let resumed_ms = killed.elapsed().as_millis();
    let line = c
        .wait_for(&["failed over", "elapsed_ms="], Duration::from_secs(10))
        .expect("the failover's report");
    eprintln!("kill -9 of a shard node to training resumed: {resumed_ms} ms ({line})");
    assert!(resumed_ms < 20_000, "{resumed_ms} ms");
    let failed_over = drain_and_stop(c, &store, samples);

    // Every sample once along the lineage, and the model of the run without the kill.
    let (m, r) = (&failed_over.manifest, &reference.manifest);
    assert_eq!(m.rows_trained + m.samples_rejected, samples, "{m:?}");
    assert_eq!(
        (
            m.step,
            m.rows_trained,
            m.samples_rejected,
            &m.sample_offsets
        ),
        (
            r.step,
            r.rows_trained,
            r.samples_rejected,
            &r.sample_offsets
        )
    );
    let placement = m.placement.as_ref().expect("the placement");
    assert!(
        placement.nodes.iter().all(|n| n == survivor),
        "{placement:?}"
    );
    assert!(placement.epoch > first.placement.as_ref().expect("placed").epoch);
    assert!(
        failed_over.dense == reference.dense,
        "the dense nets differ"
    );
    let rows = rows_by_key(&failed_over.shards);
    assert!(!rows.is_empty());
    assert!(
        rows == rows_by_key(&reference.shards),
        "the embedding rows differ"
    );
}

#[test]
fn a_shard_node_stopped_past_its_lease_is_failed_over_and_fences_its_late_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let samples = fixed_sample_log(d, 120_000);
    let a = start_node(d, "a", "k", &[]);
    let b = start_node(d, "b", "k", &[]);
    let seeds = format!("{},{}", a.addr, b.addr);
    let c = coordinator_on_fixed_log(d, "c", &seeds);
    let http = http_addr(&c);
    let store = d.join("data-c/models");
    let lost = host_of_shard_0(d, &http);
    let first = version_where(&store, 60, "a version with part of the log", |m| {
        m.rows_trained >= 1000
    });
    let (stopped, survivor) = if lost == "a" { (&a, "b") } else { (&b, "a") };
    stopped.signal("-STOP");
    let stopped_at = Instant::now();
    // Its session stays open: only the lease finds it.
    c.wait_for(
        &["failing over", &format!("node {lost} is down")],
        Duration::from_secs(15),
    )
    .expect("the failover once the lease ran out");
    let line = c
        .wait_for(&["failed over"], Duration::from_secs(30))
        .expect("the failover's end");
    eprintln!(
        "SIGSTOP of a shard node to its shards failed over: {} ms ({line})",
        stopped_at.elapsed().as_millis()
    );
    // Training goes on with every shard on the survivor, at a new epoch.
    let after = wait(60, "a version trained on the survivor", || {
        let s = ModelStore::open(&store).ok()?;
        let m = s.manifest(s.latest().ok()??).ok()?;
        let p = m.placement.clone()?;
        (p.epoch > first.placement.as_ref()?.epoch && m.rows_trained > first.rows_trained)
            .then_some(p)
    });
    assert!(after.nodes.iter().all(|n| n == survivor), "{after:?}");

    // Resumed, the node finds it stalled before it reads what was queued for it: it fences
    // the owners of the old placement, and refuses whatever request was still queued for
    // them (there is one only if the node stopped before it read the trainer's last).
    while stopped.log.try_recv().is_ok() {}
    stopped.signal("-CONT");
    let mut seen = Vec::new();
    let settle = Instant::now() + Duration::from_secs(3);
    while let Ok(l) = stopped
        .log
        .recv_timeout(settle.saturating_duration_since(Instant::now()))
    {
        seen.push(l);
    }
    let at = |part: &str| seen.iter().position(|l| l.contains(part));
    let stall = at("did not run for longer than its lease").expect("the stall found");
    let fenced = at("fenced the shard owners").expect("the owners fenced");
    assert!(stall < fenced, "{seen:#?}");
    let refused: Vec<usize> = (0..seen.len())
        .filter(|&i| seen[i].contains("refused a request of a stale placement"))
        .collect();
    assert!(refused.iter().all(|&i| i > fenced), "{seen:#?}");
    assert!(
        !seen.iter().any(|l| l.contains("hosting a shard owner")),
        "{seen:#?}"
    );
    eprintln!("late requests refused after the stall: {}", refused.len());
    // It is up again and hosts nothing; the trainer does not use it.
    wait(15, "the resumed node up with no shard", || {
        let nodes = ctl(d, &http, &["nodes"]);
        let row = (nodes["nodes"].as_array()?.iter()).find(|r| r["node"] == lost.as_str())?;
        (row["state"] == "up" && row["shards"].as_array().is_some_and(Vec::is_empty)).then_some(())
    });
    let end = drain_and_stop(c, &store, samples);
    let m = &end.manifest;
    assert_eq!(m.rows_trained + m.samples_rejected, samples, "{m:?}");
    let p = m.placement.as_ref().expect("the placement");
    assert!(p.nodes.iter().all(|n| n == survivor), "{p:?}");
}

#[test]
fn a_shard_node_that_joins_takes_its_shards_at_a_step_boundary_and_ctl_rebalance_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let samples = fixed_sample_log(d, 120_000);
    let a = start_node(d, "a", "k", &[]);
    copy_fixed_log(d, "c");
    let mut cmd = coordinator_command(d, "c", "k", &a.addr);
    cmd.arg("--no-simulate")
        .env("FRESHET__EMBEDDING__SHARDS", "8");
    let c = spawn_node(cmd, "c");
    let http = http_addr(&c);
    let store = d.join("data-c/models");
    let first = version_placed(&store, 60, "a version on node a", |p| {
        p.nodes.iter().all(|n| n == "a")
    });
    assert!(
        first.sample_offsets.values().sum::<u64>() < samples,
        "drained too soon"
    );

    // Node b joins through the trainer node: the shards rendezvous now gives b move to it.
    let b = start_node(d, "b", "k", &["--join", &c.addr]);
    let line = c
        .wait_for(&["rebalanced", "pause_ms="], Duration::from_secs(30))
        .expect("the rebalance after the join");
    eprintln!("a shard node joined, the shards rebalanced: {line}");
    let pause: u64 = line
        .split("pause_ms=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("pause_ms");
    assert!(pause < 10_000, "{line}");
    let after = version_placed(&store, 60, "a version with shards on b", |p| {
        p.nodes.iter().any(|n| n == "b")
    });
    let p = after.placement.as_ref().expect("placed");
    assert!(p.epoch > first.placement.as_ref().expect("placed").epoch);
    assert!(p.nodes.iter().any(|n| n == "a"), "{p:?}");
    assert_eq!(p.nodes.len(), 8);
    // b hosts what the placement says, a the rest.
    let nodes = ctl(d, &http, &["nodes"]);
    for r in nodes["nodes"].as_array().expect("rows") {
        let name = r["node"].as_str().expect("name");
        let hosted: Vec<u64> = (r["shards"].as_array().expect("shards").iter())
            .filter_map(|s| s["shard"].as_u64())
            .collect();
        let placed: Vec<u64> = (0..8u64).filter(|&i| p.nodes[i as usize] == name).collect();
        if name != "c" {
            assert_eq!(hosted, placed, "{r}");
        }
    }
    // Nothing left to move: `ctl rebalance` says so and pauses nothing.
    let again = ctl(d, &http, &["rebalance"]);
    assert_eq!(again["moved"], serde_json::json!([]), "{again}");
    assert_eq!(again["pause_ms"], 0, "{again}");
    assert_eq!(again["epoch"], p.epoch, "{again}");

    let end = drain_and_stop(c, &store, samples);
    let m = &end.manifest;
    assert_eq!(m.rows_trained + m.samples_rejected, samples, "{m:?}");
    drop((a, b));
}

#[test]
fn a_version_of_4_shards_on_2_nodes_is_restored_as_8_shards_on_3_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let samples = fixed_sample_log(d, 120_000);
    // A third node that rendezvous gives shards of 8 (a placement depends on the names only).
    let third = (b'e'..=b'z')
        .map(|c| (c as char).to_string())
        .find(|n| {
            let nodes = vec!["a".to_owned(), "b".to_owned(), n.clone()];
            let p = freshet_cluster::placement::Placement::new(nodes, 8, 1).expect("placement");
            !p.shards_of(n).is_empty()
                && !p.shards_of("a").is_empty()
                && !p.shards_of("b").is_empty()
        })
        .expect("a name");
    let a = start_node(d, "a", "k", &[]);
    let b = start_node(d, "b", "k", &[]);
    let e = start_node(d, &third, "k", &[]);
    copy_fixed_log(d, "c");
    let store = d.join("data-c/models");
    let start = |seeds: String, shards: &str| {
        let mut cmd = coordinator_command(d, "c", "k", &seeds);
        cmd.arg("--no-simulate")
            .env("FRESHET__EMBEDDING__SHARDS", shards);
        spawn_node(cmd, "c")
    };
    let c = start(format!("{},{}", a.addr, b.addr), "4");
    version_placed(&store, 60, "a version of 4 shards", |p| p.nodes.len() == 4);
    let mut c = c;
    c.interrupt();
    let s = ModelStore::open(&store).expect("store");
    let old_v = s.latest().expect("latest").expect("v");
    let old = s.manifest(old_v).expect("m");
    assert_eq!(old.shards, 4);
    assert!(
        old.sample_offsets.values().sum::<u64>() < samples,
        "drained too soon"
    );

    let c = start(format!("{},{},{}", a.addr, b.addr, e.addr), "8");
    c.wait_for(&["resuming from version"], Duration::from_secs(60))
        .expect("the resume");
    let new = version_placed(&store, 60, "a version of 8 shards", |p| p.nodes.len() == 8);
    assert_eq!(new.shards, 8);
    assert!(new.step > old.step && new.rows_trained > old.rows_trained);
    let p = new.placement.as_ref().expect("placed");
    let used: std::collections::BTreeSet<&str> = p.nodes.iter().map(String::as_str).collect();
    assert_eq!(
        used,
        ["a", "b", third.as_str()].into_iter().collect(),
        "{p:?}"
    );
    // The 4-shard version's rows are all there, each now in the shard its key maps to.
    let (before, after) = (
        s.restore(old_v, None).expect("restore"),
        s.restore(s.latest().expect("l").expect("v"), None)
            .expect("restore"),
    );
    let (rb, ra) = (rows_by_key(&before.shards), rows_by_key(&after.shards));
    assert!(rb.keys().all(|k| ra.contains_key(k)));
    for snap in &after.shards {
        for t in &snap.tables {
            for &k in &t.rows.keys {
                assert_eq!(freshet_actors::shard_of(k, 8), snap.shard, "key {k}");
            }
        }
    }
    let end = drain_and_stop(c, &store, samples);
    let m = &end.manifest;
    assert_eq!(m.rows_trained + m.samples_rejected, samples, "{m:?}");
}

#[test]
fn a_shard_owner_that_fails_on_its_node_is_reported_to_the_trainer_node_and_failed_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let samples = fixed_sample_log(d, 120_000);
    // The owners on node a panic once, at their 300th gradient push.
    let mut cmd = node_command(d, "a", "k", &[]);
    cmd.env("FRESHET_FAULTS", "shard.apply@300x1");
    let a = spawn_node(cmd, "a");
    copy_fixed_log(d, "c");
    let mut cmd = coordinator_command(d, "c", "k", &a.addr);
    cmd.arg("--no-simulate");
    let c = spawn_node(cmd, "c");
    let http = http_addr(&c);
    a.wait_for(&["a hosted shard owner failed"], Duration::from_secs(60))
        .expect("the owner's failure, on its node");
    // Reported to the trainer node as fenced: it fails over and places the shard again.
    c.wait_for(
        &["failing over", "node a fenced shard", "failed"],
        Duration::from_secs(30),
    )
    .expect("the failover after the owner's failure");
    c.wait_for(&["failed over"], Duration::from_secs(30))
        .expect("the failover's end");
    // The trainer's failed step is its child's failure, on the trainer node.
    let status = ctl(d, &http, &["status"]);
    let trainer = (status["children"].as_array().expect("children").iter())
        .find(|ch| ch["name"] == "trainer")
        .cloned()
        .expect("the trainer child");
    assert!(trainer["restarts"].as_u64() > Some(0), "{trainer}");
    assert!(
        trainer["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("shard")),
        "{trainer}"
    );
    assert_eq!(trainer["node"], "c", "{trainer}");
    let end = drain_and_stop(c, &d.join("data-c/models"), samples);
    let m = &end.manifest;
    assert_eq!(m.rows_trained + m.samples_rejected, samples, "{m:?}");
}

/// A header's value in a response head.
/// The version a node's `/healthz` says it serves.
fn served(http: &str) -> Option<u64> {
    let (code, h) = get(http, "/healthz");
    if code == 200 {
        h["serving"].as_u64()
    } else {
        None
    }
}

/// Checks that every version in the serving node's mirror that the trainer node's store still
/// holds is the same version: the same data files, byte for byte, and the same chain. Returns
/// how many were compared.
fn mirror_matches(trainer: &Path, mirror: &Path) -> usize {
    let (t, m) = (
        ModelStore::open_existing(trainer).expect("the trainer node's store"),
        ModelStore::open_existing(mirror).expect("the serving node's mirror"),
    );
    let held: std::collections::BTreeSet<u64> =
        t.versions().expect("versions").into_iter().collect();
    let mut compared = 0;
    for v in m.versions().expect("mirror versions") {
        if !held.contains(&v) {
            continue;
        }
        let (a, b) = (
            t.manifest(v).expect("manifest"),
            m.manifest(v).expect("manifest"),
        );
        assert_eq!(
            (a.parent, a.kind, &a.files),
            (b.parent, b.kind, &b.files),
            "version {v}"
        );
        // The data files alone: the manifest changes as verdicts and marks are written (through
        // a `.manifest.json.tmp` beside it, renamed over it), the data never do.
        let data = |dir: std::path::PathBuf| {
            let mut f = files(&dir);
            f.retain(|name, _| {
                !name.starts_with("manifest.json") && !name.starts_with(".manifest.json")
            });
            f
        };
        assert_eq!(
            data(t.version_dir(v)),
            data(m.version_dir(v)),
            "version {v}'s files"
        );
        compared += 1;
    }
    compared
}

#[test]
fn a_serving_node_follows_the_trainer_node_over_the_network_and_catches_up_after_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A full version every third: the kill below misses a whole chain.
    let config = format!("{SMALL_MODEL_CONFIG}{PIPELINE_CONFIG}[checkpoint]\nfull_every = 3\n");
    std::fs::write(d.join("freshet.toml"), config).expect("config");
    let a = start_node(d, "a", "k", &[]);
    let c = spawn_node(coordinator_command(d, "c", "k", &a.addr), "c");
    let http = http_addr(&c);
    let serve = |d: &Path| {
        let cmd = serving_command(d, "s", "k", "127.0.0.1:0", &c.addr, "127.0.0.1:0");
        spawn_node(cmd, "s")
    };
    let s = serve(d);
    let shttp = http_addr(&s);
    let first = wait(90, "the serving node serving a version", || served(&shttp));
    // It follows: each publication of the trainer node reaches it over the network.
    let later = wait(60, "a newer version on the serving node", || {
        served(&shttp).filter(|&v| v >= first + 3)
    });
    let req = serde_json::json!({
        "sparse": {"C1": "u1"}, "dense": {"I1": 0.5},
        "candidates": [{"sparse": {"C2": "i1"}}, {"sparse": {"C2": "i2"}}],
    });
    let (code, p) = post(&shttp, "/v1/predict", &req.to_string());
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["scores"].as_array().map(Vec::len), Some(2), "{p}");
    assert!(p["version"].as_u64() >= Some(later), "{p}");
    let (code, h) = get(&shttp, "/healthz");
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["following"]["source"], "c", "{h}");
    assert_eq!(h["following"]["reachable"], true, "{h}");
    assert!(h["following"]["notices"].as_u64() > Some(0), "{h}");
    assert!(h["version_age_ms"].as_u64().is_some(), "{h}");
    let (_, metrics) = common::http(&shttp, "GET", "/metrics", "text/plain", b"");
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.contains("freshet_follower_source_reachable 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("freshet_serving_version_age_seconds "),
        "{metrics}"
    );
    let (trainer_store, mirror) = (d.join("data-c/models"), d.join("data-s/models"));
    assert!(mirror_matches(&trainer_store, &mirror) > 0);

    // Killed, it misses publications; started again on its mirror, it serves what the mirror
    // has at once, then catches up to the trainer node's last publication.
    drop(s);
    let missed = served(&http).expect("the trainer node serves") + 4;
    wait(60, "the trainer node four versions on", || {
        served(&http).filter(|&v| v >= missed)
    });
    let s = serve(d);
    s.wait_for(&["from the mirror until"], Duration::from_secs(30))
        .expect("the restarted node serving from its mirror");
    let shttp = http_addr(&s);
    let caught = wait(60, "the restarted serving node caught up", || {
        served(&shttp).filter(|&v| v >= missed)
    });
    let (_, h) = get(&shttp, "/healthz");
    assert!(h["following"]["versions_fetched"].as_u64() > Some(0), "{h}");
    assert!(
        h["following"]["catch_ups"].as_u64() > Some(0)
            || h["following"]["notices"].as_u64() > Some(0),
        "{h}"
    );
    let (_, p) = post(&shttp, "/v1/predict", &req.to_string());
    assert!(p["version"].as_u64() >= Some(caught), "{p}");
    assert!(mirror_matches(&trainer_store, &mirror) > 0);
    drop(s);
    drop(c);
    drop(a);
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The span `id` of trace `trace`, if received.
fn span_of<'a>(spans: &'a [otlp::Span], trace: &str, id: &str) -> Option<&'a otlp::Span> {
    spans
        .iter()
        .find(|s| s.trace_id == trace && s.span_id == id)
}

/// `child`'s parent, when it is a received span named `name`.
fn parent_named<'a>(
    spans: &'a [otlp::Span],
    child: &otlp::Span,
    name: &str,
) -> Option<&'a otlp::Span> {
    span_of(spans, &child.trace_id, &child.parent_id).filter(|p| p.name == name)
}

#[test]
fn every_flow_is_one_trace_across_the_nodes_with_its_parents_right() {
    let (endpoint, log) = otlp::receiver();
    // The receiver is shared by the whole run: these names pick this test's spans.
    let tag = format!("t{}-{}", std::process::id(), now_ms() % 1_000_000);
    let (shards, coordinator) = (format!("{tag}-s"), format!("{tag}-c"));
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let config = format!("{SMALL_MODEL_CONFIG}{PIPELINE_CONFIG}");
    std::fs::write(d.join("freshet.toml"), config).expect("config");
    let traced = |mut c: Command| {
        c.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
            .env("OTEL_TRACES_SAMPLER_ARG", "1.0");
        c
    };
    // The other node hosts the shards and a serving replica.
    let localhost = "127.0.0.1:0";
    let roles = "shards,serving";
    let cmd = node_with_roles(d, &shards, "k", roles, localhost, &["--listen", localhost]);
    let s = spawn_node(traced(cmd), &shards);
    let c = spawn_node(
        traced(coordinator_command(d, &coordinator, "k", &s.addr)),
        &coordinator,
    );
    let http = http_addr(&c);
    wait(90, "a served version", || {
        (get(&http, "/healthz").0 == 200).then_some(())
    });

    // A prediction whose caller is traced: the server span continues the caller's span, and
    // the response names the server span.
    let client_trace = format!(
        "{:032x}",
        (now_ms() as u128) << 20 | u128::from(std::process::id())
    );
    let client_span = "00f067aa0ba902b7";
    let tp = format!("traceparent: 00-{client_trace}-{client_span}-01");
    let req = serde_json::json!({
        "sparse": {"C1": "u1"}, "dense": {"I1": 0.5},
        "candidates": [{"sparse": {"C2": "i1"}}, {"sparse": {"C2": "i2"}}],
    });
    let (code, head, body) = common::http_full(
        &http,
        "POST",
        "/v1/predict",
        "application/json",
        &[&tp],
        req.to_string().as_bytes(),
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let answered = header(&head, "traceparent").expect("the response's traceparent");
    let parts: Vec<&str> = answered.split('-').collect();
    assert_eq!(parts.len(), 4, "{answered}");
    assert_eq!(
        parts[1], client_trace,
        "the response is in the caller's trace"
    );
    let server_span = parts[2].to_owned();
    assert_ne!(server_span, client_span);

    // Events in a traced request: an impression and its click.
    let events_trace = format!("{:032x}", u128::from(std::process::id()) << 64 | 0xe1);
    let rid = format!("{tag}-r1");
    let t = now_ms();
    let events = format!(
        "{{\"type\":\"impression\",\"request_id\":\"{rid}\",\"time_ms\":{t},\"user\":\"u\",\
         \"item\":\"a\",\"features\":{{\"dense\":{{\"I1\":1.5}},\"sparse\":{{\"C1\":\"x\"}}}}}}\n\
         {{\"type\":\"action\",\"request_id\":\"{rid}\",\"item\":\"a\",\"time_ms\":{},\
         \"kind\":\"click\"}}\n",
        t + 10
    );
    let tp = format!("traceparent: 00-{events_trace}-{client_span}-01");
    let (code, _, body) = common::http_full(
        &http,
        "POST",
        "/v1/events",
        "application/json",
        &[&tp],
        events.as_bytes(),
    );
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));

    let found = wait(60, "every flow's spans at the receiver", || {
        let spans = otlp::spans(&log);
        let mine = |s: &&otlp::Span| s.instance == shards || s.instance == coordinator;
        let spans: Vec<otlp::Span> = spans.iter().filter(mine).cloned().collect();
        // A training step: its shard spans run on the shard node, children of the step's
        // client spans on the coordinator.
        let step = spans.iter().find_map(|serve| {
            (serve.name == "shard.lookup.serve" && serve.instance == shards).then_some(())?;
            let lookup = parent_named(&spans, serve, "shard.lookup")?;
            let step = parent_named(&spans, lookup, "train.step")?;
            (lookup.instance == coordinator && step.instance == coordinator).then_some(())?;
            let push = spans.iter().find(|p| {
                p.name == "shard.push" && p.trace_id == step.trace_id && p.parent_id == step.span_id
            })?;
            spans.iter().find(|a| {
                a.name == "shard.push.apply"
                    && a.instance == shards
                    && a.trace_id == step.trace_id
                    && a.parent_id == push.span_id
            })?;
            spans
                .iter()
                .find(|dense| dense.name == "train.dense" && dense.parent_id == step.span_id)?;
            Some(step.clone())
        })?;
        // A version's life: capture, write, validation and publication, and the replicas'
        // applies, on this node and on the serving node, in one trace.
        let life = spans.iter().find_map(|apply| {
            (apply.name == "replica.apply" && apply.instance == coordinator).then_some(())?;
            let publish = parent_named(&spans, apply, "version.publish")?;
            let follow = spans.iter().find(|f| {
                f.name == "model.follow"
                    && f.instance == shards
                    && f.trace_id == apply.trace_id
                    && f.parent_id == publish.span_id
            })?;
            let remote = spans.iter().find(|a| {
                a.name == "replica.apply"
                    && a.instance == shards
                    && a.trace_id == apply.trace_id
                    && a.parent_id == follow.span_id
            })?;
            let capture = spans.iter().find(|c| {
                c.name == "version.capture"
                    && c.trace_id == apply.trace_id
                    && c.parent_id.is_empty()
            })?;
            let write = spans.iter().find(|w| {
                w.name == "version.write"
                    && w.trace_id == capture.trace_id
                    && w.parent_id == capture.span_id
            })?;
            let validate = spans.iter().find(|v| {
                v.name == "version.validate"
                    && v.trace_id == capture.trace_id
                    && v.parent_id == capture.span_id
            })?;
            // Guarded publication publishes at arrival (under the capture), the others after
            // the verdict (under the validation).
            (publish.parent_id == capture.span_id || publish.parent_id == validate.span_id)
                .then_some(())?;
            let v = write.attr("freshet.version")?;
            (publish.attr("freshet.version") == Some(v)
                && apply.attr("freshet.version") == Some(v)
                && remote.attr("freshet.version") == Some(v))
            .then_some(())?;
            (write.attr("freshet.bytes")?.parse::<u64>().ok()? > 0).then_some(())?;
            Some(capture.clone())
        })?;
        // The prediction: the server span continues the client's, scoring is its child.
        let server = span_of(&spans, &client_trace, &server_span)?;
        let score = spans.iter().find(|s| {
            s.name == "predict.score" && s.trace_id == client_trace && s.parent_id == server_span
        })?;
        // The events: the server span, the append under it, each event's processing by the
        // joiner under the append, and the sample under its impression, linked to its click.
        let post = spans.iter().find(|s| {
            s.trace_id == events_trace && s.parent_id == client_span && s.name == "POST /v1/events"
        })?;
        let send = spans.iter().find(|s| {
            s.name == "events send" && s.trace_id == events_trace && s.parent_id == post.span_id
        })?;
        let processed = |kind: &str| {
            spans.iter().find(|s| {
                s.name == "events process"
                    && s.trace_id == events_trace
                    && s.parent_id == send.span_id
                    && s.attr("freshet.event") == Some(kind)
                    && s.attr("freshet.request_id") == Some(rid.as_str())
            })
        };
        let (impression, click) = (processed("impression")?, processed("action")?);
        let sample = spans.iter().find(|s| {
            s.name == "samples send"
                && s.trace_id == events_trace
                && s.parent_id == impression.span_id
        })?;
        Some((
            step,
            life,
            server.clone(),
            score.clone(),
            sample.clone(),
            click.span_id.clone(),
        ))
    });
    let (step, life, server, score, sample, click) = found;
    assert_eq!(step.roles, "trainer,serving,joiner");
    assert_eq!(step.service, "freshet");
    assert_eq!(life.instance, coordinator);
    assert_eq!(server.kind, "SPAN_KIND_SERVER");
    assert_eq!(server.attr("http.response.status_code"), Some("200"));
    assert_eq!(server.attr("http.route"), Some("/v1/predict"));
    assert!(server.attr("freshet.version").is_some(), "{server:?}");
    assert_eq!(score.attr("freshet.candidates"), Some("2"));
    assert_eq!(sample.attr("freshet.sample.kind"), Some("Positive"));
    assert!(
        sample
            .links
            .iter()
            .any(|(t, s)| t == &sample.trace_id && s == &click),
        "the sample links its click: {sample:?}"
    );
    // The shard and serving node exports as itself.
    let all = otlp::spans(&log);
    let remote = all
        .iter()
        .find(|s| s.instance == shards)
        .expect("a span of the shard node");
    assert_eq!(remote.roles, "shards,serving");
    // The trainer's start is a supervision event of its own, kept at any ratio.
    let start = all
        .iter()
        .find(|s| s.instance == coordinator && s.name == "supervision.trainer_start")
        .expect("the trainer's start");
    assert!(start.parent_id.is_empty(), "{start:?}");
    assert!(start.attr("freshet.sample_offsets").is_some(), "{start:?}");

    let (code, metrics) = common::http(&http, "GET", "/metrics", "text/plain", b"");
    assert_eq!(code, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    let exported = metrics
        .lines()
        .find_map(|l| l.strip_prefix("freshet_trace_spans_exported_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the export's counter on /metrics");
    assert!(exported > 0.0, "{metrics}");
    drop((c, s));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
