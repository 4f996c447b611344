//! Trace export: the flows' spans (`freshet_actors::telemetry`) to an OTLP receiver.
//!
//! The pipeline never waits on the receiver. A span that ends goes into a bounded queue
//! ([`QueueProcessor`]) without blocking; one exporter thread takes batches from it and posts
//! them as OTLP/HTTP protobuf through a small blocking client ([`BlockingHttp`]). When the
//! queue is full (the receiver is slow or down) the span is dropped and counted, and a batch
//! the receiver refuses is counted the same way: `/metrics` shows both.
//!
//! No endpoint, no export: the layer is not installed and flows create no span at all.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample, SpanData,
    SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use crate::settings::TelemetrySettings;

/// Who is exporting: the resource every span of this process carries.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    /// `service.instance.id`: the node's name (`--name`, `cluster.name`), else the host's.
    pub(crate) instance: String,
    /// `freshet.node.roles`, as `trainer,serving,joiner`.
    pub(crate) roles: String,
}

/// Where spans go and which are kept, from `[telemetry]` and the standard environment
/// variables over it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ExportConfig {
    /// The full URL spans are posted to (`…/v1/traces`).
    pub(crate) traces_url: String,
    pub(crate) sampler: SamplerKind,
    pub(crate) ratio: f64,
    pub(crate) queue: usize,
    pub(crate) batch: usize,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// The samplers `OTEL_TRACES_SAMPLER` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SamplerKind {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio,
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio,
}

impl std::str::FromStr for SamplerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "always_on" => Self::AlwaysOn,
            "always_off" => Self::AlwaysOff,
            "traceidratio" => Self::TraceIdRatio,
            "parentbased_always_on" => Self::ParentBasedAlwaysOn,
            "parentbased_always_off" => Self::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Self::ParentBasedTraceIdRatio,
            other => {
                return Err(format!(
                    "unknown sampler {other:?}: expected always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ))
            }
        })
    }
}

/// Reads `name` from the environment; an empty value is unset, as the specification says.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Appends the traces path to a base endpoint, as `OTEL_EXPORTER_OTLP_ENDPOINT` is read.
fn traces_url_of(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

impl ExportConfig {
    /// The configuration in effect, or `None` when nothing is exported: no endpoint, or
    /// `OTEL_SDK_DISABLED=true`. The environment beats the file, as users of every other
    /// OpenTelemetry SDK expect: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` and `telemetry.otlp_endpoint` (bases: `/v1/traces` is
    /// appended).
    pub(crate) fn resolve(
        s: &TelemetrySettings,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let (from, traces_url) = if let Some(u) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", u)
        } else if let Some(u) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_ENDPOINT", traces_url_of(&u))
        } else if let Some(u) = s.otlp_endpoint.as_deref().filter(|u| !u.trim().is_empty()) {
            ("telemetry.otlp_endpoint", traces_url_of(u))
        } else {
            return Ok(None);
        };
        Target::parse(&traces_url).with_context(|| format!("{from} {traces_url:?}"))?;
        let sampler = match env("OTEL_TRACES_SAMPLER") {
            Some(v) => v
                .parse()
                .map_err(|e: String| anyhow::anyhow!("OTEL_TRACES_SAMPLER: {e}"))?,
            None => s
                .sampler
                .parse()
                .map_err(|e: String| anyhow::anyhow!("telemetry.sampler: {e}"))?,
        };
        let ratio = match env("OTEL_TRACES_SAMPLER_ARG") {
            Some(v) => v.trim().parse::<f64>().map_err(|_| {
                anyhow::anyhow!("OTEL_TRACES_SAMPLER_ARG {v:?}: expected a ratio from 0 to 1")
            })?,
            None => s.sampler_arg,
        };
        if !(0.0..=1.0).contains(&ratio) {
            bail!("the sampler's ratio {ratio} is not between 0 and 1");
        }
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = env(var).filter(|p| p.trim() != "http/protobuf") {
                bail!("{var} {p:?}: Freshet exports OTLP over http/protobuf only");
            }
        }
        for var in [
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ] {
            if let Some(c) = env(var).filter(|c| c.trim() != "none") {
                bail!("{var} {c:?}: Freshet sends spans uncompressed (none)");
            }
        }
        let timeout_ms = match [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]
        .into_iter()
        .find_map(|var| env(var).map(|v| (var, v)))
        {
            Some((var, v)) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| anyhow::anyhow!("{var} {v:?}: expected milliseconds, as 10000"))?,
            None => s.export_timeout_ms,
        };
        Ok(Some(Self {
            traces_url,
            sampler,
            ratio,
            queue: s.queue_spans.max(1),
            batch: s.batch_spans.max(1),
            interval: Duration::from_millis(s.export_interval_ms.max(1)),
            timeout: Duration::from_millis(timeout_ms.max(1)),
        }))
    }
}

/// Counters of the export, for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ExportStats {
    pub(crate) exported: AtomicU64,
    /// Ended while the queue was full.
    pub(crate) dropped_queue_full: AtomicU64,
    /// In a batch the receiver refused or never answered.
    pub(crate) dropped_export_failed: AtomicU64,
    /// Ended after the exporter stopped (shutdown, or its thread ended).
    pub(crate) dropped_exporter_stopped: AtomicU64,
    pub(crate) batches_failed: AtomicU64,
}

static STATS: OnceLock<Arc<ExportStats>> = OnceLock::new();

/// This process's export counters, once export started.
pub(crate) fn stats() -> Option<&'static Arc<ExportStats>> {
    STATS.get()
}

/// Appends the export's counters to a `/metrics` page (nothing when tracing is off).
pub(crate) fn write_metrics(out: &mut String) {
    use std::fmt::Write;
    let Some(s) = stats() else { return };
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP freshet_trace_spans_exported_total Spans the OTLP receiver accepted.\n\
         # TYPE freshet_trace_spans_exported_total counter\n\
         freshet_trace_spans_exported_total {}\n\
         # HELP freshet_trace_spans_dropped_total Spans not exported: the queue was full, or \
         the receiver refused or never answered their batch.\n\
         # TYPE freshet_trace_spans_dropped_total counter\n\
         freshet_trace_spans_dropped_total{{reason=\"queue_full\"}} {}\n\
         freshet_trace_spans_dropped_total{{reason=\"export_failed\"}} {}\n\
         freshet_trace_spans_dropped_total{{reason=\"exporter_stopped\"}} {}\n\
         # HELP freshet_trace_export_failures_total Batches the OTLP receiver refused or never \
         answered.\n\
         # TYPE freshet_trace_export_failures_total counter\n\
         freshet_trace_export_failures_total {}",
        n(&s.exported),
        n(&s.dropped_queue_full),
        n(&s.dropped_export_failed),
        n(&s.dropped_exporter_stopped),
        n(&s.batches_failed),
    );
}

/// The export running in this process; [`Telemetry::shutdown`] flushes what is queued.
#[derive(Debug)]
pub(crate) struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Stops flow spans, then sends what is queued, waiting at most `timeout` for the receiver.
    pub(crate) fn shutdown(&self, timeout: Duration) {
        freshet_actors::telemetry::set_enabled(false);
        if let Err(e) = self.provider.shutdown_with_timeout(timeout) {
            tracing::debug!(error = %e, "trace export shut down with spans unsent");
        }
    }
}

/// The resource of this process's spans: `service.name` (`freshet` unless `OTEL_SERVICE_NAME`
/// names another), `service.instance.id`, `service.version`, the roles, and whatever
/// `OTEL_RESOURCE_ATTRIBUTES` adds.
fn resource(id: &Identity) -> Resource {
    let mut b = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        b = b.with_service_name("freshet");
    }
    b.with_attributes([
        KeyValue::new("service.instance.id", id.instance.clone()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("freshet.node.roles", id.roles.clone()),
    ])
    .build()
}

/// Starts the export: its provider (queue, exporter thread, sampler, resource) and the tracer
/// the `tracing` layer feeds flow spans to.
pub(crate) fn start(
    cfg: &ExportConfig,
    id: &Identity,
) -> anyhow::Result<(SdkTracerProvider, opentelemetry_sdk::trace::Tracer)> {
    let stats = STATS.get_or_init(Default::default).clone();
    let resource = resource(id);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(BlockingHttp {
            timeout: cfg.timeout,
        })
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(cfg.traces_url.clone())
        .with_timeout(cfg.timeout)
        .build()
        .context("building the OTLP exporter")?;
    exporter.set_resource(&resource);
    let processor = QueueProcessor::start(exporter, cfg, stats)?;
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(FlowSampler::new(cfg.sampler, cfg.ratio))
        .with_span_processor(processor)
        .build();
    let tracer = provider.tracer("freshet");
    Ok((provider, tracer))
}

/// Wraps a provider started by [`start`] once its layer is installed.
pub(crate) fn running(provider: SdkTracerProvider) -> Telemetry {
    freshet_actors::telemetry::set_enabled(true);
    Telemetry { provider }
}

/// The configured sampler, except that a version's life and a supervision event, when they
/// start a trace, are always kept (unless the sampler is off): they come a few times a second
/// at most, and "what happened to version 41" needs version 41's trace.
#[derive(Clone, Debug)]
struct FlowSampler {
    base: Sampler,
    rare_always: bool,
}

/// Root spans of the rare flows ([`FlowSampler`]).
const RARE_ROOTS: [&str; 2] = ["version.", "supervision."];

impl FlowSampler {
    fn new(kind: SamplerKind, ratio: f64) -> Self {
        let parent_based = |s| Sampler::ParentBased(Box::new(s));
        let (base, rare_always) = match kind {
            SamplerKind::AlwaysOn => (Sampler::AlwaysOn, true),
            SamplerKind::AlwaysOff => (Sampler::AlwaysOff, false),
            SamplerKind::TraceIdRatio => (Sampler::TraceIdRatioBased(ratio), true),
            SamplerKind::ParentBasedAlwaysOn => (parent_based(Sampler::AlwaysOn), true),
            SamplerKind::ParentBasedAlwaysOff => (parent_based(Sampler::AlwaysOff), false),
            SamplerKind::ParentBasedTraceIdRatio => {
                (parent_based(Sampler::TraceIdRatioBased(ratio)), true)
            }
        };
        Self { base, rare_always }
    }
}

impl ShouldSample for FlowSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let parent_sc = parent
            .map(|cx| cx.span().span_context().clone())
            .filter(|sc| sc.is_valid());
        // A child of a kept span is kept, whichever sampler: a version's life and a
        // supervision event are kept whole even under `traceidratio`.
        if self.rare_always && parent_sc.as_ref().is_some_and(|sc| sc.is_sampled()) {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: parent_sc
                    .map(|sc| sc.trace_state().clone())
                    .unwrap_or_default(),
            };
        }
        let root = parent_sc.is_none();
        if root && self.rare_always && RARE_ROOTS.iter().any(|p| name.starts_with(p)) {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: Default::default(),
            };
        }
        self.base
            .should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

enum Cmd {
    Span(Box<SpanData>),
    /// Export everything queued before this, then answer.
    Flush(SyncSender<()>),
}

/// A span processor that never blocks the span's thread: a bounded queue to one exporter
/// thread, drops counted.
#[derive(Debug)]
struct QueueProcessor {
    tx: Mutex<Option<SyncSender<Cmd>>>,
    stats: Arc<ExportStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl QueueProcessor {
    fn start<E: SpanExporter + 'static>(
        exporter: E,
        cfg: &ExportConfig,
        stats: Arc<ExportStats>,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        let (batch, interval) = (cfg.batch, cfg.interval);
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export_loop(exporter, rx, batch, interval, &thread_stats))
            .context("starting the trace export thread")?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            stats,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn sender(&self) -> Option<SyncSender<Cmd>> {
        self.tx.lock().ok().and_then(|g| g.clone())
    }
}

fn export_loop<E: SpanExporter>(
    exporter: E,
    rx: Receiver<Cmd>,
    batch: usize,
    interval: Duration,
    stats: &ExportStats,
) {
    let mut spans: Vec<SpanData> = Vec::with_capacity(batch);
    let mut due = Instant::now() + interval;
    // A receiver that is down fails every batch: said once a minute, counted always.
    let mut warned: Option<Instant> = None;
    let mut send = |spans: &mut Vec<SpanData>| {
        if spans.is_empty() {
            return;
        }
        let n = spans.len() as u64;
        match block_on(exporter.export(std::mem::take(spans))) {
            Ok(()) => {
                stats.exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                stats.batches_failed.fetch_add(1, Ordering::Relaxed);
                stats.dropped_export_failed.fetch_add(n, Ordering::Relaxed);
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    warned = Some(Instant::now());
                    tracing::warn!(
                        error = %e,
                        dropped_export_failed = stats.dropped_export_failed.load(Ordering::Relaxed),
                        dropped_queue_full = stats.dropped_queue_full.load(Ordering::Relaxed),
                        "the OTLP receiver took no spans; they are dropped, the pipeline goes on"
                    );
                }
            }
        }
    };
    loop {
        let wait = due.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Cmd::Span(s)) => {
                spans.push(*s);
                if spans.len() >= batch {
                    send(&mut spans);
                }
            }
            Ok(Cmd::Flush(done)) => {
                send(&mut spans);
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => {
                send(&mut spans);
                due = Instant::now() + interval;
            }
            Err(RecvTimeoutError::Disconnected) => {
                send(&mut spans);
                let _ = exporter.shutdown();
                return;
            }
        }
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let Some(tx) = self.sender() else {
            self.stats
                .dropped_exporter_stopped
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        match tx.try_send(Cmd::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                let before = self
                    .stats
                    .dropped_exporter_stopped
                    .fetch_add(1, Ordering::Relaxed);
                if before == 0 {
                    tracing::error!("the trace exporter's thread ended; spans are dropped");
                }
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush(Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let flushed = self.flush(timeout);
        // Dropping the sender ends the thread once it sent what it holds.
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        if flushed.is_ok() {
            if let Some(t) = self.thread.lock().ok().and_then(|mut g| g.take()) {
                let _ = t.join();
            }
        }
        flushed
    }
}

impl QueueProcessor {
    fn flush(&self, timeout: Duration) -> OTelSdkResult {
        use opentelemetry_sdk::error::OTelSdkError;
        let Some(tx) = self.sender() else {
            return Ok(());
        };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let deadline = Instant::now() + timeout;
        // The queue may be full: keep offering the flush until the deadline.
        let mut cmd = Cmd::Flush(done_tx);
        loop {
            match tx.try_send(cmd) {
                Ok(()) => break,
                Err(TrySendError::Full(c)) if Instant::now() < deadline => {
                    cmd = c;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return Err(OTelSdkError::Timeout(timeout)),
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

/// Runs a future to completion on this thread. The exporter's futures do blocking work
/// inside (the client below, the retry's sleeps), so one poll almost always finishes them.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context as TaskContext, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = TaskContext::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// Where a request goes: `http://host:port/path`.
#[derive(Debug, PartialEq)]
struct Target {
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            if url.starts_with("https://") {
                bail!(
                    "https is not supported: export to an OpenTelemetry Collector on the node \
                     or its network (http://HOST:4318), which forwards over TLS"
                );
            }
            bail!("expected an http:// URL, as http://127.0.0.1:4318");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| anyhow::anyhow!("port {p:?} is not a number"))?,
            ),
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            bail!("no host in the URL");
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }
}

/// A blocking HTTP/1.1 client for the exporter's thread: one connection per batch, every step
/// (connect, write, each read) bounded by `timeout`.
#[derive(Debug)]
struct BlockingHttp {
    timeout: Duration,
}

/// The largest response read: OTLP answers are a few bytes.
const MAX_RESPONSE: u64 = 1 << 20;

impl BlockingHttp {
    fn post(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> anyhow::Result<http::Response<bytes::Bytes>> {
        let target = Target::parse(&request.uri().to_string())?;
        let addr = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", target.host))?
            .next()
            .with_context(|| format!("{} has no address", target.host))?;
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.set_nodelay(true)?;
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Length: {}\r\nConnection: close\r\n",
            target.path,
            target.host,
            target.port,
            request.body().len()
        );
        for (k, v) in request.headers() {
            if k == http::header::CONTENT_LENGTH || k == http::header::HOST {
                continue;
            }
            let v = v.to_str().context("a header value that is not text")?;
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(request.body())?;
        stream.flush()?;
        read_response(stream.take(MAX_RESPONSE))
    }
}

/// An HTTP/1.1 response read to its end (the request asked to close).
fn read_response(mut r: impl Read) -> anyhow::Result<http::Response<bytes::Bytes>> {
    let mut raw = Vec::new();
    r.read_to_end(&mut raw).context("reading the answer")?;
    let (status, headers, body) = crate::ctl::parse_response_full(&raw)?;
    let mut builder = http::Response::builder().status(status);
    for (k, v) in headers {
        builder = builder.header(k, v);
    }
    builder
        .body(bytes::Bytes::from(body))
        .context("a response that does not parse")
}

impl opentelemetry_http::HttpClient for BlockingHttp {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: http::Request<bytes::Bytes>,
    ) -> Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError>,
                > + Send
                + 'b,
        >,
    >
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move { self.post(request).map_err(|e| format!("{e:#}").into()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::TelemetrySettings;

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
                .filter(|v| !v.trim().is_empty())
        }
    }

    #[test]
    fn no_endpoint_exports_nothing_and_the_environment_beats_the_file() {
        let mut s = TelemetrySettings::default();
        assert_eq!(ExportConfig::resolve(&s, env_of(&[])).unwrap(), None);
        s.otlp_endpoint = Some("http://collector:4318/".into());
        let c = ExportConfig::resolve(&s, env_of(&[])).unwrap().unwrap();
        assert_eq!(c.traces_url, "http://collector:4318/v1/traces");
        assert_eq!(c.sampler, SamplerKind::ParentBasedTraceIdRatio);
        let c = ExportConfig::resolve(
            &s,
            env_of(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
                ("OTEL_TRACES_SAMPLER", "always_on"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.traces_url, "http://127.0.0.1:9/v1/traces");
        assert_eq!((c.sampler, c.ratio), (SamplerKind::AlwaysOn, 0.5));
        let c = ExportConfig::resolve(
            &s,
            env_of(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://127.0.0.1:7/custom",
                ),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.traces_url, "http://127.0.0.1:7/custom");
        assert_eq!(c.timeout, Duration::from_millis(5_000));
        let c = ExportConfig::resolve(
            &s,
            env_of(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "250"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
        assert_eq!(
            ExportConfig::resolve(&s, env_of(&[("OTEL_SDK_DISABLED", "TRUE")])).unwrap(),
            None
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let s = TelemetrySettings {
            otlp_endpoint: Some("collector:4318".into()),
            ..Default::default()
        };
        let e = ExportConfig::resolve(&s, env_of(&[])).unwrap_err();
        assert!(
            format!("{e:#}").contains("telemetry.otlp_endpoint"),
            "{e:#}"
        );
        let e = ExportConfig::resolve(
            &s,
            env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://api.honeycomb.io")]),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("https is not supported"), "{e:#}");
        for (k, v, says) in [
            ("OTEL_TRACES_SAMPLER", "sometimes", "unknown sampler"),
            ("OTEL_TRACES_SAMPLER_ARG", "lots", "expected a ratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5", "not between 0 and 1"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "http/protobuf only"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip", "uncompressed"),
            (
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                "soon",
                "expected milliseconds",
            ),
        ] {
            let e = ExportConfig::resolve(
                &s,
                env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://h:1"), (k, v)]),
            )
            .unwrap_err();
            assert!(format!("{e:#}").contains(says), "{k}={v}: {e:#}");
        }
    }

    #[test]
    fn urls_parse_into_host_port_and_path() {
        let t = Target::parse("http://127.0.0.1:4318/v1/traces").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 4318, "/v1/traces")
        );
        let t = Target::parse("http://[::1]:4318/v1/traces").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 4318));
        let t = Target::parse("http://collector").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("collector", 80, "/")
        );
        for bad in ["", "http://", "http://h:port/x", "ftp://h/x", "h:1/x"] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn responses_parse_and_malformed_ones_are_errors() {
        let ok = read_response(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"[..]).unwrap();
        assert_eq!((ok.status().as_u16(), &ok.body()[..]), (200, &b"hi"[..]));
        let chunked = read_response(
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n1\r\n!\r\n0\r\n\r\n"
                [..],
        )
        .unwrap();
        assert_eq!(&chunked.body()[..], b"hi!");
        let to_end = read_response(&b"HTTP/1.0 503 No\r\n\r\nbusy"[..]).unwrap();
        assert_eq!(
            (to_end.status().as_u16(), &to_end.body()[..]),
            (503, &b"busy"[..])
        );
        for bad in [
            &b""[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n",
        ] {
            assert!(
                read_response(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn the_rare_flows_are_kept_at_any_ratio_and_children_follow_their_parent() {
        let s = FlowSampler::new(SamplerKind::ParentBasedTraceIdRatio, 0.0);
        let decide = |parent: Option<&Context>, name: &str| {
            s.should_sample(
                parent,
                TraceId::from(7u128),
                name,
                &SpanKind::Internal,
                &[],
                &[],
            )
            .decision
        };
        assert_eq!(decide(None, "train.step"), SamplingDecision::Drop);
        // Under a sampler that is not parent-based, the children of a kept version are kept.
        let ratio = FlowSampler::new(SamplerKind::TraceIdRatio, 0.0);
        let kept = freshet_actors::telemetry::span_context(
            &freshet_actors::envelope::TraceContext::from_headers(
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                None,
            ),
        )
        .unwrap();
        let under = Context::new().with_remote_span_context(kept);
        assert_eq!(
            ratio
                .should_sample(
                    Some(&under),
                    TraceId::from(7u128),
                    "version.write",
                    &SpanKind::Internal,
                    &[],
                    &[]
                )
                .decision,
            SamplingDecision::RecordAndSample
        );
        assert_eq!(
            decide(None, "version.capture"),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(
            decide(None, "supervision.restart"),
            SamplingDecision::RecordAndSample
        );
        let sampled = freshet_actors::telemetry::span_context(
            &freshet_actors::envelope::TraceContext::from_headers(
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                None,
            ),
        )
        .unwrap();
        let cx = Context::new().with_remote_span_context(sampled);
        assert_eq!(
            decide(Some(&cx), "train.step"),
            SamplingDecision::RecordAndSample
        );
        let off = FlowSampler::new(SamplerKind::AlwaysOff, 1.0);
        assert_eq!(
            off.should_sample(
                None,
                TraceId::from(7u128),
                "version.capture",
                &SpanKind::Internal,
                &[],
                &[]
            )
            .decision,
            SamplingDecision::Drop
        );
    }

    /// An exporter that takes `delay` per batch and keeps what it got.
    #[derive(Debug, Clone, Default)]
    struct Slow {
        delay: Duration,
        got: Arc<Mutex<Vec<SpanData>>>,
    }

    impl SpanExporter for Slow {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            std::thread::sleep(self.delay);
            self.got.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    fn config(queue: usize) -> ExportConfig {
        ExportConfig {
            traces_url: "http://127.0.0.1:9/v1/traces".into(),
            sampler: SamplerKind::AlwaysOn,
            ratio: 1.0,
            queue,
            batch: 8,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
        }
    }

    fn tracer_with(exporter: Slow, queue: usize) -> (SdkTracerProvider, Arc<ExportStats>) {
        let stats = Arc::new(ExportStats::default());
        let p = QueueProcessor::start(exporter, &config(queue), stats.clone()).unwrap();
        let provider = SdkTracerProvider::builder()
            .with_sampler(FlowSampler::new(SamplerKind::AlwaysOn, 1.0))
            .with_span_processor(p)
            .build();
        (provider, stats)
    }

    #[test]
    fn a_stuck_receiver_never_blocks_the_span_s_thread_and_drops_are_counted() {
        use opentelemetry::trace::{Span as _, Tracer as _};
        let slow = Slow {
            delay: Duration::from_secs(2),
            ..Default::default()
        };
        let (provider, stats) = tracer_with(slow.clone(), 16);
        let tracer = provider.tracer("test");
        let t0 = Instant::now();
        for _ in 0..1_000 {
            tracer.start("train.step").end();
        }
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(1), "1,000 spans took {took:?}");
        // At most the queue and one batch in the exporter's hands are kept.
        let dropped = stats.dropped_queue_full.load(Ordering::Relaxed);
        assert!(dropped >= 1_000 - 16 - 8, "dropped {dropped}");
        provider
            .shutdown_with_timeout(Duration::from_secs(10))
            .unwrap();
        let kept = slow.got.lock().unwrap().len() as u64;
        assert_eq!(kept + dropped, 1_000, "every span is exported or counted");
        assert_eq!(stats.exported.load(Ordering::Relaxed), kept);
    }

    #[test]
    fn a_receiver_that_is_down_counts_failed_batches_and_refusals() {
        use opentelemetry::trace::{Span as _, Tracer as _};
        // A port nothing listens on: bind one, learn it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = config(64);
        cfg.traces_url = format!("http://127.0.0.1:{port}/v1/traces");
        STATS.get_or_init(Default::default);
        let (provider, _tracer) = start(
            &cfg,
            &Identity {
                instance: "test".into(),
                roles: "shards".into(),
            },
        )
        .unwrap();
        let stats = stats().unwrap().clone();
        let before = stats.dropped_export_failed.load(Ordering::Relaxed);
        let tracer = provider.tracer("test");
        for _ in 0..5 {
            tracer.start("train.step").end();
        }
        provider.force_flush().unwrap();
        assert!(
            stats.dropped_export_failed.load(Ordering::Relaxed) >= before + 5,
            "refused spans are counted"
        );
        assert!(stats.batches_failed.load(Ordering::Relaxed) >= 1);
        let mut page = String::new();
        write_metrics(&mut page);
        assert!(page.contains("freshet_trace_spans_dropped_total{reason=\"export_failed\"}"));
        provider
            .shutdown_with_timeout(Duration::from_secs(10))
            .unwrap();
    }
}
