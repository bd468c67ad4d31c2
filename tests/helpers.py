"""Helpers shared by the test modules: error measure, seeded inputs, the compressed buffer names."""

from __future__ import annotations

import torch

COMPRESSED = ("key_codes", "key_norms", "key_signs", "key_rnorms", "value_codes", "value_affine")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def randn(*shape: int, seed: int) -> torch.Tensor:
    """Standard normal [*shape] float32 from its own generator seeded with ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
