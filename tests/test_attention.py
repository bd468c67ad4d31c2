"""Reference attention: the score and dequant paths agree, both equal plain SDPA over the dequantised K/V
with a bottom-right causal mask (fp32 exactly, bf16 within 2x plain bf16 SDPA's error), the quality is the
one the quantizers' distortions predict, and bad inputs raise ValueError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from turboquant.attention import causal_mask, turboquant_attention
from turboquant.quantizers import TurboQuantMSE, TurboQuantProd, ValueQuantizer

FP32_RTOL = 1e-4


def make_qkv(
    b: int, h_q: int, h_kv: int, n_q: int, n_k: int, d: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_q, n_q, d, generator=gen)
    k = torch.randn(b, h_kv, n_k, d, generator=gen)
    v = torch.randn(b, h_kv, n_k, d, generator=gen)
    return q, k, v


def bottom_right_mask(n_q: int, n_k: int) -> torch.Tensor:
    """Independent oracle: query i sits at position n_k − n_q + i and sees the keys j <= that position."""
    return torch.tensor([[j <= n_k - n_q + i for j in range(n_k)] for i in range(n_q)], dtype=torch.bool)


def dequantised(
    k: torch.Tensor, v: torch.Tensor, key_mode: str, key_bits: int, value_bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k̂, v̂ in float32 from the quantizers turboquant_attention builds (default seeds, group 32).

    Compressing ``x.float()`` gives the same codes as compressing ``x`` (quantizers compute in
    float32) and makes ``decompress`` return float32.
    """
    d = k.shape[-1]
    kq = TurboQuantMSE(d, key_bits) if key_mode == "mse" else TurboQuantProd(d, key_bits)
    vq = ValueQuantizer(value_bits)
    return kq.decompress(kq.compress(k.float())), vq.decompress(vq.compress(v.float()))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Plain torch SDPA with K/V heads repeated for GQA and the explicit bottom-right causal mask."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = bottom_right_mask(q.shape[2], k.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# (key_mode, key_bits, value_bits, h_q, h_kv, n_q, n_k, causal, d): every key setting, value width, GQA
# ratio, odd length, causal flag and head dim appears several times; causal cases keep n_q <= n_k
# (queries without a visible key have their own test below).
PATH_CASES = [
    ("mse", 2, 2, 2, 2, 1, 1, True, 64),
    ("mse", 2, 4, 4, 1, 5, 15, True, 128),
    ("mse", 2, 2, 8, 1, 1, 63, False, 64),
    ("mse", 2, 4, 2, 2, 5, 300, False, 128),
    ("mse", 2, 2, 8, 2, 5, 300, True, 64),
    ("mse", 2, 4, 4, 4, 1, 15, False, 64),
    ("mse", 3, 4, 2, 2, 5, 1, False, 64),
    ("mse", 3, 2, 4, 1, 1, 15, True, 64),
    ("mse", 3, 4, 8, 1, 5, 63, True, 128),
    ("mse", 3, 2, 2, 2, 1, 300, True, 128),
    ("mse", 3, 4, 16, 2, 5, 300, False, 64),
    ("mse", 3, 2, 4, 4, 5, 63, False, 128),
    ("mse", 4, 2, 8, 1, 1, 1, False, 128),
    ("mse", 4, 4, 2, 2, 5, 15, True, 64),
    ("mse", 4, 2, 4, 1, 5, 63, False, 64),
    ("mse", 4, 4, 8, 1, 1, 300, True, 64),
    ("mse", 4, 2, 2, 2, 1, 63, True, 128),
    ("mse", 4, 4, 8, 2, 5, 300, True, 128),
    ("prod", 3, 2, 2, 2, 1, 1, False, 128),
    ("prod", 3, 4, 4, 1, 5, 15, False, 64),
    ("prod", 3, 2, 8, 1, 5, 63, True, 64),
    ("prod", 3, 4, 2, 2, 1, 300, False, 128),
    ("prod", 3, 2, 4, 4, 5, 300, True, 128),
    ("prod", 3, 4, 8, 1, 1, 15, True, 128),
    ("prod", 4, 2, 4, 1, 1, 1, True, 64),
    ("prod", 4, 4, 8, 1, 5, 63, False, 128),
    ("prod", 4, 2, 2, 2, 5, 15, True, 128),
    ("prod", 4, 4, 4, 1, 1, 300, True, 64),
    ("prod", 4, 2, 16, 2, 5, 300, False, 64),
    ("prod", 4, 4, 2, 2, 1, 63, False, 64),
    ("mse", 4, 4, 4, 2, 1, 63, True, 80),  # head_dim 80: value groups of 20 by default
]


def case_id(case: tuple) -> str:
    mode, kb, vb, h_q, h_kv, n_q, n_k, causal, d = case
    return f"{mode}{kb}-v{vb}-gqa{h_q // h_kv}-nq{n_q}-nk{n_k}-{'causal' if causal else 'full'}-d{d}"


@pytest.mark.parametrize("case", PATH_CASES, ids=case_id)
def test_score_and_dequant_paths_agree(case: tuple) -> None:
    mode, kb, vb, h_q, h_kv, n_q, n_k, causal, d = case
    q, k, v = make_qkv(3, h_q, h_kv, n_q, n_k, d, seed=PATH_CASES.index(case))
    kwargs = dict(key_bits=kb, value_bits=vb, key_mode=mode, causal=causal)
    score = turboquant_attention(q, k, v, path="score", **kwargs)
    deq = turboquant_attention(q, k, v, path="dequant", **kwargs)
    assert score.shape == deq.shape == q.shape
    assert score.dtype == deq.dtype == torch.float32
    assert bool(torch.isfinite(score).all())
    assert rel_err(score, deq) < FP32_RTOL


@pytest.mark.parametrize("path", ["score", "dequant"])
def test_custom_scale_is_used(path: str) -> None:
    q, k, v = make_qkv(2, 4, 2, 5, 63, 64, seed=7)
    k_hat, v_hat = dequantised(k, v, "mse", 3, 4)
    out = turboquant_attention(q, k, v, key_bits=3, value_bits=4, causal=True, scale=0.37, path=path)
    assert rel_err(out, sdpa(q, k_hat, v_hat, causal=True, scale=0.37)) < FP32_RTOL
    default = turboquant_attention(q, k, v, key_bits=3, value_bits=4, causal=True, path=path)
    assert rel_err(out, default) > 1e-2  # the scale really changed the softmax


@pytest.mark.parametrize("key_mode,key_bits", [("mse", 3), ("prod", 3)])
def test_quantizer_options_are_forwarded(key_mode: str, key_bits: int) -> None:
    """rotation, norm_correction, group_size and the seeds reach the quantizers: both paths equal SDPA
    on k̂, v̂ from quantizers built with the same options, and differ from the default settings."""
    opts = dict(rotation="hadamard", norm_correction=True, seed=7, qjl_seed=8)
    q, k, v = make_qkv(3, 4, 2, 5, 63, 64, seed=9)
    if key_mode == "mse":
        kq = TurboQuantMSE(64, key_bits, None, 7, rotation="hadamard", norm_correction=True)
    else:
        kq = TurboQuantProd(64, key_bits, None, 7, qjl_seed=8, rotation="hadamard", norm_correction=True)
    vq = ValueQuantizer(2, group_size=16)
    ref = sdpa(q, kq.decompress(kq.compress(k)), vq.decompress(vq.compress(v)), causal=True)
    for path in ("score", "dequant"):
        kwargs = dict(key_bits=key_bits, value_bits=2, key_mode=key_mode, causal=True, group_size=16, path=path)
        out = turboquant_attention(q, k, v, **opts, **kwargs)
        assert rel_err(out, ref) < FP32_RTOL
        assert rel_err(turboquant_attention(q, k, v, **kwargs), ref) > 1e-3


def test_causal_mask_is_bottom_right_aligned() -> None:
    for n_q, n_k in [(1, 1), (1, 300), (5, 5), (5, 15), (5, 63), (7, 3)]:
        assert torch.equal(causal_mask(n_q, n_k), bottom_right_mask(n_q, n_k))


# (key_mode, key_bits, value_bits, h_q, h_kv, n_q, n_k, d): decode (n_q = 1) and chunked prefill (n_q = 5).
SDPA_CASES = [
    ("mse", 2, 2, 2, 2, 1, 300, 128),
    ("mse", 3, 4, 8, 2, 1, 63, 64),
    ("mse", 4, 4, 8, 1, 1, 15, 128),
    ("prod", 3, 2, 4, 1, 1, 300, 64),
    ("prod", 4, 4, 2, 2, 1, 1, 64),
    ("mse", 2, 4, 4, 1, 5, 63, 64),
    ("mse", 3, 2, 2, 2, 5, 15, 128),
    ("mse", 4, 4, 16, 2, 5, 300, 128),
    ("prod", 3, 4, 8, 1, 5, 300, 128),
    ("prod", 4, 2, 4, 4, 5, 63, 64),
]


def sdpa_case_id(case: tuple) -> str:
    mode, kb, vb, h_q, h_kv, n_q, n_k, d = case
    return f"{mode}{kb}-v{vb}-gqa{h_q // h_kv}-nq{n_q}-nk{n_k}-d{d}"


@pytest.mark.parametrize("path", ["score", "dequant"])
@pytest.mark.parametrize("case", SDPA_CASES, ids=sdpa_case_id)
def test_causal_equals_sdpa_on_dequantised_kv(case: tuple, path: str) -> None:
    """fp32: equal to SDPA on k̂, v̂ to 1e-4. bf16 inputs: error against the fp32 result on the same
    k̂, v̂ no worse than twice that of plain bf16 SDPA on k̂, v̂ (flash-attention's criterion)."""
    mode, kb, vb, h_q, h_kv, n_q, n_k, d = case
    q, k, v = make_qkv(2, h_q, h_kv, n_q, n_k, d, seed=100 + SDPA_CASES.index(case))
    kwargs = dict(key_bits=kb, value_bits=vb, key_mode=mode, causal=True, path=path)

    k_hat, v_hat = dequantised(k, v, mode, kb, vb)
    ours = turboquant_attention(q, k, v, **kwargs)
    assert rel_err(ours, sdpa(q, k_hat, v_hat, causal=True)) < FP32_RTOL

    qb, kb16, vb16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    k_hat, v_hat = dequantised(kb16, vb16, mode, kb, vb)  # the codes of the bf16 inputs
    ref = sdpa(qb.float(), k_hat, v_hat, causal=True)
    plain = sdpa(qb, k_hat.bfloat16(), v_hat.bfloat16(), causal=True)
    ours = turboquant_attention(qb, kb16, vb16, **kwargs)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, ref) <= 2 * rel_err(plain, ref) + 1e-6


def test_decode_query_sees_every_key() -> None:
    """With one query the bottom-right mask hides nothing: causal and non-causal agree."""
    q, k, v = make_qkv(2, 8, 2, 1, 63, 64, seed=3)
    causal = turboquant_attention(q, k, v, key_bits=3, causal=True)
    assert torch.equal(causal, turboquant_attention(q, k, v, key_bits=3, causal=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype_follows_q(dtype: torch.dtype) -> None:
    q, k, v = make_qkv(1, 4, 2, 5, 15, 64, seed=11)
    for path in ("score", "dequant"):
        out = turboquant_attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, path=path)
        assert out.dtype == dtype and out.shape == q.shape


def test_causal_queries_without_visible_keys_are_consistent() -> None:
    """N_q > N_k with causal: the first N_q − N_k queries see no key. The two paths must not disagree:
    either both refuse with ValueError, or both give the same finite output (zeros for those queries,
    as torch SDPA and TurboQuantKVCache do)."""
    q, k, v = make_qkv(1, 2, 2, 5, 1, 64, seed=5)
    outs = {}
    for path in ("score", "dequant"):
        try:
            outs[path] = turboquant_attention(q, k, v, causal=True, path=path)
        except ValueError:
            outs[path] = None
    if outs["score"] is None or outs["dequant"] is None:
        assert outs["score"] is None and outs["dequant"] is None, "only one path refuses"
        return
    assert bool(torch.isfinite(outs["score"]).all()), "score path returns NaN for queries that see no key"
    assert rel_err(outs["score"], outs["dequant"]) < FP32_RTOL


def exact_cosine(kb: int, vb: int) -> float:
    """Cosine similarity of turboquant_attention to exact fp32 attention on isotropic Gaussian data."""
    q, k, v = make_qkv(1, 4, 4, 16, 1024, 128, seed=2024)
    exact = F.scaled_dot_product_attention(q, k, v)
    out = turboquant_attention(q, k, v, key_bits=kb, value_bits=vb)
    return F.cosine_similarity(out.flatten(), exact.flatten(), dim=0).item()


def test_quality_on_isotropic_gaussian() -> None:
    """4-bit MSE keys + 4-bit values at d=128, N_k=1024, non-causal.

    Expected level: an isotropic query with ‖q‖² ≈ d turns the relative key error (D_k = 0.0093 at
    b=4, REFERENCE §1) into logit noise of variance ≈ D_k, which perturbs the softmax-weighted mean of
    the values by a relative error ≈ √D_k; the 4-bit group-32 values add D_v ≈ (E[range of 32
    normals] ≈ 4.0σ / 15)² / 12 ≈ 0.006. So 1 − cos ≈ (D_k + D_v) / 2 ≈ 0.0077, i.e. cos ≈ 0.992
    (0.991–0.993 over 12 seeds with these shapes, 0.992 here). Bound: cos >= 0.99. Fewer bits must be worse.
    """
    cos4 = exact_cosine(4, 4)
    cos3 = exact_cosine(3, 3)
    cos2 = exact_cosine(2, 2)
    assert cos4 >= 0.99
    assert cos2 < cos3 < cos4
    assert cos2 < 0.95  # 2 bits are clearly lossy (≈ 0.88 expected), not merely a hair below 4 bits


def _bad_inputs() -> list[tuple[str, object, str]]:
    q, k, v = make_qkv(1, 4, 2, 3, 15, 64, seed=0)
    return [
        ("q-3d", lambda: turboquant_attention(q[0], k, v), "4-D"),
        ("k-3d", lambda: turboquant_attention(q, k[0], v), "4-D"),
        ("kv-shape", lambda: turboquant_attention(q, k, v[:, :, :7]), "same shape"),
        ("gqa", lambda: turboquant_attention(q[:, :3], k, v), "multiple"),
        ("head-dim", lambda: turboquant_attention(q[..., :32], k, v), "head_dim"),
        ("batch", lambda: turboquant_attention(torch.cat((q, q)), k, v), "batch"),
        ("int-q", lambda: turboquant_attention(q.to(torch.int32), k, v), "dtype"),
        ("int-k", lambda: turboquant_attention(q, k.to(torch.int64), v.to(torch.int64)), "dtype"),
        ("key-mode", lambda: turboquant_attention(q, k, v, key_mode="qjl"), "key_mode"),
        ("key-bits", lambda: turboquant_attention(q, k, v, key_bits=5), "bits"),
        ("prod-bits", lambda: turboquant_attention(q, k, v, key_mode="prod", key_bits=1), "bits"),
        ("value-bits", lambda: turboquant_attention(q, k, v, value_bits=1), "bits"),
        ("path", lambda: turboquant_attention(q, k, v, path="fused"), "path"),
    ]


@pytest.mark.parametrize("name,call,match", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise(name: str, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
