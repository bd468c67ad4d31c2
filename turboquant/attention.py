"""Reference attention over TurboQuant-compressed keys and values (pure PyTorch).

Shapes: q ``[B, H_q, N_q, D]``, k and v ``[B, H_kv, N_k, D]`` with H_q a multiple of H_kv (GQA/MQA).
Causal masking aligns the queries with the LAST N_q key positions (query i sits at position
N_k - N_q + i), which is what decode (N_q = 1) and chunked prefill need.

Two paths that must agree:
- ``path="dequant"``: decompress K and V, then torch's scaled_dot_product_attention;
- ``path="score"``: the kernels' algorithm. Rotate the query once (⟨q, Πᵀŷ⟩ = ⟨Πq, ŷ⟩), score
  ``norm · ⟨Πq, c[idx]⟩ / √d`` (+ the QJL estimator √(π/2)/d · γ · ⟨Sq, signs⟩ for prod keys),
  softmax, weighted sum of dequantised values.
"""

from __future__ import annotations

import math

import torch

from .quantizers import (
    FLOAT_DTYPES,
    MSECompressed,
    ProdCompressed,
    TurboQuantMSE,
    TurboQuantProd,
    ValueQuantizer,
    default_group_size,
)
from .rotation import DEFAULT_QJL_SEED, DEFAULT_ROTATION_SEED

__all__ = [
    "KEY_MODES",
    "causal_mask",
    "check_attention_inputs",
    "chunk_attention",
    "merge_attention",
    "softmax_block",
    "turboquant_attention",
]

KEY_MODES = ("mse", "prod")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q [B, H_q, N_q, D], k/v [B, H_kv, N_k, D] are consistent."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, N, D], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must have dtype in {FLOAT_DTYPES}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q is on {q.device} but {name} is on {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def causal_mask(n_q: int, n_k: int, device: torch.device | None = None) -> torch.Tensor:
    """[n_q, n_k] bool, True where query i (at position n_k - n_q + i) may attend key j."""
    i = torch.arange(n_q, device=device).unsqueeze(1)
    j = torch.arange(n_k, device=device).unsqueeze(0)
    return j <= i + (n_k - n_q)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps.

    out_*: [..., D] float32, lse_*: [...] float32 (-inf where a set is empty for that query).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * w_a + out_b * w_b, lse


def softmax_block(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ v and logsumexp(scores): scores [..., M, n], v [..., n, D] -> ([..., M, D], [..., M]).

    Rows that see no key (all -inf) give a zero output and lse = -inf, so merge_attention ignores them.
    """
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.exp(scores - safe.unsqueeze(-1)) @ v, lse


_QUERY_BLOCK = 512  # query rows per block in chunk_attention with its log-sum-exp


def chunk_mask(
    b: int, n_q: int, n_k: int, valid: torch.Tensor | None, sliding_window: int | None, device
) -> torch.Tensor:
    """[B, 1, N_q, N_k] bool: query i sits at key position N_k - N_q + i (bottom-right), sees keys at or
    before it, inside the sliding window (key > query - W), and not padding (valid [B, N_k]); a query
    row that would see nothing (a pad) sees itself, so its output stays finite."""
    q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    mask = mask[None, None].expand(b, 1, n_q, n_k)
    if valid is not None:
        mask = mask & valid[:, None, None, :]
        mask = mask | ((k_pos == q_pos) & ~mask.any(dim=-1, keepdim=True))
    return mask


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None, *,
    scale: float, sliding_window: int | None = None, with_lse: bool = False,
):  # fmt: skip
    """Exact attention of q [B, H_q, N_q, D] over k, v [B, H_kv, N_k, D] (bottom-right causal, sliding window,
    key padding valid [B, N_k]).

    Returns out [B, H_q, N_q, D] in q's dtype (torch SDPA), or with ``with_lse`` (out float32, lse
    [B, H_q, N_q] float32) computed in blocks of query rows, for merging with merge_attention.
    """
    b, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    if not with_lse:
        plain = valid is None and sliding_window is None and n_q == n_k
        mask = None if plain else chunk_mask(b, n_q, n_k, valid, sliding_window, q.device)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=plain, scale=scale, enable_gqa=h_q != h_kv
        )
    group = h_q // h_kv
    kf, vf = k.float(), v.float()
    mask = chunk_mask(b, n_q, n_k, valid, sliding_window, q.device)
    outs, lses = [], []
    for i0 in range(0, n_q, _QUERY_BLOCK):
        i1 = min(i0 + _QUERY_BLOCK, n_q)
        qg = q[:, :, i0:i1].float().reshape(b, h_kv, group * (i1 - i0), d)
        scores = (qg @ kf.transpose(-1, -2)) * scale  # [B, H_kv, G·n, N_k]
        scores = scores.masked_fill(~mask[:, :, i0:i1].repeat(1, 1, group, 1), float("-inf"))
        out, lse = softmax_block(scores, vf)
        outs.append(out.reshape(b, h_q, i1 - i0, d))
        lses.append(lse.reshape(b, h_q, i1 - i0))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _key_quantizer(head_dim, key_bits, key_mode, device, rotation, norm_correction, seed, qjl_seed):
    if key_mode == "mse":
        return TurboQuantMSE(head_dim, key_bits, device, seed, rotation=rotation, norm_correction=norm_correction)
    if key_mode == "prod":
        return TurboQuantProd(
            head_dim, key_bits, device, seed, qjl_seed=qjl_seed, rotation=rotation, norm_correction=norm_correction
        )
    raise ValueError(f"key_mode must be one of {KEY_MODES}, got {key_mode!r}")


def compressed_key_scores(
    q: torch.Tensor, keys: MSECompressed | ProdCompressed, quantizer: TurboQuantMSE | TurboQuantProd
) -> torch.Tensor:
    """⟨q, k̂⟩ in the score domain, never de-rotating a key.

    q: [B, H_kv, M, D] (the query heads of one KV head stacked in M); keys with leading shape
    [B, H_kv, N] -> [B, H_kv, M, N] float32.
    """
    if isinstance(quantizer, TurboQuantProd):
        return quantizer.inner_product_score(q, keys)
    q_rot = quantizer.rotate(q)  # Π q once per query
    return q_rot @ quantizer.dequantize_rotated(keys).transpose(-1, -2)


def turboquant_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_bits: int = 4,
    value_bits: int = 4,
    key_mode: str = "mse",
    causal: bool = False,
    scale: float | None = None,
    group_size: int | None = None,
    rotation: str = "haar",
    norm_correction: bool = False,
    seed: int = DEFAULT_ROTATION_SEED,
    qjl_seed: int = DEFAULT_QJL_SEED,
    path: str = "score",
) -> torch.Tensor:
    """Attention of q over TurboQuant-compressed k and v.

    Args:
        q: [B, H_q, N_q, D]; k, v: [B, H_kv, N_k, D]; fp32/fp16/bf16, H_q % H_kv == 0.
        key_bits, key_mode: keys by TurboQuantMSE ("mse", bits 1-4) or TurboQuantProd ("prod", 2-4).
        value_bits, group_size: values by ValueQuantizer (bits 2/3/4/8; group_size dividing D, default
            quantizers.default_group_size(D): 32 where it divides D).
        causal: mask key j for query i unless j <= N_k - N_q + i.
        scale: softmax scale, default 1/√D.
        path: "score" (rotated-query scores, as the kernels do) or "dequant" (decompress + SDPA).

    Returns:
        out: [B, H_q, N_q, D] in q's dtype.
    """
    check_attention_inputs(q, k, v)
    if path not in ("score", "dequant"):
        raise ValueError(f"path must be 'score' or 'dequant', got {path!r}")
    b, h_q, n_q, d = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kq = _key_quantizer(d, key_bits, key_mode, q.device, rotation, norm_correction, seed, qjl_seed)
    vq = ValueQuantizer(value_bits, default_group_size(d) if group_size is None else group_size)
    keys, values = kq.compress(k), vq.compress(v)
    mask = causal_mask(n_q, n_k, q.device) if causal else None

    if path == "dequant":
        k_hat = kq.decompress_float(keys).repeat_interleave(h_q // h_kv, dim=1)
        v_hat = vq.decompress_float(values).repeat_interleave(h_q // h_kv, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k_hat, v_hat, attn_mask=mask, scale=scale)
        return out.to(q.dtype)

    group = h_q // h_kv
    q_grouped = q.reshape(b, h_kv, group * n_q, d)  # query heads of one KV head share its keys
    scores = compressed_key_scores(q_grouped, keys, kq).reshape(b, h_kv, group, n_q, n_k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out, _ = softmax_block(scores.reshape(b, h_kv, group * n_q, n_k), vq.decompress_float(values))
    return out.reshape(b, h_q, n_q, d).to(q.dtype)
