//! Freshet nodes joined over the network: the wire encoding, membership, shard placement and
//! remote handles.
//!
//! The wire encoding ([`wire`]) says how each actor's messages travel as bytes: the
//! `freshet-actors` crate keeps the message types, and this crate knows how they cross nodes.
//! Node join over TCP (`ractor_cluster`, cookie and TLS) and remote handles build on it. This
//! crate depends on `freshet-actors` and never the other way round: the actors know nothing of
//! sockets or frames.

pub mod membership;
pub mod node;
pub mod placement;
pub mod wire;
