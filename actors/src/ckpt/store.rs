//! The model store on disk: one directory per version, written atomically, verified before
//! anything is decoded. The format is documented in `docs/model-store.md`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::merge::{apply_deltas, reshard};
use super::shard_file::{self, ShardFileReader};
use super::{
    io, CkptError, FileSum, Manifest, Quarantined, RolledBack, ServingShard, ServingTable,
    Validation, VersionFile, VersionFiles, VersionKind, VersionMeta, CHECKSUMMED_FORMAT_VERSION,
    FORMAT, FORMAT_VERSION, OLDEST_FORMAT_VERSION,
};
use crate::dense::{DenseDiff, DenseState, DenseUpdate};
use crate::embedding::{EmbeddingShard, ShardDelta, ShardSnapshot};
use crate::ids::TableName;

const MANIFEST: &str = "manifest.json";
const DENSE: &str = "dense.msgpack";
/// A delta's dense state as its diff from the parent's (format v3).
const DENSE_DIFF: &str = "dense.diff.msgpack";
const PINS: &str = "pins";
/// Versions set aside because they failed verification: `quarantine/v<12 digits>-<unix ms>/`.
const QUARANTINE: &str = "quarantine";
/// In a quarantined version's directory: why it was set aside.
const QUARANTINE_REASON: &str = "QUARANTINED";
/// Fault injection for the crash test: with `FRESHET_FAULT_CKPT_STALL=<version>`, the writer
/// of that version stops after its first data file, as a process killed mid-write would.
const STALL_ENV: &str = "FRESHET_FAULT_CKPT_STALL";

fn shard_file(kind: VersionKind, i: usize) -> String {
    match kind {
        VersionKind::Full => format!("shard-{i}.snapshot"),
        VersionKind::Serving => format!("shard-{i}.msgpack"),
        VersionKind::Delta => format!("shard-{i}.delta.msgpack"),
    }
}

/// A full version's shard file as format version 1 wrote it: one msgpack `ShardSnapshot`.
fn v1_full_shard_file(i: usize) -> String {
    format!("shard-{i}.msgpack")
}

fn version_dir_name(v: u64) -> String {
    format!("v{v:012}")
}

fn parse_version_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('v')?;
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), CkptError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a writer hands the store for one version.
#[derive(Debug)]
pub enum Payload {
    Full(Vec<ShardSnapshot>),
    /// Changes since `parent`, which must be in the store.
    Delta {
        parent: u64,
        shards: Vec<ShardDelta>,
    },
}

impl Payload {
    /// Per shard, per table: the table version this payload brings the state to, which is
    /// where the next delta starts.
    pub fn table_versions(&self) -> Vec<Vec<(TableName, u64)>> {
        match self {
            Payload::Full(s) => s.iter().map(ShardSnapshot::table_versions).collect(),
            Payload::Delta { shards, .. } => {
                shards.iter().map(ShardDelta::table_versions).collect()
            }
        }
    }
}

/// A version brought back: the manifest of the version asked for, its dense state, and every
/// shard's snapshot at that version (re-sharded if asked).
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    pub dense: DenseState,
    pub shards: Vec<ShardSnapshot>,
    /// Bytes read from disk to restore it.
    pub bytes_read: u64,
}

/// One store directory. Readers and one writer may share it: a version appears by a single
/// rename, so a reader never sees half of one.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
}

impl ModelStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, CkptError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
        Ok(Self { root })
    }

    /// Opens an existing store without creating anything.
    pub fn open_existing(root: impl Into<PathBuf>) -> Result<Self, CkptError> {
        let root = root.into();
        if !root.is_dir() {
            return Err(CkptError::Missing { path: root });
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn version_dir(&self, v: u64) -> PathBuf {
        self.root.join(version_dir_name(v))
    }

    /// Every complete version, oldest first. Directories in progress (`.tmp-*`) are not
    /// versions.
    pub fn versions(&self) -> Result<Vec<u64>, CkptError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root).map_err(|e| io(&self.root, e))? {
            let e = e.map_err(|e| io(&self.root, e))?;
            if let Some(v) = e.file_name().to_str().and_then(parse_version_dir) {
                out.push(v);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    pub fn latest(&self) -> Result<Option<u64>, CkptError> {
        Ok(self.versions()?.last().copied())
    }

    /// The manifest of version `v`, checked for format.
    pub fn manifest(&self, v: u64) -> Result<Manifest, CkptError> {
        let dir = self.version_dir(v);
        let m = read_manifest(&dir)?;
        if m.version != v {
            return Err(CkptError::Corrupt {
                path: dir.join(MANIFEST),
                reason: format!("manifest says version {}", m.version),
            });
        }
        Ok(m)
    }

    /// Writes a new version (numbered one past the newest, quarantined ones included) and
    /// returns its manifest.
    ///
    /// Files go to a temporary directory and are fsynced; the directory is renamed into
    /// place and the store directory fsynced. A crash at any point leaves every earlier
    /// version intact and no partial version visible.
    pub fn write(
        &self,
        meta: VersionMeta,
        dense: &DenseState,
        payload: &Payload,
    ) -> Result<Manifest, CkptError> {
        self.write_after(meta, dense, payload, None)
    }

    /// [`Self::write`], given a version and its dense state that the caller holds (the
    /// CheckpointWriter keeps the one it last wrote). A delta stores the dense state as its
    /// diff from its parent's: from `known` when that is the parent, else restored from the
    /// store.
    pub fn write_after(
        &self,
        meta: VersionMeta,
        dense: &DenseState,
        payload: &Payload,
        known: Option<(u64, &DenseState)>,
    ) -> Result<Manifest, CkptError> {
        let version = self.next_version()?;
        let (kind, parent, base, shards) = match payload {
            Payload::Full(s) => (VersionKind::Full, None, version, s.len()),
            Payload::Delta { parent, shards } => {
                let p = self.manifest(*parent)?;
                if p.kind == VersionKind::Serving {
                    return Err(CkptError::Chain {
                        version,
                        reason: format!("parent {parent} is a serving export"),
                    });
                }
                if p.shards as usize != shards.len() {
                    return Err(CkptError::Chain {
                        version,
                        reason: format!(
                            "{} shard deltas, parent {parent} has {} shards",
                            shards.len(),
                            p.shards
                        ),
                    });
                }
                (VersionKind::Delta, Some(*parent), p.base, shards.len())
            }
        };
        let mut files = BTreeMap::new();
        let tmp = self
            .root
            .join(format!(".tmp-{}-{}", version, std::process::id()));
        fresh_dir(&tmp)?;
        let stall = std::env::var(STALL_ENV)
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        match payload {
            Payload::Full(_) => write_encoded(&tmp, DENSE, dense, &mut files)?,
            Payload::Delta { parent, .. } => {
                let restored;
                let base = match known {
                    Some((v, d)) if v == *parent => d,
                    _ => {
                        restored = self.restore_dense(*parent)?.1;
                        &restored
                    }
                };
                write_encoded(
                    &tmp,
                    DENSE_DIFF,
                    &DenseDiff::between(base, dense),
                    &mut files,
                )?
            }
        }
        if stall == Some(version) {
            eprintln!("{STALL_ENV}: stalled writing version {version}");
            loop {
                std::thread::park();
            }
        }
        match payload {
            Payload::Full(s) => {
                for (i, snap) in s.iter().enumerate() {
                    let name = shard_file(kind, i);
                    let sum = shard_file::write(&tmp.join(&name), snap)?;
                    files.insert(name, sum);
                }
            }
            Payload::Delta { shards: d, .. } => {
                for (i, delta) in d.iter().enumerate() {
                    write_encoded(&tmp, &shard_file(kind, i), delta, &mut files)?;
                }
            }
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            version,
            parent,
            base,
            kind,
            created_unix_ms: now_unix_ms(),
            step: meta.step,
            rows_trained: meta.rows_trained,
            sample_offsets: meta.sample_offsets,
            joiner_offsets: meta.joiner_offsets,
            validation: None,
            samples_rejected: meta.samples_rejected,
            replays: meta.replays,
            rolled_back: None,
            calibrated_from: meta.calibrated_from,
            model: meta.model,
            schema: meta.schema,
            tables: meta.tables,
            shards: shards as u32,
            placement: meta.placement,
            files,
            checksum: None,
        };
        write_manifest(&tmp, &manifest)?;
        sync_dir(&tmp)?;
        let dir = self.version_dir(version);
        std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
        sync_dir(&self.root)?;
        Ok(manifest)
    }

    /// One past the newest version ever written here: version numbers are never reused, not
    /// even those of versions set aside in quarantine.
    fn next_version(&self) -> Result<u64, CkptError> {
        let newest = self.latest()?.unwrap_or(0);
        Ok(newest.max(self.newest_quarantined()?.unwrap_or(0)) + 1)
    }

    /// The newest version number in `quarantine/`, from the directory names alone (this
    /// runs at every write, so it reads no reason file).
    fn newest_quarantined(&self) -> Result<Option<u64>, CkptError> {
        let qdir = self.root.join(QUARANTINE);
        let entries = match std::fs::read_dir(&qdir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&qdir, e)),
        };
        let mut newest = None;
        for e in entries {
            let name = e.map_err(|e| io(&qdir, e))?.file_name();
            let v = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(v, _)| parse_version_dir(v));
            newest = newest.max(v);
        }
        Ok(newest)
    }

    /// Sets version `v` aside: its directory moves to `quarantine/` with a file that says
    /// why, so that nothing reads it as a version again and nothing of it is lost. Returns
    /// where it went.
    pub fn quarantine(&self, v: u64, reason: &str) -> Result<PathBuf, CkptError> {
        let qdir = self.root.join(QUARANTINE);
        std::fs::create_dir_all(&qdir).map_err(|e| io(&qdir, e))?;
        let dir = self.version_dir(v);
        // The reason goes in first: a crash before the move leaves a version that is set
        // aside again at the next start, never a quarantined one without its reason.
        let why = dir.join(QUARANTINE_REASON);
        std::fs::write(&why, format!("{reason}\n")).map_err(|e| io(&why, e))?;
        let to = qdir.join(format!("{}-{}", version_dir_name(v), now_unix_ms()));
        std::fs::rename(&dir, &to).map_err(|e| io(&to, e))?;
        sync_dir(&qdir)?;
        sync_dir(&self.root)?;
        Ok(to)
    }

    /// Versions set aside, oldest first.
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, CkptError> {
        let qdir = self.root.join(QUARANTINE);
        let entries = match std::fs::read_dir(&qdir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&qdir, e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|e| io(&qdir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((v, at)) = name.split_once('-') else {
                continue;
            };
            let (Some(version), Ok(at_unix_ms)) = (parse_version_dir(v), at.parse()) else {
                continue;
            };
            let reason = std::fs::read_to_string(e.path().join(QUARANTINE_REASON))
                .map(|r| r.trim_end().to_string())
                .unwrap_or_else(|err| format!("(its reason cannot be read: {err})"));
            out.push(Quarantined {
                version,
                dir: e.path(),
                reason,
                at_unix_ms,
            });
        }
        out.sort_by_key(|q| (q.version, q.at_unix_ms));
        Ok(out)
    }

    /// Sets aside every version whose manifest cannot be read (missing, corrupt, of an
    /// unknown format, or failing its checksum): nothing could tell what it holds. Returns
    /// the versions set aside, each with its error.
    pub fn set_aside_unreadable(&self) -> Result<Vec<(u64, CkptError)>, CkptError> {
        let mut out = Vec::new();
        for v in self.versions()? {
            match self.manifest(v) {
                Ok(_) => {}
                Err(e) if e.is_integrity() => {
                    self.quarantine(v, &e.to_string())?;
                    out.push((v, e));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// After `err` refused a restore of version `v`: sets aside the version at fault
    /// (`at_fault`, from [`Self::version_at_fault`]; else `v`), `v`, and every version
    /// restored through the one at fault. Returns the versions set aside, oldest first.
    pub fn set_aside_failed_restore(
        &self,
        v: u64,
        at_fault: Option<u64>,
        err: &str,
    ) -> Result<Vec<u64>, CkptError> {
        let at_fault = at_fault.unwrap_or(v);
        let mut doomed = std::collections::BTreeSet::from([at_fault, v]);
        for w in self.versions()?.into_iter().filter(|&w| w > at_fault) {
            // Walk `w`'s parents; a manifest that does not read is not followed.
            let mut at = self.manifest(w).ok().and_then(|m| m.parent);
            while let Some(p) = at.filter(|&p| p >= at_fault) {
                if p == at_fault {
                    doomed.insert(w);
                    break;
                }
                at = self.manifest(p).ok().and_then(|m| m.parent);
            }
        }
        for &w in &doomed {
            if !self.version_dir(w).is_dir() {
                continue;
            }
            let reason = if w == at_fault {
                err.to_string()
            } else {
                format!("it restores through version {at_fault}, which failed: {err}")
            };
            self.quarantine(w, &reason)?;
        }
        Ok(doomed.into_iter().collect())
    }

    /// The version whose file or chain `e` is about, when it names one of this store's.
    pub fn version_at_fault(&self, e: &CkptError) -> Option<u64> {
        match e {
            CkptError::Chain { version, .. } => Some(*version),
            CkptError::Corrupt { path, .. } | CkptError::Missing { path } => path
                .strip_prefix(&self.root)
                .ok()?
                .components()
                .next()?
                .as_os_str()
                .to_str()
                .and_then(parse_version_dir),
            _ => None,
        }
    }

    /// Removes directories left by writers that died mid-version. Only the store's single
    /// writer calls this, when it starts.
    pub fn remove_stale_temporaries(&self) -> Result<usize, CkptError> {
        let mut n = 0;
        for e in std::fs::read_dir(&self.root).map_err(|e| io(&self.root, e))? {
            let e = e.map_err(|e| io(&self.root, e))?;
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                std::fs::remove_dir_all(e.path()).map_err(|err| io(&e.path(), err))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Records a validation result in version `v`'s manifest (atomically replaced).
    pub fn set_validation(&self, v: u64, validation: Validation) -> Result<Manifest, CkptError> {
        self.annotate(v, |m| m.validation = Some(validation))
    }

    /// Marks version `v` as history after a rollback to an older version: it stays on disk
    /// (and can be restored by name) but is never served or resumed from again.
    pub fn set_rolled_back(&self, v: u64, mark: RolledBack) -> Result<Manifest, CkptError> {
        self.annotate(v, |m| m.rolled_back = Some(mark))
    }

    /// The newest version no rollback has made history: where a restarted trainer resumes.
    pub fn latest_live(&self) -> Result<Option<u64>, CkptError> {
        for v in self.versions()?.into_iter().rev() {
            if self.manifest(v)?.rolled_back.is_none() {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Read, change and atomically replace `v`'s manifest. The validator and the supervisor
    /// both annotate manifests; the lock keeps one's change from overwriting the other's.
    fn annotate(&self, v: u64, change: impl FnOnce(&mut Manifest)) -> Result<Manifest, CkptError> {
        static ANNOTATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = ANNOTATE.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = self.manifest(v)?;
        change(&mut m);
        write_manifest(&self.version_dir(v), &m)?;
        Ok(m)
    }

    /// The versions `v` is built from, oldest first: its full version, then each delta.
    pub fn chain(&self, v: u64) -> Result<Vec<Manifest>, CkptError> {
        let mut chain = vec![self.manifest(v)?];
        while let Some(p) = chain.last().and_then(|m| m.parent) {
            let child = chain.last().map_or(v, |m| m.version);
            if p >= child {
                return Err(CkptError::Chain {
                    version: child,
                    reason: format!("parent {p} is not older"),
                });
            }
            chain.push(self.manifest(p)?);
        }
        chain.reverse();
        match chain.first() {
            Some(m) if m.kind == VersionKind::Full => Ok(chain),
            Some(m) => Err(CkptError::Chain {
                version: v,
                reason: format!("its chain starts at version {}, a {:?}", m.version, m.kind),
            }),
            None => Err(CkptError::Chain {
                version: v,
                reason: "empty chain".into(),
            }),
        }
    }

    /// Checks every file of version `v` (not its chain) against its manifest.
    pub fn verify(&self, v: u64) -> Result<u64, CkptError> {
        let m = self.manifest(v)?;
        let dir = self.version_dir(v);
        let mut bytes = 0;
        for name in m.files.keys() {
            bytes += read_checked(&dir, name, &m)?.len() as u64;
        }
        Ok(bytes)
    }

    /// Version `v` as it travels to a mirror of this store on another node: its manifest's
    /// text (validation included) and every file it lists, each checked against the manifest.
    pub fn export_version(&self, v: u64) -> Result<VersionFiles, CkptError> {
        let dir = self.version_dir(v);
        let path = dir.join(MANIFEST);
        let manifest = std::fs::read(&path).map_err(|e| io(&path, e))?;
        let m = parse_manifest(&path, &manifest)?;
        if m.version != v {
            return Err(CkptError::Corrupt {
                path,
                reason: format!("manifest says version {}", m.version),
            });
        }
        let mut files = Vec::with_capacity(m.files.len());
        for name in m.files.keys() {
            files.push(VersionFile {
                name: name.clone(),
                bytes: read_checked(&dir, name, &m)?.to_vec(),
            });
        }
        Ok(VersionFiles {
            version: v,
            manifest,
            files,
        })
    }

    /// Writes a version exported by another store ([`Self::export_version`]) under its own
    /// number; returns its manifest. Nothing is trusted: the manifest is checked as one read
    /// from disk, it must be of the version named, and the files must be exactly those it
    /// lists, with their sizes and checksums. A version already here is left as it is (its
    /// manifest is returned), so a mirror that fetches a version twice keeps one copy.
    ///
    /// Written as [`Self::write`] writes: into a temporary directory, fsynced, renamed.
    pub fn import_version(&self, incoming: &VersionFiles) -> Result<Manifest, CkptError> {
        let v = incoming.version;
        let dir = self.version_dir(v);
        let invalid =
            |reason: String| CkptError::Invalid(format!("version {v} received: {reason}"));
        let m = parse_manifest(&dir.join(MANIFEST), &incoming.manifest)
            .map_err(|e| invalid(e.to_string()))?;
        if m.version != v {
            return Err(invalid(format!("its manifest says version {}", m.version)));
        }
        if m.kind == VersionKind::Serving {
            return Err(invalid(
                "a serving export is not a version of a store".into(),
            ));
        }
        if incoming.files.len() != m.files.len() {
            return Err(invalid(format!(
                "{} files, its manifest lists {}",
                incoming.files.len(),
                m.files.len()
            )));
        }
        for VersionFile { name, bytes } in &incoming.files {
            let Some(want) = m.files.get(name) else {
                return Err(invalid(format!("file {name:?} is not in its manifest")));
            };
            // Names come from the network: a plain file name, never a path.
            if name.is_empty()
                || name.starts_with('.')
                || name.contains(['/', '\\'])
                || name == MANIFEST
            {
                return Err(invalid(format!(
                    "file name {name:?} is not a plain file name"
                )));
            }
            let crc = crc32c::crc32c(bytes);
            if bytes.len() as u64 != want.bytes || crc != want.crc32c {
                return Err(invalid(format!(
                    "file {name}: {} bytes with CRC32C {crc:08x}, its manifest says {} bytes \
                     with {:08x}",
                    bytes.len(),
                    want.bytes,
                    want.crc32c
                )));
            }
        }
        if dir.is_dir() {
            return self.manifest(v);
        }
        let tmp = self
            .root
            .join(format!(".tmp-import-{v}-{}", std::process::id()));
        fresh_dir(&tmp)?;
        let mut unused = BTreeMap::new();
        for VersionFile { name, bytes } in &incoming.files {
            write_bytes(&tmp, name, bytes, &mut unused)?;
        }
        write_bytes(&tmp, MANIFEST, &incoming.manifest, &mut unused)?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
        sync_dir(&self.root)?;
        Ok(m)
    }

    /// Restores version `v` into `shards` shards (`None`: as many as were written).
    ///
    /// Every file of the chain is checked against its checksum before it is decoded; a
    /// missing or corrupt one is named in the error, and nothing is returned.
    pub fn restore(&self, v: u64, shards: Option<u32>) -> Result<Restored, CkptError> {
        let (chain, last) = self.restore_chain(v)?;
        let (dense, dense_bytes) = self.read_dense(&chain)?;
        // Shards are independent: each is read and merged on its own thread.
        let per_shard: Vec<Result<(ShardSnapshot, u64), CkptError>> = (0..last.shards as usize)
            .into_par_iter()
            .map(|i| self.read_shard(v, &chain, i))
            .collect();
        let mut snaps = Vec::with_capacity(per_shard.len());
        let mut bytes_read = dense_bytes;
        for r in per_shard {
            let (s, b) = r?;
            bytes_read += b;
            snaps.push(s);
        }
        let snaps = match shards {
            Some(n) => reshard(snaps, n).map_err(|e| CkptError::Chain {
                version: v,
                reason: e.to_string(),
            })?,
            None => snaps,
        };
        Ok(Restored {
            manifest: last,
            dense,
            shards: snaps,
            bytes_read,
        })
    }

    /// Delta version `v` as written: its manifest, dense state and every shard's changes,
    /// each file checked against its checksum. What a serving replica applies.
    pub fn read_delta(
        &self,
        v: u64,
    ) -> Result<(Manifest, DenseUpdate, Vec<ShardDelta>), CkptError> {
        let m = self.manifest(v)?;
        if m.kind != VersionKind::Delta {
            return Err(CkptError::Chain {
                version: v,
                reason: format!("it is a {:?} version, not a delta", m.kind),
            });
        }
        let dir = self.version_dir(v);
        let dense = if m.files.contains_key(DENSE_DIFF) {
            DenseUpdate::Diff(read_decoded(&dir, DENSE_DIFF, &m)?.0)
        } else {
            DenseUpdate::Whole(read_decoded(&dir, DENSE, &m)?.0)
        };
        let shards = (0..m.shards as usize)
            .map(|i| read_decoded(&dir, &shard_file(VersionKind::Delta, i), &m).map(|(d, _)| d))
            .collect::<Result<_, _>>()?;
        Ok((m, dense, shards))
    }

    /// The manifest and dense state of version `v`, checked, without any shard.
    ///
    /// With [`ModelStore::restore_shard`], this lets each shard owner restore its own rows
    /// while the others do theirs, so that one shard's reads overlap another's table build.
    pub fn restore_dense(&self, v: u64) -> Result<(Manifest, DenseState), CkptError> {
        let (chain, last) = self.restore_chain(v)?;
        let (dense, _) = self.read_dense(&chain)?;
        Ok((last, dense))
    }

    /// Shard `shard` of `count` at version `v`, with the bytes read for it.
    ///
    /// When `count` is the number of shards the version was written with, this reads only
    /// that shard's files. Otherwise every shard's files are read and re-routed (the cost of
    /// a whole [`ModelStore::restore`]), since any old shard may hold keys of the new one.
    pub fn restore_shard(
        &self,
        v: u64,
        shard: u32,
        count: u32,
    ) -> Result<(ShardSnapshot, u64), CkptError> {
        if shard >= count {
            return Err(CkptError::Invalid(format!(
                "shard {shard} does not exist among {count}"
            )));
        }
        let (chain, last) = self.restore_chain(v)?;
        if last.shards == count {
            return self.read_shard(v, &chain, shard as usize);
        }
        let mut r = self.restore(v, Some(count))?;
        Ok((r.shards.swap_remove(shard as usize), r.bytes_read))
    }

    /// The chain of `v` and its last manifest, checked to have one shard count throughout.
    fn restore_chain(&self, v: u64) -> Result<(Vec<Manifest>, Manifest), CkptError> {
        let chain = self.chain(v)?;
        let last = chain.last().cloned().ok_or(CkptError::Chain {
            version: v,
            reason: "empty chain".into(),
        })?;
        if let Some(m) = chain.iter().find(|m| m.shards != last.shards) {
            return Err(CkptError::Chain {
                version: v,
                reason: format!(
                    "version {} has {} shards, not {}",
                    m.version, m.shards, last.shards
                ),
            });
        }
        Ok((chain, last))
    }

    /// The dense state at the chain's last version, with the bytes read: the newest whole
    /// state on the chain (the full version's, or a v1/v2 delta's), then each later diff.
    fn read_dense(&self, chain: &[Manifest]) -> Result<(DenseState, u64), CkptError> {
        let start = chain
            .iter()
            .rposition(|m| m.files.contains_key(DENSE))
            .ok_or_else(|| CkptError::Chain {
                version: chain.last().map_or(0, |m| m.version),
                reason: "no version of its chain holds a whole dense state".into(),
            })?;
        let first = &chain[start];
        let (mut dense, mut bytes) =
            read_decoded::<DenseState>(&self.version_dir(first.version), DENSE, first)?;
        for m in &chain[start + 1..] {
            let dir = self.version_dir(m.version);
            let (diff, b) = read_decoded::<DenseDiff>(&dir, DENSE_DIFF, m)?;
            dense = diff.apply(&dense).map_err(|e| CkptError::Corrupt {
                path: dir.join(DENSE_DIFF),
                reason: e.to_string(),
            })?;
            bytes += b;
        }
        Ok((dense, bytes))
    }

    /// Shard `i` of the chain's full version brought forward through each delta.
    fn read_shard(
        &self,
        v: u64,
        chain: &[Manifest],
        i: usize,
    ) -> Result<(ShardSnapshot, u64), CkptError> {
        let full = &chain[0];
        let (base, mut bytes) = self.read_full_shard(full, i)?;
        let mut deltas = Vec::with_capacity(chain.len() - 1);
        for m in &chain[1..] {
            let (d, b): (ShardDelta, u64) = read_decoded(
                &self.version_dir(m.version),
                &shard_file(VersionKind::Delta, i),
                m,
            )?;
            bytes += b;
            deltas.push(d);
        }
        let snap = apply_deltas(base, deltas).map_err(|reason| CkptError::Chain {
            version: v,
            reason: format!("shard {i}: {reason}"),
        })?;
        Ok((snap, bytes))
    }

    /// Shard `i` of full version `full`, whole in memory, with its size.
    fn read_full_shard(
        &self,
        full: &Manifest,
        i: usize,
    ) -> Result<(ShardSnapshot, u64), CkptError> {
        let dir = self.version_dir(full.version);
        if full.format_version == 1 {
            return read_decoded(&dir, &v1_full_shard_file(i), full);
        }
        let (reader, header, sum) = open_full_shard(&dir, full, i)?;
        Ok((reader.into_snapshot(header)?, sum.bytes))
    }

    /// Restores `shard` to version `v` as [`ModelStore::restore_shard`] would, building its
    /// tables straight from the files; returns the bytes read.
    ///
    /// When `v` is a full version written with the shard's shard count (format version 2),
    /// the rows stream from the shard's file through one small buffer into the new tables,
    /// which are swapped in only once the file's CRC has matched: the tables are the only
    /// large memory the restore touches. Otherwise (deltas to merge, another shard count, an
    /// older format) this is `restore_shard` then [`EmbeddingShard::restore`]. Either way a
    /// refused restore leaves `shard` as it was.
    pub fn restore_shard_into(&self, v: u64, shard: &mut EmbeddingShard) -> Result<u64, CkptError> {
        let (chain, last) = self.restore_chain(v)?;
        let (id, count) = (shard.id(), shard.shard_count());
        let full = &chain[0];
        let load_err = |e: crate::embedding::EmbeddingError| CkptError::Chain {
            version: v,
            reason: format!("shard {id}: {e}"),
        };
        if chain.len() > 1 || last.shards != count || full.format_version == 1 {
            let (snap, bytes) = self.restore_shard(v, id, count)?;
            shard.restore(snap).map_err(load_err)?;
            return Ok(bytes);
        }
        if id >= count {
            return Err(CkptError::Invalid(format!(
                "shard {id} does not exist among {count}"
            )));
        }
        let (mut reader, header, sum) =
            open_full_shard(&self.version_dir(full.version), full, id as usize)?;
        match shard.restore_from(header, &mut reader) {
            Ok(()) => Ok(sum.bytes),
            // The file's own failure (I/O, checksum) comes first: it explains the rest.
            Err(e) => Err(reader.corruption().unwrap_or_else(|| load_err(e))),
        }
    }

    /// The newest version that restores, skipping (and reporting) ones that do not.
    pub fn restore_newest(
        &self,
        shards: Option<u32>,
    ) -> Result<(Restored, Vec<(u64, CkptError)>), CkptError> {
        let mut skipped = Vec::new();
        for v in self.versions()?.into_iter().rev() {
            match self.restore(v, shards) {
                Ok(r) => return Ok((r, skipped)),
                Err(e) => skipped.push((v, e)),
            }
        }
        Err(CkptError::NoGoodVersion {
            store: self.root.clone(),
            tried: skipped.len(),
        })
    }

    /// Records that `holder` (a serving replica) uses version `v`; retention never deletes it.
    pub fn pin(&self, holder: &str, v: u64) -> Result<(), CkptError> {
        if holder.is_empty()
            || !holder
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(CkptError::Invalid(format!(
                "pin holder {holder:?} must be letters, digits, '-' or '_'"
            )));
        }
        let dir = self.root.join(PINS);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let tmp = dir.join(format!(".{holder}.tmp"));
        std::fs::write(&tmp, v.to_string()).map_err(|e| io(&tmp, e))?;
        let path = dir.join(holder);
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))
    }

    pub fn unpin(&self, holder: &str) -> Result<(), CkptError> {
        let path = self.root.join(PINS).join(holder);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path, e)),
            _ => Ok(()),
        }
    }

    /// Pinned versions by holder. A pin file that does not hold a number is an error, not
    /// an absent pin: deleting a version a replica uses is worse than keeping too much.
    pub fn pins(&self) -> Result<BTreeMap<String, u64>, CkptError> {
        let dir = self.root.join(PINS);
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&dir, e)),
        };
        for e in entries {
            let e = e.map_err(|e| io(&dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = e.path();
            let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            let v = text.trim().parse().map_err(|_| CkptError::Corrupt {
                path: path.clone(),
                reason: format!("pin holds {:?}, not a version", text.trim()),
            })?;
            out.insert(name, v);
        }
        Ok(out)
    }

    /// Keeps the newest `keep_full` full versions with their delta chains, every pinned
    /// version's chain, and every version newer than the oldest kept full one; deletes the
    /// rest, oldest first. Returns the deleted versions.
    pub fn retain(&self, keep_full: usize) -> Result<Vec<u64>, CkptError> {
        self.retain_within(keep_full, None)
    }

    /// [`Self::retain`], and then, while the kept versions' files take more than
    /// `keep_bytes`: deletes the deltas of older chains (each full version restores on its
    /// own), oldest chain first, then older full versions, oldest first. The newest chain and
    /// every pinned version's chain are kept whatever their size.
    pub fn retain_within(
        &self,
        keep_full: usize,
        keep_bytes: Option<u64>,
    ) -> Result<Vec<u64>, CkptError> {
        let keep_full = keep_full.max(1);
        let versions = self.versions()?;
        let mut manifests = BTreeMap::new();
        for &v in &versions {
            manifests.insert(v, self.manifest(v)?);
        }
        let fulls: Vec<u64> = manifests
            .values()
            .filter(|m| m.kind == VersionKind::Full)
            .map(|m| m.version)
            .collect();
        let Some(&oldest_kept) = fulls
            .len()
            .checked_sub(keep_full.min(fulls.len()))
            .and_then(|i| fulls.get(i))
        else {
            return Ok(Vec::new());
        };
        let mut keep: std::collections::BTreeSet<u64> = versions
            .iter()
            .copied()
            .filter(|&v| v >= oldest_kept)
            .collect();
        let mut pinned = std::collections::BTreeSet::new();
        for (_, v) in self.pins()? {
            // A pinned version needs its whole chain back to its full version.
            let mut at = Some(v);
            while let Some(x) = at {
                pinned.insert(x);
                at = manifests.get(&x).and_then(|m| m.parent);
            }
        }
        if let Some(max) = keep_bytes {
            let bytes = |v: &u64| manifests.get(v).map_or(0, Manifest::bytes);
            let mut total: u64 = keep.iter().chain(pinned.difference(&keep)).map(bytes).sum();
            let newest_full = fulls.last().copied();
            let older: Vec<u64> = fulls
                .iter()
                .copied()
                .filter(|&f| f >= oldest_kept && Some(f) != newest_full)
                .collect();
            // First the deltas of older chains, then their full versions: a full version
            // alone still restores, and keeps the oldest point to roll back to.
            for deltas_only in [true, false] {
                for &full in &older {
                    if total <= max {
                        break;
                    }
                    let doomed: Vec<u64> = keep
                        .iter()
                        .copied()
                        .filter(|v| manifests.get(v).is_some_and(|m| m.base == full))
                        .filter(|v| !(pinned.contains(v) || (deltas_only && *v == full)))
                        .collect();
                    for v in doomed {
                        keep.remove(&v);
                        total -= bytes(&v);
                    }
                }
            }
        }
        keep.extend(pinned);
        let mut deleted = Vec::new();
        for v in versions {
            if keep.contains(&v) {
                continue;
            }
            let dir = self.version_dir(v);
            // Rename first, so that a crash mid-delete never leaves a half version under a
            // version name.
            let doomed = self.root.join(format!(".tmp-del-{v}"));
            std::fs::rename(&dir, &doomed).map_err(|e| io(&dir, e))?;
            std::fs::remove_dir_all(&doomed).map_err(|e| io(&doomed, e))?;
            deleted.push(v);
        }
        if !deleted.is_empty() {
            sync_dir(&self.root)?;
        }
        Ok(deleted)
    }

    /// Writes version `v` for serving to `out` (a new directory): weights only, without
    /// optimizer state or admission counters.
    pub fn export_serving(&self, v: u64, out: &Path) -> Result<Manifest, CkptError> {
        let r = self.restore(v, None)?;
        if out.exists() {
            return Err(CkptError::Invalid(format!(
                "{} exists; a serving export goes to a new directory",
                out.display()
            )));
        }
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        let name = out
            .file_name()
            .ok_or_else(|| CkptError::Invalid(format!("{} has no name", out.display())))?
            .to_string_lossy()
            .into_owned();
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        fresh_dir(&tmp)?;
        let mut files = BTreeMap::new();
        let mut dense = r.dense;
        dense.optimizer.m = Vec::new();
        dense.optimizer.v = Vec::new();
        write_encoded(&tmp, DENSE, &dense, &mut files)?;
        for (i, s) in r.shards.iter().enumerate() {
            let tables = s
                .tables
                .iter()
                .map(|t| {
                    let (dim, rf) = (t.dim as usize, t.row_floats as usize);
                    let mut weights = Vec::with_capacity(t.rows.len() * dim);
                    for i in 0..t.rows.len() {
                        weights.extend_from_slice(&t.rows.row(i, rf)[..dim]);
                    }
                    ServingTable {
                        name: t.name.clone(),
                        dim: t.dim,
                        keys: t.rows.keys.clone(),
                        weights,
                    }
                })
                .collect();
            let shard = ServingShard {
                shard: s.shard,
                shard_count: s.shard_count,
                tables,
            };
            write_encoded(
                &tmp,
                &shard_file(VersionKind::Serving, i),
                &shard,
                &mut files,
            )?;
        }
        let mut m = r.manifest;
        // Serving files are alike in every format version; the export is in this one's.
        m.format_version = FORMAT_VERSION;
        m.kind = VersionKind::Serving;
        m.parent = None;
        m.files = files;
        write_manifest(&tmp, &m)?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, out).map_err(|e| io(out, e))?;
        sync_dir(parent)?;
        Ok(m)
    }
}

/// Reads a serving export written by [`ModelStore::export_serving`], verifying every file.
pub fn load_serving(dir: &Path) -> Result<(Manifest, DenseState, Vec<ServingShard>), CkptError> {
    let m = read_manifest(dir)?;
    if m.kind != VersionKind::Serving {
        return Err(CkptError::Invalid(format!(
            "{} is a {:?} version, not a serving export",
            dir.display(),
            m.kind
        )));
    }
    let (dense, _) = read_decoded(dir, DENSE, &m)?;
    let mut shards = Vec::with_capacity(m.shards as usize);
    for i in 0..m.shards as usize {
        let (s, _) = read_decoded(dir, &shard_file(VersionKind::Serving, i), &m)?;
        shards.push(s);
    }
    Ok((m, dense, shards))
}

/// Opens full version `m`'s shard file `i` (format version 2): the reader, the header and
/// the file's expected size and CRC.
fn open_full_shard(
    dir: &Path,
    m: &Manifest,
    i: usize,
) -> Result<(ShardFileReader, ShardSnapshot, FileSum), CkptError> {
    let name = shard_file(VersionKind::Full, i);
    let sum = m
        .files
        .get(&name)
        .cloned()
        .ok_or_else(|| CkptError::Corrupt {
            path: dir.join(MANIFEST),
            reason: format!("does not list {name}"),
        })?;
    let (reader, header) = ShardFileReader::open(&dir.join(&name), &sum)?;
    Ok((reader, header, sum))
}

/// Reads `dir`'s manifest and checks its format and, from format version 3, its checksum.
fn read_manifest(dir: &Path) -> Result<Manifest, CkptError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| io(&path, e))?;
    parse_manifest(&path, &text)
}

/// A manifest from its text, checked for format and seal; `path` names it in errors.
fn parse_manifest(path: &Path, text: &[u8]) -> Result<Manifest, CkptError> {
    let corrupt = |reason: String| CkptError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut m: Manifest =
        serde_json::from_slice(text).map_err(|e| corrupt(format!("not a manifest: {e}")))?;
    if m.format != FORMAT || !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&m.format_version) {
        return Err(corrupt(format!(
            "format {} v{}; this build reads {FORMAT} v{OLDEST_FORMAT_VERSION} to v{FORMAT_VERSION}",
            m.format, m.format_version
        )));
    }
    match (
        m.checksum.take(),
        m.format_version >= CHECKSUMMED_FORMAT_VERSION,
    ) {
        (Some(recorded), _) => {
            let computed = manifest_checksum(text)
                .ok_or_else(|| corrupt("its checksum field cannot be found in its text".into()))?;
            if computed != recorded {
                return Err(corrupt(format!(
                    "checksum {computed:08x} of its text, it records {recorded:08x} (edited or damaged)"
                )));
            }
        }
        (None, true) => {
            return Err(corrupt(format!(
                "format v{} requires a checksum and it has none",
                m.format_version
            )))
        }
        (None, false) => {}
    }
    Ok(m)
}

/// The key of the field that seals a manifest (the last one of the object).
const CHECKSUM_KEY: &[u8] = b"\"checksum\"";

/// CRC32C of a manifest's text with its checksum's digits replaced by `0`: what
/// [`write_manifest`] sealed it with. `None` when the text has no checksum field.
///
/// The field is found as the last `"checksum"` key of the text, followed by `:` and digits
/// (whatever the spacing): it is the object's last field, and inside a JSON string the quotes
/// would be escaped, so no value can fake it.
fn manifest_checksum(text: &[u8]) -> Option<u32> {
    let key = text
        .windows(CHECKSUM_KEY.len())
        .rposition(|w| w == CHECKSUM_KEY)?;
    let skip_space = |mut i: usize| {
        while text.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
            i += 1;
        }
        i
    };
    let colon = skip_space(key + CHECKSUM_KEY.len());
    if text.get(colon) != Some(&b':') {
        return None;
    }
    let at = skip_space(colon + 1);
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut h = crc32c::crc32c(&text[..at]);
    h = crc32c::crc32c_append(h, b"0");
    Some(crc32c::crc32c_append(h, &text[at + digits..]))
}

/// Creates `dir` empty, removing what a writer that died under the same name left there.
fn fresh_dir(dir: &Path) -> Result<(), CkptError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    std::fs::create_dir(dir).map_err(|e| io(dir, e))
}

fn write_bytes(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    files: &mut BTreeMap<String, FileSum>,
) -> Result<(), CkptError> {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
    f.write_all(bytes).map_err(|e| io(&path, e))?;
    f.sync_all().map_err(|e| io(&path, e))?;
    files.insert(
        name.to_string(),
        FileSum {
            bytes: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
        },
    );
    Ok(())
}

fn write_encoded<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
    files: &mut BTreeMap<String, FileSum>,
) -> Result<(), CkptError> {
    let bytes = rmp_serde::to_vec(value)
        .map_err(|e| CkptError::Invalid(format!("encoding {name}: {e}")))?;
    write_bytes(dir, name, &bytes, files)
}

/// Replaces `dir`'s manifest atomically (write aside, fsync, rename, fsync the directory),
/// sealed with its checksum when its format version has one.
fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), CkptError> {
    let encode = |m: &Manifest| {
        serde_json::to_vec_pretty(m)
            .map_err(|e| CkptError::Invalid(format!("encoding the manifest: {e}")))
    };
    let bytes = if m.format_version >= CHECKSUMMED_FORMAT_VERSION {
        let mut sealed = m.clone();
        sealed.checksum = Some(0);
        let unsealed = encode(&sealed)?;
        sealed.checksum = manifest_checksum(&unsealed);
        encode(&sealed)?
    } else {
        encode(m)?
    };
    let tmp = dir.join(".manifest.json.tmp");
    let mut unused = BTreeMap::new();
    write_bytes(dir, ".manifest.json.tmp", &bytes, &mut unused)?;
    let path = dir.join(MANIFEST);
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    sync_dir(dir)
}

fn read_checked(dir: &Path, name: &str, m: &Manifest) -> Result<Vec<u8>, CkptError> {
    let path = dir.join(name);
    let want = m.files.get(name).ok_or_else(|| CkptError::Corrupt {
        path: dir.join(MANIFEST),
        reason: format!("does not list {name}"),
    })?;
    let mut file = std::fs::File::open(&path).map_err(|e| io(&path, e))?;
    let len = file.metadata().map_err(|e| io(&path, e))?.len();
    if len != want.bytes {
        return Err(CkptError::Corrupt {
            path,
            reason: format!(
                "{len} bytes, the manifest says {} (truncated or extended)",
                want.bytes
            ),
        });
    }
    // Into huge pages: a fresh buffer on 4 KiB pages costs more in page faults than the read.
    let mut bytes = crate::embedding::huge_zeroed_vec::<u8>(len as usize);
    file.read_exact(&mut bytes).map_err(|e| io(&path, e))?;
    let crc = crc32c::crc32c(&bytes);
    if crc != want.crc32c {
        return Err(CkptError::Corrupt {
            path,
            reason: format!("CRC32C {crc:08x}, the manifest says {:08x}", want.crc32c),
        });
    }
    Ok(bytes)
}

fn read_decoded<T: DeserializeOwned>(
    dir: &Path,
    name: &str,
    m: &Manifest,
) -> Result<(T, u64), CkptError> {
    let bytes = read_checked(dir, name, m)?;
    let v = rmp_serde::from_slice(&bytes).map_err(|e| CkptError::Corrupt {
        path: dir.join(name),
        reason: format!("does not decode: {e}"),
    })?;
    Ok((v, bytes.len() as u64))
}
