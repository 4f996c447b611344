//! The Kafka backend of [`StreamLog`] (cargo feature `kafka`).
//!
//! One [`KafkaLog`] is one Kafka topic. Offsets are Kafka's own, one to one: the producer is
//! idempotent and never transactional, so a partition holds no control records and its offsets
//! are contiguous, exactly like the embedded log's. Reads are exact seeks: each partition has
//! its own consumer, assigned at the requested offset (no consumer-group rebalancing ever
//! moves it), and committed offsets are plain Kafka group commits, so Kafka tooling sees them.
//!
//! The trait is synchronous, so the clients are librdkafka's synchronous ones: a
//! `ThreadedProducer` whose background thread delivers acknowledgements into a channel per
//! batch, and `BaseConsumer`s polled by the caller. Nothing here needs an async runtime except
//! topic creation, which librdkafka only offers as a future (resolved on a throwaway
//! current-thread runtime).

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset as KOffset, TopicPartitionList};

use super::{
    check_group, check_read, now_ms, AppendAck, KafkaConfig, LogError, Offset, Record, StreamLog,
    MAX_RECORD_BYTES,
};

/// A topic on a Kafka cluster.
pub struct KafkaLog {
    topic: String,
    partitions: u32,
    cfg: KafkaConfig,
    producer: ThreadedProducer<Ctx>,
    /// Appends to one partition run one at a time, so the records of one batch get contiguous
    /// offsets and `AppendAck` can name them as a range.
    append_locks: Vec<Mutex<()>>,
    /// One exact-seek reader per partition, created on first use.
    readers: Vec<Mutex<Option<Reader>>>,
    /// Answers watermark and metadata queries; never assigned anything.
    meta: BaseConsumer<Ctx>,
    /// One consumer per consumer group, for commits.
    groups: Mutex<HashMap<String, Arc<BaseConsumer<Ctx>>>>,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("brokers", &self.cfg.brokers)
            .finish_non_exhaustive()
    }
}

/// One delivery report: the record's index in its batch and its offset or the error.
type Report = (usize, Result<i64, KafkaError>);

/// librdkafka's callbacks: log lines go to `tracing`, delivery reports to the batch that sent
/// the record.
struct Ctx;

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Connection errors are retried by librdkafka; operations that cannot complete fail
        // with their own error, so this is information, not the place to act.
        tracing::warn!(%error, "librdkafka: {reason}");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<(usize, mpsc::Sender<Report>)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (index, tx) = *opaque;
        let report = match result {
            Ok(m) => Ok(m.offset()),
            Err((e, _)) => Err(e.clone()),
        };
        // The batch may have given up waiting (timeout); then nobody needs the report.
        let _ = tx.send((index, report));
    }
}

impl ConsumerContext for Ctx {}

/// A consumer assigned to exactly one partition, and the records it fetched ahead of a read.
struct Reader {
    consumer: BaseConsumer<Ctx>,
    /// The offset of the next record the consumer will return: one past `fetched`.
    pos: Offset,
    /// Records fetched by `wait_for` and not yet read, ending just below `pos`.
    fetched: VecDeque<Record>,
}

fn backend(what: impl std::fmt::Display, e: impl std::fmt::Display) -> LogError {
    LogError::Backend(format!("kafka: {what}: {e}"))
}

/// Kafka's legal topic names.
fn check_topic_name(name: &str) -> Result<(), LogError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LogError::Mismatch {
            topic: name.to_owned(),
            detail: "a Kafka topic name is 1-249 characters of A-Z a-z 0-9 . _ -".into(),
        })
    }
}

impl KafkaLog {
    /// Opens topic `name` (prefixed with `cfg.topic_prefix`), creating it with `partitions`
    /// partitions if it does not exist. An existing topic with another partition count is
    /// refused: producers route keys by partition count.
    pub fn open(cfg: &KafkaConfig, name: &str, partitions: u32) -> Result<Self, LogError> {
        let topic = format!("{}{name}", cfg.topic_prefix);
        check_topic_name(&topic)?;
        if partitions == 0 || partitions > i32::MAX as u32 {
            return Err(LogError::Mismatch {
                topic,
                detail: format!("{partitions} partitions requested"),
            });
        }
        let timeout = cfg.timeout();

        let producer: ThreadedProducer<Ctx> = producer_config(cfg)
            .create_with_context(Ctx)
            .map_err(|e| backend(format!("creating a producer for {}", cfg.brokers), e))?;
        let meta: BaseConsumer<Ctx> = consumer_config(cfg, "freshet-meta")
            .create_with_context(Ctx)
            .map_err(|e| backend("creating a metadata client", e))?;

        let log = Self {
            topic,
            partitions,
            cfg: cfg.clone(),
            producer,
            append_locks: (0..partitions).map(|_| Mutex::new(())).collect(),
            readers: (0..partitions).map(|_| Mutex::new(None)).collect(),
            meta,
            groups: Mutex::new(HashMap::new()),
        };
        log.ensure_topic(timeout)?;
        Ok(log)
    }

    /// Creates the topic unless it exists, then waits until the cluster's metadata shows all
    /// its partitions, so the first append does not race the creation.
    fn ensure_topic(&self, timeout: Duration) -> Result<(), LogError> {
        let deadline = Instant::now() + timeout;
        if self.existing_partitions(timeout)?.is_none() {
            self.create_topic(timeout)?;
        }
        loop {
            match self.existing_partitions(deadline.saturating_duration_since(Instant::now()))? {
                Some(n) if n == self.partitions => return Ok(()),
                Some(n) if n > 0 => {
                    return Err(LogError::Mismatch {
                        topic: self.topic.clone(),
                        detail: format!(
                            "it has {n} partitions but {} are configured; a topic's partition \
                             count is fixed at creation (producers route keys by it)",
                            self.partitions
                        ),
                    })
                }
                _ if Instant::now() >= deadline => {
                    return Err(LogError::Backend(format!(
                        "kafka: topic {} was created but its partitions did not appear in the \
                         cluster metadata within {timeout:?}",
                        self.topic
                    )))
                }
                // Metadata propagates asynchronously after CreateTopics; ask again shortly.
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The topic's partition count, or `None` if the cluster does not know the topic.
    fn existing_partitions(&self, timeout: Duration) -> Result<Option<u32>, LogError> {
        let md = self
            .meta
            .fetch_metadata(Some(&self.topic), timeout.max(Duration::from_millis(1)))
            .map_err(|e| {
                backend(
                    format!("metadata of {} from {}", self.topic, self.cfg.brokers),
                    e,
                )
            })?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map(|t| t.partitions().len() as u32))
    }

    fn create_topic(&self, timeout: Duration) -> Result<(), LogError> {
        let cfg = client_config(&self.cfg, &[], &[]);
        let topic = self.topic.clone();
        let partitions = self.partitions as i32;
        let replication = i32::from(self.cfg.replication_factor);
        // librdkafka only offers topic creation as a future. Resolve it on a current-thread
        // runtime of its own thread: the caller may itself be inside a runtime.
        let results = std::thread::scope(|s| {
            s.spawn(|| -> Result<_, LogError> {
                let admin: AdminClient<DefaultClientContext> = cfg
                    .create()
                    .map_err(|e| backend("creating an admin client", e))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .map_err(|e| backend("starting a runtime for topic creation", e))?;
                let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(replication));
                let opts = AdminOptions::new().operation_timeout(Some(timeout));
                rt.block_on(admin.create_topics([&new], &opts))
                    .map_err(|e| backend(format!("creating topic {topic}"), e))
            })
            .join()
            .unwrap_or_else(|_| Err(LogError::Backend("kafka: topic creation panicked".into())))
        })?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic = %self.topic, partitions, "created Kafka topic"),
                // Another process created it first; `ensure_topic` checks its shape.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => return Err(backend(format!("creating topic {t}"), code)),
            }
        }
        Ok(())
    }

    fn check_partition(&self, partition: u32) -> Result<(), LogError> {
        if partition < self.partitions {
            Ok(())
        } else {
            Err(LogError::NoSuchPartition {
                topic: self.topic.clone(),
                partition,
                partitions: self.partitions,
            })
        }
    }

    fn watermarks(&self, partition: u32) -> Result<(Offset, Offset), LogError> {
        self.check_partition(partition)?;
        let (low, high) = self
            .meta
            .fetch_watermarks(&self.topic, partition as i32, self.cfg.timeout())
            .map_err(|e| backend(format!("watermarks of {}/{partition}", self.topic), e))?;
        Ok((low.max(0) as Offset, high.max(0) as Offset))
    }

    /// Runs `f` on `partition`'s reader, creating its consumer on first use.
    fn with_reader<T>(
        &self,
        partition: u32,
        f: impl FnOnce(&mut Reader) -> Result<T, LogError>,
    ) -> Result<T, LogError> {
        let mut slot = lock(&self.readers[partition as usize]);
        let r = match slot.take() {
            Some(r) => slot.insert(r),
            None => {
                let consumer: BaseConsumer<Ctx> = consumer_config(&self.cfg, "freshet-reader")
                    .create_with_context(Ctx)
                    .map_err(|e| backend("creating a consumer", e))?;
                slot.insert(Reader {
                    consumer,
                    // Not assigned yet: the first read or wait seeks.
                    pos: Offset::MAX,
                    fetched: VecDeque::new(),
                })
            }
        };
        f(r)
    }

    /// Points `r`'s consumer at `offset`, dropping what it fetched elsewhere.
    fn seek(&self, r: &mut Reader, partition: u32, offset: Offset) -> Result<(), LogError> {
        if r.pos == offset {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.topic,
            partition as i32,
            KOffset::Offset(offset as i64),
        )
        .map_err(|e| backend("building an assignment", e))?;
        r.consumer
            .assign(&tpl)
            .map_err(|e| backend(format!("seeking {}/{partition} to {offset}", self.topic), e))?;
        r.pos = offset;
        r.fetched.clear();
        Ok(())
    }

    /// Polls one record into `r.fetched`; `false` when none came within `timeout`.
    fn fetch_one(
        &self,
        r: &mut Reader,
        partition: u32,
        timeout: Duration,
    ) -> Result<bool, LogError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(got) = r.consumer.poll(left) else {
                return Ok(false);
            };
            let m = match got {
                Ok(m) => m,
                // Retention deleted the records under the reader.
                Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OffsetOutOfRange)) => {
                    let (low, high) = self.watermarks(partition)?;
                    return Err(LogError::OffsetOutOfRange {
                        topic: self.topic.clone(),
                        partition,
                        requested: r.pos,
                        low,
                        high,
                    });
                }
                Err(e) => return Err(backend(format!("reading {}/{partition}", self.topic), e)),
            };
            let offset = m.offset().max(0) as Offset;
            // A record from before the last seek, still in the client's queue.
            if m.partition() != partition as i32 || offset < r.pos {
                if left.is_zero() {
                    return Ok(false);
                }
                continue;
            }
            r.fetched.push_back(Record {
                offset,
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                payload: m.payload().unwrap_or_default().to_vec(),
            });
            r.pos = offset + 1;
            return Ok(true);
        }
    }

    fn group_consumer(&self, group: &str) -> Result<Arc<BaseConsumer<Ctx>>, LogError> {
        check_group(group)?;
        let mut groups = lock(&self.groups);
        if let Some(c) = groups.get(group) {
            return Ok(c.clone());
        }
        let c: BaseConsumer<Ctx> = consumer_config(&self.cfg, group)
            .create_with_context(Ctx)
            .map_err(|e| backend(format!("creating a consumer for group {group}"), e))?;
        let c = Arc::new(c);
        groups.insert(group.to_owned(), c.clone());
        Ok(c)
    }

    fn one_partition(
        &self,
        partition: u32,
        offset: KOffset,
    ) -> Result<TopicPartitionList, LogError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition as i32, offset)
            .map_err(|e| backend("building a partition list", e))?;
        Ok(tpl)
    }
}

/// A poisoned lock only means another thread panicked mid-call; the guarded state (a client
/// handle, a read-ahead buffer) is still consistent enough to use or rebuild.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A client's settings: `defaults` first, the user's `options` over them, then `fixed`, the
/// settings the guarantees of this module rest on, which no option may change.
fn client_config(
    cfg: &KafkaConfig,
    defaults: &[(&str, String)],
    fixed: &[(&str, &str)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    // librdkafka's own logging goes through `Ctx::log`; keep it to warnings and worse.
    c.set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in defaults {
        c.set(*k, v);
    }
    for (k, v) in &cfg.options {
        c.set(k, v);
    }
    for (k, v) in fixed {
        c.set(*k, *v);
    }
    c
}

fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let defaults = [
        // A batch is sent as soon as it is queued; `append` already batches.
        ("linger.ms", "1".to_owned()),
        ("message.timeout.ms", cfg.timeout_ms.to_string()),
        (
            "message.max.bytes",
            (MAX_RECORD_BYTES + 64 * 1024).to_string(),
        ),
    ];
    // Idempotence (which implies acks=all) is what keeps offsets one to one: no duplicate
    // from a retried request, no reordering.
    client_config(
        cfg,
        &defaults,
        &[("enable.idempotence", "true"), ("acks", "all")],
    )
}

fn consumer_config(cfg: &KafkaConfig, group: &str) -> ClientConfig {
    client_config(
        cfg,
        &[],
        &[
            ("group.id", group),
            // Offsets move only by explicit `commit`; positions only by explicit seeks.
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "error"),
            ("enable.partition.eof", "false"),
        ],
    )
}

impl StreamLog for KafkaLog {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn append(&self, partition: u32, records: &[&[u8]]) -> Result<AppendAck, LogError> {
        self.check_partition(partition)?;
        if let Some(r) = records.iter().find(|r| r.len() > MAX_RECORD_BYTES) {
            return Err(LogError::RecordTooLarge {
                size: r.len(),
                max: MAX_RECORD_BYTES,
            });
        }
        let _one_writer = lock(&self.append_locks[partition as usize]);
        if records.is_empty() {
            let hw = self.high_watermark(partition)?;
            return Ok(AppendAck {
                partition,
                first: hw,
                next: hw,
            });
        }
        let deadline = Instant::now() + self.cfg.timeout();
        let (tx, rx) = mpsc::channel::<Report>();
        let mut offsets: Vec<Option<i64>> = vec![None; records.len()];
        let mut received = 0;
        let take = |(i, result): Report, offsets: &mut [Option<i64>]| -> Result<(), LogError> {
            offsets[i] = Some(
                result
                    .map_err(|e| backend(format!("appending to {}/{partition}", self.topic), e))?,
            );
            Ok(())
        };
        let ts = now_ms();
        for (i, payload) in records.iter().enumerate() {
            let mut record =
                BaseRecord::<[u8], [u8], _>::with_opaque_to(&self.topic, Box::new((i, tx.clone())))
                    .partition(partition as i32)
                    .payload(*payload)
                    .timestamp(ts);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The client's queue is full: wait for acknowledgements to make room.
                        record = back;
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(backend(
                                format!("appending to {}/{partition}", self.topic),
                                "the producer queue stayed full until the timeout",
                            ));
                        }
                        if let Ok(report) = rx.recv_timeout(left.min(Duration::from_millis(10))) {
                            take(report, &mut offsets)?;
                            received += 1;
                        }
                    }
                    Err((e, _)) => {
                        return Err(backend(
                            format!("appending to {}/{partition}", self.topic),
                            e,
                        ))
                    }
                }
            }
        }
        drop(tx);
        while received < records.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(report) => {
                    take(report, &mut offsets)?;
                    received += 1;
                }
                Err(_) => {
                    return Err(backend(
                        format!("appending to {}/{partition}", self.topic),
                        format!(
                            "{} of {} records unacknowledged after {:?}",
                            records.len() - received,
                            records.len(),
                            self.cfg.timeout()
                        ),
                    ))
                }
            }
        }
        let offsets: Vec<i64> = offsets.into_iter().flatten().collect();
        let (first, last) = (offsets[0], offsets[offsets.len() - 1]);
        if offsets.windows(2).any(|w| w[1] != w[0] + 1) {
            // Only another process writing the same partition can cause this; the records are
            // still all acknowledged, in order, inside first..=last.
            tracing::warn!(topic = %self.topic, partition, first, last, n = offsets.len(),
                "batch offsets are not contiguous: another writer shares this partition");
        }
        Ok(AppendAck {
            partition,
            first: first.max(0) as Offset,
            next: last.max(0) as Offset + 1,
        })
    }

    fn read(
        &self,
        partition: u32,
        from: Offset,
        max_records: usize,
    ) -> Result<Vec<Record>, LogError> {
        self.check_partition(partition)?;
        self.with_reader(partition, |r| {
            // Served from what `wait_for` fetched ahead, without asking the broker anything.
            if let Some(front) = r.fetched.front() {
                if front.offset <= from && from < r.pos && max_records > 0 {
                    while r.fetched.front().is_some_and(|f| f.offset < from) {
                        r.fetched.pop_front();
                    }
                    let n = max_records.min(r.fetched.len());
                    return Ok(r.fetched.drain(..n).collect());
                }
            }
            let (low, high) = self.watermarks(partition)?;
            if !check_read(&self.topic, partition, from, max_records, (low, high))? {
                return Ok(Vec::new());
            }
            self.seek(r, partition, from)?;
            r.fetched.clear();
            // The first record exists (from < high), so wait for it up to the timeout; then
            // take what the client already holds, without waiting again.
            if !self.fetch_one(r, partition, self.cfg.timeout())? {
                return Err(backend(
                    format!("reading {}/{partition} at {from}", self.topic),
                    format!("no record arrived within {:?}", self.cfg.timeout()),
                ));
            }
            while r.fetched.len() < max_records && r.pos < high {
                if !self.fetch_one(r, partition, Duration::ZERO)? {
                    break;
                }
            }
            Ok(r.fetched.drain(..).collect())
        })
    }

    fn high_watermark(&self, partition: u32) -> Result<Offset, LogError> {
        Ok(self.watermarks(partition)?.1)
    }

    fn low_watermark(&self, partition: u32) -> Result<Offset, LogError> {
        Ok(self.watermarks(partition)?.0)
    }

    fn wait_for(
        &self,
        partition: u32,
        offset: Offset,
        timeout: Duration,
    ) -> Result<Offset, LogError> {
        let deadline = Instant::now() + timeout;
        let high = self.high_watermark(partition)?;
        if high > offset {
            return Ok(high);
        }
        // A long poll from the end: the broker answers the fetch as soon as a record arrives.
        // What it returns stays buffered for the `read` that follows.
        let pos = self.with_reader(partition, |r| {
            if r.pos == Offset::MAX || r.pos < high {
                self.seek(r, partition, high)?;
            }
            while r.pos <= offset {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !self.fetch_one(r, partition, left)? {
                    break;
                }
            }
            Ok(r.pos)
        })?;
        Ok(self.high_watermark(partition)?.max(pos))
    }

    fn flush(&self) -> Result<(), LogError> {
        // `append` returns only after `acks=all`, so this only drains stragglers of a failed
        // batch.
        self.producer
            .flush(self.cfg.timeout())
            .map_err(|e| backend(format!("flushing {}", self.topic), e))
    }

    fn commit(&self, group: &str, partition: u32, offset: Offset) -> Result<(), LogError> {
        self.check_partition(partition)?;
        let c = self.group_consumer(group)?;
        let tpl = self.one_partition(partition, KOffset::Offset(offset as i64))?;
        c.commit(&tpl, CommitMode::Sync).map_err(|e| {
            backend(
                format!("committing {group} at {}/{partition}", self.topic),
                e,
            )
        })
    }

    fn committed(&self, group: &str, partition: u32) -> Result<Option<Offset>, LogError> {
        self.check_partition(partition)?;
        let c = self.group_consumer(group)?;
        let tpl = self.one_partition(partition, KOffset::Invalid)?;
        let got = c.committed_offsets(tpl, self.cfg.timeout()).map_err(|e| {
            backend(
                format!("committed offset of {group} at {}/{partition}", self.topic),
                e,
            )
        })?;
        let offset = got
            .find_partition(&self.topic, partition as i32)
            .map(|e| e.offset());
        Ok(match offset {
            Some(KOffset::Offset(o)) if o >= 0 => Some(o as Offset),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_are_checked_before_any_connection() {
        let cfg = KafkaConfig::default();
        for bad in ["a/b", "sp ace", "..", ""] {
            let cfg = KafkaConfig {
                topic_prefix: String::new(),
                ..cfg.clone()
            };
            assert!(matches!(
                KafkaLog::open(&cfg, bad, 1),
                Err(LogError::Mismatch { .. })
            ));
        }
        assert!(check_topic_name("freshet-events.v1_x").is_ok());
        assert!(check_topic_name(&"x".repeat(250)).is_err());
    }
}
