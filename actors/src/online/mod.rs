//! The online pipeline on one node: live samples train the model continuously, versions are
//! served at once and validated, and a version that fails is withdrawn (or, as a mode, served
//! only once it passes).
//!
//! - [`crate::training::online`]: the trainer actor: pulls batches from the sample log,
//!   trains through the ShardOwners, and captures versions with the offsets they contain.
//! - [`gate`] and [`validator`]: the Validator actor scores each new version on the samples
//!   that arrive after it (test-then-train), publishes it and withdraws it if it fails.
//! - [`pipeline`]: the node's supervisor children and the commands that restart them with new
//!   state: rollback, replay, calibration.

pub mod gate;
pub mod pipeline;
pub mod validator;
