//! Contiguous arenas for rows and row metadata.
//!
//! Rows live in fixed-size chunks of one huge-page buffer each, addressed by slot number, never
//! in a `Vec` per row. Chunks are never moved, so growing a table copies nothing and never
//! pauses training, and a slot's address is one shift and one mask away.

use bytemuck::Pod;

use super::mem::{prefetch, HugeBuf};

/// Bytes per chunk: a multiple of the 2 MiB huge page.
const CHUNK_BYTES: usize = 8 << 20;

/// A growable array of fixed-width records of `T`, `width` elements each, in stable chunks.
#[derive(Debug)]
pub(crate) struct Arena<T> {
    width: usize,
    shift: u32,
    chunks: Vec<HugeBuf<T>>,
}

impl<T: Pod> Arena<T> {
    /// `width` elements per slot. Slots per chunk is a power of two so that addressing is
    /// shift-and-mask.
    pub(crate) fn new(width: usize) -> Self {
        assert!(width > 0);
        let per_chunk = (CHUNK_BYTES / (width * std::mem::size_of::<T>())).max(1);
        let shift = usize::BITS - 1 - per_chunk.leading_zeros();
        Self {
            width,
            shift,
            chunks: Vec::new(),
        }
    }

    /// Makes slots `0..slots` addressable.
    pub(crate) fn ensure(&mut self, slots: usize) {
        while self.capacity() < slots {
            self.chunks.push(HugeBuf::zeroed(self.width << self.shift));
        }
    }

    /// Faults in every chunk's pages now (see [`HugeBuf::prefault`]); returns the bytes.
    pub(crate) fn prefault(&mut self) -> usize {
        self.chunks.iter_mut().map(HugeBuf::prefault).sum()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.chunks.len() << self.shift
    }

    pub(crate) fn bytes(&self) -> usize {
        self.capacity() * self.width * std::mem::size_of::<T>()
    }

    #[inline]
    pub(crate) fn get(&self, slot: u32) -> &[T] {
        let slot = slot as usize;
        let chunk = &self.chunks[slot >> self.shift];
        let off = (slot & ((1 << self.shift) - 1)) * self.width;
        &chunk.as_slice()[off..off + self.width]
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, slot: u32) -> &mut [T] {
        let slot = slot as usize;
        let width = self.width;
        let chunk = &mut self.chunks[slot >> self.shift];
        let off = (slot & ((1 << self.shift) - 1)) * width;
        &mut chunk.as_mut_slice()[off..off + width]
    }

    /// Prefetches the cache lines holding the slot's first `bytes` bytes, at most four lines.
    /// They are counted from the slot's address, so a slot that starts part-way into a line
    /// gets the extra line it spans.
    #[inline]
    pub(crate) fn prefetch(&self, slot: u32, bytes: usize) {
        let slot = slot as usize;
        if let Some(chunk) = self.chunks.get(slot >> self.shift) {
            let start = chunk
                .as_slice()
                .as_ptr()
                .wrapping_add((slot & ((1 << self.shift) - 1)) * self.width)
                as *const u8;
            let first = start.wrapping_sub(start as usize % 64);
            let end = start.wrapping_add(bytes.max(1));
            let lines = (end as usize - first as usize).div_ceil(64).min(4);
            for l in 0..lines {
                prefetch(first.wrapping_add(l * 64));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_independent_across_chunk_boundaries() {
        let mut a = Arena::<f32>::new(48);
        let n = (CHUNK_BYTES / (48 * 4)) * 2 + 10;
        a.ensure(n);
        for s in 0..n as u32 {
            a.get_mut(s).fill(s as f32);
        }
        for s in 0..n as u32 {
            assert!(a.get(s).iter().all(|&x| x == s as f32));
        }
    }
}
