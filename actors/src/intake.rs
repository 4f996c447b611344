//! Events entering the pipeline from outside: one JSON line each, from `freshet ingest` or
//! `POST /v1/events`.
//!
//! Both doors go through [`admit`], so a line means the same whichever way it came: parsed,
//! validated, routed to the event-log partition of its request (both events of a request land
//! in one partition, so one joiner sees them in order), or refused with the dead letter that
//! keeps it and the reason a person reads. The caller decides when to append and where its
//! dead letters go.

use crate::envelope::TraceContext;
use crate::event::{DeadLetter, Event};
use crate::stream::{partition_of, MAX_RECORD_BYTES};

/// What one input line becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Intake {
    /// Whitespace only: nothing to append, nothing refused.
    Blank,
    /// A valid event, encoded for partition `partition` of the event log.
    Event { partition: u32, record: Vec<u8> },
    /// A refused line.
    Refused(Refusal),
}

/// A line that is not a valid event.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// The line's number in its input, from 1.
    pub line: u64,
    /// The refusal's kind (`undecodable`, `empty_field`, ...), for counting by reason.
    pub reason: &'static str,
    /// What is wrong, for a person.
    pub error: String,
    /// The dead letter that keeps the line, encoded for the dead-letter log.
    pub dead_letter: Vec<u8>,
}

/// The most of a refused line its dead letter keeps. A line can be larger than any record the
/// log takes; its dead letter must still fit, or the refusal itself would fail the batch.
pub const DEAD_LETTER_PAYLOAD_MAX: usize = 64 * 1024;

/// The most of an error's text a dead letter keeps.
const DETAIL_MAX: usize = 4 * 1024;

/// Admits line number `line_no` (from 1) of the input `source` (`ingest:FILE`,
/// `http:/v1/events`), for an event log of `partitions` partitions.
pub fn admit(line: &[u8], line_no: u64, source: &str, partitions: u32) -> Intake {
    admit_traced(line, line_no, source, partitions, None)
}

/// [`admit`] for a line that came in a traced request, whose append span is `trace` (a
/// `traceparent`): an event without a `traceparent` of its own joins that trace. An event's
/// own malformed `traceparent` is dropped and the event kept: trace context is never worth an
/// event, and W3C trace context forbids passing on a header that does not parse.
pub fn admit_traced(
    line: &[u8],
    line_no: u64,
    source: &str,
    partitions: u32,
    trace: Option<&str>,
) -> Intake {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Intake::Blank;
    }
    if line.len() > MAX_RECORD_BYTES {
        // Not parsed at all: no event that large could be appended, and parsing megabytes
        // only to refuse them would let one client's line cost every other client time.
        let error = format!(
            "the line is {} bytes, more than the {MAX_RECORD_BYTES} an event may take",
            line.len()
        );
        return refuse(line, line_no, source, "too_large", error);
    }
    match Event::from_json(line).and_then(|e| e.validate().map(|()| e)) {
        Ok(mut e) => {
            let own = e.traceparent_mut();
            if own
                .as_deref()
                .is_some_and(|t| TraceContext::from_traceparent(t).is_none())
            {
                *own = None;
            }
            if own.is_none() {
                *own = trace.map(str::to_owned);
            }
            let record = e.to_msgpack();
            if record.len() > MAX_RECORD_BYTES {
                let error = format!(
                    "the event encodes to {} bytes, more than the log's record limit of \
                     {MAX_RECORD_BYTES}",
                    record.len()
                );
                return refuse(line, line_no, source, "too_large", error);
            }
            Intake::Event {
                partition: partition_of(e.request_id(), partitions),
                record,
            }
        }
        Err(e) => refuse(line, line_no, source, e.kind(), e.to_string()),
    }
}

/// The refusal of `line`, with a dead letter that fits a record: the line's first
/// [`DEAD_LETTER_PAYLOAD_MAX`] bytes, and its full size in the detail when it was cut.
fn refuse(line: &[u8], line_no: u64, source: &str, reason: &'static str, error: String) -> Intake {
    let mut detail = error.clone();
    truncate_utf8(&mut detail, DETAIL_MAX);
    let payload = if line.len() > DEAD_LETTER_PAYLOAD_MAX {
        detail.push_str(&format!(
            " (the line was {} bytes; its first {DEAD_LETTER_PAYLOAD_MAX} are kept)",
            line.len()
        ));
        line[..DEAD_LETTER_PAYLOAD_MAX].to_vec()
    } else {
        line.to_vec()
    };
    let dead_letter = DeadLetter {
        topic: source.to_owned(),
        partition: 0,
        offset: line_no,
        reason: reason.to_owned(),
        detail,
        payload,
    }
    .to_msgpack();
    Intake::Refused(Refusal {
        line: line_no,
        reason,
        error,
        dead_letter,
    })
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMPRESSION: &[u8] =
        br#"{"type": "impression", "request_id": "r-1", "time_ms": 5, "user": "u", "item": "i"}"#;

    #[test]
    fn a_valid_line_is_routed_by_its_request() {
        let Intake::Event { partition, record } = admit(IMPRESSION, 1, "test", 4) else {
            panic!("a valid impression is admitted");
        };
        assert_eq!(partition, partition_of("r-1", 4));
        let back = Event::from_msgpack(&record).unwrap();
        assert_eq!(back.request_id(), "r-1");
    }

    #[test]
    fn a_traced_request_stamps_its_events_and_a_bad_traceparent_of_their_own_is_dropped() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let own = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let decode = |i: Intake| match i {
            Intake::Event { record, .. } => Event::from_msgpack(&record).unwrap(),
            other => panic!("{other:?}"),
        };
        let plain = br#"{"type":"action","request_id":"r","item":"i","time_ms":1,"kind":"click"}"#;
        assert_eq!(decode(admit(plain, 1, "t", 4)).trace().traceparent, None);
        let stamped = decode(admit_traced(plain, 1, "t", 4, Some(tp)));
        assert_eq!(stamped.trace().traceparent.as_deref(), Some(tp));
        let with_own = format!(
            r#"{{"type":"action","request_id":"r","item":"i","time_ms":1,"kind":"click","traceparent":"{own}"}}"#
        );
        let e = decode(admit_traced(with_own.as_bytes(), 1, "t", 4, Some(tp)));
        assert_eq!(
            e.trace().traceparent.as_deref(),
            Some(own),
            "its own trace wins"
        );
        for bad in [
            "",
            "nonsense",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let line = format!(
                r#"{{"type":"action","request_id":"r","item":"i","time_ms":1,"kind":"click","traceparent":"{bad}"}}"#
            );
            let e = decode(admit(line.as_bytes(), 1, "t", 4));
            assert_eq!(
                e.trace().traceparent,
                None,
                "{bad:?} is dropped, the event kept"
            );
            let e = decode(admit_traced(line.as_bytes(), 1, "t", 4, Some(tp)));
            assert_eq!(e.trace().traceparent.as_deref(), Some(tp), "{bad:?}");
        }
    }

    #[test]
    fn blank_lines_are_neither_events_nor_refusals() {
        assert_eq!(admit(b"", 1, "test", 2), Intake::Blank);
        assert_eq!(admit(b" \t\r", 2, "test", 2), Intake::Blank);
    }

    #[test]
    fn malformed_lines_are_refused_with_their_dead_letter() {
        for (line, reason) in [
            (&b"{not json"[..], "undecodable"),
            (&b"\xff\xfe"[..], "undecodable"),
            (&br#"{"type": "action"}"#[..], "undecodable"),
            (
                &br#"{"type": "impression", "request_id": "", "time_ms": 5, "user": "u", "item": "i"}"#[..],
                "empty_field",
            ),
        ] {
            let Intake::Refused(r) = admit(line, 7, "ingest:x.jsonl", 2) else {
                panic!("{line:?} is refused");
            };
            assert_eq!((r.line, r.reason), (7, reason), "{line:?}: {}", r.error);
            assert!(!r.error.is_empty());
            let d = DeadLetter::from_msgpack(&r.dead_letter).unwrap();
            assert_eq!((d.topic.as_str(), d.offset), ("ingest:x.jsonl", 7));
            assert_eq!((d.reason.as_str(), d.payload.as_slice()), (reason, line));
        }
    }

    #[test]
    fn a_line_too_large_for_a_record_is_refused_with_a_dead_letter_that_fits() {
        // Valid JSON that no record could hold, and garbage of the same size.
        let huge_item = "x".repeat(MAX_RECORD_BYTES);
        let valid = format!(
            r#"{{"type": "impression", "request_id": "r", "time_ms": 5, "user": "u", "item": "{huge_item}"}}"#
        );
        let garbage = vec![b'{'; 2 << 20];
        for line in [valid.as_bytes(), &garbage] {
            let Intake::Refused(r) = admit(line, 3, "http:/v1/events", 4) else {
                panic!("a {}-byte line is refused", line.len());
            };
            assert_eq!(r.reason, "too_large", "{}", r.error);
            assert!(r.error.contains(&line.len().to_string()), "{}", r.error);
            assert!(
                r.dead_letter.len() <= MAX_RECORD_BYTES,
                "{}",
                r.dead_letter.len()
            );
            let d = DeadLetter::from_msgpack(&r.dead_letter).unwrap();
            assert_eq!(d.payload, line[..DEAD_LETTER_PAYLOAD_MAX]);
            assert!(
                d.detail.contains("its first 65536 are kept"),
                "{}",
                d.detail
            );
        }
        // A line at the limit is parsed and refused, and its letter still fits a record.
        let near = vec![b'a'; MAX_RECORD_BYTES];
        let Intake::Refused(r) = admit(&near, 1, "t", 1) else {
            panic!("refused")
        };
        assert_eq!(r.reason, "undecodable");
        assert!(r.dead_letter.len() <= MAX_RECORD_BYTES);
    }
}
