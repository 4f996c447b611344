//! The stream log: partitioned, offset-addressed, behind one trait.
//!
//! Events, joined samples and dead letters all travel through a [`StreamLog`]. Every consumer
//! (joiner, trainer, validator, replay) reads from an explicit offset, so a restart "with new
//! offsets" is just a read from elsewhere. One topic is one `StreamLog`; its partition count is
//! fixed when the topic is created, because producers route keys to partitions and a new
//! count would move keys.
//!
//! Two implementations pass one conformance suite ([`conformance`]):
//! - [`EmbeddedLog`]: segment files on local disk, the default and what `freshet dev` uses;
//! - `KafkaLog`, for scale (cargo feature `kafka`; `[log] backend = "kafka"`).
//!
//! [`open_topic`] picks one from the configuration.
//!
//! The trait is synchronous: the embedded log is file I/O, and Kafka's fetch is a long poll.
//! Async callers run [`StreamLog::wait_for`] on a blocking thread.

pub mod conformance;
mod embedded;
#[cfg(feature = "kafka")]
mod kafka;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub(crate) use embedded::write_atomic;
pub use embedded::{EmbeddedLog, LogConfig, RecoveryReport, RetentionReport};
#[cfg(feature = "kafka")]
pub use kafka::KafkaLog;

use crate::embedding::InvalidValue;

/// Which implementation stores the topics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum LogBackend {
    /// Segment files under `<data_dir>/log`.
    #[default]
    Embedded,
    /// A Kafka cluster (needs a build with the `kafka` feature).
    Kafka,
}

/// A `[log] backend` that is neither `embedded` nor `kafka`.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("invalid log backend {0:?}: expected \"embedded\" or \"kafka\"")]
pub struct UnknownBackend(pub String);

// By hand rather than derived: a configuration loader's own "no such variant" message does not
// say which values exist.
impl TryFrom<String> for LogBackend {
    type Error = UnknownBackend;

    fn try_from(s: String) -> Result<Self, UnknownBackend> {
        match s.as_str() {
            "embedded" => Ok(Self::Embedded),
            "kafka" => Ok(Self::Kafka),
            _ => Err(UnknownBackend(s)),
        }
    }
}

/// Where the Kafka cluster is and how to talk to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub brokers: String,
    /// Prepended to every topic name, so several deployments can share a cluster.
    pub topic_prefix: String,
    /// Replicas of each topic Freshet creates.
    pub replication_factor: i16,
    /// How long one operation (an append's acknowledgement, a read's first record, a metadata
    /// request) may take before it fails.
    pub timeout_ms: u64,
    /// Extra librdkafka client properties (`security.protocol`, `sasl.*`, `linger.ms`, ...),
    /// applied to every client. The few settings the log's guarantees rest on
    /// (`enable.idempotence`, `acks`, `group.id`, `enable.auto.commit`,
    /// `enable.auto.offset.store`, `auto.offset.reset`, `enable.partition.eof`) are fixed and
    /// override these.
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "freshet-".into(),
            replication_factor: 1,
            timeout_ms: 30_000,
            options: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// Checks the values; `prefix` names this section in errors (such as `log.kafka`).
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidValue> {
        let hosts_ok = !self.brokers.trim().is_empty()
            && self.brokers.split(',').all(|h| {
                h.trim()
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            });
        if !hosts_ok {
            return Err(InvalidValue::new(
                format!("{prefix}.brokers"),
                &self.brokers,
                "a comma-separated list of host:port",
            ));
        }
        let prefix_ok = self.topic_prefix.len() <= 200
            && self
                .topic_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !prefix_ok {
            return Err(InvalidValue::new(
                format!("{prefix}.topic_prefix"),
                &self.topic_prefix,
                "up to 200 characters of A-Z a-z 0-9 . _ -",
            ));
        }
        if self.replication_factor < 1 {
            return Err(InvalidValue::new(
                format!("{prefix}.replication_factor"),
                self.replication_factor,
                "at least 1",
            ));
        }
        if !(100..=3_600_000).contains(&self.timeout_ms) {
            return Err(InvalidValue::new(
                format!("{prefix}.timeout_ms"),
                self.timeout_ms,
                "an integer in 100..=3600000",
            ));
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Opens (creating if needed) `topic` on the configured backend. `root` is the embedded log's
/// directory; Kafka ignores it.
pub fn open_topic(
    root: &Path,
    topic: &str,
    cfg: &LogConfig,
) -> Result<Arc<dyn StreamLog>, LogError> {
    match cfg.backend {
        LogBackend::Embedded => Ok(Arc::new(EmbeddedLog::open(root, topic, cfg.clone())?)),
        #[cfg(feature = "kafka")]
        LogBackend::Kafka => Ok(Arc::new(KafkaLog::open(&cfg.kafka, topic, cfg.partitions)?)),
        #[cfg(not(feature = "kafka"))]
        LogBackend::Kafka => Err(LogError::Backend(
            "[log] backend = \"kafka\", but this build has no Kafka support; rebuild with \
             `--features kafka`"
                .into(),
        )),
    }
}

/// A record's position in its partition. Offsets start at 0, grow by one per record and are
/// never reused, not even after retention deletes the records below them.
pub type Offset = u64;

/// The largest record a log accepts. Well below a Kafka broker's default message limit, so the
/// two implementations refuse the same records.
pub const MAX_RECORD_BYTES: usize = 900 * 1024;

/// One record read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: Offset,
    /// Append time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    pub payload: Vec<u8>,
}

/// What an append returns once the records are acknowledged: they are durable under the log's
/// fsync policy and readable at `first..next`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendAck {
    pub partition: u32,
    pub first: Offset,
    /// One past the last record appended: the partition's new high watermark.
    pub next: Offset,
}

/// How long appended data may sit in the page cache before it is forced to disk.
///
/// A process crash never loses acknowledged records under any policy: they are in the kernel
/// once `append` returns. The policy decides what a *machine* crash (power loss) may lose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// `fdatasync` before every append returns: nothing acknowledged is ever lost.
    EveryBatch,
    /// A background flusher syncs every `ms` milliseconds: a power loss loses at most that much.
    Interval { ms: u64 },
    /// Leave it to the kernel (tests, benches, data that can be regenerated).
    Never,
}

/// Errors callers act on.
#[derive(Debug, Error)]
pub enum LogError {
    /// The partition does not exist in this topic.
    #[error("topic {topic}: no partition {partition} (the topic has {partitions})")]
    NoSuchPartition {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    /// The offset is below the retained range or beyond the end; seek inside `low..=high`.
    #[error("topic {topic} partition {partition}: offset {requested} is outside {low}..={high}")]
    OffsetOutOfRange {
        topic: String,
        partition: u32,
        requested: Offset,
        low: Offset,
        high: Offset,
    },
    #[error("record of {size} bytes exceeds the limit of {max}")]
    RecordTooLarge { size: usize, max: usize },
    /// A stored record failed its checksum: the disk or a tool damaged the log.
    #[error("topic {topic} partition {partition}: record at offset {offset} is corrupt: {detail}")]
    Corrupt {
        topic: String,
        partition: u32,
        offset: Offset,
        detail: String,
    },
    /// A consumer group name that cannot be stored.
    #[error("consumer group {0:?} must be 1-128 characters of A-Z a-z 0-9 . _ -")]
    BadGroup(String),
    /// The topic exists with a different shape than requested.
    #[error("topic {topic}: {detail}")]
    Mismatch { topic: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The broker or client library failed (Kafka).
    #[error("{0}")]
    Backend(String),
}

impl LogError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// A partitioned, offset-addressed log of one topic.
pub trait StreamLog: Send + Sync + std::fmt::Debug {
    fn topic(&self) -> &str;

    fn partitions(&self) -> u32;

    /// Appends `records` in order, as one batch. All or nothing is acknowledged: on error, the
    /// caller must assume none of them is durable (a retry may duplicate a prefix, which is why
    /// exactly-once writers check the high watermark on restart instead of retrying blindly).
    fn append(&self, partition: u32, records: &[&[u8]]) -> Result<AppendAck, LogError>;

    /// Up to `max_records` records from `from` on. Fewer (or none, at the end) is not an error.
    fn read(
        &self,
        partition: u32,
        from: Offset,
        max_records: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// One past the last acknowledged record.
    fn high_watermark(&self, partition: u32) -> Result<Offset, LogError>;

    /// The first offset still retained.
    fn low_watermark(&self, partition: u32) -> Result<Offset, LogError>;

    /// Blocks until the high watermark passes `offset` or `timeout` ends, without busy polling.
    /// Returns the high watermark then.
    fn wait_for(
        &self,
        partition: u32,
        offset: Offset,
        timeout: Duration,
    ) -> Result<Offset, LogError>;

    /// Makes every acknowledged record durable now, whatever the fsync policy. A writer that
    /// records "I wrote up to offset o" elsewhere (a checkpoint) calls this first.
    fn flush(&self) -> Result<(), LogError>;

    /// Records that `group` has consumed `partition` up to (not including) `offset`.
    fn commit(&self, group: &str, partition: u32, offset: Offset) -> Result<(), LogError>;

    /// The offset `group` last committed for `partition`, if any.
    fn committed(&self, group: &str, partition: u32) -> Result<Option<Offset>, LogError>;

    /// Keeps `partition`'s records from `offset` on out of retention's reach, on behalf of
    /// `holder`, until the holder moves its hold. Size and age limits never delete a record
    /// that some holder still holds: a consumer that resumes from a checkpoint (the joiner, the
    /// trainer restoring a kept version) must find every record after it. The hold outlives
    /// the process. The default does nothing: a Kafka topic keeps the retention its cluster
    /// gives it.
    fn hold(&self, holder: &str, partition: u32, offset: Offset) -> Result<(), LogError> {
        let _ = (holder, partition, offset);
        Ok(())
    }
}

pub(crate) fn check_group(group: &str) -> Result<(), LogError> {
    let ok = !group.is_empty()
        && group.len() <= 128
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LogError::BadGroup(group.to_owned()))
    }
}

/// Checks a read from `from` against the retained range `low..=high`, the same way in every
/// implementation: outside it is `OffsetOutOfRange`; `Ok(false)` means there is nothing to
/// read (`from` is the end, or no record was asked for).
pub(crate) fn check_read(
    topic: &str,
    partition: u32,
    from: Offset,
    max_records: usize,
    (low, high): (Offset, Offset),
) -> Result<bool, LogError> {
    if from < low || from > high {
        return Err(LogError::OffsetOutOfRange {
            topic: topic.to_owned(),
            partition,
            requested: from,
            low,
            high,
        });
    }
    Ok(from < high && max_records > 0)
}

/// The partition of a string key (a request id): the routing every producer and consumer of a
/// topic must agree on, so it uses the stable hash and never `ahash`.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    let h = crate::sample::hash::feature_id("partition", key);
    crate::routing::jump_consistent_hash(h, partitions.max(1))
}

/// Appends a CRC32C of `bytes` (little-endian), for files that must be checked on load.
pub(crate) fn seal(mut bytes: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The body of a [`seal`]ed buffer, or `None` if it is too short or fails its checksum.
pub(crate) fn unseal(bytes: &[u8]) -> Option<&[u8]> {
    let (body, crc) = bytes.split_at(bytes.len().checked_sub(4)?);
    (crc32c::crc32c(body) == u32::from_le_bytes(crc.try_into().ok()?)).then_some(body)
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_of_is_stable_and_in_range() {
        // Frozen: a request id must land on the same partition in every version, or a joiner
        // restarted on new code would look for its impressions in the wrong place.
        let got: Vec<u32> = ["r-1", "r-2", "abc", ""]
            .iter()
            .map(|k| partition_of(k, 8))
            .collect();
        assert_eq!(got, GOLDEN);
        for i in 0..1000 {
            assert!(partition_of(&format!("req-{i}"), 3) < 3);
        }
        assert_eq!(partition_of("anything", 1), 0);
    }
    /// From an independent Python implementation of the same formula.
    const GOLDEN: [u32; 4] = [4, 1, 4, 3];

    #[test]
    fn group_names_are_checked() {
        assert!(check_group("joiner-0.v1_x").is_ok());
        for bad in ["", "a/b", "..\\x", "sp ace", &"x".repeat(129)] {
            assert!(check_group(bad).is_err(), "{bad:?}");
        }
    }
}
