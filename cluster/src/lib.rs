//! Freshet nodes joined over the network: membership, shard placement and remote handles.
//!
//! For now this crate holds shard placement only; node join over TCP (`ractor_cluster`, cookie
//! and TLS) and remote handles arrive with the multi-node work. It depends on `freshet-actors`
//! and never the other way round: the actors know nothing of sockets.

pub mod placement;
