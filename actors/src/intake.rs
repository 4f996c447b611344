//! Events entering the pipeline from outside: one JSON line each, from `freshet ingest` or
//! `POST /v1/events`.
//!
//! Both doors go through [`admit`], so a line means the same whichever way it came: parsed,
//! validated, routed to the event-log partition of its request (both events of a request land
//! in one partition, so one joiner sees them in order), or refused with the dead letter that
//! keeps it and the reason a person reads. The caller decides when to append and where its
//! dead letters go.

use crate::event::{DeadLetter, Event};
use crate::stream::partition_of;

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

/// Admits line number `line_no` (from 1) of the input `source` (`ingest:FILE`,
/// `http:/v1/events`), for an event log of `partitions` partitions.
pub fn admit(line: &[u8], line_no: u64, source: &str, partitions: u32) -> Intake {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Intake::Blank;
    }
    match Event::from_json(line).and_then(|e| e.validate().map(|()| e)) {
        Ok(e) => Intake::Event {
            partition: partition_of(e.request_id(), partitions),
            record: e.to_msgpack(),
        },
        Err(e) => {
            let dead_letter = DeadLetter {
                topic: source.to_owned(),
                partition: 0,
                offset: line_no,
                reason: e.kind().to_owned(),
                detail: e.to_string(),
                payload: line.to_vec(),
            }
            .to_msgpack();
            Intake::Refused(Refusal {
                line: line_no,
                reason: e.kind(),
                error: e.to_string(),
                dead_letter,
            })
        }
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
}
