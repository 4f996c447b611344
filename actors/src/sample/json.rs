//! JSON lines and msgpack samples, both against the schema.
//!
//! One sample is a map:
//! ```json
//! {"labels": {"click": 1}, "dense": {"I1": 0.5}, "weight": 1.0,
//!  "sparse": {"C1": "a9b8", "C2": ["x", "y"], "C3": {"values": ["u", 7], "weights": [1.0, 0.5]}}}
//! ```
//! - every schema label is required, with a value in `[0, 1]`;
//! - a dense feature may be left out (missing: 0), and is used as given (no transform);
//! - a sparse field is one value, a list (multi-hot) or values with weights, and may be left
//!   out (empty). Strings and integers are both feature *values*: an integer is hashed as its
//!   decimal string, so `7` and `"7"` are the same feature, whichever way a producer wrote it;
//! - `weight` defaults to 1 and carries negative-downsampling correction.
//!
//! Unknown names are refused rather than ignored: a typo in a producer would otherwise silently
//! train the model without that feature.

use std::collections::BTreeMap;
use std::io::BufRead;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::criteo::check_value;
use super::hash::salted_id;
use super::{RejectReason, RejectSink, SampleBlock, Schema};

/// One sample as JSON or msgpack carries it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSample {
    pub labels: BTreeMap<String, f64>,
    #[serde(default)]
    pub dense: BTreeMap<String, f64>,
    #[serde(default)]
    pub sparse: BTreeMap<String, RawField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// A sparse field's values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawField {
    One(RawValue),
    Many(Vec<RawValue>),
    Weighted {
        values: Vec<RawValue>,
        weights: Vec<f64>,
    },
}

/// A feature value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RawValue {
    Int(u64),
    Str(String),
}

/// Turns raw samples into block rows against a schema.
#[derive(Debug)]
pub struct SampleDecoder {
    schema: Schema,
    salts: Vec<u64>,
}

impl SampleDecoder {
    pub fn new(schema: &Schema) -> Self {
        Self {
            salts: schema.salts(),
            schema: schema.clone(),
        }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Checks `raw` against the schema and appends it. On error the block is unchanged.
    pub fn push(&self, raw: &RawSample, block: &mut SampleBlock) -> Result<(), RejectReason> {
        let s = &self.schema;
        for name in raw.labels.keys() {
            if !s.labels.contains(name) {
                return Err(RejectReason::UnknownColumn(name.clone()));
            }
        }
        for name in raw.dense.keys() {
            if !s.dense.contains(name) {
                return Err(RejectReason::UnknownColumn(name.clone()));
            }
        }
        let mut fields: Vec<Option<&RawField>> = vec![None; s.fields.len()];
        for (name, f) in &raw.sparse {
            let i = s
                .field_index(name)
                .ok_or_else(|| RejectReason::UnknownColumn(name.clone()))?;
            fields[i] = Some(f);
        }
        let weight = raw.weight.unwrap_or(1.0);
        if !(weight.is_finite() && weight > 0.0) {
            return Err(RejectReason::BadWeight(weight));
        }
        let mark = block.mark();
        let result = self.push_checked(raw, &fields, weight, block);
        if result.is_err() {
            block.rollback(mark);
        }
        result
    }

    fn push_checked(
        &self,
        raw: &RawSample,
        fields: &[Option<&RawField>],
        weight: f64,
        block: &mut SampleBlock,
    ) -> Result<(), RejectReason> {
        let s = &self.schema;
        for name in &s.labels {
            let v = *raw
                .labels
                .get(name)
                .ok_or_else(|| RejectReason::MissingLabel(name.clone()))?;
            if !(0.0..=1.0).contains(&v) {
                return Err(RejectReason::BadLabel {
                    column: name.clone(),
                    value: v.to_string(),
                });
            }
            block.push_label(v as f32);
        }
        for name in &s.dense {
            let v = raw.dense.get(name).copied().unwrap_or(0.0);
            block.push_dense(check_value(v, name)? as f32);
        }
        let mut buf = String::new();
        for (i, f) in fields.iter().enumerate() {
            let salt = self.salts[i];
            let mut push = |v: &RawValue, w: f64, block: &mut SampleBlock| {
                let bytes = match v {
                    RawValue::Str(s) => s.as_bytes(),
                    RawValue::Int(n) => {
                        buf.clear();
                        use std::fmt::Write;
                        let _ = write!(buf, "{n}");
                        buf.as_bytes()
                    }
                };
                block.push_id(salted_id(salt, bytes), w as f32);
            };
            match f {
                None => {}
                Some(RawField::One(v)) => push(v, 1.0, block),
                Some(RawField::Many(vs)) => vs.iter().for_each(|v| push(v, 1.0, block)),
                Some(RawField::Weighted { values, weights }) => {
                    let name = &s.fields[i].name;
                    if values.len() != weights.len() {
                        return Err(RejectReason::WeightCount {
                            field: name.clone(),
                            ids: values.len(),
                            weights: weights.len(),
                        });
                    }
                    for (v, &w) in values.iter().zip(weights) {
                        push(v, check_value(w, name)?, block);
                    }
                }
            }
            block.end_field();
        }
        block.end_row(weight as f32);
        Ok(())
    }

    /// Parses one JSON line into `block`.
    pub fn push_json(&self, line: &[u8], block: &mut SampleBlock) -> Result<(), RejectReason> {
        let raw: RawSample = serde_json::from_slice(line)
            .map_err(|e| RejectReason::Malformed(format!("json: {e}")))?;
        self.push(&raw, block)
    }

    /// Parses one msgpack-encoded sample into `block`.
    pub fn push_msgpack(&self, record: &[u8], block: &mut SampleBlock) -> Result<(), RejectReason> {
        let raw: RawSample = rmp_serde::from_slice(record)
            .map_err(|e| RejectReason::Malformed(format!("msgpack: {e}")))?;
        self.push(&raw, block)
    }
}

/// Reads JSON lines into `block`; blank lines are skipped. Returns the lines read.
pub fn read_jsonl(
    decoder: &SampleDecoder,
    mut input: impl BufRead,
    block: &mut SampleBlock,
    rejects: &mut RejectSink,
    max_rows: Option<usize>,
) -> anyhow::Result<u64> {
    let mut line = Vec::new();
    let mut line_no = 0u64;
    while max_rows.is_none_or(|m| block.len() < m) {
        line.clear();
        if input
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading line {}", line_no + 1))?
            == 0
        {
            break;
        }
        line_no += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Err(reason) = decoder.push_json(&line, block) {
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            rejects.reject(line_no, &reason, body)?;
        }
    }
    Ok(line_no)
}

/// Reads a stream of concatenated msgpack samples into `block`. Returns the records read.
///
/// A record that is valid msgpack but not a valid sample is refused and the stream goes on.
/// Bytes that are not msgpack at all leave no way to find the next record boundary, so the
/// rest of the stream is refused as one record, named by its byte offset.
pub fn read_msgpack(
    decoder: &SampleDecoder,
    data: &[u8],
    block: &mut SampleBlock,
    rejects: &mut RejectSink,
    max_rows: Option<usize>,
) -> anyhow::Result<u64> {
    let mut rest = data;
    let mut record = 0u64;
    while !rest.is_empty() && max_rows.is_none_or(|m| block.len() < m) {
        record += 1;
        let before = rest;
        let mut cursor = rest;
        let framed = {
            let mut de = rmp_serde::Deserializer::new(&mut cursor);
            serde::de::IgnoredAny::deserialize(&mut de)
        };
        match framed {
            Ok(_) => {
                let used = before.len() - cursor.len();
                let bytes = &before[..used];
                rest = cursor;
                if let Err(reason) = decoder.push_msgpack(bytes, block) {
                    rejects.reject(record, &reason, bytes)?;
                }
            }
            Err(e) => {
                let offset = data.len() - before.len();
                let reason = RejectReason::Malformed(format!(
                    "msgpack framing lost at byte {offset}: {e}; {} bytes skipped",
                    before.len()
                ));
                rejects.reject(record, &reason, before)?;
                break;
            }
        }
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Xoshiro256;
    use crate::sample::feature_id;

    fn small_schema() -> Schema {
        let mut s = Schema::criteo(8);
        s.labels = vec!["click".into(), "conversion".into()];
        s.dense.truncate(2);
        s.fields.truncate(3);
        s
    }

    #[test]
    fn decodes_every_field_shape() {
        let d = SampleDecoder::new(&small_schema());
        let mut b = SampleBlock::for_schema(d.schema());
        let line = br#"{"labels":{"click":1,"conversion":0},"dense":{"I2":2.5},"weight":4,
            "sparse":{"C1":"a","C2":["x",7],"C3":{"values":["u"],"weights":[0.5]}}}"#;
        d.push_json(line, &mut b).unwrap();
        let r = b.row(0);
        assert_eq!(r.labels(), &[1.0, 0.0]);
        assert_eq!(r.dense(), &[0.0, 2.5]);
        assert_eq!(r.weight(), 4.0);
        assert_eq!(r.field(0).0, &[feature_id("C1", "a")]);
        assert_eq!(
            r.field(1).0,
            &[feature_id("C2", "x"), feature_id("C2", "7")]
        );
        assert_eq!(r.field(2), (&[feature_id("C3", "u")][..], &[0.5f32][..]));
    }

    #[test]
    fn refuses_bad_samples_with_a_reason() {
        let d = SampleDecoder::new(&small_schema());
        let mut b = SampleBlock::for_schema(d.schema());
        let cases: &[(&str, &str)] = &[
            ("not json", "malformed"),
            (r#"{"labels":{"click":1}}"#, "missing_label"),
            (r#"{"labels":{"click":2,"conversion":0}}"#, "bad_label"),
            (
                r#"{"labels":{"click":1,"conversion":0,"x":1}}"#,
                "unknown_column",
            ),
            (
                r#"{"labels":{"click":1,"conversion":0},"dense":{"Q":1}}"#,
                "unknown_column",
            ),
            (
                r#"{"labels":{"click":1,"conversion":0},"dense":{"I1":1e300}}"#,
                "magnitude",
            ),
            (
                r#"{"labels":{"click":1,"conversion":0},"sparse":{"C9":"a"}}"#,
                "unknown_column",
            ),
            (
                r#"{"labels":{"click":1,"conversion":0},"weight":0}"#,
                "bad_weight",
            ),
            (
                r#"{"labels":{"click":1,"conversion":0},"sparse":{"C1":{"values":["a"],"weights":[]}}}"#,
                "weight_count",
            ),
            (
                r#"{"labels":{"click":1,"conversion":0},"extra":1}"#,
                "malformed",
            ),
            (
                r#"{"labels":{"click":1,"conversion":0},"sparse":{"C1":[[1]]}}"#,
                "malformed",
            ),
        ];
        for (line, kind) in cases {
            let e = d.push_json(line.as_bytes(), &mut b).unwrap_err();
            assert_eq!(e.kind(), *kind, "{line}: {e}");
        }
        assert!(b.is_empty());
    }

    #[test]
    fn msgpack_stream_recovers_from_bad_records() {
        let d = SampleDecoder::new(&small_schema());
        let mut raw = RawSample::default();
        raw.labels.insert("click".into(), 1.0);
        raw.labels.insert("conversion".into(), 0.0);
        raw.sparse
            .insert("C2".into(), RawField::One(RawValue::Int(7)));
        let good = rmp_serde::to_vec_named(&raw).unwrap();
        let mut bad = raw.clone();
        bad.labels.remove("conversion");
        let mut data = good.clone();
        data.extend(rmp_serde::to_vec_named(&bad).unwrap());
        data.extend(&good);
        data.extend([0xc1, 0x00, 0x01]); // 0xc1 is never used in msgpack
        let mut b = SampleBlock::for_schema(d.schema());
        let mut sink = RejectSink::counting();
        let n = read_msgpack(&d, &data, &mut b, &mut sink, None).unwrap();
        assert_eq!((n, b.len(), sink.stats().total), (4, 2, 2));
        assert_eq!(b.row(1).field(1).0, &[feature_id("C2", "7")]);
        assert_eq!(sink.stats().by_reason["missing_label"], 1);
        assert_eq!(sink.stats().by_reason["malformed"], 1);
    }

    /// Random byte mutations of valid JSON and msgpack samples never panic, and every input is
    /// accepted or refused.
    #[test]
    fn fuzzed_samples_never_panic() {
        let seed = crate::testkit::seed("json_msgpack_fuzz");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let d = SampleDecoder::new(&small_schema());
        let line = br#"{"labels":{"click":1,"conversion":0},"dense":{"I2":2.5},"sparse":{"C1":"a","C2":["x",7],"C3":{"values":["u"],"weights":[0.5]}}}"#;
        let mut raw = RawSample::default();
        raw.labels.insert("click".into(), 0.0);
        raw.labels.insert("conversion".into(), 1.0);
        raw.dense.insert("I1".into(), 3.0);
        raw.sparse
            .insert("C3".into(), RawField::Many(vec![RawValue::Str("z".into())]));
        let mp = rmp_serde::to_vec_named(&raw).unwrap();
        let mut b = SampleBlock::for_schema(d.schema());
        let (mut ok, mut refused) = (0, 0);
        for i in 0..4000 {
            let mut bytes = if i % 2 == 0 {
                line.to_vec()
            } else {
                mp.clone()
            };
            for _ in 0..1 + rng.below(3) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.below(bytes.len() as u64) as usize;
                match rng.below(3) {
                    0 => bytes[at] = rng.next_u64() as u8,
                    1 => bytes.truncate(at),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let r = if i % 2 == 0 {
                d.push_json(&bytes, &mut b)
            } else {
                d.push_msgpack(&bytes, &mut b)
            };
            match r {
                Ok(()) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        assert_eq!(b.len(), ok, "seed {seed}");
        assert!(refused > 0, "seed {seed}");
        for r in b.rows() {
            assert!(r.dense().iter().all(|x| x.is_finite()), "seed {seed}");
            assert!(r.labels().iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }
}
