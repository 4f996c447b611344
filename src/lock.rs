//! The data directory's lock: one process at a time opens a node's embedded logs, joiner
//! checkpoints and model store.
//!
//! Opening the embedded log recovers it: a torn tail left by a crash is truncated. Done by a
//! second process while `freshet dev` appends, that recovery could cut a record being written
//! (and two appenders would interleave frames), so every command that opens them takes this
//! lock first: `dev` for its lifetime, `join` always (its checkpoints live in the directory
//! too), and `simulate`, `ingest` and `train --from-log` when the log is the embedded one.
//! Events reach a running node through `POST /v1/events`. The OS drops the lock when the
//! holder exits, however it exits.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Context;

use crate::settings::Settings;

/// Held while the process uses the data directory; released on drop or exit.
#[derive(Debug)]
pub(crate) struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// The lock when the settings' stream log is the embedded one (inside the data directory);
    /// none for Kafka, whose broker serializes its own appenders.
    pub(crate) fn for_embedded_log(
        settings: &Settings,
        what: &str,
    ) -> anyhow::Result<Option<Self>> {
        match settings.log.backend {
            freshet_actors::stream::LogBackend::Embedded => {
                Self::acquire(&settings.node.data_dir, what).map(Some)
            }
            freshet_actors::stream::LogBackend::Kafka => Ok(None),
        }
    }

    /// Takes `<data_dir>/node.lock`, or fails naming the process that holds it.
    pub(crate) fn acquire(data_dir: &Path, what: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        let path = data_dir.join("node.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                anyhow::bail!(
                    "the data directory {} is in use by another Freshet process{} ({}); stop it \
                     before {what}",
                    data_dir.display(),
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(": {holder}")
                    },
                    path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        // Who holds it, for the message another process prints.
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "pid {} ({what})", std::process::id())?;
        file.flush()?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_named_and_the_lock_frees_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path(), "running freshet dev").unwrap();
        let e = DataDirLock::acquire(dir.path(), "training from the log")
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use by another Freshet process"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains("running freshet dev"), "{e}");
        assert!(e.contains("before training from the log"), "{e}");
        drop(first);
        DataDirLock::acquire(dir.path(), "training from the log").unwrap();
    }
}
