//! Huge-page buffers and prefetch: the crate's only `unsafe` code.
//!
//! Embedding lookups are random reads over gigabytes, so two things decide their speed: TLB
//! misses (huge pages cut them 512-fold; `docs/design-notes.md` has what that gains) and
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

    /// Faults every page of the buffer in now, by writing a zero (what it already holds) into
    /// each 4 KiB page, so that later first touches cost nothing. Returns the bytes touched.
    pub(crate) fn prefault(&mut self) -> usize {
        let step = (4096 / std::mem::size_of::<T>().max(1)).max(1);
        let s = self.as_mut_slice();
        for i in (0..s.len()).step_by(step) {
            // Volatile, so that the store stays even where the compiler could prove the
            // buffer already holds zero: the store is there for its page fault.
            let p: *mut T = &mut s[i];
            // SAFETY: `p` comes from a live `&mut T` into this buffer; all-zero is a valid T.
            unsafe { std::ptr::write_volatile(p, T::zeroed()) };
        }
        std::mem::size_of_val(s)
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

/// A zeroed `Vec` of `len` elements whose large interior is advised as huge pages before
/// anything touches it.
///
/// Restore reads hundreds of megabytes into fresh buffers. A large zeroed `Vec` comes from
/// `calloc`, which maps fresh zero pages without writing them, so the first write to each page
/// is a fault; on 4 KiB pages that is one fault per 4 KiB, and under a hypervisor each fault
/// is a trip to it, so reading a file into a fresh `Vec` runs several times slower than into a
/// reused buffer (`docs/design-notes.md`). Advising the 2 MiB-aligned interior as huge pages
/// makes it one fault per 2 MiB.
pub(crate) fn huge_zeroed_vec<T: ZeroIsCalloc>(len: usize) -> Vec<T> {
    let mut v = vec![T::zero(); len];
    let bytes = len * std::mem::size_of::<T>();
    if bytes >= 2 * HUGE_PAGE {
        let start = (v.as_mut_ptr() as usize).next_multiple_of(HUGE_PAGE);
        let end = (v.as_mut_ptr() as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside `v`'s allocation, which we own; madvise only
            // advises the kernel and never changes the contents of touched or untouched pages.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

/// Element types whose all-zero `vec![zero; n]` the standard library turns into `calloc`
/// (no write of the zeros), which is what keeps [`huge_zeroed_vec`]'s pages untouched.
pub(crate) trait ZeroIsCalloc: Copy {
    fn zero() -> Self;
}

impl ZeroIsCalloc for u8 {
    fn zero() -> Self {
        0
    }
}

impl ZeroIsCalloc for f32 {
    fn zero() -> Self {
        0.0
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
    fn huge_vecs_are_zeroed_at_every_size() {
        for len in [0usize, 1, 4097, (6 << 20) + 13] {
            let mut v = huge_zeroed_vec::<f32>(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
            v.iter_mut().for_each(|x| *x = 1.5);
            assert!(v.iter().all(|&x| x == 1.5));
            let b = huge_zeroed_vec::<u8>(len);
            assert!(b.len() == len && b.iter().all(|&x| x == 0));
        }
    }

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
