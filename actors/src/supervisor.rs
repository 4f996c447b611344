//! The Supervisor: starts children in order, restarts the ones that fail, and gives up to its
//! own parent when failures come too fast.
//!
//! - **Children.** Each [`ChildSpec`] has a name, a [`Strategy`] and a start function. The
//!   start function builds the child's `Args` *at that moment*, which is how a restarted actor
//!   gets new state and new stream offsets: the pipeline's start functions read the version
//!   and offsets to resume from when they run, not when the spec was written.
//! - **Strategies.** `OneForOne`: only the failed child restarts. `RestForOne`: the failed child
//!   and every child started after it restart (in start order), because they hold handles to
//!   it or state derived from it.
//! - **Intensity.** At most `max_restarts` restarts within `within`, across all children;
//!   one more and the supervisor stops its children and fails, so its parent sees the failure
//!   (escalation). Each restart waits a backoff that doubles with the child's recent failures.
//! - **Commands.** [`SupervisorHandle::restart_from`] restarts a named child and those after it
//!   on request (rollback, replay and calibration use it); such restarts do not count against
//!   the intensity.
//!
//! A child that stops without the supervisor asking is treated like a failed one: every child
//! of a pipeline is meant to run until shutdown.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::telemetry;
use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use serde::{Deserialize, Serialize};

/// Which siblings restart with a failed child.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    OneForOne,
    RestForOne,
}

/// The future a start function returns: the started child, linked to the supervisor.
pub type StartFuture = Pin<Box<dyn Future<Output = anyhow::Result<ActorCell>> + Send>>;

/// Starts one child linked to the given supervisor cell.
pub type StartFn = Arc<dyn Fn(ActorCell) -> StartFuture + Send + Sync>;

pub struct ChildSpec {
    pub name: String,
    pub strategy: Strategy,
    pub start: StartFn,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .finish_non_exhaustive()
    }
}

/// How many restarts a supervisor tolerates, and how long it waits before each.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Intensity {
    pub max_restarts: u32,
    pub within: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            within: Duration::from_secs(60),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl Intensity {
    /// The wait before the `n`th recent restart of one child (n >= 1).
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 1u32 << n.saturating_sub(1).min(16);
        (self.backoff_min * factor).min(self.backoff_max)
    }
}

#[derive(Debug)]
pub struct SupervisorArgs {
    pub name: String,
    pub children: Vec<ChildSpec>,
    pub intensity: Intensity,
    /// Set to the reason when the supervisor gives up (intensity exceeded), before it stops:
    /// its owner reads it after the join handle completes.
    pub gave_up: Arc<std::sync::OnceLock<String>>,
}

/// One child as the supervisor sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildStatus {
    pub name: String,
    pub strategy: Strategy,
    pub running: bool,
    /// Restarts after failures (not those asked for by a command).
    pub restarts: u64,
    pub last_failure: Option<String>,
    /// The cluster node it runs on, where its owner knows it; none in a single process.
    #[serde(default)]
    pub node: Option<String>,
}

/// Why a command restart ([`SupervisorHandle::restart_from`]) did not bring its children up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RestartError {
    /// No child has that name: the caller's mistake.
    #[error("no child named {name}")]
    UnknownChild { name: String },
    /// The child, or one after it, did not start; the supervisor treats it as a failure.
    #[error("{reason}")]
    StartFailed { child: String, reason: String },
    /// The supervisor did not answer.
    #[error("the supervisor {reason}")]
    Unavailable { reason: String },
}

#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start every child waiting for a restart (sent to itself after a backoff).
    Restart,
    RestartFrom {
        name: String,
        reply: RpcReplyPort<Result<(), RestartError>>,
    },
    Status(RpcReplyPort<Vec<ChildStatus>>),
    /// Stop every child, last started first.
    Shutdown(RpcReplyPort<()>),
}

// Local only: it never crosses nodes as a ractor message (see `crate::envelope`).
impl ractor::Message for SupervisorMsg {}

#[derive(Debug, Default)]
pub struct Supervisor;

#[derive(Debug)]
pub struct SupervisorState {
    args: SupervisorArgs,
    running: Vec<Option<ActorCell>>,
    status: Vec<ChildStatus>,
    /// Children stopped on purpose: their exit is not a failure.
    stopping: HashSet<ActorId>,
    /// Children to start at the next `Restart`.
    pending: BTreeSet<usize>,
    /// Times of recent failure restarts, all children.
    recent: VecDeque<Instant>,
    /// Per child, times of its recent failures (for its backoff).
    recent_by_child: Vec<VecDeque<Instant>>,
    shutting_down: bool,
}

impl SupervisorState {
    /// Stops the running children from index `from` on, last first, and marks them pending.
    async fn stop_from(&mut self, from: usize) {
        for i in (from..self.running.len()).rev() {
            if let Some(cell) = self.running[i].take() {
                self.stopping.insert(cell.get_id());
                self.status[i].running = false;
                // A child that does not stop within the limit is killed.
                if cell
                    .stop_and_wait(None, Some(Duration::from_secs(30)))
                    .await
                    .is_err()
                {
                    cell.kill();
                }
                self.pending.insert(i);
            }
        }
    }

    /// Starts every pending child in order. A child that fails to start stays pending and
    /// counts as a failure.
    async fn start_pending(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        while let Some(&i) = self.pending.iter().next() {
            let spec = &self.args.children[i];
            match (spec.start)(myself.get_cell()).await {
                Ok(cell) => {
                    self.pending.remove(&i);
                    self.running[i] = Some(cell);
                    self.status[i].running = true;
                }
                Err(e) => {
                    let reason = format!("starting {}: {e:#}", spec.name);
                    tracing::error!(supervisor = %self.args.name, child = %spec.name, error = %format!("{e:#}"), "child failed to start");
                    // Later children wait for the next attempt too: under rest-for-one they
                    // need this one, and the order of starts stays the order of the specs.
                    self.stop_from(i + 1).await;
                    return self.failed(myself, i, reason);
                }
            }
        }
        Ok(())
    }

    /// Counts a failure of child `i` against the intensity and schedules the restart.
    fn failed(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        i: usize,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        let within = self.args.intensity.within;
        self.status[i].restarts += 1;
        self.status[i].last_failure = Some(reason.clone());
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > within)
        {
            self.recent.pop_front();
        }
        let mine = &mut self.recent_by_child[i];
        mine.push_back(now);
        while mine
            .front()
            .is_some_and(|t| now.duration_since(*t) > within)
        {
            mine.pop_front();
        }
        let n = mine.len() as u32;
        // One span per restart decision: a supervision event starts its own trace.
        let span = if telemetry::enabled() {
            tracing::info_span!(target: telemetry::TARGET, "supervision.restart",
                freshet.supervisor = %self.args.name, freshet.child = %self.args.children[i].name,
                freshet.reason = %reason, freshet.restarts = self.status[i].restarts as i64,
                freshet.restart_in_ms = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        if self.recent.len() > self.args.intensity.max_restarts as usize {
            let why = format!(
                "supervisor {}: {} restarts within {:?} (limit {}); last: {} failed: {reason}",
                self.args.name,
                self.recent.len(),
                within,
                self.args.intensity.max_restarts,
                self.args.children[i].name
            );
            telemetry::add_event(&span, "gave_up", vec![("reason", why.clone())]);
            let _ = self.args.gave_up.set(why.clone());
            return Err(why.into());
        }
        let wait = self.args.intensity.backoff(n);
        span.record("freshet.restart_in_ms", wait.as_millis() as i64);
        tracing::warn!(supervisor = %self.args.name, child = %self.args.children[i].name, reason = %reason, restart_in_ms = wait.as_millis() as u64, "restarting a failed child");
        myself.send_after(wait, || SupervisorMsg::Restart);
        Ok(())
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let n = args.children.len();
        let status = args
            .children
            .iter()
            .map(|c| ChildStatus {
                name: c.name.clone(),
                strategy: c.strategy,
                running: false,
                restarts: 0,
                last_failure: None,
                node: None,
            })
            .collect();
        let mut st = SupervisorState {
            args,
            running: vec![None; n],
            status,
            stopping: HashSet::new(),
            pending: BTreeSet::new(),
            recent: VecDeque::new(),
            recent_by_child: vec![VecDeque::new(); n],
            shutting_down: false,
        };
        // The first start is all or nothing: a child that cannot start now is a configuration
        // or disk problem for the caller, not something to retry.
        for i in 0..n {
            let spec = &st.args.children[i];
            match (spec.start)(myself.get_cell()).await {
                Ok(cell) => {
                    st.running[i] = Some(cell);
                    st.status[i].running = true;
                }
                Err(e) => {
                    let err = format!("starting {}: {e:#}", spec.name);
                    st.stop_from(0).await;
                    return Err(err.into());
                }
            }
        }
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart => {
                if !st.shutting_down {
                    st.start_pending(&myself).await?;
                }
            }
            SupervisorMsg::RestartFrom { name, reply } => {
                if st.shutting_down {
                    let _ = reply.send(Err(RestartError::Unavailable {
                        reason: "is shutting down".into(),
                    }));
                    return Ok(());
                }
                let Some(i) = st.args.children.iter().position(|c| c.name == name) else {
                    let _ = reply.send(Err(RestartError::UnknownChild { name }));
                    return Ok(());
                };
                st.stop_from(i).await;
                let mut result = Ok(());
                // Started here, not through a backoff: the caller waits for the new state.
                while let Some(&j) = st.pending.iter().next() {
                    let spec = &st.args.children[j];
                    match (spec.start)(myself.get_cell()).await {
                        Ok(cell) => {
                            st.pending.remove(&j);
                            st.running[j] = Some(cell);
                            st.status[j].running = true;
                        }
                        Err(e) => {
                            let reason = format!("starting {}: {e:#}", spec.name);
                            result = Err(RestartError::StartFailed {
                                child: spec.name.clone(),
                                reason: reason.clone(),
                            });
                            st.stop_from(j + 1).await;
                            st.failed(&myself, j, reason)?;
                            break;
                        }
                    }
                }
                let _ = reply.send(result);
            }
            SupervisorMsg::Status(reply) => {
                let _ = reply.send(st.status.clone());
            }
            SupervisorMsg::Shutdown(reply) => {
                st.shutting_down = true;
                st.stop_from(0).await;
                st.pending.clear();
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match evt {
            SupervisionEvent::ActorFailed(cell, e) => (cell, format!("failed: {e}")),
            SupervisionEvent::ActorTerminated(cell, _, why) => (
                cell,
                format!(
                    "stopped unasked ({})",
                    why.unwrap_or_else(|| "no reason".into())
                ),
            ),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if st.stopping.remove(&id) || st.shutting_down {
            return Ok(());
        }
        let Some(i) = st
            .running
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.get_id() == id))
        else {
            // An exit from a child already replaced.
            return Ok(());
        };
        st.running[i] = None;
        st.status[i].running = false;
        st.pending.insert(i);
        if st.args.children[i].strategy == Strategy::RestForOne {
            st.stop_from(i + 1).await;
        }
        st.failed(&myself, i, reason)
    }
}

/// A typed handle to a running supervisor.
#[derive(Clone, Debug)]
pub struct SupervisorHandle {
    actor: ActorRef<SupervisorMsg>,
}

impl SupervisorHandle {
    /// Starts a supervisor and, in order, its children; fails if any child fails to start.
    pub async fn spawn(
        args: SupervisorArgs,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let name = args.name.clone();
        let (actor, join) = Actor::spawn(None, Supervisor, args)
            .await
            .map_err(|e| anyhow::anyhow!("starting supervisor {name}: {e}"))?;
        Ok((Self { actor }, join))
    }

    /// Starts a supervisor under another (its failures escalate there).
    pub async fn spawn_linked(
        args: SupervisorArgs,
        parent: ActorCell,
    ) -> anyhow::Result<(Self, tokio::task::JoinHandle<()>)> {
        let name = args.name.clone();
        let (actor, join) = Actor::spawn_linked(None, Supervisor, args, parent)
            .await
            .map_err(|e| anyhow::anyhow!("starting supervisor {name}: {e}"))?;
        Ok((Self { actor }, join))
    }

    pub fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }

    pub async fn status(&self) -> anyhow::Result<Vec<ChildStatus>> {
        match self.actor.call(SupervisorMsg::Status, None).await {
            Ok(CallResult::Success(s)) => Ok(s),
            Ok(_) => anyhow::bail!("the supervisor stopped before replying"),
            Err(e) => anyhow::bail!("the supervisor is not running: {e}"),
        }
    }

    /// Restarts child `name` and every child after it, returning once they run again.
    pub async fn restart_from(&self, name: &str) -> Result<(), RestartError> {
        let name = name.to_owned();
        match self
            .actor
            .call(|reply| SupervisorMsg::RestartFrom { name, reply }, None)
            .await
        {
            Ok(CallResult::Success(r)) => r,
            Ok(_) => Err(RestartError::Unavailable {
                reason: "stopped before replying".into(),
            }),
            Err(e) => Err(RestartError::Unavailable {
                reason: format!("is not running: {e}"),
            }),
        }
    }

    /// Stops every child (last started first), then the supervisor.
    pub async fn shutdown(&self) {
        let _ = self.actor.call(SupervisorMsg::Shutdown, None).await;
        self.actor.stop(None);
    }
}

#[cfg(test)]
mod tests;
