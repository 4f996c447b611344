//! The embedding benchmark workload, shared by `freshet bench embedding` and the criterion
//! bench, so that both measure the same thing.
//!
//! Every figure comes with its baseline from the same process:
//! - the table against `HashMap<u64, Vec<f32>>` with the ahash hasher (the strong baseline),
//!   weights and Adagrad accumulator in the Vec;
//! - lookups against a memory-limit probe: uniform random 64-byte reads over a buffer as large
//!   as the table, with the same freedom to prefetch across the batch.

use std::collections::HashMap;

use super::mem::{prefetch, HugeBuf};
use crate::rng::{Xoshiro256, Zipf};
use crate::routing::mix64;

/// The key of Zipf rank `r`: scattered, so hot keys sit far apart in memory.
pub fn key_of_rank(rank: u64, seed: u64) -> u64 {
    mix64(rank ^ mix64(seed))
}

/// `count` batches of `batch` distinct keys each, drawn by Zipf(`s`) over `keys` ranks.
pub fn zipf_batches(keys: u64, s: f64, batch: usize, count: usize, seed: u64) -> Vec<Vec<u64>> {
    let z = Zipf::new(keys, s);
    let mut rng = Xoshiro256::seed_from_u64(seed ^ 0xba7c4);
    let batch = batch.min(keys as usize);
    (0..count)
        .map(|_| {
            let mut seen = ahash::AHashSet::with_capacity(batch * 2);
            let mut b = Vec::with_capacity(batch);
            while b.len() < batch {
                let k = key_of_rank(z.sample(&mut rng) - 1, seed);
                if seen.insert(k) {
                    b.push(k);
                }
            }
            b
        })
        .collect()
}

/// The baseline: one heap Vec per key holding weights then the Adagrad accumulator.
#[derive(Debug)]
pub struct HashMapBaseline {
    map: HashMap<u64, Vec<f32>, ahash::RandomState>,
    dim: usize,
}

impl HashMapBaseline {
    pub fn new(dim: usize, capacity: usize) -> Self {
        Self {
            map: HashMap::with_capacity_and_hasher(capacity, ahash::RandomState::new()),
            dim,
        }
    }

    pub fn insert(&mut self, key: u64) {
        let mut row = vec![0.01f32; 2 * self.dim];
        row[self.dim..].fill(0.1);
        self.map.insert(key, row);
    }

    pub fn lookup(&self, keys: &[u64], out: &mut Vec<f32>) {
        for k in keys {
            match self.map.get(k) {
                Some(r) => out.extend_from_slice(&r[..self.dim]),
                None => out.extend(std::iter::repeat_n(0.0, self.dim)),
            }
        }
    }

    pub fn adagrad(&mut self, keys: &[u64], grads: &[f32], lr: f32) {
        let d = self.dim;
        for (i, k) in keys.iter().enumerate() {
            if let Some(r) = self.map.get_mut(k) {
                let (w, acc) = r.split_at_mut(d);
                for j in 0..d {
                    let g = grads[i * d + j];
                    acc[j] += g * g;
                    w[j] -= lr * g / (acc[j].sqrt() + 1e-10);
                }
            }
        }
    }
}

/// Uniform random 64-byte reads over a buffer, prefetched a batch at a time: the memory
/// system's limit for the lookup pattern.
#[derive(Debug)]
pub struct MemoryProbe {
    buf: HugeBuf<f32>,
    lines: u64,
}

impl MemoryProbe {
    pub fn new(bytes: usize) -> Self {
        let floats = (bytes / 64).max(1) * 16;
        let mut buf = HugeBuf::zeroed(floats);
        // Touch every page so the probe never measures first-touch faults.
        for (i, x) in buf.as_mut_slice().iter_mut().enumerate().step_by(1024) {
            *x = i as f32;
        }
        Self {
            lines: (floats / 16) as u64,
            buf,
        }
    }

    pub fn bytes(&self) -> usize {
        self.buf.as_slice().len() * 4
    }

    /// `count` batches of `batch` uniform line indices.
    pub fn batches(&self, batch: usize, count: usize, seed: u64) -> Vec<Vec<u64>> {
        let mut rng = Xoshiro256::seed_from_u64(seed ^ 0x9_0be);
        (0..count)
            .map(|_| (0..batch).map(|_| rng.below(self.lines)).collect())
            .collect()
    }

    /// Reads the first `floats` of each line (the row's weights), as a lookup copies them.
    pub fn read(&self, lines: &[u64], floats: usize, out: &mut Vec<f32>) {
        let b = self.buf.as_slice();
        for &l in lines {
            prefetch(b.as_ptr().wrapping_add(l as usize * 16));
        }
        let floats = floats.min(16);
        for &l in lines {
            let o = l as usize * 16;
            out.extend_from_slice(&b[o..o + floats]);
        }
    }
}

/// First-touch throughput of newly mapped memory, in MB/s: maps `bytes` as a table's arena is
/// mapped (huge pages advised), writes one byte per 4 KiB page, and gives it back. A table
/// built in new memory pays this once per byte, so a restore can go no faster than this
/// allows, however fast the disk is.
///
/// If the kernel hands out pages this process freed moments ago, the figure is about memory
/// bandwidth. If they come from memory a virtual machine gave back to its host (virtio free
/// page reporting), every page is faulted in again through the host and the figure falls far
/// below it.
pub fn fresh_memory_mb_per_s(bytes: usize) -> f64 {
    let t = std::time::Instant::now();
    let mut buf: HugeBuf<u8> = HugeBuf::zeroed(bytes);
    for page in buf.as_mut_slice().chunks_mut(4096) {
        page[0] = 1;
    }
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    std::hint::black_box(&buf);
    bytes as f64 / 1e6 / secs
}
