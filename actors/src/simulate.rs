//! A live application, simulated: requests, impressions and delayed clicks, with the faults
//! real event streams have.
//!
//! - Users and items are Zipf-popular. Item popularity shifts and new items appear: the item at
//!   popularity rank `r` is id `r + new_items_per_hour * hours elapsed`, so fresh ids keep
//!   entering at the head while old ones fall out of it.
//! - Click-through comes from the hidden model of [`crate::gen`] (per-id effects, pairwise
//!   latent interactions, dense effects), with the user as field C1 and the item as C2, and
//!   its per-id effects rotating by `drift_per_hour` quarter turns per hour of event time.
//! - A click comes a lognormal delay after its impression.
//! - Duplicated, out-of-order (held back up to `max_disorder_ms`) and malformed events are
//!   injected at configurable rates.
//!
//! Each impression's features are Criteo-layout (I1..I13 already `ln(1 + x)`, C1..C26), so the
//! default schema trains on the joined samples as they are. Every impression's true click
//! probability is reported in a [`Truth`], so the best achievable AUC is known.
//!
//! Everything is a fixed function of the seeds and the event-time clock; the same
//! configuration produces the same events.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};

use crate::event::{Action, Event, Features, Impression, Snapshot};
use crate::gen::{GenConfig, Generator, DENSE, FIELDS};
use crate::rng::{Xoshiro256, Zipf};
use crate::sample::json::{RawField, RawValue};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    pub seed: u64,
    /// Seeds the hidden model; keep it to simulate more traffic of the same world.
    pub world_seed: u64,
    pub users: u64,
    pub items: u64,
    pub zipf: f64,
    /// Items shown per request.
    pub items_per_request: u32,
    /// Impressions per second of event time.
    pub rate: f64,
    /// Event time of the first request, ms since the Unix epoch.
    pub start_ms: i64,
    pub click_delay_median_ms: f64,
    /// The lognormal's sigma: 1.0 puts the 90th percentile at 3.6x the median.
    pub click_delay_sigma: f64,
    pub new_items_per_hour: f64,
    pub drift_per_hour: f64,
    pub duplicate_rate: f64,
    pub out_of_order_rate: f64,
    pub max_disorder_ms: u64,
    pub malformed_rate: f64,
    /// Multiplies every click probability (benches use it to set the click rate).
    pub click_scale: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            world_seed: 1,
            users: 1_000_000,
            items: 200_000,
            zipf: 1.1,
            items_per_request: 4,
            rate: 1000.0,
            start_ms: 1_700_000_000_000,
            click_delay_median_ms: 5000.0,
            click_delay_sigma: 1.0,
            new_items_per_hour: 3600.0,
            drift_per_hour: 0.25,
            duplicate_rate: 0.01,
            out_of_order_rate: 0.02,
            max_disorder_ms: 3000,
            malformed_rate: 0.001,
            click_scale: 1.0,
        }
    }
}

/// A simulator setting out of its range; the message names the setting and the range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSimConfig(pub String);

impl SimConfig {
    pub fn validate(&self) -> Result<(), InvalidSimConfig> {
        self.check().map_err(InvalidSimConfig)
    }

    fn check(&self) -> Result<(), String> {
        let rate = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name}: {v} is not in [0, 1]"))
            }
        };
        rate("duplicate_rate", self.duplicate_rate)?;
        rate("out_of_order_rate", self.out_of_order_rate)?;
        rate("malformed_rate", self.malformed_rate)?;
        if !(self.click_scale > 0.0 && self.click_scale <= 1.0) {
            return Err(format!(
                "click_scale: {} is not in (0, 1]",
                self.click_scale
            ));
        }
        if self.users == 0 || self.items == 0 {
            return Err("users and items must be at least 1".into());
        }
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            return Err(format!("rate: {} is not a positive number", self.rate));
        }
        if !(self.zipf > 0.0 && self.zipf.is_finite()) {
            return Err(format!("zipf: {} is not a positive exponent", self.zipf));
        }
        if self.items_per_request == 0 || self.items_per_request > 100 {
            return Err(format!(
                "items_per_request: {} is not in 1..=100",
                self.items_per_request
            ));
        }
        if !(self.click_delay_median_ms > 0.0 && self.click_delay_sigma >= 0.0) {
            return Err("click delay median must be above 0 and sigma at least 0".into());
        }
        if !(self.new_items_per_hour >= 0.0 && self.drift_per_hour >= 0.0) {
            return Err("new_items_per_hour and drift_per_hour must be at least 0".into());
        }
        Ok(())
    }
}

/// The hidden answer for one impression.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Truth {
    pub request_id: String,
    pub item: String,
    pub time_ms: i64,
    pub probability: f64,
    pub clicked: bool,
}

/// One record for the event log.
#[derive(Clone, Debug, PartialEq)]
pub struct SimRecord {
    /// The routing key (the request id; malformed records get one too).
    pub key: String,
    pub payload: Vec<u8>,
    /// When the application emits it (event time of the simulation clock).
    pub emit_ms: i64,
}

/// Counts of what was produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SimStats {
    pub requests: u64,
    pub impressions: u64,
    pub clicks: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub malformed: u64,
    pub records: u64,
}

/// Events waiting for their emit time: `(emit time, sequence)` orders them deterministically.
type Queue = BinaryHeap<Reverse<(i64, u64, QueuedEvent)>>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct QueuedEvent {
    key: String,
    payload: Vec<u8>,
}

/// The simulator: call [`Simulator::next_request`] for each request in event-time order.
#[derive(Debug)]
pub struct Simulator {
    cfg: SimConfig,
    gen: Generator,
    rng: Xoshiro256,
    users: Zipf,
    items: Zipf,
    queue: Queue,
    seq: u64,
    request: u64,
    stats: SimStats,
}

impl Simulator {
    pub fn new(cfg: SimConfig) -> anyhow::Result<Self> {
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("simulator: {e}"))?;
        let gen = Generator::new(GenConfig {
            rows: u64::MAX,
            seed: cfg.seed ^ 0x5eed_0000,
            world_seed: cfg.world_seed,
            ..GenConfig::default()
        })?;
        Ok(Self {
            rng: Xoshiro256::seed_from_u64(cfg.seed),
            users: Zipf::new(cfg.users, cfg.zipf),
            items: Zipf::new(cfg.items, cfg.zipf),
            gen,
            queue: BinaryHeap::new(),
            seq: 0,
            request: 0,
            stats: SimStats::default(),
            cfg,
        })
    }

    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    /// Event time of the next request.
    pub fn clock_ms(&self) -> i64 {
        let per_request = 1000.0 * f64::from(self.cfg.items_per_request) / self.cfg.rate;
        self.cfg.start_ms + (self.request as f64 * per_request) as i64
    }

    fn push(&mut self, emit_ms: i64, key: String, payload: Vec<u8>) {
        self.seq += 1;
        self.queue
            .push(Reverse((emit_ms, self.seq, QueuedEvent { key, payload })));
    }

    /// Schedules `event` for emission at `t`, with the injected faults.
    fn schedule(&mut self, t: i64, event: &Event) {
        let key = event.request_id().to_owned();
        let payload = event.to_msgpack();
        let mut emit = t;
        if self.rng.next_f64() < self.cfg.out_of_order_rate {
            self.stats.out_of_order += 1;
            emit += 1 + (self.rng.next_u64() % self.cfg.max_disorder_ms.max(1)) as i64;
        }
        if self.rng.next_f64() < self.cfg.duplicate_rate {
            self.stats.duplicates += 1;
            let again = emit + (self.rng.next_u64() % 1000) as i64;
            self.push(again, key.clone(), payload.clone());
        }
        if self.rng.next_f64() < self.cfg.malformed_rate {
            self.stats.malformed += 1;
            let bad = self.malformed(&payload);
            self.push(emit, key.clone(), bad);
        }
        self.push(emit, key, payload);
    }

    /// A broken record of one of the kinds seen in practice.
    fn malformed(&mut self, good: &[u8]) -> Vec<u8> {
        match self.rng.next_u64() % 3 {
            // Cut short in transit.
            0 => good[..good.len() / 2].to_vec(),
            // Not msgpack at all.
            1 => b"{\"type\": \"impression\", oops".to_vec(),
            // Well-formed, but with an impossible value.
            _ => Event::Action(Action {
                request_id: String::new(),
                item: "x".into(),
                time_ms: -5,
                kind: "click".into(),
                value: None,
                traceparent: None,
            })
            .to_msgpack(),
        }
    }

    /// Generates the next request: its impressions and the clicks they will get. Records due
    /// by the new clock are moved to `out`, and the truth of each impression to `truth`.
    pub fn next_request(&mut self, out: &mut Vec<SimRecord>, truth: &mut Vec<Truth>) {
        let t = self.clock_ms();
        self.request += 1;
        self.stats.requests += 1;
        let hours = (t - self.cfg.start_ms) as f64 / 3_600_000.0;
        let angle = self.cfg.drift_per_hour * std::f64::consts::FRAC_PI_2 * hours;
        let shift = (self.cfg.new_items_per_hour * hours) as u64;
        let user_rank = self.users.sample(&mut self.rng) - 1;
        let request_id = format!("q{}-{}", self.cfg.seed, self.request);
        for _ in 0..self.cfg.items_per_request {
            let item_rank = self.items.sample(&mut self.rng) - 1 + shift;
            let row = self.gen.row_with(&[user_rank, item_rank], angle);
            let user = self.gen.value_string(0, user_rank);
            let item = self.gen.value_string(1, item_rank);
            let mut features = Features::default();
            for (j, d) in row.dense.iter().enumerate().take(DENSE) {
                if let Some(x) = d {
                    features
                        .dense
                        .insert(format!("I{}", j + 1), (*x as f64).ln_1p());
                }
            }
            for (f, &r) in row.ranks.iter().enumerate().take(FIELDS) {
                features.sparse.insert(
                    format!("C{}", f + 1),
                    RawField::One(RawValue::Str(self.gen.value_string(f, r))),
                );
            }
            let (probability, clicked) = if self.cfg.click_scale == 1.0 {
                (row.probability, row.label == 1)
            } else {
                let p = row.probability * self.cfg.click_scale;
                (p, self.rng.next_f64() < p)
            };
            self.stats.impressions += 1;
            truth.push(Truth {
                request_id: request_id.clone(),
                item: item.clone(),
                time_ms: t,
                probability,
                clicked,
            });
            let imp = Event::Impression(Impression {
                request_id: request_id.clone(),
                time_ms: t,
                user,
                item: item.clone(),
                features: Snapshot::encode(&features),
                traceparent: None,
            });
            self.schedule(t, &imp);
            if clicked {
                self.stats.clicks += 1;
                let z = self.rng.next_normal();
                let delay = self.cfg.click_delay_median_ms * (self.cfg.click_delay_sigma * z).exp();
                let at = t + delay.round().max(1.0) as i64;
                let click = Event::Action(Action {
                    request_id: request_id.clone(),
                    item,
                    time_ms: at,
                    kind: "click".into(),
                    value: None,
                    traceparent: None,
                });
                self.schedule(at, &click);
            }
        }
        self.drain_until(self.clock_ms(), out);
    }

    fn drain_until(&mut self, t: i64, out: &mut Vec<SimRecord>) {
        while let Some(Reverse((emit, _, _))) = self.queue.peek() {
            if *emit > t {
                break;
            }
            let Reverse((emit_ms, _, ev)) = self.queue.pop().expect("peeked");
            self.stats.records += 1;
            out.push(SimRecord {
                key: ev.key,
                payload: ev.payload,
                emit_ms,
            });
        }
    }

    /// Emits everything still scheduled (the clicks of the last requests), in order.
    pub fn finish(&mut self, out: &mut Vec<SimRecord>) {
        self.drain_until(i64::MAX, out);
    }
}

/// Records read from the end of each partition to find the newest event time: more than the
/// disorder of one append batch.
const TAIL_RECORDS: u64 = 256;

/// Where a simulator playing into `log` starts its clock, and whether it continues the log.
///
/// A node that stops (kill -9 or Ctrl-C) stops its simulated application with it. If the
/// newest event in the log is at most `max_gap_ms` from `now_ms`, the clock starts just after
/// it and [`play_live`] plays the events of the downtime at once, as the backlog a live
/// application would have left in its log: event time has no gap, so the joiner's watermark
/// does not jump over the open windows and close them all at once (a burst of negatives, then
/// a window's length of clicks without their negatives, which miscalibrates whatever trains on
/// it). Beyond `max_gap_ms` that backlog would be too long to play, and the clock starts now.
/// Undecodable records (dead letters to be) are skipped.
pub fn resume_clock(
    log: &dyn crate::stream::StreamLog,
    now_ms: i64,
    max_gap_ms: i64,
) -> Result<(i64, bool), crate::stream::LogError> {
    let mut newest: Option<i64> = None;
    for p in 0..log.partitions() {
        let high = log.high_watermark(p)?;
        let from = high.saturating_sub(TAIL_RECORDS).max(log.low_watermark(p)?);
        for r in log.read(p, from, TAIL_RECORDS as usize)? {
            if let Ok(e) = Event::from_msgpack(&r.payload) {
                newest = Some(newest.map_or(e.time_ms(), |n| n.max(e.time_ms())));
            }
        }
    }
    Ok(match newest {
        Some(t) if (now_ms - t).abs() <= max_gap_ms => (t + 1, true),
        _ => (now_ms, false),
    })
}

/// Plays `sim` into the event log at wall-clock pace (its clock must start near now) until
/// `stop` is set, appending what is due every few milliseconds. Returns the records appended.
///
/// `sim.clock_ms()` runs ahead of the wall clock by at most one request, so event times are
/// never in the future beyond that, and the joiner's watermark moves as it would live.
pub fn play_live(
    sim: &mut Simulator,
    log: &dyn crate::stream::StreamLog,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<u64, crate::stream::LogError> {
    use std::sync::atomic::Ordering;
    let parts = log.partitions();
    let mut pending: Vec<Vec<Vec<u8>>> = vec![Vec::new(); parts as usize];
    let (mut recs, mut truth) = (Vec::new(), Vec::new());
    let mut appended = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = crate::stream::now_ms();
        while sim.clock_ms() <= now {
            sim.next_request(&mut recs, &mut truth);
            truth.clear();
            for r in recs.drain(..) {
                pending[crate::stream::partition_of(&r.key, parts) as usize].push(r.payload);
            }
        }
        for (p, batch) in pending.iter_mut().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            log.append(p as u32, &refs)?;
            appended += batch.len() as u64;
            batch.clear();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(appended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::auc;

    fn run(cfg: SimConfig, requests: u64) -> (Vec<SimRecord>, Vec<Truth>, SimStats) {
        let mut s = Simulator::new(cfg).unwrap();
        let (mut out, mut truth) = (Vec::new(), Vec::new());
        for _ in 0..requests {
            s.next_request(&mut out, &mut truth);
        }
        s.finish(&mut out);
        (out, truth, s.stats().clone())
    }

    #[test]
    fn a_restarted_simulator_continues_the_log_s_event_time_when_it_is_recent() {
        use crate::stream::StreamLog;
        let dir = tempfile::tempdir().unwrap();
        let log = crate::stream::EmbeddedLog::open(
            dir.path(),
            "events",
            crate::stream::LogConfig {
                partitions: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let now = 1_700_000_100_000;
        assert_eq!(resume_clock(&log, now, 60_000).unwrap(), (now, false));
        let (recs, _, _) = run(SimConfig::default(), 300);
        let newest = recs
            .iter()
            .filter_map(|r| Event::from_msgpack(&r.payload).ok())
            .map(|e| e.time_ms())
            .max()
            .unwrap();
        for r in &recs {
            let p = crate::stream::partition_of(&r.key, 2);
            log.append(p, &[&r.payload]).unwrap();
        }
        // Malformed records at the end are passed over.
        log.append(0, &[b"not an event"]).unwrap();
        assert_eq!(
            resume_clock(&log, newest + 5_000, 60_000).unwrap(),
            (newest + 1, true)
        );
        assert_eq!(
            resume_clock(&log, newest + 61_000, 60_000).unwrap(),
            (newest + 61_000, false)
        );
    }

    #[test]
    fn reproducible_and_shaped_as_configured() {
        let cfg = SimConfig {
            duplicate_rate: 0.05,
            out_of_order_rate: 0.05,
            malformed_rate: 0.02,
            ..SimConfig::default()
        };
        let (a, truth, stats) = run(cfg.clone(), 2000);
        let (b, _, _) = run(cfg, 2000);
        assert_eq!(a, b, "same seed, same events");
        assert_eq!(stats.impressions, 8000);
        assert_eq!(truth.len(), 8000);
        let ctr = stats.clicks as f64 / stats.impressions as f64;
        assert!((0.05..0.4).contains(&ctr), "ctr {ctr}");
        assert_eq!(
            stats.records,
            stats.impressions + stats.clicks + stats.duplicates + stats.malformed
        );
        let frac = |n: u64| n as f64 / (stats.impressions + stats.clicks) as f64;
        assert!((0.03..0.07).contains(&frac(stats.duplicates)));
        assert!((0.01..0.03).contains(&frac(stats.malformed)));
        // Emitted in emit-time order, yet some event times go backwards (out of order).
        assert!(a.windows(2).all(|w| w[0].emit_ms <= w[1].emit_ms));
        let times: Vec<i64> = a
            .iter()
            .filter_map(|r| Event::from_msgpack(&r.payload).ok())
            .map(|e| e.time_ms())
            .collect();
        assert!(times.windows(2).any(|w| w[1] < w[0]));
        let bad = a
            .iter()
            .filter(|r| {
                Event::from_msgpack(&r.payload)
                    .and_then(|e| e.validate())
                    .is_err()
            })
            .count() as u64;
        assert_eq!(bad, stats.malformed);
        // The truth is informative: its AUC against the clicks is far above chance.
        let p: Vec<f32> = truth.iter().map(|t| t.probability as f32).collect();
        let y: Vec<f32> = truth
            .iter()
            .map(|t| f32::from(u8::from(t.clicked)))
            .collect();
        assert!(auc(&p, &y).unwrap() > 0.75);
    }

    #[test]
    fn clicks_follow_their_impressions_by_a_lognormal_delay() {
        let cfg = SimConfig {
            duplicate_rate: 0.0,
            out_of_order_rate: 0.0,
            malformed_rate: 0.0,
            ..SimConfig::default()
        };
        let (recs, _, _) = run(cfg.clone(), 3000);
        let mut shown = std::collections::HashMap::new();
        let mut delays = Vec::new();
        for r in &recs {
            match Event::from_msgpack(&r.payload).unwrap() {
                Event::Impression(i) => {
                    shown.insert((i.request_id, i.item), i.time_ms);
                }
                Event::Action(a) => {
                    let t0 = shown[&(a.request_id, a.item)];
                    delays.push((a.time_ms - t0) as f64);
                }
            }
        }
        delays.sort_by(f64::total_cmp);
        let median = delays[delays.len() / 2];
        assert!(
            (median / cfg.click_delay_median_ms - 1.0).abs() < 0.2,
            "median delay {median}"
        );
    }

    #[test]
    fn new_items_appear_over_time() {
        let cfg = SimConfig {
            new_items_per_hour: 360_000.0,
            rate: 10_000.0,
            ..SimConfig::default()
        };
        let (_, truth, _) = run(cfg, 5000);
        let early: std::collections::HashSet<&str> =
            truth[..2000].iter().map(|t| t.item.as_str()).collect();
        let late = &truth[truth.len() - 2000..];
        let fresh = late
            .iter()
            .filter(|t| !early.contains(t.item.as_str()))
            .count();
        assert!(
            fresh > 1000,
            "only {fresh} of 2000 late impressions show new items"
        );
    }

    #[test]
    fn bad_configuration_is_refused() {
        for bad in [
            SimConfig {
                duplicate_rate: 1.5,
                ..SimConfig::default()
            },
            SimConfig {
                rate: 0.0,
                ..SimConfig::default()
            },
            SimConfig {
                items_per_request: 0,
                ..SimConfig::default()
            },
        ] {
            assert!(Simulator::new(bad).is_err());
        }
    }
}
