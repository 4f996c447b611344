//! The Validator actor: test-then-train evaluation of every new version, and the publication
//! of those that pass the gate.
//!
//! - **Takes in:** each version's manifest as the CheckpointWriter writes it.
//! - **Reads:** the sample log from the candidate's `sample_offsets` on: samples the candidate
//!   has not trained on, so it never scores a sample it learned from. The reference version
//!   (below) scores the same samples, so the two are compared on equal terms.
//! - **Sends out:** the verdict into the version's manifest (`validation`), `Publish(v)` to
//!   the replicas, and, with `auto_rollback`, a rollback request once failures raise the
//!   alert. When it publishes depends on `validation.publish`:
//!   - `guarded` (the default): every version as soon as it arrives, so serving follows
//!     training whatever the traffic. The candidate is compared with the *reference*, the last
//!     version that passed. A candidate that fails is withdrawn: the replicas go back to the
//!     reference, and publishing pauses until a candidate passes, which is then published.
//!     Before any version has passed there is nothing better to go back to, and serving
//!     follows the newest version;
//!   - `after_validation`: a version when it passes; the reference is the version serving
//!     when its evaluation began.
//! - **Keeps:** its own weights-only copy of the candidate, the evaluation in progress and its
//!   counters. Versions that arrive while one is being scored wait; when the verdict is in,
//!   the copy is brought through each of them (deltas) and only the newest is scored: it holds
//!   everything the skipped ones trained on, and serving never waits behind a backlog.
//! - **Verdicts** are due at `min_samples` samples, or `window_ms` after the evaluation began
//!   on the samples it has ([`super::gate::due`]), so a quiet stream still gets decisions.
//! - **Restart.** From [`ValidatorArgs`]: the copy is restored from the newest version, the
//!   consecutive-failure count is recounted from the manifests, and the reference is read
//!   from the store; publishing is not paused.
//!
//! Fault points: `validator.candidate` (when a version arrives).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::gate::{due, judge, GateConfig, Publish};
use crate::ckpt::writer::CheckpointHandle;
use crate::ckpt::{CkptError, Manifest, ModelStore, Validation};
use crate::dense::Threads;
use crate::envelope::{Envelope, TraceContext};
use crate::fault::Faults;
use crate::metrics::{evaluate, Evaluation, WindowedAuc};
use crate::sample::SampleBlock;
use crate::serving::ReplicaSet;
use crate::serving::{ModelDelta, ServingModel};
use crate::stream::StreamLog;
use crate::telemetry;
use crate::training::feed::SampleFeed;

/// Called with the version to roll back to when the alert rises and `auto_rollback` is on.
/// It must not wait for the rollback: the rollback restarts the validator.
pub type RollbackFn = Arc<dyn Fn(u64) + Send + Sync>;

#[derive(Clone)]
pub struct ValidatorArgs {
    pub store: ModelStore,
    pub samples: Arc<dyn StreamLog>,
    pub writer: CheckpointHandle,
    pub replicas: ReplicaSet,
    pub gate: GateConfig,
    pub threads: Arc<Threads>,
    pub rollback: Option<RollbackFn>,
    pub faults: Faults,
}

impl std::fmt::Debug for ValidatorArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidatorArgs")
            .field("store", &self.store)
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

/// The validator's observable state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ValidatorStatus {
    pub evaluated: u64,
    pub passed: u64,
    pub failed: u64,
    /// Versions never scored because a newer one arrived before their turn.
    pub skipped: u64,
    /// Failed versions since the last one that passed.
    pub consecutive_failures: u32,
    /// Raised when `consecutive_failures` reaches `gate.alert_after`.
    pub alert: bool,
    pub auto_rollbacks: u64,
    /// Versions sent to the replicas, and failed ones withdrawn from them (`guarded`).
    pub published: u64,
    pub withdrawn: u64,
    /// `guarded`: a version was withdrawn and no candidate has passed since, so new versions
    /// wait for their verdict.
    pub publish_paused: bool,
    /// The version candidates are compared with.
    pub reference: Option<u64>,
    /// The version being scored, and its samples so far.
    pub evaluating: Option<u64>,
    pub evaluating_samples: u64,
    pub last_passed: Option<u64>,
    pub last_verdict: Option<(u64, Validation)>,
    /// Over the most recent samples: the metrics of what the replicas served (the candidate
    /// while `guarded` publishes, else the reference) and of the candidates.
    pub serving_window: Option<Evaluation>,
    pub candidate_window: Option<Evaluation>,
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub enum ValidatorRequest {
    Candidate(Box<Manifest>),
    /// Read more samples for the evaluation in progress (sent to itself).
    Poll,
    Status(RpcReplyPort<ValidatorStatus>),
}

pub type ValidatorMsg = Envelope<ValidatorRequest>;

#[derive(Debug, Default)]
pub struct Validator;

struct Eval {
    version: u64,
    feed: SampleFeed,
    began: Instant,
    /// The version the candidate is compared with, scored on the same samples.
    serving: Option<Arc<ServingModel>>,
    /// Whether the replicas serve the candidate (guarded and published).
    candidate_served: bool,
    candidate_preds: Vec<f32>,
    serving_preds: Vec<f32>,
    labels: Vec<f32>,
    /// `version.validate`, a child of the version's life; it ends with the verdict.
    span: tracing::Span,
}

pub struct ValidatorState {
    args: ValidatorArgs,
    candidate: Option<ServingModel>,
    /// `guarded`: the last version that passed, what a failed candidate is compared with and
    /// withdrawn to.
    reference: Option<Arc<ServingModel>>,
    eval: Option<Eval>,
    /// Versions written since the evaluation in progress began, oldest first.
    waiting: std::collections::VecDeque<Manifest>,
    block: SampleBlock,
    status: ValidatorStatus,
    serving_window: WindowedAuc,
    candidate_window: WindowedAuc,
    polling: bool,
    /// The trace of each waiting or scored version's life, when it is traced.
    lives: std::collections::BTreeMap<u64, TraceContext>,
}

/// Versions whose trace the validator remembers at most (the oldest go first).
const LIVES: usize = 64;

impl std::fmt::Debug for ValidatorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidatorState")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// The validator's pins in the model store: the version it scores, so that retention does not
/// delete it (and the chain it restores from) mid-evaluation, and the newest version that
/// passed, the reference in `guarded` and the target of `auto_rollback`.
pub const PIN_EVALUATING: &str = "validator";
pub const PIN_PASSED: &str = "validator-passed";

/// Whether `e` says a version's files are gone: retention deleted it after it was announced.
fn deleted(e: &anyhow::Error) -> bool {
    e.downcast_ref::<CkptError>()
        .is_some_and(|e| matches!(e, CkptError::Missing { .. }))
}

/// Samples read per poll.
const POLL_RECORDS: usize = 4096;
/// Wait before reading again when no new sample had arrived.
const IDLE: Duration = Duration::from_millis(5);
/// Samples behind the status line's windowed metrics.
const WINDOW: usize = 20_000;

impl ValidatorState {
    /// Brings the candidate copy to `m`: a delta on the copy when it is the parent, else the
    /// whole version.
    async fn follow(&mut self, m: &Manifest) -> anyhow::Result<()> {
        let store = self.args.store.clone();
        let v = m.version;
        let is_delta =
            m.parent.is_some() && m.parent == self.candidate.as_ref().map(ServingModel::version);
        if is_delta {
            let (manifest, dense, shards) =
                tokio::task::spawn_blocking(move || store.read_delta(v)).await??;
            let delta = ModelDelta {
                manifest,
                dense,
                shards,
            };
            if let Some(c) = self.candidate.as_mut() {
                if let Err(e) = c.apply(&delta) {
                    self.candidate = None;
                    return Err(e.into());
                }
            }
        } else {
            let restored = tokio::task::spawn_blocking(move || store.restore(v, None)).await??;
            self.candidate = Some(ServingModel::from_restored(restored)?);
        }
        Ok(())
    }

    /// Brings the copy through every waiting version and starts scoring the newest.
    async fn next(&mut self) {
        while let Some(m) = self.waiting.pop_front() {
            if let Err(e) = self.follow(&m).await {
                self.candidate = None;
                if deleted(&e) {
                    // The writer moved on faster than the validator scores; a newer version
                    // is on its way.
                    tracing::warn!(version = m.version, error = %format!("{e:#}"), "a candidate was deleted by retention before it was scored");
                    self.lives.remove(&m.version);
                    self.status.skipped += 1;
                    continue;
                }
                tracing::error!(version = m.version, error = %format!("{e:#}"), "could not load the candidate; waiting for the next version");
                self.status.last_error = Some(format!("version {}: {e:#}", m.version));
                continue;
            }
            if self.waiting.is_empty() {
                if self.args.gate.publish == Publish::Guarded && self.reference.is_none() {
                    self.load_reference().await;
                }
                self.block = SampleBlock::for_schema(&m.schema);
                self.begin(&m);
            } else {
                if let Some(life) = self.lives.remove(&m.version) {
                    let span = telemetry::received(&life, || {
                        tracing::info_span!(target: telemetry::TARGET, "version.validate",
                            freshet.version = m.version as i64, freshet.skipped = true)
                    });
                    telemetry::add_event(
                        &span,
                        "skipped",
                        vec![(
                            "reason",
                            "a newer version arrived before it was scored".into(),
                        )],
                    );
                }
                self.status.skipped += 1;
            }
        }
    }

    fn begin(&mut self, m: &Manifest) {
        pin(&self.args.store, PIN_EVALUATING, m.version);
        let schema = &m.schema;
        let life = self.lives.get(&m.version).cloned().unwrap_or_default();
        let span = telemetry::received(&life, || {
            tracing::info_span!(target: telemetry::TARGET, "version.validate",
                freshet.version = m.version as i64, freshet.publish = ?self.args.gate.publish)
        });
        self.eval = Some(Eval {
            span,
            version: m.version,
            feed: SampleFeed::new(
                schema,
                self.args.samples.partitions(),
                m.sample_offsets.clone(),
                None,
            ),
            began: Instant::now(),
            serving: match self.args.gate.publish {
                Publish::Guarded => self.reference.clone(),
                Publish::AfterValidation => self.args.replicas.serving(),
            },
            candidate_served: self.args.gate.publish == Publish::Guarded
                && !self.status.publish_paused,
            candidate_preds: Vec::new(),
            serving_preds: Vec::new(),
            labels: Vec::new(),
        });
        self.status.evaluating = Some(m.version);
        self.status.evaluating_samples = 0;
        self.status.reference = self
            .eval
            .as_ref()
            .and_then(|e| e.serving.as_ref())
            .map(|s| s.version());
    }

    /// `guarded`: reads the reference (the newest version that passed) when the validator
    /// has none in memory, as after a restart.
    async fn load_reference(&mut self) {
        let Some(v) = self.status.last_passed else {
            return;
        };
        if self.reference.as_ref().is_some_and(|r| r.version() == v) {
            return;
        }
        let store = self.args.store.clone();
        let restored = tokio::task::spawn_blocking(move || store.restore(v, None)).await;
        match restored
            .map_err(anyhow::Error::from)
            .and_then(|r| Ok(ServingModel::from_restored(r?)?))
        {
            Ok(m) => self.reference = Some(Arc::new(m)),
            Err(e) => {
                tracing::error!(version = v, error = %format!("{e:#}"), "could not read the reference version; candidates are compared with nothing");
                self.status.last_error = Some(format!("reference version {v}: {e:#}"));
            }
        }
    }

    /// Sends `v` to every replica; `parent` is the span of the version's life that decided
    /// it, if traced.
    fn publish(&mut self, v: u64, parent: &TraceContext, why: &'static str) {
        self.status.published += 1;
        let span = telemetry::received(parent, || {
            tracing::info_span!(target: telemetry::TARGET, "version.publish",
                freshet.version = v as i64, freshet.reason = why,
                freshet.replicas = self.args.replicas.handles().len() as i64)
        });
        for err in self
            .args
            .replicas
            .publish_traced(v, &telemetry::context_of(&span))
        {
            tracing::warn!(version = v, error = %err, "a replica missed a publication");
        }
    }

    /// Scores the next samples; returns whether any arrived.
    fn score_more(&mut self) -> anyhow::Result<bool> {
        let (Some(e), Some(c)) = (self.eval.as_mut(), self.candidate.as_ref()) else {
            return Ok(false);
        };
        let want = (self.args.gate.min_samples as usize)
            .saturating_sub(e.labels.len())
            .clamp(1, POLL_RECORDS);
        let pulled = e.feed.pull(&*self.args.samples, want, &mut self.block)?;
        if pulled.rows == 0 {
            return Ok(!pulled.rejected.is_empty());
        }
        let cp = c.score_block(&self.block, &self.args.threads)?;
        let labels: Vec<f32> = self.block.ctr_labels().collect();
        for (&p, &y) in cp.iter().zip(&labels) {
            self.candidate_window.push(p, y);
            if e.candidate_served {
                self.serving_window.push(p, y);
            }
        }
        if let Some(s) = &e.serving {
            // A serving model of another schema cannot score these rows; it is compared on
            // none of them.
            if s.manifest().schema == c.manifest().schema {
                let sp = s.score_block(&self.block, &self.args.threads)?;
                if !e.candidate_served {
                    for (&p, &y) in sp.iter().zip(&labels) {
                        self.serving_window.push(p, y);
                    }
                }
                e.serving_preds.extend(sp);
            } else {
                e.serving = None;
            }
        }
        e.candidate_preds.extend(cp);
        e.labels.extend(labels);
        self.status.evaluating_samples = e.labels.len() as u64;
        Ok(true)
    }

    /// `guarded`: serving goes back to the reference and publishing pauses, unless nothing has
    /// passed yet.
    fn withdraw(&mut self, failed: u64) {
        let Some(to) = self.reference.as_ref().map(|r| r.version()) else {
            tracing::warn!(
                version = failed,
                "no version has passed yet; serving keeps following the newest"
            );
            return;
        };
        if !self.status.publish_paused {
            tracing::warn!(version = failed, to, "withdrawing the failed version from serving; publishing pauses until a candidate passes");
            self.status.withdrawn += 1;
            self.status.publish_paused = true;
            self.publish(to, &TraceContext::none(), "withdrawn_to_reference");
        }
    }

    /// Judges the evaluation once it has its samples.
    fn decide(&mut self) -> anyhow::Result<()> {
        let ready = self.eval.as_ref().is_some_and(|e| {
            let elapsed = e.began.elapsed().as_millis() as u64;
            due(&self.args.gate, e.labels.len() as u64, elapsed)
        });
        if !ready {
            return Ok(());
        }
        let Some(e) = self.eval.take() else {
            return Ok(());
        };
        self.lives.remove(&e.version);
        let cand = evaluate(&e.candidate_preds, &e.labels);
        let serving = e
            .serving
            .as_ref()
            .filter(|_| e.serving_preds.len() == e.labels.len())
            .map(|s| (s.version(), evaluate(&e.serving_preds, &e.labels)));
        let verdict = judge(&self.args.gate, &cand, serving.as_ref().map(|(_, ev)| ev));
        let mut metrics = std::collections::BTreeMap::new();
        metrics.insert("logloss".into(), cand.logloss);
        if let Some(a) = cand.auc {
            metrics.insert("auc".into(), a);
        }
        if let Some(c) = cand.calibration {
            metrics.insert("calibration".into(), c);
        }
        if let Some((sv, s)) = &serving {
            metrics.insert("serving_version".into(), *sv as f64);
            metrics.insert("serving_logloss".into(), s.logloss);
            if let Some(a) = s.auc {
                metrics.insert("serving_auc".into(), a);
            }
            if let Some(c) = s.calibration {
                metrics.insert("serving_calibration".into(), c);
            }
        }
        let validation = Validation {
            passed: verdict.is_ok(),
            samples: cand.samples,
            metrics,
            at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            reason: verdict.as_ref().err().map(ToString::to_string),
        };
        self.status.evaluated += 1;
        self.status.evaluating = None;
        self.status.evaluating_samples = 0;
        // A version rolled back while it was scored keeps its mark and is not published.
        let m = match self
            .args
            .store
            .set_validation(e.version, validation.clone())
        {
            Ok(m) => m,
            Err(err @ CkptError::Missing { .. }) => {
                // Retention read the pins before this version's was written: its files are
                // gone, and so is any use of its verdict.
                tracing::warn!(version = e.version, error = %err, "a version was deleted while it was scored; its verdict is dropped");
                self.status.skipped += 1;
                return Ok(());
            }
            Err(err) => return Err(err.into()),
        };
        if telemetry::is_sampled(&e.span) {
            telemetry::set_attribute(&e.span, "freshet.passed", validation.passed);
            telemetry::set_attribute(&e.span, "freshet.samples", validation.samples as i64);
            for (k, v) in &validation.metrics {
                let key = match k.as_str() {
                    "logloss" => "freshet.logloss",
                    "auc" => "freshet.auc",
                    "calibration" => "freshet.calibration",
                    "serving_version" => "freshet.reference.version",
                    "serving_logloss" => "freshet.reference.logloss",
                    "serving_auc" => "freshet.reference.auc",
                    "serving_calibration" => "freshet.reference.calibration",
                    _ => continue,
                };
                telemetry::set_attribute(&e.span, key, *v);
            }
            if let Some(r) = &validation.reason {
                telemetry::set_attribute(&e.span, "freshet.reason", r.clone());
            }
        }
        let judged = telemetry::context_of(&e.span);
        self.status.last_verdict = Some((e.version, validation));
        match verdict {
            Ok(()) => {
                self.status.passed += 1;
                self.status.consecutive_failures = 0;
                self.status.alert = false;
                if m.rolled_back.is_none() {
                    self.status.last_passed = Some(e.version);
                    pin(&self.args.store, PIN_PASSED, e.version);
                    match self.args.gate.publish {
                        Publish::AfterValidation => self.publish(e.version, &judged, "passed"),
                        Publish::Guarded => {
                            if !e.candidate_served {
                                self.status.publish_paused = false;
                                tracing::info!(
                                    version = e.version,
                                    "a candidate passed; publishing resumes"
                                );
                                self.publish(e.version, &judged, "passed_after_pause");
                            }
                            // A copy, not the candidate itself: the candidate moves on with
                            // the next deltas, the reference stays this version.
                            self.reference = self.candidate.clone().map(Arc::new);
                            self.status.reference = Some(e.version);
                        }
                    }
                }
            }
            Err(reason) => {
                self.status.failed += 1;
                self.status.consecutive_failures += 1;
                tracing::warn!(version = e.version, %reason, consecutive = self.status.consecutive_failures, "version failed validation");
                if self.args.gate.publish == Publish::Guarded {
                    self.withdraw(e.version);
                }
                if self.status.consecutive_failures >= self.args.gate.alert_after {
                    if !self.status.alert {
                        tracing::error!(
                            failures = self.status.consecutive_failures,
                            "validation alert: consecutive versions failed the gate"
                        );
                    }
                    self.status.alert = true;
                    if let (true, Some(rollback), Some(to)) = (
                        self.args.gate.auto_rollback,
                        &self.args.rollback,
                        self.status.last_passed,
                    ) {
                        self.status.auto_rollbacks += 1;
                        tracing::error!(
                            to,
                            "auto_rollback: rolling back to the last version that passed"
                        );
                        rollback(to);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Pins `v` for `holder`. A pin that fails to be written leaves the version to retention: the
/// validator then finds it gone and moves on, which is better than not validating.
fn pin(store: &ModelStore, holder: &str, v: u64) {
    if let Err(e) = store.pin(holder, v) {
        tracing::warn!(version = v, holder, error = %e, "pinning a version against retention failed");
    }
}

/// From the manifests: the failures since the newest passing version, and that version.
fn history(store: &ModelStore) -> anyhow::Result<(u32, Option<u64>)> {
    let mut failures = 0;
    for v in store.versions()?.into_iter().rev() {
        let m = match store.manifest(v) {
            Ok(m) => m,
            // Deleted by retention between the listing and the read.
            Err(CkptError::Missing { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if m.rolled_back.is_some() {
            continue;
        }
        match m.validation {
            Some(val) if val.passed => return Ok((failures, Some(v))),
            Some(_) => failures += 1,
            None => {}
        }
    }
    Ok((failures, None))
}

impl Actor for Validator {
    type Msg = ValidatorMsg;
    type State = ValidatorState;
    type Arguments = ValidatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ValidatorMsg>,
        args: ValidatorArgs,
    ) -> Result<ValidatorState, ActorProcessingErr> {
        let mut rx: mpsc::UnboundedReceiver<Envelope<Manifest>> = args.writer.subscribe()?;
        let me = myself.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let candidate = ValidatorRequest::Candidate(Box::new(m.body));
                if me.cast(Envelope::with_trace(m.trace, candidate)).is_err() {
                    break;
                }
            }
        });
        // A pin left by an evaluation that a crash ended; the next candidate pins its own.
        if let Err(e) = args.store.unpin(PIN_EVALUATING) {
            tracing::warn!(error = %e, "removing the validator's previous pin failed");
        }
        let (failures, last_passed) = history(&args.store)?;
        if let Some(v) = last_passed {
            pin(&args.store, PIN_PASSED, v);
        }
        let status = ValidatorStatus {
            consecutive_failures: failures,
            alert: failures >= args.gate.alert_after,
            last_passed,
            ..ValidatorStatus::default()
        };
        Ok(ValidatorState {
            block: SampleBlock::new(0, 0, 0),
            candidate: None,
            reference: None,
            eval: None,
            waiting: std::collections::VecDeque::new(),
            status,
            serving_window: WindowedAuc::new(WINDOW, 10_000),
            candidate_window: WindowedAuc::new(WINDOW, 10_000),
            polling: false,
            lives: Default::default(),
            args,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ValidatorMsg>,
        msg: ValidatorMsg,
        st: &mut ValidatorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg.body {
            ValidatorRequest::Candidate(m) => {
                st.args.faults.check("validator.candidate");
                if m.rolled_back.is_some() {
                    return Ok(());
                }
                if msg.trace.is_sampled() {
                    st.lives.insert(m.version, msg.trace.clone());
                    while st.lives.len() > LIVES {
                        st.lives.pop_first();
                    }
                }
                if st.args.gate.publish == Publish::Guarded && !st.status.publish_paused {
                    st.publish(m.version, &msg.trace, "guarded");
                }
                st.waiting.push_back(*m);
                if st.eval.is_none() {
                    st.next().await;
                }
                if st.eval.is_some() && !st.polling {
                    st.polling = true;
                    myself.cast(Envelope::new(ValidatorRequest::Poll))?;
                }
            }
            ValidatorRequest::Poll => {
                let started = Instant::now();
                let mut progressed = false;
                // Score until the verdict or until the log has nothing new, within a bound so
                // status requests are not kept waiting.
                while st.eval.is_some() && started.elapsed() < Duration::from_millis(50) {
                    let more = st.score_more();
                    match more {
                        Ok(true) => progressed = true,
                        Ok(false) => {
                            // Nothing new, but the window's time may be up.
                            st.decide()?;
                            if st.eval.is_none() {
                                st.next().await;
                                continue;
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "validation failed to score; dropping this candidate");
                            st.status.last_error = Some(format!("{e:#}"));
                            st.eval = None;
                            st.status.evaluating = None;
                        }
                    }
                    st.decide()?;
                    if st.eval.is_none() {
                        st.next().await;
                    }
                }
                if st.eval.is_none() {
                    st.polling = false;
                } else if progressed {
                    myself.cast(Envelope::new(ValidatorRequest::Poll))?;
                } else {
                    myself.send_after(IDLE, || Envelope::new(ValidatorRequest::Poll));
                }
            }
            ValidatorRequest::Status(reply) => {
                let mut s = st.status.clone();
                s.serving_window =
                    (!st.serving_window.is_empty()).then(|| st.serving_window.evaluation());
                s.candidate_window =
                    (!st.candidate_window.is_empty()).then(|| st.candidate_window.evaluation());
                let _ = reply.send(s);
            }
        }
        Ok(())
    }
}

/// A typed handle to the running validator.
#[derive(Clone, Debug)]
pub struct ValidatorHandle {
    actor: ActorRef<ValidatorMsg>,
}

impl ValidatorHandle {
    pub async fn spawn_linked(args: ValidatorArgs, supervisor: ActorCell) -> anyhow::Result<Self> {
        let (actor, _join) = Actor::spawn_linked(None, Validator, args, supervisor)
            .await
            .map_err(|e| anyhow::anyhow!("starting the validator: {e}"))?;
        Ok(Self { actor })
    }

    pub fn cell(&self) -> ActorCell {
        self.actor.get_cell()
    }

    pub async fn status(&self) -> anyhow::Result<ValidatorStatus> {
        match self
            .actor
            .call(|r| Envelope::new(ValidatorRequest::Status(r)), None)
            .await
        {
            Ok(CallResult::Success(s)) => Ok(s),
            Ok(_) => anyhow::bail!("the validator stopped before replying"),
            Err(e) => anyhow::bail!("the validator is not running: {e}"),
        }
    }
}
