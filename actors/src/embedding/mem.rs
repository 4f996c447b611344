//! Huge-page buffers and prefetch: the crate's only `unsafe` code.
//!
//! Embedding lookups are random reads over gigabytes, so two things decide their speed: TLB
//! misses (huge pages cut them 512-fold, and measured 1.5-2x on every table design tried) and
//! memory-level parallelism (prefetching a whole batch's lines before touching any of them).
//! Both need a little `unsafe`, kept here with its reasons.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ptr::NonNull;

const HUGE_PAGE: usize = 2 << 20;

/// A fixed-length, zero-initialised buffer of plain-old-data, on huge pages when large.
///
/// Large buffers come straight from `mmap`, so their zero pages cost nothing until touched
/// (a `Vec` from an aligned allocator would memset them), and are advised as huge pages.
pub(crate) struct HugeBuf<T> {
    ptr: NonNull<T>,
    len: usize,
    /// What to give back on drop: the mmap base and length, or the heap layout.
    alloc: Alloc,
    _owns: PhantomData<T>,
}

enum Alloc {
    None,
    Mmap { base: *mut libc::c_void, len: usize },
    Heap(std::alloc::Layout),
}

// SAFETY: HugeBuf owns its memory exclusively, like a Box<[T]>.
unsafe impl<T: Send> Send for HugeBuf<T> {}
// SAFETY: shared access only hands out &[T].
unsafe impl<T: Sync> Sync for HugeBuf<T> {}

impl<T: bytemuck::Pod> HugeBuf<T> {
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .expect("buffer size overflows usize");
        if bytes == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len,
                alloc: Alloc::None,
                _owns: PhantomData,
            };
        }
        if bytes >= HUGE_PAGE {
            // Over-allocate by one huge page so the usable region can start 2 MiB-aligned:
            // only aligned 2 MiB ranges can be backed by a huge page.
            let map_len = bytes + HUGE_PAGE;
            // SAFETY: an anonymous private mapping with no address hint has no preconditions.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(
                    std::alloc::Layout::from_size_align(bytes, HUGE_PAGE).expect("valid layout"),
                );
            }
            let aligned = (base as usize).next_multiple_of(HUGE_PAGE);
            // SAFETY: [aligned, aligned + bytes) lies inside the mapping just created. madvise
            // is only a hint; its failure (THP disabled) leaves ordinary pages, which is fine.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
            }
            Self {
                ptr: NonNull::new(aligned as *mut T).expect("mmap returned a non-null mapping"),
                len,
                alloc: Alloc::Mmap { base, len: map_len },
                _owns: PhantomData,
            }
        } else {
            let layout =
                std::alloc::Layout::from_size_align(bytes, 64.max(std::mem::align_of::<T>()))
                    .expect("valid layout");
            // SAFETY: layout has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
            let Some(ptr) = NonNull::new(p) else {
                std::alloc::handle_alloc_error(layout)
            };
            Self {
                ptr,
                len,
                alloc: Alloc::Heap(layout),
                _owns: PhantomData,
            }
        }
    }

    #[inline]
    pub(crate) fn as_slice(&self) -> &[T] {
        // SAFETY: ptr is valid for len elements (zero-initialised, and all-zero is a valid T
        // because T: Pod), and &self forbids concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    #[inline]
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for HugeBuf<T> {
    fn drop(&mut self) {
        match self.alloc {
            Alloc::None => {}
            // SAFETY: base/len are exactly what mmap returned and was asked for.
            Alloc::Mmap { base, len } => unsafe {
                libc::munmap(base, len);
            },
            // SAFETY: ptr came from alloc_zeroed with this layout.
            Alloc::Heap(layout) => unsafe {
                std::alloc::dealloc(self.ptr.as_ptr() as *mut u8, layout)
            },
        }
    }
}

impl<T> std::fmt::Debug for HugeBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HugeBuf<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

/// Hints the CPU to pull the cache line at `p` into L1. Never faults, whatever `p` is.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint that never faults, even on an invalid address; SSE is part
    // of the x86_64 baseline.
    #[allow(unused_unsafe)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_zeroed_and_are_writable() {
        for len in [0usize, 1, 1000, (4 << 20) / 8 + 3] {
            let mut b = HugeBuf::<u64>::zeroed(len);
            assert_eq!(b.as_slice().len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            if len > 0 {
                b.as_mut_slice()[len - 1] = 7;
                assert_eq!(b.as_slice()[len - 1], 7);
                assert_eq!(b.as_slice().as_ptr() as usize % 64, 0);
            }
        }
    }
}
