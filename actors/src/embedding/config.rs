//! Per-table configuration: dim, initializer, optimizer, admission, eviction and tiering.
//!
//! These types deserialize straight from `freshet.toml` (`[embedding.tables.<name>]`), so the
//! names here are the names users write.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A configuration value that was refused, with the key, the value and what was expected.
#[derive(Debug, Clone, Error, PartialEq)]
#[error("invalid value {value} for `{key}`: expected {expected}")]
pub struct InvalidValue {
    pub key: String,
    pub value: String,
    pub expected: String,
}

impl InvalidValue {
    pub fn new(key: impl Into<String>, value: impl ToString, expected: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// How a new row's weights start. Deterministic per (seed, table, key): the same key starts
/// from the same row whatever the order of arrival or the shard it lands on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Initializer {
    Zeros,
    /// Uniform in `[-scale, scale)`.
    Uniform {
        scale: f32,
    },
    /// Normal with the given mean and standard deviation.
    Normal {
        #[serde(default)]
        mean: f32,
        std: f32,
    },
}

impl Default for Initializer {
    fn default() -> Self {
        Self::Uniform { scale: 0.01 }
    }
}

/// The sparse optimizer. Each row keeps its own state beside its weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    Sgd {
        lr: f32,
    },
    Adagrad {
        lr: f32,
        #[serde(default = "default_initial_accumulator")]
        initial_accumulator: f32,
        #[serde(default = "default_adagrad_eps")]
        eps: f32,
    },
    /// Lazy (per-row) Adam: each row counts its own steps for bias correction, as sparse Adam
    /// does in TensorFlow and PyTorch, because a row updated once in a thousand steps must not
    /// be bias-corrected as if it had seen them all.
    Adam {
        lr: f32,
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        #[serde(default = "default_adam_eps")]
        eps: f32,
    },
    /// FTRL-Proximal (McMahan et al. 2013), learning-rate power -0.5.
    Ftrl {
        alpha: f32,
        #[serde(default = "default_ftrl_beta")]
        beta: f32,
        #[serde(default)]
        l1: f32,
        #[serde(default)]
        l2: f32,
    },
}

pub(crate) fn default_initial_accumulator() -> f32 {
    0.1
}
pub(crate) fn default_adagrad_eps() -> f32 {
    1e-10
}
pub(crate) fn default_beta1() -> f32 {
    0.9
}
pub(crate) fn default_beta2() -> f32 {
    0.999
}
pub(crate) fn default_adam_eps() -> f32 {
    1e-8
}
fn default_ftrl_beta() -> f32 {
    1.0
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::Adagrad {
            lr: 0.05,
            initial_accumulator: default_initial_accumulator(),
            eps: default_adagrad_eps(),
        }
    }
}

impl OptimizerConfig {
    /// Floats of optimizer state per row, beside the `dim` weights.
    pub fn state_floats(&self, dim: usize) -> usize {
        match self {
            Self::Sgd { .. } => 0,
            Self::Adagrad { .. } => dim,
            // m, v, and the two running beta powers.
            Self::Adam { .. } => 2 * dim + 2,
            // z and n.
            Self::Ftrl { .. } => 2 * dim,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "sgd",
            Self::Adagrad { .. } => "adagrad",
            Self::Adam { .. } => "adam",
            Self::Ftrl { .. } => "ftrl",
        }
    }
}

/// When a key that has never been seen gets a row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdmissionConfig {
    /// Every key gets a row on first training lookup.
    #[default]
    None,
    /// Exact counts of keys not yet admitted; admitted on the `min_count`-th occurrence.
    Counter { min_count: u32 },
    /// A counting Bloom filter with 8-bit counters and conservative update. Memory is fixed by
    /// `expected_keys` and `false_positive_rate`; a key may be admitted early with about that
    /// probability.
    CountingBloom {
        min_count: u32,
        false_positive_rate: f64,
        expected_keys: u64,
    },
    /// Each occurrence of a key not yet admitted admits it with probability `p`.
    Probability { p: f64 },
}

/// Which row a capacity limit evicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CapacityPolicy {
    /// Least recently accessed.
    #[default]
    Lru,
    /// Least frequently accessed.
    Lfu,
}

/// Eviction rules; any combination applies. All are amortised over training calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvictionConfig {
    /// Evict a row not updated for more than this many training steps.
    pub max_idle_steps: Option<u64>,
    /// Evict a row not updated for more than this many seconds.
    pub max_idle_secs: Option<u64>,
    /// Keep at most this many rows in this shard's table.
    pub capacity: Option<u64>,
    pub capacity_policy: CapacityPolicy,
    /// Evict a row whose weight L2 norm falls below this after an update (FTRL's zeros).
    pub min_l2_norm: Option<f32>,
    /// Rows the idle sweep examines per training call. A table of R rows is swept fully every
    /// R / sweep_rows_per_call calls, so that is how late an idle row may be evicted.
    pub sweep_rows_per_call: u32,
    /// Rows sampled per capacity eviction (Redis-style approximate LRU/LFU).
    pub sample_size: u32,
    /// Tombstones kept for `changes_since`; beyond this the oldest are forgotten and a delta
    /// from before them needs a full snapshot instead.
    pub max_tombstones: u64,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        Self {
            max_idle_steps: None,
            max_idle_secs: None,
            capacity: None,
            capacity_policy: CapacityPolicy::Lru,
            min_l2_norm: None,
            sweep_rows_per_call: 1024,
            sample_size: 8,
            max_tombstones: 1 << 20,
        }
    }
}

/// One embedding table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TableConfig {
    pub dim: usize,
    pub init: Initializer,
    pub optimizer: OptimizerConfig,
    pub admission: AdmissionConfig,
    pub eviction: EvictionConfig,
    /// Every element of the row a key reads as before it is admitted.
    pub default_value: f32,
    /// Seeds the initializer and the table's sampling decisions; the table name is mixed in.
    pub seed: u64,
    /// DRAM budget for this table's rows in one shard. Rows beyond it spill to the shard's
    /// on-disk tier. `None`: everything stays in DRAM.
    pub dram_budget_bytes: Option<u64>,
    /// Rows to make room for in one shard when the table is created: the index, the row
    /// metadata and the DRAM rows (up to the DRAM budget) for that many rows are allocated
    /// and faulted in up front. The table still grows past it on demand. 0: grow from empty.
    ///
    /// Why: a table that fills during training otherwise pays, in the training step, for
    /// every page of memory it touches for the first time and for each doubling of its index,
    /// which slows a run measurably where fresh memory is slow (`docs/design-notes.md`).
    pub reserve_rows: u64,
}

impl Default for TableConfig {
    fn default() -> Self {
        Self {
            dim: 16,
            init: Initializer::default(),
            optimizer: OptimizerConfig::default(),
            admission: AdmissionConfig::default(),
            eviction: EvictionConfig::default(),
            default_value: 0.0,
            seed: 0,
            dram_budget_bytes: None,
            reserve_rows: 0,
        }
    }
}

impl TableConfig {
    pub fn with_dim(dim: usize) -> Self {
        Self {
            dim,
            ..Self::default()
        }
    }

    /// Checks every value; `prefix` is the config path of this table, for the error message.
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidValue> {
        let key = |k: &str| format!("{prefix}.{k}");
        let positive = |k: &str, v: f32| -> Result<(), InvalidValue> {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(InvalidValue::new(key(k), v, "a finite number > 0"))
            }
        };
        let non_negative = |k: &str, v: f32| -> Result<(), InvalidValue> {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(InvalidValue::new(key(k), v, "a finite number >= 0"))
            }
        };
        if self.dim == 0 || self.dim > 4096 {
            return Err(InvalidValue::new(
                key("dim"),
                self.dim,
                "an integer in 1..=4096",
            ));
        }
        match self.init {
            Initializer::Zeros => {}
            Initializer::Uniform { scale } => non_negative("init.scale", scale)?,
            Initializer::Normal { mean, std } => {
                non_negative("init.std", std)?;
                if !mean.is_finite() {
                    return Err(InvalidValue::new(key("init.mean"), mean, "a finite number"));
                }
            }
        }
        match self.optimizer {
            OptimizerConfig::Sgd { lr } => positive("optimizer.lr", lr)?,
            OptimizerConfig::Adagrad {
                lr,
                initial_accumulator,
                eps,
            } => {
                positive("optimizer.lr", lr)?;
                non_negative("optimizer.initial_accumulator", initial_accumulator)?;
                positive("optimizer.eps", eps)?;
            }
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                positive("optimizer.lr", lr)?;
                for (k, b) in [("optimizer.beta1", beta1), ("optimizer.beta2", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return Err(InvalidValue::new(key(k), b, "a number in [0, 1)"));
                    }
                }
                positive("optimizer.eps", eps)?;
            }
            OptimizerConfig::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                positive("optimizer.alpha", alpha)?;
                non_negative("optimizer.beta", beta)?;
                non_negative("optimizer.l1", l1)?;
                non_negative("optimizer.l2", l2)?;
            }
        }
        match self.admission {
            AdmissionConfig::None => {}
            AdmissionConfig::Counter { min_count } => {
                if min_count == 0 {
                    return Err(InvalidValue::new(
                        key("admission.min_count"),
                        min_count,
                        "an integer >= 1",
                    ));
                }
            }
            AdmissionConfig::CountingBloom {
                min_count,
                false_positive_rate,
                expected_keys,
            } => {
                if min_count == 0 || min_count > 255 {
                    return Err(InvalidValue::new(
                        key("admission.min_count"),
                        min_count,
                        "an integer in 1..=255 (the filter's counters are 8-bit)",
                    ));
                }
                if !(false_positive_rate > 0.0 && false_positive_rate < 1.0) {
                    return Err(InvalidValue::new(
                        key("admission.false_positive_rate"),
                        false_positive_rate,
                        "a number in (0, 1)",
                    ));
                }
                if expected_keys == 0 || expected_keys > 1 << 36 {
                    return Err(InvalidValue::new(
                        key("admission.expected_keys"),
                        expected_keys,
                        "an integer in 1..=2^36",
                    ));
                }
            }
            AdmissionConfig::Probability { p } => {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(InvalidValue::new(
                        key("admission.p"),
                        p,
                        "a number in (0, 1]",
                    ));
                }
            }
        }
        let ev = &self.eviction;
        if ev.capacity == Some(0) {
            return Err(InvalidValue::new(
                key("eviction.capacity"),
                0,
                "an integer >= 1, or no limit",
            ));
        }
        if let Some(f) = ev.min_l2_norm {
            non_negative("eviction.min_l2_norm", f)?;
        }
        if ev.sample_size == 0 || ev.sample_size > 64 {
            return Err(InvalidValue::new(
                key("eviction.sample_size"),
                ev.sample_size,
                "an integer in 1..=64",
            ));
        }
        if !self.default_value.is_finite() {
            return Err(InvalidValue::new(
                key("default_value"),
                self.default_value,
                "a finite number",
            ));
        }
        if let Some(b) = self.dram_budget_bytes {
            if b == 0 {
                return Err(InvalidValue::new(
                    key("dram_budget_bytes"),
                    b,
                    "an integer > 0, or no budget",
                ));
            }
        }
        if self.reserve_rows > MAX_RESERVE_ROWS {
            return Err(InvalidValue::new(
                key("reserve_rows"),
                self.reserve_rows,
                format!("an integer in 0..={MAX_RESERVE_ROWS} (rows per shard)"),
            ));
        }
        Ok(())
    }
}

/// Row ids are `u32`; a shard's reservation stays well inside them.
pub const MAX_RESERVE_ROWS: u64 = 1 << 31;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_key_value_and_expectation() {
        let mut c = TableConfig::with_dim(0);
        let e = c.validate("embedding.tables.user").unwrap_err();
        assert_eq!(e.key, "embedding.tables.user.dim");
        assert_eq!(e.value, "0");
        assert!(e.to_string().contains("expected an integer in 1..=4096"));
        c.dim = 8;
        c.optimizer = OptimizerConfig::Adam {
            lr: 0.1,
            beta1: 1.5,
            beta2: 0.9,
            eps: 1e-8,
        };
        let e = c.validate("t").unwrap_err();
        assert_eq!(e.key, "t.optimizer.beta1");
        c.optimizer = OptimizerConfig::Sgd { lr: f32::NAN };
        assert_eq!(c.validate("t").unwrap_err().key, "t.optimizer.lr");
        c.optimizer = OptimizerConfig::default();
        c.admission = AdmissionConfig::Probability { p: 0.0 };
        assert_eq!(c.validate("t").unwrap_err().key, "t.admission.p");
        c.admission = AdmissionConfig::None;
        assert!(c.validate("t").is_ok());
        c.reserve_rows = MAX_RESERVE_ROWS + 1;
        let e = c.validate("t").unwrap_err();
        assert_eq!(e.key, "t.reserve_rows");
        assert!(e.to_string().contains("rows per shard"), "{e}");
    }
}
