//! The embedded stream log: segment files on local disk.
//!
//! ```text
//! <root>/<topic>/topic.json                 {"partitions": N}: fixed at creation
//! <root>/<topic>/p-<i>/<base:020>.log       records with offsets base..; the last is active
//! <root>/<topic>/p-<i>/<base:020>.idx       sparse index of a sealed segment
//! <root>/<topic>/groups/<group>.json        committed offsets per partition
//! ```
//! A record is framed as `len: u32 LE | crc32c: u32 LE | timestamp_ms: i64 LE | payload`, the
//! checksum covering the timestamp and payload. Offsets are implicit (the segment's base plus
//! the record's position in it), so a frame costs 16 bytes.
//!
//! The sparse index holds one `(offset, byte position)` pair per `index_interval_bytes` of
//! records: a read finds its position by binary search and scans at most one interval. The
//! active segment's index lives in memory and is rebuilt by the scan that recovery does anyway;
//! a sealed segment's is written beside it, checksummed, before the next segment starts.
//!
//! **Recovery.** A crash mid-append can leave a torn tail: a frame cut short or with a bad
//! checksum. On open the active segment is scanned, the first bad frame and everything after it
//! is truncated, and the records dropped are counted and logged. Acknowledged records are never
//! in a torn tail: an append is acknowledged only after its whole batch is written (and synced,
//! under [`FsyncPolicy::EveryBatch`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::embedding::InvalidValue;

use super::{
    check_group, check_read, now_ms, AppendAck, FsyncPolicy, KafkaConfig, LogBackend, LogError,
    Offset, Record, StreamLog, MAX_RECORD_BYTES,
};

const FRAME_HEADER: usize = 16;
const IDX_MAGIC: u32 = 0x4653_4958; // "FSIX"

/// How a topic is stored. Only `partitions` is fixed at creation; the rest may change between
/// opens. `backend` picks the implementation; the segment, fsync and retention settings apply
/// to the embedded log (a Kafka topic keeps the retention its cluster gives it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub backend: LogBackend,
    pub partitions: u32,
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    /// Bytes of records between two sparse index entries.
    pub index_interval_bytes: u32,
    pub fsync: FsyncPolicy,
    /// Delete the oldest sealed segments while a partition holds more than this, except what
    /// a hold keeps (see [`StreamLog::hold`]).
    pub retention_bytes: Option<u64>,
    /// Delete sealed segments whose newest record is older than this.
    pub retention_ms: Option<u64>,
    /// Used when `backend` is `kafka`.
    pub kafka: KafkaConfig,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            backend: LogBackend::Embedded,
            partitions: 4,
            // Retention deletes whole sealed segments, so a partition holds up to
            // `retention_bytes` plus one segment; small segments keep that overshoot small.
            segment_bytes: 8 << 20,
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Interval { ms: 100 },
            // With 8 MiB segments, at most 40 MiB a partition unless a hold keeps more; see
            // docs/model-store.md for what a day of `freshet dev` takes.
            retention_bytes: Some(32 << 20),
            retention_ms: Some(7 * 24 * 3600 * 1000),
            kafka: KafkaConfig::default(),
        }
    }
}

impl LogConfig {
    /// Checks the values; `prefix` names this section in errors (such as `log`).
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidValue> {
        if !(1..=4096).contains(&self.partitions) {
            return Err(InvalidValue::new(
                format!("{prefix}.partitions"),
                self.partitions,
                "an integer in 1..=4096",
            ));
        }
        if !(4096..=u64::from(u32::MAX)).contains(&self.segment_bytes) {
            return Err(InvalidValue::new(
                format!("{prefix}.segment_bytes"),
                self.segment_bytes,
                "an integer in 4096..=4294967295",
            ));
        }
        if self.index_interval_bytes == 0 {
            return Err(InvalidValue::new(
                format!("{prefix}.index_interval_bytes"),
                0,
                "at least 1",
            ));
        }
        if let FsyncPolicy::Interval { ms: 0 } = self.fsync {
            return Err(InvalidValue::new(
                format!("{prefix}.fsync.ms"),
                0,
                "at least 1 ms",
            ));
        }
        if self.backend == LogBackend::Kafka {
            if !cfg!(feature = "kafka") {
                return Err(InvalidValue::new(
                    format!("{prefix}.backend"),
                    "kafka",
                    "\"embedded\": this build has no Kafka support (build with `--features kafka`)",
                ));
            }
            self.kafka.validate(&format!("{prefix}.kafka"))?;
        }
        Ok(())
    }
}

/// What recovery found in one partition's active segment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    pub partition: u32,
    /// Records kept in the active segment.
    pub records: u64,
    /// Frames in the torn tail that were dropped (a frame cut short counts as one).
    pub dropped_records: u64,
    pub truncated_bytes: u64,
}

/// What one retention pass deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    pub segments_deleted: u64,
    pub bytes_deleted: u64,
    /// Bytes past `retention_bytes` kept because a hold still covers them (see
    /// [`StreamLog::hold`]): a consumer far behind, or stopped.
    pub held_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    base: Offset,
    /// One past the last record.
    end: Offset,
    len: u64,
    max_ts: i64,
    /// `(offset, position)`, ascending; the first entry is `(base, 0)` once a record exists.
    index: Vec<(Offset, u64)>,
    /// Read handle; also what the flusher syncs, since fsync on any descriptor of a file syncs
    /// the file.
    file: Arc<File>,
    path: PathBuf,
}

#[derive(Debug)]
struct PartState {
    segs: Vec<Segment>,
    writer: File,
    /// Bytes written since the last index entry of the active segment.
    since_index: u64,
    dirty: bool,
    /// Set when a failed append could not be rolled back; the partition refuses writes until
    /// the log is reopened (and recovery truncates whatever was left).
    poisoned: Option<String>,
}

#[derive(Debug)]
struct Partition {
    dir: PathBuf,
    state: Mutex<PartState>,
    grew: Condvar,
}

#[derive(Debug)]
struct Shared {
    topic: String,
    dir: PathBuf,
    cfg: LogConfig,
    parts: Vec<Partition>,
    groups: Mutex<()>,
    /// Retention holds by holder: partition -> first offset held. Mirrors `holds/*.json`.
    holds: Mutex<BTreeMap<String, BTreeMap<u32, Offset>>>,
    stop: Mutex<bool>,
    stop_cv: Condvar,
}

/// A topic stored in segment files. Cheap to share: clone the `Arc` it comes in.
#[derive(Debug)]
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    recovery: Vec<RecoveryReport>,
    flusher: Option<std::thread::JoinHandle<()>>,
}

#[derive(Serialize, Deserialize)]
struct TopicMeta {
    partitions: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a partition half-updated in a way later
    // calls would misread (every field is updated after the write succeeds), so a poisoned
    // lock is taken over rather than spreading the panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn seg_path(dir: &Path, base: Offset, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

impl EmbeddedLog {
    /// Opens `topic` under `root`, creating it with `cfg.partitions` partitions if it does not
    /// exist, and recovers every partition.
    pub fn open(root: &Path, topic: &str, cfg: LogConfig) -> Result<Self, LogError> {
        cfg.validate("log").map_err(|e| LogError::Mismatch {
            topic: topic.to_owned(),
            detail: e.to_string(),
        })?;
        if topic.is_empty() || check_group(topic).is_err() {
            return Err(LogError::Mismatch {
                topic: topic.to_owned(),
                detail: "a topic name is 1-128 characters of A-Z a-z 0-9 . _ -".into(),
            });
        }
        let dir = root.join(topic);
        for sub in ["groups", "holds"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(LogError::io(format!(
                "creating {}",
                dir.join(sub).display()
            )))?;
        }
        let holds = read_holds(&dir.join("holds"), cfg.partitions)?;
        let meta_path = dir.join("topic.json");
        match std::fs::read(&meta_path) {
            Ok(bytes) => {
                let meta: TopicMeta =
                    serde_json::from_slice(&bytes).map_err(|e| LogError::Mismatch {
                        topic: topic.to_owned(),
                        detail: format!("{} is unreadable: {e}", meta_path.display()),
                    })?;
                if meta.partitions != cfg.partitions {
                    return Err(LogError::Mismatch {
                        topic: topic.to_owned(),
                        detail: format!(
                            "it has {} partitions, {} were asked for; the count is fixed at creation because keys are routed by it",
                            meta.partitions, cfg.partitions
                        ),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = serde_json::to_vec(&TopicMeta {
                    partitions: cfg.partitions,
                })
                .expect("plain struct serialises");
                write_atomic(&meta_path, &bytes)?;
            }
            Err(e) => return Err(LogError::io(format!("reading {}", meta_path.display()))(e)),
        }
        let mut parts = Vec::new();
        let mut recovery = Vec::new();
        for p in 0..cfg.partitions {
            let pdir = dir.join(format!("p-{p}"));
            let (state, report) = recover_partition(p, &pdir, &cfg)?;
            if report.dropped_records > 0 || report.truncated_bytes > 0 {
                tracing::warn!(
                    topic,
                    partition = p,
                    dropped_records = report.dropped_records,
                    truncated_bytes = report.truncated_bytes,
                    "truncated a torn tail left by a crash; those records were never acknowledged"
                );
            }
            recovery.push(report);
            parts.push(Partition {
                dir: pdir,
                state: Mutex::new(state),
                grew: Condvar::new(),
            });
        }
        let shared = Arc::new(Shared {
            topic: topic.to_owned(),
            dir,
            cfg,
            parts,
            groups: Mutex::new(()),
            holds: Mutex::new(holds),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
        });
        let flusher = match shared.cfg.fsync {
            FsyncPolicy::Interval { ms } => {
                let s = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name(format!("log-flush-{topic}"))
                        .spawn(move || flush_loop(&s, Duration::from_millis(ms)))
                        .map_err(LogError::io("starting the log flusher"))?,
                )
            }
            _ => None,
        };
        Ok(Self {
            shared,
            recovery,
            flusher,
        })
    }

    /// What recovery found when this log was opened, one entry per partition.
    pub fn recovery(&self) -> &[RecoveryReport] {
        &self.recovery
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.cfg
    }

    /// Forces every partition's appended data to disk now.
    pub fn sync(&self) -> Result<(), LogError> {
        sync_all(&self.shared, true)
    }

    /// Deletes sealed segments beyond the retention limits. Runs on every segment roll too.
    pub fn enforce_retention(&self) -> Result<RetentionReport, LogError> {
        self.enforce_retention_at(now_ms())
    }

    /// [`Self::enforce_retention`] as if the clock read `now_ms`.
    pub fn enforce_retention_at(&self, now_ms: i64) -> Result<RetentionReport, LogError> {
        let mut total = RetentionReport::default();
        for (p, part) in self.shared.parts.iter().enumerate() {
            let mut st = lock(&part.state);
            let floor = self.shared.floor(p as u32);
            let r = apply_retention(&mut st, &self.shared.cfg, floor, now_ms)?;
            total.segments_deleted += r.segments_deleted;
            total.bytes_deleted += r.bytes_deleted;
            total.held_bytes += r.held_bytes;
        }
        Ok(total)
    }

    /// Every hold on this topic: holder -> partition -> first offset held.
    pub fn holds(&self) -> BTreeMap<String, BTreeMap<u32, Offset>> {
        lock(&self.shared.holds).clone()
    }

    /// Bytes stored in `partition` (all retained segments).
    pub fn partition_bytes(&self, partition: u32) -> Result<u64, LogError> {
        let part = self.part(partition)?;
        let st = lock(&part.state);
        Ok(st.segs.iter().map(|s| s.len).sum())
    }

    fn part(&self, partition: u32) -> Result<&Partition, LogError> {
        self.shared
            .parts
            .get(partition as usize)
            .ok_or_else(|| LogError::NoSuchPartition {
                topic: self.shared.topic.clone(),
                partition,
                partitions: self.shared.cfg.partitions,
            })
    }

    fn group_path(&self, group: &str) -> PathBuf {
        self.shared.dir.join("groups").join(format!("{group}.json"))
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        *lock(&self.shared.stop) = true;
        self.shared.stop_cv.notify_all();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
        if self.shared.cfg.fsync != FsyncPolicy::Never {
            if let Err(e) = sync_all(&self.shared, false) {
                tracing::error!(topic = %self.shared.topic, error = %e, "final log sync failed");
            }
        }
    }
}

impl Shared {
    /// The lowest offset any holder holds in `partition`; retention deletes nothing at or past
    /// it.
    fn floor(&self, partition: u32) -> Option<Offset> {
        lock(&self.holds)
            .values()
            .filter_map(|m| m.get(&partition).copied())
            .min()
    }
}

fn flush_loop(shared: &Shared, every: Duration) {
    let mut stop = lock(&shared.stop);
    loop {
        let (guard, _) = shared
            .stop_cv
            .wait_timeout(stop, every)
            .unwrap_or_else(|e| e.into_inner());
        stop = guard;
        if *stop {
            return;
        }
        drop(stop);
        if let Err(e) = sync_all(shared, false) {
            tracing::error!(topic = %shared.topic, error = %e, "periodic log sync failed");
        }
        stop = lock(&shared.stop);
    }
}

/// Syncs each partition's active segment: all of them when `force`, else those written to
/// since the last sync. (Sealed segments were synced when they were sealed.)
fn sync_all(shared: &Shared, force: bool) -> Result<(), LogError> {
    for part in &shared.parts {
        let file = {
            let mut st = lock(&part.state);
            if !st.dirty && !force {
                continue;
            }
            st.dirty = false;
            st.segs.last().map(|s| s.file.clone())
        };
        if let Some(f) = file {
            f.sync_data()
                .map_err(LogError::io(format!("syncing {}", part.dir.display())))?;
        }
    }
    Ok(())
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LogError> {
    let tmp = path.with_extension("tmp");
    let ctx = || format!("writing {}", path.display());
    let mut f = File::create(&tmp).map_err(LogError::io(ctx()))?;
    f.write_all(bytes).map_err(LogError::io(ctx()))?;
    f.sync_all().map_err(LogError::io(ctx()))?;
    std::fs::rename(&tmp, path).map_err(LogError::io(ctx()))?;
    if let Some(dir) = path.parent() {
        // The rename is durable only once the directory entry is.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// One frame parsed from a buffer.
enum Frame<'a> {
    Ok {
        ts: i64,
        payload: &'a [u8],
        size: usize,
    },
    /// Not enough bytes for the frame the header announces.
    Short,
    Bad(String),
}

fn parse_frame(buf: &[u8]) -> Frame<'_> {
    if buf.len() < FRAME_HEADER {
        return Frame::Short;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD_BYTES {
        return Frame::Bad(format!("length {len} exceeds the record limit"));
    }
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    let size = FRAME_HEADER + len;
    if buf.len() < size {
        return Frame::Short;
    }
    let body = &buf[8..size];
    if crc32c::crc32c(body) != crc {
        return Frame::Bad("checksum mismatch".into());
    }
    let ts = i64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
    Frame::Ok {
        ts,
        payload: &body[8..],
        size,
    }
}

fn encode_frame(out: &mut Vec<u8>, ts: i64, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Scan {
    records: u64,
    valid_len: u64,
    max_ts: i64,
    index: Vec<(Offset, u64)>,
    /// Frames after `valid_len` that the headers still let us count.
    torn_frames: u64,
}

/// Reads a whole segment, validating every frame, up to the first bad one.
fn scan_segment(file: &File, base: Offset, interval: u64) -> std::io::Result<Scan> {
    let file_len = file.metadata()?.len();
    let mut s = Scan {
        records: 0,
        valid_len: 0,
        max_ts: i64::MIN,
        index: Vec::new(),
        torn_frames: 0,
    };
    let mut buf = Vec::new();
    let mut buf_pos = 0u64; // file position of buf[0]
    let mut at = 0usize; // cursor inside buf
    let mut since_index = u64::MAX;
    loop {
        let pos = buf_pos + at as u64;
        if pos >= file_len {
            break;
        }
        match parse_frame(&buf[at..]) {
            Frame::Ok { ts, size, .. } => {
                if since_index >= interval {
                    s.index.push((base + s.records, pos));
                    since_index = 0;
                }
                since_index += size as u64;
                s.records += 1;
                s.max_ts = s.max_ts.max(ts);
                at += size;
                s.valid_len = pos + size as u64;
            }
            Frame::Short if (buf.len() - at) as u64 >= file_len - pos => break,
            Frame::Short => {
                // Refill from the current frame on, at least 1 MiB or the announced frame.
                let want = (1usize << 20).max(FRAME_HEADER + MAX_RECORD_BYTES);
                let n = want.min((file_len - pos) as usize);
                buf.resize(n, 0);
                file.read_exact_at(&mut buf, pos)?;
                buf_pos = pos;
                at = 0;
            }
            Frame::Bad(_) => break,
        }
    }
    // Count what follows the valid prefix as well as the headers allow: a frame cut short is
    // one record; garbage with no plausible header counts as one.
    if s.valid_len < file_len {
        let mut rest = vec![0u8; (file_len - s.valid_len) as usize];
        file.read_exact_at(&mut rest, s.valid_len)?;
        let mut at = 0usize;
        while at < rest.len() {
            s.torn_frames += 1;
            if rest.len() - at < 4 {
                break;
            }
            let len = u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len > MAX_RECORD_BYTES {
                break;
            }
            at += FRAME_HEADER + len;
        }
    }
    Ok(s)
}

#[derive(Serialize, Deserialize)]
struct IndexFile {
    magic: u32,
    end: Offset,
    len: u64,
    max_ts: i64,
    entries: Vec<(Offset, u64)>,
}

fn write_index(seg: &Segment, dir: &Path) -> Result<(), LogError> {
    let idx = IndexFile {
        magic: IDX_MAGIC,
        end: seg.end,
        len: seg.len,
        max_ts: seg.max_ts,
        entries: seg.index.clone(),
    };
    let bytes = super::seal(rmp_serde::to_vec(&idx).expect("plain struct serialises"));
    write_atomic(&seg_path(dir, seg.base, "idx"), &bytes)
}

fn read_index(path: &Path, file_len: u64) -> Option<IndexFile> {
    let bytes = std::fs::read(path).ok()?;
    let body = super::unseal(&bytes)?;
    let idx: IndexFile = rmp_serde::from_slice(body).ok()?;
    (idx.magic == IDX_MAGIC && idx.len == file_len).then_some(idx)
}

fn open_segment(dir: &Path, base: Offset) -> Result<(File, Arc<File>, PathBuf), LogError> {
    let path = seg_path(dir, base, "log");
    let ctx = || format!("opening {}", path.display());
    let writer = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(LogError::io(ctx()))?;
    let reader = File::open(&path).map_err(LogError::io(ctx()))?;
    Ok((writer, Arc::new(reader), path))
}

fn recover_partition(
    id: u32,
    dir: &Path,
    cfg: &LogConfig,
) -> Result<(PartState, RecoveryReport), LogError> {
    std::fs::create_dir_all(dir).map_err(LogError::io(format!("creating {}", dir.display())))?;
    let mut bases = Vec::new();
    for entry in
        std::fs::read_dir(dir).map_err(LogError::io(format!("listing {}", dir.display())))?
    {
        let entry = entry.map_err(LogError::io(format!("listing {}", dir.display())))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(base) = stem.parse::<Offset>() {
                bases.push(base);
            }
        } else if name.ends_with(".tmp") {
            // A half-written index or metadata file from a crash; the real one is intact.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    bases.sort_unstable();
    if bases.is_empty() {
        bases.push(0);
    }
    let interval = u64::from(cfg.index_interval_bytes);
    let mut segs = Vec::with_capacity(bases.len());
    let mut report = RecoveryReport {
        partition: id,
        ..RecoveryReport::default()
    };
    let mut writer = None;
    let last = bases.len() - 1;
    for (i, &base) in bases.iter().enumerate() {
        let (w, file, path) = open_segment(dir, base)?;
        let file_len = file
            .metadata()
            .map_err(LogError::io(format!("reading {}", path.display())))?
            .len();
        let corrupt = |detail: String| LogError::Corrupt {
            topic: dir.display().to_string(),
            partition: id,
            offset: base,
            detail,
        };
        let seg = if i < last {
            let next_base = bases[i + 1];
            match read_index(&seg_path(dir, base, "idx"), file_len) {
                Some(idx) if idx.end == next_base => Segment {
                    base,
                    end: idx.end,
                    len: idx.len,
                    max_ts: idx.max_ts,
                    index: idx.entries,
                    file,
                    path,
                },
                _ => {
                    let s = scan_segment(&file, base, interval)
                        .map_err(LogError::io(format!("scanning {}", path.display())))?;
                    if base + s.records != next_base || s.valid_len != file_len {
                        return Err(corrupt(format!(
                            "sealed segment holds {} valid records in {} of {} bytes, but the next segment starts at offset {next_base}",
                            s.records, s.valid_len, file_len
                        )));
                    }
                    let seg = Segment {
                        base,
                        end: next_base,
                        len: file_len,
                        max_ts: s.max_ts,
                        index: s.index,
                        file,
                        path,
                    };
                    write_index(&seg, dir)?;
                    seg
                }
            }
        } else {
            let s = scan_segment(&file, base, interval)
                .map_err(LogError::io(format!("scanning {}", path.display())))?;
            if s.valid_len < file_len {
                w.set_len(s.valid_len)
                    .map_err(LogError::io(format!("truncating {}", path.display())))?;
                w.sync_all()
                    .map_err(LogError::io(format!("syncing {}", path.display())))?;
                report.truncated_bytes = file_len - s.valid_len;
                report.dropped_records = s.torn_frames;
            }
            report.records = s.records;
            let seg = Segment {
                base,
                end: base + s.records,
                len: s.valid_len,
                max_ts: s.max_ts,
                index: s.index,
                file,
                path,
            };
            writer = Some(w);
            seg
        };
        segs.push(seg);
    }
    let active = segs.last().expect("at least one segment");
    let since_index = match active.index.last() {
        Some(&(_, pos)) => active.len - pos,
        None => u64::MAX,
    };
    Ok((
        PartState {
            segs,
            writer: writer.expect("the last segment has a writer"),
            since_index,
            dirty: false,
            poisoned: None,
        },
        report,
    ))
}

fn roll(
    st: &mut PartState,
    dir: &Path,
    cfg: &LogConfig,
    floor: Option<Offset>,
) -> Result<(), LogError> {
    let active = st.segs.last().expect("at least one segment");
    // Synced whatever the policy: `flush` then only has the active segment to sync.
    active
        .file
        .sync_data()
        .map_err(LogError::io(format!("syncing {}", active.path.display())))?;
    // The index is written before the next segment exists: recovery trusts an index only for
    // a segment that has a successor.
    write_index(active, dir)?;
    let base = active.end;
    let (writer, file, path) = open_segment(dir, base)?;
    st.segs.push(Segment {
        base,
        end: base,
        len: 0,
        max_ts: i64::MIN,
        index: Vec::new(),
        file,
        path,
    });
    st.writer = writer;
    st.since_index = u64::MAX;
    let r = apply_retention(st, cfg, floor, now_ms())?;
    if r.held_bytes > 0 {
        tracing::warn!(
            dir = %dir.display(),
            held_bytes = r.held_bytes,
            floor,
            "a retention hold keeps this partition past log.retention_bytes; a consumer is behind or stopped"
        );
    }
    Ok(())
}

/// Deletes the oldest sealed segments while the partition is too big or they are too old,
/// stopping at the first segment that holds a record at or past `floor`.
fn apply_retention(
    st: &mut PartState,
    cfg: &LogConfig,
    floor: Option<Offset>,
    now_ms: i64,
) -> Result<RetentionReport, LogError> {
    let mut report = RetentionReport::default();
    let mut total: u64 = st.segs.iter().map(|s| s.len).sum();
    let cutoff = cfg.retention_ms.map(|ms| now_ms - ms as i64);
    // The active segment is never deleted, so the high watermark survives any retention.
    while st.segs.len() > 1 {
        let oldest = &st.segs[0];
        let too_big = cfg.retention_bytes.is_some_and(|max| total > max);
        let too_old = cutoff.is_some_and(|c| oldest.max_ts < c);
        if !(too_big || too_old) {
            break;
        }
        if floor.is_some_and(|f| oldest.end > f) {
            if let Some(max) = cfg.retention_bytes {
                report.held_bytes = total.saturating_sub(max);
            }
            break;
        }
        let seg = st.segs.remove(0);
        total -= seg.len;
        report.segments_deleted += 1;
        report.bytes_deleted += seg.len;
        let dir = seg.path.parent().map(Path::to_path_buf).unwrap_or_default();
        // Readers holding the file keep reading it; unlinking only drops the name.
        std::fs::remove_file(&seg.path)
            .map_err(LogError::io(format!("deleting {}", seg.path.display())))?;
        let _ = std::fs::remove_file(seg_path(&dir, seg.base, "idx"));
    }
    Ok(report)
}

impl StreamLog for EmbeddedLog {
    fn topic(&self) -> &str {
        &self.shared.topic
    }

    fn partitions(&self) -> u32 {
        self.shared.cfg.partitions
    }

    fn append(&self, partition: u32, records: &[&[u8]]) -> Result<AppendAck, LogError> {
        let part = self.part(partition)?;
        let cfg = &self.shared.cfg;
        let mut bytes = 0usize;
        for r in records {
            if r.len() > MAX_RECORD_BYTES {
                return Err(LogError::RecordTooLarge {
                    size: r.len(),
                    max: MAX_RECORD_BYTES,
                });
            }
            bytes += FRAME_HEADER + r.len();
        }
        let ts = now_ms();
        let mut buf = Vec::with_capacity(bytes);
        let mut st = lock(&part.state);
        if let Some(why) = &st.poisoned {
            return Err(LogError::Backend(format!(
                "partition {partition} refuses writes after a failed append ({why}); reopen the log"
            )));
        }
        let first = st.segs.last().expect("at least one segment").end;
        if records.is_empty() {
            return Ok(AppendAck {
                partition,
                first,
                next: first,
            });
        }
        let active_len = st.segs.last().expect("segment").len;
        if active_len > 0 && active_len + bytes as u64 > cfg.segment_bytes {
            let floor = self.shared.floor(partition);
            roll(&mut st, &part.dir, cfg, floor)?;
        }
        let interval = u64::from(cfg.index_interval_bytes);
        let start_len = st.segs.last().expect("segment").len;
        let mut since_index = st.since_index;
        let mut new_index = Vec::new();
        for (i, r) in records.iter().enumerate() {
            if since_index >= interval {
                new_index.push((first + i as u64, start_len + buf.len() as u64));
                since_index = 0;
            }
            let before = buf.len();
            encode_frame(&mut buf, ts, r);
            since_index += (buf.len() - before) as u64;
        }
        let path = st.segs.last().expect("segment").path.clone();
        let written = st.writer.write_all(&buf).and_then(|()| {
            if cfg.fsync == FsyncPolicy::EveryBatch {
                st.writer.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Take back whatever part of the batch reached the file, so the partition stays
            // a sequence of whole, unacknowledged-free records.
            if let Err(e2) = st.writer.set_len(start_len) {
                st.poisoned = Some(format!("{e}; rollback failed: {e2}"));
            }
            return Err(LogError::io(format!("appending to {}", path.display()))(e));
        }
        st.since_index = since_index;
        st.dirty = true;
        let n = records.len() as u64;
        let seg = st.segs.last_mut().expect("segment");
        seg.index.extend(new_index);
        seg.len += buf.len() as u64;
        seg.end += n;
        seg.max_ts = seg.max_ts.max(ts);
        drop(st);
        part.grew.notify_all();
        Ok(AppendAck {
            partition,
            first,
            next: first + n,
        })
    }

    fn read(
        &self,
        partition: u32,
        from: Offset,
        max_records: usize,
    ) -> Result<Vec<Record>, LogError> {
        let part = self.part(partition)?;
        let (file, mut pos, end_len, mut offset) = {
            let st = lock(&part.state);
            let low = st.segs[0].base;
            let high = st.segs.last().expect("segment").end;
            if !check_read(
                &self.shared.topic,
                partition,
                from,
                max_records,
                (low, high),
            )? {
                return Ok(Vec::new());
            }
            // The segment holding `from`: the last one starting at or before it, skipping any
            // empty one that starts exactly there but holds nothing yet.
            let i = st.segs.partition_point(|s| s.base <= from) - 1;
            let seg = &st.segs[i];
            let j = seg.index.partition_point(|&(o, _)| o <= from);
            let (o, p) = if j == 0 {
                (seg.base, 0)
            } else {
                seg.index[j - 1]
            };
            (seg.file.clone(), p, seg.len, o)
        };
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while pos < end_len && out.len() < max_records {
            // Small reads (a replay check, one record) need not pull a quarter megabyte.
            let chunk = if max_records < 64 {
                16 << 10
            } else {
                256 << 10
            };
            let want = ((end_len - pos) as usize).min(chunk.max(buf.capacity()));
            buf.resize(want, 0);
            file.read_exact_at(&mut buf, pos)
                .map_err(LogError::io(format!("reading partition {partition}")))?;
            let mut at = 0usize;
            loop {
                match parse_frame(&buf[at..]) {
                    Frame::Ok { ts, payload, size } => {
                        if offset >= from {
                            out.push(Record {
                                offset,
                                timestamp_ms: ts,
                                payload: payload.to_vec(),
                            });
                        }
                        offset += 1;
                        at += size;
                        if out.len() >= max_records {
                            break;
                        }
                    }
                    Frame::Short => {
                        if at == 0 && want as u64 == end_len - pos {
                            return Err(LogError::Corrupt {
                                topic: self.shared.topic.clone(),
                                partition,
                                offset,
                                detail: "frame runs past the end of the segment".into(),
                            });
                        }
                        if at == 0 {
                            // One frame larger than the buffer: grow it to the whole frame.
                            let len =
                                u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
                            buf.reserve(FRAME_HEADER + len);
                        }
                        break;
                    }
                    Frame::Bad(detail) => {
                        return Err(LogError::Corrupt {
                            topic: self.shared.topic.clone(),
                            partition,
                            offset,
                            detail,
                        })
                    }
                }
            }
            pos += at as u64;
        }
        Ok(out)
    }

    fn high_watermark(&self, partition: u32) -> Result<Offset, LogError> {
        let part = self.part(partition)?;
        let st = lock(&part.state);
        Ok(st.segs.last().expect("segment").end)
    }

    fn low_watermark(&self, partition: u32) -> Result<Offset, LogError> {
        let part = self.part(partition)?;
        let st = lock(&part.state);
        Ok(st.segs[0].base)
    }

    fn wait_for(
        &self,
        partition: u32,
        offset: Offset,
        timeout: Duration,
    ) -> Result<Offset, LogError> {
        let part = self.part(partition)?;
        let deadline = Instant::now() + timeout;
        let mut st = lock(&part.state);
        loop {
            let high = st.segs.last().expect("segment").end;
            let now = Instant::now();
            if high > offset || now >= deadline {
                return Ok(high);
            }
            st = part
                .grew
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn flush(&self) -> Result<(), LogError> {
        sync_all(&self.shared, true)
    }

    fn commit(&self, group: &str, partition: u32, offset: Offset) -> Result<(), LogError> {
        check_group(group)?;
        self.part(partition)?;
        let _g = lock(&self.shared.groups);
        let path = self.group_path(group);
        let mut map = read_offsets(&path, "committed offsets")?;
        map.insert(partition, offset);
        let bytes = serde_json::to_vec(&map).expect("map serialises");
        write_atomic(&path, &bytes)
    }

    fn committed(&self, group: &str, partition: u32) -> Result<Option<Offset>, LogError> {
        check_group(group)?;
        self.part(partition)?;
        let _g = lock(&self.shared.groups);
        Ok(read_offsets(&self.group_path(group), "committed offsets")?
            .get(&partition)
            .copied())
    }

    fn hold(&self, holder: &str, partition: u32, offset: Offset) -> Result<(), LogError> {
        check_group(holder)?;
        self.part(partition)?;
        let mut holds = lock(&self.shared.holds);
        let mine = holds.entry(holder.to_owned()).or_default();
        if mine.get(&partition) == Some(&offset) {
            return Ok(());
        }
        let mut next = mine.clone();
        next.insert(partition, offset);
        // On disk first: a hold the file does not have would be gone after a restart, and
        // retention could then delete what the holder resumes from.
        let path = self.shared.dir.join("holds").join(format!("{holder}.json"));
        let bytes = serde_json::to_vec(&next).expect("map serialises");
        write_atomic(&path, &bytes)?;
        *mine = next;
        Ok(())
    }
}

/// Reads every `<holder>.json` under `dir`. An unreadable one holds every partition from
/// offset 0 until its holder moves it: deleting too little costs disk, too much costs data.
fn read_holds(
    dir: &Path,
    partitions: u32,
) -> Result<BTreeMap<String, BTreeMap<u32, Offset>>, LogError> {
    let mut holds = BTreeMap::new();
    let entries =
        std::fs::read_dir(dir).map_err(LogError::io(format!("listing {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(LogError::io(format!("listing {}", dir.display())))?;
        let name = entry.file_name();
        let Some(holder) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            // `write_atomic`'s staging files and anything else an operator left there.
            continue;
        };
        let held = match read_offsets(&entry.path(), "held offsets") {
            Ok(h) => h,
            Err(e @ LogError::Corrupt { .. }) => {
                tracing::warn!(error = %e, "a retention hold is unreadable; holding every partition from offset 0 until its holder moves it");
                (0..partitions).map(|p| (p, 0)).collect()
            }
            Err(e) => return Err(e),
        };
        holds.insert(holder.to_owned(), held);
    }
    Ok(holds)
}

/// Reads a map of partition -> offset (committed offsets, or a hold); `what` names it in errors.
fn read_offsets(path: &Path, what: &str) -> Result<BTreeMap<u32, Offset>, LogError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| LogError::Corrupt {
            topic: path.display().to_string(),
            partition: 0,
            offset: 0,
            detail: format!("{what} are unreadable: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(LogError::io(format!("reading {}", path.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(partitions: u32) -> LogConfig {
        LogConfig {
            partitions,
            segment_bytes: 4096,
            index_interval_bytes: 256,
            fsync: FsyncPolicy::Never,
            retention_bytes: None,
            retention_ms: None,
            ..LogConfig::default()
        }
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("record-{i}-{}", "x".repeat((i % 50) as usize)).into_bytes()
    }

    fn fill(log: &EmbeddedLog, n: u64) {
        for chunk in (0..n).collect::<Vec<_>>().chunks(7) {
            let recs: Vec<Vec<u8>> = chunk.iter().map(|&i| payload(i)).collect();
            let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
            log.append(0, &refs).unwrap();
        }
    }

    fn active_path(dir: &Path) -> PathBuf {
        let pdir = dir.join("t").join("p-0");
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&pdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs.pop().unwrap()
    }

    #[test]
    fn segments_roll_and_reads_cross_them_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), "t", cfg(1)).unwrap();
            fill(&log, 1000);
        }
        let n_segments = std::fs::read_dir(dir.path().join("t/p-0"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "log")
            .count();
        assert!(n_segments > 5, "only {n_segments} segments");
        // Reopen reads the sealed segments' index files and scans only the active one.
        let log = EmbeddedLog::open(dir.path(), "t", cfg(1)).unwrap();
        assert_eq!(log.high_watermark(0).unwrap(), 1000);
        for from in [0u64, 1, 57, 499, 998, 999] {
            let got = log.read(0, from, 3).unwrap();
            let want: Vec<u64> = (from..(from + 3).min(1000)).collect();
            assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), want);
            for r in &got {
                assert_eq!(r.payload, payload(r.offset));
            }
        }
        // A long read walks segment by segment: callers loop until they reach the end.
        let mut at = 0;
        while at < 1000 {
            let got = log.read(0, at, 10_000).unwrap();
            assert!(!got.is_empty());
            for r in &got {
                assert_eq!(r.offset, at);
                assert_eq!(r.payload, payload(at));
                at += 1;
            }
        }
    }

    #[test]
    fn torn_tails_are_truncated_and_counted() {
        // Each case damages the end of the active segment the way a crash mid-write can.
        type Damage = fn(&Path);
        let cases: [(&str, Damage, u64); 4] = [
            (
                "half a frame",
                |p| {
                    let len = std::fs::metadata(p).unwrap().len();
                    let f = OpenOptions::new().write(true).open(p).unwrap();
                    f.set_len(len - 5).unwrap();
                },
                1,
            ),
            (
                "half a header",
                |p| {
                    let mut f = OpenOptions::new().append(true).open(p).unwrap();
                    f.write_all(&[7, 0, 0]).unwrap();
                },
                1,
            ),
            (
                "zeroes from a preallocated tail",
                |p| {
                    let mut f = OpenOptions::new().append(true).open(p).unwrap();
                    f.write_all(&[0u8; 100]).unwrap();
                },
                7,
            ),
            (
                "a bad checksum",
                |p| {
                    let len = std::fs::metadata(p).unwrap().len();
                    let f = OpenOptions::new().write(true).open(p).unwrap();
                    f.write_all_at(b"!", len - 1).unwrap();
                },
                1,
            ),
        ];
        for (name, damage, dropped) in cases {
            let dir = tempfile::tempdir().unwrap();
            let before;
            {
                let log = EmbeddedLog::open(dir.path(), "t", cfg(1)).unwrap();
                fill(&log, 100);
                before = log.high_watermark(0).unwrap();
            }
            damage(&active_path(dir.path()));
            let log = EmbeddedLog::open(dir.path(), "t", cfg(1)).unwrap();
            let r = &log.recovery()[0];
            assert!(r.truncated_bytes > 0, "{name}: nothing truncated");
            assert_eq!(r.dropped_records, dropped, "{name}");
            let hw = log.high_watermark(0).unwrap();
            let lost_last = name == "half a frame" || name == "a bad checksum";
            assert_eq!(hw, if lost_last { before - 1 } else { before }, "{name}");
            // Everything left reads back intact, and the partition takes new appends.
            let mut at = log.low_watermark(0).unwrap();
            while at < hw {
                for r in log.read(0, at, 1000).unwrap() {
                    assert_eq!(r.payload, payload(r.offset), "{name}");
                    at = r.offset + 1;
                }
            }
            let ack = log.append(0, &[b"after"]).unwrap();
            assert_eq!(ack.first, hw);
            assert_eq!(log.read(0, hw, 1).unwrap()[0].payload, b"after");
        }
    }

    #[test]
    fn a_lost_index_file_is_rebuilt_and_a_damaged_sealed_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), "t", cfg(1)).unwrap();
            fill(&log, 500);
        }
        let first_idx = dir.path().join("t/p-0").join(format!("{:020}.idx", 0));
        std::fs::write(&first_idx, b"garbage").unwrap();
        {
            let log = EmbeddedLog::open(dir.path(), "t", cfg(1)).unwrap();
            assert_eq!(log.read(0, 3, 1).unwrap()[0].payload, payload(3));
        }
        assert!(read_index(
            &first_idx,
            std::fs::metadata(dir.path().join("t/p-0").join(format!("{:020}.log", 0)))
                .unwrap()
                .len()
        )
        .is_some());
        // Cut a sealed segment short: its records can no longer reach the next one's base.
        std::fs::remove_file(&first_idx).unwrap();
        let first_log = dir.path().join("t/p-0").join(format!("{:020}.log", 0));
        let len = std::fs::metadata(&first_log).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&first_log)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let err = EmbeddedLog::open(dir.path(), "t", cfg(1)).unwrap_err();
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn retention_by_size_and_age_keeps_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(1);
        c.retention_bytes = Some(10_000);
        {
            let log = EmbeddedLog::open(dir.path(), "t", c.clone()).unwrap();
            fill(&log, 2000);
            let low = log.low_watermark(0).unwrap();
            assert!(low > 0, "nothing deleted");
            assert!(log.partition_bytes(0).unwrap() <= 10_000 + 4096);
            assert_eq!(log.high_watermark(0).unwrap(), 2000);
            assert!(matches!(
                log.read(0, low - 1, 1),
                Err(LogError::OffsetOutOfRange { .. })
            ));
            assert_eq!(log.read(0, low, 1).unwrap()[0].payload, payload(low));
        }
        // Age: an hour from now, every sealed segment is older than a one-minute retention.
        c.retention_bytes = None;
        c.retention_ms = Some(60_000);
        let log = EmbeddedLog::open(dir.path(), "t", c).unwrap();
        assert_eq!(log.enforce_retention().unwrap().segments_deleted, 0);
        let r = log.enforce_retention_at(now_ms() + 3_600_000).unwrap();
        assert!(r.segments_deleted > 0);
        assert_eq!(
            log.low_watermark(0).unwrap(),
            log.high_watermark(0).unwrap() - log.recovery()[0].records
        );
    }

    #[test]
    fn a_hold_keeps_its_records_past_the_size_limit_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(1);
        c.retention_bytes = Some(10_000);
        {
            let log = EmbeddedLog::open(dir.path(), "t", c.clone()).unwrap();
            log.hold("joiner", 0, 300).unwrap();
            // A second holder further on does not lift the first one's hold.
            log.hold("model-store", 0, 1500).unwrap();
            fill(&log, 2000);
            let low = log.low_watermark(0).unwrap();
            assert!(
                low > 0 && low <= 300,
                "low watermark {low} past the hold at 300"
            );
            let r = log.enforce_retention().unwrap();
            assert_eq!(r.segments_deleted, 0);
            assert!(r.held_bytes > 0, "{r:?}");
            assert!(log.partition_bytes(0).unwrap() > 10_000 + 4096);
        }
        let log = EmbeddedLog::open(dir.path(), "t", c).unwrap();
        assert_eq!(log.holds()["joiner"][&0], 300);
        assert!(log.low_watermark(0).unwrap() <= 300);
        // Moving the hold lets retention go on, up to the lowest hold left.
        log.hold("joiner", 0, 1900).unwrap();
        let r = log.enforce_retention().unwrap();
        assert!(r.segments_deleted > 0);
        let low = log.low_watermark(0).unwrap();
        assert!(low > 300 && low <= 1500, "low watermark {low}");
        assert!(log.read(0, 1500, 1).unwrap()[0].offset == 1500);
        // Only the byte limit is exceeded now, by what the model store's hold keeps.
        log.hold("model-store", 0, 1900).unwrap();
        let r = log.enforce_retention().unwrap();
        assert_eq!(r.held_bytes, 0);
        assert!(log.partition_bytes(0).unwrap() <= 10_000 + 4096);
    }

    #[test]
    fn holds_are_checked_and_an_unreadable_one_holds_everything() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(2);
        c.retention_bytes = Some(10_000);
        {
            let log = EmbeddedLog::open(dir.path(), "t", c.clone()).unwrap();
            assert!(matches!(
                log.hold("joiner", 2, 0),
                Err(LogError::NoSuchPartition { .. })
            ));
            assert!(log.hold("../x", 0, 0).is_err());
            assert!(log.hold("", 0, 0).is_err());
            log.hold("joiner", 1, 5).unwrap();
        }
        std::fs::write(dir.path().join("t/holds/joiner.json"), b"{\"0\": 12,").unwrap();
        // A staging file left by a crash is not a hold.
        std::fs::write(dir.path().join("t/holds/other.tmp"), b"garbage").unwrap();
        let log = EmbeddedLog::open(dir.path(), "t", c).unwrap();
        let holds = log.holds();
        assert_eq!(holds.len(), 1, "{holds:?}");
        assert_eq!(holds["joiner"], BTreeMap::from([(0, 0), (1, 0)]));
        fill(&log, 2000);
        assert_eq!(log.low_watermark(0).unwrap(), 0);
        // The holder's next move rewrites the file whole.
        log.hold("joiner", 0, 2000).unwrap();
        log.hold("joiner", 1, 0).unwrap();
        assert!(log.enforce_retention().unwrap().segments_deleted > 0);
        let on_disk: BTreeMap<u32, Offset> =
            serde_json::from_slice(&std::fs::read(dir.path().join("t/holds/joiner.json")).unwrap())
                .unwrap();
        assert_eq!(on_disk, BTreeMap::from([(0, 2000), (1, 0)]));
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(1);
        c.fsync = FsyncPolicy::Interval { ms: 5 };
        super::super::conformance::run_all(&|topic, partitions| {
            let c = LogConfig {
                partitions,
                ..c.clone()
            };
            Arc::new(EmbeddedLog::open(dir.path(), topic, c).unwrap())
        });
    }

    #[test]
    fn partition_count_is_fixed_and_config_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        drop(EmbeddedLog::open(dir.path(), "t", cfg(2)).unwrap());
        let err = EmbeddedLog::open(dir.path(), "t", cfg(3)).unwrap_err();
        assert!(err.to_string().contains("2 partitions"), "{err}");
        let mut bad = cfg(1);
        bad.segment_bytes = 10;
        assert!(EmbeddedLog::open(dir.path(), "u", bad)
            .unwrap_err()
            .to_string()
            .contains("segment_bytes"));
        assert!(EmbeddedLog::open(dir.path(), "../x", cfg(1)).is_err());
    }
}
