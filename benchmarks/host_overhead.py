"""Host time per call of the pieces of one layer's decode step (GPU work kept negligible: batch 1, 1k tokens).

A decode step of a transformers model at small batch is bound by the host: Python, argument checks, torch
dispatch and kernel launches. This times each piece of what TurboQuantKVCache runs per layer and step, next to
the cost of one small torch operation and one bare Triton launch, so that a change to the step's host path can
be predicted and checked: wall time over many calls with a single synchronisation at the end (the GPU finishes
each call's tiny kernels before the host issues the next).

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import time

import torch
import triton
import triton.language as tl

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.demo import DEMO_SETTINGS
from turboquant.kernels.decode import decode_attention
from turboquant.kernels.encode import encode_kv
from turboquant.kernels.launch import PreparedLaunch

H_Q, H_KV, D = 32, 8, 128
PLAIN = dict(norm_correction=False, center_keys=False, scale_keys=False, sink_tokens=0, residual_window=0)


@triton.jit
def _bare_kernel(X, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(X + o, tl.load(X + o) + 1.0)


def host_us(fn, calls: int, rounds: int = 5) -> tuple[float, float]:
    """Microseconds per call: (host time to issue it, wall time with one synchronisation after all calls), each
    the least over ``rounds`` rounds of ``calls`` calls (the host's own noise only adds time). The second is
    larger where the GPU, not the host, sets the pace (or the launch queue filled up)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    issue, wall = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        issue.append((t1 - t0) / calls * 1e6)
        wall.append((t2 - t0) / calls * 1e6)
    return min(issue), min(wall)


def cache_rows(label: str, extra: dict, context: int, calls: int, gen: torch.Generator):
    """Rows (piece, (issue µs, synchronised µs)) for a K4/V4 cache with ``extra`` settings, and its layer step."""
    cfg = KVCacheConfig(head_dim=D, key_bits=4, value_bits=4, **extra)
    capacity = context + 8 * (5 * calls + 20)  # every timed append fits without growing the buffers
    cache = TurboQuantKVCache(cfg, 1, H_KV, device="cuda", dtype=torch.bfloat16, capacity=capacity)
    k = torch.randn(1, H_KV, context, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(1, H_Q, context, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache.append(k, torch.randn_like(k), queries=q)
    q1 = torch.randn(1, H_Q, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k1, v1 = k[:, :, :1].clone(), k[:, :, 1:2].clone()
    qg = q1.float().reshape(1, H_KV, H_Q // H_KV, D)
    inputs = cache.decode_inputs(qg, 1, 1 / math.sqrt(D))
    slots = torch.tensor([capacity - 1], device="cuda")
    bufs, kq, vq = cache.buffers(), cache.key_quantizer, cache.value_quantizer

    def step():
        return cache.attend_and_append(q1, k1, v1)

    step()  # the cache's decode plan, whose split kernel launches both ways below
    plan = next(iter(cache._decode_plans.values()))
    q_rot, sq = cache._kernel_queries(qg.contiguous())
    q_start = torch.full((1,), cache.total_tokens, dtype=torch.int64, device="cuda")
    split_args = (q_rot, q_rot if sq is None else sq, cache.seq_lens, cache._kernel_kv_start(), q_start, 0.1)
    rows = [
        (f"{label}: decode split kernel, Triton's JIT launch",
         host_us(lambda: plan.split_launch(*split_args, jit=True), calls)),
        (f"{label}: decode split kernel, prepared launch", host_us(lambda: plan.split_launch(*split_args), calls)),
    ]  # fmt: skip
    rows += [
        (f"{label}: decode_inputs (query rotation)", host_us(lambda: cache.decode_inputs(qg, 1, 0.1), calls)),
        (f"{label}: decode_attention (2 launches)", host_us(lambda: decode_attention(**inputs), calls)),
        (f"{label}: encode_kv, one token (1 launch)",
         host_us(lambda: encode_kv(k1, v1, bufs, slots, key_quantizer=kq, value_quantizer=vq, check_slots=False),
                 calls)),
        (f"{label}: append one token", host_us(lambda: cache.append(k1, v1), calls)),
        (f"{label}: attend_and_append (a whole layer step)", host_us(step, calls)),
    ]  # fmt: skip
    return rows, step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--profile", action="store_true", help="also cProfile each cache's whole layer step")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/host_overhead.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.zeros(16, device="cuda")
    bare = PreparedLaunch(_bare_kernel, (1,), dict(N=16))
    rows = [
        ("one torch op (x.add_(1))", host_us(lambda: x.add_(1.0), args.calls)),
        ("one bare Triton launch", host_us(lambda: _bare_kernel[(1,)](x, 16), args.calls)),
        ("one bare Triton launch, prepared (kernels.launch.PreparedLaunch)", host_us(lambda: bare(x), args.calls)),
    ]
    steps = {}
    caches = (("paper quantizers", PLAIN), ("TurboQuantCache defaults, no window", DEMO_SETTINGS),
              ("TurboQuantCache defaults (window 128)", {**DEMO_SETTINGS, "residual_window": 128}))  # fmt: skip
    for label, extra in caches:
        cache_part, steps[label] = cache_rows(label, extra, args.context, args.calls, gen)
        rows += cache_part
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    print("| piece | host µs to issue | µs per call, synchronised |\n|---|---|---|")
    for name, (issue, wall) in rows:
        print(f"| {name} | {issue:.1f} | {wall:.1f} |")
    for label, step in steps.items() if args.profile else ():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            step()
        prof.disable()
        torch.cuda.synchronize()
        print(f"== {label}: layer step, {args.calls} calls")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
