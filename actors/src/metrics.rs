//! Model quality metrics: exact AUC, logloss, calibration, and a windowed streaming version for
//! online validation.
//!
//! A prediction is the model's click probability in `[0, 1]`; a label counts as positive when it
//! is above 0.5.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Predictions are clipped to `[EPS, 1 - EPS]` for logloss, as sklearn and the PyTorch peer do,
/// so one confident mistake costs a large but finite loss.
pub const LOGLOSS_EPS: f64 = 1e-7;

/// The standard error of an AUC of `auc` measured on `positives` and `negatives` samples
/// (Hanley and McNeil, 1982). What chance alone moves an AUC by: about 0.04 at 50 clicks, and
/// 0.01 only at several hundred. Infinite without both classes.
pub fn auc_standard_error(auc: f64, positives: f64, negatives: f64) -> f64 {
    if positives < 1.0 || negatives < 1.0 {
        return f64::INFINITY;
    }
    let a = auc.clamp(1e-6, 1.0 - 1e-6);
    let q1 = a / (2.0 - a);
    let q2 = 2.0 * a * a / (1.0 + a);
    let v = (a * (1.0 - a) + (positives - 1.0) * (q1 - a * a) + (negatives - 1.0) * (q2 - a * a))
        / (positives * negatives);
    v.max(0.0).sqrt()
}

/// Exact ROC AUC by sorting, with tied scores counted as half a win (the Mann-Whitney U
/// statistic with mid-ranks). `None` when all labels are of one class.
pub fn auc(preds: &[f32], labels: &[f32]) -> Option<f64> {
    assert_eq!(preds.len(), labels.len(), "one label per prediction");
    let mut order: Vec<u32> = (0..preds.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| preds[a as usize].total_cmp(&preds[b as usize]));
    let (mut pos, mut neg) = (0f64, 0f64);
    // Sum over positives of (negatives ranked below + half the tied negatives).
    let mut wins = 0f64;
    let mut i = 0;
    while i < order.len() {
        let s = preds[order[i] as usize];
        let mut j = i;
        let (mut p, mut n) = (0f64, 0f64);
        while j < order.len() && preds[order[j] as usize] == s {
            if labels[order[j] as usize] > 0.5 {
                p += 1.0;
            } else {
                n += 1.0;
            }
            j += 1;
        }
        wins += p * (neg + 0.5 * n);
        pos += p;
        neg += n;
        i = j;
    }
    (pos > 0.0 && neg > 0.0).then(|| wins / (pos * neg))
}

/// Mean binary cross-entropy.
pub fn logloss(preds: &[f32], labels: &[f32]) -> f64 {
    assert_eq!(preds.len(), labels.len(), "one label per prediction");
    if preds.is_empty() {
        return 0.0;
    }
    preds
        .iter()
        .zip(labels)
        .map(|(&p, &y)| bce(f64::from(p), f64::from(y)))
        .sum::<f64>()
        / preds.len() as f64
}

fn bce(p: f64, y: f64) -> f64 {
    let p = p.clamp(LOGLOSS_EPS, 1.0 - LOGLOSS_EPS);
    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
}

/// Mean prediction over mean label: 1 is calibrated, above 1 over-predicts. `None` without
/// positives.
pub fn calibration(preds: &[f32], labels: &[f32]) -> Option<f64> {
    let sp: f64 = preds.iter().map(|&p| f64::from(p)).sum();
    let sl: f64 = labels.iter().map(|&y| f64::from(y)).sum();
    (sl > 0.0).then(|| sp / sl)
}

/// All metrics of one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub samples: u64,
    pub auc: Option<f64>,
    pub logloss: f64,
    pub calibration: Option<f64>,
    pub mean_prediction: f64,
    pub mean_label: f64,
}

pub fn evaluate(preds: &[f32], labels: &[f32]) -> Evaluation {
    let n = preds.len().max(1) as f64;
    Evaluation {
        samples: preds.len() as u64,
        auc: auc(preds, labels),
        logloss: logloss(preds, labels),
        calibration: calibration(preds, labels),
        mean_prediction: preds.iter().map(|&p| f64::from(p)).sum::<f64>() / n,
        mean_label: labels.iter().map(|&y| f64::from(y)).sum::<f64>() / n,
    }
}

/// AUC, logloss and calibration over the last `capacity` predictions, updated in O(1) per
/// sample and read in O(buckets).
///
/// Scores go into `buckets` equal-width bins over `[0, 1]`. Pairs in different bins are
/// ordered exactly; pairs within one bin count as ties (half a win), so the AUC is exact for
/// scores quantised to the bins and otherwise off by at most the fraction of pairs sharing a
/// bin. 10 000 bins keep that well under 0.001 for CTR models.
#[derive(Clone, Debug)]
pub struct WindowedAuc {
    capacity: usize,
    buckets: usize,
    pos: Vec<u64>,
    neg: Vec<u64>,
    window: VecDeque<(f32, f32)>,
    sum_pred: f64,
    sum_label: f64,
    sum_loss: f64,
    /// Evictions since the float sums were last recomputed from the window.
    since_resum: usize,
}

impl WindowedAuc {
    pub fn new(capacity: usize, buckets: usize) -> Self {
        assert!(capacity > 0 && buckets > 0, "a window and bins");
        Self {
            capacity,
            buckets,
            pos: vec![0; buckets],
            neg: vec![0; buckets],
            window: VecDeque::with_capacity(capacity),
            sum_pred: 0.0,
            sum_label: 0.0,
            sum_loss: 0.0,
            since_resum: 0,
        }
    }

    fn bucket(&self, p: f32) -> usize {
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        ((p * self.buckets as f32) as usize).min(self.buckets - 1)
    }

    pub fn push(&mut self, pred: f32, label: f32) {
        if self.window.len() == self.capacity {
            if let Some((p, y)) = self.window.pop_front() {
                let b = self.bucket(p);
                if y > 0.5 {
                    self.pos[b] -= 1;
                } else {
                    self.neg[b] -= 1;
                }
                self.sum_pred -= f64::from(p);
                self.sum_label -= f64::from(y);
                self.sum_loss -= bce(f64::from(p), f64::from(y));
                self.since_resum += 1;
            }
        }
        let b = self.bucket(pred);
        if label > 0.5 {
            self.pos[b] += 1;
        } else {
            self.neg[b] += 1;
        }
        self.window.push_back((pred, label));
        self.sum_pred += f64::from(pred);
        self.sum_label += f64::from(label);
        self.sum_loss += bce(f64::from(pred), f64::from(label));
        // Adding and subtracting floats drifts; recompute once per window turnover, which
        // keeps the amortised cost O(1).
        if self.since_resum >= self.capacity {
            self.since_resum = 0;
            self.sum_pred = self.window.iter().map(|&(p, _)| f64::from(p)).sum();
            self.sum_label = self.window.iter().map(|&(_, y)| f64::from(y)).sum();
            self.sum_loss = self
                .window
                .iter()
                .map(|&(p, y)| bce(f64::from(p), f64::from(y)))
                .sum();
        }
    }

    pub fn len(&self) -> usize {
        self.window.len()
    }

    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    pub fn auc(&self) -> Option<f64> {
        let (mut neg_below, mut wins, mut p_total) = (0f64, 0f64, 0f64);
        for b in 0..self.buckets {
            let (p, n) = (self.pos[b] as f64, self.neg[b] as f64);
            wins += p * (neg_below + 0.5 * n);
            neg_below += n;
            p_total += p;
        }
        (p_total > 0.0 && neg_below > 0.0).then(|| wins / (p_total * neg_below))
    }

    pub fn evaluation(&self) -> Evaluation {
        let n = self.window.len().max(1) as f64;
        Evaluation {
            samples: self.window.len() as u64,
            auc: self.auc(),
            logloss: self.sum_loss / n,
            calibration: (self.sum_label > 0.0).then(|| self.sum_pred / self.sum_label),
            mean_prediction: self.sum_pred / n,
            mean_label: self.sum_label / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Xoshiro256;

    /// The spread of AUCs measured on many random windows matches the standard error. Hanley
    /// and McNeil's formula is exact for exponential scores, which these are; for other
    /// distributions it is an approximation (it overstates the spread of uniform scores, with
    /// positives the larger of two, by a fifth).
    #[test]
    fn the_auc_standard_error_is_the_spread_of_measured_aucs() {
        let seed = crate::testkit::seed("auc_standard_error");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        // Scores: negatives exponential with mean 1, positives with mean 2 (AUC 2/3).
        let (pos, neg) = (40usize, 400usize);
        let mut aucs = Vec::new();
        for _ in 0..400 {
            let mut p = Vec::new();
            let mut y = Vec::new();
            for i in 0..pos + neg {
                let e = -(1.0 - rng.next_f64()).ln() as f32;
                let s = if i < pos { 2.0 * e } else { e };
                p.push(s);
                y.push(if i < pos { 1.0 } else { 0.0 });
            }
            aucs.push(auc(&p, &y).unwrap());
        }
        let mean = aucs.iter().sum::<f64>() / aucs.len() as f64;
        let sd = (aucs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / aucs.len() as f64).sqrt();
        let se = auc_standard_error(2.0 / 3.0, pos as f64, neg as f64);
        println!("seed {seed}: mean auc {mean:.4}, spread {sd:.4}, standard error {se:.4}");
        assert!((mean - 2.0 / 3.0).abs() < 0.01, "{mean}");
        assert!(
            // The spread of 400 windows is known to about 3.5%.
            (sd / se - 1.0).abs() < 0.15,
            "spread {sd}, standard error {se}"
        );
        assert_eq!(auc_standard_error(0.7, 0.0, 10.0), f64::INFINITY);
    }

    #[test]
    fn auc_by_hand() {
        // Pairs (pos, neg): (0.8,0.1) win, (0.8,0.4) win, (0.35,0.1) win, (0.35,0.4) loss.
        assert_eq!(
            auc(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]),
            Some(0.75)
        );
        assert_eq!(auc(&[0.1, 0.9], &[0.0, 1.0]), Some(1.0));
        assert_eq!(auc(&[0.1, 0.9], &[1.0, 0.0]), Some(0.0));
        // Ties: all scores equal is a coin flip.
        assert_eq!(auc(&[0.5; 4], &[0.0, 1.0, 0.0, 1.0]), Some(0.5));
        // One tie between a positive and a negative: wins 1 + 1 + 0.5 + 1 of 4... by hand:
        // pos {0.5, 0.9}, neg {0.5, 0.2}: (0.5,0.5) tie 0.5, (0.5,0.2) 1, (0.9,*) 2 -> 3.5/4.
        assert_eq!(
            auc(&[0.5, 0.9, 0.5, 0.2], &[1.0, 1.0, 0.0, 0.0]),
            Some(0.875)
        );
        assert_eq!(auc(&[0.3, 0.4], &[1.0, 1.0]), None);
    }

    #[test]
    fn logloss_and_calibration_by_hand() {
        let ll = logloss(&[0.5, 0.9], &[1.0, 0.0]);
        let want = (-(0.5f64.ln()) - (0.1f64).ln()) / 2.0;
        assert!((ll - want).abs() < 1e-6, "{ll} vs {want}");
        // A certain wrong prediction is clipped, not infinite.
        let ll = logloss(&[0.0], &[1.0]);
        assert!((ll - (-(1e-7f64).ln())).abs() < 1e-9);
        let c = calibration(&[0.2, 0.4], &[0.0, 1.0]).unwrap();
        assert!((c - 0.6).abs() < 1e-6, "{c}");
        assert_eq!(calibration(&[0.2], &[0.0]), None);
    }

    /// Brute force over all pairs agrees with the sort-based AUC on random tied data.
    #[test]
    fn auc_matches_pairwise_definition() {
        let seed = crate::testkit::seed("auc_pairs");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        for _ in 0..50 {
            let n = 1 + rng.below(60) as usize;
            let preds: Vec<f32> = (0..n).map(|_| rng.below(8) as f32 / 8.0).collect();
            let labels: Vec<f32> = (0..n).map(|_| rng.below(2) as f32).collect();
            let (mut w, mut pairs) = (0.0, 0.0);
            for i in 0..n {
                for j in 0..n {
                    if labels[i] == 1.0 && labels[j] == 0.0 {
                        pairs += 1.0;
                        w += match preds[i].total_cmp(&preds[j]) {
                            std::cmp::Ordering::Greater => 1.0,
                            std::cmp::Ordering::Equal => 0.5,
                            std::cmp::Ordering::Less => 0.0,
                        };
                    }
                }
            }
            let want = (pairs > 0.0).then(|| w / pairs);
            assert_eq!(auc(&preds, &labels), want, "seed {seed}");
        }
    }

    #[test]
    fn windowed_auc_tracks_the_last_samples() {
        let seed = crate::testkit::seed("windowed_auc");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let mut w = WindowedAuc::new(500, 100);
        let mut all = Vec::new();
        for _ in 0..3000 {
            // Scores on the bin grid, so the windowed AUC must be exact.
            let p = rng.below(100) as f32 / 100.0 + 0.005;
            let y = if rng.next_f64() < f64::from(p) {
                1.0
            } else {
                0.0
            };
            w.push(p, y);
            all.push((p, y));
        }
        let tail = &all[all.len() - 500..];
        let (p, y): (Vec<f32>, Vec<f32>) = tail.iter().copied().unzip();
        let exact = evaluate(&p, &y);
        let got = w.evaluation();
        assert_eq!(got.samples, 500);
        assert!(
            (got.auc.unwrap() - exact.auc.unwrap()).abs() < 1e-12,
            "seed {seed}"
        );
        assert!((got.logloss - exact.logloss).abs() < 1e-9, "seed {seed}");
        assert!((got.calibration.unwrap() - exact.calibration.unwrap()).abs() < 1e-9);
    }
}
