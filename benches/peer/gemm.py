#!/usr/bin/env python3
"""fp32 GEMM GFLOP/s of PyTorch's CPU BLAS (MKL on x86-64): gemm.py [THREADS]

One square shape, then the shapes of the models' largest layers at batch 512
(WDL 429->1024 and 1024->512, DeepFM 400->400): the ceiling the dense step of
either trainer can reach on this machine.  Each figure is the median of 5 timings.
"""
import torch, time, sys
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv)>1 else 2)
def bench(m,n,k,iters):
    a=torch.randn(m,k); b=torch.randn(k,n)
    for _ in range(3): a@b
    ts=[]
    for r in range(5):
        t=time.perf_counter()
        for _ in range(iters): c=a@b
        ts.append((time.perf_counter()-t)/iters)
    ts.sort(); t=ts[2]
    return 2*m*n*k/t/1e9
print('threads',torch.get_num_threads())
for (m,n,k,it) in [(2048,2048,2048,10),(512,1024,429,200),(512,512,1024,200),(512,400,400,300)]:
    print(m,n,k, round(bench(m,n,k,it),1),'GFLOP/s')
