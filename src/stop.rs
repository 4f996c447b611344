//! How a node is told to stop: SIGINT or SIGTERM.

use anyhow::Context;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGINT and SIGTERM, caught from the moment this is built.
///
/// A node builds it before it starts anything an operator or a test could wait on (a version, a
/// ready line): until a handler is installed, SIGINT ends the process at once, and a node ended
/// that way skips its last version and leaves its cluster only when its lease runs out.
pub(crate) struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    /// Installs both handlers; called inside the runtime.
    pub(crate) fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// The next SIGINT or SIGTERM, or one that came since the last call (or since `install`).
    /// Cancel-safe: a `select!` branch that loses to another keeps the signal for the next call.
    pub(crate) async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
