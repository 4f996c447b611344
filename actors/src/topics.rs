//! The pipeline's three topics (events, samples, dead letters), opened together on the
//! configured backend.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::event::{DEAD_LETTERS_TOPIC, EVENTS_TOPIC, SAMPLES_TOPIC};
use crate::stream::{open_topic, LogBackend, LogConfig, StreamLog};

/// The three topics of the pipeline, opened.
#[derive(Clone, Debug)]
pub struct Topics {
    pub events: Arc<dyn StreamLog>,
    pub samples: Arc<dyn StreamLog>,
    pub dead_letters: Arc<dyn StreamLog>,
}

/// Opens the pipeline's topics under `root` (the embedded log) or on the configured Kafka
/// cluster.
pub fn open_topics(root: &Path, cfg: &LogConfig) -> anyhow::Result<Topics> {
    let open = |t: &str| -> anyhow::Result<Arc<dyn StreamLog>> {
        open_topic(root, t, cfg).with_context(|| topic_context(t, root, cfg))
    };
    Ok(Topics {
        events: open(EVENTS_TOPIC)?,
        samples: open(SAMPLES_TOPIC)?,
        dead_letters: open(DEAD_LETTERS_TOPIC)?,
    })
}

/// What opening `topic` was: where, on which backend. An error's context.
pub fn topic_context(topic: &str, root: &Path, cfg: &LogConfig) -> String {
    match cfg.backend {
        LogBackend::Embedded => format!("opening topic {topic} under {}", root.display()),
        LogBackend::Kafka => format!("opening topic {topic} on Kafka at {}", cfg.kafka.brokers),
    }
}
