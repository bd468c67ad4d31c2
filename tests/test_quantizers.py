"""TurboQuantMSE (Algorithm 1), TurboQuantProd (Algorithm 2), ValueQuantizer and compression ratios.

Statistical checks use fixed seeds and tolerances derived from standard errors (SE). REFERENCE.md §1
gives the distortion table; Theorem 2 gives unbiasedness and the QJL variance bound.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import cache

import pytest
import torch
import torch.nn.functional as F

from turboquant import (
    MSECompressed,
    ProdCompressed,
    TurboQuantMSE,
    TurboQuantProd,
    ValueCompressed,
    ValueQuantizer,
    clear_cache,
    codebook_distortion,
    compression_ratio,
    get_codebook,
    pack_indices,
    packed_size,
    unpack_indices,
)

# REFERENCE.md §1: D = E‖x - x̂‖² for unit x, Lloyd-Max optimum of the exact density.
DISTORTION_TABLE = {
    64: (0.35839, 0.11453, 0.033391, 0.009132),
    128: (0.36089, 0.11600, 0.033966, 0.009315),
    256: (0.36214, 0.11674, 0.034256, 0.009408),
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
N_MSE = 20_000
N_PROD = 20_000
PROD_GROUPS = 100  # Theorem 2's expectations are over S too: draw S afresh for every group of pairs


def unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=-1, keepdim=True)


def mean_and_se(v: torch.Tensor) -> tuple[float, float]:
    v = v.double().flatten()
    return v.mean().item(), v.std().item() / math.sqrt(v.numel())


def exact_distortion(d: int, bits: int) -> float:
    return codebook_distortion(d, get_codebook(d, bits))


@contextmanager
def one_thread():
    """Run on one thread: many small ops are far faster so, above all on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@cache
def mse_sq_errors(d: int, bits: int, rotation: str) -> torch.Tensor:
    """‖x - x̂‖² for N_MSE uniform unit vectors (the same vectors for every bits and rotation)."""
    x = unit_rows(N_MSE, d, torch.Generator().manual_seed(d))
    q = TurboQuantMSE(d, bits, rotation=rotation)
    with one_thread():
        return ((x - q.decompress(q.compress(x))) ** 2).sum(-1).double()


@cache
def prod_errors(d: int, bits: int) -> dict[str, torch.Tensor]:
    """Estimation errors over PROD_GROUPS fresh QJL matrices S, N_PROD pairs in all: [groups, n].

    "indep": inner_product_score(q, k) - ⟨q, k⟩ with q, k independent uniform unit vectors;
    "self_prod" / "self_mse": the Prod and the MSE-only (b-1 bits) estimates of ⟨k, k⟩ = 1, minus 1;
    "corr_prod" / "corr_mse": the same for q = (k + z)/‖k + z‖, z ~ N(0, I/d) (⟨q, k⟩ ≈ 0.7).
    """
    n = N_PROD // PROD_GROUPS
    gen = torch.Generator().manual_seed(10 * d + bits)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("indep", "self_prod", "self_mse", "corr_prod", "corr_mse")}
    with one_thread():
        for g in range(PROD_GROUPS):
            q = unit_rows(n, d, gen).unsqueeze(1)  # [n, 1, d]
            k = unit_rows(n, d, gen).unsqueeze(1)  # [n, 1, d]
            qc = k + torch.randn(n, 1, d, generator=gen) / math.sqrt(d)
            qc = qc / qc.norm(dim=-1, keepdim=True)
            tq = TurboQuantProd(d, bits, qjl_seed=90_000 + g)
            c = tq.compress(k)  # leading shape [n, 1]
            est = tq.inner_product_score(q, c)  # [n, 1, 1]
            assert est.shape == (n, 1, 1)
            k_mse = tq.mse.decompress(c.mse)  # [n, 1, d], the b-1 bit MSE reconstruction
            out["indep"].append(est.flatten() - (q * k).sum(-1).flatten())
            out["self_prod"].append(tq.inner_product_score(k, c).flatten() - 1)
            out["self_mse"].append((k * k_mse).sum(-1).flatten() - 1)
            true_c = (qc * k).sum(-1).flatten()
            out["corr_prod"].append(tq.inner_product_score(qc, c).flatten() - true_c)
            out["corr_mse"].append((qc * k_mse).sum(-1).flatten() - true_c)
    clear_cache()  # drop the PROD_GROUPS matrices S
    return {name: torch.stack(v).double() for name, v in out.items()}


# ---------------------------------------------------------------------------------------------
# TurboQuantMSE


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_mse_distortion_matches_table(rotation: str, d: int, bits: int) -> None:
    """Any fixed rotation of a uniform unit vector is uniform, so E‖x - x̂‖² is the table value."""
    mean, se = mean_and_se(mse_sq_errors(d, bits, rotation))
    ref = DISTORTION_TABLE[d][bits - 1]
    assert abs(mean - ref) < 3 * se, f"D={mean:.6f}, table {ref}, {abs(mean - ref) / se:.1f} SE away"
    assert abs(mean - ref) < 0.02 * ref


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_distortion_scales_by_about_four_per_bit(d: int, bits: int) -> None:
    ratio = mse_sq_errors(d, bits, "haar").mean().item() / mse_sq_errors(d, bits + 1, "haar").mean().item()
    assert 3.2 < ratio < 4.5


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_mse_indices_are_nearest_centroids(rotation: str) -> None:
    """The bucketize search equals a dense argmin, and decompress is ‖x‖·Πᵀ(c[idx]/√d) for rows."""
    d, bits = 128, 3
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(500, d, generator=gen) * 3
    q = TurboQuantMSE(d, bits, rotation=rotation)
    c = q.compress(x)
    idx = unpack_indices(c.indices, bits, d).long()
    y = (x.double() / x.double().norm(dim=-1, keepdim=True)) @ q.rotation.double().T * math.sqrt(d)
    nearest = (y.unsqueeze(-1) - q.centroids.double()).abs().argmin(-1)
    assert torch.equal(idx, nearest)
    manual = (q.centroids[idx] / math.sqrt(d) * c.norms.float().unsqueeze(-1)) @ q.rotation
    torch.testing.assert_close(q.decompress(c), manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_mse_cosine_rises_with_bits(rotation: str) -> None:
    x = torch.randn(2000, 128, generator=torch.Generator().manual_seed(3))
    cos = []
    for bits in (1, 2, 3, 4):
        q = TurboQuantMSE(128, bits, rotation=rotation)
        cos.append(F.cosine_similarity(x, q.decompress(q.compress(x)), dim=-1).mean().item())
    assert cos == sorted(cos) and len(set(cos)) == 4
    assert cos[0] > 0.75 and cos[3] > 0.99


@pytest.mark.parametrize("norm_correction", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_zero_vectors_decompress_to_zero(dtype: torch.dtype, norm_correction: bool) -> None:
    d = 64
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[1] = 0
    x[3] = 0
    mse = TurboQuantMSE(d, 3, norm_correction=norm_correction)
    out = mse.decompress(mse.compress(x))
    assert not out.isnan().any()
    assert torch.equal(out[[1, 3]], torch.zeros(2, d, dtype=dtype))
    prod = TurboQuantProd(d, 3, norm_correction=norm_correction)
    c = prod.compress(x)
    out = prod.decompress(c)
    assert not out.isnan().any()
    assert torch.equal(out[[1, 3]], torch.zeros(2, d, dtype=dtype))
    scores = prod.inner_product_score(x.unsqueeze(0), c)  # [1, 5, 5]
    assert not scores.isnan().any()
    assert torch.equal(scores[0, :, [1, 3]], torch.zeros(5, 2))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_norm_correction_preserves_norms(rotation: str, bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(1000, 128, generator=gen) * torch.randn(1000, 1, generator=gen).exp()
    q = TurboQuantMSE(128, bits, rotation=rotation, norm_correction=True)
    out = q.decompress(q.compress(x))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=2e-3, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_norms_without_correction_shrink_by_distortion(bits: int) -> None:
    """Lloyd-Max centroids are conditional means, so E‖x̂‖²/‖x‖² = 1 - D exactly (and ‖x̂‖ ≤ ~‖x‖)."""
    d = 128
    gen = torch.Generator().manual_seed(40 + bits)
    x = torch.randn(N_MSE, d, generator=gen) * torch.randn(N_MSE, 1, generator=gen).exp()
    q = TurboQuantMSE(d, bits)
    ratio = q.decompress(q.compress(x)).norm(dim=-1) ** 2 / x.norm(dim=-1) ** 2
    mean, se = mean_and_se(ratio)
    assert abs(mean - (1 - exact_distortion(d, bits))) < 3 * se
    assert 0.5 < ratio.min() and ratio.max() < 1.25


@pytest.mark.parametrize("kind", ["mse", "prod", "value"])
def test_batch_dims_round_trip_shapes(kind: str) -> None:
    d, bits = 128, 3
    x = torch.randn(2, 3, 5, d, generator=torch.Generator().manual_seed(1))
    quant = {"mse": TurboQuantMSE(d, bits), "prod": TurboQuantProd(d, bits), "value": ValueQuantizer(bits)}[kind]
    c = quant.compress(x)
    assert c.shape == (2, 3, 5)
    out = quant.decompress(c)
    assert out.shape == x.shape
    flat = quant.compress(x.reshape(-1, d))
    torch.testing.assert_close(quant.decompress(flat).reshape(x.shape), out, rtol=0, atol=0)
    if kind == "mse":
        assert c.indices.shape == (2, 3, 5, packed_size(d, bits)) and c.indices.dtype == torch.uint8
        assert c.norms.shape == (2, 3, 5) and c.norms.dtype == torch.float16
    elif kind == "prod":
        assert c.mse.indices.shape == (2, 3, 5, packed_size(d, bits - 1))
        assert c.signs.shape == (2, 3, 5, d // 8) and c.signs.dtype == torch.uint8
        assert c.residual_norms.shape == (2, 3, 5) and c.residual_norms.dtype == torch.float16
    else:
        assert c.codes.shape == (2, 3, 5, packed_size(d, bits)) and c.codes.dtype == torch.uint8
        assert c.scales.shape == c.zeros.shape == (2, 3, 5, d // 32)
        assert c.scales.dtype == c.zeros.dtype == torch.float16


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unpacked_quantize_agrees_with_compress(bits: int) -> None:
    """The unpacked quantize() paths (what caches and kernels consume) hold the same codes as compress()."""
    d = 128
    x = torch.randn(3, 9, d, generator=torch.Generator().manual_seed(bits))
    mse = TurboQuantMSE(d, bits)
    idx, norms = mse.quantize(x)
    c = mse.compress(x)
    assert idx.shape == x.shape and int(idx.min()) >= 0 and int(idx.max()) < 2**bits
    assert norms.dtype == torch.float16 and torch.equal(norms, c.norms)
    assert torch.equal(pack_indices(idx, bits), c.indices)

    prod = TurboQuantProd(d, bits)
    idx, norms, signs, gamma = prod.quantize(x)
    c = prod.compress(x)
    assert signs.dtype == torch.uint8 and set(signs.unique().tolist()) <= {0, 1}
    assert gamma.dtype == torch.float16 and torch.equal(gamma, c.residual_norms)
    assert torch.equal(pack_indices(idx, bits - 1), c.mse.indices) and torch.equal(norms, c.mse.norms)
    assert torch.equal(pack_indices(signs, 1), c.signs)
    torch.testing.assert_close(gamma.float(), (x - prod.mse.decompress(c.mse)).norm(dim=-1), rtol=2.0**-11, atol=0)

    val = ValueQuantizer(bits)
    codes, scales, zeros = val.quantize(x)
    c = val.compress(x)
    assert torch.equal(pack_indices(codes, bits), c.codes)
    assert torch.equal(scales, c.scales) and torch.equal(zeros, c.zeros)
    assert torch.equal(val.dequantize_codes(codes, scales, zeros), val.decompress(c))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["mse", "prod", "value"])
def test_output_dtype_follows_input(kind: str, dtype: torch.dtype) -> None:
    """Low-precision inputs come back in their dtype, and lose nothing measurable to it."""
    d = 128
    x32 = torch.randn(2000, d, generator=torch.Generator().manual_seed(2))
    x = x32.to(dtype)
    quant = {"mse": TurboQuantMSE(d, 4), "prod": TurboQuantProd(d, 4), "value": ValueQuantizer(4)}[kind]
    c = quant.compress(x)
    assert c.dtype == dtype
    out = quant.decompress(c)
    assert out.dtype == dtype and out.shape == x.shape
    # relative error against the input actually given, next to the same computation in float32
    err = ((out.float() - x.float()) ** 2).sum() / (x.float() ** 2).sum()
    err32 = ((quant.decompress(quant.compress(x32)) - x32) ** 2).sum() / (x32**2).sum()
    assert abs(err.item() / err32.item() - 1) < 0.01


# ---------------------------------------------------------------------------------------------
# TurboQuantProd


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rotation", ["haar", "hadamard"])
def test_prod_unbiased_with_default_s(rotation: str, bits: int) -> None:
    """With the one shared S (default qjl_seed): independent q, k, q shaped [N,1,d], keys [N,1].

    Unbiased (for independent q any estimator linear in q is, by q -> -q symmetry: the q = k and
    correlated cases below are the sharper test), and the variance within Theorem 2's bound
    π/(2d)·D_mse(b-1), which for one fixed S holds up to its row norms (~1/d relative)."""
    d = 128
    gen = torch.Generator().manual_seed(7 + bits)
    q = unit_rows(N_PROD, d, gen).unsqueeze(1)
    k = unit_rows(N_PROD, d, gen).unsqueeze(1)
    tq = TurboQuantProd(d, bits, rotation=rotation)
    c = tq.compress(k)
    assert c.shape == (N_PROD, 1)
    est = tq.inner_product_score(q, c)
    assert est.shape == (N_PROD, 1, 1) and est.dtype == torch.float32
    err = (est.flatten() - (q * k).sum(-1).flatten()).double()
    mean, se = mean_and_se(err)
    assert abs(mean) < 3 * se, f"bias {mean:.2e} is {abs(mean) / se:.1f} SE"
    var = err.var().item()
    se_var = ((err - err.mean()) ** 2).std().item() / math.sqrt(N_PROD)  # SE of the sample variance
    bound = math.pi / (2 * d) * exact_distortion(d, bits - 1)
    assert var <= bound + 4 * se_var, f"var {var:.3e} > bound {bound:.3e} (SE {se_var:.1e})"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_prod_variance_theorem_2(d: int, bits: int) -> None:
    """Var(est - ⟨q,k⟩) ≤ π/(2d)·E[γ²] with E[γ²] = D_mse(b-1) for unit k (Theorem 2), and over
    random S, q exactly π/(2d)·E[γ²]·(1 - 2/(πd)) (Var = (π/2·γ² - ⟨q,r⟩²)/d, E⟨q,r⟩² = γ²/d).
    Note REFERENCE.md's 0.047/d at b=4 is below the exact π/2·D_mse(3)/d = 0.0534/d."""
    err = prod_errors(d, bits)["indep"]  # [groups, n]
    var = err.pow(2).mean().item() - err.mean().item() ** 2
    group_msq = err.pow(2).mean(-1)  # groups share S; their spread gives the SE of var
    se_var = group_msq.std().item() / math.sqrt(err.shape[0])
    bound = math.pi / (2 * d) * exact_distortion(d, bits - 1)
    assert var <= bound + 4 * se_var, f"var {var:.3e} > bound {bound:.3e} (SE {se_var:.1e})"
    predicted = bound * (1 - 2 / (math.pi * d))
    assert abs(var - predicted) < 4 * se_var, f"var {var:.3e} vs predicted {predicted:.3e} (SE {se_var:.1e})"
    assert se_var < 0.03 * bound  # the test has the power to see a few percent


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_prod_variance_below_general_bound(d: int, bits: int) -> None:
    """The paper's bit-width bound: inner-product distortion ≤ √3·π²/d · 4^-b for ‖q‖ = 1."""
    err = prod_errors(d, bits)["indep"]
    assert err.pow(2).mean().item() <= math.sqrt(3) * math.pi**2 / d * 4.0**-bits


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("pair", ["self", "corr"])
def test_prod_fixes_mse_shrinkage_of_inner_products(pair: str, d: int, bits: int) -> None:
    """For q = k (or q correlated with k) the MSE-only estimate at b-1 bits shrinks ⟨q, k⟩: for q = k
    by exactly -D_mse(b-1) (centroids are conditional means, so E⟨k, x̂⟩ = E‖x̂‖² = 1 - D).
    Prod removes the bias (Theorem 2).

    Prod's bias is zero in expectation over S, not for each fixed S (for q = k it depends on the
    row norms of S), so its SE comes from the spread of the per-S group means."""
    errs = prod_errors(d, bits)
    mse_mean, mse_se = mean_and_se(errs[f"{pair}_mse"])
    assert mse_mean < -10 * mse_se
    if pair == "self":
        assert abs(mse_mean + exact_distortion(d, bits - 1)) < 3 * mse_se
    group_means = errs[f"{pair}_prod"].mean(-1)
    prod_mean = group_means.mean().item()
    prod_se = group_means.std().item() / math.sqrt(group_means.numel())
    assert abs(prod_mean) < 3 * prod_se, f"Prod bias {prod_mean:.2e} is {abs(prod_mean) / prod_se:.1f} SE"
    assert abs(prod_mean) < 0.1 * abs(mse_mean)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_decompress_includes_qjl_term(bits: int) -> None:
    d = 128
    gen = torch.Generator().manual_seed(bits)
    k = torch.randn(2, 4, 7, d, generator=gen)
    q = torch.randn(2, 4, 3, d, generator=gen)
    tq = TurboQuantProd(d, bits)
    c = tq.compress(k)
    full = tq.decompress(c)
    mse_only = tq.mse.decompress(c.mse)
    assert (full - mse_only).abs().max() > 1e-2
    scores = tq.inner_product_score(q, c)
    assert scores.shape == (2, 4, 3, 7)
    torch.testing.assert_close(scores, q @ full.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    # GQA-style broadcast: one key head shared by 4 query heads
    c1 = tq.compress(k[:, :1])
    torch.testing.assert_close(
        tq.inner_product_score(q, c1), q @ tq.decompress(c1).transpose(-1, -2), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bits", [1, 5, 0])
def test_prod_bad_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        TurboQuantProd(128, bits)


# ---------------------------------------------------------------------------------------------
# ValueQuantizer


@pytest.mark.parametrize(("bits", "min_cos"), [(2, 0.90), (3, 0.98), (4, 0.99), (8, 0.9999)])
def test_value_cosine(bits: int, min_cos: float) -> None:
    x = torch.randn(4096, 128, generator=torch.Generator().manual_seed(0))
    v = ValueQuantizer(bits)
    cos = F.cosine_similarity(x, v.decompress(v.compress(x)), dim=-1).mean().item()
    assert cos >= min_cos


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_value_error_bounds_and_codes(bits: int, group_size: int) -> None:
    """Each element within half a step (plus fp16 rounding of scale and zero); each group's min and
    max reconstruct to fp16 rounding; codes span [0, 2^b - 1]."""
    d = 128
    gen = torch.Generator().manual_seed(bits * group_size)
    x = torch.randn(512, d, generator=gen) * 2 + torch.randn(512, 1, generator=gen)
    v = ValueQuantizer(bits, group_size)
    c = v.compress(x)
    out = v.decompress(c)
    codes = unpack_indices(c.codes, bits, d)
    assert int(codes.min()) == 0 and int(codes.max()) == 2**bits - 1
    xg = x.unflatten(-1, (d // group_size, group_size))
    og = out.unflatten(-1, (d // group_size, group_size))
    cg = codes.unflatten(-1, (d // group_size, group_size))
    lo, hi = xg.amin(-1), xg.amax(-1)
    fp16_rel = 2.0**-11  # half an fp16 ulp, relative
    round_tol = fp16_rel * (lo.abs() + (hi - lo)) * 1.01 + 1e-6  # zero's rounding + levels·scale's rounding
    assert ((og - xg).abs() <= (c.scales.float() / 2 + round_tol).unsqueeze(-1)).all()
    at_min = xg == lo.unsqueeze(-1)
    at_max = xg == hi.unsqueeze(-1)
    assert (cg[at_min] == 0).all() and (cg[at_max] == 2**bits - 1).all()
    assert ((og - xg).abs()[at_min] <= round_tol.unsqueeze(-1).expand_as(og)[at_min]).all()
    assert ((og - xg).abs()[at_max] <= round_tol.unsqueeze(-1).expand_as(og)[at_max]).all()
    # relative to the group range (Gaussian data): ~1e-3
    rel = ((og - xg).abs() * at_max).amax(-1) / (hi - lo)
    assert rel.max() < 2e-3


def test_value_8_bit_near_exact() -> None:
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(8))
    v = ValueQuantizer(8)
    out = v.decompress(v.compress(x))
    rel = ((out - x) ** 2).sum() / (x**2).sum()
    assert rel < 1e-4
    group_range = (x.unflatten(-1, (4, 32)).amax(-1) - x.unflatten(-1, (4, 32)).amin(-1)).max()
    assert (out - x).abs().max() < group_range / 255


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_value_constant_groups_exact(dtype: torch.dtype) -> None:
    x = torch.tensor([0.0, 0.5, -3.25, 1024.0])
    x = x.repeat_interleave(32).reshape(1, 128).repeat(3, 1).to(dtype)
    for bits in (2, 3, 4, 8):
        v = ValueQuantizer(bits)
        c = v.compress(x)
        out = v.decompress(c)
        assert not out.isnan().any()
        assert torch.equal(out, x)
        assert torch.equal(c.scales, torch.zeros_like(c.scales))
    # a constant not representable in fp16 comes back to fp16 rounding, still without NaN
    y = torch.full((2, 64), 0.1)
    out = ValueQuantizer(4).decompress(ValueQuantizer(4).compress(y))
    assert not out.isnan().any()
    torch.testing.assert_close(out, y, rtol=2.0**-11, atol=0)


@pytest.mark.parametrize(("d", "group_size"), [(128, 48), (96, 64), (100, 32), (64, 128)])
def test_value_group_size_must_divide(d: int, group_size: int) -> None:
    with pytest.raises(ValueError, match="must divide"):
        ValueQuantizer(4, group_size).compress(torch.randn(2, d))


@pytest.mark.parametrize("group_size", [0, -32])
def test_value_bad_group_size(group_size: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        ValueQuantizer(4, group_size)


@pytest.mark.parametrize("bits", [1, 5, 16, 0])
def test_value_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 8\)"):
        ValueQuantizer(bits)


# ---------------------------------------------------------------------------------------------
# Compression ratio


def test_compression_ratio_reference_values() -> None:
    assert compression_ratio(128, 4, 4) == pytest.approx(512 / 146, rel=1e-12)
    assert compression_ratio(128, 4, 4) == pytest.approx(3.507, abs=1e-3)
    assert compression_ratio(128, 3, 2) == pytest.approx(512 / 98, rel=1e-12)
    assert compression_ratio(128, 3, 2) == pytest.approx(5.224, abs=1e-3)
    assert compression_ratio(128, 3, 2, key_mode="prod") == pytest.approx(512 / 100, rel=1e-12)


@pytest.mark.parametrize(
    ("d", "key_bits", "value_bits", "key_mode", "group_size"),
    [
        (128, 4, 4, "mse", 32),
        (128, 3, 2, "mse", 32),
        (128, 3, 2, "prod", 32),
        (128, 4, 8, "prod", 32),
        (64, 1, 3, "mse", 32),
        (256, 2, 4, "prod", 64),
        (96, 3, 3, "mse", 32),
        (128, 2, 4, "mse", 128),
    ],
)
def test_compression_ratio_equals_real_container_bytes(
    d: int, key_bits: int, value_bits: int, key_mode: str, group_size: int
) -> None:
    n = 37
    gen = torch.Generator().manual_seed(d + key_bits)
    k = torch.randn(n, d, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    v = torch.randn(n, d, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    kq = TurboQuantMSE(d, key_bits) if key_mode == "mse" else TurboQuantProd(d, key_bits)
    kc, vc = kq.compress(k), ValueQuantizer(value_bits, group_size).compress(v)
    bf16_bytes = k.numel() * k.element_size() + v.numel() * v.element_size()
    assert bf16_bytes == 2 * 2 * d * n
    expected = bf16_bytes / (kc.nbytes() + vc.nbytes())
    got = compression_ratio(d, key_bits, value_bits, key_mode=key_mode, group_size=group_size)
    assert got == pytest.approx(expected, rel=1e-12)


def strictly_decreasing(xs: list[float]) -> bool:
    return all(xs[i] > xs[i + 1] for i in range(len(xs) - 1))


def test_compression_ratio_monotone_in_bits() -> None:
    for vb in (2, 3, 4, 8):
        by_key = [compression_ratio(128, kb, vb) for kb in (1, 2, 3, 4)]
        assert strictly_decreasing(by_key)
        by_key = [compression_ratio(128, kb, vb, key_mode="prod") for kb in (2, 3, 4)]
        assert strictly_decreasing(by_key)
    for kb in (1, 2, 3, 4):
        by_value = [compression_ratio(128, kb, vb) for vb in (2, 3, 4, 8)]
        assert strictly_decreasing(by_value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key_bits": 5, "value_bits": 4}, r"\(1, 2, 3, 4\)"),
        ({"key_bits": 1, "value_bits": 4, "key_mode": "prod"}, r"\(2, 3, 4\)"),
        ({"key_bits": 4, "value_bits": 1}, r"\(2, 3, 4, 8\)"),
        ({"key_bits": 4, "value_bits": 4, "group_size": 48}, "must divide"),
        ({"key_bits": 4, "value_bits": 4, "key_mode": "qjl"}, "'mse' or 'prod'"),
    ],
)
def test_compression_ratio_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compression_ratio(128, **kwargs)


# ---------------------------------------------------------------------------------------------
# Bad inputs


def key_quantizer(kind: str, d: int = 128, device: str | None = None):
    return TurboQuantMSE(d, 3, device) if kind == "mse" else TurboQuantProd(d, 3, device)


@pytest.mark.parametrize("shape", [(4, 127), (4, 1), (128, 4), (4, 256)])
@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_wrong_last_dim_raises(kind: str, shape: tuple[int, int]) -> None:
    """(4, 1) would broadcast against a [128, 128] rotation; it must be refused, not broadcast."""
    with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
        key_quantizer(kind).compress(torch.randn(shape))


def test_wrong_query_dim_raises() -> None:
    tq = TurboQuantProd(128, 3)
    c = tq.compress(torch.randn(5, 128))
    for shape in [(2, 64), (2, 1)]:
        with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
            tq.inner_product_score(torch.randn(shape), c)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float64])
@pytest.mark.parametrize("kind", ["mse", "prod", "value"])
def test_unsupported_dtypes_raise(kind: str, dtype: torch.dtype) -> None:
    quant = ValueQuantizer(4) if kind == "value" else key_quantizer(kind)
    x = torch.ones(3, 128, dtype=dtype)
    with pytest.raises(ValueError, match=r"torch\.float32, torch\.float16, torch\.bfloat16"):
        quant.compress(x)


@pytest.mark.parametrize("kind", ["mse", "prod", "value"])
def test_non_tensor_and_scalar_inputs_raise(kind: str) -> None:
    quant = ValueQuantizer(4) if kind == "value" else key_quantizer(kind)
    with pytest.raises(ValueError, match="torch.Tensor"):
        quant.compress([[0.0] * 128])
    with pytest.raises(ValueError, match=r"\[\.\.\., d\]"):
        quant.compress(torch.tensor(1.0))


@pytest.mark.parametrize("kind", ["mse", "prod"])
def test_device_mismatch_raises(kind: str) -> None:
    on_meta = key_quantizer(kind, device="meta")
    with pytest.raises(ValueError, match="built for meta"):
        on_meta.compress(torch.randn(3, 128))
    with pytest.raises(ValueError, match="built for cpu"):
        key_quantizer(kind).compress(torch.randn(3, 128, device="meta"))


def test_query_device_mismatch_raises() -> None:
    tq = TurboQuantProd(128, 3)
    c = tq.compress(torch.randn(5, 128))
    with pytest.raises(ValueError, match="built for cpu"):
        tq.inner_product_score(torch.randn(2, 128, device="meta"), c)


def test_wrong_container_type_raises_mse_and_value() -> None:
    x = torch.randn(4, 128)
    mse, prod, val = TurboQuantMSE(128, 3), TurboQuantProd(128, 3), ValueQuantizer(3)
    with pytest.raises(ValueError, match="MSECompressed"):
        mse.decompress(prod.compress(x))
    with pytest.raises(ValueError, match="MSECompressed"):
        mse.decompress(val.compress(x))
    with pytest.raises(ValueError, match="bits and group_size"):
        val.decompress(mse.compress(x))
    with pytest.raises(ValueError, match="bits and group_size"):
        ValueQuantizer(3, 64).decompress(val.compress(x))


def test_wrong_container_type_raises_prod_decompress() -> None:
    """TurboQuantProd must reject a non-ProdCompressed container with a ValueError like the others."""
    x = torch.randn(4, 128)
    prod = TurboQuantProd(128, 3)
    with pytest.raises(ValueError, match="ProdCompressed"):
        prod.decompress(TurboQuantMSE(128, 2).compress(x))


def test_wrong_container_type_raises_prod_score() -> None:
    x = torch.randn(4, 128)
    prod = TurboQuantProd(128, 3)
    with pytest.raises(ValueError, match="ProdCompressed"):
        prod.inner_product_score(x, TurboQuantMSE(128, 2).compress(x))


def test_mismatched_container_parameters_raise() -> None:
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match="bits=3"):
        TurboQuantMSE(128, 4).decompress(TurboQuantMSE(128, 3).compress(x))
    with pytest.raises(ValueError, match="head_dim=64"):
        TurboQuantMSE(128, 3).decompress(TurboQuantMSE(64, 3).compress(torch.randn(4, 64)))
    with pytest.raises(ValueError):
        TurboQuantProd(128, 3).decompress(TurboQuantProd(128, 4).compress(x))
    assert isinstance(TurboQuantProd(128, 3).compress(x), ProdCompressed)
    assert isinstance(TurboQuantMSE(128, 3).compress(x), MSECompressed)
    assert isinstance(ValueQuantizer(3).compress(x), ValueCompressed)


@pytest.mark.parametrize("bits", [0, 5, 8])
def test_mse_bad_bits_raise(bits: int) -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4\)"):
        TurboQuantMSE(128, bits)


def test_bad_rotation_raises() -> None:
    with pytest.raises(ValueError, match="'haar', 'hadamard'"):
        TurboQuantMSE(128, 3, rotation="givens")
    with pytest.raises(ValueError, match="power-of-two"):
        TurboQuantMSE(96, 3, rotation="hadamard")
    with pytest.raises(ValueError, match=">= 16"):
        TurboQuantMSE(8, 3)


def test_fp16_overflow_raises() -> None:
    """Norms and value ranges are stored in fp16; beyond its range the quantizers refuse."""
    big = torch.full((2, 128), 1e4)  # ‖x‖ ≈ 1.1e5 > 65504
    with pytest.raises(ValueError, match="float16 range"):
        TurboQuantMSE(128, 3).compress(big)
    with pytest.raises(ValueError, match="float16 range"):
        ValueQuantizer(4).compress(big * 10)
