//! Synthetic CTR data with a known answer.
//!
//! Rows have the Criteo layout (label, 13 integer columns, 26 categorical columns) and the
//! labels come from a hidden model, so the best achievable AUC (the *oracle AUC*, the AUC of
//! the true click probabilities) is known. The hidden model mixes:
//! - a per-id effect `g(f, r)` for every field `f` and id rank `r`, ~N(0, 1);
//! - pairwise interactions between the first [`INTERACTING_FIELDS`] fields, through a latent
//!   vector `v(f, r)` per id: `Σ_{f<f'} <v(f, r_f), v(f', r_f')>` (what FM and deep models can
//!   learn and LR cannot);
//! - linear and one pairwise effect of the observed dense values.
//!
//! Ids are Zipf-distributed over a large vocabulary (default 1M values per field, exponent
//! 1.1), so, as in real CTR data, most ids are rare. With `drift > 0` the per-id effects
//! rotate towards an independent second set as the row index grows: at the last row the
//! rotation is `drift * 90°`, so a model trained on early rows grows stale.
//!
//! The hidden model derives from `world_seed` and the rows from `seed`, so a training file and
//! a test file drawn with two seeds share one world. Everything derives from the seeds
//! through fixed functions (SplitMix64, Xoshiro256, the
//! rejection-inversion Zipf), so a file is the same on every machine and in every version.

use std::io::Write;

use serde::Serialize;

use crate::rng::{Xoshiro256, Zipf};
use crate::routing::mix64;

pub const FIELDS: usize = 26;
pub const DENSE: usize = 13;
/// Fields whose ids interact pairwise in the hidden model.
pub const INTERACTING_FIELDS: usize = 8;
const LATENT: usize = 4;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenConfig {
    pub rows: u64,
    /// Seeds the row sampler: two files with different seeds are two samples of one world.
    pub seed: u64,
    /// Seeds the hidden model (per-id effects, latent vectors, value strings): keep it fixed
    /// for a training file and its test file.
    pub world_seed: u64,
    /// Distinct values per categorical field.
    pub vocab: u64,
    pub zipf: f64,
    /// 0: a fixed hidden model; 1: per-id effects rotate by 90° over the rows.
    pub drift: f64,
    /// Share of dense values left empty.
    pub missing_rate: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            rows: 100_000,
            seed: 1,
            world_seed: 1,
            vocab: 1_000_000,
            zipf: 1.1,
            drift: 0.0,
            missing_rate: 0.05,
        }
    }
}

impl GenConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.vocab >= 1, "--vocab must be at least 1");
        anyhow::ensure!(
            self.zipf > 0.0 && self.zipf.is_finite(),
            "--zipf must be a finite exponent above 0, got {}",
            self.zipf
        );
        anyhow::ensure!(
            (0.0..=4.0).contains(&self.drift),
            "--drift must be in [0, 4], got {}",
            self.drift
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.missing_rate),
            "missing rate must be in [0, 1)"
        );
        Ok(())
    }
}

/// A uniform in [0, 1) that is a fixed function of its inputs.
fn unit(a: u64, b: u64) -> f64 {
    (mix64(mix64(a).wrapping_add(b)) >> 11) as f64 / (1u64 << 53) as f64
}

/// ~N(0, 1) as a fixed function of (key, index): Irwin-Hall of 4 uniforms, scaled.
fn normal(key: u64, idx: u64) -> f64 {
    let s: f64 = (0..4).map(|t| unit(key ^ (t * 0x9e37_79b9), idx)).sum();
    (s - 2.0) * 3f64.sqrt()
}

/// The hidden model and the row sampler.
#[derive(Debug)]
pub struct Generator {
    cfg: GenConfig,
    zipf: Zipf,
    rng: Xoshiro256,
    row: u64,
    field_keys: [u64; FIELDS],
}

/// One generated row.
#[derive(Clone, Debug, PartialEq)]
pub struct GenRow {
    pub label: u8,
    /// `None` is a missing value.
    pub dense: [Option<u64>; DENSE],
    /// Each field's value rank (0 is the most frequent).
    pub ranks: [u64; FIELDS],
    pub probability: f64,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let mut field_keys = [0u64; FIELDS];
        for (f, k) in field_keys.iter_mut().enumerate() {
            *k = mix64(
                cfg.world_seed
                    .wrapping_mul(0x1_0000)
                    .wrapping_add(f as u64 + 1),
            );
        }
        Ok(Self {
            zipf: Zipf::new(cfg.vocab, cfg.zipf),
            rng: Xoshiro256::seed_from_u64(cfg.seed),
            row: 0,
            field_keys,
            cfg,
        })
    }

    /// The categorical value string of rank `r` in field `f`: 8 hex digits, like Criteo's.
    pub fn value_string(&self, f: usize, r: u64) -> String {
        format!(
            "{:08x}",
            mix64(self.field_keys[f] ^ r.wrapping_mul(0x2545_f491)) as u32
        )
    }

    fn effect(&self, f: usize, r: u64, angle: f64) -> f64 {
        let g0 = normal(self.field_keys[f], r);
        if angle == 0.0 {
            return g0;
        }
        let g1 = normal(self.field_keys[f] ^ 0xd1b5_4a32_d192_ed03, r);
        angle.cos() * g0 + angle.sin() * g1
    }

    fn latent(&self, f: usize, r: u64, k: usize) -> f64 {
        normal(
            self.field_keys[f] ^ 0x8cb9_2ba7_2f3d_8dd7 ^ (k as u64) << 56,
            r,
        )
    }

    pub fn next_row(&mut self) -> GenRow {
        let i = self.row;
        let angle = if self.cfg.rows > 1 {
            self.cfg.drift * std::f64::consts::FRAC_PI_2 * i as f64 / (self.cfg.rows - 1) as f64
        } else {
            0.0
        };
        self.row_with(&[], angle)
    }

    /// A row whose first `fixed.len()` fields take the given ranks instead of sampled ones (the
    /// simulator's user and item), with the per-id effects rotated by `angle` radians.
    pub fn row_with(&mut self, fixed: &[u64], angle: f64) -> GenRow {
        self.row += 1;
        let mut ranks = [0u64; FIELDS];
        for r in &mut ranks {
            *r = self.zipf.sample(&mut self.rng) - 1;
        }
        for (r, &f) in ranks.iter_mut().zip(fixed) {
            *r = f;
        }
        let mut dense = [None; DENSE];
        let mut t = [0f64; DENSE];
        for j in 0..DENSE {
            if self.rng.next_f64() < self.cfg.missing_rate {
                continue;
            }
            let z = self.rng.next_normal();
            // A count-like integer whose ln(1 + x), the feature the models see, is ~1 + z.
            let x = ((1.0 + z).exp() - 1.0).round().max(0.0) as u64;
            dense[j] = Some(x);
            t[j] = (x as f64).ln_1p();
        }
        let mut logit = -1.8;
        for (f, &r) in ranks.iter().enumerate() {
            logit += 0.3 * self.effect(f, r, angle);
        }
        let mut pair = 0.0;
        for a in 0..INTERACTING_FIELDS {
            for b in a + 1..INTERACTING_FIELDS {
                for k in 0..LATENT {
                    pair += self.latent(a, ranks[a], k) * self.latent(b, ranks[b], k);
                }
            }
        }
        logit += 0.08 * pair;
        for (j, &tj) in t.iter().enumerate() {
            let c = if j % 2 == 0 { 0.25 } else { -0.25 };
            logit += c * (tj - 1.0);
        }
        logit += 0.4 * (t[0] - 1.0) * (t[1] - 1.0);
        let probability = 1.0 / (1.0 + (-logit).exp());
        let label = u8::from(self.rng.next_f64() < probability);
        GenRow {
            label,
            dense,
            ranks,
            probability,
        }
    }

    /// Writes the row as one Criteo TSV line.
    pub fn write_row(&self, row: &GenRow, out: &mut impl Write) -> std::io::Result<()> {
        write!(out, "{}", row.label)?;
        for d in &row.dense {
            match d {
                Some(x) => write!(out, "\t{x}")?,
                None => out.write_all(b"\t")?,
            }
        }
        for (f, &r) in row.ranks.iter().enumerate() {
            write!(out, "\t{}", self.value_string(f, r))?;
        }
        out.write_all(b"\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::auc;
    use crate::sample::criteo::{read_into, CriteoParser};
    use crate::sample::{RejectSink, SampleBlock, Schema};

    #[test]
    fn rows_parse_and_are_reproducible() {
        let cfg = GenConfig {
            rows: 2000,
            seed: 7,
            ..Default::default()
        };
        let render = || {
            let mut g = Generator::new(cfg.clone()).unwrap();
            let mut out = Vec::new();
            let mut probs = Vec::new();
            for _ in 0..cfg.rows {
                let r = g.next_row();
                probs.push(r.probability as f32);
                g.write_row(&r, &mut out).unwrap();
            }
            (out, probs)
        };
        let (a, probs) = render();
        assert_eq!(a, render().0, "same seed, same bytes");
        let schema = Schema::criteo(16);
        let mut b = SampleBlock::for_schema(&schema);
        let mut sink = RejectSink::counting();
        read_into(
            &CriteoParser::new(&schema).unwrap(),
            &a[..],
            &mut b,
            &mut sink,
            None,
        )
        .unwrap();
        assert_eq!((b.len(), sink.stats().total), (2000, 0));
        let labels: Vec<f32> = b.ctr_labels().collect();
        let ctr = labels.iter().sum::<f32>() / labels.len() as f32;
        assert!((0.1..0.45).contains(&ctr), "ctr {ctr}");
        // The true probabilities rank the labels far better than chance.
        let oracle = auc(&probs, &labels).unwrap();
        assert!(oracle > 0.75, "oracle auc {oracle}");
    }

    #[test]
    fn ids_are_mostly_rare() {
        let mut g = Generator::new(GenConfig::default()).unwrap();
        let mut seen = std::collections::HashMap::new();
        for _ in 0..20_000 {
            let r = g.next_row();
            *seen.entry(r.ranks[0]).or_insert(0u32) += 1;
        }
        let singletons = seen.values().filter(|&&c| c == 1).count();
        assert!(
            singletons * 2 > seen.len(),
            "{singletons} of {}",
            seen.len()
        );
    }

    #[test]
    fn drift_changes_the_hidden_model() {
        let mk = |drift| {
            let mut g = Generator::new(GenConfig {
                rows: 1000,
                drift,
                ..Default::default()
            })
            .unwrap();
            (0..1000)
                .map(|_| g.next_row().probability)
                .collect::<Vec<_>>()
        };
        let (a, b) = (mk(0.0), mk(1.0));
        assert_eq!(a[0], b[0], "row 0 has no rotation yet");
        assert_ne!(a[999], b[999]);
    }
}
