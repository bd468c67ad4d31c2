"""Lloyd-Max codebooks for the coordinate density of a randomly rotated unit vector.

For x uniform on the unit sphere in R^d, each coordinate t has density (paper, Lemma 1)

    f_d(t) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 - t²)^((d-3)/2),   t ∈ [-1, 1],

i.e. T = 2X - 1 with X ~ Beta(a, a), a = (d-1)/2. Codebooks are stored in √d-scaled units
(s = √d·t, which tends to N(0, 1)), so the same numbers serve every head_dim closely.

The Lloyd-Max conditions (centroid = conditional mean of its cell, boundaries = midpoints) are
iterated with every cell moment computed in closed form from regularized incomplete beta
functions: no sampling, no randomness, and one codebook in a few milliseconds.
"""

from __future__ import annotations

import argparse
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch
from scipy.special import betainc

__all__ = [
    "SHIPPED_BITS",
    "SHIPPED_HEAD_DIMS",
    "codebook_distortion",
    "generate_lloyd_max_codebook",
    "get_codebook",
    "user_cache_dir",
]

SHIPPED_HEAD_DIMS = (64, 96, 128, 256)
SHIPPED_BITS = (1, 2, 3, 4)
SUPPORTED_BITS = (1, 2, 3, 4)  # the quantizers' and shipped codebooks' widths
SOLVER_BITS = tuple(range(1, 9))  # what generate_lloyd_max_codebook solves (wider codebooks for studies)
MIN_HEAD_DIM = 16

_CONFIG_DIR = Path(__file__).parent / "configs"


def _check_args(head_dim: int, bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS) -> None:
    if not isinstance(head_dim, int) or head_dim < MIN_HEAD_DIM:
        raise ValueError(f"head_dim must be an integer >= {MIN_HEAD_DIM}, got {head_dim!r}")
    if bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits!r}")


class _CellMoments:
    """Moments of the √d-scaled coordinate S = √d (2X - 1), X ~ Beta(a, a), over intervals."""

    def __init__(self, head_dim: int):
        self.a = (head_dim - 1) / 2.0
        self.sqrt_d = float(np.sqrt(head_dim))

    def __call__(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
        """Return (P, E[S·1], E[S²·1]) over the cells [lo, hi] given in √d units."""
        a, r = self.a, self.sqrt_d
        u = np.clip((lo / r + 1.0) / 2.0, 0.0, 1.0)
        v = np.clip((hi / r + 1.0) / 2.0, 0.0, 1.0)
        p0 = betainc(a, a, v) - betainc(a, a, u)
        # E[X 1] = E[X] · P_{Beta(a+1, a)}(cell), E[X² 1] = E[X²] · P_{Beta(a+2, a)}(cell)
        p1 = 0.5 * (betainc(a + 1, a, v) - betainc(a + 1, a, u))
        p2 = (a + 1) / (2 * (2 * a + 1)) * (betainc(a + 2, a, v) - betainc(a + 2, a, u))
        m1 = r * (2 * p1 - p0)  # S = r (2X - 1)
        m2 = r * r * (4 * p2 - 4 * p1 + p0)
        return p0, m1, m2


def _distortion(moments: _CellMoments, centroids: np.ndarray) -> float:
    edges = np.concatenate(([-moments.sqrt_d], (centroids[1:] + centroids[:-1]) / 2, [moments.sqrt_d]))
    p0, m1, m2 = moments(edges[:-1], edges[1:])
    return float(np.sum(m2 - 2 * centroids * m1 + centroids**2 * p0))


def generate_lloyd_max_codebook(
    head_dim: int, bits: int, *, tol: float = 1e-12, max_iter: int = 20000, seed: int | None = None
) -> torch.Tensor:
    """Solve Lloyd-Max for f_d (exact density, numerical integration in closed form).

    Args:
        head_dim: d, the vector dimension (>= 16).
        bits: b in 1..8 (the quantizers take 1-4); the codebook has 2^b entries.
        tol: stop when no centroid moves by more than ``tol`` (√d units).
        seed: accepted for compatibility and ignored: the solution is deterministic.

    Returns:
        centroids: [2^b] float32, sorted ascending, symmetric about 0, in √d-scaled units.
    """
    del seed
    _check_args(head_dim, bits, SOLVER_BITS)
    moments = _CellMoments(head_dim)
    n = 2**bits
    # Start from the Gaussian-limit quantiles' cell means: close to the answer, so few iterations.
    from scipy.stats import norm

    c = norm.ppf((np.arange(n) + 0.5) / n)
    r = moments.sqrt_d
    for _ in range(max_iter):
        edges = np.concatenate(([-r], (c[1:] + c[:-1]) / 2, [r]))
        p0, m1, _ = moments(edges[:-1], edges[1:])
        new = m1 / p0
        new = (new - new[::-1]) / 2  # exact symmetry of f_d
        done = np.max(np.abs(new - c)) < tol
        c = new
        if done:
            break
    return torch.tensor(np.sort(c), dtype=torch.float32)


def codebook_distortion(head_dim: int, centroids: torch.Tensor) -> float:
    """Exact MSE of nearest-centroid quantization of one √d-scaled coordinate.

    Equals D = E‖x - x̂‖² for unit vectors quantized with a Haar rotation (Theorem 1):
    the d coordinates each contribute MSE/d in unscaled units.
    """
    c = np.sort(centroids.double().cpu().numpy())
    return _distortion(_CellMoments(head_dim), c)


def user_cache_dir() -> Path:
    """turboquant's per-user cache: $TURBOQUANT_CACHE_DIR, else $XDG_CACHE_HOME/turboquant (~/.cache/turboquant)."""
    root = os.environ.get("TURBOQUANT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "turboquant"


def shipped_codebook_path(head_dim: int, bits: int) -> Path:
    return _CONFIG_DIR / f"codebook_d{head_dim}_b{bits}.pt"


@cache
def _load_or_generate(head_dim: int, bits: int) -> torch.Tensor:
    shipped = shipped_codebook_path(head_dim, bits)
    if shipped.exists():
        return torch.load(shipped, weights_only=True)
    cached = user_cache_dir() / "codebooks" / shipped.name
    if cached.exists():
        return torch.load(cached, weights_only=True)
    centroids = generate_lloyd_max_codebook(head_dim, bits)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        torch.save(centroids, tmp)
        tmp.replace(cached)
    except OSError:
        pass  # a read-only home only costs a regeneration next time
    return centroids


def get_codebook(head_dim: int, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Lloyd-Max centroids for (head_dim, bits): [2^b] float32, √d-scaled units.

    Shipped for head_dim in SHIPPED_HEAD_DIMS; any other head_dim >= 16 is generated once and
    cached in memory and in the user cache directory ($TURBOQUANT_CACHE_DIR or ~/.cache/turboquant).
    """
    _check_args(head_dim, bits)
    centroids = _load_or_generate(head_dim, bits)
    return centroids.to(device, copy=True) if device is not None else centroids.clone()


def regenerate_shipped_codebooks(out_dir: Path = _CONFIG_DIR) -> list[Path]:
    """Write every shipped codebook file anew (``turboquant codebooks``)."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    grid = [(d, b) for d in SHIPPED_HEAD_DIMS for b in SHIPPED_BITS]
    for d, b in tqdm(grid, desc="codebooks", unit="codebook"):
        path = out_dir / f"codebook_d{d}_b{b}.pt"
        torch.save(generate_lloyd_max_codebook(d, b), path)
        paths.append(path)
    _load_or_generate.cache_clear()
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the shipped Lloyd-Max codebooks.")
    parser.add_argument("--out-dir", type=Path, default=_CONFIG_DIR)
    args = parser.parse_args(argv)
    for path in regenerate_shipped_codebooks(args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
