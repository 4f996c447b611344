//! Freshet's components.
//!
//! Every component is a pure, synchronous core (the embedding table, later the joiner state
//! machine and the dense net) wrapped by a thin [`ractor`] actor: a `Msg` enum, `Args`, `State`
//! and a typed handle. The cores know nothing of actors, and the actors know nothing of sockets.
//!
//! The shared vocabulary (feature ids, table names, the message envelope, the key-to-shard
//! function and the stable random numbers) lives here too, because every crate above speaks it.

pub mod ckpt;
pub mod dense;
pub mod embedding;
pub mod envelope;
pub mod event;
pub mod fault;
pub mod gen;
pub mod ids;
pub mod intake;
pub mod joiner;
pub mod metrics;
pub mod online;
pub mod rng;
pub mod routing;
pub mod sample;
pub mod scorer;
pub mod serving;
pub mod shard;
pub mod simulate;
pub mod stream;
pub mod supervisor;
pub mod telemetry;
pub mod testkit;
pub mod topics;
pub mod training;

pub use envelope::{Envelope, TraceContext};
pub use ids::{FeatureId, ShardId, TableName};
pub use routing::shard_of;
