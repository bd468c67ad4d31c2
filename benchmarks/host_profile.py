"""Host time of a decode step through a transformers model, per cache, and where it goes (cProfile).

At batch 1 and a short context the GPU work of a step is small, so the step's wall time is the host's:
Python, torch dispatch and kernel launches. Prints ms per step and per layer for each cache, the host
synchronisations one step makes (torch.cuda.set_sync_debug_mode: a step that waits for the GPU cannot queue the
next layers' work ahead of it), then the functions with the most own time over the profiled steps (the cache's
layer code and what it calls).

    cd benchmarks && python host_profile.py                       # 4 layers of the Llama-3-8B shape
    cd benchmarks && python host_profile.py --layers 8 --steps 50 --top 40
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import warnings

import torch
from model_speed import CACHES, build_model, decode_steps, filled_cache, free_all

from turboquant.integrations.transformers import cache_keyword


def count_syncs(model, cache, batch: int) -> str:
    """The synchronising CUDA calls of one decode step, by warning text (torch.cuda.set_sync_debug_mode)."""
    ids = torch.zeros(batch, 1, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    seen: dict[str, int] = {}
    for w in caught:
        if str(w.message).startswith("Synchronization debug mode is a prototype"):  # torch's one-time notice
            continue
        text = f"{str(w.message).splitlines()[0][:80]} at {w.filename}:{w.lineno}"
        seen[text] = seen.get(text, 0) + 1
    return "none" if not seen else "; ".join(f"{n}x {text}" for text, n in seen.items())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--caches", nargs="*", default=["TurboQuant K4/V4 defaults"], choices=list(CACHES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/host_profile.py needs a CUDA GPU")
    model = build_model(args.layers)
    for name in args.caches:
        cache = filled_cache(model, CACHES[name], args.batch, args.context, 2 * args.steps + 10)
        decode_steps(model, cache, args.batch, 5)  # warm-up: compilation, workspaces
        times, _ = decode_steps(model, cache, args.batch, args.steps)
        step = statistics.median(times)
        print(f"{name}: {step:.2f} ms per step, {step / args.layers:.3f} ms per layer (batch {args.batch}, "
              f"context {args.context}, {args.layers} layers)", flush=True)  # fmt: skip
        print(f"  host synchronisations in one step: {count_syncs(model, cache, args.batch)}", flush=True)
        if CACHES[name] is None:
            continue
        prof = cProfile.Profile()
        prof.enable()
        decode_steps(model, cache, args.batch, args.steps)
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(args.top)
        calls = args.steps * args.layers
        print(f"  (cProfile over {args.steps} steps = {calls} layer calls; times in s)")
        stats.sort_stats("cumulative").print_stats("turboquant", args.top)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
        del cache
        free_all()


if __name__ == "__main__":
    main()
