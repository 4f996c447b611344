//! Training samples: the schema, the stable feature hash, a columnar batch and the parsers.
//!
//! A sample holds one or more labels (CTR first, room for CVR and others), dense `f32`
//! features, sparse features (per field, a list of u64 ids with optional weights, so multi-hot
//! works) and an optional sample weight (negative-downsampling correction).
//!
//! Samples are stored column-wise in a [`SampleBlock`] rather than one struct per row, because
//! a Criteo row has 26 sparse fields and one `Vec` per field per row would cost more than the
//! parsing itself.

mod block;
pub mod criteo;
pub mod hash;
pub mod json;
pub mod reject;
mod schema;

pub use block::{SampleBlock, SampleRef};
pub use hash::feature_id;
pub use reject::{RejectReason, RejectSink, RejectStats};
pub use schema::{FieldSpec, Pooling, Schema};

/// Dense values beyond this magnitude are refused as corrupt. Real features (counts, prices,
/// dwell times) stay far below; a value this large is a unit or parsing error upstream, and one
/// such value would saturate a whole layer.
pub const MAX_ABS_VALUE: f64 = 1e12;

/// The input formats `freshet train` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Tab-separated: label, 13 integers, 26 categorical strings; empty means missing.
    Criteo,
    /// One JSON object per line, against the schema.
    Jsonl,
    /// A stream of msgpack maps with the same shape as the JSON lines.
    Msgpack,
}

/// A sample format name that is none of [`Format`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown format {0:?}; expected criteo, jsonl or msgpack")]
pub struct UnknownFormat(pub String);

impl std::str::FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "criteo" => Ok(Self::Criteo),
            "jsonl" | "json" => Ok(Self::Jsonl),
            "msgpack" => Ok(Self::Msgpack),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}
