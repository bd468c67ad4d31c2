"""Host time of a decode step through a transformers model, per cache, and where it goes (cProfile).

At batch 1 and a short context the GPU work of a step is small, so the step's wall time is the host's:
Python, torch dispatch and kernel launches. Prints ms per step and per layer for each cache, then the
functions with the most own time over the profiled steps (the cache's layer code and what it calls).

    cd benchmarks && python host_profile.py                       # 4 layers of the Llama-3-8B shape
    cd benchmarks && python host_profile.py --layers 8 --steps 50 --top 40
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics

import torch
from model_speed import CACHES, build_model, decode_steps, filled_cache, free_all


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
