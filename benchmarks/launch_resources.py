"""Shared memory, registers and stack of the encode key kernel's default long launch, compiled offline for the H200
(sm_90; no GPU needed), for every head_dim, key kind and rotation path; with --merge, those of the decode step's
window merge kernel (kernels.decode._merge_window_kernel) as a TurboQuantCache-default step launches it.

A launch whose compiled kernel needs more shared memory than an H200 block may have (227 KB) fails there with
Triton's OutOfResources (encode_kv turns it into a ValueError naming the launch): at head_dim 256 the cache could
not prefill with its default centred keys until the launch table took the head_dim into account. A large stack
(registers spilled) runs, slowly. The launch decisions are EncodePlan's own (built here on the CPU for a chunk
long enough to take the long launch); only the compile is offline.

    python benchmarks/launch_resources.py                  # the table
    python benchmarks/launch_resources.py --check          # exit 1 if a default launch does not fit an H200
    python benchmarks/launch_resources.py --head-dim 256 --key mse4 --centred
    python benchmarks/launch_resources.py --merge --window-rows 16 32 --merge-warps 4 8

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
from turboquant.kernels import decode, encode

H200_SHARED_PER_BLOCK = 232448  # bytes of shared memory one block may use on an H200 (sm_90)
KEYS = {"mse2": ("mse", 2), "mse3": ("mse", 3), "mse4": ("mse", 4), "prod3": ("prod", 3), "prod4": ("prod", 4)}
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
          torch.int64: "i64", torch.int32: "i32"}  # fmt: skip


def _compile(fn, consts: dict, types: dict[str, str], options: dict, aligned=()):
    """fn compiled for sm_90 with its constants and the other arguments' types; pointers and the ``aligned``
    integers specialised as divisible by 16, as Triton specialises a launch."""
    names = fn.arg_names
    signature = {name: "constexpr" if name in consts else types[name] for name in names}
    aligned = {name for name in names if signature[name].startswith("*")} | set(aligned)
    src = ASTSource(
        fn=fn, signature=signature, constexprs={(names.index(name),): value for name, value in consts.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned},
    )  # fmt: skip
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


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
    types, aligned = {}, set()  # as Triton specialises a launch: pointers, and integers divisible by 16
    for name, arg in zip([x for x in fn.arg_names if x not in consts], args, strict=True):
        types[name] = "*" + _TYPES[arg.dtype] if isinstance(arg, torch.Tensor) else "i32"
        if not isinstance(arg, torch.Tensor) and arg % 16 == 0:
            aligned.add(name)
    kernel = _compile(fn, consts, types, options, aligned)
    use = {"shared": kernel.metadata.shared, **resource_usage(kernel), "instructions": instruction_count(sass(kernel))}
    return plan.label, use


def merge_launch(d: int, window_rows: int, warps: int, splits: int, rows: int = 4) -> dict[str, int]:
    """Resources of _merge_window_kernel for a decode step of ``rows`` query rows per KV head (GQA 4) on a bf16
    cache with TurboQuantCache's defaults (128-token window flushed in blocks of 64, 4 sinks, centred keys), its
    constants from DecodePlan (built on the CPU; the 16-bit products as on CUDA) but the window's rows per step, the
    warps and the split count given (on an H200 one wave of split programs: ~6 per KV head at batch 8 with 8 KV
    heads, 49 at batch 1)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling for sm_90 needs Triton's compiler: unset TRITON_INTERPRET")
    cfg = KVCacheConfig(head_dim=d, residual_window=128, sink_tokens=4, center_keys=True, norm_correction=True)
    cache = TurboQuantKVCache(cfg, 1, 1, device="cpu", dtype=torch.bfloat16, capacity=1024)
    q = torch.zeros(1, 1, rows, d)
    inputs = cache.decode_inputs(q, 1, d**-0.5)
    plan = decode.DecodePlan(
        inputs["q_rot"], None, inputs["buffers"], inputs["codebook"], inputs["seq_lens"], inputs["kv_start"],
        inputs["q_start"], key_bits=4, key_mode="mse", value_bits=4, group_size=cfg.group_size, n_q=1, causal=False,
        exact=True, n_sinks=4, key_tables=inputs["key_tables"], key_table_words=None,
        launch=dict(decode.LAUNCH_DEFAULTS), window_rows=128 + 64 - 1,
    )  # fmt: skip
    assert plan._merge_kernel is decode._merge_window_kernel
    consts = dict(plan._merge_consts, CENTER=True, PARTS16=True, WINDOW=window_rows, WAIT=True, NUM_SPLITS=splits,
                  BS=triton.next_power_of_2(splits))  # fmt: skip
    options = dict(num_warps=warps)
    for name in ("num_warps", "launch_pdl"):
        consts.pop(name, None)
    pointers = dict(O_PART="fp32", L_PART="fp32", OUT="bf16", LSE="fp32", QX="fp32", KX="bf16", VX="bf16", SK="bf16",
                    SV="bf16", KM="fp32", SINK_START="i64", Q_START="i64", WK="bf16", WV="bf16", WIN_POS="i64",
                    KV_LO="i64")  # fmt: skip
    types = {name: "*" + t for name, t in pointers.items()} | {"Q_SCALE": "fp32"}
    types |= {name: "i32" for name in decode._merge_window_kernel.arg_names if name not in types}
    return resource_usage(_compile(decode._merge_window_kernel, consts, types, options))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", nargs="*", type=int, default=[64, 128, 256])
    ap.add_argument("--key", nargs="*", default=list(KEYS), choices=list(KEYS))
    ap.add_argument("--dtype", nargs="*", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--centred", nargs="*", type=int, default=[0, 1], help="0: keys as stored, 1: centred and scaled")
    ap.add_argument("--no-norm-correction", action="store_true", help="keys without norm correction (default: with)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a launch needs more shared memory than an H200")
    ap.add_argument("--merge", action="store_true", help="the window merge kernel's resources instead")
    ap.add_argument("--window-rows", nargs="*", type=int, default=[16, 32], help="with --merge: rows per step")
    ap.add_argument("--merge-warps", nargs="*", type=int, default=[4, 8], help="with --merge: warps")
    ap.add_argument("--splits", nargs="*", type=int, default=[6, 49], help="with --merge: the split kernel's splits")
    args = ap.parse_args(argv)
    if args.merge:
        print(f"triton {triton.__version__}; _merge_window_kernel, bf16 cache, decode step of GQA 4")
        print("| head_dim | splits | window rows per step | warps | registers | stack B |")
        for d, splits, rows, warps in itertools.product(args.head_dim, args.splits, args.window_rows, args.merge_warps):
            use = merge_launch(d, rows, warps, splits)
            print(f"| {d} | {splits} | {rows} | {warps} | {use.get('registers', '?')} | {use.get('stack', '?')} |",
                  flush=True)  # fmt: skip
        return
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
