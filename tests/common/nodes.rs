//! `freshet node` processes for the multi-node tests: started, read, signalled and killed
//! when dropped; a fixed sample log every run trains on alike; and what the tests read of a
//! trainer node (its HTTP address, `ctl`, its versions' placements).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use freshet_actors::ckpt::ModelStore;

use super::{freshet, get, ok, wait, SMALL_MODEL_CONFIG};

pub(crate) const COOKIE: &str = "FRESHET_CLUSTER_COOKIE";

/// A `freshet node` process, killed when dropped.
pub(crate) struct Node {
    pub(crate) child: Child,
    /// Its cluster address, from its ready line.
    pub(crate) addr: String,
    /// Its stderr lines, as they come.
    pub(crate) log: Receiver<String>,
    /// The rest of its stdout, after the ready line.
    pub(crate) stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Waits up to `within` for a log line that contains every one of `parts`; returns it.
    pub(crate) fn wait_for(&self, parts: &[&str], within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if parts.iter().all(|p| line.contains(p)) => return Some(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Sends SIGINT and waits up to a minute for the node to exit, successfully.
    pub(crate) fn interrupt(&mut self) {
        self.signal("-INT");
        let end = Instant::now() + Duration::from_secs(60);
        let exit = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            assert!(Instant::now() < end, "the node did not stop on SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        };
        if !exit.success() {
            let logs: Vec<String> = self.log.try_iter().collect();
            let tail = &logs[logs.len().saturating_sub(15)..];
            panic!(
                "{exit:?} on SIGINT; its last log lines:\n{}",
                tail.join("\n")
            );
        }
    }

    pub(crate) fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig}");
    }
}

pub(crate) fn node_with_roles(
    dir: &Path,
    name: &str,
    cookie: &str,
    roles: &str,
    listen: &str,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_freshet"));
    c.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("FRESHET") {
            c.env_remove(k);
        }
    }
    c.args([
        "--data-dir",
        &format!("data-{name}"),
        "node",
        "--name",
        name,
    ])
    .args(["--roles", roles, "--cluster-listen", listen])
    .args(extra)
    .env(COOKIE, cookie)
    .env("FRESHET_LOG", "info");
    c
}

pub(crate) fn spawn_node(mut command: Command, name: &str) -> Node {
    let mut child = command
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
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("stdout");
    let ready: serde_json::Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(_) => {
            let _ = child.kill();
            let logs: Vec<String> = log.try_iter().collect();
            panic!("node {name} did not start: {line:?}\n{}", logs.join("\n"));
        }
    };
    let addr = ready["cluster"]
        .as_str()
        .expect("cluster address")
        .to_owned();
    Node {
        child,
        addr,
        log,
        stdout,
    }
}

/// A node with the serving role alone: it follows the trainer node at `seed` and answers on
/// its own HTTP port at `http`.
pub(crate) fn serving_command(
    dir: &Path,
    name: &str,
    cookie: &str,
    listen: &str,
    seed: &str,
    http: &str,
) -> Command {
    let flags = ["--join", seed, "--listen", http];
    node_with_roles(dir, name, cookie, "serving", listen, &flags)
}

/// The pipeline's config for a trainer node: the small model, two log partitions, and a gate
/// that passes the first versions of a young model.
pub(crate) const PIPELINE_CONFIG: &str =
    "\n[log]\npartitions = 2\n[validation]\nmin_samples = 300\n\
    max_auc_drop = 0.5\nmax_logloss_ratio = 10.0\nmax_calibration_error = 10.0\n";

/// `freshet ctl` against a node's HTTP API; its JSON answer.
pub(crate) fn ctl(d: &Path, http: &str, args: &[&str]) -> serde_json::Value {
    ok(&freshet(d)
        .args(["ctl", "--json", "--url", &format!("http://{http}")])
        .args(args)
        .output()
        .expect("run ctl"))
}

/// The HTTP address a trainer or serving node announced.
pub(crate) fn http_addr(n: &Node) -> String {
    let line = n
        .wait_for(&["listening on http://"], Duration::from_secs(60))
        .expect("the node's HTTP API");
    let at = line.find("http://").expect("address") + "http://".len();
    line[at..].trim().to_owned()
}

/// A sample log every run trains on alike: `impressions` simulated impressions (seed 3),
/// joined in `d/data`. Returns the samples it holds.
pub(crate) fn fixed_sample_log(d: &Path, impressions: u64) -> u64 {
    // A window of a second: nearly every impression is joined by the end of the log.
    let config =
        format!("{SMALL_MODEL_CONFIG}{PIPELINE_CONFIG}[joiner.window]\nwindow_ms = 1000\n");
    std::fs::write(d.join("freshet.toml"), config).expect("config");
    let n = impressions.to_string();
    ok(&freshet(d)
        .args(["simulate", "--fast", "--seed", "3"])
        .args(["--impressions", &n])
        .output()
        .expect("simulate"));
    let joined = ok(&freshet(d)
        .args(["join", "--until-caught-up"])
        .output()
        .expect("join"));
    (joined["partitions"].as_array().expect("partitions").iter())
        .map(|p| p["task"]["samples_written"].as_u64().expect("samples"))
        .sum()
}

/// Gives trainer node `name` (data under `d/data-<name>`) a copy of the fixed sample log with
/// its joiners' checkpoints, caught up: it trains on that log and joins no new event.
pub(crate) fn copy_fixed_log(d: &Path, name: &str) {
    for part in ["log", "joiner"] {
        copy_dir(
            &d.join("data").join(part),
            &d.join(format!("data-{name}/{part}")),
        );
    }
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

/// The trainer's status from the node's admin API, once it answers.
pub(crate) fn trainer_status(http: &str) -> Option<serde_json::Value> {
    let (code, s) = get(http, "/v1/admin/status");
    (code == 200 && s["trainer"].is_object()).then(|| s["trainer"].clone())
}

/// Waits until the newest version of `store` has consumed all `samples`, stops the node
/// with SIGINT, and returns its store's newest version, restored.
pub(crate) fn drain_and_stop(
    c: Node,
    store: &Path,
    samples: u64,
) -> freshet_actors::ckpt::Restored {
    version_where(store, 120, "a version that consumed the whole log", |m| {
        m.sample_offsets.values().sum::<u64>() == samples
    });
    let mut c = c;
    c.interrupt();
    let s = ModelStore::open(store).expect("store");
    let v = s.latest().expect("latest").expect("a version");
    s.restore(v, None).expect("restore")
}

/// The node of `names` that hosts shard 0 as the trainer node's `ctl nodes` says.
pub(crate) fn host_of_shard_0(d: &Path, http: &str) -> String {
    wait(30, "shard 0 in a heartbeat", || {
        let nodes = ctl(d, http, &["nodes"]);
        let row = (nodes["nodes"].as_array()?.iter())
            .find(|r| (r["shards"].as_array().into_iter().flatten()).any(|s| s["shard"] == 0))?;
        row["node"].as_str().map(str::to_owned)
    })
}

/// The newest version of `store` once one satisfies `ok`.
pub(crate) fn version_where(
    store: &Path,
    secs: u64,
    what: &str,
    ok: impl Fn(&freshet_actors::ckpt::Manifest) -> bool,
) -> freshet_actors::ckpt::Manifest {
    wait(secs, what, || {
        let s = ModelStore::open(store).ok()?;
        let m = s.manifest(s.latest().ok()??).ok()?;
        ok(&m).then_some(m)
    })
}

/// The newest version of `store` once its placement satisfies `ok`.
pub(crate) fn version_placed(
    store: &Path,
    secs: u64,
    what: &str,
    ok: impl Fn(&freshet_actors::ckpt::ShardPlacement) -> bool,
) -> freshet_actors::ckpt::Manifest {
    version_where(store, secs, what, |m| m.placement.as_ref().is_some_and(&ok))
}
