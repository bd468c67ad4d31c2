"""Shared memory, registers and stack of the encode key kernel's default long launch, compiled offline for the H200
(sm_90; no GPU needed), for every head_dim, key kind and rotation path.

A launch whose compiled kernel needs more shared memory than an H200 block may have (227 KB) fails there with
Triton's OutOfResources (encode_kv turns it into a ValueError naming the launch): at head_dim 256 the cache could
not prefill with its default centred keys until the launch table took the head_dim into account. A large stack
(registers spilled) runs, slowly. The launch decisions are EncodePlan's own (built here on the CPU for a chunk
long enough to take the long launch); only the compile is offline.

    python benchmarks/launch_resources.py                  # the table
    python benchmarks/launch_resources.py --check          # exit 1 if a default launch does not fit an H200
    python benchmarks/launch_resources.py --head-dim 256 --key mse4 --centred

The figures depend on the Triton version (the H200 machine has 3.6): to see what it compiles, put that version
first on the path (see benchmarks/decode_sass.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
from decode_sass import instruction_count, resource_usage, sass
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.kernels import encode

H200_SHARED_PER_BLOCK = 232448  # bytes of shared memory one block may use on an H200 (sm_90)
KEYS = {"mse2": ("mse", 2), "mse3": ("mse", 3), "mse4": ("mse", 4), "prod3": ("prod", 3), "prod4": ("prod", 4)}
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
          torch.int64: "i64", torch.int32: "i32"}  # fmt: skip


def key_launch(d: int, key: str, dtype: torch.dtype, centred: bool,
               norm_correction: bool = True) -> tuple[str, dict[str, int]]:  # fmt: skip
    """(launch label, {"shared", "registers", "stack", "local", "instructions"}) of the default long launch of the key
    kernel for bf16/fp32 keys of head_dim d, centred and scaled in the kernel or as stored (instructions: the SASS
    instructions of the kernel, whose column chunks are unrolled)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling for sm_90 needs Triton's compiler: unset TRITON_INTERPRET")
    mode, bits = KEYS[key]
    cfg = KVCacheConfig(head_dim=d, key_bits=bits, value_bits=4, key_mode=mode, norm_correction=norm_correction)
    heads, n = 8, 2048  # 16 384 rows: past the one-launch path of small chunks
    cache = TurboQuantKVCache(cfg, 1, heads, device="cpu", capacity=n)
    k = torch.zeros(1, heads, n, d, dtype=dtype)
    bufs = {name: t for name, t in cache.buffers().items() if name in cache._buffer_specs()}
    plan = encode.EncodePlan(k, k, bufs, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer,
                             launch=dict(encode.LAUNCH_DEFAULTS), centred=centred, scaled=centred)  # fmt: skip
    mean = torch.zeros(1, heads, d)
    args = plan.key_kernel_args(k, torch.arange(n), mean, mean)
    consts = plan.key_kernel_constants
    options = dict(num_warps=consts.pop("num_warps"), num_stages=consts.pop("num_stages"))
    if plan.key_register_cap:  # (the plan, built on the CPU, applies its cap on CUDA only)
        options["maxnreg"] = plan.key_register_cap
    fn = encode._encode_keys_kernel
    names = fn.arg_names
    signature = {name: "constexpr" for name in consts}
    aligned = set()  # as Triton specialises a launch: pointers, and integers divisible by 16
    for name, arg in zip([x for x in names if x not in consts], args, strict=True):
        signature[name] = "*" + _TYPES[arg.dtype] if isinstance(arg, torch.Tensor) else "i32"
        if isinstance(arg, torch.Tensor) or arg % 16 == 0:
            aligned.add(name)
    src = ASTSource(
        fn=fn, signature={name: signature[name] for name in names},
        constexprs={(names.index(name),): value for name, value in consts.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned},
    )  # fmt: skip
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    use = {"shared": kernel.metadata.shared, **resource_usage(kernel), "instructions": instruction_count(sass(kernel))}
    return plan.label, use


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", nargs="*", type=int, default=[64, 128, 256])
    ap.add_argument("--key", nargs="*", default=list(KEYS), choices=list(KEYS))
    ap.add_argument("--dtype", nargs="*", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--centred", nargs="*", type=int, default=[0, 1], help="0: keys as stored, 1: centred and scaled")
    ap.add_argument("--no-norm-correction", action="store_true", help="keys without norm correction (default: with)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a launch needs more shared memory than an H200")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}; H200 shared memory per block: {H200_SHARED_PER_BLOCK} B")
    print("| head_dim | key | dtype | centred | launch | shared KB | registers | stack B | instructions |")
    too_big = []
    for d, key, dt, centred in itertools.product(args.head_dim, args.key, args.dtype, map(bool, args.centred)):
        dtype = torch.bfloat16 if dt == "bf16" else torch.float32
        label, use = key_launch(d, key, dtype, centred, not args.no_norm_correction)
        print(f"| {d} | {key} | {dt} | {centred} | {label} | {use['shared'] / 1024:.0f} | {use.get('registers', '?')} "
              f"| {use.get('stack', '?')} | {use['instructions']} |", flush=True)  # fmt: skip
        if use["shared"] > H200_SHARED_PER_BLOCK:
            too_big.append((d, key, dt, centred, use["shared"]))
    if too_big:
        print(f"launches that do not fit an H200: {too_big}")
        if args.check:
            sys.exit(1)


if __name__ == "__main__":
    main()
