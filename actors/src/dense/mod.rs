//! The dense network: hand-written layers on `gemm`, the model zoo and the dense optimizers.
//!
//! Everything here is synchronous, single-owner Rust. The trainer feeds a batch's pooled
//! embeddings and dense features in, and reads back the gradients it pushes to the shards.

pub mod diff;
pub mod gemm;
pub mod layers;
mod model;
pub mod optim;

pub use diff::{DenseDiff, DenseUpdate, DiffError};
pub use gemm::Threads;
pub use model::{
    DenseNet, DenseState, InputShape, ModelConfig, ModelKind, PendingUpdate, StepLoss, UnknownModel,
};
pub use optim::{DenseOptimizer, DenseOptimizerConfig};
