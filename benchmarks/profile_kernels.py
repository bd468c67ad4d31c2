"""One decode step or one prefill-chunk encode, for a profiler (Nsight Compute) on a GPU.

Sets up the shape and configuration as benchmarks/decode.py and benchmarks/encode.py do, runs the launch twice
to compile and warm up, then once between ``cudaProfilerStart`` / ``cudaProfilerStop``, so that
``ncu --profile-from-start off`` sees only that call's kernels:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_kernels.py decode --shape 16,65536 --config "K4/V4 mse"
    ncu ... python benchmarks/profile_kernels.py encode --config "K4/V4 mse" [--centred]
"""

from __future__ import annotations

import argparse

import torch
from decode import CONFIGS, H_KV, H_Q, fill_cache, prepared_call

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.kernels.encode import encode_kv


def decode_step(batch: int, context: int, config: str, d: int):
    """The prepared decode launch over a cache of random bf16 K/V [batch, 8, context, d]."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    cfg = KVCacheConfig(head_dim=d, chunk_size=context, **CONFIGS[config])
    shape = (batch, H_KV, context, d)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    cache = fill_cache(cfg, k, v)
    del k, v
    q = torch.randn(batch, H_Q, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return prepared_call(cache, q)


def encode_chunk(n: int, config: str, d: int, centred: bool):
    """The fused encode of a chunk of n random bf16 K/V tokens [1, 8, n, d] into a cache of n slots."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    cfg = KVCacheConfig(head_dim=d, norm_correction=centred, **CONFIGS[config])
    cache = TurboQuantKVCache(cfg, 1, H_KV, device="cuda", dtype=torch.bfloat16, capacity=n)
    bufs = {key: t for key, t in cache.buffers().items() if key in cache._buffer_specs()}
    k = torch.randn(1, H_KV, n, d, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(1, H_KV, n, d, device="cuda", generator=gen).to(torch.bfloat16)
    kw = dict(key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer, check_slots=False)
    if centred:  # keys centred and scaled per channel in the kernel (with norm correction: the cache's defaults)
        kw["key_mean"] = torch.randn(1, H_KV, d, device="cuda", generator=gen) * 0.5
        kw["key_scale"] = torch.exp(0.5 * torch.randn(1, H_KV, d, device="cuda", generator=gen))
    slots = torch.arange(n, device="cuda")
    return lambda: encode_kv(k, v, bufs, slots, **kw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("decode", "encode"))
    ap.add_argument("--shape", default="16,65536", help="decode: batch,context")
    ap.add_argument("--tokens", type=int, default=32768, help="encode: tokens in the chunk (batch 1)")
    ap.add_argument("--config", default="K4/V4 mse", choices=list(CONFIGS))
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    ap.add_argument("--centred", action="store_true", help="encode: keys centred, scaled, norm correction")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/profile_kernels.py needs a CUDA GPU")
    if args.what == "decode":
        batch, context = (int(x) for x in args.shape.split(","))
        step = decode_step(batch, context, args.config, args.head_dim)
    else:
        step = encode_chunk(args.tokens, args.config, args.head_dim, args.centred)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one {args.what} call: {vars(args)}")


if __name__ == "__main__":
    main()
