"""Helpers shared by the test modules: error measure, seeded inputs, the compressed buffer names, the inputs of the
codebook search tests."""

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


def search_inputs(boundaries: torch.Tensor, points: int) -> torch.Tensor:
    """√d-scaled coordinates that test a codebook search over ``boundaries`` [2^b - 1] (float32, CPU): a sweep of
    ``points`` over [-20, 20], every boundary and the floats next to it, ±0, tiny and far values, ±inf."""
    b = boundaries.float().cpu()
    near = torch.cat([b, torch.nextafter(b, torch.tensor(-1e30)), torch.nextafter(b, torch.tensor(1e30))])
    far = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 3e6, -3e6, 1e30, -1e30, float("inf"), -float("inf")])
    return torch.cat([torch.linspace(-20.0, 20.0, points), near, far])
