"""Rotations: Haar Π, randomized Hadamard, the Gaussian QJL matrix S, the fast transform, caching."""

from __future__ import annotations

import math

import pytest
import torch

from turboquant import (
    clear_cache,
    fast_hadamard_transform,
    get_hadamard_rotation,
    get_qjl_matrix,
    get_rotation_matrix,
)
from turboquant.rotation import get_rotation

DIMS = (64, 128, 256)
ROTATION_FNS = {"haar": get_rotation_matrix, "hadamard": get_hadamard_rotation}


def sylvester_hadamard(d: int) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix built by Kronecker products (independent of the package)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(base, h)
    return h / math.sqrt(d)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", ["haar", "hadamard"])
def test_orthogonal(kind: str, d: int) -> None:
    r = ROTATION_FNS[kind](d)
    assert r.shape == (d, d) and r.dtype == torch.float32
    eye = torch.eye(d)
    assert (r.T @ r - eye).abs().max() < 1e-5
    assert (r @ r.T - eye).abs().max() < 1e-5


@pytest.mark.parametrize("d", [16, 64])
def test_haar_has_no_sign_bias(d: int) -> None:
    """Haar Π and -Π are equally likely, so E[Π_ii] = 0. QR without the sign fold of R's diagonal
    (plain Householder) gives Π_00 < 0 for every seed; this catches that."""
    n_seeds = 400
    mats = torch.stack([get_rotation_matrix(d, seed=s) for s in range(n_seeds)]).double()
    clear_cache()
    diag_means = torch.diagonal(mats, dim1=-2, dim2=-1).mean(-1)  # [n_seeds]
    se = diag_means.std().item() / math.sqrt(n_seeds)
    assert abs(diag_means.mean().item()) < 4 * se
    frac_pos = (mats[:, 0, 0] > 0).double().mean().item()
    assert abs(frac_pos - 0.5) < 4 * 0.5 / math.sqrt(n_seeds)
    # each entry of a Haar rotation has variance exactly 1/d
    var = (mats[:, 0, 0] ** 2).mean().item()
    assert abs(var - 1 / d) < 4 * (mats[:, 0, 0] ** 2).std().item() / math.sqrt(n_seeds)


@pytest.mark.parametrize("kind", ["haar", "hadamard"])
def test_seed_determines_matrix(kind: str) -> None:
    fn = ROTATION_FNS[kind]
    a = fn(128, seed=3)
    clear_cache()
    b = fn(128, seed=3)  # rebuilt from scratch, not served from the cache
    assert a is not b
    assert torch.equal(a, b)
    c = fn(128, seed=4)
    assert not torch.allclose(a, c)


def test_qjl_seed_determines_matrix() -> None:
    a = get_qjl_matrix(64, seed=11)
    clear_cache()
    assert torch.equal(a, get_qjl_matrix(64, seed=11))
    assert not torch.allclose(a, get_qjl_matrix(64, seed=12))


@pytest.mark.parametrize("fn", [get_rotation_matrix, get_hadamard_rotation, get_qjl_matrix])
def test_cache_identity_and_clear(fn) -> None:
    a = fn(128)
    assert fn(128) is a
    assert fn(128, device="cpu") is a  # None and "cpu" are the same device key
    assert fn(128, device=torch.device("cpu")) is a
    clear_cache()
    b = fn(128)
    assert b is not a
    assert torch.equal(a, b)
    assert fn(64) is not b


def test_haar_is_not_hadamard_and_kinds_dispatch() -> None:
    assert get_rotation("haar", 128) is get_rotation_matrix(128)
    assert get_rotation("hadamard", 128) is get_hadamard_rotation(128)
    assert not torch.allclose(get_rotation_matrix(128), get_hadamard_rotation(128))
    with pytest.raises(ValueError, match="haar"):
        get_rotation("dct", 128)


@pytest.mark.parametrize("d", DIMS)
def test_qjl_matrix_is_standard_gaussian(d: int) -> None:
    s = get_qjl_matrix(d).double()
    n = d * d
    assert s.shape == (d, d) and get_qjl_matrix(d).dtype == torch.float32
    # i.i.d. N(0, 1): sample mean has SE 1/√n, sample variance has SE √(2/n).
    assert abs(s.mean().item()) < 4 / math.sqrt(n)
    assert abs(s.var().item() - 1) < 4 * math.sqrt(2 / n)
    # fourth moment 3 (SE of the sample mean of s⁴ is √(96/n)): Gaussian, not ±1 or uniform
    assert abs((s**4).mean().item() - 3) < 4 * math.sqrt(96 / n)


@pytest.mark.parametrize("d", DIMS)
def test_qjl_matrix_is_not_orthogonal_nor_a_rotation(d: int) -> None:
    s = get_qjl_matrix(d)
    gram = s @ s.T
    # rows have squared norm ≈ d, not 1, and rows are not mutually orthogonal
    assert (gram - torch.eye(d)).abs().max() > 1
    off_diag = (gram / d - torch.eye(d)).abs().max()
    assert off_diag > 1 / math.sqrt(d)
    pi = get_rotation_matrix(d)
    assert not torch.allclose(s, pi, atol=1e-3)
    assert not torch.allclose(s / math.sqrt(d), pi, atol=1e-3)
    assert not torch.allclose(s / math.sqrt(d), get_hadamard_rotation(d), atol=1e-3)


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128, 256])
def test_fast_hadamard_equals_dense(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(3, 5, d, generator=gen)
    h = sylvester_hadamard(d)
    expected = (x.double() @ h.T).float()
    y = fast_hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # involution: H·H = I for the normalised symmetric Sylvester matrix
    torch.testing.assert_close(fast_hadamard_transform(y), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", DIMS)
def test_hadamard_rotation_is_signed_sylvester(d: int) -> None:
    r = get_hadamard_rotation(d)
    signs = r[0] * math.sqrt(d)  # row 0 of the Sylvester matrix is all ones
    assert torch.allclose(signs.abs(), torch.ones(d), atol=1e-6)
    signs = signs.sign()
    assert 0 < (signs > 0).sum() < d  # really random signs, not all +1
    torch.testing.assert_close(r.double(), sylvester_hadamard(d) * signs.double(), rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(d + 1)
    x = torch.randn(4, 7, d, generator=gen)
    torch.testing.assert_close(fast_hadamard_transform(x * signs), x @ r.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [3, 96, 100])
def test_non_power_of_two_raises(d: int) -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        fast_hadamard_transform(torch.zeros(2, d))
    with pytest.raises(ValueError, match="power-of-two"):
        get_hadamard_rotation(d)


@pytest.mark.parametrize("d", [0, -4])
def test_bad_head_dim_raises(d: int) -> None:
    for fn in (get_rotation_matrix, get_hadamard_rotation, get_qjl_matrix):
        with pytest.raises(ValueError, match="positive integer"):
            fn(d)
