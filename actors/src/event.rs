//! Live events, joined samples and dead letters: what the stream log carries.
//!
//! The event log holds [`Event`]s, the sample log [`JoinedSample`]s and the dead-letter log
//! [`DeadLetter`]s, each as one msgpack map per record (field names included). A sample or a
//! dead letter may gain fields that older readers skip; an event may not, since its reader
//! refuses unknown fields: an event with a `traceparent` needs a reader that knows it. `freshet
//! ingest` and the HTTP endpoint take the same shapes as JSON:
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
/// The topic of records the joiners set aside: malformed events, orphan actions. Partition `p`
/// has one writer, the joiner of event partition `p`.
pub const DEAD_LETTERS_TOPIC: &str = "dead-letters";
/// The topic of lines `freshet ingest` refused. Separate from [`DEAD_LETTERS_TOPIC`] because
/// the joiners' exactly-once replay needs to be the only writer of theirs.
pub const INGEST_REJECTS_TOPIC: &str = "ingest-rejects";
/// The topic of samples the online trainer refused (undecodable, or not in the schema).
/// Partition `p` has one writer, the trainer, which reads sample partition `p`.
pub const SAMPLE_REJECTS_TOPIC: &str = "sample-rejects";

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
    pub features: Snapshot,
    /// W3C `traceparent` of the request that showed the item, when it is traced: the
    /// joiner's spans for this impression and its sample continue that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
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
    /// W3C `traceparent` of the request that reported the action, when it is traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
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

impl Features {
    pub fn validate(&self) -> Result<(), EventError> {
        for (name, &value) in &self.dense {
            if !value.is_finite() || value.abs() > MAX_ABS_VALUE {
                return Err(EventError::BadDense {
                    name: name.clone(),
                    value,
                });
            }
        }
        Ok(())
    }
}

/// A feature snapshot kept encoded (msgpack of [`Features`]).
///
/// The joiner never looks inside a snapshot; it carries it from the impression to the sample.
/// Kept as bytes, a snapshot costs one copy instead of a map of strings to build and free per
/// impression. In JSON (human-readable formats) it reads and writes as the [`Features`] object;
/// in msgpack it is a `bin` holding the encoded map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot(Vec<u8>);

impl Snapshot {
    pub fn encode(f: &Features) -> Self {
        if f.dense.is_empty() && f.sparse.is_empty() {
            return Self(Vec::new());
        }
        Self(rmp_serde::to_vec_named(f).expect("features serialise"))
    }

    pub fn decode(&self) -> Result<Features, EventError> {
        if self.0.is_empty() {
            return Ok(Features::default());
        }
        rmp_serde::from_slice(&self.0).map_err(|e| EventError::Undecodable {
            format: "msgpack features",
            detail: e.to_string(),
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            self.decode()
                .map_err(serde::ser::Error::custom)?
                .serialize(s)
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            Ok(Self::encode(&Features::deserialize(d)?))
        } else {
            serde_bytes_compat::deserialize(d).map(Self)
        }
    }
}

/// The msgpack form of an [`Event`]: one flat map, `type` first. Serde's internally tagged
/// enums buffer every field of a map before choosing the variant, which tripled the cost of
/// decoding an impression; a flat struct decodes in one pass.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    #[serde(rename = "type")]
    ty: String,
    request_id: String,
    time_ms: i64,
    item: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    features: Option<Snapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
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
    /// The event's `traceparent` slot.
    pub fn traceparent_mut(&mut self) -> &mut Option<String> {
        match self {
            Self::Impression(i) => &mut i.traceparent,
            Self::Action(a) => &mut a.traceparent,
        }
    }

    /// The trace the event belongs to; none when it has no well-formed `traceparent`.
    pub fn trace(&self) -> crate::envelope::TraceContext {
        let tp = match self {
            Self::Impression(i) => i.traceparent.as_deref(),
            Self::Action(a) => a.traceparent.as_deref(),
        };
        crate::envelope::TraceContext::from_headers(tp, None)
    }

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

    /// Every check that needs no configuration, the feature snapshot's included.
    pub fn validate(&self) -> Result<(), EventError> {
        self.validate_header()?;
        if let Self::Impression(i) = self {
            i.features.decode()?.validate()?;
        }
        Ok(())
    }

    /// The checks of [`Self::validate`] except the feature snapshot, which the joiner carries
    /// unopened (the trainer's schema decoder checks it).
    pub fn validate_header(&self) -> Result<(), EventError> {
        let t = self.time_ms();
        if t < 0 {
            return Err(EventError::NegativeTime(t));
        }
        match self {
            Self::Impression(i) => {
                check_id("request_id", &i.request_id)?;
                check_id("user", &i.user)?;
                check_id("item", &i.item)?;
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
        let w = match self.clone() {
            Self::Impression(i) => Wire {
                ty: "impression".into(),
                request_id: i.request_id,
                time_ms: i.time_ms,
                item: i.item,
                user: Some(i.user),
                features: Some(i.features),
                kind: None,
                value: None,
                traceparent: i.traceparent,
            },
            Self::Action(a) => Wire {
                ty: "action".into(),
                request_id: a.request_id,
                time_ms: a.time_ms,
                item: a.item,
                user: None,
                features: None,
                kind: Some(a.kind),
                value: a.value,
                traceparent: a.traceparent,
            },
        };
        rmp_serde::to_vec_named(&w).expect("events serialise")
    }

    /// Decodes an event. Its feature snapshot stays encoded: [`Self::validate`] checks it,
    /// [`Self::validate_header`] does not.
    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, EventError> {
        let undecodable = |detail: String| EventError::Undecodable {
            format: "msgpack",
            detail,
        };
        let w: Wire = rmp_serde::from_slice(bytes).map_err(|e| undecodable(e.to_string()))?;
        match w.ty.as_str() {
            "impression" => {
                if w.kind.is_some() || w.value.is_some() {
                    return Err(undecodable("an impression has no kind or value".into()));
                }
                Ok(Self::Impression(Impression {
                    request_id: w.request_id,
                    time_ms: w.time_ms,
                    user: w
                        .user
                        .ok_or_else(|| undecodable("missing field `user`".into()))?,
                    item: w.item,
                    features: w.features.unwrap_or_default(),
                    traceparent: w.traceparent,
                }))
            }
            "action" => {
                if w.user.is_some() || w.features.is_some() {
                    return Err(undecodable("an action has no user or features".into()));
                }
                Ok(Self::Action(Action {
                    request_id: w.request_id,
                    item: w.item,
                    time_ms: w.time_ms,
                    kind: w
                        .kind
                        .ok_or_else(|| undecodable("missing field `kind`".into()))?,
                    value: w.value,
                    traceparent: w.traceparent,
                }))
            }
            other => Err(undecodable(format!(
                "unknown event type {other:?}; expected impression or action"
            ))),
        }
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
    pub features: Snapshot,
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
    pub fn to_raw_sample(&self) -> Result<RawSample, EventError> {
        let f = self.features.decode()?;
        Ok(RawSample {
            labels: self.labels.clone(),
            dense: f.dense,
            sparse: f.sparse,
            weight: (self.weight != 1.0).then_some(self.weight),
        })
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
pub(crate) mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
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
            features: Snapshot::encode(&features),
            traceparent: None,
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
        // The msgpack form refuses what the JSON form refuses.
        let mixed = br#"{"type":"impression","request_id":"r","item":"i","user":"u","time_ms":1,"kind":"click"}"#;
        assert!(Event::from_json(mixed).is_err());
        let v: serde_json::Value = serde_json::from_slice(mixed).unwrap();
        let as_msgpack = rmp_serde::to_vec_named(&v).unwrap();
        assert_eq!(
            Event::from_msgpack(&as_msgpack).unwrap_err().kind(),
            "undecodable"
        );
        // A snapshot that is not a features map passes the joiner's header check but not the
        // full one.
        let e = Event::Impression(Impression {
            request_id: "r".into(),
            time_ms: 1,
            user: "u".into(),
            item: "i".into(),
            features: Snapshot(vec![0x93, 1, 2, 3]),
            traceparent: None,
        });
        let back = Event::from_msgpack(&e.to_msgpack()).unwrap();
        back.validate_header().unwrap();
        assert_eq!(back.validate().unwrap_err().kind(), "undecodable");
    }
}
