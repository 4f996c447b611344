//! The ModelFollower actor: on a serving node, keeps a mirror of the trainer node's model
//! store and its serving replica at the trainer node's last publication.
//!
//! - **Takes in:** notices of publication (from the endpoint, through
//!   [`ClusterNode::notices`]) and a catch-up tick.
//! - **Asks:** the trainer node for each version of the published one's chain that the mirror
//!   lacks, newest first, until one the mirror has or a full version; then tells the local
//!   replica. A node that was down or cut off thus gets a full version and the deltas after
//!   it, or only the deltas after what it serves.
//! - **Keeps:** the mirror (checked writes, [`ModelStore::import_version`]), retained as the
//!   trainer node retains its store; the sequence of the last publication applied, so that a
//!   late notice never takes serving back; counters, which its handle reads without a
//!   message (a fetch may take a while, and `/healthz` answers meanwhile).
//!
//! **Restart.** Built from [`FollowerArgs`]: the mirror is on disk, the replica keeps serving,
//! and the first catch-up brings both to the trainer node's last publication.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use freshet_actors::ckpt::ModelStore;
use freshet_actors::serving::replica::ReplicaHandle;
use freshet_actors::telemetry;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;

use super::protocol::Published;
use super::{lock, ClusterNode};
use crate::membership::Role;

#[derive(Debug, Clone)]
pub struct FollowerArgs {
    pub cluster: ClusterNode,
    /// This node's copy of the versions it serves (`<data_dir>/models`).
    pub mirror: ModelStore,
    pub replica: ReplicaHandle,
    /// Full versions the mirror keeps with their deltas (`[checkpoint] keep_full`).
    pub keep_full: usize,
    /// How often the trainer node is asked for its last publication, notices or not.
    pub catch_up_every: Duration,
}

#[derive(Debug)]
pub enum FollowerMsg {
    Notice(String, Published),
    CatchUp,
}

/// What `/healthz` and `/metrics` of a serving node show.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FollowerStatus {
    /// The trainer node followed: the last to send a notice, else the first up with the role.
    pub source: Option<String>,
    /// Whether the source is reachable now: `false` while the node is cut off from it.
    pub reachable: bool,
    /// The last publication applied, and its version.
    pub seq: Option<u64>,
    pub version: Option<u64>,
    /// Milliseconds since the source last answered or sent a notice.
    pub last_heard_ms_ago: Option<u64>,
    pub notices: u64,
    pub catch_ups: u64,
    pub versions_fetched: u64,
    pub bytes_fetched: u64,
    /// Time spent asking for versions and receiving them, and writing them to the mirror, in
    /// milliseconds over the follower's life: where a publication's way to serving goes.
    pub fetch_ms_total: f64,
    pub write_ms_total: f64,
    /// The last publication brought to serving: milliseconds from taking it up (a notice or a
    /// catch-up) to telling the replica, fetches and writes included.
    pub last_follow_ms: Option<f64>,
    pub failures: u64,
    pub last_error: Option<String>,
}

// Local only: never sent to another node.
impl ractor::Message for FollowerMsg {}

#[derive(Debug, Default)]
pub struct ModelFollower;

/// The counters as the handle reads them, copied after each message (private to the actor and
/// its handle).
#[derive(Debug, Default)]
pub struct Observed {
    status: FollowerStatus,
    last_heard: Option<Instant>,
}

#[derive(Debug)]
pub struct FollowerState {
    args: FollowerArgs,
    status: FollowerStatus,
    last_heard: Option<Instant>,
    observed: Arc<Mutex<Observed>>,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The trainer node to follow: `known` (the last to send a notice), else the first node up
/// with the trainer role.
fn source_of(cluster: &ClusterNode, known: Option<&str>) -> Option<String> {
    if let Some(s) = known {
        return Some(s.to_owned());
    }
    let me = cluster.name().to_owned();
    (cluster.up_with(Role::Trainer).into_iter()).find(|n| *n != me)
}

impl FollowerState {
    /// Brings the mirror and the replica to `p`, fetched from `from`.
    async fn apply(&mut self, from: &str, p: Published) -> anyhow::Result<()> {
        if self.status.seq.is_some_and(|s| s >= p.seq) {
            return Ok(());
        }
        let span = telemetry::received(&p.trace, || {
            tracing::info_span!(target: telemetry::TARGET, "model.follow",
                freshet.version = p.version as i64, freshet.source = %from,
                freshet.versions_fetched = tracing::field::Empty)
        });
        // Retention first: what the replica serves is pinned, and what is fetched next is
        // newer than anything it could delete.
        let mirror = self.args.mirror.clone();
        let keep = self.args.keep_full;
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || mirror.retain(keep)).await {
            tracing::warn!(error = %e, "retention of the model mirror");
        }
        let began = Instant::now();
        let mut fetched = 0u64;
        let mut want = Some(p.version);
        while let Some(v) = want {
            let mirror = self.args.mirror.clone();
            if tokio::task::spawn_blocking(move || mirror.manifest(v).is_ok()).await? {
                break;
            }
            let asked = Instant::now();
            let files = self.args.cluster.fetch_version(from, v).await?;
            self.status.fetch_ms_total += ms_since(asked);
            let bytes: usize =
                files.manifest.len() + files.files.iter().map(|f| f.bytes.len()).sum::<usize>();
            let mirror = self.args.mirror.clone();
            let writing = Instant::now();
            let m = tokio::task::spawn_blocking(move || mirror.import_version(&files)).await??;
            self.status.write_ms_total += ms_since(writing);
            fetched += 1;
            self.status.versions_fetched += 1;
            self.status.bytes_fetched += bytes as u64;
            want = match m.parent {
                Some(parent) if parent < v => Some(parent),
                Some(parent) => anyhow::bail!("version {v} names parent {parent}, not older"),
                None => None,
            };
        }
        span.record("freshet.versions_fetched", fetched as i64);
        self.args
            .replica
            .publish_traced(p.version, telemetry::context_of(&span))?;
        tracing::debug!(version = p.version, fetched, source = %from, "following a publication");
        self.status.seq = Some(p.seq);
        self.status.version = Some(p.version);
        self.status.last_follow_ms = Some(ms_since(began));
        Ok(())
    }

    fn source(&self) -> Option<String> {
        source_of(&self.args.cluster, self.status.source.as_deref())
    }

    fn heard(&mut self, from: &str) {
        self.last_heard = Some(Instant::now());
        self.status.source = Some(from.to_owned());
    }

    fn failed(&mut self, what: &str, e: &anyhow::Error) {
        self.status.failures += 1;
        let msg = format!("{what}: {e:#}");
        // Once per new reason: a cut-off node fails every catch-up the same way.
        if self.status.last_error.as_deref() != Some(&msg) {
            tracing::warn!(error = %msg, "the model follower could not bring serving forward; it serves what it has");
        }
        self.status.last_error = Some(msg);
    }
}

impl Actor for ModelFollower {
    type Msg = FollowerMsg;
    type State = FollowerState;
    type Arguments = (FollowerArgs, Arc<Mutex<Observed>>);

    async fn pre_start(
        &self,
        myself: ActorRef<FollowerMsg>,
        (args, observed): (FollowerArgs, Arc<Mutex<Observed>>),
    ) -> Result<FollowerState, ActorProcessingErr> {
        // Notices and ticks in, until the actor stops (a send fails).
        let mut notices = args.cluster.notices();
        let me = myself.clone();
        tokio::spawn(async move {
            while notices.changed().await.is_ok() {
                let notice = notices.borrow_and_update().clone();
                if let Some((from, p)) = notice {
                    if me.send_message(FollowerMsg::Notice(from, p)).is_err() {
                        break;
                    }
                }
            }
        });
        let every = args.catch_up_every.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if myself.send_message(FollowerMsg::CatchUp).is_err() {
                    break;
                }
            }
        });
        // A restart starts over from the mirror; the counters go on.
        let (status, last_heard) = {
            let o = lock(&observed);
            (o.status.clone(), o.last_heard)
        };
        Ok(FollowerState {
            args,
            status: FollowerStatus {
                seq: None,
                ..status
            },
            last_heard,
            observed,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<FollowerMsg>,
        msg: FollowerMsg,
        st: &mut FollowerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FollowerMsg::Notice(from, p) => {
                st.status.notices += 1;
                st.heard(&from);
                let version = p.version;
                if let Err(e) = st.apply(&from, p).await {
                    st.failed(&format!("version {version} from node {from}"), &e);
                }
            }
            FollowerMsg::CatchUp => {
                let Some(from) = st.source() else {
                    return Ok(());
                };
                if !st.args.cluster.reachable(&from) {
                    return Ok(());
                }
                match st.args.cluster.newest_published(&from).await {
                    Ok(Some(p)) => {
                        st.heard(&from);
                        if st.status.seq.is_some_and(|s| s >= p.seq) {
                            return Ok(());
                        }
                        st.status.catch_ups += 1;
                        let version = p.version;
                        if let Err(e) = st.apply(&from, p).await {
                            st.failed(&format!("catching up to version {version}"), &e);
                        } else {
                            st.status.last_error = None;
                        }
                    }
                    Ok(None) => st.heard(&from),
                    Err(e) => st.failed(&format!("asking node {from}"), &e.into()),
                }
            }
        }
        *lock(&st.observed) = Observed {
            status: st.status.clone(),
            last_heard: st.last_heard,
        };
        Ok(())
    }
}

/// A typed handle to a ModelFollower.
#[derive(Debug, Clone)]
pub struct FollowerHandle {
    actor: ActorRef<FollowerMsg>,
    observed: Arc<Mutex<Observed>>,
    cluster: ClusterNode,
}

impl FollowerHandle {
    pub async fn spawn(
        args: FollowerArgs,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), ractor::SpawnErr> {
        let observed = Arc::new(Mutex::new(Observed::default()));
        let cluster = args.cluster.clone();
        let (actor, join) = Actor::spawn(None, ModelFollower, (args, observed.clone())).await?;
        Ok((
            Self {
                actor,
                observed,
                cluster,
            },
            join,
        ))
    }

    /// The follower's counters as of its last message handled, with whether its source is
    /// reachable now. Never waits on the actor.
    pub fn status(&self) -> FollowerStatus {
        let (mut s, heard) = {
            let o = lock(&self.observed);
            (o.status.clone(), o.last_heard)
        };
        s.source = source_of(&self.cluster, s.source.as_deref());
        s.reachable = (s.source.as_deref()).is_some_and(|n| self.cluster.reachable(n));
        s.last_heard_ms_ago = heard.map(|t| t.elapsed().as_millis() as u64);
        s
    }

    pub fn stop(&self) {
        self.actor.stop(None);
    }
}
