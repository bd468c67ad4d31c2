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
import math
import time

import torch
import triton
import triton.language as tl

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.kernels.decode import decode_attention
from turboquant.kernels.encode import encode_kv

H_Q, H_KV, D = 32, 8, 128
PLAIN = dict(norm_correction=False, center_keys=False, scale_keys=False, sink_tokens=0)
DEFAULTS = dict(norm_correction=True, center_keys=True, scale_keys=True, sink_tokens=4)


@triton.jit
def _bare_kernel(X, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(X + o, tl.load(X + o) + 1.0)


def host_us(fn, calls: int) -> float:
    """Microseconds of wall time per call, one synchronisation after all calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/host_overhead.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.zeros(16, device="cuda")
    rows = [("one torch op (x.add_(1))", host_us(lambda: x.add_(1.0), args.calls)),
            ("one bare Triton launch", host_us(lambda: _bare_kernel[(1,)](x, 16), args.calls))]  # fmt: skip
    n_steps = 20 + 5 * args.calls + 40
    for label, extra in (("paper quantizers", PLAIN), ("TurboQuantCache defaults", DEFAULTS)):
        cfg = KVCacheConfig(head_dim=D, key_bits=4, value_bits=4, **extra)
        cache = TurboQuantKVCache(cfg, 1, H_KV, device="cuda", dtype=torch.bfloat16,
                                  capacity=args.context + n_steps)  # fmt: skip
        k = torch.randn(1, H_KV, args.context, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        q = torch.randn(1, H_Q, args.context, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        cache.append(k, torch.randn_like(k), queries=q)
        q1 = torch.randn(1, H_Q, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k1, v1 = k[:, :, :1].clone(), k[:, :, 1:2].clone()
        qg = q1.float().reshape(1, H_KV, H_Q // H_KV, D)
        inputs = cache.decode_inputs(qg, 1, 1 / math.sqrt(D))
        slots = torch.tensor([args.context + n_steps - 1], device="cuda")
        bufs = cache.buffers()
        kq, vq = cache.key_quantizer, cache.value_quantizer
        rows += [
            (f"{label}: decode_inputs (query rotation)", host_us(lambda: cache.decode_inputs(qg, 1, 0.1), args.calls)),
            (f"{label}: decode_attention (2 launches)", host_us(lambda: decode_attention(**inputs), args.calls)),
            (f"{label}: encode_kv, one token (2 launches)",
             host_us(lambda: encode_kv(k1, v1, bufs, slots, key_quantizer=kq, value_quantizer=vq,
                                       check_slots=False), args.calls)),
            (f"{label}: append one token", host_us(lambda: cache.append(k1, v1), args.calls)),
            (f"{label}: attend_and_append (a whole layer step)",
             host_us(lambda: cache.attend_and_append(q1, k1, v1), args.calls)),
        ]  # fmt: skip
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    print("| piece | host µs per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
