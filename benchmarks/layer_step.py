"""One layer's decode step on a GPU, kernel by kernel: TurboQuantKVCache's fused step vs torch SDPA on the bf16 cache.

The step is what a model layer runs on CUDA for a decode token (TurboQuantKVCache.attend_step: the attention of
attend_and_append, whose fused path it takes): the query's rotation, the split kernel over the compressed store, the
merge kernel with the step's own exact token, the sink tokens and the full-precision window. For each cache of
benchmarks/model_speed.py (the paper's quantizers, TurboQuantCache's defaults) and shape (batch, context) of a
Llama-3-8B layer (32 query / 8 KV heads, head_dim 128, bf16; --layer gemma: Gemma-3-270M's 4 / 1 / 256): the gate
first (the fused step against the reference path on the same cache, and a CUDA-graph replay against eager; no time
is printed for a cache whose check failed), then the step's median time as CUDA-graph replays, the GPU time of each
of its kernels (torch.profiler, eager launches), and the same-run baseline: SDPA (flash, enable_gqa) over the bf16
K/V of the same tokens.

    python benchmarks/layer_step.py
    python benchmarks/layer_step.py --shapes 8,32768 --caches "TurboQuant K4/V4 defaults"
    python benchmarks/layer_step.py --dependent-launch wait early   # the merge kernel's launch modes, same call
    python benchmarks/layer_step.py --layer gemma --shapes 1,32768 8,32768
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import torch
from model_speed import CACHES, fill_store
from timing import capture, kernel_times, median_ms
from transformers import LlamaConfig

from turboquant.integrations.transformers import TurboQuantCache
from turboquant.kernels import decode

LLAMA = (32, 8, 128)  # query heads, KV heads, head_dim of a Llama-3-8B layer (--layer llama); gemma: Gemma-3-270M's
GEMMA = (4, 1, 256)
SHAPES = [(8, 32768), (64, 32768)]
DEFAULT_CACHES = ["TurboQuant K4/V4", "TurboQuant K4/V4 defaults", "TurboQuant K4/V4 defaults, window 0",
                  "TurboQuant K3/V2 defaults"]  # fmt: skip
L2_BYTES = 60 * 2**20


def layer_store(spec: dict, batch: int, context: int, gen: torch.Generator, device: str = "cuda",
                shape: tuple[int, int, int] = LLAMA):  # fmt: skip
    """The compressed store of one full-attention layer of TurboQuantCache(spec) with ``shape`` = (query heads, KV
    heads, head_dim), holding ``context`` random tokens per sequence (and, with scale_keys, the key scales of random
    prompt queries)."""
    h_q, h_kv, d = shape
    config = LlamaConfig(hidden_size=h_q * d, num_attention_heads=h_q, num_key_value_heads=h_kv, head_dim=d,
                         num_hidden_layers=1)  # fmt: skip
    layer = TurboQuantCache(config, **spec).layers[0]
    layer.initialize(batch, h_kv, d, device, torch.bfloat16, capacity=context + 1)
    fill_store(layer.store, context, gen, h_q)
    return layer.store


def reference_step(store, q, k, v, scale: float) -> torch.Tensor:
    """The step by the reference path in float32 (attend_step with the PyTorch reference: the stored tokens, sinks
    and window by the reference attention, the step's own token by SDPA, merged by log-sum-exp). (The fused step's
    output is bf16, like q: its rounding alone is ~2e-3 of the output's norm.)"""
    return store.attend_step(q.float(), k.float(), v.float(), scale=scale, backend="reference")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_step(store, q, k, v, scale: float, mode: str, ref: torch.Tensor, merge: tuple[int, int]) -> tuple[str, ...]:
    """The step's cells with the merge launched as ``mode`` and, for a window, ``merge`` = (decode.WINDOW_ROWS,
    decode.MERGE_WARPS): (step ms or CHECK FAILED, rel err against ``ref`` (reference_step), graph == eager,
    kernels)."""
    decode.LAUNCH_DEFAULTS["dependent_launch"] = mode
    decode.WINDOW_ROWS, decode.MERGE_WARPS = merge
    store._drop_plans()  # (a plan keeps the launch options it was built with)

    def step():
        return store.attend_step(q, k, v, scale=scale)

    eager = step().clone()
    replay, graph_out = capture(step)
    replay()
    torch.cuda.synchronize()
    graph_ok = torch.equal(graph_out, eager)
    err = rel_err(eager, ref)
    if not (err < 5e-3 and graph_ok):
        return "CHECK FAILED", f"{err:.2e}", str(graph_ok), "-"
    return f"{median_ms([step], graphs=True):.4f}", f"{err:.2e}", str(graph_ok), kernel_times(step)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help="batch,context pairs (default: 8,32768 64,32768)")
    ap.add_argument(
        "--layer",
        choices=["llama", "gemma"],
        default="llama",
        help="the heads: Llama-3-8B's (32 query, 8 KV, head_dim 128) or Gemma-3-270M's (4, 1, 256)",
    )
    ap.add_argument("--caches", nargs="*", default=DEFAULT_CACHES, choices=[c for c in CACHES if CACHES[c]])
    ap.add_argument(
        "--dependent-launch",
        nargs="*",
        default=[decode.LAUNCH_DEFAULTS["dependent_launch"]],
        choices=decode.DEPENDENT_LAUNCHES,
        help="how the merge kernel follows the split kernel",
    )
    ap.add_argument("--window-rows", nargs="*", type=int, default=[decode.WINDOW_ROWS],
                    help="window rows per step of the window's merge kernel (several: each timed)")  # fmt: skip
    ap.add_argument("--merge-warps", nargs="*", type=int, default=[getattr(decode, "MERGE_WARPS", 4)],
                    help="warps of the window's merge kernel (several: each timed)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("results/layer_step.md"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/layer_step.py needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    h_q, h_kv, d = LLAMA if args.layer == "llama" else GEMMA
    scale = 1 / math.sqrt(d)
    gen = torch.Generator(device="cuda").manual_seed(0)
    header = ("| shape (B, ctx) | cache | merge launch | step ms | bf16 SDPA ms | speedup | rel err vs ref | "
              "graph == eager | kernels (µs) |")  # fmt: skip
    rows = []
    print(header, flush=True)
    for batch, context in shapes:
        shape = f"({batch}, {context})"
        q = torch.randn(batch, h_q, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(batch, h_kv, 1, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        kv_bytes = batch * h_kv * (context + 1) * d * 2 * 2
        copies = max(1, math.ceil(3 * L2_BYTES / kv_bytes))
        kvs = [[torch.randn(batch, h_kv, context + 1, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2)] for _ in range(copies)]  # fmt: skip
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = [lambda q=q, kb=kb, vb=vb: torch.nn.functional.scaled_dot_product_attention(q, kb, vb,
                                                                                                 enable_gqa=True)
                    for kb, vb in kvs]  # fmt: skip
            t_bf16 = median_ms(sdpa, graphs=True)
        del kvs, sdpa
        for name in args.caches:
            store = layer_store(CACHES[name], batch, context, gen, shape=(h_q, h_kv, d))
            if not store._fused_step_applies(q, None, None, "auto"):
                raise SystemExit(f"{name}: a decode step does not take the fused path")
            ref = reference_step(store, q, k, v, scale)
            merges = [(rows, warps) for rows in args.window_rows for warps in args.merge_warps]
            if not store.config.residual_window:
                merges = merges[:1]
            for mode, merge in itertools.product(args.dependent_launch, merges):
                t, mode_err, graph_ok, kernels = time_step(store, q, k, v, scale, mode, ref, merge)
                speedup = f"{t_bf16 / float(t):.2f}x" if t != "CHECK FAILED" else "-"
                window = store.config.residual_window
                launch = (mode or "auto") + (f", window {merge[0]} rows, {merge[1]} warps" if window else "")
                line = (f"| {shape} | {name} | {launch} | {t} | {t_bf16:.4f} | {speedup} | {mode_err} | {graph_ok} | "
                        f"{kernels} |")  # fmt: skip
                print(line, flush=True)
                rows.append(line)
            del store
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    title = (f"# one {args.layer} layer's decode step ({h_q} query heads, {h_kv} KV heads, head_dim {d}), "
             f"{time.strftime('%Y-%m-%d %H:%M')}, {torch.cuda.get_device_name()}")  # fmt: skip
    args.out.write_text(f"{title}, torch {torch.__version__}\n\n{header}\n|" + "---|" * 9 + "\n"
                        + "\n".join(rows) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
