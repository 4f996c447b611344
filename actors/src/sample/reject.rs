//! Rejected input: why a row was refused, and where refused rows are kept.
//!
//! A malformed row never stops a parse. It is counted by reason and written, with its line (or
//! record) number and the raw bytes, to a reject file, so the data can be fixed and replayed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Why a row was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RejectReason {
    #[error("expected {expected} tab-separated columns, found {found}")]
    ColumnCount { expected: usize, found: usize },
    #[error("column {column}: {value:?} is not a number")]
    NotANumber { column: String, value: String },
    #[error("column {column}: value is NaN or infinite")]
    NotFinite { column: String },
    #[error("column {column}: |{value}| exceeds {max:e}")]
    Magnitude {
        column: String,
        value: f64,
        max: f64,
    },
    #[error("label {column}: {value:?} is not 0 or 1")]
    BadLabel { column: String, value: String },
    #[error("sample weight {0} is not a finite positive number")]
    BadWeight(f64),
    #[error("row is not valid UTF-8")]
    NotUtf8,
    #[error("missing label {0}")]
    MissingLabel(String),
    #[error("unknown column {0}")]
    UnknownColumn(String),
    #[error("field {field}: {ids} ids but {weights} weights")]
    WeightCount {
        field: String,
        ids: usize,
        weights: usize,
    },
    #[error("malformed record: {0}")]
    Malformed(String),
}

impl RejectReason {
    /// A short, stable name for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ColumnCount { .. } => "column_count",
            Self::NotANumber { .. } => "not_a_number",
            Self::NotFinite { .. } => "not_finite",
            Self::Magnitude { .. } => "magnitude",
            Self::BadLabel { .. } => "bad_label",
            Self::BadWeight(_) => "bad_weight",
            Self::NotUtf8 => "not_utf8",
            Self::MissingLabel(_) => "missing_label",
            Self::UnknownColumn(_) => "unknown_column",
            Self::WeightCount { .. } => "weight_count",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// Counts of refused rows, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RejectStats {
    pub total: u64,
    pub by_reason: BTreeMap<&'static str, u64>,
}

/// Where refused rows go: counted always, and written to a file when one is given.
#[derive(Debug)]
pub struct RejectSink {
    file: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
    stats: RejectStats,
    /// Prefixes line numbers in the file (`source:line`) when rows come from several inputs.
    source: Option<String>,
}

/// Raw bytes kept per rejected row; a 10 MB garbage line must not become a 10 MB reject line.
const MAX_RAW: usize = 1024;

impl RejectSink {
    /// Counts only.
    pub fn counting() -> Self {
        Self {
            file: None,
            stats: RejectStats::default(),
            source: None,
        }
    }

    /// Counts, and writes each refused row as `line<TAB>reason<TAB>raw` to `path` (`line` is
    /// `source:line` once [`Self::set_source`] named the input).
    pub fn to_file(path: &Path) -> anyhow::Result<Self> {
        let f = std::fs::File::create(path)
            .with_context(|| format!("creating reject file {}", path.display()))?;
        Ok(Self {
            file: Some((path.to_path_buf(), std::io::BufWriter::new(f))),
            stats: RejectStats::default(),
            source: None,
        })
    }

    /// Names the input the following rows come from.
    pub fn set_source(&mut self, source: impl Into<String>) {
        self.source = Some(source.into());
    }

    pub fn reject(&mut self, line: u64, reason: &RejectReason, raw: &[u8]) -> anyhow::Result<()> {
        self.stats.total += 1;
        *self.stats.by_reason.entry(reason.kind()).or_default() += 1;
        if let Some((path, w)) = &mut self.file {
            let cut = &raw[..raw.len().min(MAX_RAW)];
            // Escape so one rejected row stays one line whatever bytes it held.
            let shown: String = cut.escape_ascii().to_string();
            match &self.source {
                Some(src) => writeln!(w, "{src}:{line}\t{reason}\t{shown}"),
                None => writeln!(w, "{line}\t{reason}\t{shown}"),
            }
            .with_context(|| format!("writing reject file {}", path.display()))?;
        }
        Ok(())
    }

    pub fn stats(&self) -> &RejectStats {
        &self.stats
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        if let Some((path, w)) = &mut self.file {
            w.flush()
                .with_context(|| format!("flushing reject file {}", path.display()))?;
        }
        Ok(())
    }
}
