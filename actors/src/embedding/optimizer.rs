//! Per-row sparse optimizers and the deterministic initializer.
//!
//! A row is laid out as `[weights: dim][optimizer state]`, contiguous, so one update touches
//! one or two cache lines. The kernels are written as plain loops over slices of equal length,
//! which the compiler vectorises.

use super::config::{Initializer, OptimizerConfig};
use crate::rng::SplitMix64;

/// Fills a fresh row: weights from the initializer, optimizer state at its starting values.
///
/// The weights depend only on `(table_seed, key)`: the same key starts from the same row
/// whatever the order of arrival or the shard it lands on.
pub(crate) fn init_row(
    row: &mut [f32],
    dim: usize,
    init: &Initializer,
    opt: &OptimizerConfig,
    table_seed: u64,
    key: u64,
) {
    let (w, state) = row.split_at_mut(dim);
    let mut rng = SplitMix64::new(crate::routing::mix64(
        table_seed ^ crate::routing::mix64(key),
    ));
    match *init {
        Initializer::Zeros => w.fill(0.0),
        Initializer::Uniform { scale } => {
            for x in w.iter_mut() {
                *x = (rng.next_f32() * 2.0 - 1.0) * scale;
            }
        }
        Initializer::Normal { mean, std } => {
            for x in w.iter_mut() {
                *x = mean + std * rng.next_normal_ziggurat() as f32;
            }
        }
    }
    state.fill(0.0);
    match *opt {
        OptimizerConfig::Sgd { .. } => {}
        OptimizerConfig::Adagrad {
            initial_accumulator,
            ..
        } => state[..dim].fill(initial_accumulator),
        OptimizerConfig::Adam { .. } => {
            // The running powers beta1^t and beta2^t start at t = 0.
            state[2 * dim] = 1.0;
            state[2 * dim + 1] = 1.0;
        }
        OptimizerConfig::Ftrl {
            alpha,
            beta,
            l1,
            l2,
            ..
        } => {
            // Choose z so that FTRL's closed form reproduces the initial weights: w = 0 when
            // |z| <= l1, else -(z - sign(z) l1) / (beta / alpha + l2) with n = 0.
            let (z, _n) = state.split_at_mut(dim);
            let denom = beta / alpha + l2;
            for (zi, &wi) in z.iter_mut().zip(w.iter()) {
                *zi = if wi == 0.0 {
                    0.0
                } else {
                    -wi * denom - wi.signum() * l1
                };
            }
        }
    }
}

/// Applies one (already summed) gradient to a row in place.
pub(crate) fn apply(row: &mut [f32], dim: usize, grad: &[f32], opt: &OptimizerConfig) {
    debug_assert_eq!(grad.len(), dim);
    let (w, state) = row.split_at_mut(dim);
    match *opt {
        OptimizerConfig::Sgd { lr } => {
            for (wi, &g) in w.iter_mut().zip(grad) {
                *wi -= lr * g;
            }
        }
        OptimizerConfig::Adagrad { lr, eps, .. } => {
            let acc = &mut state[..dim];
            for ((wi, ai), &g) in w.iter_mut().zip(acc.iter_mut()).zip(grad) {
                *ai += g * g;
                *wi -= lr * g / (ai.sqrt() + eps);
            }
        }
        OptimizerConfig::Adam {
            lr,
            beta1,
            beta2,
            eps,
        } => {
            let (mv, powers) = state.split_at_mut(2 * dim);
            let (m, v) = mv.split_at_mut(dim);
            powers[0] *= beta1;
            powers[1] *= beta2;
            let c1 = 1.0 - powers[0];
            let c2 = 1.0 - powers[1];
            for i in 0..dim {
                let g = grad[i];
                m[i] = beta1 * m[i] + (1.0 - beta1) * g;
                v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
                let m_hat = m[i] / c1;
                let v_hat = v[i] / c2;
                w[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
        OptimizerConfig::Ftrl {
            alpha,
            beta,
            l1,
            l2,
            ..
        } => {
            let (z, n) = state.split_at_mut(dim);
            for i in 0..dim {
                let g = grad[i];
                let n_new = n[i] + g * g;
                let sigma = (n_new.sqrt() - n[i].sqrt()) / alpha;
                z[i] += g - sigma * w[i];
                n[i] = n_new;
                w[i] = if z[i].abs() <= l1 {
                    0.0
                } else {
                    -(z[i] - z[i].signum() * l1) / ((beta + n_new.sqrt()) / alpha + l2)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference formulas in f64, written independently of the kernels above.
    fn reference_step(w: &mut [f64], s: &mut [f64], g: &[f64], opt: &OptimizerConfig) {
        let d = w.len();
        match *opt {
            OptimizerConfig::Sgd { lr } => (0..d).for_each(|i| w[i] -= f64::from(lr) * g[i]),
            OptimizerConfig::Adagrad { lr, eps, .. } => (0..d).for_each(|i| {
                s[i] += g[i] * g[i];
                w[i] -= f64::from(lr) * g[i] / (s[i].sqrt() + f64::from(eps));
            }),
            OptimizerConfig::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let (b1, b2) = (f64::from(beta1), f64::from(beta2));
                s[2 * d] *= b1;
                s[2 * d + 1] *= b2;
                for i in 0..d {
                    s[i] = b1 * s[i] + (1.0 - b1) * g[i];
                    s[d + i] = b2 * s[d + i] + (1.0 - b2) * g[i] * g[i];
                    let mh = s[i] / (1.0 - s[2 * d]);
                    let vh = s[d + i] / (1.0 - s[2 * d + 1]);
                    w[i] -= f64::from(lr) * mh / (vh.sqrt() + f64::from(eps));
                }
            }
            OptimizerConfig::Ftrl {
                alpha,
                beta,
                l1,
                l2,
            } => {
                let (a, b, l1, l2) = (
                    f64::from(alpha),
                    f64::from(beta),
                    f64::from(l1),
                    f64::from(l2),
                );
                for i in 0..d {
                    let (z, n) = (s[i], s[d + i]);
                    let n2 = n + g[i] * g[i];
                    let z2 = z + g[i] - (n2.sqrt() - n.sqrt()) / a * w[i];
                    s[i] = z2;
                    s[d + i] = n2;
                    w[i] = if z2.abs() <= l1 {
                        0.0
                    } else {
                        -(z2 - z2.signum() * l1) / ((b + n2.sqrt()) / a + l2)
                    };
                }
            }
        }
    }

    #[test]
    fn optimizers_match_reference_over_random_gradient_sequences() {
        let seed = crate::testkit::seed("optimizers_match_reference");
        let mut rng = crate::rng::Xoshiro256::seed_from_u64(seed);
        let opts = [
            OptimizerConfig::Sgd { lr: 0.1 },
            OptimizerConfig::default(),
            OptimizerConfig::Adam {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            OptimizerConfig::Ftrl {
                alpha: 0.05,
                beta: 1.0,
                l1: 0.01,
                l2: 0.1,
            },
        ];
        for opt in &opts {
            for case in 0..50 {
                let dim = 1 + rng.below(24) as usize;
                let init = Initializer::Normal {
                    mean: 0.0,
                    std: 0.05,
                };
                let key = rng.next_u64();
                let mut row = vec![0.0f32; dim + opt.state_floats(dim)];
                init_row(&mut row, dim, &init, opt, seed, key);
                let mut w: Vec<f64> = row[..dim].iter().map(|&x| f64::from(x)).collect();
                let mut s: Vec<f64> = row[dim..].iter().map(|&x| f64::from(x)).collect();
                for _ in 0..20 {
                    let g32: Vec<f32> =
                        (0..dim).map(|_| (rng.next_normal() * 0.3) as f32).collect();
                    let g64: Vec<f64> = g32.iter().map(|&x| f64::from(x)).collect();
                    apply(&mut row, dim, &g32, opt);
                    reference_step(&mut w, &mut s, &g64, opt);
                }
                for i in 0..dim {
                    let (got, want) = (f64::from(row[i]), w[i]);
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{} seed {seed} case {case} dim {i}: {got} vs {want}",
                        opt.name()
                    );
                }
            }
        }
    }

    #[test]
    fn ftrl_initial_state_reproduces_initial_weights() {
        let opt = OptimizerConfig::Ftrl {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.001,
            l2: 0.5,
        };
        let dim = 8;
        let mut row = vec![0.0f32; dim * 3];
        let init = Initializer::Uniform { scale: 0.1 };
        init_row(&mut row, dim, &init, &opt, 1, 99);
        let w0 = row[..dim].to_vec();
        // A zero gradient leaves n unchanged, so the closed form must give back w0.
        apply(&mut row, dim, &vec![0.0; dim], &opt);
        for (a, b) in row[..dim].iter().zip(&w0) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// A new row's weights are part of every model trained from them, so they are frozen: a
    /// change here changes every model trained by a later version.
    #[test]
    fn normal_initializer_is_frozen() {
        let opt = OptimizerConfig::default();
        let init = Initializer::Normal {
            mean: 0.0,
            std: 1.0,
        };
        let mut row = vec![0.0f32; 8];
        init_row(&mut row, 4, &init, &opt, 5, 77);
        assert_eq!(row[..4], FROZEN_NORMAL_5_77, "{row:?}");
    }

    const FROZEN_NORMAL_5_77: [f32; 4] = [-0.163_821_68, 1.334_579_8, 2.562_462_6, 1.047_199];

    #[test]
    fn initializer_depends_only_on_seed_and_key() {
        let opt = OptimizerConfig::default();
        let init = Initializer::Normal {
            mean: 0.0,
            std: 1.0,
        };
        let mut a = vec![0.0; 32];
        let mut b = vec![0.0; 32];
        init_row(&mut a, 16, &init, &opt, 5, 77);
        init_row(&mut b, 16, &init, &opt, 5, 77);
        assert_eq!(a, b);
        init_row(&mut b, 16, &init, &opt, 5, 78);
        assert_ne!(a, b);
        init_row(&mut b, 16, &init, &opt, 6, 77);
        assert_ne!(a, b);
    }
}
