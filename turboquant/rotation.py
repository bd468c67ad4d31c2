"""Random rotations: Haar Π (Algorithm 1), Gaussian S for QJL (Algorithm 2), randomized Hadamard.

Convention: vectors are rows. A rotation matrix R maps a row vector x to y = x @ R.T (y = R x for
a column vector), and back with x = y @ R.

Every matrix is cached per (kind, head_dim, device, seed): a second call returns the same tensor
object, so every layer and every step of a model shares one copy. ``clear_cache()`` empties it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_QJL_SEED",
    "DEFAULT_ROTATION_SEED",
    "ROTATIONS",
    "clear_cache",
    "fast_hadamard_transform",
    "get_hadamard_rotation",
    "get_qjl_matrix",
    "get_rotation",
    "get_rotation_matrix",
]

DEFAULT_ROTATION_SEED = 42
DEFAULT_QJL_SEED = 1337
ROTATIONS = ("haar", "hadamard")

_CACHE: dict[tuple, torch.Tensor] = {}


def clear_cache() -> None:
    """Forget every cached rotation and QJL matrix."""
    _CACHE.clear()


def _check_head_dim(head_dim: int) -> None:
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")


def _cached(key: tuple, build) -> torch.Tensor:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _device_key(device) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def get_rotation_matrix(
    head_dim: int, device: torch.device | str | None = None, seed: int = DEFAULT_ROTATION_SEED
) -> torch.Tensor:
    """Haar-random rotation Π: [head_dim, head_dim] float32.

    QR of a float64 Gaussian matrix with the signs of R's diagonal folded into Q, which makes Q
    exactly Haar-distributed (Mezzadri 2007). Generated on the CPU, so a seed gives the same Π on
    every device.
    """
    _check_head_dim(head_dim)
    device = _device_key(device)

    def build() -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        return q.to(torch.float32).to(device)

    return _cached(("haar", head_dim, device, seed), build)


def get_qjl_matrix(
    head_dim: int, device: torch.device | str | None = None, seed: int = DEFAULT_QJL_SEED
) -> torch.Tensor:
    """QJL projection S: [head_dim, head_dim] float32 with i.i.d. N(0, 1) entries (not orthogonal)."""
    _check_head_dim(head_dim)
    device = _device_key(device)

    def build() -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float32).to(device)

    return _cached(("qjl", head_dim, device, seed), build)


def _hadamard_signs(head_dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (head_dim,), generator=gen).to(torch.float32) * 2 - 1


def fast_hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh–Hadamard transform over the last dim (power of two), O(d log d).

    x: [..., d] -> [..., d], equal to x @ H.T with H the Sylvester Hadamard matrix / √d (H = H.T).
    """
    d = x.shape[-1]
    if d & (d - 1) or d == 0:
        raise ValueError(f"the Hadamard transform needs a power-of-two last dimension, got {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, d) / math.sqrt(d)).to(x.dtype)


def get_hadamard_rotation(
    head_dim: int, device: torch.device | str | None = None, seed: int = DEFAULT_ROTATION_SEED
) -> torch.Tensor:
    """Randomized Hadamard rotation R = H · diag(σ): [head_dim, head_dim] float32.

    σ are random ±1 signs and H the normalised Sylvester Hadamard matrix, so x @ R.T equals
    ``fast_hadamard_transform(x * σ)``. head_dim must be a power of two.
    """
    _check_head_dim(head_dim)
    if head_dim & (head_dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
    device = _device_key(device)

    def build() -> torch.Tensor:
        signs = _hadamard_signs(head_dim, seed)
        h = fast_hadamard_transform(torch.eye(head_dim, dtype=torch.float64)).to(torch.float32)
        return (h * signs.unsqueeze(0)).to(device)

    return _cached(("hadamard", head_dim, device, seed), build)


def get_rotation(
    kind: str, head_dim: int, device: torch.device | str | None = None, seed: int = DEFAULT_ROTATION_SEED
) -> torch.Tensor:
    """The rotation matrix of the given kind ("haar" or "hadamard"): [head_dim, head_dim] float32."""
    if kind == "haar":
        return get_rotation_matrix(head_dim, device, seed)
    if kind == "hadamard":
        return get_hadamard_rotation(head_dim, device, seed)
    raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
