#!/usr/bin/env python3
"""PyTorch CPU peer baseline for online CTR training: WDL and DeepFM.

The baseline Freshet's trainer is measured against (benches/peer.sh runs both on
the same rows).  It hashes string features as actors/src/sample/hash.rs does and
trains the models of actors/src/dense/model.rs with the optimizers Freshet uses
by default; this docstring is the exact spec.  Setup: benches/peer/setup.sh.

Usage
-----
  peer.py --model wdl|deepfm --data PATH[,PATH...] --format criteo|synthetic
          [--test PATH[,PATH...]] [--batch 512] [--threads 2] [--epochs 1]
          [--max-rows N] [--seed 1] [--init-seed 0] [--tables fused|per-field]
          [--allocator auto|jemalloc|glibc]

Prints exactly one JSON line on stdout (progress/diagnostics go to stderr).

Data
----
criteo:   tab-separated rows: label, I1..I13 (integers), C1..C26 (strings),
          missing values are empty fields.  Several files may be given
          (comma-separated); they are concatenated in the given order.
synthetic: --data is ignored (may be "-"); --max-rows N rows are generated
          in-process (default 500000), see "Synthetic generator" below.

Split: the first 90% of the rows (file order) are trained on, the last 10%
are the test set.  If --test is given, all --data rows are trained on and the
--test rows are the test set.  --max-rows caps the rows read from --data
(before the split).  Training visits the train rows in file order (no
shuffle), --epochs times.

Features (both formats)
-----------------------
Dense: criteo integer x -> log(1 + max(x, 0)), missing -> 0.  Synthetic dense
values are already ~N(0,1) and are used as-is.

Categorical: field f (0-based, name "C{f+1}") with value string v is hashed to
    id64 = splitmix64(fnv1a64(b"C{f+1}=" + utf8(v)))
(missing criteo value -> v = "", i.e. it hashes to its own id).  id64 is
Freshet's feature id for the same value (actors/src/sample/hash.rs, whose golden
vectors pin it).  The embedding row is id64 mod 2**20 within field f's own table;
Freshet keys its rows by the whole id64 instead, so ids that collide here do not
collide there.
  fnv1a64: h = 0xcbf29ce484222325; for each byte b: h = (h ^ b) * 0x100000001b3
  splitmix64(x): z = x + 0x9e3779b97f4a7c15; z = (z ^ z>>30) * 0xbf58476d1ce4e5b9;
                 z = (z ^ z>>27) * 0x94d049bb133111eb; return z ^ z>>31
  (all arithmetic mod 2**64)

Models (logit -> sigmoid; loss = BCE-with-logits, mean over the batch)
------
Per field f: a 16-dim embedding e_f and a scalar weight w_f (dim-1 embedding),
both looked up at the same hashed row of field f's tables.  dense d (13).
  WDL:    logit = sum_f w_f + Linear(13->1)(d)
                + MLP(concat(e_1..e_26, d): 429 -> 1024 -> 512 -> 256 -> 1, ReLU)
  DeepFM: logit = sum_f w_f + Linear(13->1)(d)
                + 0.5 * sum_k[(sum_f e_fk)^2 - sum_f e_fk^2]
                + MLP(429 -> 400 -> 400 -> 400 -> 1, ReLU)
Init: e ~ N(0, 0.01^2), w = 0, Linear/MLP: PyTorch defaults.
Optimizers: embeddings + wide weights (sparse grads): torch.optim.Adagrad(lr=0.05,
initial_accumulator_value=0.1, eps=1e-10); everything else: torch.optim.Adam(lr=1e-3)
(fused CPU kernel).
Runtime tuning: re-execs itself once with jemalloc preloaded (if installed; Debian
libjemalloc2) and THP_MEM_ALLOC_ENABLE=1; --allocator glibc disables the preload.

Table layout (--tables):
  fused (default): one nn.Embedding(26 * 2**20, 17, sparse=True); field f owns
      rows [f*2**20, (f+1)*2**20); columns 0..15 are e_f, column 16 is w_f.
      Adagrad is per-coordinate, so this is mathematically identical to 52
      separate tables (26 x dim-16 + 26 x dim-1) but costs one gather, one
      sparse gradient and one optimizer update per step instead of 52.
  per-field: 26 nn.Embedding(2**20, 16, sparse=True) + 26 nn.Embedding(2**20, 1,
      sparse=True), the textbook layout (slower; for reference).

Synthetic generator (seed s, default 1)
-------------------
  S(t)    = splitmix64(s * 65536 + t)             # key of random stream t
  U(t, i) = (splitmix64(S(t) XOR i) >> 11) / 2**53  # uniform [0,1), index i
  IH(t, i) = (U(t,i) + U(t+1,i) + U(t+2,i) + U(t+3,i) - 2) * sqrt(3)   # ~N(0,1)
Row i (0-based):
  categorical field f = 0..25: rank r_f = Zipf(1.1) over {0..999999}:
      r_f = number of k in 1..10**6 with CDF(k) <= U(f, i), where
      CDF(k) = sum_{j<=k} j**-1.1 / sum_{j<=10**6} j**-1.1 (float64, sequential
      summation); rank 0 is the most frequent.  Value string v = decimal(r_f),
      then hashed as above.
  dense j = 0..12: x_j = IH(32 + 4j, i)
  hidden weight of (f, r): g(f, r) = IH(128 + 4f, r)       (index = rank r)
  logit_i = -1.6 + 0.35 * sum_f g(f, r_f) + sum_j c_j x_j + 0.5 * x_0 * x_1
      with c_j = 0.3 * (-1)**j
  label y_i = 1 if U(96, i) < sigmoid(logit_i) else 0
(CTR ~0.275; on rows 450000..499999 of N=500000 the true logit scores AUC 0.879,
and WDL/DeepFM trained 1 epoch on the first 450000 rows score AUC ~0.80.)

Reported FLOPs: dense_flops_per_sample = 6 * sum(in*out) over the MLP layers
(forward 2*in*out per layer; backward computes both input and weight grads,
2 x forward).  Bias, activations, FM and wide terms are excluded (< 1%).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

M64 = np.uint64
NF, ND, DIM = 26, 13, 16
ROWS_LOG2 = 20
ROWS = 1 << ROWS_LOG2

FNV_OFF = M64(0xCBF29CE484222325)
FNV_PRIME = M64(0x100000001B3)


def splitmix64(x):
    """Vectorized splitmix64 on a uint64 ndarray (wrapping arithmetic)."""
    z = x + M64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> M64(30))) * M64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> M64(27))) * M64(0x94D049BB133111EB)
    return z ^ (z >> M64(31))


def fnv1a64_bytes_const(prefix: bytes):
    h = 0xCBF29CE484222325
    for b in prefix:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def hash_field(f: int, values: np.ndarray) -> np.ndarray:
    """values: numpy bytes array (dtype 'S<k>', no NUL bytes) for field f.
    Returns row index within the field's table: splitmix64(fnv1a64("C{f+1}="+v)) mod 2**20."""
    values = np.ascontiguousarray(values)
    n = values.shape[0]
    width = values.dtype.itemsize
    h = np.full(n, fnv1a64_bytes_const(b"C%d=" % (f + 1)), dtype=np.uint64)
    if width > 0:
        mat = values.view(np.uint8).reshape(n, width)
        for p in range(width):
            b = mat[:, p].astype(np.uint64)
            nh = (h ^ b) * FNV_PRIME
            h = np.where(b != 0, nh, h)  # padding NULs are past the end of the string
    return (splitmix64(h) & M64(ROWS - 1)).astype(np.int64)


# ----------------------------------------------------------------------------- data

def load_criteo(paths, max_rows=None):
    labels, dense_cols, cat_cols = [], [[] for _ in range(ND)], [[] for _ in range(NF)]
    n = 0
    for path in paths:
        with open(path, "rb") as fh:
            for line in fh:
                if max_rows is not None and n >= max_rows:
                    break
                parts = line.rstrip(b"\r\n").split(b"\t")
                if len(parts) != 1 + ND + NF:
                    raise ValueError(f"{path}: expected 40 fields, got {len(parts)}")
                labels.append(int(parts[0]))
                for j in range(ND):
                    dense_cols[j].append(parts[1 + j])
                for f in range(NF):
                    cat_cols[f].append(parts[1 + ND + f])
                n += 1
    y = np.asarray(labels, dtype=np.float32)
    dense = np.zeros((n, ND), dtype=np.float32)
    for j in range(ND):
        col = np.array([int(v) if v else 0 for v in dense_cols[j]], dtype=np.float64)
        dense[:, j] = np.log1p(np.maximum(col, 0.0))
    cat = np.zeros((n, NF), dtype=np.int64)
    for f in range(NF):
        cat[:, f] = hash_field(f, np.array(cat_cols[f], dtype=bytes))
    return y, dense, cat


def _u(stream_key, idx):
    return (splitmix64(stream_key ^ idx) >> M64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def _key(seed, t):
    return splitmix64(np.array([seed * 65536 + t], dtype=np.uint64))[0]


def _ih(seed, t, idx):
    s = _u(_key(seed, t), idx) + _u(_key(seed, t + 1), idx)
    s += _u(_key(seed, t + 2), idx) + _u(_key(seed, t + 3), idx)
    return (s - 2.0) * math.sqrt(3.0)


def zipf_cdf(n=1_000_000, a=1.1):
    w = np.arange(1, n + 1, dtype=np.float64) ** (-a)
    c = np.cumsum(w)
    return c / c[-1]


def gen_synthetic(n, seed=1):
    idx = np.arange(n, dtype=np.uint64)
    cdf = zipf_cdf()
    logit = np.full(n, -1.6)
    cat = np.zeros((n, NF), dtype=np.int64)
    for f in range(NF):
        u = _u(_key(seed, f), idx)
        r = np.searchsorted(cdf, u, side="right")  # #k with CDF(k) <= u, in 0..1e6-1
        r = np.minimum(r, len(cdf) - 1)
        logit += 0.35 * _ih(seed, 128 + 4 * f, r.astype(np.uint64))
        cat[:, f] = hash_field(f, r.astype("S7"))
    dense = np.zeros((n, ND), dtype=np.float64)
    for j in range(ND):
        dense[:, j] = _ih(seed, 32 + 4 * j, idx)
        logit += 0.3 * (-1) ** j * dense[:, j]
    logit += 0.5 * dense[:, 0] * dense[:, 1]
    p = 1.0 / (1.0 + np.exp(-logit))
    y = (_u(_key(seed, 96), idx) < p).astype(np.float32)
    return y, dense.astype(np.float32), cat, logit


# ----------------------------------------------------------------------------- metrics

def auc_score(y, s):
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    n = len(s)
    # average ranks for ties
    bounds = np.flatnonzero(np.diff(ss)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [n]])
    avg = (starts + ends - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, ends - starts)
    npos = y.sum()
    nneg = n - npos
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((ranks[y == 1].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def logloss(y, p, eps=1e-7):
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# ----------------------------------------------------------------------------- model

def build(torch, model, tables):
    nn = torch.nn
    hidden = [1024, 512, 256] if model == "wdl" else [400, 400, 400]

    class CTR(nn.Module):
        def __init__(self):
            super().__init__()
            self.fused = tables == "fused"
            if self.fused:
                w = torch.empty(NF * ROWS, DIM + 1)
                w.normal_(0.0, 0.01)  # contiguous fill (a strided fill is ~10x slower)
                w[:, DIM] = 0.0
                self.table = nn.Embedding(NF * ROWS, DIM + 1, sparse=True, _weight=w)
                self.register_buffer("offsets", torch.arange(NF, dtype=torch.int64) * ROWS, persistent=False)
            else:
                self.emb = nn.ModuleList([
                    nn.Embedding(ROWS, DIM, sparse=True, _weight=torch.empty(ROWS, DIM).normal_(0.0, 0.01))
                    for _ in range(NF)])
                self.wide = nn.ModuleList([
                    nn.Embedding(ROWS, 1, sparse=True, _weight=torch.zeros(ROWS, 1)) for _ in range(NF)])
            self.lin = nn.Linear(ND, 1)
            layers, d_in = [], NF * DIM + ND
            for h in hidden:
                layers += [nn.Linear(d_in, h), nn.ReLU()]
                d_in = h
            layers.append(nn.Linear(d_in, 1))
            self.mlp = nn.Sequential(*layers)
            self.fm = model == "deepfm"

        def sparse_params(self):
            if self.fused:
                return [self.table.weight]
            return [m.weight for m in self.emb] + [m.weight for m in self.wide]

        def dense_params(self):
            return list(self.lin.parameters()) + list(self.mlp.parameters())

        def forward(self, cat, dense):
            b = cat.shape[0]
            if self.fused:
                t = self.table(cat)  # cat already offset: (B, 26, 17)
                e = t[:, :, :DIM]
                wide = t[:, :, DIM].sum(1)
            else:
                e = torch.stack([m(cat[:, f]) for f, m in enumerate(self.emb)], 1)
                wide = torch.stack([m(cat[:, f]) for f, m in enumerate(self.wide)], 1).sum((1, 2))
            logit = wide + self.lin(dense).squeeze(1)
            x = torch.cat([e.reshape(b, NF * DIM), dense], 1)
            logit = logit + self.mlp(x).squeeze(1)
            if self.fm:
                s = e.sum(1)
                logit = logit + 0.5 * (s * s - (e * e).sum(1)).sum(1)
            return logit

    net = CTR()
    flops = 6 * sum(m.in_features * m.out_features for m in net.mlp if isinstance(m, nn.Linear))
    return net, flops


# ----------------------------------------------------------------------------- main

JEMALLOC_PATHS = ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2"]


def maybe_reexec(allocator):
    """Standard PyTorch-CPU tuning: preload jemalloc (glibc malloc page-faults on every
    ~2 MB activation buffer; jemalloc makes this training loop ~25% faster) and let PyTorch
    madvise transparent huge pages for big CPU tensors (THP_MEM_ALLOC_ENABLE=1, helps the
    random row gathers/scatters in the 1.8 GB table).  Re-execs once with the env set."""
    if os.environ.get("PEER_TUNED") == "1":
        return
    env = dict(os.environ, PEER_TUNED="1", THP_MEM_ALLOC_ENABLE="1")
    if allocator in ("auto", "jemalloc"):
        lib = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
        if lib is None and allocator == "jemalloc":
            raise SystemExit("jemalloc not found (Debian: apt-get install libjemalloc2)")
        if lib is not None:
            env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["wdl", "deepfm"], required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", choices=["criteo", "synthetic"], required=True)
    ap.add_argument("--test", default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1, help="synthetic data seed")
    ap.add_argument("--init-seed", type=int, default=0, help="torch seed for parameter init")
    ap.add_argument("--tables", choices=["fused", "per-field"], default="fused")
    ap.add_argument("--allocator", choices=["auto", "jemalloc", "glibc"], default="auto",
                    help="auto: preload jemalloc when installed (default)")
    args = ap.parse_args()
    maybe_reexec(args.allocator)

    import torch
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.init_seed)
    torch.sparse.check_sparse_tensor_invariants.disable()

    t0 = time.perf_counter()
    if args.format == "synthetic":
        n = args.max_rows if args.max_rows is not None else 500_000
        y, dense, cat, _ = gen_synthetic(n, args.seed)
        if args.test:
            raise SystemExit("--test is not supported with --format synthetic")
    else:
        y, dense, cat = load_criteo(args.data.split(","), args.max_rows)
    if args.test:
        yt, denset, catt = load_criteo(args.test.split(","))
        ntr = len(y)
        y = np.concatenate([y, yt]); dense = np.concatenate([dense, denset]); cat = np.concatenate([cat, catt])
    else:
        ntr = int(len(y) * 0.9)
    n = len(y)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    net, flops = build(torch, args.model, args.tables)
    cat_t = torch.from_numpy(cat)
    if net.fused:
        cat_t = cat_t + net.offsets
    cat_t = cat_t.contiguous()
    dense_t = torch.from_numpy(dense).contiguous()
    y_t = torch.from_numpy(y).contiguous()
    opt_s = torch.optim.Adagrad(net.sparse_params(), lr=0.05, initial_accumulator_value=0.1)
    try:
        opt_d = torch.optim.Adam(net.dense_params(), lr=1e-3, fused=True)
    except (RuntimeError, TypeError):
        opt_d = torch.optim.Adam(net.dense_params(), lr=1e-3)
    init_s = time.perf_counter() - t0

    bce = torch.nn.functional.binary_cross_entropy_with_logits
    B = args.batch
    net.train()
    steps = 0
    loss_sum = 0.0
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for s in range(0, ntr, B):
            e = min(s + B, ntr)
            logit = net(cat_t[s:e], dense_t[s:e])
            loss = bce(logit, y_t[s:e])
            opt_s.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            loss.backward()
            opt_s.step()
            opt_d.step()
            steps += 1
            if steps % 200 == 0:
                loss_sum = float(loss)
                print(f"step {steps} loss {loss_sum:.4f} {(time.perf_counter()-t0):.1f}s", file=sys.stderr)
    train_s = time.perf_counter() - t0

    net.eval()
    preds = []
    with torch.inference_mode():
        for s in range(ntr, n, 4096):
            e = min(s + 4096, n)
            preds.append(torch.sigmoid(net(cat_t[s:e], dense_t[s:e])).numpy())
    p = np.concatenate(preds) if preds else np.zeros(0)
    yt = y[ntr:]
    samples = ntr * args.epochs
    sps = samples / train_s
    out = {
        "model": args.model,
        "format": args.format,
        "rows": int(n),
        "train_rows": int(ntr),
        "test_rows": int(n - ntr),
        "batch": B,
        "threads": args.threads,
        "epochs": args.epochs,
        "tables": args.tables,
        "train_seconds": round(train_s, 3),
        "samples_per_sec": round(sps, 1),
        "test_auc": round(auc_score(yt, p), 5),
        "test_logloss": round(logloss(yt, p), 5),
        "train_ctr": round(float(y[:ntr].mean()), 4),
        "test_ctr": round(float(yt.mean()), 4),
        "dense_flops_per_sample": int(flops),
        "dense_gflops_per_sec": round(flops * sps / 1e9, 2),
        "load_seconds": round(load_s, 2),
        "init_seconds": round(init_s, 2),
        "allocator": "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc",
        "torch": torch.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
