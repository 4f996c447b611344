//! The one door to the `gemm` crate: a bounds-checked, row-major `C (+)= op(A) op(B)`.
//!
//! `gemm::gemm` is an `unsafe fn` over raw pointers and strides. This module checks every
//! length against the shapes before the call, so the rest of the dense code is safe Rust.
//!
//! The dense threads also run with denormal floats flushed to zero (see [`FlushDenormals`]).
#![allow(unsafe_code)]

use std::time::Instant;

/// How many threads a GEMM may use. Inside [`Threads::install`] the calls run on a private
/// rayon pool of exactly that size, so "2 threads" means 2 whatever the machine, and with
/// denormals flushed to zero.
#[derive(Debug)]
pub struct Threads {
    n: usize,
    pool: Option<rayon::ThreadPool>,
}

impl Threads {
    pub fn new(n: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(n >= 1, "threads must be at least 1, got {n}");
        let pool = if n > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("freshet-dense-{i}"))
                    // The pool's threads only ever run dense work: they keep the mode for
                    // life, so a GEMM's tasks never run on a thread without it.
                    .start_handler(|_| std::mem::forget(FlushDenormals::enter()))
                    .build()?,
            )
        } else {
            None
        };
        Ok(Self { n, pool })
    }

    pub fn count(&self) -> usize {
        self.n
    }

    /// Runs `f` where this pool's threads do the GEMMs, with denormals flushed to zero (on
    /// the calling thread too when there is no pool, restored when `f` returns).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => {
                let _mode = FlushDenormals::enter();
                f()
            }
        }
    }

    /// All of this pool's threads, as a [`Share`] to hand to a GEMM.
    pub fn share(&self) -> Share {
        Share(self.n)
    }
}

/// How many of a [`Threads`] pool's threads one piece of dense work may use.
///
/// Why halves: the dense step's GEMMs are medium-sized (512 x 1024 x 429 and below), and one
/// GEMM split over two threads loses time to the split and the join. Work that comes in two
/// independent halves of equal size (the two row blocks of a layer's forward pass, or a layer's
/// weight gradient `xᵀ dy` and input gradient `dy Wᵀ`, which take the same FLOPs) runs faster as
/// the two halves side by side, each GEMM on half the threads (`docs/design-notes.md` has the
/// W&D tower's GEMMs measured both ways).
///
/// Only meaningful inside [`Threads::install`], where the halves run on the pool's threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share(usize);

impl Share {
    /// Two shares that together use this one's threads, or `None` for a single thread.
    pub fn halves(self) -> Option<(Share, Share)> {
        (self.0 >= 2).then(|| (Share(self.0 / 2), Share(self.0 - self.0 / 2)))
    }

    fn parallelism(self) -> gemm::Parallelism {
        if self.0 > 1 {
            gemm::Parallelism::Rayon(self.0)
        } else {
            gemm::Parallelism::None
        }
    }
}

impl From<&Threads> for Share {
    fn from(t: &Threads) -> Self {
        t.share()
    }
}

/// The float mode of the dense threads: denormal results flush to zero (FTZ) and denormal
/// inputs read as zero (DAZ), as TensorFlow's compute threads run.
///
/// Why: x86 handles a denormal operand or result in a microcode assist that costs on the order
/// of a hundred cycles, where an FMA costs one. Training drives values there on its own: Adam's
/// second moment of a weight whose gradient has stopped decays by `beta2` every step until it is
/// denormal, and gradients of a well-fitted batch shrink below `f32::MIN_POSITIVE`. Without this
/// mode the W&D step on one fixed batch grows several times slower after about a hundred steps
/// (`cargo run --release -p freshet-actors --example dense_step -- wdl 8`; the figures are in
/// `docs/design-notes.md`); with it, it stays flat. Values that small carry no signal at f32's
/// precision next to the rest of a layer, so flushing them changes nothing a model can learn; the
/// step stays deterministic.
///
/// The mode is per thread. Dropping the guard restores the mode it found.
#[derive(Debug)]
#[must_use = "the mode is restored when the guard drops"]
pub struct FlushDenormals {
    saved: Option<u64>,
}

impl FlushDenormals {
    pub fn enter() -> Self {
        let saved = float_mode::get();
        if let Some(mode) = saved {
            float_mode::set(mode | float_mode::FLUSH);
        }
        Self { saved }
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        if let Some(mode) = self.saved {
            float_mode::set(mode);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod float_mode {
    /// MXCSR: FTZ (bit 15) and DAZ (bit 6).
    pub(super) const FLUSH: u64 = (1 << 15) | (1 << 6);

    pub(super) fn get() -> Option<u64> {
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr stores the 4-byte control register to the address given, which is
        // `csr`'s; it changes no other state.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        }
        Some(u64::from(csr))
    }

    pub(super) fn set(mode: u64) {
        let csr = mode as u32;
        // SAFETY: ldmxcsr loads the control register from `csr`, a value read by `get` with
        // only the FTZ/DAZ bits changed, so no reserved bit is set (which would fault).
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly, preserves_flags));
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod float_mode {
    /// FPCR.FZ (bit 24) flushes denormal inputs and results of single and double precision.
    pub(super) const FLUSH: u64 = 1 << 24;

    pub(super) fn get() -> Option<u64> {
        let fpcr: u64;
        // SAFETY: reading FPCR has no side effect.
        unsafe {
            std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags));
        }
        Some(fpcr)
    }

    pub(super) fn set(mode: u64) {
        // SAFETY: writes back a value read from FPCR with only the FZ bit changed.
        unsafe {
            std::arch::asm!("msr fpcr, {}", in(reg) mode, options(nomem, nostack, preserves_flags));
        }
    }
}

/// Elsewhere the mode is left as the platform sets it.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod float_mode {
    pub(super) const FLUSH: u64 = 0;

    pub(super) fn get() -> Option<u64> {
        None
    }

    pub(super) fn set(_mode: u64) {}
}

/// A row-major operand: `rows x cols` as used, stored transposed when `t` is set (then the
/// buffer holds `cols x rows`).
#[derive(Clone, Copy, Debug)]
pub struct Op<'a> {
    pub data: &'a [f32],
    pub t: bool,
}

impl<'a> Op<'a> {
    pub fn n(data: &'a [f32]) -> Self {
        Self { data, t: false }
    }
    pub fn t(data: &'a [f32]) -> Self {
        Self { data, t: true }
    }
    /// (row stride, column stride) of the `rows x cols` matrix this operand stands for.
    fn strides(&self, rows: usize, cols: usize) -> (isize, isize) {
        if self.t {
            (1, rows as isize)
        } else {
            (cols as isize, 1)
        }
    }
}

/// `c = a · b` (or `c += a · b` when `accumulate`), with `a` as `m x k`, `b` as `k x n` and
/// `c` as `m x n`, all row-major.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    a: Op<'_>,
    b: Op<'_>,
    accumulate: bool,
    share: impl Into<Share>,
) {
    let share = share.into();
    assert!(c.len() >= m * n, "c holds {} < {m}x{n}", c.len());
    assert!(a.data.len() >= m * k, "a holds {} < {m}x{k}", a.data.len());
    assert!(b.data.len() >= k * n, "b holds {} < {k}x{n}", b.data.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = a.strides(m, k);
    let (b_rs, b_cs) = b.strides(k, n);
    // SAFETY: the asserts above guarantee every element the strides reach lies inside its
    // slice: a's largest offset is (m-1)*a_rs + (k-1)*a_cs = m*k - 1 in either layout, and
    // likewise for b and c. `c` is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            share.parallelism(),
        );
    }
}

/// One `m x k` by `k x n` sgemm with its operands, to time this binary's GEMM rate.
#[derive(Debug)]
pub struct SgemmProbe {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl SgemmProbe {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            a: (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect(),
            b: (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect(),
            c: vec![0f32; m * n],
        }
    }

    /// FLOPs of one product.
    pub fn flop(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }

    /// Times `calls` back-to-back products on `share`'s threads (call inside
    /// [`Threads::install`]); returns FLOP/s.
    pub fn time(&mut self, calls: usize, share: impl Into<Share>) -> f64 {
        let (m, n, k, share) = (self.m, self.n, self.k, share.into());
        let t = Instant::now();
        for _ in 0..calls {
            matmul(
                &mut self.c,
                m,
                n,
                k,
                Op::n(&self.a),
                Op::n(&self.b),
                false,
                share,
            );
        }
        std::hint::black_box(&self.c);
        calls as f64 * self.flop() / t.elapsed().as_secs_f64()
    }
}

/// The measured sgemm rate of this binary on `threads`, in FLOP/s: the best of a few timed
/// runs of an `m x k` by `k x n` product. The dense bench divides by this, so its ratio does
/// not drift with the machine.
pub fn sgemm_peak(threads: &Threads, m: usize, n: usize, k: usize, min_secs: f64) -> f64 {
    let mut probe = SgemmProbe::new(m, n, k);
    threads.install(|| {
        probe.time(2, threads);
        let mut best = 0f64;
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < min_secs {
            best = best.max(probe.time(4, threads));
        }
        best
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], at: bool, b: &[f32], bt: bool, m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f32;
                for p in 0..k {
                    let x = if at { a[p * m + i] } else { a[i * k + p] };
                    let y = if bt { b[j * k + p] } else { b[p * n + j] };
                    s += x * y;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn matches_naive_in_every_layout() {
        let (m, n, k) = (37, 29, 41);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 11) as f32 - 5.0)
            .collect();
        for threads in [1, 2] {
            let th = Threads::new(threads).unwrap();
            for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
                let want = naive(&a, at, &b, bt, m, n, k);
                let mut c = vec![1f32; m * n];
                th.install(|| {
                    let op = |d, t| Op { data: d, t };
                    matmul(&mut c, m, n, k, op(&a, at), op(&b, bt), false, &th);
                });
                assert_eq!(c, want, "at={at} bt={bt} threads={threads}");
                th.install(|| {
                    let op = |d, t| Op { data: d, t };
                    matmul(&mut c, m, n, k, op(&a, at), op(&b, bt), true, &th);
                });
                let twice: Vec<f32> = want.iter().map(|x| 2.0 * x).collect();
                assert_eq!(c, twice, "accumulate at={at} bt={bt}");
            }
        }
    }

    /// Half the smallest normal f32 is denormal; with the dense mode it is zero, on every
    /// thread a GEMM may use, and the caller's mode is back afterwards.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn dense_threads_flush_denormals_to_zero() {
        use std::hint::black_box;
        let half_min = || black_box(f32::MIN_POSITIVE) * black_box(0.5);
        assert!(
            half_min() > 0.0,
            "the test thread starts in the default mode"
        );
        let one = Threads::new(1).unwrap();
        assert_eq!(one.install(half_min), 0.0);
        assert!(
            half_min() > 0.0,
            "the caller's mode is restored after install"
        );
        let two = Threads::new(2).unwrap();
        let pool = two.pool.as_ref().unwrap();
        assert_eq!(pool.broadcast(|_| half_min()), vec![0.0, 0.0]);
        assert_eq!(two.install(half_min), 0.0);
        assert!(half_min() > 0.0);
    }

    #[test]
    #[should_panic(expected = "b holds")]
    fn refuses_short_operands() {
        let th = Threads::new(1).unwrap();
        let mut c = vec![0f32; 4];
        matmul(
            &mut c,
            2,
            2,
            2,
            Op::n(&[0.0; 4]),
            Op::n(&[0.0; 3]),
            false,
            &th,
        );
    }
}
