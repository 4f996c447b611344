//! How far `freshet ingest` got in a file, so that a rerun of the same file continues where the
//! last run's appends ended instead of appending its events twice.
//!
//! One small JSON file per input under `<data_dir>/ingest/`, rewritten (to a temporary file,
//! then renamed) after every append: the file's canonical path, its size then, the byte offset
//! and line number that every appended event lies before, and a fingerprint of the file's first
//! bytes. A rerun that finds the same path with the same first bytes and at least that many
//! bytes seeks to the offset; anything else is another file under the same name, read from
//! its start.
//!
//! The mark is written after the events log acknowledged the append and made it durable, so a
//! crash between the two repeats at most the one batch whose mark was not yet written.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Bytes of the file's start that identify it.
const HEAD_BYTES: u64 = 4096;

/// Where one input file's ingestion stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Mark {
    pub(crate) path: PathBuf,
    /// The file's size when the mark was written.
    pub(crate) size: u64,
    /// Every line before this byte offset was appended or dead-lettered.
    pub(crate) offset: u64,
    /// Lines before `offset`, so that line numbers go on counting from there.
    pub(crate) lines: u64,
    /// FNV-1a of the file's first `head_len` bytes.
    pub(crate) head_fnv: u64,
    pub(crate) head_len: u64,
}

/// The mark of one input file, read at start and rewritten after every append.
#[derive(Debug)]
pub(crate) struct Resume {
    mark_path: PathBuf,
    path: PathBuf,
    head_fnv: u64,
    head_len: u64,
}

/// Where a run starts in its file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// No mark for this file (or `--from-start`).
    Beginning,
    /// A mark of an earlier run: continue at `offset`, after `lines` lines.
    Continue { offset: u64, lines: u64 },
    /// A mark whose file no longer matches it (replaced, rewritten or cut): read it whole.
    Changed { why: String },
}

impl Resume {
    /// The mark of `input` under `data_dir`, and where a run starts: at the beginning when
    /// `from_start`.
    pub(crate) fn open(
        data_dir: &Path,
        input: &Path,
        from_start: bool,
    ) -> anyhow::Result<(Self, Start)> {
        let path = std::fs::canonicalize(input)
            .with_context(|| format!("resolving {}", input.display()))?;
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let size = file
            .metadata()
            .with_context(|| format!("reading the size of {}", path.display()))?
            .len();
        let head_len = size.min(HEAD_BYTES);
        let head_fnv = head_fingerprint(&mut file, head_len)
            .with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mark_path = data_dir.join("ingest").join(format!(
            "{}-{:016x}.json",
            name.chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                })
                .take(64)
                .collect::<String>(),
            fnv1a(path.as_os_str().as_encoded_bytes())
        ));
        let me = Self {
            mark_path,
            path,
            head_fnv,
            head_len,
        };
        if from_start {
            return Ok((me, Start::Beginning));
        }
        let start = match me.read()? {
            None => Start::Beginning,
            Some(m) if m.path != me.path => Start::Beginning,
            Some(m) => me.judge(&m, size, &mut file)?,
        };
        Ok((me, start))
    }

    fn read(&self) -> anyhow::Result<Option<Mark>> {
        match std::fs::read(&self.mark_path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(m) => Ok(Some(m)),
                // A mark that does not parse says nothing reliable: start over, and say so.
                Err(e) => {
                    tracing::warn!(mark = %self.mark_path.display(), error = %e,
                        "the ingest mark is unreadable; reading the file from its start");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.mark_path.display())),
        }
    }

    fn judge(&self, m: &Mark, size: u64, file: &mut std::fs::File) -> anyhow::Result<Start> {
        if size < m.offset {
            return Ok(Start::Changed {
                why: format!(
                    "it has {size} bytes, fewer than the {} an earlier run ingested",
                    m.offset
                ),
            });
        }
        // The same first bytes as when the mark was written (fewer of them if the file was
        // shorter then).
        let then = if m.head_len == self.head_len {
            self.head_fnv
        } else {
            head_fingerprint(file, m.head_len)
                .with_context(|| format!("reading {}", self.path.display()))?
        };
        if then != m.head_fnv {
            return Ok(Start::Changed {
                why: "its first bytes differ from those of the file an earlier run ingested".into(),
            });
        }
        Ok(Start::Continue {
            offset: m.offset,
            lines: m.lines,
        })
    }

    /// Records that every line before byte `offset` (`lines` lines) is in the logs.
    pub(crate) fn save(&self, offset: u64, lines: u64) -> anyhow::Result<()> {
        let size = std::fs::metadata(&self.path)
            .map(|m| m.len())
            .unwrap_or(offset);
        let mark = Mark {
            path: self.path.clone(),
            size,
            offset,
            lines,
            head_fnv: self.head_fnv,
            head_len: self.head_len,
        };
        let dir = self.mark_path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = self.mark_path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&mark)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.mark_path)
            .with_context(|| format!("renaming {} into place", tmp.display()))
    }

    #[cfg(test)]
    pub(crate) fn mark_path(&self) -> &Path {
        &self.mark_path
    }
}

fn head_fingerprint(file: &mut std::fs::File, len: u64) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut head = Vec::with_capacity(len as usize);
    file.by_ref().take(len).read_to_end(&mut head)?;
    Ok(fnv1a(&head))
}

/// FNV-1a, 64 bits: stable across builds and platforms, which a mark on disk needs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory holding `input` (written with `contents`) and a mark saved at
    /// `offset` after `lines` lines.
    fn marked(contents: &str, offset: u64, lines: u64) -> (tempfile::TempDir, PathBuf, Resume) {
        let data = tempfile::tempdir().unwrap();
        let input = data.path().join("events.jsonl");
        std::fs::write(&input, contents).unwrap();
        let (r, start) = Resume::open(data.path(), &input, false).unwrap();
        assert_eq!(start, Start::Beginning, "no mark yet");
        r.save(offset, lines).unwrap();
        (data, input, r)
    }

    fn start(data: &tempfile::TempDir, input: &Path, from_start: bool) -> Start {
        Resume::open(data.path(), input, from_start).unwrap().1
    }

    #[test]
    fn a_mark_continues_the_same_file_and_not_another_under_its_name() {
        let (data, input, _) = marked("line one\nline two\n", 9, 1);
        let continued = Start::Continue {
            offset: 9,
            lines: 1,
        };
        assert_eq!(start(&data, &input, false), continued);
        // --from-start ignores it.
        assert_eq!(start(&data, &input, true), Start::Beginning);
        // Grown: the same file, continued.
        std::fs::write(&input, "line one\nline two\nline three\n").unwrap();
        assert_eq!(start(&data, &input, false), continued);
        // Rewritten with other first bytes, or cut below the offset: another file.
        std::fs::write(&input, "LINE ONE\nline two\n").unwrap();
        let s = start(&data, &input, false);
        assert!(matches!(s, Start::Changed { .. }), "{s:?}");
        std::fs::write(&input, "line").unwrap();
        let s = start(&data, &input, false);
        assert!(
            matches!(s, Start::Changed { ref why } if why.contains("fewer")),
            "{s:?}"
        );
    }

    #[test]
    fn an_unreadable_mark_starts_over() {
        let (data, input, r) = marked("a\nb\n", 2, 1);
        std::fs::write(r.mark_path(), "{not json").unwrap();
        assert_eq!(start(&data, &input, false), Start::Beginning);
    }
}
