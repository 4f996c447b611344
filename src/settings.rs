//! Layered configuration: built-in defaults < `freshet.toml` (or `--config FILE`) <
//! `FRESHET__SECTION__KEY` environment variables < command-line flags.
//!
//! Every refusal names the key, the value and what was expected, whichever layer the value
//! came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use freshet_actors::ckpt::ModelStore;
use freshet_actors::dense::ModelConfig;
use freshet_actors::embedding::{
    AdmissionConfig, EvictionConfig, Initializer, InvalidValue, OptimizerConfig, TableConfig,
};
use freshet_actors::event::SAMPLE_REJECTS_TOPIC;
use freshet_actors::fault::Faults;
use freshet_actors::joiner::{CheckpointEvery, JoinConfig};
use freshet_actors::online::gate::GateConfig;
use freshet_actors::online::pipeline::{Logs, PipelineConfig};
use freshet_actors::sample::Schema;
use freshet_actors::stream::{open_topic, LogConfig};
use freshet_actors::supervisor::Intensity;
use freshet_actors::training::FreshModel;
use serde::{Deserialize, Serialize};

/// The whole configuration of a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Settings {
    pub(crate) node: NodeSettings,
    pub(crate) embedding: EmbeddingSettings,
    /// The sample layout: labels, dense features, sparse fields and their tables.
    pub(crate) schema: Schema,
    /// The model trained by `freshet train` (`--model` overrides the kind).
    pub(crate) model: ModelConfig,
    pub(crate) train: TrainSettings,
    /// The embedded stream log (events, samples, dead letters) under `<data_dir>/log`.
    pub(crate) log: LogConfig,
    pub(crate) joiner: JoinerSettings,
    /// When the CheckpointWriter takes versions and how many it keeps.
    pub(crate) checkpoint: CheckpointSettings,
    /// How new versions reach serving and the gate that judges them (`freshet dev`).
    pub(crate) validation: GateConfig,
    /// How often the node's supervisor restarts failed actors before it gives up.
    pub(crate) supervisor: SupervisorSettings,
    /// What the HTTP server (`dev`, `serve`) allows a client: time to send a request, idle
    /// time, connections.
    pub(crate) http: HttpSettings,
    /// How a node joins a cluster (`freshet node`, `freshet train --join`): its id, roles,
    /// cluster port, seeds, secret and heartbeat lease.
    pub(crate) cluster: ClusterSettings,
    /// Trace export over OTLP: where to, and which traces are kept (docs/observability.md).
    pub(crate) telemetry: TelemetrySettings,
    /// Every key a file, the environment or a flag gave (dotted, as `joiner.window.window_ms`),
    /// so that a command's own default never beats a value the user set.
    #[serde(skip)]
    pub(crate) given: std::collections::BTreeSet<String>,
}

/// `freshet dev`'s join window when `--window-ms` is not given: shorter than a production
/// window, so that negatives arrive while one watches.
pub(crate) const DEV_WINDOW_MS: u64 = 5000;

/// How long the node's pipeline remembers a closed impression (for duplicates and late
/// clicks) when no layer sets `joiner.window.remember_closed_ms`, unless its window is longer.
/// The event log keeps every remembered impression (a restart reads its features back), so
/// this bounds the log: 2 minutes of events at the simulator's default rate is about 80 MB,
/// against 400 MB for the production default of 10 minutes; and with a 5 s window, a click
/// more than 2 minutes late is 0.07% of the simulator's clicks.
pub(crate) const DEV_REMEMBER_CLOSED_MS: u64 = 120_000;

/// The HTTP server's bounds on its clients. A client that sends slowly, or not at all, holds a
/// connection and a file descriptor; these bound how long and how many, so that no client can
/// take the descriptors the pipeline needs (`src/fdlimit.rs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HttpSettings {
    /// A request's line and headers must arrive within this many milliseconds of its
    /// connection's first byte, else 408 and the connection is closed.
    pub(crate) header_timeout_ms: u64,
    /// Its body must arrive whole within this many milliseconds of its headers, else 408 and
    /// the connection is closed.
    pub(crate) body_timeout_ms: u64,
    /// A kept-alive connection with no request is closed after this many milliseconds.
    pub(crate) keep_alive_ms: u64,
    /// Connections open at once, over all workers; more wait in the listen queue. Capped at half
    /// the process's file-descriptor limit (raised to its hard limit at start), which leaves the
    /// other half to the pipeline.
    pub(crate) max_connections: usize,
    /// Connections the operations port (`--ops-listen`) takes at once, apart from
    /// `max_connections`, so that a flood on the main port never locks out a health probe or
    /// an operator.
    pub(crate) ops_max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_timeout_ms: 5_000,
            body_timeout_ms: 10_000,
            keep_alive_ms: 5_000,
            max_connections: 1024,
            ops_max_connections: 64,
        }
    }
}

impl HttpSettings {
    fn validate(&self) -> Result<(), InvalidValue> {
        for (key, v) in [
            ("http.header_timeout_ms", self.header_timeout_ms),
            ("http.body_timeout_ms", self.body_timeout_ms),
            ("http.keep_alive_ms", self.keep_alive_ms),
        ] {
            if v == 0 || v > 3_600_000 {
                return Err(InvalidValue::new(key, v, "milliseconds in 1..=3600000"));
            }
        }
        for (key, v) in [
            ("http.max_connections", self.max_connections),
            ("http.ops_max_connections", self.ops_max_connections),
        ] {
            if v == 0 || v > 1 << 20 {
                return Err(InvalidValue::new(key, v, "an integer in 1..=1048576"));
            }
        }
        Ok(())
    }
}

/// `[cluster]`: one node of a cluster. The secret is never a key here that a flag could set
/// (a flag shows in `ps`): it is read from `cookie_file` or `FRESHET_CLUSTER_COOKIE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ClusterSettings {
    /// The node's stable id (`--name`); other nodes and the placement know it by this.
    pub(crate) name: Option<String>,
    /// Roles, comma-separated: any of `shards`, `trainer`, `serving`, `joiner`.
    pub(crate) roles: String,
    /// Where the cluster port listens (`--cluster-listen`).
    pub(crate) listen: String,
    /// Seed nodes to join at start (`--join`).
    pub(crate) join: Vec<String>,
    /// A file holding the cluster secret (`--cookie-file`).
    pub(crate) cookie_file: Option<PathBuf>,
    /// Milliseconds between heartbeats.
    pub(crate) heartbeat_ms: u64,
    /// A node unheard for this many milliseconds is down.
    pub(crate) lease_ms: u64,
    /// Requests in flight to one node at most; a caller beyond it waits for an answer.
    pub(crate) max_in_flight: usize,
    /// How long joining one seed may take, in milliseconds.
    pub(crate) join_timeout_ms: u64,
    /// A request to another node unanswered for this many milliseconds fails.
    pub(crate) request_timeout_ms: u64,
    /// First delay before dialling a lost node again, doubling up to `reconnect_max_ms`.
    pub(crate) reconnect_base_ms: u64,
    pub(crate) reconnect_max_ms: u64,
    /// TLS between nodes: this node's certificate and key, and the cluster CA that signed
    /// every node's (PEM files). All three, or none for plaintext after the handshake.
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
    pub(crate) tls_ca: Option<PathBuf>,
}

/// `[telemetry]`: spans of every flow, exported over OTLP/HTTP. The standard variables
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SDK_DISABLED`; docs/observability.md lists them) beat
/// these keys, as in every OpenTelemetry SDK.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TelemetrySettings {
    /// The receiver's base URL, as `http://127.0.0.1:4318` (`/v1/traces` is appended). None:
    /// nothing is exported and no span is made.
    pub(crate) otlp_endpoint: Option<String>,
    /// How a trace that no caller started is kept: an `OTEL_TRACES_SAMPLER` name.
    pub(crate) sampler: String,
    /// The ratio of the `traceidratio` samplers: the share of training steps, predictions and
    /// events whose trace starts here that are kept. A version's life and supervision events
    /// are kept whatever the ratio.
    pub(crate) sampler_arg: f64,
    /// Ended spans waiting for the exporter at most; beyond it they are dropped and counted.
    pub(crate) queue_spans: usize,
    /// Spans sent in one request at most.
    pub(crate) batch_spans: usize,
    /// How long an ended span waits for its batch to fill, in milliseconds.
    pub(crate) export_interval_ms: u64,
    /// How long each step of an export (connect, send, each read) may take, and the deadline
    /// of its retries, in milliseconds.
    pub(crate) export_timeout_ms: u64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sampler: "parentbased_traceidratio".into(),
            sampler_arg: 0.01,
            queue_spans: 4096,
            batch_spans: 512,
            export_interval_ms: 1_000,
            export_timeout_ms: 5_000,
        }
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            name: None,
            roles: "shards".into(),
            listen: "127.0.0.1:7400".into(),
            join: Vec::new(),
            cookie_file: None,
            heartbeat_ms: 500,
            lease_ms: 3_000,
            max_in_flight: 64,
            join_timeout_ms: 10_000,
            request_timeout_ms: 60_000,
            reconnect_base_ms: 200,
            reconnect_max_ms: 10_000,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }
}

impl ClusterSettings {
    fn validate(&self) -> Result<(), InvalidValue> {
        self.roles
            .parse::<freshet_cluster::membership::Roles>()
            .map_err(|e| InvalidValue::new("cluster.roles", &self.roles, e.to_string()))?;
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(InvalidValue::new(
                "cluster.listen",
                &self.listen,
                "an IP address and port, as 127.0.0.1:7400",
            ));
        }
        if let Some(name) = &self.name {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !valid {
                return Err(InvalidValue::new(
                    "cluster.name",
                    name,
                    "1 to 64 letters, digits, '_', '-' and '.'",
                ));
            }
        }
        freshet_cluster::membership::Lease::new(self.heartbeat_ms, self.lease_ms)
            .map_err(|e| InvalidValue::new("cluster.lease_ms", self.lease_ms, e.to_string()))?;
        for (key, v) in [
            ("cluster.heartbeat_ms", self.heartbeat_ms),
            ("cluster.lease_ms", self.lease_ms),
            ("cluster.join_timeout_ms", self.join_timeout_ms),
            ("cluster.request_timeout_ms", self.request_timeout_ms),
            ("cluster.reconnect_base_ms", self.reconnect_base_ms),
            ("cluster.reconnect_max_ms", self.reconnect_max_ms),
        ] {
            if v == 0 || v > 3_600_000 {
                return Err(InvalidValue::new(key, v, "milliseconds in 1..=3600000"));
            }
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1 << 16 {
            return Err(InvalidValue::new(
                "cluster.max_in_flight",
                self.max_in_flight,
                "an integer in 1..=65536",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct CheckpointSettings {
    /// A version every this many training steps (0: not by steps).
    pub(crate) every_steps: u64,
    /// A version at least this often, in seconds (0: not by time; otherwise at least 1).
    pub(crate) every_secs: f64,
    /// After this many deltas the next version is full.
    pub(crate) full_every: u32,
    /// Full versions (with their deltas) kept; older ones are deleted unless pinned.
    pub(crate) keep_full: usize,
    /// Bytes the kept versions may take (0: no bound). Past it, whole chains are deleted,
    /// oldest first; the newest chain and pinned versions' chains are always kept.
    pub(crate) keep_bytes: u64,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            every_steps: 0,
            every_secs: 0.0,
            full_every: 60,
            keep_full: 3,
            keep_bytes: 512 << 20,
        }
    }
}

impl CheckpointSettings {
    pub(crate) fn schedule(&self) -> freshet_actors::ckpt::writer::Schedule {
        freshet_actors::ckpt::writer::Schedule {
            every_steps: (self.every_steps > 0).then_some(self.every_steps),
            every: (self.every_secs > 0.0)
                .then(|| std::time::Duration::from_secs_f64(self.every_secs)),
            full_every: self.full_every,
            keep_full: self.keep_full,
            keep_bytes: (self.keep_bytes > 0).then_some(self.keep_bytes),
        }
    }
}

/// The restart intensity of `freshet dev`'s supervisor: at most `max_restarts` failure restarts
/// within `within_secs`; one more and the node stops training (it keeps serving its last version
/// and says so on `/healthz`). Each restart of a child waits a backoff that doubles with its
/// recent failures, from `backoff_min_ms` to `backoff_max_ms`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct SupervisorSettings {
    pub(crate) max_restarts: u32,
    pub(crate) within_secs: f64,
    pub(crate) backoff_min_ms: u64,
    pub(crate) backoff_max_ms: u64,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        let i = Intensity::default();
        Self {
            max_restarts: i.max_restarts,
            within_secs: i.within.as_secs_f64(),
            backoff_min_ms: i.backoff_min.as_millis() as u64,
            backoff_max_ms: i.backoff_max.as_millis() as u64,
        }
    }
}

impl SupervisorSettings {
    fn validate(&self) -> Result<(), InvalidValue> {
        if !(self.within_secs.is_finite() && self.within_secs > 0.0 && self.within_secs <= 86_400.0)
        {
            return Err(InvalidValue::new(
                "supervisor.within_secs",
                self.within_secs,
                "seconds in (0, 86400]",
            ));
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            return Err(InvalidValue::new(
                "supervisor.backoff_min_ms",
                self.backoff_min_ms,
                format!(
                    "at least 1 and at most supervisor.backoff_max_ms ({})",
                    self.backoff_max_ms
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn intensity(&self) -> Intensity {
        Intensity {
            max_restarts: self.max_restarts,
            within: Duration::from_secs_f64(self.within_secs),
            backoff_min: Duration::from_millis(self.backoff_min_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct JoinerSettings {
    /// Window, lateness, action kinds, late policy, downsampling, state bound.
    pub(crate) window: JoinConfig,
    pub(crate) checkpoint: CheckpointEvery,
    /// Event records joined per step (0: the default of 4096).
    pub(crate) batch: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TrainSettings {
    /// Samples per training step.
    pub(crate) batch: usize,
    /// Threads for the dense math.
    pub(crate) threads: usize,
    /// One seed for everything random in a run: the dense initialisation (`model.seed`), every
    /// embedding table's initializer and sampler (`embedding.tables.*.seed` not set
    /// otherwise), and `freshet dev`'s simulator. Unset: each keeps its own seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) seed: Option<u64>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            batch: 512,
            threads: 2,
            seed: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct NodeSettings {
    /// Where logs, checkpoints and the spill tier live.
    pub(crate) data_dir: PathBuf,
    /// A `tracing` filter, such as `info` or `freshet=debug,info`.
    pub(crate) log: String,
    /// How log lines are written: `text` (coloured on a terminal only) or `json` (one object
    /// per line, for log shippers).
    pub(crate) log_format: LogFormat,
    /// Where `ctl calibrate` may open base stores: under this directory and nowhere else
    /// (default: the directory the node was started in).
    pub(crate) bases_dir: Option<PathBuf>,
}

/// `node.log_format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct EmbeddingSettings {
    /// Number of embedding shards (ShardOwner actors).
    pub(crate) shards: u32,
    /// Directory for the on-disk tier; each shard gets `shard-<i>/` inside it. Defaults to
    /// `<data_dir>/spill` when a table sets a DRAM budget.
    pub(crate) spill_dir: Option<PathBuf>,
    /// Per table, what differs from `default`; `default` itself, what differs from the
    /// built-in table (`freshet config` shows it whole). A table the schema names but no
    /// section configures is `default` at the model's row dim.
    pub(crate) tables: BTreeMap<String, TableSection>,
}

/// One `[embedding.tables.<name>]` section: every key optional, so that a section names only
/// what it changes and inherits the rest from `default` (and `default` from the built-in
/// table, `freshet_actors::training::default_table_config`). An initializer, optimizer,
/// admission or eviction given at all is given whole.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TableSection {
    /// The row dim. The model decides it (the field's embedding dim, plus one for a wide
    /// weight); given, it must agree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dim: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) init: Option<Initializer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) optimizer: Option<OptimizerConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) admission: Option<AdmissionConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) eviction: Option<EvictionConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) default_value: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dram_budget_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reserve_rows: Option<u64>,
}

impl TableSection {
    /// The built-in table as a section with every key given: what `default` starts from.
    fn builtin() -> Self {
        let c = freshet_actors::training::default_table_config(TableConfig::default().dim);
        Self {
            dim: Some(c.dim),
            init: Some(c.init),
            optimizer: Some(c.optimizer),
            admission: Some(c.admission),
            eviction: Some(c.eviction),
            default_value: Some(c.default_value),
            seed: Some(c.seed),
            dram_budget_bytes: c.dram_budget_bytes,
            reserve_rows: Some(c.reserve_rows),
        }
    }

    /// This section, with the keys it does not give taken from `base`.
    fn or(&self, base: &TableSection) -> TableSection {
        TableSection {
            dim: self.dim.or(base.dim),
            init: self.init.clone().or_else(|| base.init.clone()),
            optimizer: self.optimizer.clone().or_else(|| base.optimizer.clone()),
            admission: self.admission.clone().or_else(|| base.admission.clone()),
            eviction: self.eviction.clone().or_else(|| base.eviction.clone()),
            default_value: self.default_value.or(base.default_value),
            seed: self.seed.or(base.seed),
            dram_budget_bytes: self.dram_budget_bytes.or(base.dram_budget_bytes),
            reserve_rows: self.reserve_rows.or(base.reserve_rows),
        }
    }

    /// `c` with every key this section gives replaced; `dim` only when `with_dim`.
    fn apply(&self, mut c: TableConfig, with_dim: bool) -> TableConfig {
        if let (true, Some(d)) = (with_dim, self.dim) {
            c.dim = d;
        }
        if let Some(v) = &self.init {
            c.init = v.clone();
        }
        if let Some(v) = &self.optimizer {
            c.optimizer = v.clone();
        }
        if let Some(v) = &self.admission {
            c.admission = v.clone();
        }
        if let Some(v) = &self.eviction {
            c.eviction = v.clone();
        }
        if let Some(v) = self.default_value {
            c.default_value = v;
        }
        if let Some(v) = self.seed {
            c.seed = v;
        }
        if self.dram_budget_bytes.is_some() {
            c.dram_budget_bytes = self.dram_budget_bytes;
        }
        if let Some(v) = self.reserve_rows {
            c.reserve_rows = v;
        }
        c
    }
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("freshet-data"),
            log: "info".into(),
            log_format: LogFormat::Text,
            bases_dir: None,
        }
    }
}

impl Default for EmbeddingSettings {
    fn default() -> Self {
        Self {
            shards: 4,
            spill_dir: None,
            // Empty here, so that a section in a file, the environment or a flag overrides
            // the built-in table key by key without meeting stale keys of another kind;
            // `Settings::effective` shows it filled in.
            tables: BTreeMap::from([("default".to_owned(), TableSection::default())]),
        }
    }
}

impl Settings {
    /// Checks what types alone cannot.
    pub(crate) fn validate(&self) -> Result<(), InvalidValue> {
        // Else every command would fail later with the OS's bare "File exists".
        if self.node.data_dir.exists() && !self.node.data_dir.is_dir() {
            return Err(InvalidValue::new(
                "node.data_dir",
                self.node.data_dir.display(),
                "a directory, or a path where one can be made (it is a file)",
            ));
        }
        if self.embedding.shards == 0 || self.embedding.shards > 4096 {
            return Err(InvalidValue::new(
                "embedding.shards",
                self.embedding.shards,
                "an integer in 1..=4096",
            ));
        }
        if self.embedding.tables.is_empty() {
            return Err(InvalidValue::new(
                "embedding.tables",
                "{}",
                "at least one table",
            ));
        }
        for (name, t) in &self.embedding.tables {
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                return Err(InvalidValue::new(
                    format!("embedding.tables.{name}"),
                    name,
                    "a table name of letters, digits, '_' and '-'",
                ));
            }
            let dim = t.dim.unwrap_or(TableConfig::default().dim);
            self.table(name, dim)
                .validate(&format!("embedding.tables.{name}"))?;
        }
        self.schema.validate("schema")?;
        self.cluster.validate()?;
        if self.train.batch == 0 || self.train.batch > 1 << 20 {
            return Err(InvalidValue::new(
                "train.batch",
                self.train.batch,
                "an integer in 1..=1048576",
            ));
        }
        if self.train.threads == 0 || self.train.threads > 256 {
            return Err(InvalidValue::new(
                "train.threads",
                self.train.threads,
                "an integer in 1..=256",
            ));
        }
        let c = &self.checkpoint;
        if !(c.every_secs == 0.0 || (c.every_secs >= 1.0 && c.every_secs <= 86_400.0)) {
            return Err(InvalidValue::new(
                "checkpoint.every_secs",
                c.every_secs,
                "0 (off) or a number of seconds in 1..=86400",
            ));
        }
        if c.keep_full == 0 {
            return Err(InvalidValue::new(
                "checkpoint.keep_full",
                c.keep_full,
                "at least 1",
            ));
        }
        self.log.validate("log")?;
        self.joiner.window.validate("joiner.window")?;
        self.supervisor.validate()?;
        self.http.validate()?;
        self.validation.validate("validation")?;
        if self.joiner.batch > 1 << 20 {
            return Err(InvalidValue::new(
                "joiner.batch",
                self.joiner.batch,
                "an integer in 0..=1048576",
            ));
        }
        Ok(())
    }

    pub(crate) fn log_dir(&self) -> PathBuf {
        self.node.data_dir.join("log")
    }

    /// These settings with `seed` (a `--seed` flag, or `train.seed`) seeding everything random:
    /// the dense initialisation and every table whose section sets no seed of its own.
    pub(crate) fn seeded(&self, seed: Option<u64>) -> Settings {
        let mut s = self.clone();
        let Some(seed) = seed.or(s.train.seed) else {
            return s;
        };
        s.train.seed = Some(seed);
        s.model.seed = seed;
        let d = s.embedding.tables.entry("default".to_owned()).or_default();
        if !self.given.contains("embedding.tables.default.seed") {
            d.seed = Some(seed);
        }
        s
    }

    /// The settings as they take effect, for `freshet config`: the `default` table with every
    /// key, the built-in value where no layer gave one.
    pub(crate) fn effective(&self) -> Settings {
        let mut s = self.clone();
        let d = s.embedding.tables.entry("default".to_owned()).or_default();
        *d = d.or(&TableSection::builtin());
        s
    }

    /// Table `name` at row dim `dim`: the built-in table, then `default`, then the table's own
    /// section.
    pub(crate) fn table(&self, name: &str, dim: usize) -> TableConfig {
        let mut c = freshet_actors::training::default_table_config(dim);
        if let Some(d) = self.embedding.tables.get("default") {
            c = d.apply(c, false);
        }
        match self.embedding.tables.get(name) {
            Some(t) if name != "default" => t.apply(c, true),
            _ => c,
        }
    }

    /// Each table the schema and model read, with its `[embedding.tables]` configuration over
    /// `default`. A configured dim that differs from the model's row is refused with the key.
    pub(crate) fn model_tables(
        &self,
        schema: &Schema,
        model: &ModelConfig,
    ) -> anyhow::Result<BTreeMap<String, TableConfig>> {
        let mut tables = BTreeMap::new();
        for (name, dim) in freshet_actors::scorer::Scorer::required_tables(schema, model) {
            let given = (name != "default")
                .then(|| self.embedding.tables.get(&name).and_then(|t| t.dim))
                .flatten();
            if let Some(d) = given.filter(|&d| d != dim) {
                anyhow::bail!(
                    "invalid value {d} for `embedding.tables.{name}.dim`: expected {dim} (the {} \
                     model's row for this table)",
                    model.kind.name()
                );
            }
            let cfg = self.table(&name, dim);
            tables.insert(name, cfg);
        }
        Ok(tables)
    }

    /// [`Settings::model_tables`] for a node that learns from a live stream: a table whose
    /// configuration gives no `eviction` keeps at most [`LIVE_TABLE_CAPACITY_ROWS`] rows per
    /// shard. A live stream brings new keys without end, and every full version copies the
    /// tables whole, so an unbounded table makes each version larger for as long as the node
    /// runs (an offline `freshet train` is bounded by its input, and keeps the built-in table).
    pub(crate) fn live_tables(
        &self,
        schema: &Schema,
        model: &ModelConfig,
    ) -> anyhow::Result<BTreeMap<String, TableConfig>> {
        let mut tables = self.model_tables(schema, model)?;
        let given = |name: &str| {
            self.embedding
                .tables
                .get(name)
                .is_some_and(|t| t.eviction.is_some())
        };
        for (name, cfg) in &mut tables {
            if !given("default") && !given(name) {
                cfg.eviction.capacity = Some(LIVE_TABLE_CAPACITY_ROWS);
            }
        }
        Ok(tables)
    }

    pub(crate) fn joiner_batch(&self) -> usize {
        if self.joiner.batch == 0 {
            4096
        } else {
            self.joiner.batch
        }
    }

    pub(crate) fn spill_dir(&self) -> PathBuf {
        self.embedding
            .spill_dir
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("spill"))
    }
}

/// Builds the settings from every layer. `overrides` are flags, as (dotted key, value).
pub(crate) fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> anyhow::Result<Settings> {
    let defaults = config::Config::try_from(&Settings::default())
        .context("while encoding the built-in defaults")?;
    let b = user_layers(
        config::Config::builder().add_source(defaults),
        file,
        overrides,
    )?;
    let mut settings: Settings = b
        .build()
        .map_err(explain)?
        .try_deserialize()
        .map_err(explain)?;
    settings.given = given_keys(file, overrides)?;
    let settings = settings.seeded(None);
    settings.validate()?;
    Ok(settings)
}

type Builder = config::ConfigBuilder<config::builder::DefaultState>;

/// The user's layers over `b`, each overriding the one before: the file (an explicit --config
/// must exist; the default freshet.toml is optional), the environment, the flags.
fn user_layers(
    b: Builder,
    file: Option<&Path>,
    overrides: &[(&str, String)],
) -> anyhow::Result<Builder> {
    let mut b = match file {
        Some(p) => b.add_source(
            config::File::from(p)
                .format(config::FileFormat::Toml)
                .required(true),
        ),
        None => b.add_source(
            config::File::with_name("freshet.toml")
                .format(config::FileFormat::Toml)
                .required(false),
        ),
    };
    b = b.add_source(
        config::Environment::with_prefix("FRESHET")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true),
    );
    for (k, v) in overrides {
        b = b.set_override(*k, v.as_str())?;
    }
    Ok(b)
}

/// The dotted keys the user's layers set: the same layers as [`load`] without the defaults.
fn given_keys(
    file: Option<&Path>,
    overrides: &[(&str, String)],
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let b = user_layers(config::Config::builder(), file, overrides)?;
    let map: config::Map<String, config::Value> = b
        .build()
        .map_err(explain)?
        .try_deserialize()
        .map_err(explain)?;
    let mut keys = std::collections::BTreeSet::new();
    fn walk(
        prefix: &str,
        map: &config::Map<String, config::Value>,
        keys: &mut std::collections::BTreeSet<String>,
    ) {
        for (k, v) in map {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if let config::ValueKind::Table(t) = &v.kind {
                walk(&key, t, keys);
            }
            keys.insert(key);
        }
    }
    walk("", &map, &mut keys);
    Ok(keys)
}

/// `freshet dev`'s join window: `--window-ms` if given, else `joiner.window.window_ms` if a
/// layer set it, else [`DEV_WINDOW_MS`].
pub(crate) fn dev_window_ms(settings: &Settings, flag: Option<u64>) -> u64 {
    flag.or_else(|| {
        settings
            .given
            .contains("joiner.window.window_ms")
            .then_some(settings.joiner.window.window_ms)
    })
    .unwrap_or(DEV_WINDOW_MS)
}

/// Turns a `config` error into one that names key, value and expectation.
fn explain(e: config::ConfigError) -> anyhow::Error {
    match e {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let key = key.unwrap_or_else(|| "?".into());
            let from = origin.map(|o| format!(" (from {o})")).unwrap_or_default();
            anyhow::Error::new(InvalidValue::new(key, unexpected, expected))
                .context(format!("invalid configuration{from}"))
        }
        other => anyhow::Error::new(other).context("invalid configuration"),
    }
}

/// Rows a shard's table keeps at most in a node that learns from a live stream, when the
/// table's configuration gives no `eviction` ([`Settings::live_tables`]): the least recently
/// used go first, sparing the rows of the current step. On `freshet dev`'s simulator (a
/// million users, 200,000 items, new items every hour) 4 shards of 2^17 rows hold 524,288
/// rows, full versions of about 88 MB at row dim 17 with Adagrad, and a day of the node takes
/// under 1 GB of disk (docs/model-store.md).
pub(crate) const LIVE_TABLE_CAPACITY_ROWS: u64 = 1 << 17;

/// The node's pipeline from the settings, with `dev`'s join window, version interval and
/// replica count.
pub(crate) fn pipeline_config(
    settings: &Settings,
    window_ms: u64,
    delta_ms: u64,
    replicas: usize,
) -> anyhow::Result<PipelineConfig> {
    let root = settings.log_dir();
    let topics = freshet_actors::topics::open_topics(&root, &settings.log)?;
    let sample_rejects = open_topic(&root, SAMPLE_REJECTS_TOPIC, &settings.log)
        .with_context(|| format!("opening topic {SAMPLE_REJECTS_TOPIC}"))?;
    let store_dir = settings.node.data_dir.join("models");
    let store = ModelStore::open(&store_dir)
        .with_context(|| format!("opening the model store {}", store_dir.display()))?;
    let schema = settings.schema.clone();
    let model = settings.model.clone();
    let tables = settings.live_tables(&schema, &model)?;
    let spill = tables
        .values()
        .any(|c| c.dram_budget_bytes.is_some())
        .then(|| settings.spill_dir());
    let mut schedule = settings.checkpoint.schedule();
    if schedule.every.is_none() && schedule.every_steps.is_none() {
        schedule.every = Some(Duration::from_millis(delta_ms.max(1)));
    }
    let mut join = settings.joiner.window.clone();
    join.window_ms = window_ms;
    if !settings.given.contains("joiner.window.remember_closed_ms") {
        join.remember_closed_ms = DEV_REMEMBER_CLOSED_MS.max(window_ms);
    }
    Ok(PipelineConfig {
        logs: Logs {
            events: topics.events,
            samples: topics.samples,
            dead_letters: topics.dead_letters,
            sample_rejects,
        },
        store,
        joiner_dir: settings.node.data_dir.join("joiner"),
        join,
        joiner_checkpoint: settings.joiner.checkpoint,
        joiner_batch: settings.joiner_batch(),
        fresh: FreshModel {
            schema,
            model,
            tables,
        },
        shards: settings.embedding.shards,
        placer: None,
        spill_dir: spill,
        schedule,
        batch: settings.train.batch,
        threads: settings.train.threads,
        gate: settings.validation.clone(),
        replicas,
        intensity: settings.supervisor.intensity(),
        faults: faults_from_env()?,
    })
}

/// The fault points `FRESHET_FAULTS` arms, for fault-injection tests of a whole process
/// ([`Faults::parse`]); unset, none. A node with armed points says so in its log.
pub(crate) fn faults_from_env() -> anyhow::Result<Faults> {
    match std::env::var("FRESHET_FAULTS") {
        Ok(spec) if !spec.trim().is_empty() => {
            let f = Faults::parse(&spec).context("FRESHET_FAULTS")?;
            tracing::warn!(faults = %spec, "FRESHET_FAULTS armed fault points: actors will panic on purpose");
            Ok(f)
        }
        _ => Ok(Faults::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let s = load(Some(Path::new("/nonexistent/none.toml")), &[]);
        assert!(
            s.is_err(),
            "an explicit --config that is missing is an error"
        );
        let s = Settings::default();
        s.validate().unwrap();
        let toml_ok = config::Config::try_from(&s)
            .unwrap()
            .try_deserialize::<Settings>()
            .unwrap();
        assert_eq!(toml_ok, s);
    }

    #[test]
    fn file_values_and_flag_overrides_layer() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        std::fs::write(
            &f,
            "[embedding]\nshards = 8\n[embedding.tables.user]\ndim = 32\noptimizer = { kind = \"ftrl\", alpha = 0.05 }\nadmission = { kind = \"counter\", min_count = 3 }\n",
        )
        .unwrap();
        let s = load(Some(&f), &[]).unwrap();
        assert_eq!(s.embedding.shards, 8);
        assert_eq!(s.embedding.tables["user"].dim, Some(32));
        let s = load(Some(&f), &[("embedding.shards", "2".into())]).unwrap();
        assert_eq!(s.embedding.shards, 2, "flags beat the file");
    }

    /// One seed reaches the dense net and every table that has no seed of its own, from a
    /// flag or from `train.seed`.
    #[test]
    fn one_seed_seeds_the_model_and_the_tables() {
        use freshet_actors::dense::ModelKind;
        let (schema, model) = (Schema::criteo(16), ModelConfig::new(ModelKind::Wdl));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        std::fs::write(&f, "[train]\nseed = 41\n").unwrap();
        let s = load(Some(&f), &[]).unwrap();
        assert_eq!(s.model.seed, 41);
        let tables = s.model_tables(&schema, &s.model).unwrap();
        assert_eq!(tables["emb"].seed, 41);
        let s = s.seeded(Some(5));
        assert_eq!(
            (s.model.seed, s.train.seed),
            (5, Some(5)),
            "the flag beats train.seed"
        );
        assert_eq!(s.model_tables(&schema, &model).unwrap()["emb"].seed, 5);
        // A table's own seed stays its own.
        std::fs::write(&f, "[embedding.tables.emb]\nseed = 3\n").unwrap();
        let s = load(Some(&f), &[]).unwrap().seeded(Some(5));
        assert_eq!(s.model_tables(&schema, &model).unwrap()["emb"].seed, 3);
        // No seed anywhere: nothing changes.
        let s = load(None, &[]).unwrap();
        assert_eq!(s.seeded(None), s);
    }

    /// `freshet dev`'s own window applies only when no layer set `joiner.window.window_ms`.
    #[test]
    fn the_dev_window_default_never_beats_a_configured_window() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        std::fs::write(&f, "[joiner.window]\nwindow_ms = 60000\n").unwrap();
        let s = load(Some(&f), &[]).unwrap();
        assert_eq!(dev_window_ms(&s, None), 60_000, "the file's window");
        assert_eq!(dev_window_ms(&s, Some(700)), 700, "the flag beats the file");
        let s = load(None, &[]).unwrap();
        assert_eq!(
            dev_window_ms(&s, None),
            DEV_WINDOW_MS,
            "nothing set: dev's own"
        );
        let s = load(None, &[("joiner.window.window_ms", "30000".into())]).unwrap();
        assert_eq!(dev_window_ms(&s, None), 30_000, "an override counts as set");
    }

    /// The node's pipeline remembers closed impressions for 2 minutes unless a layer says
    /// otherwise or its window is longer.
    #[test]
    fn the_pipeline_remembers_closed_impressions_for_two_minutes_unless_told() {
        let dir = tempfile::tempdir().unwrap();
        let data = ("node.data_dir", dir.path().display().to_string());
        let s = load(None, std::slice::from_ref(&data)).unwrap();
        let cfg = pipeline_config(&s, 5_000, 250, 1).unwrap();
        assert_eq!(cfg.join.remember_closed_ms, DEV_REMEMBER_CLOSED_MS);
        let cfg = pipeline_config(&s, 600_000, 250, 1).unwrap();
        assert_eq!(cfg.join.remember_closed_ms, 600_000);
        drop(cfg);
        let s = load(
            None,
            &[data, ("joiner.window.remember_closed_ms", "900000".into())],
        )
        .unwrap();
        let cfg = pipeline_config(&s, 5_000, 250, 1).unwrap();
        assert_eq!(cfg.join.remember_closed_ms, 900_000);
    }

    /// A live node bounds a table that gives no eviction; one that gives its own (or whose
    /// `default` does) keeps it, and an offline run keeps the built-in table.
    #[test]
    fn a_live_node_bounds_the_tables_whose_eviction_is_not_given() {
        use freshet_actors::dense::ModelKind;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        let (schema, model) = (Schema::criteo(16), ModelConfig::new(ModelKind::Wdl));
        let s = load(None, &[]).unwrap();
        let live = s.live_tables(&schema, &model).unwrap();
        assert_eq!(
            live["emb"].eviction.capacity,
            Some(LIVE_TABLE_CAPACITY_ROWS)
        );
        assert_eq!(
            s.model_tables(&schema, &model).unwrap()["emb"]
                .eviction
                .capacity,
            None
        );
        for section in ["default", "emb"] {
            std::fs::write(
                &f,
                format!("[embedding.tables.{section}]\neviction = {{ max_idle_secs = 600 }}\n"),
            )
            .unwrap();
            let live = load(Some(&f), &[])
                .unwrap()
                .live_tables(&schema, &model)
                .unwrap();
            assert_eq!(live["emb"].eviction.capacity, None, "{section}");
            assert_eq!(live["emb"].eviction.max_idle_secs, Some(600), "{section}");
        }
    }

    /// A table section names only what it changes: the rest comes from `default`, and
    /// `default`'s from the built-in table, whatever keys the section leaves out.
    #[test]
    fn a_partial_table_section_inherits_from_default() {
        use freshet_actors::dense::ModelKind;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        let (schema, model) = (Schema::criteo(16), ModelConfig::new(ModelKind::Wdl));

        // No section: the built-in table at the model's row dim (16 + the wide weight).
        let s = load(None, &[]).unwrap();
        let t = s.model_tables(&schema, &model).unwrap();
        assert_eq!(t["emb"], freshet_actors::training::default_table_config(17));
        let shown = s.effective().embedding.tables["default"].clone();
        assert_eq!(
            shown,
            TableSection::builtin(),
            "`freshet config` shows the built-in table"
        );

        // Only a seed: the dim is still the model's, and init and optimizer the default's.
        std::fs::write(&f, "[embedding.tables.emb]\nseed = 7\n").unwrap();
        let t = load(Some(&f), &[])
            .unwrap()
            .model_tables(&schema, &model)
            .unwrap();
        let want = freshet_actors::training::default_table_config(17);
        assert_eq!(t["emb"].seed, 7);
        assert_eq!((t["emb"].dim, &t["emb"].init), (17, &want.init));
        assert_eq!(t["emb"].optimizer, want.optimizer);

        // What `default` changes, every table inherits; what a table gives, it keeps.
        std::fs::write(
            &f,
            "[embedding.tables.default]\noptimizer = { kind = \"adam\", lr = 0.01 }\n\
             [embedding.tables.emb]\ndim = 17\ninit = { kind = \"zeros\" }\n",
        )
        .unwrap();
        let s = load(Some(&f), &[]).unwrap();
        let t = s.model_tables(&schema, &model).unwrap();
        assert!(
            matches!(t["emb"].optimizer, OptimizerConfig::Adam { lr, .. } if lr == 0.01),
            "{:?}",
            t["emb"].optimizer
        );
        assert_eq!(t["emb"].init, Initializer::Zeros);
        assert_eq!(t["emb"].admission, want.admission);

        // A dim that is not the model's row is refused with its key.
        std::fs::write(&f, "[embedding.tables.emb]\ndim = 16\n").unwrap();
        let e = load(Some(&f), &[])
            .unwrap()
            .model_tables(&schema, &model)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("embedding.tables.emb.dim") && e.contains("expected 17"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_key_value_and_expectation() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "[embedding]\nshards = \"many\"\n",
                ["embedding.shards", "many", "expected"],
            ),
            (
                "[embedding]\nshards = 0\n",
                ["embedding.shards", "0", "1..=4096"],
            ),
            (
                "[embedding.tables.user]\ndim = 0\n",
                ["embedding.tables.user.dim", "0", "1..=4096"],
            ),
            (
                "[embedding.tables.user]\noptimizer = { kind = \"adam\", lr = 0.1, beta1 = 2.0 }\n",
                ["embedding.tables.user.optimizer.beta1", "2", "[0, 1)"],
            ),
            ("[embedding]\nshardz = 3\n", ["shardz", "unknown field", ""]),
            (
                "[log]\npartitions = 0\n",
                ["log.partitions", "0", "1..=4096"],
            ),
            (
                "[log]\nfsync = { mode = \"interval\", ms = 0 }\n",
                ["log.fsync.ms", "0", "at least 1"],
            ),
            (
                "[joiner.window]\nnegative_rate = 1.5\n",
                ["joiner.window.negative_rate", "1.5", "(0, 1]"],
            ),
            (
                "[supervisor]\nbackoff_min_ms = 500\nbackoff_max_ms = 100\n",
                [
                    "supervisor.backoff_min_ms",
                    "500",
                    "at most supervisor.backoff_max_ms (100)",
                ],
            ),
            (
                "[supervisor]\nwithin_secs = 0\n",
                ["supervisor.within_secs", "0", "(0, 86400]"],
            ),
            (
                "[validation]\npublish = \"sometimes\"\n",
                ["sometimes", "guarded", ""],
            ),
            (
                "[joiner.window]\nkinds = []\n",
                ["joiner.window.kinds", "[]", "1 to 32"],
            ),
            (
                "[log]\nfsync = { mode = \"sometimes\" }\n",
                ["sometimes", "every_batch", ""],
            ),
            (
                "[log]\nbackend = \"kafkaa\"\n",
                ["kafkaa", "embedded", "kafka"],
            ),
            // A Kafka build checks the cluster's settings; any other build refuses the backend
            // and says how to get it.
            if cfg!(feature = "kafka") {
                (
                    "[log]\nbackend = \"kafka\"\n[log.kafka]\nbrokers = \"k1:9092,k2\"\n",
                    ["log.kafka.brokers", "k1:9092,k2", "host:port"],
                )
            } else {
                (
                    "[log]\nbackend = \"kafka\"\n",
                    ["log.backend", "kafka", "--features kafka"],
                )
            },
            (
                "[log]\nbackend = \"kafka\"\n[log.kafka]\ntimeout_ms = 5\n",
                if cfg!(feature = "kafka") {
                    ["log.kafka.timeout_ms", "5", "100..=3600000"]
                } else {
                    ["log.backend", "kafka", "--features kafka"]
                },
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let f = dir.path().join(format!("{i}.toml"));
            std::fs::write(&f, text).unwrap();
            let e = format!("{:#}", load(Some(&f), &[]).unwrap_err());
            for w in want {
                assert!(e.contains(w), "case {i}: {e:?} lacks {w:?}");
            }
        }
        let f = dir.path().join("broken.toml");
        std::fs::write(&f, "[embedding\nshards = ").unwrap();
        assert!(load(Some(&f), &[]).is_err(), "malformed TOML is refused");
    }
}
