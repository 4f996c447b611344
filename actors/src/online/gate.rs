//! The validation gate: the pure decision whether a candidate version may be served, and when
//! that decision is due.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::embedding::InvalidValue;
use crate::metrics::{auc_standard_error, Evaluation};

/// How versions reach serving. Configured as `validation.publish`.
///
/// Read from a string with its own error, which names both choices (the configuration
/// loader's error for an unknown unit variant names neither).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Publish {
    /// Each version is served as soon as it is written, and scored against the last version
    /// that passed on the samples after it. One that fails is withdrawn: serving goes back to
    /// the last version that passed, and publishing pauses until a candidate passes. So
    /// freshness does not wait for validation, and a bad version serves for at most one
    /// verdict's window.
    #[default]
    Guarded,
    /// A version is served only once it has passed: nothing bad ever serves, and serving is
    /// at least one verdict's window behind training.
    AfterValidation,
}

impl Publish {
    pub fn name(self) -> &'static str {
        match self {
            Self::Guarded => "guarded",
            Self::AfterValidation => "after_validation",
        }
    }
}

impl TryFrom<String> for Publish {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "guarded" => Ok(Self::Guarded),
            "after_validation" => Ok(Self::AfterValidation),
            _ => Err(format!(
                "unknown publication {s:?}: expected guarded or after_validation"
            )),
        }
    }
}

impl From<Publish> for String {
    fn from(p: Publish) -> Self {
        p.name().to_owned()
    }
}

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
    pub publish: Publish,
    /// Samples (after the candidate's offsets) that make a verdict due.
    pub min_samples: u64,
    /// Milliseconds after a candidate's evaluation began that make its verdict due on the
    /// samples it has, if it has any: a quiet stream still gets a decision.
    pub window_ms: u64,
    /// Pass only if `auc >= serving_auc - max_auc_drop`, or the drop is within the noise of
    /// the window's clicks (see [`judge`]).
    pub max_auc_drop: f64,
    /// Pass only if `logloss <= serving_logloss * max_logloss_ratio`, or the rise is within
    /// the noise of the window's clicks (see [`judge`]).
    pub max_logloss_ratio: f64,
    /// Pass only if `|calibration - 1| <= max_calibration_error`.
    pub max_calibration_error: f64,
    /// Clicks the window must hold before its calibration is judged. A calibration measured on
    /// `c` clicks has a relative standard error near `1 / sqrt(c)`: at the default 50 that is
    /// 0.14, and 0.3 is twice it. On fewer clicks (a short time window on a quiet stream)
    /// chance alone would fail good versions; the comparison with the reference still holds.
    pub calibration_min_clicks: u64,
    /// Consecutive failed versions that raise the alert.
    pub alert_after: u32,
    /// When the alert is raised, roll training back to the newest version that passed.
    pub auto_rollback: bool,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            publish: Publish::Guarded,
            min_samples: 2000,
            window_ms: 5000,
            max_auc_drop: 0.01,
            max_logloss_ratio: 1.02,
            max_calibration_error: 0.3,
            calibration_min_clicks: 50,
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
        if self.window_ms == 0 {
            return Err(InvalidValue::new(key("window_ms"), "0", "at least 1"));
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

/// Whether a verdict is due for an evaluation with `samples` samples, `elapsed_ms` after it
/// began: at `min_samples`, or at `window_ms` with at least one sample.
pub fn due(cfg: &GateConfig, samples: u64, elapsed_ms: u64) -> bool {
    samples >= cfg.min_samples || (samples > 0 && elapsed_ms >= cfg.window_ms)
}

/// The gate's decision: `Ok` passes, `Err` names every check that failed. `serving` is the
/// version the candidate is compared with, scored on the same samples.
///
/// The comparisons with `serving` are never tighter than chance. An AUC on `c` clicks moves by
/// chance by its standard error ([`auc_standard_error`], about 0.04 at 50 clicks), and a
/// logloss, which the clicks dominate at CTR-like rates, by about `1 / sqrt(c)` of itself. Both
/// versions score the same samples, so their difference moves less: at a correlation of 0.875
/// between their scores, two standard errors of the difference are one of either metric. So
/// the allowed AUC drop is `max(max_auc_drop, se(auc))` and the allowed logloss ratio
/// `max(max_logloss_ratio, 1 + 1 / sqrt(c))`. A window of a quiet stream (ten clicks, say) then
/// still fails a version that ranks or calibrates far worse, but not one that differs by
/// what ten clicks make of chance. With thousands of clicks the configured tolerances rule.
pub fn judge(
    cfg: &GateConfig,
    candidate: &Evaluation,
    serving: Option<&Evaluation>,
) -> Result<(), GateFailure> {
    let mut failed = Vec::new();
    let clicks = candidate.mean_label * candidate.samples as f64;
    let err = cfg.max_calibration_error;
    match candidate.calibration {
        Some(c) if (c - 1.0).abs() > err && clicks >= cfg.calibration_min_clicks as f64 => {
            // Samples are written when their label is known: a click at once, a negative when
            // the join window closes. For a window's length after a start or a restart the
            // samples are therefore no fair mix (clicks first, or a burst of negatives the
            // restart closed), and every model looks miscalibrated on them. The version the
            // candidate is compared with, off by as much on the same samples, says so; the
            // candidate is then judged by its predictions against that version's (their
            // ratio does not depend on the labels), or passes for being no further off than
            // it: withdrawing to a version as far off would gain nothing.
            let misleading = serving
                .and_then(|s| s.calibration)
                .filter(|s| (s - 1.0).abs() > err && *s > 0.0);
            match misleading {
                Some(sc) if (c / sc - 1.0).abs() <= err || (c - 1.0).abs() <= (sc - 1.0).abs() => {}
                Some(sc) => failed.push(format!(
                    "|calibration {c:.4} - 1| > {err} and |calibration / serving calibration \
                     {sc:.4} - 1| > {err} (on {clicks:.0} clicks)"
                )),
                None => failed.push(format!(
                    "|calibration {c:.4} - 1| > {err} (on {clicks:.0} clicks)"
                )),
            }
        }
        _ => {}
    }
    if let Some(s) = serving {
        let negatives = candidate.samples as f64 - clicks;
        if let (Some(a), Some(sa)) = (candidate.auc, s.auc) {
            let drop = cfg
                .max_auc_drop
                .max(auc_standard_error(sa, clicks, negatives));
            if a < sa - drop {
                failed.push(format!(
                    "auc {a:.4} < serving auc {sa:.4} - {drop:.4} (on {clicks:.0} clicks)"
                ));
            }
        }
        let ratio = cfg
            .max_logloss_ratio
            .max(1.0 + 1.0 / clicks.max(1.0).sqrt());
        if candidate.logloss > s.logloss * ratio {
            failed.push(format!(
                "logloss {:.5} > serving logloss {:.5} * {ratio:.4} (on {clicks:.0} clicks)",
                candidate.logloss, s.logloss
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

    /// An evaluation at a click rate of 0.5: 50 clicks in 100 samples.
    fn ev(samples: u64, auc: f64, logloss: f64, calibration: f64) -> Evaluation {
        Evaluation {
            samples,
            auc: Some(auc),
            logloss,
            calibration: Some(calibration),
            mean_prediction: 0.5 * calibration,
            mean_label: 0.5,
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
        // Half a million clicks: the configured tolerances are far above the noise.
        let n = 1_000_000;
        let serving = ev(n, 0.75, 0.40, 1.0);
        assert_eq!(
            judge(&cfg, &ev(n, 0.749, 0.403, 1.05), Some(&serving)),
            Ok(())
        );
        let cases = [
            (ev(n, 0.747, 0.40, 1.0), "serving auc"),
            (ev(n, 0.75, 0.41, 1.0), "serving logloss"),
            (ev(n, 0.75, 0.40, 1.11), "calibration"),
            (ev(n, 0.75, 0.40, 0.89), "calibration"),
        ];
        for (c, want) in cases {
            let e = judge(&cfg, &c, Some(&serving)).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // With nothing serving only the candidate's own checks apply.
        assert_eq!(judge(&cfg, &ev(n, 0.5, 9.0, 1.0), None), Ok(()));
        let two = judge(&cfg, &ev(n, 0.5, 0.40, 2.0), Some(&serving))
            .unwrap_err()
            .to_string();
        assert!(two.contains("auc") && two.contains("calibration"), "{two}");
        // On fewer clicks than calibration_min_clicks the calibration is noise and is not
        // judged; the comparison with serving still is.
        let serving = ev(100, 0.75, 0.40, 1.0);
        let few = ev(100, 0.75, 0.40, 1.5);
        assert!(judge(&cfg, &few, Some(&serving)).is_err());
        let cfg = GateConfig {
            calibration_min_clicks: 51,
            ..cfg
        };
        assert_eq!(judge(&cfg, &few, Some(&serving)), Ok(()));
        assert!(judge(&cfg, &ev(102, 0.75, 0.40, 1.5), None).is_err());
    }

    /// On samples that mislead every model (the first window after a start or a restart), a
    /// candidate is judged against the reference's calibration on the same samples.
    #[test]
    fn on_samples_every_model_misreads_calibration_is_judged_against_the_reference() {
        let cfg = GateConfig::default();
        let n = 100_000;
        // A burst of negatives: both predict three times the clicks.
        let serving = ev(n, 0.75, 0.40, 3.0);
        assert_eq!(judge(&cfg, &ev(n, 0.75, 0.40, 3.3), Some(&serving)), Ok(()));
        let e = judge(&cfg, &ev(n, 0.75, 0.40, 4.5), Some(&serving))
            .unwrap_err()
            .to_string();
        assert!(e.contains("serving calibration 3.0000"), "{e}");
        // Better calibrated than the reference on them passes, however far the ratio.
        assert_eq!(judge(&cfg, &ev(n, 0.75, 0.40, 1.8), Some(&serving)), Ok(()));
        // Clicks first: both predict a fifth of them.
        let serving = ev(n, 0.75, 0.40, 0.2);
        assert_eq!(
            judge(&cfg, &ev(n, 0.75, 0.40, 0.22), Some(&serving)),
            Ok(())
        );
        assert!(judge(&cfg, &ev(n, 0.75, 0.40, 0.1), Some(&serving)).is_err());
        // A reference calibrated on these samples, or none, leaves the plain check.
        let e = judge(&cfg, &ev(n, 0.75, 0.40, 1.5), Some(&ev(n, 0.75, 0.40, 1.0)))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("serving calibration"), "{e}");
        assert!(judge(&cfg, &ev(n, 0.75, 0.40, 3.3), None).is_err());
    }

    /// On a quiet window the comparisons allow what chance does, and still catch a version
    /// that is far worse.
    #[test]
    fn on_few_clicks_the_comparisons_allow_the_noise_and_no_more() {
        let cfg = GateConfig::default();
        // 20 clicks in 4,000 samples, a CTR of 0.5%.
        let at = |auc: f64, logloss: f64| Evaluation {
            samples: 4_000,
            auc: Some(auc),
            logloss,
            calibration: Some(1.0),
            mean_prediction: 0.005,
            mean_label: 0.005,
        };
        let serving = at(0.70, 0.030);
        // An AUC on 20 clicks has a standard error near 0.06, a logloss moves by a fifth.
        assert_eq!(judge(&cfg, &at(0.66, 0.034), Some(&serving)), Ok(()));
        let e = judge(&cfg, &at(0.55, 0.030), Some(&serving)).unwrap_err();
        assert!(e.to_string().contains("serving auc"), "{e}");
        let e = judge(&cfg, &at(0.70, 0.045), Some(&serving)).unwrap_err();
        assert!(e.to_string().contains("serving logloss"), "{e}");
    }

    /// A verdict is due at min_samples, or at window_ms on whatever samples arrived, but
    /// never on none.
    #[test]
    fn a_verdict_is_due_by_samples_or_by_time() {
        let cfg = GateConfig {
            min_samples: 100,
            window_ms: 1000,
            ..GateConfig::default()
        };
        assert!(!due(&cfg, 99, 999));
        assert!(due(&cfg, 100, 0));
        assert!(due(&cfg, 1, 1000));
        assert!(!due(&cfg, 0, 1_000_000));
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
            GateConfig {
                window_ms: 0,
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
