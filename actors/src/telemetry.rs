//! Spans for the message flows, and the trace context they carry between actors and nodes.
//!
//! Every span of a flow is a `tracing` span of target [`TARGET`]. The composition root turns
//! them into OpenTelemetry spans (`tracing-opentelemetry`) and exports them; nothing here
//! knows about an exporter. Until the root calls [`set_enabled`], [`enabled`] is false and no
//! flow creates a span at all: the cost of tracing off is one relaxed load per message.
//!
//! A hop hands its span's context on in the message's [`Envelope`](crate::envelope::Envelope)
//! ([`context_of`]); the receiver, on this node or another, makes its span a child of it
//! ([`continue_from`]).

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::TraceContext;

/// The `tracing` target of every flow span; the exporter's layer listens to it alone, and the
/// log layer ignores it.
pub const TARGET: &str = "freshet::flow";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: when not, flows create none.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns flow spans on or off, once the exporter's layer is (or is no longer) installed.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The OpenTelemetry span context `trace` names, if it names one.
pub fn span_context(trace: &TraceContext) -> Option<SpanContext> {
    let tp = trace.traceparent.as_deref()?;
    let mut parts = tp.split('-');
    let (_version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = trace
        .tracestate
        .as_deref()
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        state,
    );
    sc.is_valid().then_some(sc)
}

/// The context of `span` as the two headers, for the next hop's envelope; none when `span`
/// is disabled or its context is invalid.
pub fn context_of(span: &tracing::Span) -> TraceContext {
    if span.is_disabled() {
        return TraceContext::none();
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return TraceContext::none();
    }
    let state = sc.trace_state().header();
    TraceContext {
        traceparent: Some(format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )),
        tracestate: (!state.is_empty()).then_some(state),
    }
}

/// Makes `span` a child of `trace`'s span, which may be on another node. Must come before
/// anything reads `span`'s context: a started span's parent is fixed.
pub fn continue_from(span: &tracing::Span, trace: &TraceContext) {
    if span.is_disabled() {
        return;
    }
    if let Some(sc) = span_context(trace) {
        // Fails only when no OpenTelemetry layer is installed, and then nothing is exported.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// The span of a message received with `trace`, made by `make` only when the sender's span is
/// sampled (so an unsampled flow costs its receivers nothing), and continuing it.
pub fn received(trace: &TraceContext, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !enabled() || !trace.is_sampled() {
        return tracing::Span::none();
    }
    let span = make();
    continue_from(&span, trace);
    span
}

/// A child of `parent` made by `make` (a span with `parent: None`), only when `parent` is
/// sampled. The child takes `parent`'s context rather than a reference to it, so `parent` ends
/// when its own work does, not when its last child does (a step's push is still being applied
/// when the step is over).
pub fn child_of(parent: &tracing::Span, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !is_sampled(parent) {
        return tracing::Span::none();
    }
    let span = make();
    if !span.is_disabled() {
        let _ = span.set_parent(parent.context());
    }
    span
}

/// Links `span` to `trace`'s span (another flow's: a sample to its impression's request).
pub fn link_to(span: &tracing::Span, trace: &TraceContext) {
    if span.is_disabled() {
        return;
    }
    if let Some(sc) = span_context(trace) {
        span.add_link(sc);
    }
}

/// Whether `span` will be exported: a flow asks before making its children, so that an
/// unsampled training step costs no shard spans.
pub fn is_sampled(span: &tracing::Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// Sets an attribute on `span` after its creation (a verdict, the bytes written).
pub fn set_attribute(
    span: &tracing::Span,
    key: &'static str,
    value: impl Into<opentelemetry::Value>,
) {
    if !span.is_disabled() {
        span.set_attribute(key, value);
    }
}

/// Adds an event to `span` (a restart, a rollback) with its attributes.
pub fn add_event(
    span: &tracing::Span,
    name: &'static str,
    attributes: Vec<(&'static str, String)>,
) {
    if !span.is_disabled() {
        span.add_event(
            name,
            attributes
                .into_iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k, v))
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_becomes_a_remote_span_context_and_back() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = TraceContext::from_headers(Some(tp), Some("congo=t61rcWkgMzE"));
        let sc = span_context(&trace).expect("a valid context");
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            ),
            tp
        );
        assert_eq!(sc.trace_state().header(), "congo=t61rcWkgMzE");
        assert!(span_context(&TraceContext::none()).is_none());
        let unsampled = TraceContext::from_headers(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            None,
        );
        assert!(!span_context(&unsampled).expect("valid").is_sampled());
    }

    #[test]
    fn without_a_subscriber_spans_carry_no_context() {
        // No OpenTelemetry layer here: a span gives no context to send on, and continuing or
        // linking it is a no-op rather than a panic.
        let span = tracing::info_span!(target: TARGET, "test.flow");
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        continue_from(&span, &TraceContext::from_headers(Some(tp), None));
        link_to(&span, &TraceContext::from_headers(Some(tp), None));
        assert_eq!(context_of(&span), TraceContext::none());
        assert!(!is_sampled(&span));
    }
}
