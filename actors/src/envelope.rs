//! The envelope every actor message travels in.
//!
//! `ractor_cluster` carries message bodies between nodes but not tracing context, so Freshet
//! carries W3C trace context itself, inside every message. The slot exists from the first
//! message type on, so that turning tracing on later changes no message's shape.

use serde::{Deserialize, Serialize};

/// W3C trace context (<https://www.w3.org/TR/trace-context/>), as the two header values.
///
/// Both are kept as the exact strings of the headers, so that a hop which does not understand
/// a vendor's `tracestate` still forwards it untouched, as the recommendation requires.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
    pub traceparent: Option<String>,
    /// `tracestate`: vendor-specific key/value list, forwarded as is.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// No trace: the message starts no span and continues none.
    pub const fn none() -> Self {
        Self {
            traceparent: None,
            tracestate: None,
        }
    }

    /// A context from a `traceparent` header value, if it is well formed.
    ///
    /// A malformed header is dropped rather than forwarded: the recommendation says a receiver
    /// must not propagate a `traceparent` it cannot parse.
    pub fn from_traceparent(value: &str) -> Option<Self> {
        is_valid_traceparent(value).then(|| Self {
            traceparent: Some(value.to_owned()),
            tracestate: None,
        })
    }

    /// A context from the two header values, as an HTTP request or a propagator's injector
    /// gives them: a malformed `traceparent` gives no context at all, and an empty or blank
    /// `tracestate` is none (an injector writes `""` when there is no vendor state).
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        let Some(mut ctx) = traceparent.and_then(Self::from_traceparent) else {
            return Self::none();
        };
        ctx.tracestate = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        ctx
    }

    pub fn is_sampled(&self) -> bool {
        self.traceparent
            .as_deref()
            .and_then(|tp| tp.rsplit('-').next())
            .and_then(|flags| u8::from_str_radix(flags, 16).ok())
            .is_some_and(|flags| flags & 1 == 1)
    }
}

fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    // Lower case only: W3C trace context forbids upper-case hex, and OpenTelemetry's
    // extractor rejects it, so a context accepted here is one every hop after accepts.
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(lower_hex);
    parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// A message body with its trace context.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub trace: TraceContext,
    pub body: T,
}

// Every actor's mailbox takes an `Envelope`. With ractor's `cluster` feature on (the
// `freshet-cluster` crate needs it) ractor implements `Message` only for types that say how
// they serialise; an envelope never crosses nodes as a ractor message (the cluster crate
// sends Freshet's own frames instead), so it keeps the defaults: local only.
impl<T: Send + 'static> ractor::Message for Envelope<T> {}

impl<T> Envelope<T> {
    /// A body sent outside any trace.
    pub fn new(body: T) -> Self {
        Self {
            trace: TraceContext::none(),
            body,
        }
    }

    pub fn with_trace(trace: TraceContext, body: T) -> Self {
        Self { trace, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing_accepts_spec_example_and_rejects_garbage() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::from_traceparent(ok).expect("spec example parses");
        assert!(ctx.is_sampled());
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!TraceContext::from_traceparent(unsampled)
            .unwrap()
            .is_sampled());
        for bad in [
            "",
            "00",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                TraceContext::from_traceparent(bad).is_none(),
                "{bad:?} accepted"
            );
        }
        assert!(!TraceContext::none().is_sampled());
    }

    #[test]
    fn an_empty_tracestate_is_none_and_a_bad_traceparent_drops_the_state_too() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for empty in [None, Some(""), Some("  ")] {
            let ctx = TraceContext::from_headers(Some(tp), empty);
            assert_eq!(ctx.traceparent.as_deref(), Some(tp));
            assert_eq!(ctx.tracestate, None, "{empty:?}");
        }
        let ctx = TraceContext::from_headers(Some(tp), Some("congo=t61rcWkgMzE"));
        assert_eq!(ctx.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        // State without a parent it belongs to is not forwarded.
        let upper = tp.to_uppercase();
        for bad in [None, Some("garbage"), Some(upper.as_str())] {
            let ctx = TraceContext::from_headers(bad, Some("congo=t61rcWkgMzE"));
            assert_eq!(ctx, TraceContext::none(), "{bad:?}");
        }
    }
}
