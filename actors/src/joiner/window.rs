//! The joiner's pure core: the event-time window that turns impressions and actions into
//! labelled samples.
//!
//! - Actions join impressions by `(request id, item)`.
//! - The watermark is the largest event time seen minus the allowed lateness.
//! - A positive is emitted as soon as a matching action arrives; a negative once the watermark
//!   reaches the impression's time plus the window.
//! - After its sample is out, an impression is remembered for `remember_closed_ms` more, so a
//!   duplicate impression or action is recognised and a late action can emit a correction.
//! - An action with no impression waits for one (events arrive out of order) until its own
//!   window has passed, and is then dead-lettered.
//!
//! Architecture invariant: the output is a function of the input *sequence* alone (no clock,
//! no hash-map iteration order, no batch boundaries), because exactly-once restarts rebuild
//! the outputs after a checkpoint by replaying the input and must get the same records.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::embedding::InvalidValue;
use crate::event::{Action, Event, EventError, Impression, JoinedSample, SampleKind, Snapshot};
use crate::sample::hash::feature_id;
use crate::stream::Offset;

/// What a late action does once its impression's sample is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Count it and drop it.
    Drop,
    /// Emit the sample again with the labels known now, marked [`SampleKind::Correction`].
    Correction,
}

/// What happens when the window state is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Drop the oldest open impression: it yields no sample (counted as `evicted_unlabelled`).
    DropOldest,
    /// Close the oldest open impression early: it yields its negative now, and a click that
    /// comes later follows the late policy. Keeps "one sample per impression".
    CloseOldest,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinConfig {
    /// How long after an impression an action still labels it (event time).
    pub window_ms: u64,
    /// How far behind the newest event time the watermark trails, for out-of-order events.
    pub allowed_lateness_ms: u64,
    /// The action kinds, one label each, in label order (CTR first).
    pub kinds: Vec<String>,
    pub late_policy: LatePolicy,
    /// Keep each negative with this probability and weight it `1 / rate`.
    pub negative_rate: f64,
    /// Seeds the negative sampling decision (a hash of request, item and this seed, so a replay
    /// keeps the same negatives).
    pub negative_seed: u64,
    /// Impressions and waiting actions held at most; see `on_full`.
    pub max_state: usize,
    pub on_full: OnFull,
    /// How long a closed impression is remembered for duplicates and late actions.
    pub remember_closed_ms: u64,
    /// Events whose time is further ahead of their append time are refused: one bad clock
    /// would otherwise push the watermark forward and close every open window.
    pub max_future_ms: u64,
}

impl Default for JoinConfig {
    fn default() -> Self {
        Self {
            window_ms: 10 * 60 * 1000,
            allowed_lateness_ms: 10_000,
            kinds: vec!["click".into()],
            late_policy: LatePolicy::Correction,
            negative_rate: 1.0,
            negative_seed: 0,
            max_state: 2_000_000,
            on_full: OnFull::CloseOldest,
            remember_closed_ms: 10 * 60 * 1000,
            max_future_ms: 3_600_000,
        }
    }
}

impl JoinConfig {
    /// Checks the values; `prefix` names this section in errors (such as `joiner.window`).
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidValue> {
        let key = |k: &str| format!("{prefix}.{k}");
        if self.kinds.is_empty() || self.kinds.len() > 32 {
            return Err(InvalidValue::new(
                key("kinds"),
                format!("{:?}", self.kinds),
                "1 to 32 action kinds",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for k in &self.kinds {
            if k.is_empty() || !seen.insert(k) {
                return Err(InvalidValue::new(
                    key("kinds"),
                    format!("{k:?}"),
                    "distinct, non-empty kind names",
                ));
            }
        }
        if !(self.negative_rate > 0.0 && self.negative_rate <= 1.0) {
            return Err(InvalidValue::new(
                key("negative_rate"),
                self.negative_rate,
                "a rate in (0, 1]",
            ));
        }
        if self.max_state < 1 {
            return Err(InvalidValue::new(key("max_state"), 0, "at least 1"));
        }
        const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;
        for (name, v, min) in [
            ("window_ms", self.window_ms, 1),
            ("allowed_lateness_ms", self.allowed_lateness_ms, 0),
            ("remember_closed_ms", self.remember_closed_ms, 0),
            ("max_future_ms", self.max_future_ms, 0),
        ] {
            if v < min || v > YEAR_MS {
                return Err(InvalidValue::new(
                    key(name),
                    v,
                    format!("milliseconds in {min}..={YEAR_MS}"),
                ));
            }
        }
        Ok(())
    }
}

/// The joiner's counters: its observable state, checkpointed with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinCounters {
    pub impressions: u64,
    pub actions: u64,
    pub positives: u64,
    pub negatives: u64,
    /// Negatives left out by downsampling.
    pub negatives_sampled_out: u64,
    pub corrections: u64,
    /// Late actions dropped under [`LatePolicy::Drop`].
    pub late_dropped: u64,
    pub duplicate_impressions: u64,
    /// Impressions whose whole window was already behind the watermark when they arrived:
    /// their sample is a negative at once, and a click for them comes as a correction. Counted
    /// here so that a late producer shows as late impressions, not as corrections alone.
    #[serde(default)]
    pub late_impressions: u64,
    pub duplicate_actions: u64,
    /// Actions whose impression never came within their window.
    pub orphan_actions: u64,
    /// Impressions dropped unlabelled because the state was full ([`OnFull::DropOldest`]).
    pub evicted_unlabelled: u64,
    /// Impressions closed early because the state was full ([`OnFull::CloseOldest`]).
    pub closed_early: u64,
    /// Closed impressions forgotten early because the state was full.
    pub forgotten_early: u64,
    /// Malformed or refused input records, dead-lettered.
    pub malformed: u64,
}

/// `(request id, item)`, hashed to 128 bits: two independent 64-bit stable hashes, so the
/// queues hold a small copyable key and collisions are out of reach (2^-64 at 2^32 pairs).
type Key = u128;

fn key(request_id: &str, item: &str) -> Key {
    let a = feature_id("join.request", request_id);
    let b = feature_id("join.item", item);
    let lo = crate::routing::mix64(a ^ b.rotate_left(17));
    let hi = crate::routing::mix64(b ^ a.rotate_left(41) ^ 0x5851_f42d_4c95_7f2d);
    (u128::from(hi) << 64) | u128::from(lo)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Shown {
    request_id: String,
    item: String,
    user: String,
    time_ms: i64,
    /// Where the impression is in the event log.
    offset: Offset,
    /// The feature snapshot. Left out of checkpoints, which would otherwise carry every open
    /// impression's features (hundreds of bytes each) every few seconds; a restored window
    /// reads them back from the event log at `offset` (see [`Window::hydrate`]).
    #[serde(skip)]
    features: Option<Snapshot>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Waiting {
    kind: u8,
    time_ms: i64,
    offset: Offset,
    action: Action,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Entry {
    /// Inside its window. `labels` is a bit per kind; `emitted` once its first sample is out.
    Open {
        shown: Shown,
        labels: u32,
        emitted: bool,
        due: (i64, u64),
    },
    /// Its sample is out and its window closed; remembered until `forget.0`.
    Closed {
        shown: Shown,
        labels: u32,
        forget: (i64, u64),
    },
    /// Actions waiting for their impression.
    Orphan {
        waiting: Vec<Waiting>,
        due: (i64, u64),
    },
}

/// Something the window emits.
#[derive(Clone, Debug, PartialEq)]
pub enum Emit {
    Sample(JoinedSample),
    /// An action whose impression never came: set aside with its input offset.
    Orphan {
        offset: Offset,
        action: Action,
        reason: &'static str,
    },
}

/// The whole window state; a checkpoint is this, serialized.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WindowState {
    entries: HashMap<Key, Entry, ahash::RandomState>,
    /// Open impressions by `(due time, sequence)`.
    open_q: BTreeMap<(i64, u64), Key>,
    /// Orphan actions by `(due time, sequence)`.
    orphan_q: BTreeMap<(i64, u64), Key>,
    /// Closed impressions in forgetting order. Due times only grow here, because impressions
    /// close in due order; `forget.1` tells a stale entry from a re-opened key.
    closed_q: VecDeque<((i64, u64), Key)>,
    max_time: Option<i64>,
    seq: u64,
    pub counters: JoinCounters,
}

/// The window: configuration plus state.
#[derive(Debug)]
pub struct Window {
    cfg: JoinConfig,
    st: WindowState,
}

impl Window {
    pub fn new(cfg: JoinConfig) -> Self {
        Self::restore(cfg, WindowState::default())
    }

    pub fn restore(cfg: JoinConfig, st: WindowState) -> Self {
        Self { cfg, st }
    }

    pub fn state(&self) -> &WindowState {
        &self.st
    }

    pub fn config(&self) -> &JoinConfig {
        &self.cfg
    }

    pub fn counters(&self) -> &JoinCounters {
        &self.st.counters
    }

    pub fn counters_mut(&mut self) -> &mut JoinCounters {
        &mut self.st.counters
    }

    /// Entries held: open and closed impressions and waiting actions.
    pub fn len(&self) -> usize {
        self.st.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.st.entries.is_empty()
    }

    /// Event-log offsets of the impressions whose snapshots a restored window still lacks,
    /// ascending.
    pub fn missing_snapshots(&self) -> Vec<Offset> {
        let mut v: Vec<Offset> = self
            .st
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Open { shown, .. } | Entry::Closed { shown, .. } => {
                    shown.features.is_none().then_some(shown.offset)
                }
                Entry::Orphan { .. } => None,
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// The lowest event-log offset an entry refers to: a restored window reads the snapshots
    /// of its impressions back from there on. `None` when no impression is held.
    pub fn oldest_offset(&self) -> Option<Offset> {
        self.st
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Open { shown, .. } | Entry::Closed { shown, .. } => Some(shown.offset),
                Entry::Orphan { .. } => None,
            })
            .min()
    }

    /// Puts back the snapshots a checkpoint left out, read from the event log by offset.
    /// Returns how many impressions still lack theirs.
    pub fn hydrate(&mut self, snapshots: &HashMap<Offset, Snapshot>) -> usize {
        let mut missing = 0;
        for e in self.st.entries.values_mut() {
            if let Entry::Open { shown, .. } | Entry::Closed { shown, .. } = e {
                if shown.features.is_none() {
                    shown.features = snapshots.get(&shown.offset).cloned();
                    missing += usize::from(shown.features.is_none());
                }
            }
        }
        missing
    }

    /// Largest event time seen minus the allowed lateness.
    pub fn watermark(&self) -> Option<i64> {
        self.st
            .max_time
            .map(|t| t.saturating_sub(self.cfg.allowed_lateness_ms as i64))
    }

    fn kind_index(&self, kind: &str) -> Option<u8> {
        self.cfg
            .kinds
            .iter()
            .position(|k| k == kind)
            .map(|i| i as u8)
    }

    fn next_seq(&mut self) -> u64 {
        self.st.seq += 1;
        self.st.seq
    }

    /// Takes one validated event (read at `offset`) and appends what it causes to `out`.
    ///
    /// An action of an unknown kind is refused before it touches any state.
    pub fn on_event(
        &mut self,
        offset: Offset,
        event: Event,
        out: &mut Vec<Emit>,
    ) -> Result<(), EventError> {
        if let Event::Action(a) = &event {
            if self.kind_index(&a.kind).is_none() {
                return Err(EventError::UnknownKind {
                    kind: a.kind.clone(),
                    known: self.cfg.kinds.clone(),
                });
            }
        }
        let t = event.time_ms();
        self.st.max_time = Some(self.st.max_time.map_or(t, |m| m.max(t)));
        match event {
            Event::Impression(i) => self.on_impression(offset, i, out),
            Event::Action(a) => self.on_action(offset, a, out),
        }
        self.advance(out);
        self.enforce_capacity(out);
        Ok(())
    }

    fn on_impression(&mut self, offset: Offset, i: Impression, out: &mut Vec<Emit>) {
        self.st.counters.impressions += 1;
        let k = key(&i.request_id, &i.item);
        let shown = Shown {
            request_id: i.request_id,
            item: i.item,
            user: i.user,
            time_ms: i.time_ms,
            offset,
            features: Some(i.features),
        };
        let waiting = match self.st.entries.get(&k) {
            Some(Entry::Open { .. } | Entry::Closed { .. }) => {
                self.st.counters.duplicate_impressions += 1;
                return;
            }
            Some(Entry::Orphan { .. }) => match self.st.entries.remove(&k) {
                Some(Entry::Orphan { waiting, due }) => {
                    self.st.orphan_q.remove(&due);
                    waiting
                }
                _ => unreachable!("just matched an orphan"),
            },
            None => Vec::new(),
        };
        let due = (
            shown.time_ms.saturating_add(self.cfg.window_ms as i64),
            self.next_seq(),
        );
        if self.watermark().is_some_and(|w| due.0 <= w) {
            self.st.counters.late_impressions += 1;
        }
        let labels = waiting.iter().fold(0u32, |l, w| l | 1 << w.kind);
        let emitted = labels != 0;
        if emitted {
            self.st.counters.positives += 1;
            out.push(Emit::Sample(self.sample(
                &shown,
                labels,
                SampleKind::Positive,
                1.0,
            )));
        }
        self.st.open_q.insert(due, k);
        self.st.entries.insert(
            k,
            Entry::Open {
                shown,
                labels,
                emitted,
                due,
            },
        );
    }

    fn on_action(&mut self, offset: Offset, a: Action, out: &mut Vec<Emit>) {
        self.st.counters.actions += 1;
        let kind = self.kind_index(&a.kind).expect("checked by on_event");
        let bit = 1u32 << kind;
        let k = key(&a.request_id, &a.item);
        let late_policy = self.cfg.late_policy;
        let mut emit = None;
        match self.st.entries.get_mut(&k) {
            // Nothing labelled it yet (an open impression with no label has emitted nothing).
            Some(Entry::Open {
                shown,
                labels,
                emitted,
                ..
            }) if !*emitted => {
                *labels |= bit;
                *emitted = true;
                self.st.counters.positives += 1;
                emit = Some((shown.clone(), *labels, SampleKind::Positive));
            }
            // Its sample is out, whether or not its window has closed.
            Some(Entry::Open { shown, labels, .. } | Entry::Closed { shown, labels, .. }) => {
                if *labels & bit != 0 {
                    self.st.counters.duplicate_actions += 1;
                } else {
                    *labels |= bit;
                    if late_policy == LatePolicy::Correction {
                        self.st.counters.corrections += 1;
                        emit = Some((shown.clone(), *labels, SampleKind::Correction));
                    } else {
                        self.st.counters.late_dropped += 1;
                    }
                }
            }
            Some(Entry::Orphan { waiting, .. }) => {
                if waiting.iter().any(|w| w.kind == kind) {
                    self.st.counters.duplicate_actions += 1;
                } else {
                    waiting.push(Waiting {
                        kind,
                        time_ms: a.time_ms,
                        offset,
                        action: a,
                    });
                }
            }
            None => {
                let due = (
                    a.time_ms.saturating_add(self.cfg.window_ms as i64),
                    self.next_seq(),
                );
                self.st.orphan_q.insert(due, k);
                self.st.entries.insert(
                    k,
                    Entry::Orphan {
                        waiting: vec![Waiting {
                            kind,
                            time_ms: a.time_ms,
                            offset,
                            action: a,
                        }],
                        due,
                    },
                );
            }
        }
        if let Some((shown, labels, kind)) = emit {
            out.push(Emit::Sample(self.sample(&shown, labels, kind, 1.0)));
        }
    }

    fn sample(&self, shown: &Shown, labels: u32, kind: SampleKind, weight: f64) -> JoinedSample {
        JoinedSample {
            request_id: shown.request_id.clone(),
            item: shown.item.clone(),
            user: shown.user.clone(),
            impression_time_ms: shown.time_ms,
            kind,
            labels: self
                .cfg
                .kinds
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), f64::from((labels >> i) & 1)))
                .collect(),
            weight,
            features: shown.features.clone().unwrap_or_else(|| {
                // Only a restore that skipped `hydrate` gets here.
                tracing::error!(
                    offset = shown.offset,
                    "impression snapshot missing; emitting the sample without features"
                );
                Snapshot::default()
            }),
        }
    }

    /// Whether the negative of `shown` survives downsampling: a fixed function of the pair and
    /// the seed, so a replay keeps exactly the same negatives.
    fn keep_negative(&self, shown: &Shown) -> bool {
        if self.cfg.negative_rate >= 1.0 {
            return true;
        }
        let h = crate::routing::mix64(
            (key(&shown.request_id, &shown.item) as u64) ^ self.cfg.negative_seed,
        );
        ((h >> 11) as f64 / (1u64 << 53) as f64) < self.cfg.negative_rate
    }

    /// Closes the open impression `k`: emits its negative if nothing labelled it.
    fn close(&mut self, k: Key, out: &mut Vec<Emit>) {
        let Some(Entry::Open {
            shown,
            labels,
            emitted,
            due,
        }) = self.st.entries.remove(&k)
        else {
            return;
        };
        self.st.open_q.remove(&due);
        if !emitted {
            if self.keep_negative(&shown) {
                self.st.counters.negatives += 1;
                let w = 1.0 / self.cfg.negative_rate;
                out.push(Emit::Sample(self.sample(
                    &shown,
                    labels,
                    SampleKind::Negative,
                    w,
                )));
            } else {
                self.st.counters.negatives_sampled_out += 1;
            }
        }
        let forget = (
            due.0.saturating_add(self.cfg.remember_closed_ms as i64),
            self.next_seq(),
        );
        self.st.closed_q.push_back((forget, k));
        self.st.entries.insert(
            k,
            Entry::Closed {
                shown,
                labels,
                forget,
            },
        );
    }

    fn forget_front(&mut self) {
        if let Some((forget, k)) = self.st.closed_q.pop_front() {
            if matches!(self.st.entries.get(&k), Some(Entry::Closed { forget: f, .. }) if *f == forget)
            {
                self.st.entries.remove(&k);
            }
        }
    }

    fn dead_letter_orphan(&mut self, k: Key, reason: &'static str, out: &mut Vec<Emit>) {
        if let Some(Entry::Orphan { waiting, due }) = self.st.entries.remove(&k) {
            self.st.orphan_q.remove(&due);
            for w in waiting {
                self.st.counters.orphan_actions += 1;
                out.push(Emit::Orphan {
                    offset: w.offset,
                    action: w.action,
                    reason,
                });
            }
        }
    }

    /// Moves the watermark's consequences forward: closes windows, dead-letters orphans whose
    /// window passed, forgets closed impressions.
    fn advance(&mut self, out: &mut Vec<Emit>) {
        let Some(wm) = self.watermark() else { return };
        while let Some((&due, &k)) = self.st.open_q.first_key_value() {
            if due.0 > wm {
                break;
            }
            self.close(k, out);
        }
        while let Some((&due, &k)) = self.st.orphan_q.first_key_value() {
            if due.0 > wm {
                break;
            }
            self.dead_letter_orphan(k, "no_impression", out);
        }
        while let Some(&(forget, _)) = self.st.closed_q.front() {
            if forget.0 > wm {
                break;
            }
            self.forget_front();
        }
    }

    fn enforce_capacity(&mut self, out: &mut Vec<Emit>) {
        while self.st.entries.len() > self.cfg.max_state {
            if !self.st.closed_q.is_empty() {
                let before = self.st.entries.len();
                self.forget_front();
                if self.st.entries.len() < before {
                    self.st.counters.forgotten_early += 1;
                }
                continue;
            }
            let open = self.st.open_q.first_key_value().map(|(d, k)| (*d, *k));
            let orphan = self.st.orphan_q.first_key_value().map(|(d, k)| (*d, *k));
            let take_open = match (open, orphan) {
                (Some((d, _)), Some((od, _))) => d <= od,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if !take_open {
                let (_, k) = orphan.expect("an orphan is waiting");
                self.dead_letter_orphan(k, "state_full", out);
                continue;
            }
            let (_, k) = open.expect("an impression is open");
            match self.cfg.on_full {
                OnFull::CloseOldest => {
                    self.st.counters.closed_early += 1;
                    self.close(k, out);
                }
                OnFull::DropOldest => {
                    if let Some(Entry::Open { emitted, due, .. }) = self.st.entries.remove(&k) {
                        self.st.open_q.remove(&due);
                        if !emitted {
                            self.st.counters.evicted_unlabelled += 1;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Impression;

    fn imp(req: &str, item: &str, t: i64) -> Event {
        Event::Impression(Impression {
            request_id: req.into(),
            time_ms: t,
            user: "u".into(),
            item: item.into(),
            features: Snapshot::default(),
            traceparent: None,
        })
    }

    fn act(req: &str, item: &str, t: i64, kind: &str) -> Event {
        Event::Action(Action {
            request_id: req.into(),
            item: item.into(),
            time_ms: t,
            kind: kind.into(),
            value: None,
            traceparent: None,
        })
    }

    fn cfg() -> JoinConfig {
        JoinConfig {
            window_ms: 100,
            allowed_lateness_ms: 10,
            remember_closed_ms: 100,
            ..JoinConfig::default()
        }
    }

    /// Feeds events; returns a compact description of what came out.
    fn run(w: &mut Window, events: Vec<Event>) -> Vec<String> {
        let mut out = Vec::new();
        for (i, e) in events.into_iter().enumerate() {
            w.on_event(i as u64, e, &mut out).unwrap();
        }
        out.iter()
            .map(|e| match e {
                Emit::Sample(s) => {
                    let labels: Vec<String> =
                        s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!(
                        "{:?} {}/{} {} w={}",
                        s.kind,
                        s.request_id,
                        s.item,
                        labels.join(","),
                        s.weight
                    )
                }
                Emit::Orphan { offset, reason, .. } => format!("orphan@{offset} {reason}"),
            })
            .collect()
    }

    #[test]
    fn click_in_window_is_positive_at_once_and_silence_is_negative_after_the_window() {
        let mut w = Window::new(cfg());
        let out = run(
            &mut w,
            vec![
                imp("r1", "a", 1000),
                imp("r1", "b", 1000),
                act("r1", "a", 1050, "click"),
            ],
        );
        assert_eq!(out, ["Positive r1/a click=1 w=1"]);
        // The watermark is max time - 10; r1/b is due at 1100, so 1109 does not close it...
        let out = run(&mut w, vec![imp("r2", "x", 1109)]);
        assert!(out.is_empty(), "{out:?}");
        // ...and 1110 does.
        let out = run(&mut w, vec![imp("r3", "x", 1110)]);
        assert_eq!(out, ["Negative r1/b click=0 w=1"]);
        assert_eq!(w.counters().positives, 1);
        assert_eq!(w.counters().negatives, 1);
    }

    #[test]
    fn an_action_before_its_impression_waits_for_it_and_an_orphan_is_dead_lettered() {
        let mut w = Window::new(cfg());
        let out = run(
            &mut w,
            vec![
                act("r1", "a", 1010, "click"),
                imp("r1", "a", 1000),
                act("r9", "z", 1000, "click"),
            ],
        );
        assert_eq!(out, ["Positive r1/a click=1 w=1"]);
        let out = run(&mut w, vec![imp("r2", "q", 1200)]);
        // r1/a's window closes (no second sample); r9/z's window passed with no impression.
        assert_eq!(out, ["orphan@2 no_impression"]);
        assert_eq!(w.counters().orphan_actions, 1);
    }

    #[test]
    fn late_actions_follow_the_policy_and_duplicates_are_counted() {
        for policy in [LatePolicy::Correction, LatePolicy::Drop] {
            let mut w = Window::new(JoinConfig {
                late_policy: policy,
                ..cfg()
            });
            let out = run(
                &mut w,
                vec![
                    imp("r1", "a", 1000),
                    imp("r1", "a", 1001),
                    imp("r2", "b", 1200),
                    act("r1", "a", 1150, "click"),
                    act("r1", "a", 1150, "click"),
                ],
            );
            let want: &[&str] = match policy {
                LatePolicy::Correction => {
                    &["Negative r1/a click=0 w=1", "Correction r1/a click=1 w=1"]
                }
                LatePolicy::Drop => &["Negative r1/a click=0 w=1"],
            };
            assert_eq!(out, want, "{policy:?}");
            let c = w.counters();
            assert_eq!(c.duplicate_impressions, 1);
            assert_eq!(c.duplicate_actions, 1);
            assert_eq!(c.late_dropped, u64::from(policy == LatePolicy::Drop));
        }
    }

    /// An impression whose window the watermark has passed is counted as late, and still gets
    /// its one sample.
    #[test]
    fn an_impression_behind_the_watermark_is_counted_as_late() {
        let mut w = Window::new(cfg());
        let out = run(
            &mut w,
            vec![
                imp("r1", "a", 1000),
                imp("r2", "b", 2000),
                imp("r3", "c", 1500),
            ],
        );
        // r3/c, due at 1600 with the watermark at 1990, closes as soon as it arrives.
        assert_eq!(
            out,
            ["Negative r1/a click=0 w=1", "Negative r3/c click=0 w=1"]
        );
        assert_eq!(w.counters().late_impressions, 1);
        let out = run(&mut w, vec![imp("r4", "d", 2001)]);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(w.counters().late_impressions, 1, "r4/d is on time");
    }

    #[test]
    fn each_kind_is_a_label_and_unknown_kinds_are_refused() {
        let mut w = Window::new(JoinConfig {
            kinds: vec!["click".into(), "conversion".into()],
            ..cfg()
        });
        let out = run(
            &mut w,
            vec![
                imp("r1", "a", 1000),
                act("r1", "a", 1010, "click"),
                act("r1", "a", 1020, "conversion"),
            ],
        );
        assert_eq!(
            out,
            [
                "Positive r1/a click=1,conversion=0 w=1",
                "Correction r1/a click=1,conversion=1 w=1"
            ]
        );
        let before = w.counters().clone();
        let err = w
            .on_event(9, act("r1", "a", 1030, "like"), &mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), "unknown_kind");
        assert_eq!(w.counters(), &before, "a refused event changes nothing");
    }

    #[test]
    fn negative_downsampling_keeps_about_r_and_weights_by_one_over_r() {
        let mut w = Window::new(JoinConfig {
            negative_rate: 0.25,
            ..cfg()
        });
        let mut events: Vec<Event> = (0..4000)
            .map(|i| imp(&format!("r{i}"), "a", 1000))
            .collect();
        events.push(imp("end", "e", 5000));
        let out = run(&mut w, events);
        let kept = out.len() as f64;
        assert!(
            (800.0..1200.0).contains(&kept),
            "kept {kept} of 4000 at 0.25"
        );
        assert!(out.iter().all(|s| s.ends_with("w=4")));
        assert_eq!(
            w.counters().negatives + w.counters().negatives_sampled_out,
            4000
        );
        // The same pairs make the same decisions in a new window: replay-safe.
        let mut w2 = Window::new(JoinConfig {
            negative_rate: 0.25,
            ..cfg()
        });
        let mut events: Vec<Event> = (0..4000)
            .map(|i| imp(&format!("r{i}"), "a", 1000))
            .collect();
        events.push(imp("end", "e", 5000));
        assert_eq!(run(&mut w2, events), out);
    }

    #[test]
    fn a_full_state_closes_or_drops_the_oldest_and_counts_it() {
        let mut w = Window::new(JoinConfig {
            max_state: 3,
            ..cfg()
        });
        let out = run(
            &mut w,
            (0..5)
                .map(|i| imp(&format!("r{i}"), "a", 1000 + i))
                .collect(),
        );
        assert_eq!(
            out,
            ["Negative r0/a click=0 w=1", "Negative r1/a click=0 w=1"]
        );
        assert_eq!(w.counters().closed_early, 2);
        // The closed ones were then forgotten to make room, also counted.
        assert!(w.len() <= 3);
        assert_eq!(w.counters().forgotten_early, 2);

        let mut w = Window::new(JoinConfig {
            max_state: 3,
            on_full: OnFull::DropOldest,
            ..cfg()
        });
        let out = run(
            &mut w,
            (0..5)
                .map(|i| imp(&format!("r{i}"), "a", 1000 + i))
                .collect(),
        );
        assert!(out.is_empty());
        assert_eq!(w.counters().evicted_unlabelled, 2);
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let events = || -> Vec<Event> {
            let mut v = Vec::new();
            for i in 0..300i64 {
                v.push(imp(&format!("r{i}"), "a", 1000 + i * 3));
                if i % 4 == 0 {
                    v.push(act(&format!("r{}", i - 5), "a", 1000 + i * 3, "click"));
                }
            }
            v
        };
        let mut straight = Window::new(cfg());
        let all = run(&mut straight, events());

        let mut first = Window::new(cfg());
        let evs = events();
        let (a, b) = evs.split_at(170);
        let mut out = run(&mut first, a.to_vec());
        let bytes = rmp_serde::to_vec(first.state()).unwrap();
        let st: WindowState = rmp_serde::from_slice(&bytes).unwrap();
        let mut second = Window::restore(cfg(), st);
        // Offsets restart at 0 in `run`; orphans carry them, so compare only samples' text.
        out.extend(run(&mut second, b.to_vec()));
        let strip = |v: &[String]| -> Vec<String> {
            v.iter()
                .filter(|s| !s.starts_with("orphan"))
                .cloned()
                .collect()
        };
        assert_eq!(strip(&out), strip(&all));
        assert_eq!(second.counters(), straight.counters());
    }
}
