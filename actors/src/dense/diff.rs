//! A dense state written as its difference from another: what a delta version stores.
//!
//! Between two versions a quarter of a second apart, most of the dense state is unchanged:
//! the parameters and the optimizer's moments move only at a dense update (once per
//! `train.batch` samples), and only the pending gradient sum grows at every step. Each float
//! block is stored as the bitwise XOR of its new and old values, bytes regrouped by their
//! position in the word (all first bytes, then all second bytes, ...), then LZ4-compressed.
//! Unchanged floats XOR to zero, and a float that moved a little keeps its sign, exponent
//! and high mantissa bits, so the regrouped planes are long runs of zeros. Decoding is exact:
//! XOR with the same base gives the same bits back, and each block carries the CRC32C of the
//! floats it decodes to, so that a diff applied to the wrong base is refused, not used.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::model::PendingUpdate;
use super::{DenseState, InputShape, ModelConfig};
use crate::dense::DenseOptimizerConfig;

/// Why a diff does not apply.
#[derive(Debug, Error, PartialEq)]
pub enum DiffError {
    #[error("{block}: {reason}")]
    Block { block: &'static str, reason: String },
    #[error("{block}: the diff decodes to CRC32C {got:08x}, it was written from {want:08x}; it was applied to another base")]
    WrongBase {
        block: &'static str,
        got: u32,
        want: u32,
    },
}

/// One float block: `len` floats, XOR-ed with the base's block (missing base floats count
/// as zero bits), byte planes regrouped, LZ4-compressed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct XorBlock {
    pub len: u64,
    /// CRC32C of the decoded block's little-endian bytes.
    pub crc32c: u32,
    #[serde(with = "crate::embedding::snapshot::byte_vec")]
    pub lz4: Vec<u8>,
}

/// A whole [`DenseState`] as a diff from a base state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseDiff {
    pub config: ModelConfig,
    pub shape: InputShape,
    pub optimizer_config: DenseOptimizerConfig,
    pub optimizer_step: u64,
    pub params: XorBlock,
    pub m: XorBlock,
    pub v: XorBlock,
    /// The pending update's rows and gradient sum, when there is one.
    pub pending: Option<(u64, XorBlock)>,
}

impl DenseDiff {
    /// `new` as a diff from `base`.
    pub fn between(base: &DenseState, new: &DenseState) -> Self {
        let base_pending = base.pending.as_ref().map_or(&[][..], |p| &p.grads[..]);
        DenseDiff {
            config: new.config.clone(),
            shape: new.shape.clone(),
            optimizer_config: new.optimizer.config.clone(),
            optimizer_step: new.optimizer.step,
            params: XorBlock::encode(&base.params, &new.params),
            m: XorBlock::encode(&base.optimizer.m, &new.optimizer.m),
            v: XorBlock::encode(&base.optimizer.v, &new.optimizer.v),
            pending: new
                .pending
                .as_ref()
                .map(|p| (p.rows as u64, XorBlock::encode(base_pending, &p.grads))),
        }
    }

    /// The state this diff was written from, given the same base.
    pub fn apply(&self, base: &DenseState) -> Result<DenseState, DiffError> {
        let base_pending = base.pending.as_ref().map_or(&[][..], |p| &p.grads[..]);
        let mut optimizer = base.optimizer.clone();
        optimizer.config = self.optimizer_config.clone();
        optimizer.step = self.optimizer_step;
        optimizer.m = self.m.decode("optimizer m", &base.optimizer.m)?;
        optimizer.v = self.v.decode("optimizer v", &base.optimizer.v)?;
        let pending = match &self.pending {
            None => None,
            Some((rows, b)) => Some(PendingUpdate {
                rows: usize::try_from(*rows).map_err(|_| DiffError::Block {
                    block: "pending",
                    reason: format!("{rows} rows"),
                })?,
                grads: b.decode("pending gradients", base_pending)?,
            }),
        };
        Ok(DenseState {
            config: self.config.clone(),
            shape: self.shape.clone(),
            params: self.params.decode("params", &base.params)?,
            optimizer,
            pending,
        })
    }

    /// Only the weights this diff was written with, given the base's weights: what serving
    /// needs. The optimizer's moments and a pending gradient never score a request, and are
    /// two thirds of the floats to decode.
    pub fn apply_params(&self, base_params: &[f32]) -> Result<Vec<f32>, DiffError> {
        self.params.decode("params", base_params)
    }

    /// Compressed bytes of its float blocks.
    pub fn bytes(&self) -> usize {
        let pending = self.pending.as_ref().map_or(0, |(_, b)| b.lz4.len());
        self.params.lz4.len() + self.m.lz4.len() + self.v.lz4.len() + pending
    }
}

/// What a delta version holds of the dense state: the whole state (format v1 and v2), or
/// its diff from the parent's (format v3).
#[derive(Clone, Debug, PartialEq)]
pub enum DenseUpdate {
    Whole(DenseState),
    Diff(DenseDiff),
}

impl DenseUpdate {
    /// The state after this update, on top of the parent's `base`.
    pub fn apply_to(&self, base: &DenseState) -> Result<DenseState, DiffError> {
        match self {
            DenseUpdate::Whole(s) => Ok(s.clone()),
            DenseUpdate::Diff(d) => d.apply(base),
        }
    }

    /// The weights after this update, on top of the parent's weights (see
    /// [`DenseDiff::apply_params`]).
    pub fn params_after(&self, base_params: &[f32]) -> Result<Vec<f32>, DiffError> {
        match self {
            DenseUpdate::Whole(s) => Ok(s.params.clone()),
            DenseUpdate::Diff(d) => d.apply_params(base_params),
        }
    }

    /// The model config and input shape the update was written with.
    pub fn config_and_shape(&self) -> (&ModelConfig, &InputShape) {
        match self {
            DenseUpdate::Whole(s) => (&s.config, &s.shape),
            DenseUpdate::Diff(d) => (&d.config, &d.shape),
        }
    }
}

impl XorBlock {
    fn encode(base: &[f32], new: &[f32]) -> Self {
        let n = new.len();
        // Plane k holds byte k (little-endian) of every word's XOR.
        let mut planes = vec![0u8; n * 4];
        let mut crc = 0u32;
        for (chunk_start, chunk) in new.chunks(4096).enumerate().map(|(i, c)| (i * 4096, c)) {
            let mut le = [0u8; 4 * 4096];
            for (j, x) in chunk.iter().enumerate() {
                let i = chunk_start + j;
                let bits = x.to_bits();
                le[j * 4..j * 4 + 4].copy_from_slice(&bits.to_le_bytes());
                let d = (bits ^ base.get(i).map_or(0, |b| b.to_bits())).to_le_bytes();
                for (k, byte) in d.into_iter().enumerate() {
                    planes[k * n + i] = byte;
                }
            }
            crc = crc32c::crc32c_append(crc, &le[..chunk.len() * 4]);
        }
        XorBlock {
            len: n as u64,
            crc32c: crc,
            lz4: lz4_flex::compress(&planes),
        }
    }

    fn decode(&self, block: &'static str, base: &[f32]) -> Result<Vec<f32>, DiffError> {
        let bad = |reason: String| DiffError::Block { block, reason };
        // LZ4 expands a byte at most 255-fold: a length beyond that is damage, refused before
        // anything is allocated for it.
        let n = usize::try_from(self.len)
            .ok()
            .filter(|&n| {
                n.checked_mul(4)
                    .is_some_and(|b| b <= self.lz4.len().saturating_mul(255) + 64)
            })
            .ok_or_else(|| {
                bad(format!(
                    "{} floats cannot come from {} compressed bytes",
                    self.len,
                    self.lz4.len()
                ))
            })?;
        let planes = lz4_flex::decompress(&self.lz4, n * 4)
            .map_err(|e| bad(format!("does not decompress: {e}")))?;
        if planes.len() != n * 4 {
            return Err(bad(format!(
                "decompresses to {} bytes, not {}",
                planes.len(),
                n * 4
            )));
        }
        let mut out = crate::embedding::huge_zeroed_vec::<f32>(n);
        let mut crc = 0u32;
        let mut le = [0u8; 4 * 4096];
        for start in (0..n).step_by(4096) {
            let end = (start + 4096).min(n);
            for i in start..end {
                let d = u32::from_le_bytes([
                    planes[i],
                    planes[n + i],
                    planes[2 * n + i],
                    planes[3 * n + i],
                ]);
                let bits = d ^ base.get(i).map_or(0, |b| b.to_bits());
                out[i] = f32::from_bits(bits);
                le[(i - start) * 4..(i - start) * 4 + 4].copy_from_slice(&bits.to_le_bytes());
            }
            crc = crc32c::crc32c_append(crc, &le[..(end - start) * 4]);
        }
        if crc != self.crc32c {
            return Err(DiffError::WrongBase {
                block,
                got: crc,
                want: self.crc32c,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::{DenseNet, ModelKind};
    use crate::rng::Xoshiro256;

    fn state(kind: ModelKind, seed: u64) -> DenseState {
        let mut cfg = ModelConfig::new(kind);
        cfg.seed = seed;
        DenseNet::new(
            cfg,
            InputShape {
                fields: vec![4, 4],
                dense: 3,
            },
        )
        .unwrap()
        .state()
    }

    #[test]
    fn a_diff_restores_every_bit_and_is_small_when_little_moved() {
        let base = state(ModelKind::Wdl, 1);
        let mut new = base.clone();
        let mut rng = Xoshiro256::seed_from_u64(7);
        // A few parameters nudged, the moments grown, a pending sum started; one NaN and a
        // negative zero to show bits, not values, are kept.
        for i in (0..new.params.len()).step_by(97) {
            new.params[i] += (rng.next_f64() as f32 - 0.5) * 1e-3;
        }
        new.params[1] = f32::NAN;
        new.params[2] = -0.0;
        for x in new.optimizer.m.iter_mut().step_by(5) {
            *x += 1e-4;
        }
        new.optimizer.step += 1;
        new.pending = Some(PendingUpdate {
            rows: 3,
            grads: (0..new.params.len())
                .map(|i| (i % 7) as f32 * 0.01)
                .collect(),
        });
        let d = DenseDiff::between(&base, &new);
        let back = d.apply(&base).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.params), bits(&new.params));
        assert_eq!(back.optimizer.m, new.optimizer.m);
        assert_eq!(back.optimizer.v, new.optimizer.v);
        assert_eq!(back.optimizer.step, new.optimizer.step);
        assert_eq!(back.pending, new.pending);
        // Serving decodes the weights alone, to the same bits; on other weights, refused.
        assert_eq!(
            bits(&d.apply_params(&base.params).unwrap()),
            bits(&new.params)
        );
        assert!(matches!(
            d.apply_params(&state(ModelKind::Wdl, 2).params),
            Err(DiffError::WrongBase {
                block: "params",
                ..
            })
        ));
        let whole = 4 * (new.params.len() * 4);
        assert!(d.bytes() * 4 < whole, "{} of {whole}", d.bytes());

        // Unchanged: next to nothing. The same diff against another base: refused.
        let same = DenseDiff::between(&new, &new);
        assert!(same.bytes() * 100 < whole, "{}", same.bytes());
        assert!(matches!(
            d.apply(&state(ModelKind::Wdl, 2)),
            Err(DiffError::WrongBase { .. })
        ));
        // A base without the block (a fresh model, another shape): the block is whole.
        let other = state(ModelKind::Lr, 3);
        let back = DenseDiff::between(&other, &new).apply(&other).unwrap();
        assert_eq!(bits(&back.params), bits(&new.params));
    }

    #[test]
    fn a_damaged_block_is_refused() {
        let base = state(ModelKind::Wdl, 1);
        let mut d = DenseDiff::between(&base, &state(ModelKind::Wdl, 2));
        let mid = d.params.lz4.len() / 2;
        d.params.lz4[mid] ^= 0x55;
        assert!(d.apply(&base).is_err());
        let mut d = DenseDiff::between(&base, &base);
        d.m.len += 1;
        assert!(matches!(d.apply(&base), Err(DiffError::Block { .. })));
        d.m.len = u64::MAX;
        assert!(matches!(d.apply(&base), Err(DiffError::Block { .. })));
    }
}
