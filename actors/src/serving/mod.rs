//! Serving: the read-only model a replica answers from, and the cell that swaps versions
//! under concurrent readers.
//!
//! Architecture invariant: a predict request reads one whole version. It takes an
//! `Arc<ServingModel>` from the [`ModelCell`] once and scores every candidate with it, while
//! the next version is built in a second copy that no reader can see.

mod cell;
mod model;
pub mod replica;
mod replicas;

pub use cell::{CellStats, ModelCell};
pub use model::{
    Candidate, DenseWeights, ModelDelta, PredictRequest, PredictResponse, ServingModel,
    ServingTable,
};
pub use replicas::{PublishFollower, ReplicaSet};

use thiserror::Error;

use crate::ckpt::CkptError;

#[derive(Debug, Error)]
pub enum ServingError {
    /// The request is malformed or over a limit: the caller's to fix (HTTP 4xx).
    #[error("{0}")]
    BadRequest(String),
    /// A delta that does not follow the version being served.
    #[error("delta {got} has parent {parent:?}, but version {have} is being served")]
    Chain {
        have: u64,
        got: u64,
        parent: Option<u64>,
    },
    /// The model read from the store does not fit together (tables, dims, dense net).
    #[error("model: {0}")]
    Model(String),
    #[error(transparent)]
    Store(#[from] CkptError),
    #[error("no model version is loaded yet")]
    NotLoaded,
}

#[cfg(test)]
mod tests;
