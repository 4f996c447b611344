//! A `freshet dev` child process for the benches that measure a whole node: started from this
//! binary, its output in a file, stopped by SIGINT or killed, and never left behind.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running `freshet dev`; dropping it kills a node still running, so that no error path
/// leaves one behind.
pub(super) struct Node {
    child: std::process::Child,
    exited: bool,
    log: std::path::PathBuf,
    /// Where this node's output begins in `log`, which may hold earlier runs on the same data.
    log_from: usize,
}

impl Node {
    /// Starts `freshet dev` on `data`, listening on a free loopback port, with its stdout and
    /// stderr appended to `log`. The node reads `config` when given (as this process did),
    /// else `./freshet.toml` if present.
    pub(super) fn start(config: Option<&Path>, data: &Path, log: &Path) -> anyhow::Result<Node> {
        Self::start_with(config, data, log, &[], &[])
    }

    /// [`Node::start`] with more `dev` flags and environment variables for the node.
    pub(super) fn start_with(
        config: Option<&Path>,
        data: &Path,
        log: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Node> {
        let exe = std::env::current_exe().context("finding this binary")?;
        let log_from = std::fs::metadata(log).map_or(0, |m| m.len()) as usize;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening the node's log file {}", log.display()))?;
        let mut cmd = std::process::Command::new(&exe);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        // A bench's node exports traces only when the bench asks (`envs`): a receiver named in
        // this shell would otherwise change what every bench measures.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("--data-dir")
            .arg(data)
            .args(["dev", "--listen", "127.0.0.1:0"])
            .args(args)
            .envs(envs.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().context("the node's log file")?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {} dev", exe.display()))?;
        Ok(Node {
            child,
            exited: false,
            log: log.to_path_buf(),
            log_from,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address the node listens on, from its log (`listening on http://ADDR`), once it
    /// is there: after the node has restored its state and bound its port.
    pub(super) fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                anyhow::bail!(
                    "the node exited ({status}) before it listened; see {}",
                    self.log.display()
                );
            }
            if let Some(a) = self
                .output()?
                .lines()
                .find_map(|l| l.strip_prefix("listening on http://"))
            {
                return Ok(a.trim().to_owned());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the node did not listen within {} s; see {}",
                timeout.as_secs(),
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What this node has written to its log so far.
    pub(super) fn output(&self) -> anyhow::Result<String> {
        let bytes =
            std::fs::read(&self.log).with_context(|| format!("reading {}", self.log.display()))?;
        Ok(String::from_utf8_lossy(bytes.get(self.log_from..).unwrap_or_default()).into_owned())
    }

    /// Whether the node has exited (and was reaped): its status the first time, then `None`.
    pub(super) fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        if self.exited {
            return Ok(None);
        }
        let status = self.child.try_wait().context("watching the node")?;
        self.exited = status.is_some();
        Ok(status)
    }

    /// SIGINT, as after Ctrl-C: the node writes a last version and stops. Waits up to
    /// `grace`, then kills it.
    pub(super) fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        if self.exited {
            return Ok(());
        }
        // Only a child not yet reaped: its pid cannot have been reused.
        interrupt(self.child.id());
        let deadline = Instant::now() + grace;
        while !self.exited {
            if self.exited()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                super::progress("the node did not stop within its grace period; killing it");
                self.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// SIGKILL, as a crash would end it, and waits for it.
    pub(super) fn kill(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends SIGINT to `pid`.
#[allow(unsafe_code)] // kill(2) has no safe wrapper in std.
fn interrupt(pid: u32) {
    // SAFETY: a plain syscall on the pid of our own child, not yet reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
}
