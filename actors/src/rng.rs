//! Random numbers whose streams never change.
//!
//! Initial embedding rows, generated data sets and sampled eviction must come out the same on
//! every machine and in every later version: a fixture generated today has to train the same
//! model next year. `rand`'s `StdRng` documents that its algorithm may change between versions,
//! so Freshet fixes its own: SplitMix64 for seeding and per-key streams, xoshiro256++
//! (Blackman and Vigna) for long streams, Box-Muller for the generators' normals, Marsaglia
//! and Tsang's ziggurat for the normals of new embedding rows, and Hörmann and Derflinger's
//! rejection-inversion for Zipf. Their test vectors are frozen in the tests below.
//!
//! New embedding rows use the ziggurat rather than Box-Muller: a training step creates
//! thousands of rows, and Box-Muller's logarithm and cosine dominated the shard owners' time
//! (`docs/design-notes.md`). The generators keep Box-Muller, so generated data is unchanged.

use serde::{Deserialize, Serialize};

use crate::routing::mix64;

/// SplitMix64: tiny state, good enough to seed other generators and for short per-key streams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)` with 24 bits of precision, exact as an f32.
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal, by Box-Muller (one of the pair is discarded to keep no state).
    #[inline]
    pub fn next_normal(&mut self) -> f64 {
        // 1 - u lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A standard normal by Marsaglia and Tsang's ziggurat ("The Ziggurat Method for
    /// Generating Random Variables", 2000), 128 layers: one 32-bit draw, a multiply and a
    /// compare in about 98.8% of calls, a logarithm or exponential only in the rest.
    #[inline]
    pub fn next_normal_ziggurat(&mut self) -> f64 {
        let z = &*ZIGGURAT;
        loop {
            // The high half of the draw: a signed 32-bit value whose low 7 bits pick the layer.
            let j = (self.next_u64() >> 32) as u32 as i32;
            let i = (j & 0x7f) as usize;
            let x = f64::from(j) * z.w[i];
            if j.unsigned_abs() < z.k[i] {
                return x;
            }
            if i == 0 {
                // The base layer's tail beyond R, by Marsaglia's exponential rejection.
                loop {
                    let x = -(1.0 - self.next_f64()).ln() * (1.0 / ZIG_R);
                    let y = -(1.0 - self.next_f64()).ln();
                    if y + y >= x * x {
                        return if j > 0 { ZIG_R + x } else { -ZIG_R - x };
                    }
                }
            }
            // The wedge between two layers: accept under the density.
            if z.f[i] + self.next_f64() * (z.f[i - 1] - z.f[i]) < (-0.5 * x * x).exp() {
                return x;
            }
        }
    }
}

/// Where the ziggurat's base layer ends and its tail begins (128 layers).
const ZIG_R: f64 = 3.442_619_855_899;

/// Per layer: `k` the acceptance bound on |j|, `w` the scale from j to x, `f` the density at
/// the layer's edge.
struct Ziggurat {
    k: [u32; 128],
    w: [f64; 128],
    f: [f64; 128],
}

/// The layer tables, computed once as in Marsaglia and Tsang's `zigset`: each layer has the
/// same area `vn`.
static ZIGGURAT: std::sync::LazyLock<Ziggurat> = std::sync::LazyLock::new(|| {
    let m1 = 2_147_483_648.0f64;
    let vn = 9.912_563_035_262_17e-3f64;
    let mut dn = ZIG_R;
    let mut tn = dn;
    let q = vn / (-0.5 * dn * dn).exp();
    let mut z = Ziggurat {
        k: [0; 128],
        w: [0.0; 128],
        f: [0.0; 128],
    };
    z.k[0] = ((dn / q) * m1) as u32;
    z.k[1] = 0;
    z.w[0] = q / m1;
    z.w[127] = dn / m1;
    z.f[0] = 1.0;
    z.f[127] = (-0.5 * dn * dn).exp();
    for i in (1..=126).rev() {
        dn = (-2.0 * (vn / dn + (-0.5 * dn * dn).exp()).ln()).sqrt();
        z.k[i + 1] = ((dn / tn) * m1) as u32;
        tn = dn;
        z.f[i] = (-0.5 * dn * dn).exp();
        z.w[i] = dn / m1;
    }
    z
});

/// xoshiro256++: the long-stream generator (data generation, sampling decisions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut sm = SplitMix64::new(seed);
        let s = [sm.next_u64(), sm.next_u64(), sm.next_u64(), sm.next_u64()];
        Self { s }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    #[inline]
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for n < 2^32).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// Zipf over ranks `1..=n` with exponent `s > 0`: P(k) ∝ k^-s.
///
/// Rejection-inversion (Hörmann and Derflinger 1996), as in Apache Commons RNG: O(1) per draw
/// and no table, so it serves a million-value vocabulary as cheaply as a ten-value one.
#[derive(Clone, Debug)]
pub struct Zipf {
    n: f64,
    exponent: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    s: f64,
}

impl Zipf {
    /// # Panics
    /// If `n == 0` or `exponent` is not positive and finite: callers validate user input first.
    pub fn new(n: u64, exponent: f64) -> Self {
        assert!(n > 0, "zipf needs at least one element");
        assert!(
            exponent > 0.0 && exponent.is_finite(),
            "zipf exponent must be > 0"
        );
        let mut z = Self {
            n: n as f64,
            exponent,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            s: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(n as f64 + 0.5);
        z.s = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        z
    }

    /// A rank in `1..=n`.
    pub fn sample(&self, rng: &mut Xoshiro256) -> u64 {
        loop {
            let u = self.h_integral_n + rng.next_f64() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.s || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    fn h(&self, x: f64) -> f64 {
        (-self.exponent * x.ln()).exp()
    }

    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.exponent) * log_x) * log_x
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.exponent)).max(-1.0);
        (helper1(t) * x).exp()
    }
}

/// `ln(1 + x) / x`, accurate near zero.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// `(e^x - 1) / x`, accurate near zero.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

/// FNV-1a over bytes: a fixed, stable hash for short names (table salts).
pub const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_frozen() {
        let mut sm = SplitMix64::new(1234567);
        assert_eq!(sm.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(sm.next_u64(), 3_203_168_211_198_807_973);
        let mut x = Xoshiro256::seed_from_u64(42);
        let first: Vec<u64> = (0..3).map(|_| x.next_u64()).collect();
        assert_eq!(first, XOSHIRO_42);
        assert_eq!(fnv1a(b"user_id"), FNV_USER_ID);
    }

    const XOSHIRO_42: [u64; 3] = [
        15_021_278_609_987_233_951,
        5_881_210_131_331_364_753,
        18_149_643_915_985_481_100,
    ];
    const FNV_USER_ID: u64 = 9_278_023_968_149_642_234;

    #[test]
    fn zipf_frequencies_follow_the_power_law() {
        let n = 1000u64;
        let s = 1.1;
        let z = Zipf::new(n, s);
        let mut rng = Xoshiro256::seed_from_u64(7);
        let draws = 400_000;
        let mut counts = vec![0u32; n as usize + 1];
        for _ in 0..draws {
            let k = z.sample(&mut rng);
            assert!((1..=n).contains(&k));
            counts[k as usize] += 1;
        }
        let norm: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
        for k in [1u64, 2, 3, 10, 50] {
            let p = (k as f64).powf(-s) / norm;
            let got = f64::from(counts[k as usize]) / draws as f64;
            assert!((got - p).abs() < 0.1 * p, "rank {k}: got {got}, want {p}");
        }
    }

    /// The ziggurat's draws against the standard normal CDF at fixed points, on both sides and
    /// in the tail that its base layer handles separately. Every bound is several standard
    /// errors wide, so a correct generator fails it with negligible probability, while a wrong
    /// layer table or a sign slip moves some point by far more.
    #[test]
    fn ziggurat_follows_the_standard_normal() {
        let seed = crate::testkit::seed("ziggurat_cdf");
        let mut rng = SplitMix64::new(seed);
        let n = 1_000_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.next_normal_ziggurat()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.005, "seed {seed}: mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "seed {seed}: var {var}");
        // Phi(t) for t = -3.5, -3, -2, -1, -0.5, 0 (and by symmetry 0.5 .. 3.5).
        let phi = [
            (-3.5, 2.326_29e-4),
            (-3.0, 1.349_90e-3),
            (-2.0, 2.275_01e-2),
            (-1.0, 1.586_55e-1),
            (-0.5, 3.085_38e-1),
            (0.0, 0.5),
        ];
        for (t, p) in phi {
            for (t, p) in [(t, p), (-t, 1.0 - p)] {
                let got = xs.iter().filter(|&&x| x < t).count() as f64 / n as f64;
                // Five standard errors of a proportion, at least 3e-5.
                let tol = (5.0 * (p * (1.0 - p) / n as f64).sqrt()).max(3e-5);
                assert!(
                    (got - p).abs() < tol,
                    "seed {seed}: P(x < {t}) = {got}, want {p} within {tol}"
                );
            }
        }
        assert!(xs.iter().all(|x| x.is_finite()), "seed {seed}");
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut rng = SplitMix64::new(99);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.next_normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
