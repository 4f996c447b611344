//! Live events, joined samples and dead letters: what the stream log carries.
//!
//! The event log holds [`Event`]s, the sample log [`JoinedSample`]s and the dead-letter log
//! [`DeadLetter`]s, each as one msgpack map per record (field names included, so producers and
//! consumers of different versions can add fields). `freshet ingest` and the HTTP endpoint take
//! the same shapes as JSON:
//!
//! ```json
//! {"type": "impression", "request_id": "r-17", "time_ms": 1700000000000, "user": "u-3",
//!  "item": "i-9", "features": {"dense": {"price": 12.5}, "sparse": {"user": "u-3", "item": "i-9"}}}
//! {"type": "action", "request_id": "r-17", "item": "i-9", "time_ms": 1700000004200, "kind": "click"}
//! ```
//!
//! An impression carries the feature values its request was scored with. Training on that
//! snapshot, rather than on features looked up when the label arrives, keeps training and
//! serving consistent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sample::json::{RawField, RawSample};
use crate::sample::MAX_ABS_VALUE;
use crate::stream::Offset;

/// The topic of raw events (impressions and actions).
pub const EVENTS_TOPIC: &str = "events";
/// The topic of joined, labelled samples.
pub const SAMPLES_TOPIC: &str = "samples";
/// The topic of records set aside: malformed events, orphan actions.
pub const DEAD_LETTERS_TOPIC: &str = "dead-letters";

/// Longest request, user or item id accepted.
pub const MAX_ID_BYTES: usize = 256;

/// One event from the application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Impression(Impression),
    Action(Action),
}

/// An item shown in answer to a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impression {
    pub request_id: String,
    /// Event time: when the item was shown, milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub user: String,
    pub item: String,
    /// The feature values the item was scored with.
    #[serde(default)]
    pub features: Features,
}

/// What the user did with an impression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub request_id: String,
    pub item: String,
    pub time_ms: i64,
    /// `click`, `like`, `conversion`, …: one label per kind the joiner is configured with.
    pub kind: String,
    /// An optional amount (order value, watch time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

/// A feature snapshot: the sample's features without its labels.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Features {
    #[serde(default)]
    pub dense: BTreeMap<String, f64>,
    #[serde(default)]
    pub sparse: BTreeMap<String, RawField>,
}

/// Why an event was refused.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum EventError {
    #[error("undecodable {format}: {detail}")]
    Undecodable {
        format: &'static str,
        detail: String,
    },
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes, over the limit of {MAX_ID_BYTES}")]
    TooLong { field: &'static str, len: usize },
    #[error("time_ms {0} is negative")]
    NegativeTime(i64),
    #[error("time_ms {time_ms} is {ahead_ms} ms ahead of when the event was logged")]
    FromTheFuture { time_ms: i64, ahead_ms: i64 },
    #[error("dense feature {name}: {value} is not finite or exceeds {MAX_ABS_VALUE:e}")]
    BadDense { name: String, value: f64 },
    #[error("action value {0} is not finite")]
    BadValue(f64),
    #[error("unknown action kind {kind:?}; the joiner labels {known:?}")]
    UnknownKind { kind: String, known: Vec<String> },
}

impl EventError {
    /// A short, stable name for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Undecodable { .. } => "undecodable",
            Self::Empty { .. } => "empty_field",
            Self::TooLong { .. } => "too_long",
            Self::NegativeTime(_) => "negative_time",
            Self::FromTheFuture { .. } => "future_time",
            Self::BadDense { .. } => "bad_dense",
            Self::BadValue(_) => "bad_value",
            Self::UnknownKind { .. } => "unknown_kind",
        }
    }
}

fn check_id(field: &'static str, v: &str) -> Result<(), EventError> {
    if v.is_empty() {
        return Err(EventError::Empty { field });
    }
    if v.len() > MAX_ID_BYTES {
        return Err(EventError::TooLong {
            field,
            len: v.len(),
        });
    }
    Ok(())
}

impl Event {
    pub fn time_ms(&self) -> i64 {
        match self {
            Self::Impression(i) => i.time_ms,
            Self::Action(a) => a.time_ms,
        }
    }

    /// The routing key: both events of one request go to one partition, so one joiner sees
    /// them in one order.
    pub fn request_id(&self) -> &str {
        match self {
            Self::Impression(i) => &i.request_id,
            Self::Action(a) => &a.request_id,
        }
    }

    /// Structural checks that need no configuration.
    pub fn validate(&self) -> Result<(), EventError> {
        let t = self.time_ms();
        if t < 0 {
            return Err(EventError::NegativeTime(t));
        }
        match self {
            Self::Impression(i) => {
                check_id("request_id", &i.request_id)?;
                check_id("user", &i.user)?;
                check_id("item", &i.item)?;
                for (name, &value) in &i.features.dense {
                    if !value.is_finite() || value.abs() > MAX_ABS_VALUE {
                        return Err(EventError::BadDense {
                            name: name.clone(),
                            value,
                        });
                    }
                }
            }
            Self::Action(a) => {
                check_id("request_id", &a.request_id)?;
                check_id("item", &a.item)?;
                check_id("kind", &a.kind)?;
                if let Some(v) = a.value {
                    if !v.is_finite() {
                        return Err(EventError::BadValue(v));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("events serialise")
    }

    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, EventError> {
        rmp_serde::from_slice(bytes).map_err(|e| EventError::Undecodable {
            format: "msgpack",
            detail: e.to_string(),
        })
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, EventError> {
        serde_json::from_slice(bytes).map_err(|e| EventError::Undecodable {
            format: "json",
            detail: e.to_string(),
        })
    }
}

/// Why a joined sample was emitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    /// An action matched the impression inside its window.
    Positive,
    /// The window closed without an action.
    Negative,
    /// An action arrived after the impression's sample was emitted (late, or a second kind):
    /// the sample again with the labels known now. Training may treat it as a fix of the
    /// earlier sample rather than a new observation.
    Correction,
}

/// A labelled sample, as the joiner writes it to the sample log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JoinedSample {
    pub request_id: String,
    pub item: String,
    pub user: String,
    pub impression_time_ms: i64,
    pub kind: SampleKind,
    /// One label per configured action kind: 1 when that action was seen, else 0.
    pub labels: BTreeMap<String, f64>,
    /// `1 / r` for a negative kept by downsampling at rate `r`; 1 otherwise.
    pub weight: f64,
    pub features: Features,
}

impl JoinedSample {
    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("samples serialise")
    }

    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, EventError> {
        rmp_serde::from_slice(bytes).map_err(|e| EventError::Undecodable {
            format: "msgpack",
            detail: e.to_string(),
        })
    }

    /// The training sample (labels, features, weight) in the shape the schema decoder reads.
    pub fn to_raw_sample(&self) -> RawSample {
        RawSample {
            labels: self.labels.clone(),
            dense: self.features.dense.clone(),
            sparse: self.features.sparse.clone(),
            weight: (self.weight != 1.0).then_some(self.weight),
        }
    }
}

/// An input record set aside, with where it came from and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: u32,
    pub offset: Offset,
    /// [`EventError::kind`] or a joiner reason such as `no_impression`.
    pub reason: String,
    pub detail: String,
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
}

impl DeadLetter {
    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("dead letters serialise")
    }

    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, EventError> {
        rmp_serde::from_slice(bytes).map_err(|e| EventError::Undecodable {
            format: "msgpack",
            detail: e.to_string(),
        })
    }
}

/// Raw bytes as a msgpack bin (not an array of integers), without another dependency.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::json::RawValue;

    fn impression() -> Event {
        let mut features = Features::default();
        features.dense.insert("price".into(), 12.5);
        features
            .sparse
            .insert("item".into(), RawField::One(RawValue::Str("i-9".into())));
        Event::Impression(Impression {
            request_id: "r-17".into(),
            time_ms: 1_700_000_000_000,
            user: "u-3".into(),
            item: "i-9".into(),
            features,
        })
    }

    #[test]
    fn events_round_trip_through_msgpack_and_json() {
        let e = impression();
        assert_eq!(Event::from_msgpack(&e.to_msgpack()).unwrap(), e);
        let json = serde_json::to_vec(&e).unwrap();
        assert_eq!(Event::from_json(&json).unwrap(), e);
        let a = Event::from_json(
            br#"{"type":"action","request_id":"r-17","item":"i-9","time_ms":5,"kind":"click"}"#,
        )
        .unwrap();
        assert!(matches!(&a, Event::Action(x) if x.kind == "click" && x.value.is_none()));
        assert_eq!(Event::from_msgpack(&a.to_msgpack()).unwrap(), a);
        let d = DeadLetter {
            topic: "events".into(),
            partition: 1,
            offset: 9,
            reason: "undecodable".into(),
            detail: "x".into(),
            payload: vec![0, 255, 3],
        };
        let bytes = d.to_msgpack();
        assert_eq!(DeadLetter::from_msgpack(&bytes).unwrap(), d);
    }

    #[test]
    fn malformed_events_are_refused_with_a_reason() {
        let cases: [(&[u8], &str); 9] = [
            (b"", "undecodable"),
            (b"{", "undecodable"),
            (br#"{"type":"view","request_id":"r"}"#, "undecodable"),
            (br#"{"type":"action","request_id":"r","item":"i","time_ms":1}"#, "undecodable"),
            (br#"{"type":"action","request_id":"r","item":"i","time_ms":1,"kind":"click","extra":1}"#, "undecodable"),
            (br#"{"type":"action","request_id":"","item":"i","time_ms":1,"kind":"click"}"#, "empty_field"),
            (br#"{"type":"action","request_id":"r","item":"i","time_ms":-1,"kind":"click"}"#, "negative_time"),
            (br#"{"type":"impression","request_id":"r","item":"i","user":"u","time_ms":1,"features":{"dense":{"x":1e300}}}"#, "bad_dense"),
            (br#"{"type":"action","request_id":"r","item":"i","time_ms":1,"kind":"click","value":"x"}"#, "undecodable"),
        ];
        for (input, want) in cases {
            let got = Event::from_json(input).and_then(|e| e.validate().map(|()| e));
            let err = got.expect_err(&String::from_utf8_lossy(input));
            assert_eq!(
                err.kind(),
                want,
                "{}: {err}",
                String::from_utf8_lossy(input)
            );
        }
        let long = format!(
            r#"{{"type":"action","request_id":"{}","item":"i","time_ms":1,"kind":"click"}}"#,
            "r".repeat(MAX_ID_BYTES + 1)
        );
        assert_eq!(
            Event::from_json(long.as_bytes())
                .unwrap()
                .validate()
                .unwrap_err()
                .kind(),
            "too_long"
        );
        assert_eq!(
            Event::from_msgpack(&[0xc1]).unwrap_err().kind(),
            "undecodable"
        );
    }
}
