//! Hand-written forward and backward passes. Every function works on row-major slices of a
//! batch (`rows` samples), and reads parameters from and writes gradients to the model's flat
//! parameter and gradient vectors at fixed offsets. Buffers belong to the model; the FM passes
//! allocate one `dim`-sized accumulator per call.
//!
//! Gradients of parameters are *written*, not accumulated, because every parameter is used once
//! per step; input gradients say in their docs whether they overwrite or add.

use super::gemm::{matmul, Op, Share, Threads};

/// Rows per parallel task in elementwise passes: large enough that a task outweighs its
/// scheduling, small enough to split a 512-row batch over the threads.
const ROWS_PER_TASK: usize = 64;

/// Where to split a batch into two row blocks: half, rounded up to a multiple of 16 rows (the
/// GEMM kernel's row tile), so neither block ends in a partial tile it need not have.
fn split_rows(rows: usize) -> usize {
    (rows / 2).next_multiple_of(16).min(rows)
}

/// Runs `f(first_row, rows, out_rows)` on two row blocks side by side when `share` has two
/// halves and the batch is worth splitting, else once on all rows. `out` holds `out_stride`
/// floats per row; each call gets its block's rows of it.
pub(crate) fn by_row_halves<F>(share: Share, rows: usize, out: &mut [f32], out_stride: usize, f: F)
where
    F: Fn(usize, usize, &mut [f32]) + Sync,
{
    let out = &mut out[..rows * out_stride];
    match share.halves() {
        Some(_) if rows >= 2 * ROWS_PER_TASK => {
            let h = split_rows(rows);
            let (a, b) = out.split_at_mut(h * out_stride);
            rayon::join(|| f(0, h, a), || f(h, rows - h, b));
        }
        _ => f(0, rows, out),
    }
}

/// A fully connected layer `y = act(x W + b)`, `W` stored `inp x out` row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub inp: usize,
    pub out: usize,
    /// Offset of `W` in the parameter vector; `b` follows it.
    pub at: usize,
    pub relu: bool,
}

impl Linear {
    pub fn param_count(inp: usize, out: usize) -> usize {
        inp * out + out
    }

    fn w<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.at..self.at + self.inp * self.out]
    }

    fn b<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        let s = self.at + self.inp * self.out;
        &p[s..s + self.out]
    }

    /// `y = act(x W + b)`; bias and activation are fused into one pass over `y`.
    pub fn forward(
        &self,
        p: &[f32],
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        share: impl Into<Share>,
    ) {
        let (inp, out) = (self.inp, self.out);
        let share = share.into();
        if inp == 0 {
            // No inputs (a schema without dense features gives LR's dense term none): every
            // row is the bias alone.
            let b = self.b(p);
            for yr in y[..rows * out].chunks_exact_mut(out) {
                for (v, &bj) in yr.iter_mut().zip(b) {
                    *v = if self.relu { bj.max(0.0) } else { bj };
                }
            }
            return;
        }
        if out == 1 {
            // A tower's last layer: a dot per row. As a one-column GEMM it went through gemm's
            // packing for a tiny share of the step's FLOPs (`docs/design-notes.md`).
            let (w, b) = (self.w(p), self.b(p)[0]);
            by_row_halves(share, rows, y, 1, |r0, n, y| {
                for (yr, xr) in y
                    .iter_mut()
                    .zip(x[r0 * inp..(r0 + n) * inp].chunks_exact(inp))
                {
                    let v = dot_lanes(xr, w) + b;
                    *yr = if self.relu { v.max(0.0) } else { v };
                }
            });
            return;
        }
        match share.halves() {
            // Rows are independent: two row blocks side by side (see `Share`), each with its
            // own bias pass, so the halves never wait for each other within the layer.
            Some((s0, s1)) if rows >= 2 * ROWS_PER_TASK => {
                let h = split_rows(rows);
                let (y0, y1) = y[..rows * out].split_at_mut(h * out);
                let (x0, x1) = x[..rows * inp].split_at(h * inp);
                rayon::join(
                    || self.forward_rows(p, x0, h, y0, s0),
                    || self.forward_rows(p, x1, rows - h, y1, s1),
                );
            }
            _ => self.forward_rows(p, x, rows, y, share),
        }
    }

    fn forward_rows(&self, p: &[f32], x: &[f32], rows: usize, y: &mut [f32], share: Share) {
        let (inp, out) = (self.inp, self.out);
        matmul(y, rows, out, inp, Op::n(x), Op::n(self.w(p)), false, share);
        let b = self.b(p);
        for yr in y[..rows * out].chunks_exact_mut(out) {
            if self.relu {
                for (v, &bj) in yr.iter_mut().zip(b) {
                    *v = (*v + bj).max(0.0);
                }
            } else {
                for (v, &bj) in yr.iter_mut().zip(b) {
                    *v += bj;
                }
            }
        }
    }

    /// Given `dy`, the gradient at the layer's output, writes `dW`, `db` into `g` and the
    /// input gradient into `dx` as it asks. For a ReLU layer `dy` must already be the gradient
    /// *before* the ReLU: masked by [`relu_backward`], or written by the layer above through
    /// [`InputGrad::ThroughRelu`], which saves a pass over it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        p: &[f32],
        g: &mut [f32],
        x: &[f32],
        dy: &[f32],
        dx: InputGrad<'_>,
        rows: usize,
        share: impl Into<Share>,
    ) {
        let (inp, out) = (self.inp, self.out);
        let dy = &dy[..rows * out];
        let (gw, gb) = g[self.at..self.at + inp * out + out].split_at_mut(inp * out);
        let share = share.into();
        let w = self.w(p);
        // The weight side: db, the column sums of dy, and dW = xᵀ dy.
        let mut weights = move |s: Share| {
            gb.fill(0.0);
            for dr in dy.chunks_exact(out) {
                for (acc, &d) in gb.iter_mut().zip(dr) {
                    *acc += d;
                }
            }
            if inp == 0 {
                // No weights, only the bias.
            } else if out == 1 {
                // See `forward`: with one output, dW is a sum of scaled rows of x.
                gw.fill(0.0);
                for (xr, &d) in x.chunks_exact(inp).zip(dy) {
                    for (acc, &xv) in gw.iter_mut().zip(xr) {
                        *acc += xv * d;
                    }
                }
            } else {
                matmul(gw, inp, out, rows, Op::t(x), Op::n(dy), false, s);
            }
        };
        // The input side: dx = dy Wᵀ (an outer product with one output), then the mask of the
        // ReLU below while the rows are still in cache.
        let inputs = |dx: &mut [f32], below: Option<&[f32]>, s: Share| {
            let dx = &mut dx[..rows * inp];
            if inp == 0 {
                return;
            }
            if out == 1 {
                for (dxr, &d) in dx.chunks_exact_mut(inp).zip(dy) {
                    for (o, &wv) in dxr.iter_mut().zip(w) {
                        *o = d * wv;
                    }
                }
            } else {
                matmul(dx, rows, inp, out, Op::n(dy), Op::t(w), false, s);
            }
            if let Some(y) = below {
                relu_mask(dx, &y[..rows * inp]);
            }
        };
        let (dx, below) = match dx {
            InputGrad::Skip => (None, None),
            InputGrad::Plain(dx) => (Some(dx), None),
            InputGrad::ThroughRelu { dx, below } => (Some(dx), Some(below)),
        };
        match (dx, share.halves()) {
            // The two sides only read dy, and for a hidden layer take the same FLOPs: side by
            // side, each on half the threads (see `Share`). The weight side's bias sums and the
            // input side's mask are about the same work too.
            (Some(dx), Some((s0, s1))) => {
                rayon::join(|| weights(s0), || inputs(dx, below, s1));
            }
            (dx, _) => {
                weights(share);
                if let Some(dx) = dx {
                    inputs(dx, below, share);
                }
            }
        }
    }
}

/// Where [`Linear::backward`] puts the gradient with respect to its input.
#[derive(Debug)]
pub enum InputGrad<'a> {
    /// Not wanted (the input is data, not an activation).
    Skip,
    /// `dx` is overwritten with dL/dx.
    Plain(&'a mut [f32]),
    /// The input is the output `below` of a ReLU layer: `dx` is overwritten with the gradient
    /// before that ReLU, which is what the layer below's backward pass takes as its `dy`.
    ThroughRelu { dx: &'a mut [f32], below: &'a [f32] },
}

/// Masks `dy`, the gradient at a ReLU's output `y`, into the gradient before it, in parallel
/// row blocks on the current pool.
pub fn relu_backward(dy: &mut [f32], y: &[f32], width: usize) {
    use rayon::prelude::*;
    dy.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(y.par_chunks(width * ROWS_PER_TASK))
        .for_each(|(d, y)| relu_mask(d, y));
}

fn relu_mask(d: &mut [f32], y: &[f32]) {
    // A select, not a conditional store: the compiler will not invent stores a branch skips,
    // so `if v <= 0.0 { *d = 0.0 }` stayed a scalar loop with a branch per element, a visible
    // share of a W&D training run's CPU (`docs/design-notes.md`).
    for (d, &v) in d.iter_mut().zip(y) {
        *d = if v > 0.0 { *d } else { 0.0 };
    }
}

/// `Σ a_i b_i` in eight independent lanes, so that the compiler can vectorise it (a single
/// running sum is a serial chain it must keep in order).
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for ((l, x), y) in lanes.iter_mut().zip(xa).zip(xb) {
            *l += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The DCN-v2 cross layer: `x_{l+1} = x0 ⊙ (x_l W + b) + x_l`, `W` `d x d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cross {
    pub dim: usize,
    pub at: usize,
}

impl Cross {
    pub fn param_count(dim: usize) -> usize {
        dim * dim + dim
    }

    fn lin(&self) -> Linear {
        Linear {
            inp: self.dim,
            out: self.dim,
            at: self.at,
            relu: false,
        }
    }

    /// Writes `u = x_l W + b` (kept for the backward pass) and `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        p: &[f32],
        x0: &[f32],
        xl: &[f32],
        rows: usize,
        u: &mut [f32],
        out: &mut [f32],
        th: &Threads,
    ) {
        let n = rows * self.dim;
        self.lin().forward(p, xl, rows, u, th);
        for i in 0..n {
            out[i] = x0[i] * u[i] + xl[i];
        }
    }

    /// Writes `dW`, `db`; *overwrites* `dxl`; *adds* to `dx0`. `scratch` holds `rows x dim`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        p: &[f32],
        g: &mut [f32],
        x0: &[f32],
        xl: &[f32],
        u: &[f32],
        dout: &[f32],
        dx0: &mut [f32],
        dxl: &mut [f32],
        scratch: &mut [f32],
        rows: usize,
        th: &Threads,
    ) {
        let n = rows * self.dim;
        for i in 0..n {
            scratch[i] = dout[i] * x0[i];
            dx0[i] += dout[i] * u[i];
        }
        self.lin()
            .backward(p, g, xl, scratch, InputGrad::Plain(dxl), rows, th);
        for i in 0..n {
            dxl[i] += dout[i];
        }
    }
}

/// The FM second-order term over `fields` vectors of `dim` per row, read from `x` at column
/// offset 0 with row stride `stride`: `0.5 * Σ_k ((Σ_f e_fk)^2 - Σ_f e_fk^2)`.
pub fn fm_forward(
    x: &[f32],
    stride: usize,
    rows: usize,
    fields: usize,
    dim: usize,
    out: &mut [f32],
) {
    let mut s = vec![0f32; dim];
    for r in 0..rows {
        let e = &x[r * stride..r * stride + fields * dim];
        s.fill(0.0);
        let mut sq = 0f32;
        for v in e.chunks_exact(dim) {
            for (a, &b) in s.iter_mut().zip(v) {
                *a += b;
                sq += b * b;
            }
        }
        out[r] = 0.5 * (s.iter().map(|a| a * a).sum::<f32>() - sq);
    }
}

/// *Adds* `d out / d e_fk = dout * (Σ_f e_fk - e_fk)` into `dx` (same layout as `x`).
pub fn fm_backward(
    x: &[f32],
    stride: usize,
    rows: usize,
    fields: usize,
    dim: usize,
    dout: &[f32],
    dx: &mut [f32],
) {
    let mut s = vec![0f32; dim];
    for (r, &d) in dout[..rows].iter().enumerate() {
        let base = r * stride;
        let e = &x[base..base + fields * dim];
        s.fill(0.0);
        for v in e.chunks_exact(dim) {
            for (a, &b) in s.iter_mut().zip(v) {
                *a += b;
            }
        }
        for (f, v) in e.chunks_exact(dim).enumerate() {
            let o = base + f * dim;
            for k in 0..dim {
                dx[o + k] += d * (s[k] - v[k]);
            }
        }
    }
}

/// Pairs `(i, j)`, `i < j`, of `n` vectors: the DLRM dot interaction's output width.
pub fn dot_pairs(n: usize) -> usize {
    n * (n - 1) / 2
}

/// DLRM dot interaction: `z` holds `n` vectors of `dim` per row (contiguous); `out` gets the
/// `n(n-1)/2` pairwise dot products per row, in order `(0,1), (0,2), .., (1,2), ..`.
pub fn dot_forward(z: &[f32], rows: usize, n: usize, dim: usize, out: &mut [f32]) {
    let t = dot_pairs(n);
    for r in 0..rows {
        let zr = &z[r * n * dim..(r + 1) * n * dim];
        let o = &mut out[r * t..(r + 1) * t];
        let mut c = 0;
        for i in 0..n {
            for j in i + 1..n {
                let (a, b) = (&zr[i * dim..(i + 1) * dim], &zr[j * dim..(j + 1) * dim]);
                o[c] = a.iter().zip(b).map(|(x, y)| x * y).sum();
                c += 1;
            }
        }
    }
}

/// *Overwrites* `dz` with the gradient of the dot interaction.
pub fn dot_backward(z: &[f32], rows: usize, n: usize, dim: usize, dout: &[f32], dz: &mut [f32]) {
    let t = dot_pairs(n);
    dz[..rows * n * dim].fill(0.0);
    for r in 0..rows {
        let zr = &z[r * n * dim..(r + 1) * n * dim];
        let dzr = &mut dz[r * n * dim..(r + 1) * n * dim];
        let d = &dout[r * t..(r + 1) * t];
        let mut c = 0;
        for i in 0..n {
            for j in i + 1..n {
                for k in 0..dim {
                    dzr[i * dim + k] += d[c] * zr[j * dim + k];
                    dzr[j * dim + k] += d[c] * zr[i * dim + k];
                }
                c += 1;
            }
        }
    }
}

/// Sigmoid, written to avoid overflow for large |z|.
#[inline]
pub fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Binary cross-entropy on logits, weighted and scaled:
/// `L = scale · Σ w_i (max(z,0) - z y + ln(1 + e^{-|z|}))`. Writes `dL/dz` into `dz` and the
/// predictions into `pred`; returns the summed (unscaled) weighted loss. `scale` is 1/B for a
/// batch mean; the trainer passes 1 (a sum), so that a sample's gradient does not depend on
/// the size of its batch, and takes the dense update's mean itself.
pub fn bce_with_logits(
    z: &[f32],
    labels: &[f32],
    weights: &[f32],
    scale: f32,
    pred: &mut [f32],
    dz: &mut [f32],
) -> f64 {
    let inv_b = scale;
    let mut loss = 0f64;
    for i in 0..z.len() {
        let (zi, y, w) = (z[i], labels[i], weights[i]);
        let p = sigmoid(zi);
        pred[i] = p;
        dz[i] = w * (p - y) * inv_b;
        let l = zi.max(0.0) - zi * y + (-zi.abs()).exp().ln_1p();
        loss += f64::from(w * l);
    }
    loss
}

/// Embedding pooling of one field for a batch: `out[r] = Σ_i w_i row(index_i)[cols]`,
/// divided by the id count for mean pooling. `spans[r]` is the range of row `r`'s ids in
/// `index`/`weights`; `out[r]` starts at `r * out_stride`.
#[allow(clippy::too_many_arguments)]
pub fn pool_forward(
    table: &[f32],
    row_dim: usize,
    cols: std::ops::Range<usize>,
    index: &[u32],
    weights: &[f32],
    spans: &[(u32, u32)],
    mean: bool,
    out: &mut [f32],
    out_stride: usize,
) {
    let w = cols.len();
    for (r, &(a, b)) in spans.iter().enumerate() {
        let o = &mut out[r * out_stride..r * out_stride + w];
        o.fill(0.0);
        let scale = if mean && b > a {
            1.0 / (b - a) as f32
        } else {
            1.0
        };
        for i in a as usize..b as usize {
            let base = index[i] as usize * row_dim + cols.start;
            let c = weights[i] * scale;
            for (x, &v) in o.iter_mut().zip(&table[base..base + w]) {
                *x += c * v;
            }
        }
    }
}

/// *Adds* the pooling's gradient into `dtable` (rows laid out as `table`).
#[allow(clippy::too_many_arguments)]
pub fn pool_backward(
    dtable: &mut [f32],
    row_dim: usize,
    cols: std::ops::Range<usize>,
    index: &[u32],
    weights: &[f32],
    spans: &[(u32, u32)],
    mean: bool,
    dout: &[f32],
    dout_stride: usize,
) {
    let w = cols.len();
    for (r, &(a, b)) in spans.iter().enumerate() {
        let d = &dout[r * dout_stride..r * dout_stride + w];
        let scale = if mean && b > a {
            1.0 / (b - a) as f32
        } else {
            1.0
        };
        for i in a as usize..b as usize {
            let base = index[i] as usize * row_dim + cols.start;
            let c = weights[i] * scale;
            for (x, &v) in dtable[base..base + w].iter_mut().zip(d) {
                *x += c * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Finite-difference checks: for a random linear read-out `L = Σ c · out`, the analytic
    //! gradient of each input and parameter must match `(L(x + h) - L(x - h)) / 2h`.
    use super::*;
    use crate::rng::Xoshiro256;

    fn randv(rng: &mut Xoshiro256, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
            .collect()
    }

    /// Values bounded away from 0 so ReLU kinks do not sit within `h` of an input.
    fn randv_nonzero(rng: &mut Xoshiro256, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v = 0.2 + rng.next_f32();
                if rng.below(2) == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect()
    }

    /// Checks `analytic` against central differences of `loss` over every coordinate of `v`.
    ///
    /// A ReLU whose pre-activation lies within the step of 0 bends the loss between `x - h` and
    /// `x + h`, and the central difference then averages two slopes. The analytic gradient is
    /// one of them, so a one-sided difference that matches is accepted too; a wrong gradient
    /// matches neither.
    fn check(name: &str, v: &mut [f32], analytic: &[f32], mut loss: impl FnMut(&[f32]) -> f64) {
        let h = 1e-3f32;
        let hf = f64::from(h);
        for i in 0..v.len() {
            let orig = v[i];
            let mid = loss(v);
            v[i] = orig + h;
            let up = loss(v);
            v[i] = orig - h;
            let down = loss(v);
            v[i] = orig;
            let a = f64::from(analytic[i]);
            let close = |num: f64| (num - a).abs() <= 2e-3 + 2e-3 * a.abs().max(num.abs());
            let central = (up - down) / (2.0 * hf);
            let (right, left) = ((up - mid) / hf, (mid - down) / hf);
            assert!(
                close(central) || close(right) || close(left),
                "{name}[{i}]: numeric {central} (one-sided {left}, {right}) vs analytic {a}"
            );
        }
    }

    fn dot(c: &[f32], out: &[f32]) -> f64 {
        c.iter()
            .zip(out)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum()
    }

    #[test]
    fn linear_gradients() {
        let seed = crate::testkit::seed("fd_linear");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let th = Threads::new(1).unwrap();
        // out = 1 takes the tower's last-layer path; inp = 19 gives it a lane tail.
        for (relu, out, inp) in [(false, 6, 7), (true, 6, 7), (false, 1, 19), (true, 1, 19)] {
            let rows = 5;
            let l = Linear {
                inp,
                out,
                at: 3,
                relu,
            };
            let mut p = randv(&mut rng, 3 + Linear::param_count(inp, out), 0.5);
            let mut x = randv_nonzero(&mut rng, rows * inp);
            let c = randv(&mut rng, rows * out, 1.0);
            let fwd = |p: &[f32], x: &[f32]| {
                let mut y = vec![0f32; rows * out];
                l.forward(p, x, rows, &mut y, &th);
                y
            };
            let y = fwd(&p, &x);
            let mut dy = c.clone();
            if relu {
                relu_backward(&mut dy, &y, out);
            }
            let mut g = vec![0f32; p.len()];
            let mut dx = vec![0f32; rows * inp];
            l.backward(&p, &mut g, &x, &dy, InputGrad::Plain(&mut dx), rows, &th);
            let x0 = x.clone();
            check("linear.p", &mut p[3..], &g[3..], |pv| {
                let mut full = vec![0f32; 3];
                full.extend_from_slice(pv);
                dot(&c, &fwd(&full, &x0))
            });
            let p0 = p.clone();
            check("linear.x", &mut x, &dx, |xv| dot(&c, &fwd(&p0, xv)));
        }
        println!("seed {seed}");
    }

    /// The fused mask gives exactly what an unmasked input gradient masked afterwards gives,
    /// on one thread and on two (where the input side runs beside the weight side), and the
    /// weight gradients do not depend on which way dx is asked for.
    #[test]
    fn input_grad_through_relu_equals_plain_then_mask() {
        let seed = crate::testkit::seed("through_relu");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        // 150 rows: enough for the two-thread path to split them.
        let (rows, inp, out) = (150, 23, 17);
        let l = Linear {
            inp,
            out,
            at: 0,
            relu: false,
        };
        let p = randv(&mut rng, Linear::param_count(inp, out), 0.5);
        let x = randv(&mut rng, rows * inp, 1.0);
        // The output of the ReLU layer below: about half of it exactly zero.
        let below: Vec<f32> = randv(&mut rng, rows * inp, 1.0)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        let dy = randv(&mut rng, rows * out, 1.0);
        for threads in [1, 2] {
            let th = Threads::new(threads).unwrap();
            let (mut g1, mut g2) = (vec![0f32; p.len()], vec![0f32; p.len()]);
            let (mut plain, mut fused) = (vec![0f32; rows * inp], vec![7f32; rows * inp]);
            th.install(|| {
                l.backward(
                    &p,
                    &mut g1,
                    &x,
                    &dy,
                    InputGrad::Plain(&mut plain),
                    rows,
                    &th,
                );
                relu_backward(&mut plain, &below, inp);
                let dx = InputGrad::ThroughRelu {
                    dx: &mut fused,
                    below: &below,
                };
                l.backward(&p, &mut g2, &x, &dy, dx, rows, &th);
            });
            assert_eq!(plain, fused, "threads {threads}, seed {seed}");
            assert_eq!(g1, g2, "threads {threads}, seed {seed}");
            let zeros = below.iter().filter(|v| **v == 0.0).count();
            let masked = fused.iter().filter(|v| **v == 0.0).count();
            assert!(
                zeros > rows * inp / 4 && masked >= zeros,
                "the mask was applied"
            );
        }
        println!("seed {seed}");
    }

    #[test]
    fn cross_gradients() {
        let seed = crate::testkit::seed("fd_cross");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let th = Threads::new(1).unwrap();
        let (rows, d) = (4, 5);
        let cl = Cross { dim: d, at: 0 };
        let mut p = randv(&mut rng, Cross::param_count(d), 0.5);
        let mut x0 = randv(&mut rng, rows * d, 1.0);
        let mut xl = randv(&mut rng, rows * d, 1.0);
        let c = randv(&mut rng, rows * d, 1.0);
        let fwd = |p: &[f32], x0: &[f32], xl: &[f32]| {
            let (mut u, mut o) = (vec![0f32; rows * d], vec![0f32; rows * d]);
            cl.forward(p, x0, xl, rows, &mut u, &mut o, &th);
            (u, o)
        };
        let (u, _) = fwd(&p, &x0, &xl);
        let mut g = vec![0f32; p.len()];
        let (mut dx0, mut dxl, mut s) = (
            vec![0f32; rows * d],
            vec![0f32; rows * d],
            vec![0f32; rows * d],
        );
        cl.backward(
            &p, &mut g, &x0, &xl, &u, &c, &mut dx0, &mut dxl, &mut s, rows, &th,
        );
        let (a0, al) = (x0.clone(), xl.clone());
        check("cross.p", &mut p, &g, |pv| dot(&c, &fwd(pv, &a0, &al).1));
        let p0 = p.clone();
        check("cross.x0", &mut x0, &dx0, |v| dot(&c, &fwd(&p0, v, &al).1));
        check("cross.xl", &mut xl, &dxl, |v| dot(&c, &fwd(&p0, &a0, v).1));
        println!("seed {seed}");
    }

    #[test]
    fn fm_gradients() {
        let seed = crate::testkit::seed("fd_fm");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let (rows, fields, dim, stride) = (3, 4, 5, 23);
        let mut x = randv(&mut rng, rows * stride, 1.0);
        let c = randv(&mut rng, rows, 1.0);
        let fwd = |x: &[f32]| {
            let mut o = vec![0f32; rows];
            fm_forward(x, stride, rows, fields, dim, &mut o);
            o
        };
        let mut dx = vec![0f32; rows * stride];
        fm_backward(&x, stride, rows, fields, dim, &c, &mut dx);
        check("fm.x", &mut x, &dx, |v| dot(&c, &fwd(v)));
        // By hand: two fields (1, 2) and (3, 4): interaction = 1*3 + 2*4 = 11.
        let mut o = [0f32];
        fm_forward(&[1.0, 2.0, 3.0, 4.0], 4, 1, 2, 2, &mut o);
        assert_eq!(o[0], 11.0);
        println!("seed {seed}");
    }

    #[test]
    fn dot_gradients() {
        let seed = crate::testkit::seed("fd_dot");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let (rows, n, dim) = (3, 4, 3);
        let mut z = randv(&mut rng, rows * n * dim, 1.0);
        let c = randv(&mut rng, rows * dot_pairs(n), 1.0);
        let fwd = |z: &[f32]| {
            let mut o = vec![0f32; rows * dot_pairs(n)];
            dot_forward(z, rows, n, dim, &mut o);
            o
        };
        let mut dz = vec![0f32; z.len()];
        dot_backward(&z, rows, n, dim, &c, &mut dz);
        check("dot.z", &mut z, &dz, |v| dot(&c, &fwd(v)));
        println!("seed {seed}");
    }

    #[test]
    fn bce_gradients_and_values() {
        let seed = crate::testkit::seed("fd_bce");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let n = 6;
        let mut z = randv(&mut rng, n, 4.0);
        let y: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
        let w: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 0.5).collect();
        let (mut p, mut dz) = (vec![0f32; n], vec![0f32; n]);
        let scale = 1.0 / n as f32;
        bce_with_logits(&z, &y, &w, scale, &mut p, &mut dz);
        check("bce.z", &mut z, &dz, |v| {
            let (mut p, mut d) = (vec![0f32; n], vec![0f32; n]);
            bce_with_logits(v, &y, &w, scale, &mut p, &mut d) / n as f64
        });
        // By hand: z = 0, y = 1: loss ln 2, p = 0.5, grad -0.5.
        let (mut p1, mut d1) = ([0f32], [0f32]);
        let l = bce_with_logits(&[0.0], &[1.0], &[1.0], 1.0, &mut p1, &mut d1);
        assert!((l - std::f64::consts::LN_2).abs() < 1e-6);
        assert_eq!((p1[0], d1[0]), (0.5, -0.5));
        // Large logits stay finite.
        let l = bce_with_logits(
            &[80.0, -80.0],
            &[0.0, 1.0],
            &[1.0, 1.0],
            0.5,
            &mut [0.0; 2],
            &mut [0.0; 2],
        );
        assert!((l - 160.0).abs() < 1e-3, "{l}");
        println!("seed {seed}");
    }

    #[test]
    fn pooling_gradients() {
        let seed = crate::testkit::seed("fd_pool");
        let mut rng = Xoshiro256::seed_from_u64(seed);
        let (uniq, row_dim, cols) = (5, 6, 1..5);
        let index: Vec<u32> = vec![0, 3, 3, 1, 4, 2, 0];
        let weights = randv(&mut rng, index.len(), 1.0);
        let spans = [(0u32, 3u32), (3, 3), (3, 7)];
        for mean in [false, true] {
            let mut table = randv(&mut rng, uniq * row_dim, 1.0);
            let stride = 9;
            let c = randv(&mut rng, spans.len() * stride, 1.0);
            let fwd = |t: &[f32]| {
                let mut o = vec![0f32; spans.len() * stride];
                pool_forward(
                    t,
                    row_dim,
                    cols.clone(),
                    &index,
                    &weights,
                    &spans,
                    mean,
                    &mut o,
                    stride,
                );
                o
            };
            let mut dt = vec![0f32; table.len()];
            pool_backward(
                &mut dt,
                row_dim,
                cols.clone(),
                &index,
                &weights,
                &spans,
                mean,
                &c,
                stride,
            );
            check("pool.table", &mut table, &dt, |v| dot(&c, &fwd(v)));
            assert!(
                fwd(&table)[stride..stride + 4].iter().all(|&v| v == 0.0),
                "empty field"
            );
        }
        println!("seed {seed}");
    }
}
