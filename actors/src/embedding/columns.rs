//! The on-disk and on-wire encoding of a [`RowBlock`]'s metadata columns.
//!
//! A row block is written as two byte strings: the float block raw (weights and optimizer
//! state are near-random bits that no fast codec shrinks, and a copy is all they cost), and
//! the metadata columns packed as follows:
//!
//! ```text
//! u8      codec: 0 raw, 1 lz4 (block format), 2 zstd (only written by the codec comparison)
//! u32 LE  rows
//! u32 LE  bytes of the packed columns before compression (36 per row)
//! ...     the packed columns, compressed by the codec
//! ```
//!
//! The packed columns are, in order, `row_ids` (u32), `keys` (u64), `versions` (u64),
//! `update_steps`, `access_steps`, `update_secs`, `freqs` (u32), each **byte-shuffled**: all
//! first bytes of the column, then all second bytes, and so on. Versions, steps and times of
//! the rows in one delta lie close together, so their high bytes form long runs that lz4
//! removes, while the same values interleaved would give it nothing to match. This is how a
//! delta stays within 1.2x of its rows' key and float bytes (see `docs/model-store.md`).
//!
//! lz4 was chosen over zstd by `benches/ckpt_codec.rs`; the figures are in
//! `docs/performance.md`.

use serde::{Deserialize, Serialize};

use super::snapshot::{byte_vec, f32_bytes, RowBlock};
use super::SnapshotError;

/// Bytes per row of the packed metadata columns before compression.
pub const META_BYTES_PER_ROW: usize = 4 + 8 + 8 + 4 + 4 + 4 + 4;

/// How the metadata columns are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Lz4,
    /// zstd at the given level; only with feature `codec-compare`.
    #[cfg(feature = "codec-compare")]
    Zstd(i32),
}

impl Codec {
    fn tag(self) -> u8 {
        match self {
            Codec::Raw => 0,
            Codec::Lz4 => 1,
            #[cfg(feature = "codec-compare")]
            Codec::Zstd(_) => 2,
        }
    }
}

/// The codec Freshet writes.
pub const DEFAULT_CODEC: Codec = Codec::Lz4;

fn shuffle_into<const W: usize, T: Copy>(out: &mut Vec<u8>, col: &[T], le: impl Fn(T) -> [u8; W]) {
    let start = out.len();
    out.resize(start + col.len() * W, 0);
    let n = col.len();
    let dst = &mut out[start..];
    for (i, &v) in col.iter().enumerate() {
        let b = le(v);
        for (plane, byte) in b.into_iter().enumerate() {
            dst[plane * n + i] = byte;
        }
    }
}

fn unshuffle<const W: usize, T>(src: &[u8], n: usize, from: impl Fn([u8; W]) -> T) -> Vec<T> {
    (0..n)
        .map(|i| {
            let mut b = [0u8; W];
            for (plane, byte) in b.iter_mut().enumerate() {
                *byte = src[plane * n + i];
            }
            from(b)
        })
        .collect()
}

/// The metadata columns of `block`, packed and compressed with `codec`.
pub fn encode_meta(block: &RowBlock, codec: Codec) -> Vec<u8> {
    let n = block.len();
    let mut packed = Vec::with_capacity(n * META_BYTES_PER_ROW);
    shuffle_into(&mut packed, &block.row_ids, u32::to_le_bytes);
    shuffle_into(&mut packed, &block.keys, u64::to_le_bytes);
    shuffle_into(&mut packed, &block.versions, u64::to_le_bytes);
    shuffle_into(&mut packed, &block.update_steps, u32::to_le_bytes);
    shuffle_into(&mut packed, &block.access_steps, u32::to_le_bytes);
    shuffle_into(&mut packed, &block.update_secs, u32::to_le_bytes);
    shuffle_into(&mut packed, &block.freqs, u32::to_le_bytes);
    let body = match codec {
        Codec::Raw => packed.clone(),
        Codec::Lz4 => lz4_flex::compress(&packed),
        #[cfg(feature = "codec-compare")]
        Codec::Zstd(level) => {
            // Compressing into memory cannot fail short of allocation failure.
            zstd::bulk::compress(&packed, level).unwrap_or_else(|_| packed.clone())
        }
    };
    let mut out = Vec::with_capacity(9 + body.len());
    out.push(codec.tag());
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&(packed.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes metadata columns written by [`encode_meta`] into `block`'s columns (replacing
/// them). Every length is checked: bytes from disk or network never panic.
pub fn decode_meta(bytes: &[u8], block: &mut RowBlock) -> Result<(), SnapshotError> {
    decode_meta_inner(bytes, block).map_err(SnapshotError::Malformed)
}

fn decode_meta_inner(bytes: &[u8], block: &mut RowBlock) -> Result<(), String> {
    if bytes.len() < 9 {
        return Err(format!(
            "row metadata of {} bytes is shorter than its 9-byte header",
            bytes.len()
        ));
    }
    let tag = bytes[0];
    let n = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let raw_len = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    if Some(raw_len) != n.checked_mul(META_BYTES_PER_ROW) {
        return Err(format!(
            "row metadata for {n} rows claims {raw_len} bytes, expected {}",
            n.saturating_mul(META_BYTES_PER_ROW)
        ));
    }
    let body = &bytes[9..];
    let decoded;
    let packed: &[u8] = match tag {
        0 => body,
        1 => {
            decoded = lz4_flex::decompress(body, raw_len)
                .map_err(|e| format!("row metadata does not decompress (lz4): {e}"))?;
            &decoded
        }
        #[cfg(feature = "codec-compare")]
        2 => {
            decoded = zstd::bulk::decompress(body, raw_len)
                .map_err(|e| format!("row metadata does not decompress (zstd): {e}"))?;
            &decoded
        }
        t => return Err(format!("row metadata has unknown codec {t}")),
    };
    if packed.len() != raw_len {
        return Err(format!(
            "row metadata holds {} bytes after decoding, expected {raw_len}",
            packed.len()
        ));
    }
    let mut at = 0;
    let mut take = |w: usize| {
        let s = &packed[at..at + w * n];
        at += w * n;
        s
    };
    block.row_ids = unshuffle(take(4), n, u32::from_le_bytes);
    block.keys = unshuffle(take(8), n, u64::from_le_bytes);
    block.versions = unshuffle(take(8), n, u64::from_le_bytes);
    block.update_steps = unshuffle(take(4), n, u32::from_le_bytes);
    block.access_steps = unshuffle(take(4), n, u32::from_le_bytes);
    block.update_secs = unshuffle(take(4), n, u32::from_le_bytes);
    block.freqs = unshuffle(take(4), n, u32::from_le_bytes);
    Ok(())
}

impl Serialize for RowBlock {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        struct Meta<'a>(&'a RowBlock);
        impl Serialize for Meta<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&encode_meta(self.0, DEFAULT_CODEC))
            }
        }
        struct Floats<'a>(&'a [f32]);
        impl Serialize for Floats<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                f32_bytes::serialize(self.0, s)
            }
        }
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&Meta(self))?;
        t.serialize_element(&Floats(&self.data))?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for RowBlock {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire(
            #[serde(with = "byte_vec")] Vec<u8>,
            #[serde(with = "f32_bytes")] Vec<f32>,
        );
        let Wire(meta, data) = Wire::deserialize(d)?;
        let mut block = RowBlock {
            data,
            ..RowBlock::default()
        };
        decode_meta(&meta, &mut block).map_err(serde::de::Error::custom)?;
        Ok(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: usize) -> RowBlock {
        let mut b = RowBlock::with_capacity(n, 2);
        for i in 0..n as u64 {
            b.push_meta(
                (i * 7 % 1000) as u32,
                crate::routing::mix64(i),
                1_000_000 + i * 3,
                500 + (i % 9) as u32,
                510,
                1_700_000_000,
                (i % 4) as u32 + 1,
            );
            b.data.extend_from_slice(&[i as f32, -(i as f32)]);
        }
        b
    }

    #[test]
    fn round_trips_with_every_codec() {
        let b = block(1000);
        for codec in [Codec::Raw, Codec::Lz4] {
            let bytes = encode_meta(&b, codec);
            let mut back = RowBlock::default();
            decode_meta(&bytes, &mut back).unwrap();
            back.data = b.data.clone();
            assert_eq!(back, b, "{codec:?}");
        }
        // Shuffled columns of close values compress well below the raw 36 bytes per row:
        // random keys (8) plus a few bytes for the rest.
        let lz4 = encode_meta(&b, Codec::Lz4).len() as f64 / 1000.0;
        assert!(lz4 < 20.0, "lz4 packs {lz4} bytes per row");
    }

    #[test]
    fn malformed_metadata_is_refused_not_panicking() {
        let good = encode_meta(&block(50), Codec::Lz4);
        let mut out = RowBlock::default();
        for bad in [
            vec![],
            vec![1, 2, 3],
            good[..good.len() / 2].to_vec(),
            {
                let mut g = good.clone();
                g[0] = 9;
                g
            },
            {
                // A row count that disagrees with the byte count.
                let mut g = good.clone();
                g[1] = g[1].wrapping_add(1);
                g
            },
            {
                let mut g = encode_meta(&block(50), Codec::Raw);
                g.pop();
                g
            },
        ] {
            assert!(decode_meta(&bad, &mut out).is_err(), "{bad:?}");
        }
        // Random bytes never panic.
        let mut rng = crate::rng::Xoshiro256::seed_from_u64(7);
        for _ in 0..2000 {
            let len = (rng.next_u64() % 64) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if let Some(b) = v.first_mut() {
                *b %= 3;
            }
            let _ = decode_meta(&v, &mut out);
        }
    }
}
