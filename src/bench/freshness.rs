//! `freshet bench freshness`: how long after a click is appended does serving answer with a
//! version that has learned from it, at several event rates.
//!
//! For each rate of `--rates` (100, 1,000 and 10,000 events/s by default), a node runs as
//! `freshet dev` does, on the configured defaults, in a temporary data directory, while the
//! simulator plays that rate live. For every click the bench records when its event was appended; a
//! watcher records when the replica's cell first served each version. Afterwards each click is
//! followed to its sample (the joiner writes the positive when the click arrives), the sample's
//! offset to the first version whose offsets include it, and that version to the first time a
//! version at least as new was served. Freshness is that time minus the click's append time.
//! The first `--warmup-secs` are left out (the node starting, the first versions). The watcher
//! also samples, every 20 ms, how many samples the log holds beyond the served version's
//! offsets: the serving lag in samples.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use freshet_actors::event::{Event, JoinedSample, SampleKind};
use freshet_actors::online::pipeline::PipelineHandle;
use freshet_actors::simulate::{SimConfig, Simulator};
use freshet_actors::stream::{now_ms, partition_of};
use serde::Serialize;

use crate::settings::Settings;

/// (request id, item) of each click -> when its event was appended (Unix ms).
type ClickTimes = HashMap<(String, String), i64>;

#[derive(Debug, Args)]
pub(crate) struct FreshnessArgs {
    /// Events (impressions and clicks) appended per second: one run per rate.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    rates: Vec<f64>,
    /// Version interval (the delta interval), in milliseconds; `freshet dev`'s default.
    #[arg(long, default_value_t = 250)]
    delta_ms: u64,
    /// Seconds of each run, warm-up included.
    #[arg(long, default_value_t = 25)]
    secs: u64,
    #[arg(long, default_value_t = 5)]
    warmup_secs: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Served means served by a replica on another node: a `freshet node --roles serving`
    /// process that follows this one over loopback (its mirror fed over the network).
    #[arg(long)]
    cluster: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    publish: &'static str,
    /// Where the replica measured runs: `this process`, or `a serving node`.
    served_by: &'static str,
    runs: Vec<FreshnessReport>,
}

#[derive(Debug, Serialize)]
struct FreshnessReport {
    rate_asked: f64,
    events_per_sec: f64,
    clicks_per_event: f64,
    delta_ms: u64,
    clicks_measured: usize,
    /// Clicks no served version had learned from when the drain ended (left out of the
    /// quantiles; none unless the drain limit passed).
    clicks_not_yet_served: usize,
    /// From the end of the run (no more events) to every sample logged by then being served,
    /// or `null` when the drain limit (`DRAIN_LIMIT`) passed first.
    drain_ms: Option<i64>,
    freshness_p50_ms: Option<f64>,
    freshness_p90_ms: Option<f64>,
    freshness_p99_ms: Option<f64>,
    /// Versions written and not withdrawn (those served during the run or left in the store).
    versions_written: usize,
    versions_served: usize,
    /// Samples the log held beyond the served version's offsets, over the measured time.
    serving_lag_samples_p50: Option<u64>,
    serving_lag_samples_p99: Option<u64>,
    samples_per_sec_trained: f64,
    /// Samples per training step: what the trainer found in the log each time it looked.
    trainer_rows_per_step: f64,
    /// With `--cluster`: where the serving node's share of the time goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    serving_node: Option<HopReport>,
}

/// The hop from this process's replica to the serving node's.
#[derive(Debug, Serialize)]
struct HopReport {
    /// Per version served by both: how much later the serving node first served it than the
    /// replica here (the notice, the fetch, the checked write and the apply).
    hop_p50_ms: Option<f64>,
    hop_p99_ms: Option<f64>,
    /// Versions the serving node served of those served here (the rest were passed over: a
    /// newer notice came while it fetched).
    versions_served_of_local: (usize, usize),
    versions_fetched: u64,
    bytes_per_version: f64,
    fetch_ms_per_version: f64,
    write_ms_per_version: f64,
}

pub(crate) fn run(args: FreshnessArgs, settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.rates.is_empty() && args.rates.iter().all(|r| r.is_finite() && *r > 0.0),
        "--rates must be positive event rates, as 100,1000,10000"
    );
    anyhow::ensure!(
        args.secs > args.warmup_secs,
        "--secs must exceed --warmup-secs"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mut runs = Vec::new();
    for &rate in &args.rates {
        super::progress(&format!(
            "freshness at {rate} events/s for {} s ({} s warm-up)",
            args.secs, args.warmup_secs
        ));
        let r = rt.block_on(bench(rate, &args, settings))?;
        super::progress(&format!(
            "  p50 {} ms, p99 {} ms over {} clicks; serving lag p99 {} samples",
            r.freshness_p50_ms.map_or("-".into(), |x| format!("{x:.0}")),
            r.freshness_p99_ms.map_or("-".into(), |x| format!("{x:.0}")),
            r.clicks_measured,
            r.serving_lag_samples_p99
                .map_or("-".into(), |x| x.to_string()),
        ));
        runs.push(r);
    }
    let report = Report {
        cpu: super::cpu_model(),
        publish: settings.validation.publish.name(),
        served_by: if args.cluster {
            "a serving node"
        } else {
            "this process"
        },
        runs,
    };
    super::print_report(&report, args.json)
}

async fn bench(
    rate: f64,
    args: &FreshnessArgs,
    settings: &Settings,
) -> anyhow::Result<FreshnessReport> {
    let dir = tempfile::tempdir().context("a temporary data directory")?;
    let mut s = settings.clone();
    s.node.data_dir = dir.path().to_path_buf();
    // The join window only delays negatives; clicks join at once whatever it is.
    let cfg = crate::settings::pipeline_config(&s, 5_000, args.delta_ms, 1)?;
    let events = cfg.logs.events.clone();
    let samples = cfg.logs.samples.clone();
    let (pipe, _join) = PipelineHandle::start(cfg).await?;
    let remote = if args.cluster {
        Some(remote_serving(&s, &pipe, dir.path()).await?)
    } else {
        None
    };
    let remote_url = remote.as_ref().map(|r| r.url.clone());

    // The watcher: when each version was first served, and every 20 ms the served version
    // beside the samples the log held.
    // Version -> first served: by the replica measured, and by the one here (the same map
    // without --cluster).
    let served: Arc<Mutex<BTreeMap<u64, i64>>> = Arc::default();
    let served_here: Arc<Mutex<BTreeMap<u64, i64>>> = Arc::default();
    // The sample offsets of every version served here, read as it is served: retention deletes
    // older chains from the store during a run, and a click must be credited to the first
    // version trained on it, not to the oldest one still on disk at the end.
    let seen_offsets: Arc<Mutex<BTreeMap<u64, BTreeMap<u32, u64>>>> = Arc::default();
    // The producer stops at the end of the run; the watcher once every click appended until
    // then is served (or a drain limit passes), so that the last clicks are measured too.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_watching = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (cell, stop) = (pipe.cells()[0].clone(), stop_watching.clone());
        let (served, served_here) = (served.clone(), served_here.clone());
        let seen_offsets = seen_offsets.clone();
        let samples = samples.clone();
        std::thread::spawn(move || {
            let mut lag_points: Vec<(i64, u64, u64)> = Vec::new();
            let mut next_lag = now_ms();
            let mut next_poll = now_ms();
            let first = |map: &Mutex<BTreeMap<u64, i64>>, v: u64, at: i64| {
                (map.lock().unwrap_or_else(|p| p.into_inner()))
                    .entry(v)
                    .or_insert(at);
            };
            while !stop.load(Ordering::Relaxed) {
                // On a serving node: the version its /healthz names when it answers, every
                // 10 ms (a request each millisecond would take CPU from the node measured).
                if let Some(url) = remote_url.as_ref().filter(|_| now_ms() >= next_poll) {
                    next_poll = now_ms() + 10;
                    if let Some(v) = remote_version(url) {
                        first(&served, v, now_ms());
                    }
                }
                if let Some(m) = cell.current() {
                    let now = now_ms();
                    first(&served_here, m.version(), now);
                    (seen_offsets.lock().unwrap_or_else(|p| p.into_inner()))
                        .entry(m.version())
                        .or_insert_with(|| m.manifest().sample_offsets.clone());
                    if remote_url.is_none() {
                        first(&served, m.version(), now);
                    }
                    if now >= next_lag {
                        next_lag = now + 20;
                        let held: u64 = (0..samples.partitions())
                            .map(|p| samples.high_watermark(p).unwrap_or(0))
                            .sum();
                        let consumed: u64 = m.manifest().sample_offsets.values().sum();
                        lag_points.push((now, held, consumed));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            lag_points
        })
    };
    // The producer: the simulator at the requested rate; clicks' append times recorded.
    let producer = {
        let (log, stop) = (events.clone(), stop.clone());
        // Impressions set the simulator's pace; at its default click rates about one event
        // in six is a click (the report gives the measured rate).
        let rate = rate / 1.2;
        std::thread::spawn(move || -> anyhow::Result<(u64, ClickTimes)> {
            let mut sim = Simulator::new(SimConfig {
                seed: 99,
                rate,
                start_ms: now_ms(),
                click_delay_median_ms: 500.0,
                click_delay_sigma: 0.7,
                ..SimConfig::default()
            })?;
            let parts = log.partitions();
            let (mut recs, mut truth) = (Vec::new(), Vec::new());
            let mut clicks = HashMap::new();
            let mut appended = 0u64;
            let mut pending: Vec<Vec<Vec<u8>>> = vec![Vec::new(); parts as usize];
            let mut pending_clicks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let now = now_ms();
                while sim.clock_ms() <= now {
                    sim.next_request(&mut recs, &mut truth);
                    truth.clear();
                    for r in recs.drain(..) {
                        if let Ok(Event::Action(a)) = Event::from_msgpack(&r.payload) {
                            pending_clicks.push((a.request_id, a.item));
                        }
                        pending[partition_of(&r.key, parts) as usize].push(r.payload);
                    }
                }
                for (p, batch) in pending.iter_mut().enumerate() {
                    if !batch.is_empty() {
                        let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                        log.append(p as u32, &refs)?;
                        appended += batch.len() as u64;
                        batch.clear();
                    }
                }
                let at = now_ms();
                for c in pending_clicks.drain(..) {
                    clicks.entry(c).or_insert(at);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok((appended, clicks))
        })
    };
    let started = now_ms();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    let (trained, rows_per_step) = match pipe.trainer_status().await {
        Ok(t) => (
            t.samples_per_sec,
            t.rows_trained as f64 / t.steps.max(1) as f64,
        ),
        Err(_) => (0.0, 0.0),
    };
    stop.store(true, Ordering::SeqCst);
    let (appended, clicks) = producer
        .join()
        .map_err(|_| anyhow::anyhow!("the producer panicked"))??;
    let produced_until = now_ms();
    let drain_ms = drain(&pipe, &*samples, &served).await?;
    stop_watching.store(true, Ordering::SeqCst);
    let lag_points = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the watcher panicked"))?;
    let follower = match &remote {
        Some(r) => Some(remote_following(&r.url)?),
        None => None,
    };
    pipe.shutdown().await?;
    if let Some(r) = remote {
        drop(r.child);
        r.node.stop();
    }
    let elapsed_s = (produced_until - started) as f64 / 1000.0;

    // Versions: their offsets (those served here, and those left in the store), less those
    // withdrawn, and when a version at least as new was first served.
    let store = pipe.store();
    let mut all = seen_offsets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for v in store.versions()? {
        let m = store.manifest(v)?;
        if m.rolled_back.is_some() {
            all.remove(&v);
        } else {
            all.insert(v, m.sample_offsets);
        }
    }
    let offsets: Vec<(u64, BTreeMap<u32, u64>)> = all.into_iter().collect();
    let served = served.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let served_here = served_here
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let serving_node = follower.map(|f| hop_report(&served, &served_here, &f));
    let first_served_at_least = |v: u64| served.range(v..).map(|(_, &t)| t).min();
    let mut lat = Vec::new();
    let mut not_served = 0;
    let warm_end = started + (args.warmup_secs * 1000) as i64;
    for p in 0..samples.partitions() {
        let high = samples.high_watermark(p)?;
        let mut at = samples.low_watermark(p)?;
        while at < high {
            let recs = samples.read(p, at, 4096)?;
            let Some(last) = recs.last() else { break };
            at = last.offset + 1;
            for r in recs {
                let Ok(s) = JoinedSample::from_msgpack(&r.payload) else {
                    continue;
                };
                if s.kind != SampleKind::Positive {
                    continue;
                }
                let Some(&clicked) = clicks.get(&(s.request_id, s.item)) else {
                    continue;
                };
                if clicked < warm_end {
                    continue;
                }
                let first = offsets
                    .iter()
                    .find(|(_, o)| o.get(&p).is_some_and(|&x| x > r.offset))
                    .map(|(v, _)| *v);
                match first.and_then(first_served_at_least) {
                    Some(t) => lat.push((t - clicked).max(0) as f64),
                    None => not_served += 1,
                }
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    let q = |f: f64| super::quantile(&lat, f);
    let mut lags: Vec<u64> = lag_points
        .iter()
        .filter(|(t, _, _)| (warm_end..produced_until).contains(t))
        .map(|&(_, held, consumed)| held.saturating_sub(consumed))
        .collect();
    lags.sort_unstable();
    let lag_q = |f: f64| super::quantile(&lags, f);
    Ok(FreshnessReport {
        rate_asked: rate,
        events_per_sec: appended as f64 / elapsed_s.max(1e-9),
        clicks_per_event: clicks.len() as f64 / appended.max(1) as f64,
        delta_ms: args.delta_ms,
        clicks_measured: lat.len(),
        clicks_not_yet_served: not_served,
        drain_ms,
        freshness_p50_ms: q(0.5),
        freshness_p90_ms: q(0.9),
        freshness_p99_ms: q(0.99),
        versions_written: offsets.len(),
        versions_served: served.len(),
        serving_lag_samples_p50: lag_q(0.5),
        serving_lag_samples_p99: lag_q(0.99),
        samples_per_sec_trained: trained,
        trainer_rows_per_step: rows_per_step,
        serving_node,
    })
}

fn hop_report(
    remote: &BTreeMap<u64, i64>,
    here: &BTreeMap<u64, i64>,
    f: &serde_json::Value,
) -> HopReport {
    let mut hops: Vec<f64> = (remote.iter())
        .filter_map(|(v, t)| here.get(v).map(|h| (t - h).max(0) as f64))
        .collect();
    hops.sort_by(f64::total_cmp);
    let fetched = f["versions_fetched"].as_u64().unwrap_or(0);
    let per = |k: &str| f[k].as_f64().unwrap_or(0.0) / fetched.max(1) as f64;
    HopReport {
        hop_p50_ms: super::quantile(&hops, 0.5),
        hop_p99_ms: super::quantile(&hops, 0.99),
        versions_served_of_local: (hops.len(), here.len()),
        versions_fetched: fetched,
        bytes_per_version: per("bytes_fetched"),
        fetch_ms_per_version: per("fetch_ms_total"),
        write_ms_per_version: per("write_ms_total"),
    }
}

/// How long the node is given, after the last event, to serve every sample logged by then.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Waits until the served version (`served`: the measured replica's versions) has learned from
/// every sample the log held when this was called; returns how long that took, or `None` if
/// [`DRAIN_LIMIT`] passed first.
async fn drain(
    pipe: &PipelineHandle,
    samples: &dyn freshet_actors::stream::StreamLog,
    served: &Mutex<BTreeMap<u64, i64>>,
) -> anyhow::Result<Option<i64>> {
    let began = now_ms();
    let held: Vec<(u32, u64)> = (0..samples.partitions())
        .map(|p| Ok((p, samples.high_watermark(p)?)))
        .collect::<anyhow::Result<_>>()?;
    let end = std::time::Instant::now() + DRAIN_LIMIT;
    while std::time::Instant::now() < end {
        // The first version here that covers the log; then the measured replica at it.
        if let Some(m) = pipe.cells()[0].current() {
            let o = &m.manifest().sample_offsets;
            let covers = held.iter().all(|(p, h)| o.get(p).is_some_and(|x| x >= h));
            let newest = (served.lock().unwrap_or_else(|p| p.into_inner()))
                .keys()
                .next_back()
                .copied();
            if covers && newest >= Some(m.version()) {
                return Ok(Some(now_ms() - began));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

/// A serving node following this process: the cluster node here offers the pipeline's store
/// and tells the node of each publication, as a trainer node does.
struct RemoteServing {
    node: freshet_cluster::node::ClusterNode,
    child: super::cluster::NodeProcess,
    url: String,
}

async fn remote_serving(
    settings: &Settings,
    pipe: &PipelineHandle,
    dir: &std::path::Path,
) -> anyhow::Result<RemoteServing> {
    use freshet_cluster::node::ClusterNode;
    let cookie = format!("bench-{}-{}", std::process::id(), now_ms());
    let name = format!("bench-trainer-{}", std::process::id());
    let roles = "trainer,serving,joiner";
    let cfg = super::cluster::loopback_node(settings, &name, roles, cookie.clone())?;
    let node = ClusterNode::start(&cfg).await?;
    let n = node.clone();
    pipe.replicas()
        .follow(Arc::new(move |v, trace| n.published(v, trace)));
    node.offer_models(
        pipe.store().clone(),
        pipe.replicas().serving().map(|m| m.version()),
    );
    // A free port for its HTTP API (and the next one, its operations port).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let join = node.addr().to_owned();
    let child = super::cluster::start_node_with(
        dir,
        "bench-serving",
        &cookie,
        "serving",
        &["--join", &join, "--listen", &listen],
    )?;
    let url = format!("http://{listen}");
    let end = std::time::Instant::now() + Duration::from_secs(60);
    // Up once its HTTP API answers (503 until a version arrives).
    let timeout = Duration::from_secs(2);
    while crate::ctl::request(&url, "GET", "/healthz", None, None, timeout).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < end,
            "the serving node did not answer within a minute; see {}",
            dir.join("bench-serving.log").display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(RemoteServing { node, child, url })
}

/// A serving node's follower counters, from its `/healthz`.
fn remote_following(url: &str) -> anyhow::Result<serde_json::Value> {
    let (code, body) =
        crate::ctl::request(url, "GET", "/healthz", None, None, Duration::from_secs(5))?;
    let h: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("the serving node's /healthz ({code}): {body}"))?;
    Ok(h["following"].clone())
}

/// The version a serving node's `/healthz` names, when it answers.
fn remote_version(url: &str) -> Option<u64> {
    let (code, body) =
        crate::ctl::request(url, "GET", "/healthz", None, None, Duration::from_secs(2)).ok()?;
    if code != 200 {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(&body).ok()?["serving"].as_u64()
}
