//! The on-disk tier: a log-structured store of cold rows, one per table per shard.
//!
//! Rows that do not fit the DRAM budget are appended here and promoted back on access. All
//! records of one store have the same size (one table's row), so a location is just a segment
//! number and a record number, and compaction needs no per-record length.
//!
//! Record: `key: u64 LE | crc32c(key, payload): u32 | 0u32 | payload (row floats, raw)`.
//!
//! The tier is a cache behind the DRAM arena, not a durable store: checkpoints make tables
//! durable. Each open store lives in a private directory `<dir>/<pid>-<n>`, removed when the
//! store is dropped; directories left by processes that no longer run are removed on open. A
//! private directory per store matters during a restore, when the new table's store and the old
//! one's exist side by side until one of them is dropped. The CRC is still checked on every
//! read, because a bad read must never become a row.
//!
//! Why an own store rather than `redb` or `fjall`: see `docs/embedding-tier.md`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const HEADER: usize = 16;
/// Sealed segments hold about this much; small enough that compacting one is a short pause.
const SEGMENT_BYTES: usize = 4 << 20;
/// Appends are buffered up to this much before one write.
const WRITE_BUFFER: usize = 1 << 20;

#[derive(Debug)]
struct Segment {
    file: File,
    path: PathBuf,
    /// Records written (flushed or buffered).
    len: u32,
    /// Records still referenced by the table.
    live: u32,
}

#[derive(Debug)]
pub(crate) struct SpillStore {
    dir: PathBuf,
    payload_floats: usize,
    rec_bytes: usize,
    recs_per_seg: u32,
    segments: BTreeMap<u32, Segment>,
    active: u32,
    /// Unflushed records of the active segment, starting at record `buf_start`.
    buf: Vec<u8>,
    buf_start: u32,
    /// Scratch for reads.
    read_buf: Vec<u8>,
    row_buf: Vec<f32>,
}

/// Packs a location.
#[inline]
fn loc(seg: u32, rec: u32) -> u64 {
    (u64::from(seg) << 32) | u64::from(rec)
}

#[inline]
fn unpack(loc: u64) -> (u32, u32) {
    ((loc >> 32) as u32, loc as u32)
}

fn crc(key: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&key.to_le_bytes()), payload)
}

impl SpillStore {
    /// Opens a new, empty store in a private directory under `parent`.
    pub(crate) fn open(parent: &Path, payload_floats: usize) -> io::Result<Self> {
        static OPENED: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(parent)?;
        remove_stale(parent)?;
        let dir = parent.join(format!(
            "{}-{}",
            std::process::id(),
            OPENED.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let rec_bytes = HEADER + payload_floats * 4;
        let mut store = Self {
            dir,
            payload_floats,
            rec_bytes,
            recs_per_seg: (SEGMENT_BYTES / rec_bytes).max(1) as u32,
            segments: BTreeMap::new(),
            active: 0,
            buf: Vec::with_capacity(WRITE_BUFFER + rec_bytes),
            buf_start: 0,
            read_buf: Vec::new(),
            row_buf: vec![0.0; payload_floats],
        };
        store.new_segment(0)?;
        Ok(store)
    }

    fn new_segment(&mut self, id: u32) -> io::Result<()> {
        let path = self.dir.join(format!("{id:08}.seg"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        self.segments.insert(
            id,
            Segment {
                file,
                path,
                len: 0,
                live: 0,
            },
        );
        self.active = id;
        self.buf_start = 0;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let seg = self
            .segments
            .get(&self.active)
            .expect("active segment exists");
        seg.file
            .write_all_at(&self.buf, u64::from(self.buf_start) * self.rec_bytes as u64)?;
        self.buf_start += (self.buf.len() / self.rec_bytes) as u32;
        self.buf.clear();
        Ok(())
    }

    /// Appends one row; returns its location.
    pub(crate) fn append(&mut self, key: u64, payload: &[f32]) -> io::Result<u64> {
        debug_assert_eq!(payload.len(), self.payload_floats);
        if self.segments[&self.active].len == self.recs_per_seg {
            self.flush()?;
            let next = self.active + 1;
            self.new_segment(next)?;
        }
        let bytes: &[u8] = bytemuck::cast_slice(payload);
        self.buf.extend_from_slice(&key.to_le_bytes());
        self.buf.extend_from_slice(&crc(key, bytes).to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.extend_from_slice(bytes);
        let seg = self
            .segments
            .get_mut(&self.active)
            .expect("active segment exists");
        let at = loc(self.active, seg.len);
        seg.len += 1;
        seg.live += 1;
        if self.buf.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        Ok(at)
    }

    /// Releases a location whose row was promoted, rewritten or evicted. An emptied sealed
    /// segment is deleted at once.
    pub(crate) fn free(&mut self, at: u64) -> io::Result<()> {
        let (sid, _) = unpack(at);
        let Some(seg) = self.segments.get_mut(&sid) else {
            return Err(io::Error::other(format!("free of unknown segment {sid}")));
        };
        seg.live -= 1;
        if seg.live == 0 && sid != self.active {
            let seg = self.segments.remove(&sid).expect("segment present");
            fs::remove_file(&seg.path)?;
        }
        Ok(())
    }

    /// Reads many rows in one pass: sorted by location, adjacent records coalesced into one
    /// read. `f(i, payload)` receives each request's index and its row.
    pub(crate) fn read_many(
        &mut self,
        reqs: &mut [(u64, u64, usize)],
        mut f: impl FnMut(usize, &[f32]),
    ) -> io::Result<()> {
        reqs.sort_unstable_by_key(|r| r.0);
        let rb = self.rec_bytes;
        let mut i = 0;
        while i < reqs.len() {
            let (sid, first) = unpack(reqs[i].0);
            // A run of consecutive records in one segment, all already flushed.
            let mut j = i + 1;
            while j < reqs.len()
                && reqs[j].0 == reqs[j - 1].0 + 1
                && unpack(reqs[j].0).0 == sid
                && !(sid == self.active && unpack(reqs[j].0).1 >= self.buf_start)
            {
                j += 1;
            }
            let Some(seg) = self.segments.get(&sid) else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("read of unknown spill segment {sid}"),
                ));
            };
            if sid == self.active && first >= self.buf_start {
                let off = (first - self.buf_start) as usize * rb;
                let rec = self.buf.get(off..off + rb).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "spill record past buffer end")
                })?;
                decode(rec, reqs[i].1, &seg.path, first, &mut self.row_buf)?;
                f(reqs[i].2, &self.row_buf);
                i += 1;
                continue;
            }
            let n = j - i;
            self.read_buf.resize(n * rb, 0);
            seg.file
                .read_exact_at(&mut self.read_buf, u64::from(first) * rb as u64)?;
            for (k, req) in reqs[i..j].iter().enumerate() {
                decode(
                    &self.read_buf[k * rb..(k + 1) * rb],
                    req.1,
                    &seg.path,
                    first + k as u32,
                    &mut self.row_buf,
                )?;
                f(req.2, &self.row_buf);
            }
            i = j;
        }
        Ok(())
    }

    /// A sealed segment worth compacting: under half live. Returns its id.
    pub(crate) fn compaction_candidate(&self) -> Option<u32> {
        self.segments
            .iter()
            .filter(|(&id, s)| id != self.active && u64::from(s.live) * 2 < u64::from(s.len))
            .min_by_key(|(_, s)| s.live)
            .map(|(&id, _)| id)
    }

    /// Every record of a sealed segment, as (location, key, payload), for compaction.
    pub(crate) fn records(&self, sid: u32) -> io::Result<Vec<(u64, u64, Vec<f32>)>> {
        let seg = self
            .segments
            .get(&sid)
            .ok_or_else(|| io::Error::other(format!("unknown spill segment {sid}")))?;
        let rb = self.rec_bytes;
        let mut bytes = vec![0u8; seg.len as usize * rb];
        seg.file.read_exact_at(&mut bytes, 0)?;
        let mut out = Vec::with_capacity(seg.len as usize);
        let mut row = vec![0.0f32; self.payload_floats];
        for r in 0..seg.len {
            let rec = &bytes[r as usize * rb..(r as usize + 1) * rb];
            let key = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            decode(rec, key, &seg.path, r, &mut row)?;
            out.push((loc(sid, r), key, row.clone()));
        }
        Ok(out)
    }

    #[cfg(feature = "tier-compare")]
    pub(crate) fn payload_floats(&self) -> usize {
        self.payload_floats
    }

    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn disk_bytes(&self) -> u64 {
        self.segments
            .values()
            .map(|s| u64::from(s.len) * self.rec_bytes as u64)
            .sum()
    }

    pub(crate) fn live_bytes(&self) -> u64 {
        self.segments
            .values()
            .map(|s| u64::from(s.live) * self.rec_bytes as u64)
            .sum()
    }
}

impl Drop for SpillStore {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove spill directory");
        }
    }
}

/// Removes store directories of processes that are no longer running. Where liveness cannot be
/// told (no `/proc`), nothing is removed: a leftover directory wastes disk, a wrong removal
/// would destroy a running process's rows.
fn remove_stale(parent: &Path) -> io::Result<()> {
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(parent)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .map(|(p, _)| p)
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !proc.join(pid).exists() {
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

fn decode(rec: &[u8], want_key: u64, path: &Path, rec_no: u32, out: &mut [f32]) -> io::Result<()> {
    let key = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
    let stored = u32::from_le_bytes(rec[8..12].try_into().expect("4 bytes"));
    let payload = &rec[HEADER..];
    if key != want_key || stored != crc(key, payload) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "corrupt spill record {rec_no} in {}: key {key:#x} (want {want_key:#x}), crc {stored:#x} (want {:#x})",
                path.display(),
                crc(key, payload)
            ),
        ));
    }
    bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_free_and_compact_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let floats = 20;
        let mut s = SpillStore::open(dir.path(), floats).unwrap();
        let rows: Vec<(u64, Vec<f32>)> = (0..200_000u64)
            .map(|k| {
                (
                    k * 7,
                    (0..floats).map(|i| (k as f32) + i as f32 * 0.5).collect(),
                )
            })
            .collect();
        let mut locs = Vec::new();
        for (k, r) in &rows {
            locs.push(s.append(*k, r).unwrap());
        }
        assert!(s.segments.len() > 2, "several segments were written");
        let mut reqs: Vec<(u64, u64, usize)> = (0..rows.len())
            .step_by(37)
            .map(|i| (locs[i], rows[i].0, i))
            .collect();
        let mut seen = 0;
        s.read_many(&mut reqs, |i, payload| {
            assert_eq!(payload, &rows[i].1[..]);
            seen += 1;
        })
        .unwrap();
        assert_eq!(seen, reqs.len());
        // Free most of the first segment: it becomes a compaction candidate.
        let first_seg = unpack(locs[0]).0;
        let in_first: Vec<usize> = (0..rows.len())
            .filter(|&i| unpack(locs[i]).0 == first_seg)
            .collect();
        for &i in &in_first[..in_first.len() * 3 / 4] {
            s.free(locs[i]).unwrap();
        }
        assert_eq!(s.compaction_candidate(), Some(first_seg));
        let recs = s.records(first_seg).unwrap();
        assert_eq!(recs.len(), in_first.len());
        assert_eq!(recs[5].2, rows[in_first[5]].1);
        // Freeing the rest deletes the file.
        for &i in &in_first[in_first.len() * 3 / 4..] {
            s.free(locs[i]).unwrap();
        }
        assert!(!s.segments.contains_key(&first_seg));
        let own = s.dir().to_owned();
        assert!(own.is_dir());
        drop(s);
        assert!(!own.exists(), "a dropped store removes its directory");
    }

    #[test]
    fn stores_side_by_side_do_not_disturb_each_other_and_stale_dirs_go() {
        let parent = tempfile::tempdir().unwrap();
        // A directory left by a process that cannot exist (pid beyond the kernel's limit).
        let stale = parent.path().join("4294967295-0");
        fs::create_dir_all(&stale).unwrap();
        let mut a = SpillStore::open(parent.path(), 2).unwrap();
        assert!(!stale.exists(), "stale directory removed");
        let at = a.append(1, &[1.0, 2.0]).unwrap();
        let b = SpillStore::open(parent.path(), 2).unwrap();
        drop(b);
        a.flush().unwrap();
        let mut got = Vec::new();
        a.read_many(&mut [(at, 1, 0)], |_, p| got = p.to_vec())
            .unwrap();
        assert_eq!(
            got,
            vec![1.0, 2.0],
            "a second store in the same parent left the first intact"
        );
    }

    #[test]
    fn corruption_is_an_error_not_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SpillStore::open(dir.path(), 4).unwrap();
        let at = s.append(9, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        s.flush().unwrap();
        let path = s.segments[&0].path.clone();
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 3] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let err = s.read_many(&mut [(at, 9, 0)], |_, _| {
            panic!("no row from a corrupt record")
        });
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("corrupt spill record"), "{msg}");
        // Asking for the wrong key is caught too.
        assert!(s.read_many(&mut [(at, 10, 0)], |_, _| {}).is_err());
    }
}
