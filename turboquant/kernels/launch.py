"""What every kernel launch of the package shares."""

from __future__ import annotations

import contextlib
import functools

import torch
from triton import knobs
from triton.runtime import driver


def on_device(device: torch.device):
    """A context in which ``device`` is the current CUDA device.

    Triton launches a kernel on the current device, not on its arguments' device: a cache on cuda:1 (a model split
    over GPUs, e.g. transformers' device_map="auto") while cuda:0 is current would run its kernels on the wrong GPU.
    A no-op where the device is already current, or is not a CUDA device."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def check_value_affine(value_affine: torch.Tensor) -> None:
    """The kernels read and write the (scale, zero) pairs of value_affine [..., 2] float16 as one 4-byte word each:
    refuse, by name, a buffer that does not start on a 4-byte boundary (a view at an odd float16 offset)."""
    if value_affine.data_ptr() % 4:
        raise ValueError("buffer value_affine must start at a 4-byte aligned address (an even float16 offset)")


def _specialisation(arg):
    """What Triton compiles a launch argument into: a tensor's dtype and 16-byte alignment, an integer's value (it
    specialises on 1 and on divisibility by 16; the value itself is a conservative stand-in), a float's type."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, float):
        return float
    return arg


class PreparedLaunch:
    """Launches of one Triton kernel over a fixed grid, fixed compile-time constants and launch options, and fixed
    values of some arguments, for a plan that runs it every decode step.

    Triton's JIT call binds and specialises every argument, builds a cache key and looks the compiled kernel up on
    every launch: 35-65 µs of host time for the decode split kernel (the H200 machine's host; a step of a 32-layer
    model makes three launches per layer; benchmarks/RESULTS.md). The first two calls here take that path, the second
    keeping the compiled kernel with what it was specialised on; a later call whose arguments specialise the same
    way (each tensor's dtype and 16-byte alignment, each integer's value) goes straight to the compiled kernel's
    launcher on the current CUDA stream (11-19 µs). Any other call, a launch hook set (a profiler), or the CPU
    interpreter (no compiled kernel) takes the JIT call.

    kernel: a triton.jit function; grid: up to 3 ints; constants: its constexpr arguments and launch options
    (num_warps, num_stages, maxnreg, launch_pdl) by name; fixed: the runtime arguments that every call shares, by
    name. A call passes the remaining runtime arguments positionally, in the kernel's order."""

    def __init__(self, kernel, grid: tuple[int, ...], constants: dict, fixed: dict | None = None):
        fixed = fixed or {}
        self._names, self._slots = _argument_layout(kernel, frozenset(constants), frozenset(fixed))
        self._kernel = kernel
        self._grid = tuple(grid) + (1,) * (3 - len(grid))
        self._constants = constants
        self._fixed = fixed
        self._calls = 0
        self._compiled = None  # (key, launcher, function, metadata, device index, every argument) once kept

    def __call__(self, *args, jit: bool = False) -> None:
        """Launch with the runtime arguments that are not fixed, in the kernel's order; jit: take Triton's JIT call
        whatever the arguments (to compare the two). The compiled kernel is kept from the second call on, so that
        a plan launched once (decode_attention, encode_kv) pays nothing for it."""
        if len(args) != len(self._slots):
            raise TypeError(f"{self._kernel.__name__}: {len(self._slots)} arguments, got {len(args)}")
        self._calls += 1
        if self._calls == 1:
            self._jit(args)
            return
        key = tuple(map(_specialisation, args))
        compiled = self._compiled
        if not jit and compiled is not None and compiled[0] == key and _launch_hooks_unset(knobs.runtime):
            _, run, function, metadata, device, full = compiled
            full = list(full)
            for i, a in zip(self._slots, args, strict=True):
                full[i] = a
            g0, g1, g2 = self._grid
            run(g0, g1, g2, driver.active.get_current_stream(device), function, metadata, None, None, None,
                *full)  # fmt: skip
            return
        result = self._jit(args)
        if _is_compiled(result) and _launch_hooks_unset(knobs.runtime):
            c, f = self._constants, self._fixed
            template = [c[n] if n in c else f.get(n) for n in self._kernel.arg_names]
            device = driver.active.get_current_device()
            self._compiled = (key, result.run, result.function, result.packed_metadata, device, template)

    def _jit(self, args):
        """Triton's JIT call with every runtime argument: the fixed ones and ``args``, in the kernel's order."""
        it = iter(args)
        runtime = [self._fixed[n] if n in self._fixed else next(it) for n in self._names]
        return self._kernel[self._grid](*runtime, **self._constants)


@functools.cache
def _argument_layout(kernel, constants: frozenset, fixed: frozenset) -> tuple[list[str], list[int]]:
    """(the kernel's runtime arguments, in order; the positions among all its arguments that a call fills)."""
    unknown = fixed - set(kernel.arg_names)
    if unknown:
        raise ValueError(f"{kernel.__name__} has no arguments {sorted(unknown)}")
    names = [n for n in kernel.arg_names if n not in constants]
    return names, [i for i, n in enumerate(kernel.arg_names) if n not in constants and n not in fixed]


def _is_compiled(result) -> bool:
    """Whether a JIT call returned a compiled kernel whose launcher the fast path can call (not the interpreter's
    result; Triton 3.6 and 3.9 give these attributes)."""
    return all(hasattr(result, a) for a in ("run", "function", "packed_metadata"))


def _launch_hooks_unset(runtime) -> bool:
    """No launch hook is set in Triton's runtime knobs: each None (Triton 3.6) or an empty HookChain (newer)."""
    hooks = (runtime.launch_enter_hook, runtime.launch_exit_hook)
    return all(h is None or not getattr(h, "calls", True) for h in hooks)
