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
use freshet_actors::embedding::{InvalidValue, TableConfig};
use freshet_actors::event::SAMPLE_REJECTS_TOPIC;
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
    /// The gate a new version must pass before it is served (`freshet dev`).
    pub(crate) validation: GateConfig,
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
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        Self {
            every_steps: 0,
            every_secs: 0.0,
            full_every: 60,
            keep_full: 3,
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
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            batch: 512,
            threads: 2,
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct EmbeddingSettings {
    /// Number of embedding shards (ShardOwner actors).
    pub(crate) shards: u32,
    /// Directory for the on-disk tier; each shard gets `shard-<i>/` inside it. Defaults to
    /// `<data_dir>/spill` when a table sets a DRAM budget.
    pub(crate) spill_dir: Option<PathBuf>,
    pub(crate) tables: BTreeMap<String, TableConfig>,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("freshet-data"),
            log: "info".into(),
        }
    }
}

impl Default for EmbeddingSettings {
    fn default() -> Self {
        Self {
            shards: 4,
            spill_dir: None,
            tables: BTreeMap::from([("default".to_owned(), TableConfig::default())]),
        }
    }
}

impl Settings {
    /// Checks what types alone cannot.
    pub(crate) fn validate(&self) -> Result<(), InvalidValue> {
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
            t.validate(&format!("embedding.tables.{name}"))?;
        }
        self.schema.validate("schema")?;
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

    /// Each table the schema and model read, with its `[embedding.tables]` configuration (or
    /// the default for its row dim). A configured dim that differs from the model's row is
    /// refused with the key.
    pub(crate) fn model_tables(
        &self,
        schema: &Schema,
        model: &ModelConfig,
    ) -> anyhow::Result<BTreeMap<String, TableConfig>> {
        let mut tables = BTreeMap::new();
        for (name, dim) in freshet_actors::scorer::Scorer::required_tables(schema, model) {
            let cfg = match self.embedding.tables.get(&name) {
                Some(c) if c.dim != dim => anyhow::bail!(
                    "invalid value {} for `embedding.tables.{name}.dim`: expected {dim} (the {} \
                     model's row for this table)",
                    c.dim,
                    model.kind.name()
                ),
                Some(c) => c.clone(),
                None => freshet_actors::training::default_table_config(dim),
            };
            tables.insert(name, cfg);
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
    let mut b = config::Config::builder().add_source(defaults);
    b = match file {
        // An explicit --config must exist; the default freshet.toml is optional.
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
    let settings: Settings = b
        .build()
        .map_err(explain)?
        .try_deserialize()
        .map_err(explain)?;
    settings.validate()?;
    Ok(settings)
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
    let tables = settings.model_tables(&schema, &model)?;
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
        spill_dir: spill,
        schedule,
        batch: settings.train.batch,
        threads: settings.train.threads,
        gate: settings.validation.clone(),
        replicas,
        intensity: Intensity::default(),
        faults: Default::default(),
    })
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
        assert_eq!(s.embedding.tables["user"].dim, 32);
        let s = load(Some(&f), &[("embedding.shards", "2".into())]).unwrap();
        assert_eq!(s.embedding.shards, 2, "flags beat the file");
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
