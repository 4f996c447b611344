//! The validation gate: the pure decision whether a candidate version may be served.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::embedding::InvalidValue;
use crate::metrics::Evaluation;

/// Configured under `[validation]`.
///
/// The defaults are loose on purpose. Both models are scored on the same samples, but a window
/// of a few thousand samples still moves by chance: a calibration measured on `n` samples at a
/// click rate `p` has a relative standard error near `1 / sqrt(n p)` (about 16% at n = 2000,
/// p = 0.02). Gates tighter than the noise fail good versions at random; tighten them together
/// with `min_samples`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// Samples (after the candidate's offsets) before a verdict.
    pub min_samples: u64,
    /// Pass only if `auc >= serving_auc - max_auc_drop`.
    pub max_auc_drop: f64,
    /// Pass only if `logloss <= serving_logloss * max_logloss_ratio`.
    pub max_logloss_ratio: f64,
    /// Pass only if `|calibration - 1| <= max_calibration_error`.
    pub max_calibration_error: f64,
    /// Consecutive failed versions that raise the alert.
    pub alert_after: u32,
    /// When the alert is raised, roll back to the newest version that passed.
    pub auto_rollback: bool,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            min_samples: 2000,
            max_auc_drop: 0.01,
            max_logloss_ratio: 1.02,
            max_calibration_error: 0.3,
            alert_after: 3,
            auto_rollback: false,
        }
    }
}

impl GateConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidValue> {
        let key = |k: &str| format!("{prefix}.{k}");
        if self.min_samples == 0 {
            return Err(InvalidValue::new(key("min_samples"), "0", "at least 1"));
        }
        for (k, v) in [
            ("max_auc_drop", self.max_auc_drop),
            ("max_calibration_error", self.max_calibration_error),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(InvalidValue::new(key(k), v.to_string(), "a number >= 0"));
            }
        }
        if !(self.max_logloss_ratio.is_finite() && self.max_logloss_ratio >= 1.0) {
            return Err(InvalidValue::new(
                key("max_logloss_ratio"),
                self.max_logloss_ratio.to_string(),
                "a number >= 1",
            ));
        }
        if self.alert_after == 0 {
            return Err(InvalidValue::new(key("alert_after"), "0", "at least 1"));
        }
        Ok(())
    }
}

/// A candidate the gate refused: every check it failed, each as a person reads it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{}", failed.join("; "))]
pub struct GateFailure {
    pub failed: Vec<String>,
}

/// The gate's decision: `Ok` passes, `Err` names every check that failed.
pub fn judge(
    cfg: &GateConfig,
    candidate: &Evaluation,
    serving: Option<&Evaluation>,
) -> Result<(), GateFailure> {
    let mut failed = Vec::new();
    if candidate.samples < cfg.min_samples {
        failed.push(format!(
            "{} samples < min_samples {}",
            candidate.samples, cfg.min_samples
        ));
    }
    match candidate.calibration {
        Some(c) if (c - 1.0).abs() > cfg.max_calibration_error => failed.push(format!(
            "|calibration {c:.4} - 1| > {}",
            cfg.max_calibration_error
        )),
        _ => {}
    }
    if let Some(s) = serving {
        if let (Some(a), Some(sa)) = (candidate.auc, s.auc) {
            if a < sa - cfg.max_auc_drop {
                failed.push(format!(
                    "auc {a:.4} < serving auc {sa:.4} - {}",
                    cfg.max_auc_drop
                ));
            }
        }
        if candidate.logloss > s.logloss * cfg.max_logloss_ratio {
            failed.push(format!(
                "logloss {:.5} > serving logloss {:.5} * {}",
                candidate.logloss, s.logloss, cfg.max_logloss_ratio
            ));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(GateFailure { failed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(samples: u64, auc: f64, logloss: f64, calibration: f64) -> Evaluation {
        Evaluation {
            samples,
            auc: Some(auc),
            logloss,
            calibration: Some(calibration),
            mean_prediction: 0.0,
            mean_label: 0.0,
        }
    }

    #[test]
    fn each_check_fails_on_its_own_and_names_itself() {
        let cfg = GateConfig {
            min_samples: 100,
            max_auc_drop: 0.002,
            max_logloss_ratio: 1.01,
            max_calibration_error: 0.1,
            ..GateConfig::default()
        };
        let serving = ev(100, 0.75, 0.40, 1.0);
        assert_eq!(
            judge(&cfg, &ev(100, 0.749, 0.403, 1.05), Some(&serving)),
            Ok(())
        );
        let cases = [
            (ev(99, 0.75, 0.40, 1.0), "min_samples"),
            (ev(100, 0.747, 0.40, 1.0), "serving auc"),
            (ev(100, 0.75, 0.41, 1.0), "serving logloss"),
            (ev(100, 0.75, 0.40, 1.11), "calibration"),
            (ev(100, 0.75, 0.40, 0.89), "calibration"),
        ];
        for (c, want) in cases {
            let e = judge(&cfg, &c, Some(&serving)).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // With nothing serving only the candidate's own checks apply.
        assert_eq!(judge(&cfg, &ev(100, 0.5, 9.0, 1.0), None), Ok(()));
        let two = judge(&cfg, &ev(1, 0.5, 0.40, 2.0), Some(&serving))
            .unwrap_err()
            .to_string();
        assert!(two.contains("min_samples") && two.contains("auc") && two.contains("calibration"));
    }

    #[test]
    fn bad_settings_are_refused_by_key() {
        let bad = [
            GateConfig {
                min_samples: 0,
                ..GateConfig::default()
            },
            GateConfig {
                max_auc_drop: -1.0,
                ..GateConfig::default()
            },
            GateConfig {
                max_logloss_ratio: 0.9,
                ..GateConfig::default()
            },
            GateConfig {
                max_calibration_error: f64::NAN,
                ..GateConfig::default()
            },
            GateConfig {
                alert_after: 0,
                ..GateConfig::default()
            },
        ];
        for c in bad {
            let e = c.validate("validation").unwrap_err().to_string();
            assert!(e.contains("validation."), "{e}");
        }
        GateConfig::default().validate("validation").unwrap();
    }
}
