"""A chunk of queries attending to a compressed cache (a new prompt after earlier turns), on a GPU.

For each chunk length N_q: attention of N_q new queries (after=True: every cached key precedes them) over a cache
of B = 2 sequences, H_kv = 8, 4096 tokens, K4/V4, through the fused kernel (``backend="triton"``) and through the
PyTorch reference; prints the kernel's first-call time (compilation included), its steady time, the reference's
time and the relative error between the two. The kernel holds at most decode.MAX_ROWS query rows (G·N_q) per
program and tiles longer chunks over more programs.

    python benchmarks/extend.py
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import median_ms

from turboquant.cache import KVCacheConfig, TurboQuantKVCache

B, H_Q, H_KV, D = 2, 32, 8, 128


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--chunks", type=int, nargs="*", default=[1, 16, 17, 64, 300, 1000])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/extend.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = TurboQuantKVCache(KVCacheConfig(head_dim=D, key_bits=4, value_bits=4), B, H_KV, device="cuda",
                              dtype=torch.bfloat16)  # fmt: skip
    k = torch.randn(B, H_KV, args.context, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache.append(k, torch.randn(k.shape, device="cuda", dtype=torch.bfloat16, generator=gen))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; B={B}, H_q={H_Q}, H_kv={H_KV}, D={D}, "
          f"context {args.context}, K4/V4")  # fmt: skip
    print("| N_q | query rows G·N_q | kernel first call s | kernel ms | reference ms | rel err |")
    print("|---|---|---|---|---|---|")
    for n_q in args.chunks:
        q = torch.randn(B, H_Q, n_q, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref, _ = cache.attend_with_lse(q, after=True, backend="reference")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out, _ = cache.attend_with_lse(q, after=True, backend="triton")
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        err = ((out - ref).norm() / ref.norm()).item()
        if not err < 2e-3:
            print(f"| {n_q} | {H_Q // H_KV * n_q} | {first:.1f} | CHECK FAILED | - | {err:.2e} |", flush=True)
            continue
        t_kernel = median_ms([lambda q=q: cache.attend_with_lse(q, after=True, backend="triton")], 100)
        t_ref = median_ms([lambda q=q: cache.attend_with_lse(q, after=True, backend="reference")], 100)
        print(f"| {n_q} | {H_Q // H_KV * n_q} | {first:.1f} | {t_kernel:.3f} | {t_ref:.3f} | {err:.2e} |", flush=True)


if __name__ == "__main__":
    main()
