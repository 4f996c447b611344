//! Full shard files (`shard-<i>.snapshot`, format version 2): a small msgpack header, then
//! every table's float block raw.
//!
//! ```text
//! offset 0   b"FRSHSHD2"                         magic
//!        8   header length, u64 little-endian
//!       16   CRC32C of the header, u32 little-endian
//!       20   0u32                                 reserved
//!       24   header: msgpack ShardSnapshot, every table's float block left empty
//!  24 + len  table 0's floats (rows x row_floats f32 little-endian), table 1's, ...
//! ```
//!
//! Why not one msgpack value, as format version 1 wrote: decoding that needs the whole file in one
//! buffer and the floats decoded into a second, and under a hypervisor the first touch of fresh
//! memory can cost more than reading the disk (`docs/design-notes.md`). With the floats outside the
//! header, restore streams them through one reused buffer straight into the live tables: the tables
//! are the only fresh memory it touches.
//!
//! Nothing unchecked is used. The header has its own CRC, checked before it is decoded. The
//! floats are checked by the manifest's CRC of the whole file, which is only known at the
//! end: the tables built from them are swapped in only after it matched
//! ([`crate::embedding::RowSource::finish`]).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::{CkptError, FileSum};
use crate::embedding::{huge_zeroed_vec, RowSource, ShardSnapshot, SnapshotError};

const MAGIC: &[u8; 8] = b"FRSHSHD2";
const PREAMBLE: usize = 24;
/// Bytes per read when a float block goes into memory whole.
const CHUNK: usize = 1 << 20;

fn corrupt(path: &Path, reason: impl Into<String>) -> CkptError {
    CkptError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A writer that keeps the CRC32C of everything written through it.
struct Summed<W> {
    inner: W,
    crc: u32,
    bytes: u64,
}

impl<W: Write> Write for Summed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `snap` to `path` (created, written, fsynced) and returns its size and CRC.
pub(super) fn write(path: &Path, snap: &ShardSnapshot) -> Result<FileSum, CkptError> {
    let io = |e| super::io(path, e);
    let header = ShardSnapshot {
        shard: snap.shard,
        shard_count: snap.shard_count,
        tables: snap.tables.iter().map(|t| t.without_floats()).collect(),
    };
    let header = rmp_serde::to_vec(&header)
        .map_err(|e| CkptError::Invalid(format!("encoding {}: {e}", path.display())))?;
    for t in &snap.tables {
        let need = t.rows.len() * t.row_floats as usize;
        if t.rows.data.len() != need {
            return Err(CkptError::Invalid(format!(
                "table `{}` has {} floats for {} rows of {}",
                t.name,
                t.rows.data.len(),
                t.rows.len(),
                t.row_floats
            )));
        }
    }
    let file = File::create(path).map_err(io)?;
    let mut w = Summed {
        inner: BufWriter::with_capacity(CHUNK, file),
        crc: 0,
        bytes: 0,
    };
    let mut preamble = [0u8; PREAMBLE];
    preamble[..8].copy_from_slice(MAGIC);
    preamble[8..16].copy_from_slice(&(header.len() as u64).to_le_bytes());
    preamble[16..20].copy_from_slice(&crc32c::crc32c(&header).to_le_bytes());
    w.write_all(&preamble).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for t in &snap.tables {
        if cfg!(target_endian = "little") {
            w.write_all(bytemuck::cast_slice(&t.rows.data))
                .map_err(io)?;
        } else {
            for x in &t.rows.data {
                w.write_all(&x.to_le_bytes()).map_err(io)?;
            }
        }
    }
    w.flush().map_err(io)?;
    let (crc, bytes) = (w.crc, w.bytes);
    let file = w
        .inner
        .into_inner()
        .map_err(|e| super::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(FileSum { bytes, crc32c: crc })
}

/// A full shard file being read: its header decoded, its floats still on disk.
///
/// As a [`RowSource`] it hands out the floats in order, a block at a time, through one
/// reused buffer, and checks the whole file's CRC in `finish`. An I/O or checksum failure is
/// kept as the typed [`CkptError`] ([`ShardFileReader::corruption`]); the table being built
/// only sees its text.
#[derive(Debug)]
pub(super) struct ShardFileReader {
    path: PathBuf,
    file: File,
    want: FileSum,
    crc: u32,
    /// Float bytes not yet read.
    left: u64,
    buf: Vec<f32>,
    error: Option<CkptError>,
}

impl ShardFileReader {
    /// Opens `path`, checks its size against `want` and its header against the header's own
    /// CRC, and returns the reader with the header (a snapshot whose float blocks are empty).
    pub(super) fn open(path: &Path, want: &FileSum) -> Result<(Self, ShardSnapshot), CkptError> {
        let io = |e| super::io(path, e);
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len != want.bytes {
            return Err(corrupt(
                path,
                format!(
                    "{len} bytes, the manifest says {} (truncated or extended)",
                    want.bytes
                ),
            ));
        }
        let mut preamble = [0u8; PREAMBLE];
        if len < PREAMBLE as u64 {
            return Err(corrupt(
                path,
                format!("{len} bytes: too short for a shard file"),
            ));
        }
        file.read_exact(&mut preamble).map_err(io)?;
        if &preamble[..8] != MAGIC {
            return Err(corrupt(path, "not a full shard file (bad magic)"));
        }
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(&preamble[r]);
            u64::from_le_bytes(b)
        };
        let header_len = word(8..16);
        let header_crc = word(16..20) as u32;
        if header_len > len - PREAMBLE as u64 {
            return Err(corrupt(
                path,
                format!("a header of {header_len} bytes in a file of {len}"),
            ));
        }
        // Bounded by the file's size, which matched the manifest.
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let crc = crc32c::crc32c(&header);
        if crc != header_crc {
            return Err(corrupt(
                path,
                format!("header CRC32C {crc:08x}, the file says {header_crc:08x}"),
            ));
        }
        let snap: ShardSnapshot = rmp_serde::from_slice(&header)
            .map_err(|e| corrupt(path, format!("header does not decode: {e}")))?;
        let mut floats = 0u64;
        for t in &snap.tables {
            if !t.rows.data.is_empty() {
                return Err(corrupt(
                    path,
                    format!("table `{}` has floats in the header", t.name),
                ));
            }
            t.rows
                .check_columns()
                .map_err(|e| corrupt(path, format!("table `{}`: {e}", t.name)))?;
            floats = floats.saturating_add(t.rows.len() as u64 * u64::from(t.row_floats));
        }
        let left = len - PREAMBLE as u64 - header_len;
        if floats.checked_mul(4) != Some(left) {
            return Err(corrupt(
                path,
                format!("{left} bytes of floats, the header's tables hold {floats} floats"),
            ));
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&preamble), &header);
        let reader = Self {
            path: path.to_path_buf(),
            file,
            want: want.clone(),
            crc,
            left,
            buf: Vec::new(),
            error: None,
        };
        Ok((reader, snap))
    }

    fn fail(&mut self, e: CkptError) -> SnapshotError {
        let text = e.to_string();
        self.error = Some(e);
        SnapshotError::Source(text)
    }

    /// Reads exactly `out.len()` floats into `out`, adding them to the CRC.
    fn read_into(&mut self, out: &mut [f32]) -> Result<(), CkptError> {
        let bytes = out.len() as u64 * 4;
        if bytes > self.left {
            return Err(corrupt(
                &self.path,
                "asked for more floats than the file holds",
            ));
        }
        let raw: &mut [u8] = bytemuck::cast_slice_mut(out);
        self.file
            .read_exact(raw)
            .map_err(|e| super::io(&self.path, e))?;
        self.crc = crc32c::crc32c_append(self.crc, raw);
        if cfg!(target_endian = "big") {
            for x in out.iter_mut() {
                *x = f32::from_bits(u32::from_le(x.to_bits()));
            }
        }
        self.left -= bytes;
        Ok(())
    }

    /// Checks that every float was read and the whole file's CRC matches the manifest.
    fn check_end(&self) -> Result<(), CkptError> {
        if self.left != 0 {
            return Err(corrupt(
                &self.path,
                format!("{} bytes of floats were never read", self.left),
            ));
        }
        if self.crc != self.want.crc32c {
            return Err(corrupt(
                &self.path,
                format!(
                    "CRC32C {:08x}, the manifest says {:08x}",
                    self.crc, self.want.crc32c
                ),
            ));
        }
        Ok(())
    }

    /// After the table being built refused its rows: reads the rest of the file through the
    /// CRC, so that a corrupt file is reported as such (a flipped bit can make a float
    /// non-finite, which the table refuses before the CRC could be checked).
    pub(super) fn corruption(&mut self) -> Option<CkptError> {
        if let Some(e) = self.error.take() {
            return Some(e);
        }
        let mut buf = std::mem::take(&mut self.buf);
        if buf.is_empty() {
            buf.resize(CHUNK / 4, 0.0);
        }
        while self.left > 0 {
            let n = (self.left / 4).min(buf.len() as u64) as usize;
            if let Err(e) = self.read_into(&mut buf[..n]) {
                return Some(e);
            }
        }
        self.check_end().err()
    }

    /// Reads every float block into `header`, making it a whole snapshot; what a restore that
    /// merges deltas or re-shards needs in memory.
    pub(super) fn into_snapshot(
        mut self,
        mut header: ShardSnapshot,
    ) -> Result<ShardSnapshot, CkptError> {
        for t in &mut header.tables {
            let n = t.rows.len() * t.row_floats as usize;
            // Hundreds of megabytes: into huge pages (see `huge_zeroed_vec`).
            let mut data = huge_zeroed_vec::<f32>(n);
            for c in data.chunks_mut(CHUNK / 4) {
                self.read_into(c)?;
            }
            t.rows.data = data;
        }
        self.check_end()?;
        Ok(header)
    }
}

impl RowSource for ShardFileReader {
    fn next_floats(&mut self, floats: usize) -> Result<&[f32], SnapshotError> {
        if self.buf.len() < floats {
            self.buf.resize(floats, 0.0);
        }
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.read_into(&mut buf[..floats]);
        self.buf = buf;
        match r {
            Ok(()) => Ok(&self.buf[..floats]),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn finish(&mut self) -> Result<(), SnapshotError> {
        self.check_end().map_err(|e| self.fail(e))
    }
}
