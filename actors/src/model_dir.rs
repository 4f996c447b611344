//! A trained model on disk: what `freshet train --out DIR` writes and `--init DIR` reads.
//!
//! ```text
//! DIR/model.json        manifest: format, version, model config, schema, table configs,
//!                       training step, rows trained, shard count, and per file its size and
//!                       CRC32C
//! DIR/dense.msgpack     the dense net's parameters and optimizer state (DenseState)
//! DIR/shard-<i>.msgpack shard i's snapshot: every table's rows, optimizer slots, admission
//!                       counts and versions (ShardSnapshot)
//! ```
//! Float blocks inside the msgpack files are raw little-endian bytes. The directory is written
//! under a temporary name and renamed into place, so a crash leaves either the old model or
//! the new one, never half of one. Every file's checksum is verified before anything is loaded.
//! The full format is documented in `docs/model-format.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::dense::{DenseState, ModelConfig};
use crate::embedding::{ShardSnapshot, TableConfig};
use crate::sample::Schema;

pub const FORMAT: &str = "freshet-model";
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "model.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub bytes: u64,
    pub crc32c: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub model: ModelConfig,
    pub schema: Schema,
    pub tables: BTreeMap<String, TableConfig>,
    pub step: u64,
    pub rows_trained: u64,
    pub shards: u32,
    pub created_unix_ms: u64,
    pub files: BTreeMap<String, FileSum>,
}

/// Everything a model directory holds, loaded and verified.
#[derive(Debug)]
pub struct SavedModel {
    pub manifest: Manifest,
    pub dense: DenseState,
    pub shards: Vec<ShardSnapshot>,
}

fn shard_file(i: usize) -> String {
    format!("shard-{i}.msgpack")
}

fn write_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    sums: &mut BTreeMap<String, FileSum>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let path = dir.join(name);
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    sums.insert(
        name.to_string(),
        FileSum {
            bytes: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
        },
    );
    Ok(())
}

/// Writes `model` to `dir`, replacing whatever model was there.
pub fn save(
    dir: &Path,
    mut manifest: Manifest,
    dense: &DenseState,
    shards: &[ShardSnapshot],
) -> anyhow::Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir
        .file_name()
        .with_context(|| format!("{} has no directory name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut sums = BTreeMap::new();
    write_file(&tmp, "dense.msgpack", &rmp_serde::to_vec(dense)?, &mut sums)?;
    for (i, s) in shards.iter().enumerate() {
        write_file(&tmp, &shard_file(i), &rmp_serde::to_vec(s)?, &mut sums)?;
    }
    manifest.files = sums;
    manifest.shards = shards.len() as u32;
    let mut unused = BTreeMap::new();
    write_file(
        &tmp,
        MANIFEST,
        &serde_json::to_vec_pretty(&manifest)?,
        &mut unused,
    )?;
    // Swap in: the old model moves aside first, so the new one appears by a single rename.
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_context(|| format!("moving the old {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    if let Ok(d) = std::fs::File::open(&parent) {
        let _ = d.sync_all();
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

fn read_checked(dir: &Path, name: &str, manifest: &Manifest) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(name);
    let want = manifest
        .files
        .get(name)
        .with_context(|| format!("{} does not list {name}", dir.join(MANIFEST).display()))?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 != want.bytes || crc32c::crc32c(&bytes) != want.crc32c {
        bail!(
            "{} is corrupt: {} bytes with CRC32C {:08x}, the manifest says {} bytes with {:08x}",
            path.display(),
            bytes.len(),
            crc32c::crc32c(&bytes),
            want.bytes,
            want.crc32c
        );
    }
    Ok(bytes)
}

/// Reads and verifies the model in `dir`.
pub fn load(dir: &Path) -> anyhow::Result<SavedModel> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read(&mpath).with_context(|| format!("reading {}", mpath.display()))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", mpath.display()))?;
    if manifest.format != FORMAT || manifest.format_version != FORMAT_VERSION {
        bail!(
            "{} is format {} v{}; this build reads {FORMAT} v{FORMAT_VERSION}",
            mpath.display(),
            manifest.format,
            manifest.format_version
        );
    }
    let dense: DenseState = rmp_serde::from_slice(&read_checked(dir, "dense.msgpack", &manifest)?)
        .with_context(|| format!("decoding {}", dir.join("dense.msgpack").display()))?;
    let mut shards = Vec::with_capacity(manifest.shards as usize);
    for i in 0..manifest.shards as usize {
        let name = shard_file(i);
        let snap: ShardSnapshot = rmp_serde::from_slice(&read_checked(dir, &name, &manifest)?)
            .with_context(|| format!("decoding {}", dir.join(&name).display()))?;
        shards.push(snap);
    }
    Ok(SavedModel {
        manifest,
        dense,
        shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::{DenseNet, InputShape, ModelKind};

    fn sample() -> (Manifest, DenseState) {
        let cfg = ModelConfig::new(ModelKind::Lr);
        let net = DenseNet::new(
            cfg.clone(),
            InputShape {
                fields: vec![0],
                dense: 2,
            },
        )
        .unwrap();
        let m = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            model: cfg,
            schema: Schema::criteo(4),
            tables: BTreeMap::new(),
            step: 7,
            rows_trained: 70,
            shards: 0,
            created_unix_ms: 1,
            files: BTreeMap::new(),
        };
        (m, net.state())
    }

    #[test]
    fn round_trips_and_detects_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let (m, dense) = sample();
        save(&dir, m.clone(), &dense, &[]).unwrap();
        // Saving again replaces the model in place.
        save(&dir, m, &dense, &[]).unwrap();
        let back = load(&dir).unwrap();
        assert_eq!(back.dense, dense);
        assert_eq!(back.manifest.step, 7);
        // A flipped byte is named.
        let p = dir.join("dense.msgpack");
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let e = load(&dir).unwrap_err().to_string();
        assert!(e.contains("dense.msgpack is corrupt"), "{e}");
        std::fs::remove_file(&p).unwrap();
        let e = format!("{:#}", load(&dir).unwrap_err());
        assert!(e.contains("dense.msgpack"), "{e}");
        let only: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(only.len(), 1, "no temporary directories left behind");
    }
}
