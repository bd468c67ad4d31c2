"""Decode attention over the compressed cache vs torch SDPA (flash) on the bf16 cache, on a GPU.

For each shape (batch, context) and configuration: fill a TurboQuantKVCache with random K/V,
check the fused kernel against the PyTorch reference on the same cache (the gate: no speed is
printed for a configuration whose check failed), check a CUDA-graph replay equals eager, then time
with triton.testing.do_bench (median) rotating over enough copies of the inputs that repeated runs
do not hit the 60 MB L2. GB/s counts the compressed bytes the kernel must read.

    python benchmarks/decode.py                 # the issue's shapes and configurations
    python benchmarks/decode.py --quick         # two shapes
    python benchmarks/decode.py --sweep         # also try launch configurations per shape
    python benchmarks/decode.py --graphs        # time CUDA-graph replays (no host launch overhead)
    python benchmarks/decode.py --head-dim 64 256   # other head dims (default 128)
    python benchmarks/decode.py --kernel-times  # also the GPU time of each kernel of a step
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import torch
from timing import capture, kernel_times, median_ms

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.kernels.decode import (
    DEPENDENT_LAUNCHES,
    KEY_TABLE_SOURCES,
    LAUNCH_DEFAULTS,
    THREE_PER_SM_REGISTERS,
    decode_attention,
    tiles_2d_layout,
)

CONFIGS = {
    "K4/V4 mse": dict(key_bits=4, value_bits=4, key_mode="mse"),
    "K3/V2 mse": dict(key_bits=3, value_bits=2, key_mode="mse"),
    "K3/V2 prod": dict(key_bits=3, value_bits=2, key_mode="prod"),
}
SHAPES = [(16, 65536), (8, 32768), (1, 131072), (1, 8192), (64, 8192)]
H_Q, H_KV, D = 32, 8, 128  # D: the default head_dim (--head-dim)
L2_BYTES = 60 * 2**20


def fill_cache(cfg: KVCacheConfig, k: torch.Tensor, v: torch.Tensor) -> TurboQuantKVCache:
    """A cache holding k, v [B, H_kv, N, D], appended in chunks (bounded temporaries)."""
    batch, _, context, d = k.shape
    cache = TurboQuantKVCache(cfg, batch, H_KV, device="cuda", dtype=torch.bfloat16, capacity=context)
    chunk = max(1, min(context, (1 << 26) // (batch * H_KV * d)))
    for start in range(0, context, chunk):
        cache.append(k[:, :, start : start + chunk], v[:, :, start : start + chunk])
    return cache


def prepared_call(cache: TurboQuantKVCache, q: torch.Tensor, **launch):
    """The kernel launch of one decode step, queries already rotated (what a model step runs)."""
    b, h_q, n_q, d = q.shape
    qg = q.float().reshape(b, H_KV, (h_q // H_KV) * n_q, d)
    inputs = cache.decode_inputs(qg, n_q, 1 / math.sqrt(d))
    return lambda: decode_attention(**inputs, **launch)


def layout_args(cfg: KVCacheConfig) -> dict:
    return dict(key_bits=cfg.key_bits, key_mode=cfg.key_mode, value_bits=cfg.value_bits,
                group_size=cfg.group_size)  # fmt: skip


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only (1, 8192) and (8, 32768)")
    ap.add_argument("--sweep", action="store_true", help="try block_n × register cap, each at its one-wave split count")
    ap.add_argument("--stages", nargs="*", type=int, default=[2, 3], help="pipeline depths the sweep tries")
    ap.add_argument("--block-n", nargs="*", type=int, default=[64, 128], help="block sizes the sweep tries")
    ap.add_argument("--warps", nargs="*", type=int, default=[4], help="warps per program the sweep tries")
    ap.add_argument("--caps", nargs="*", type=int, default=[0, THREE_PER_SM_REGISTERS],
                    help="register caps per thread the sweep tries (0: none; 168: three programs per SM)")  # fmt: skip
    ap.add_argument(
        "--dependent-launch",
        nargs="*",
        default=[LAUNCH_DEFAULTS["dependent_launch"]],
        choices=DEPENDENT_LAUNCHES,
        help="how the merge kernel follows the split kernel (several: each timed)",
    )
    ap.add_argument("--key-table-source", nargs="*", default=[LAUNCH_DEFAULTS["key_table_source"]],
                    choices=KEY_TABLE_SOURCES,
                    help="where the sweep's kernels keep the key lookup tables")  # fmt: skip
    ap.add_argument("--ab", action="store_true", help="also time portable unpacking and the generic 3-D-field kernel")
    ap.add_argument("--graphs", action="store_true", help="time CUDA-graph replays (both ours and SDPA)")
    ap.add_argument("--shapes", nargs="*", help="batch,context pairs, e.g. 8,32768 1,131072")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--head-dim", nargs="*", type=int, default=[D], help="head dims to time (64, 128, 256)")
    ap.add_argument(
        "--kernel-times",
        action="store_true",
        help="also print the GPU time of each kernel of a step (torch.profiler, eager launches)",
    )
    ap.add_argument("--out", type=Path, default=Path("results/decode.md"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shapes = [(1, 8192), (8, 32768)] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split(",")) for shape in args.shapes]
    gen = torch.Generator(device="cuda").manual_seed(0)
    launches = [dict(LAUNCH_DEFAULTS)]
    if args.sweep:
        launches = [  # programs_per_sm None: one wave, from the compiled kernel's occupancy
            dict(
                LAUNCH_DEFAULTS,
                block_n=bn,
                num_warps=warps,
                num_stages=stages,
                max_registers=cap,
                key_table_source=tables,
                dependent_launch=dependent,
            )
            for dependent in args.dependent_launch
            for warps in args.warps
            for tables in args.key_table_source
            for bn in args.block_n
            for cap in args.caps
            for stages in args.stages
        ]
    elif len(args.dependent_launch) > 1:
        launches = [dict(LAUNCH_DEFAULTS, dependent_launch=dependent) for dependent in args.dependent_launch]
    elif args.ab:  # same run: portable unpacking, and the generic 3-D-field kernel
        launches = [
            dict(LAUNCH_DEFAULTS),
            dict(LAUNCH_DEFAULTS, inline_asm=False),
            dict(LAUNCH_DEFAULTS, tiles_2d=False),
        ]
    rows = []
    header = (
        "| shape (B, ctx) | config | kernel ms | GB/s (compressed) | bf16 SDPA ms | speedup | "
        "rel err vs ref | graph == eager | cos vs bf16 | launch |"
    )
    print(header)
    for d, (batch, context) in itertools.product(args.head_dim, shapes):
        shape = f"({batch}, {context})" + ("" if d == D else f" D={d}")
        kv_bytes = batch * H_KV * context * d * 2 * 2
        n_copies_bf16 = max(1, math.ceil(3 * L2_BYTES / kv_bytes))
        ks = [torch.randn(batch, H_KV, context, d, device="cuda", dtype=torch.bfloat16, generator=gen)
              for _ in range(n_copies_bf16)]  # fmt: skip
        vs = [torch.randn_like(k) for k in ks]
        q = torch.randn(batch, H_Q, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_fns = [
                (lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                for k, v in zip(ks, vs, strict=True)
            ]
            t_bf16 = median_ms(sdpa_fns, graphs=args.graphs)
            sdpa_out = sdpa_fns[0]()
        for name in args.configs:
            cfg = KVCacheConfig(head_dim=d, chunk_size=context, **CONFIGS[name])
            per_token = cfg.bytes_per_token_per_head()
            comp_bytes = batch * H_KV * context * per_token
            n_copies = max(1, math.ceil(3 * L2_BYTES / comp_bytes))
            caches = [fill_cache(cfg, ks[0], vs[0]) for _ in range(n_copies)]
            # gate: kernel vs PyTorch reference on the same cache; graph replay vs eager
            ref, _ = caches[0].attend_with_lse(q, backend="reference")
            ours, _ = caches[0].attend_with_lse(q, backend="triton")
            err = rel_err(ours, ref)
            run0 = prepared_call(caches[0], q, **launches[0])
            eager = run0()[0].clone()
            replay, (g_out, _) = capture(run0)
            replay()
            torch.cuda.synchronize()
            graph_ok = torch.equal(g_out, eager)
            cos = torch.nn.functional.cosine_similarity(ours.float().flatten(1), sdpa_out.float().flatten(1))
            cos = cos.mean().item()
            ok = err < 5e-3 and graph_ok
            best = None
            if ok:
                for launch in launches:
                    fns = [prepared_call(c, q, **launch) for c in caches]
                    launch_err = rel_err(fns[0]()[0].reshape(ref.shape), ref)
                    if not launch_err < 5e-3:  # every timed launch passes the same check
                        print(f"  {shape} {name} {launch}: CHECK FAILED ({launch_err:.2e})", flush=True)
                        continue
                    t = median_ms(fns, graphs=args.graphs)
                    if len(launches) > 1:
                        print(f"  sweep {shape} {name} {launch}: {t:.4f} ms", flush=True)
                    if best is None or t < best[0]:
                        best = (t, launch)
            if best is None:
                line = (
                    f"| {shape} | {name} | CHECK FAILED | - | {t_bf16:.4f} | - | {err:.2e} | "
                    f"{graph_ok} | {cos:.4f} | - |"
                )
            else:
                t, launch = best
                line = (
                    f"| {shape} | {name} | {t:.4f} | {comp_bytes / t / 1e6:.0f} | {t_bf16:.4f} | "
                    f"{t_bf16 / t:.2f}x | {err:.2e} | {graph_ok} | {cos:.4f} | "
                    f"bn{launch['block_n'] or 'auto'} w{launch['num_warps'] or 'auto'}"
                    f" s{launch['num_stages'] or 'auto'}"
                    f" {launch['programs_per_sm'] or 'auto'}/SM"
                    f"{' regcb' if launch['register_codebook'] else ''}{' keymajor' if launch['key_major'] else ''}"
                    f"{' 2d' if launch['tiles_2d'] and tiles_2d_layout(d, **layout_args(cfg)) else ''}"
                    f"{' asm' if launch['inline_asm'] else ''}"
                    f"{' tables-in-asm' if launch['key_table_source'] == 'immediates' else ''} |"
                )
            print(line, flush=True)
            rows.append(line)
            if args.kernel_times and best is not None:
                print(f"  kernels {shape} {name}: {kernel_times(prepared_call(caches[0], q, **best[1]))}", flush=True)
            del caches
            torch.cuda.empty_cache()
        del ks, vs
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    dev = torch.cuda.get_device_name()
    import triton

    args.out.write_text(
        f"# decode benchmark, {stamp}, {dev}, torch {torch.__version__}, triton {triton.__version__}\n\n"
        + header + "\n|" + "---|" * 10 + "\n" + "\n".join(rows) + "\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
