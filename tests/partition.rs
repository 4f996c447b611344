//! A network partition, with real network namespaces: four `freshet node` processes, each in
//! a namespace of its own joined by a bridge; one shard node cut off by taking its link down,
//! and the serving node cut off from the trainer node by a blackhole route, then both joined
//! back. The cut-off shard node is failed over and fences itself; after the heal it is up
//! again, `ctl rebalance` places shards on it again, and every sample counts once. The cut-off
//! serving node goes on answering from its last version, says `cut_off` with the version's
//! growing age in `/healthz` and `/metrics`, and catches up after the heal.
//!
//! The namespaces need root and iproute2 (`scripts/test` installs it where it can). Where they
//! cannot be made, the test prints why and reports itself skipped, never passed; with
//! `FRESHET_REQUIRE_NETNS` set (as `scripts/test` sets it once it made one) that is a failure.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::nodes::{
    copy_fixed_log, ctl, drain_and_stop, fixed_sample_log, host_of_shard_0, http_addr,
    node_with_roles, serving_command, spawn_node, version_placed, version_where, Node,
    PIPELINE_CONFIG,
};
use common::{get, post, wait, SMALL_MODEL_CONFIG};
use freshet_actors::ckpt::ModelStore;

const NAME: &str =
    "a_shard_node_cut_off_by_a_partition_is_failed_over_fenced_and_placed_on_again_after_the_heal";

/// Runs `ip ARGS`; the error says what failed.
fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip").args(args).output().map_err(|e| {
        format!(
            "running ip {}: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    })?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// Namespaces `<prefix><node>` on one bridge in this namespace, each with an address in
/// `<subnet>.0/24`; the bridge has `<subnet>.254`, so this process reaches every node.
/// Deleted when dropped.
struct Net {
    prefix: String,
    subnet: String,
    nodes: Vec<String>,
}

impl Net {
    /// Whether namespaces can be made here: root, iproute2, and a probe namespace.
    fn available() -> Result<(), String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| format!("running id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("making network namespaces needs root".into());
        }
        let probe = format!("fxprobe{}", std::process::id());
        ip(&["netns", "add", &probe])?;
        ip(&["netns", "del", &probe])
    }

    fn new(nodes: &[&str]) -> Result<Self, String> {
        let pid = std::process::id();
        let net = Net {
            prefix: format!("fx{}", pid % 100_000),
            subnet: format!("10.77.{}", pid % 250),
            nodes: Vec::new(),
        };
        let mut net = net;
        let br = net.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.254/24", net.subnet), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for (i, n) in nodes.iter().enumerate() {
            let ns = net.ns(n);
            let (host, inner) = (format!("{ns}h"), format!("{ns}n"));
            ip(&["netns", "add", &ns])?;
            net.nodes.push((*n).to_owned());
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &host, "master", &br])?;
            ip(&["link", "set", &host, "up"])?;
            let addr = format!("{}.{}/24", net.subnet, i + 1);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    fn ns(&self, node: &str) -> String {
        format!("{}{node}", self.prefix)
    }

    /// The address of `node` (the order it was given in).
    fn addr(&self, node: &str) -> String {
        let i = self
            .nodes
            .iter()
            .position(|n| n == node)
            .expect("a node of the net");
        format!("{}.{}", self.subnet, i + 1)
    }

    /// `command` run inside the namespace of `node`.
    fn inside(&self, node: &str, command: Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(node)])
            .arg(command.get_program())
            .args(command.get_args());
        if let Some(d) = command.get_current_dir() {
            c.current_dir(d);
        }
        for (k, v) in command.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// Drops everything `node` sends to `to` (`cut` true: a blackhole route in `node`'s
    /// namespace, so neither hears the other while both stay reachable from here), or stops.
    fn cut_between(&self, node: &str, to: &str, cut: bool) {
        let dest = format!("{}/32", self.addr(to));
        let verb = if cut { "add" } else { "del" };
        let ns = self.ns(node);
        ip(&["-n", &ns, "route", verb, "blackhole", &dest]).expect("the route");
    }

    /// Takes `node`'s link to the bridge down (`up` false) or up again.
    fn link(&self, node: &str, up: bool) {
        let host = format!("{}h", self.ns(node));
        ip(&["link", "set", &host, if up { "up" } else { "down" }]).expect("the link");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = ip(&["netns", "del", &self.ns(n)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

fn partition(d: &Path) {
    let samples = fixed_sample_log(d, 120_000);
    let net = Net::new(&["a", "b", "c", "s"]).expect("the namespaces");
    let shard_node = |name: &str| {
        let listen = format!("{}:7401", net.addr(name));
        let cmd = node_with_roles(d, name, "k", "shards", &listen, &[]);
        spawn_node(net.inside(name, cmd), name)
    };
    let (a, b) = (shard_node("a"), shard_node("b"));
    copy_fixed_log(d, "c");
    let seeds = format!("{},{}", a.addr, b.addr);
    let http_listen = format!("{}:8080", net.addr("c"));
    let cluster_listen = format!("{}:7400", net.addr("c"));
    let pipeline = [
        "--join",
        &seeds,
        "--listen",
        &http_listen,
        "--insecure-admin",
        "--window-ms",
        "1000",
        "--delta-ms",
        "400",
        "--status-every",
        "1",
        "--no-simulate",
    ];
    let roles = "trainer,serving,joiner";
    let cmd = node_with_roles(d, "c", "k", roles, &cluster_listen, &pipeline);
    let c = spawn_node(net.inside("c", cmd), "c");
    let http = http_addr(&c);
    let store = d.join("data-c/models");
    let lost = host_of_shard_0(d, &http);
    let first = version_where(&store, 60, "a version with part of the log", |m| {
        m.rows_trained >= 1000
    });
    let first_epoch = first.placement.as_ref().expect("placed").epoch;
    let (cut, survivor): (&Node, &str) = if lost == "a" { (&a, "b") } else { (&b, "a") };
    // The serving node, following the trainer node.
    let cmd = serving_command(
        d,
        "s",
        "k",
        &format!("{}:7402", net.addr("s")),
        &c.addr,
        &format!("{}:8081", net.addr("s")),
    );
    let s = spawn_node(net.inside("s", cmd), "s");
    let shttp = http_addr(&s);
    wait(60, "the serving node serving", || served(&shttp));

    // Cut off: nothing closes, both sides just stop hearing each other.
    net.link(&lost, false);
    net.cut_between("s", "c", true);
    let cut_at = Instant::now();
    c.wait_for(
        &["failing over", &format!("node {lost} is down")],
        Duration::from_secs(15),
    )
    .expect("the failover once the lease ran out");
    c.wait_for(&["failed over"], Duration::from_secs(30))
        .expect("the failover's end");
    println!(
        "partition to failed over: {} ms",
        cut_at.elapsed().as_millis()
    );
    // The cut-off node loses the trainer node too, and fences what it placed.
    cut.wait_for(
        &["fenced the shard owners", "node c is down"],
        Duration::from_secs(15),
    )
    .expect("the cut-off node fences its owners");
    let after = version_placed(&store, 60, "a version on the survivor", |p| {
        p.epoch > first_epoch && p.nodes.iter().all(|n| n == survivor)
    });
    assert!(after.rows_trained > first.rows_trained);

    // The cut-off serving node answers from its last version and says how old it is.
    let (h1, kept) = wait(30, "the serving node saying it is cut off", || {
        let (code, h) = get(&shttp, "/healthz");
        (code == 200 && h["status"] == "cut_off").then(|| (h.clone(), h["serving"].as_u64()))
    });
    assert_eq!(h1["following"]["reachable"], false, "{h1}");
    let kept = kept.expect("a version served");
    wait(
        30,
        "the trainer node past the cut-off node's version",
        || {
            let (_, h) = get(&http, "/healthz");
            h["serving"].as_u64().filter(|&v| v > kept)
        },
    );
    let req = serde_json::json!({
        "sparse": {"C1": "u1"}, "dense": {"I1": 0.5},
        "candidates": [{"sparse": {"C2": "i1"}}],
    });
    let (code, p) = post(&shttp, "/v1/predict", &req.to_string());
    assert_eq!((code, p["version"].as_u64()), (200, Some(kept)), "{p}");
    let (_, h2) = get(&shttp, "/healthz");
    assert_eq!(h2["serving"].as_u64(), Some(kept), "{h2}");
    assert!(
        h2["version_age_ms"].as_u64() > h1["version_age_ms"].as_u64(),
        "{h1} then {h2}"
    );
    let (_, metrics) = common::http(&shttp, "GET", "/metrics", "text/plain", b"");
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics.contains("freshet_follower_source_reachable 0"),
        "{metrics}"
    );

    // Healed: the node is up again and hosts nothing (a request queued for it meanwhile is
    // refused: its owners are gone).
    net.link(&lost, true);
    net.cut_between("s", "c", false);
    let healed_at = Instant::now();
    let newest = {
        let (_, h) = get(&http, "/healthz");
        h["serving"].as_u64().expect("the trainer node serves")
    };
    wait(60, "the serving node caught up after the heal", || {
        served(&shttp).filter(|&v| v >= newest)
    });
    println!(
        "heal to the serving node caught up: {} ms",
        healed_at.elapsed().as_millis()
    );
    wait(30, "the healed node up with no shard", || {
        let nodes = ctl(d, &http, &["nodes"]);
        let row = (nodes["nodes"].as_array()?.iter()).find(|r| r["node"] == lost.as_str())?;
        (row["state"] == "up" && row["shards"].as_array().is_some_and(Vec::is_empty)).then_some(())
    });
    // Nothing hosted it again before the rebalance asks it to.
    let late: Vec<String> = cut.log.try_iter().collect();
    assert!(
        !late.iter().any(|l| l.contains("hosting a shard owner")),
        "{late:#?}"
    );
    // Everything converges: a rebalance places shards on it again.
    let moved = ctl(d, &http, &["rebalance"]);
    assert!(
        moved["moved"].as_array().is_some_and(|m| !m.is_empty()),
        "{moved}"
    );
    let back = version_placed(
        &store,
        60,
        "a version with shards on the healed node",
        |p| p.nodes.contains(&lost),
    );
    assert!(
        back.placement.as_ref().expect("placed").epoch
            > after.placement.as_ref().expect("placed").epoch
    );
    let end = drain_and_stop(c, &store, samples);
    let m = &end.manifest;
    assert_eq!(m.rows_trained + m.samples_rejected, samples, "{m:?}");
    let s = ModelStore::open(&store).expect("store");
    assert!(s.versions().expect("versions").len() >= 3);
    drop((a, b, s));
}

/// The version a node's `/healthz` says it serves.
fn served(http: &str) -> Option<u64> {
    let (code, h) = get(http, "/healthz");
    (code == 200).then(|| h["serving"].as_u64()).flatten()
}

fn main() {
    // `cargo test` passes name filters and flags (some with a value); this binary holds one
    // test.
    let (mut filters, mut exact, mut ignored_only) = (Vec::new(), false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--test-threads" | "--skip" | "--color" | "--format" | "--logfile" | "-Z" => {
                args.next();
            }
            "--exact" => exact = true,
            // The test is not ignored.
            "--ignored" => ignored_only = true,
            _ if a.starts_with('-') => {}
            _ => filters.push(a),
        }
    }
    let matches = |f: &String| {
        if exact {
            NAME == f
        } else {
            NAME.contains(f.as_str())
        }
    };
    if std::env::args().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    if ignored_only || (!filters.is_empty() && !filters.iter().any(matches)) {
        println!("running 0 tests");
        return;
    }
    println!("running 1 test");
    if let Err(why) = Net::available() {
        if std::env::var_os("FRESHET_REQUIRE_NETNS").is_some() {
            println!("test {NAME} ... FAILED: network namespaces are required here: {why}");
            std::process::exit(101);
        }
        println!("test {NAME} ... skipped: {why}");
        println!("\ntest result: skipped. 0 passed; 0 failed; 1 skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!("{SMALL_MODEL_CONFIG}{PIPELINE_CONFIG}");
    std::fs::write(dir.path().join("freshet.toml"), config).expect("config");
    match std::panic::catch_unwind(|| partition(dir.path())) {
        Ok(()) => println!("test {NAME} ... ok\n\ntest result: ok. 1 passed; 0 failed"),
        Err(_) => {
            println!("test {NAME} ... FAILED\n\ntest result: FAILED. 0 passed; 1 failed");
            std::process::exit(101);
        }
    }
}
