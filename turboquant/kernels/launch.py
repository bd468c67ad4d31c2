"""What every kernel launch of the package shares."""

from __future__ import annotations

import contextlib

import torch


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
