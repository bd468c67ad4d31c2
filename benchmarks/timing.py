"""GPU timing shared by the kernel benchmarks: CUDA-graph capture and median times from triton.testing.do_bench."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence

import torch

__all__ = ["capture", "kernel_times", "median_ms"]


def capture(fn: Callable):
    """fn captured in a CUDA graph, after one warm-up call on a side stream: (replay, what fn returned during the
    capture: the tensors each replay refills). Replays time the GPU work without the host's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def median_ms(fns: Sequence[Callable], rep_ms: int = 200, graphs: bool = False) -> float:
    """Median ms of one call, cycling through fns (the same work on different inputs, so that L2 is not reused);
    graphs: time CUDA-graph replays of them."""
    import triton.testing

    cycle = itertools.cycle([capture(fn)[0] for fn in fns] if graphs else fns)
    return triton.testing.do_bench(lambda: next(cycle)(), warmup=25, rep=rep_ms, return_mode="median")


def kernel_times(step, calls: int = 20) -> str:
    """Mean GPU µs per call of each kernel that ``step`` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0:
            times[event.key] = event.self_device_time_total / calls
    return ", ".join(f"{_short(key)} {us:.1f} µs" for key, us in sorted(times.items(), key=lambda kv: -kv[1]))


def _short(kernel: str) -> str:
    """A kernel's name without its template and argument lists ("void at::native::elementwise_kernel<...>(...)" ->
    "elementwise_kernel"), at most 40 characters."""
    return re.split(r"[<(]", kernel.removeprefix("void "))[0].split("::")[-1][:40]
