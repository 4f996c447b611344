//! Dense optimizers over the flat parameter vector: SGD, Adagrad and Adam.

use serde::{Deserialize, Serialize};

// The same defaults as the sparse optimizers, so one `adam` means one thing everywhere.
use crate::embedding::config::{
    default_adagrad_eps, default_adam_eps, default_beta1, default_beta2,
    default_initial_accumulator,
};
use crate::embedding::InvalidValue;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DenseOptimizerConfig {
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
    Adam {
        lr: f32,
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        #[serde(default = "default_adam_eps")]
        eps: f32,
    },
}

impl Default for DenseOptimizerConfig {
    /// Adam at 1e-3, as the PyTorch peer trains its dense part.
    fn default() -> Self {
        Self::Adam {
            lr: 1e-3,
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_adam_eps(),
        }
    }
}

impl DenseOptimizerConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidValue> {
        let lr = match *self {
            Self::Sgd { lr } | Self::Adagrad { lr, .. } | Self::Adam { lr, .. } => lr,
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(InvalidValue::new(
                format!("{prefix}.lr"),
                lr,
                "a finite learning rate above 0",
            ));
        }
        if let Self::Adam { beta1, beta2, .. } = *self {
            for (k, b) in [("beta1", beta1), ("beta2", beta2)] {
                if !(0.0..1.0).contains(&b) {
                    return Err(InvalidValue::new(
                        format!("{prefix}.{k}"),
                        b,
                        "a value in [0, 1)",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An optimizer's state: one or two slots per parameter and the step count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseOptimizer {
    pub config: DenseOptimizerConfig,
    pub step: u64,
    #[serde(with = "crate::embedding::snapshot::f32_bytes")]
    pub m: Vec<f32>,
    #[serde(with = "crate::embedding::snapshot::f32_bytes")]
    pub v: Vec<f32>,
}

impl DenseOptimizer {
    pub fn new(config: DenseOptimizerConfig, params: usize) -> Self {
        let (m, v) = match config {
            DenseOptimizerConfig::Sgd { .. } => (vec![], vec![]),
            DenseOptimizerConfig::Adagrad {
                initial_accumulator,
                ..
            } => (vec![], vec![initial_accumulator; params]),
            DenseOptimizerConfig::Adam { .. } => (vec![0.0; params], vec![0.0; params]),
        };
        Self {
            config,
            step: 0,
            m,
            v,
        }
    }

    /// One update of `params` by `grads`. The update is elementwise, so it runs in chunks on
    /// the current rayon pool: the result does not depend on the thread count.
    pub fn apply(&mut self, params: &mut [f32], grads: &[f32]) {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 15;
        self.step += 1;
        match self.config {
            DenseOptimizerConfig::Sgd { lr } => {
                params
                    .par_chunks_mut(CHUNK)
                    .zip(grads.par_chunks(CHUNK))
                    .for_each(|(p, g)| {
                        for (p, g) in p.iter_mut().zip(g) {
                            *p -= lr * g;
                        }
                    });
            }
            DenseOptimizerConfig::Adagrad { lr, eps, .. } => {
                params
                    .par_chunks_mut(CHUNK)
                    .zip(grads.par_chunks(CHUNK))
                    .zip(self.v.par_chunks_mut(CHUNK))
                    .for_each(|((p, g), v)| {
                        for ((p, g), v) in p.iter_mut().zip(g).zip(v) {
                            *v += g * g;
                            *p -= lr * g / (v.sqrt() + eps);
                        }
                    });
            }
            DenseOptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                // PyTorch's formulation: the bias corrections fold into the step size and the
                // denominator, so the inner loop is one fused pass.
                let t = self.step as i32;
                let bc1 = 1.0 - beta1.powi(t);
                let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
                let step = lr / bc1;
                params
                    .par_chunks_mut(CHUNK)
                    .zip(grads.par_chunks(CHUNK))
                    .zip(self.m.par_chunks_mut(CHUNK))
                    .zip(self.v.par_chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| {
                        for (((p, g), m), v) in
                            p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                        {
                            *m = beta1 * *m + (1.0 - beta1) * g;
                            *v = beta2 * *v + (1.0 - beta2) * g * g;
                            *p -= step * *m / (v.sqrt() / bc2_sqrt + eps);
                        }
                    });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first steps by hand (and, for Adam, against PyTorch's documented algorithm).
    #[test]
    fn first_steps_by_hand() {
        let mut o = DenseOptimizer::new(DenseOptimizerConfig::Sgd { lr: 0.1 }, 1);
        let mut p = [1.0f32];
        o.apply(&mut p, &[2.0]);
        assert!((p[0] - 0.8).abs() < 1e-7);

        let cfg = DenseOptimizerConfig::Adagrad {
            lr: 0.1,
            initial_accumulator: 0.1,
            eps: 0.0,
        };
        let mut o = DenseOptimizer::new(cfg, 1);
        let mut p = [1.0f32];
        o.apply(&mut p, &[0.3]);
        let want = 1.0 - 0.1 * 0.3 / (0.1f32 + 0.09).sqrt();
        assert!((p[0] - want).abs() < 1e-7);

        // Adam's first step moves each parameter by lr * sign(g) (up to eps).
        let mut o = DenseOptimizer::new(DenseOptimizerConfig::default(), 2);
        let mut p = [0.5f32, -0.5];
        o.apply(&mut p, &[3.0, -0.01]);
        assert!(
            (p[0] - 0.499).abs() < 1e-6 && (p[1] + 0.499).abs() < 1e-6,
            "{p:?}"
        );
        // Second step with the same gradient: m_hat = g, v_hat = g^2, again lr * sign(g).
        o.apply(&mut p, &[3.0, -0.01]);
        assert!((p[0] - 0.498).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn refuses_bad_settings() {
        let e = DenseOptimizerConfig::Sgd { lr: -1.0 }
            .validate("model.optimizer")
            .unwrap_err();
        assert_eq!(e.key, "model.optimizer.lr");
    }
}
