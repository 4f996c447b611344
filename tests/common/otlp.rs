//! The OTLP receiver the suite runs against, and the spans it printed.
//!
//! `scripts/test` starts `rotel-agent` (scripts/otlp-receiver) and passes its OTLP/HTTP base
//! URL in `FRESHET_OTLP_ENDPOINT` and the file it prints received spans to in
//! `FRESHET_OTLP_LOG`. Without them a tracing test fails and says how to start one: a missing
//! receiver must not read as a pass. The receiver is shared by every test of a run, so a test
//! picks its own spans by trace id or by its nodes' `service.instance.id`.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The receiver's base URL and its span log.
pub(crate) fn receiver() -> (String, PathBuf) {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!(
                "{k} is not set: run the suite with `scripts/test`, which starts an OTLP \
                 receiver (scripts/otlp-receiver start), or set FRESHET_OTLP_ENDPOINT and \
                 FRESHET_OTLP_LOG to a running one"
            )
        })
    };
    (
        var("FRESHET_OTLP_ENDPOINT"),
        PathBuf::from(var("FRESHET_OTLP_LOG")),
    )
}

/// One received span, as the receiver printed it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Span {
    pub(crate) trace_id: String,
    pub(crate) span_id: String,
    /// Empty for a root span.
    pub(crate) parent_id: String,
    pub(crate) name: String,
    /// `SPAN_KIND_SERVER`, ...
    pub(crate) kind: String,
    pub(crate) attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub(crate) links: Vec<(String, String)>,
    /// The resource's `service.instance.id` and `service.name`.
    pub(crate) instance: String,
    pub(crate) service: String,
    pub(crate) roles: String,
}

impl Span {
    pub(crate) fn attr(&self, k: &str) -> Option<&str> {
        self.attributes.get(k).map(String::as_str)
    }
}

/// `Str(x)`, `Int(5)`, `Bool(true)`, `Double(0.5)` as the text inside.
fn value(v: &str) -> String {
    for p in ["Str(", "Int(", "Bool(", "Double("] {
        if let Some(inner) = v.strip_prefix(p).and_then(|r| r.strip_suffix(')')) {
            return inner.to_owned();
        }
    }
    v.to_owned()
}

#[derive(PartialEq)]
enum In {
    Resource,
    Span,
    Attributes,
    Events,
    Links,
}

/// Every complete span in the receiver's log so far. The last one printed is left for a later
/// read: its attributes may not all be in yet.
pub(crate) fn spans(log: &std::path::Path) -> Vec<Span> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = Vec::new();
    let mut resource: BTreeMap<String, String> = BTreeMap::new();
    let mut cur: Option<Span> = None;
    let mut at = In::Resource;
    let mut finish = |cur: &mut Option<Span>, resource: &BTreeMap<String, String>| {
        if let Some(mut s) = cur.take() {
            if !s.trace_id.is_empty() && !s.span_id.is_empty() && !s.name.is_empty() {
                let get = |k: &str| resource.get(k).cloned().unwrap_or_default();
                s.instance = get("service.instance.id");
                s.service = get("service.name");
                s.roles = get("freshet.node.roles");
                out.push(s);
            }
        }
    };
    let lines: Vec<&str> = text.lines().collect();
    // The last line may be half written.
    let complete = if text.ends_with('\n') {
        lines.len()
    } else {
        lines.len().saturating_sub(1)
    };
    for line in &lines[..complete] {
        let t = line.trim();
        if t.starts_with("ResourceSpans #") {
            finish(&mut cur, &resource);
            resource.clear();
            at = In::Resource;
        } else if t.starts_with("ScopeSpans #") {
            finish(&mut cur, &resource);
        } else if t.starts_with("Span #") {
            finish(&mut cur, &resource);
            cur = Some(Span::default());
            at = In::Span;
        } else if t == "Attributes:" {
            at = In::Attributes;
        } else if t == "Events:" {
            at = In::Events;
        } else if t == "Links:" {
            at = In::Links;
        } else if let Some(kv) = t.strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            match (&at, cur.as_mut()) {
                (In::Resource, _) => {
                    resource.insert(k.to_owned(), value(v));
                }
                (In::Attributes, Some(s)) => {
                    s.attributes.insert(k.to_owned(), value(v));
                }
                (In::Links, Some(s)) => match k {
                    "Trace ID" => s.links.push((v.to_owned(), String::new())),
                    "ID" => {
                        if let Some(l) = s.links.last_mut() {
                            l.1 = v.to_owned();
                        }
                    }
                    _ => {}
                },
                _ => {}
            }
        } else if let (Some(s), Some((k, v))) = (cur.as_mut(), t.split_once(':')) {
            if at != In::Span {
                continue;
            }
            let v = v.trim().to_owned();
            match k.trim() {
                "Trace ID" => s.trace_id = v,
                "Parent ID" => s.parent_id = v,
                "ID" => s.span_id = v,
                "Name" => s.name = v,
                "Kind" => s.kind = v,
                _ => {}
            }
        }
    }
    // The last span may still be being printed: it is read once another follows it.
    drop(cur);
    out
}
