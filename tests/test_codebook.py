"""Lloyd-Max codebooks for the coordinate density f_d (paper Lemma 1, Theorem 1)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import gammaln

from turboquant import codebook_distortion, generate_lloyd_max_codebook, get_codebook
from turboquant.codebook import SHIPPED_BITS, SHIPPED_HEAD_DIMS, _load_or_generate, shipped_codebook_path

DIMS = (64, 96, 128, 256)
BITS = (1, 2, 3, 4)

# REFERENCE.md §1: Lloyd-Max optimum D = E‖x - x̂‖² for unit vectors.
DISTORTION_TABLE = {
    64: (0.35839, 0.11453, 0.033391, 0.009132),
    128: (0.36089, 0.11600, 0.033966, 0.009315),
    256: (0.36214, 0.11674, 0.034256, 0.009408),
}
# REFERENCE.md §1: positive centroids ×√d at d=128.
CENTROIDS_D128 = {
    1: (0.7994,),
    2: (0.4525, 1.5052),
    3: (0.2444, 0.7533, 1.3366, 2.1315),
    4: (0.1279, 0.3864, 0.6536, 0.9371, 1.2478, 1.6043, 2.0459, 2.6889),
}


def scaled_density(d: int):
    """Density of s = √d·t with t ~ f_d (Lemma 1), written out independently of the package."""
    log_const = gammaln(d / 2) - 0.5 * math.log(math.pi) - gammaln((d - 1) / 2)
    r = math.sqrt(d)

    def g(s: float) -> float:
        t = s / r
        return math.exp(log_const + (d - 3) / 2 * math.log1p(-t * t)) / r if abs(t) < 1 else 0.0

    return g


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", DIMS)
def test_codebook_shape_dtype_sorted_symmetric(d: int, bits: int) -> None:
    c = get_codebook(d, bits)
    assert c.shape == (2**bits,)
    assert c.dtype == torch.float32
    assert bool((c[1:] > c[:-1]).all())
    assert torch.allclose(c, -c.flip(0), rtol=0, atol=1e-6)
    assert float(c.abs().max()) < math.sqrt(d)


@pytest.mark.parametrize("bits", SHIPPED_BITS)
@pytest.mark.parametrize("d", SHIPPED_HEAD_DIMS)
def test_shipped_file_equals_fresh_generation(d: int, bits: int) -> None:
    path = shipped_codebook_path(d, bits)
    assert path.exists(), f"missing shipped codebook {path.name}"
    shipped = torch.load(path, weights_only=True)
    assert shipped.dtype == torch.float32
    fresh = generate_lloyd_max_codebook(d, bits)
    torch.testing.assert_close(shipped, fresh, rtol=0, atol=1e-6)
    torch.testing.assert_close(get_codebook(d, bits), fresh, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_centroids_match_reference_d128(bits: int) -> None:
    pos = torch.tensor(CENTROIDS_D128[bits])
    expected = torch.cat((-pos.flip(0), pos))
    torch.testing.assert_close(get_codebook(128, bits), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", sorted(DISTORTION_TABLE))
def test_distortion_matches_reference_table(d: int, bits: int) -> None:
    got = codebook_distortion(d, get_codebook(d, bits))
    assert got == pytest.approx(DISTORTION_TABLE[d][bits - 1], rel=1e-3)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", [64, 128])
def test_lloyd_max_conditions_by_quadrature(d: int, bits: int) -> None:
    """Each centroid is the conditional mean of its cell under f_d (integrated numerically here),
    and codebook_distortion equals the integrated MSE: an oracle that shares no code with the package."""
    g = scaled_density(d)
    r = math.sqrt(d)
    total, _ = quad(g, -r, r, epsabs=1e-13)
    assert total == pytest.approx(1.0, abs=1e-9)
    c = get_codebook(d, bits).double().numpy()
    edges = np.concatenate(([-r], (c[1:] + c[:-1]) / 2, [r]))
    mse = 0.0
    for k in range(len(c)):
        lo, hi = edges[k], edges[k + 1]
        p, _ = quad(g, lo, hi, epsabs=1e-14)
        m, _ = quad(lambda s: s * g(s), lo, hi, epsabs=1e-14)
        assert c[k] == pytest.approx(m / p, abs=2e-6)
        e, _ = quad(lambda s, ck=c[k]: (s - ck) ** 2 * g(s), lo, hi, epsabs=1e-14)
        mse += e
    assert codebook_distortion(d, get_codebook(d, bits)) == pytest.approx(mse, rel=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_distortion_within_paper_bounds(bits: int) -> None:
    """Theorem 1 / 3: 4^-b ≤ D ≤ √3·π/2·4^-b, for every shipped head_dim."""
    for d in SHIPPED_HEAD_DIMS:
        got = codebook_distortion(d, get_codebook(d, bits))
        assert 4.0**-bits <= got <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


def test_generation_is_fast() -> None:
    generate_lloyd_max_codebook(16, 1)  # warm-up: the first call imports scipy.stats
    for d, bits in [(128, 4), (80, 4), (256, 3)]:
        start = time.perf_counter()
        generate_lloyd_max_codebook(d, bits)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"generating d={d}, b={bits} took {elapsed:.2f} s"


def test_non_shipped_head_dim_is_generated_and_disk_cached(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TURBOQUANT_CACHE_DIR", str(tmp_path))
    _load_or_generate.cache_clear()
    try:
        c = get_codebook(80, 3)
        torch.testing.assert_close(c, generate_lloyd_max_codebook(80, 3), rtol=0, atol=1e-7)
        assert c.shape == (8,) and bool((c[1:] > c[:-1]).all())
        files = list(tmp_path.rglob("*"))
        cached = [f for f in files if f.is_file()]
        assert len(cached) == 1 and cached[0].suffix == ".pt", files  # no temporary files left behind
        torch.testing.assert_close(torch.load(cached[0], weights_only=True), c, rtol=0, atol=0)

        # The disk cache is what a fresh process reads: plant a sentinel and drop the memory cache.
        sentinel = torch.arange(8, dtype=torch.float32)
        torch.save(sentinel, cached[0])
        _load_or_generate.cache_clear()
        assert torch.equal(get_codebook(80, 3), sentinel)
        # ... and the in-memory cache serves it without touching the disk again.
        cached[0].unlink()
        assert torch.equal(get_codebook(80, 3), sentinel)
    finally:
        _load_or_generate.cache_clear()


def test_shipped_head_dim_writes_nothing_to_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TURBOQUANT_CACHE_DIR", str(tmp_path))
    _load_or_generate.cache_clear()
    try:
        get_codebook(128, 2)
        assert list(tmp_path.rglob("*")) == []
    finally:
        _load_or_generate.cache_clear()


@pytest.mark.parametrize("device", [None, "cpu"])
def test_get_codebook_returns_a_private_copy(device) -> None:
    """Callers may modify what they get without corrupting the process-wide cache."""
    c = get_codebook(64, 2, device)
    before = c.clone()
    c.zero_()
    try:
        assert torch.equal(get_codebook(64, 2), before)
    finally:
        _load_or_generate.cache_clear()


def test_seed_keyword_is_accepted_and_ignored() -> None:
    a = generate_lloyd_max_codebook(128, 3, seed=0)
    b = generate_lloyd_max_codebook(128, 3, seed=12345)
    assert torch.equal(a, b)
    assert torch.equal(a, generate_lloyd_max_codebook(128, 3))


@pytest.mark.parametrize("head_dim", [15, 8, 1, 0, -64])
def test_bad_head_dim_raises(head_dim: int) -> None:
    with pytest.raises(ValueError, match=">= 16"):
        get_codebook(head_dim, 2)
    with pytest.raises(ValueError, match=">= 16"):
        generate_lloyd_max_codebook(head_dim, 2)


@pytest.mark.parametrize("bits", [0, 5, -1, 8])
def test_bad_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4\)"):
        get_codebook(128, bits)


@pytest.mark.parametrize("bits", [0, -1, 9])
def test_solver_bad_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 5, 6, 7, 8\)"):
        generate_lloyd_max_codebook(128, bits)


def test_solver_five_bits() -> None:
    """The solver also gives wider codebooks (for studies; the quantizers take 1-4 bits): at 5 bits, 32 antisymmetric
    ascending centroids whose distortion is about a quarter of 4 bits' (high-rate 4^-b), and at d = 4096, where the
    coordinate density is Gaussian to O(1/d), Max's Gaussian value 0.002499."""
    c5 = generate_lloyd_max_codebook(128, 5)
    assert c5.shape == (32,) and bool((c5[1:] > c5[:-1]).all()) and torch.allclose(c5, -c5.flip(0))
    d4, d5 = codebook_distortion(128, get_codebook(128, 4)), codebook_distortion(128, c5)
    assert 0.24 < d5 / d4 < 0.30
    assert abs(codebook_distortion(4096, generate_lloyd_max_codebook(4096, 5)) - 0.002499) < 0.005 * 0.002499
