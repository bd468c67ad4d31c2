"""TurboQuantKVCache with left padding (append(valid=...), kv_start), queries after the cache (after=True),
sliding windows, exact sink tokens, centred keys, batch selection and cropping, and the fused decode kernel
with a per-sequence first slot. Every check compares against an oracle computed here with plain PyTorch
(float64 softmax over explicitly masked keys) or against a cache built from the selected tokens alone."""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import COMPRESSED, randn, rel_err

import turboquant.cache as cache_module
from turboquant.attention import merge_attention
from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.quantizers import TurboQuantMSE, TurboQuantProd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_RTOL = 1e-5  # float32 cache arithmetic against a float64 oracle on the same stored values
KERNEL_TOL = 2e-3  # the fused kernel's fp16 tiles

needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)


# ------------------------------------------------------------------------------------ helpers


def left_pad_mask(pads: tuple[int, ...], n: int) -> torch.Tensor:
    """[B, n] bool, False at the first pads[b] positions of sequence b."""
    return torch.tensor([[t >= p for t in range(n)] for p in pads], dtype=torch.bool)


def padded_kv(pads: tuple[int, ...], h: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random k, v [B, h, n, D]; pad positions hold large garbage, so attending one shows up as an O(1) error."""
    k, v = randn(len(pads), h, n, d, seed=seed), randn(len(pads), h, n, d, seed=seed + 1)
    garbage = (~left_pad_mask(pads, n))[:, None, :, None]
    return torch.where(garbage, 6.0 * k + 3.0, k), torch.where(garbage, 6.0 * v - 3.0, v)


def bounds(chunks: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, stop) of each chunk."""
    out, start = [], 0
    for n in chunks:
        out.append((start, start + n))
        start += n
    return out


def build(
    config: KVCacheConfig,
    k: torch.Tensor,
    v: torch.Tensor,
    chunks: tuple[int, ...],
    valid: torch.Tensor | None = None,
    device: str = "cpu",
    queries: torch.Tensor | None = None,
) -> TurboQuantKVCache:
    """A float32 cache holding k, v [B, H, N, D] appended in ``chunks`` (with the matching slices of ``valid`` and
    of the chunks' ``queries`` [B, H_q, N, D])."""
    cache = TurboQuantKVCache(config, k.shape[0], k.shape[1], dtype=torch.float32, device=device)
    for start, stop in bounds(chunks):
        mask = None if valid is None else valid[:, start:stop].to(device)
        q = None if queries is None else queries[:, :, start:stop].to(device)
        cache.append(k[:, :, start:stop].to(device), v[:, :, start:stop].to(device), valid=mask, queries=q)
    assert cache.get_seq_length() == sum(chunks)
    return cache


def visibility(
    key_pos: list[int], q_pos: list[int], starts: list[int], causal: bool = True, window: int | None = None
) -> torch.Tensor:
    """[B, N_q, N_k] bool written out element by element: the key at p is visible to the query at t iff
    p >= the sequence's first real position, p <= t (causal) and p > t − window (sliding window)."""
    return torch.tensor(
        [
            [[p >= s and (not causal or p <= t) and (window is None or p > t - window) for p in key_pos] for t in q_pos]
            for s in starts
        ],
        dtype=torch.bool,
    )


def attention_oracle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 softmax attention with an explicit mask: q [B, H_q, N_q, D], k/v [B, H_kv, N_k, D] (GQA by
    repeating K/V heads), visible [B, N_q, N_k] -> (out [B, H_q, N_q, D], lse [B, H_q, N_q]).
    Rows that see no key give out = 0 and lse = -inf."""
    group = q.shape[1] // k.shape[1]
    k = k.double().cpu().repeat_interleave(group, dim=1)
    v = v.double().cpu().repeat_interleave(group, dim=1)
    scores = (q.double().cpu() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v, lse


def assert_attention(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor,
                     tol: float = FP32_RTOL) -> None:  # fmt: skip
    """out within ``tol`` of the oracle; lse equal where finite, -inf exactly where the oracle's is."""
    out, lse = out.cpu(), lse.cpu()
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    if ref_out.norm() > 0:
        assert rel_err(out, ref_out) < tol
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty)
    assert torch.all(out[empty] == 0)  # also covers an oracle with no visible key at all
    assert torch.allclose(lse[~empty].double(), ref_lse[~empty], rtol=0, atol=1e-4)


def compressed_rows(cache: TurboQuantKVCache) -> dict[str, torch.Tensor]:
    return {name: t for name, t in cache.buffers().items() if name in COMPRESSED}


def key_quantizer(config: KVCacheConfig) -> TurboQuantMSE | TurboQuantProd:
    """The key quantizer a config describes, built independently of the cache's shared instances."""
    kw = dict(rotation=config.rotation, norm_correction=config.norm_correction)
    if config.key_mode == "mse":
        return TurboQuantMSE(config.head_dim, config.key_bits, None, config.seed, **kw)
    return TurboQuantProd(config.head_dim, config.key_bits, None, config.seed, qjl_seed=config.qjl_seed, **kw)


MSE3 = dict(head_dim=64, key_bits=3, value_bits=4)
PROD3 = dict(head_dim=64, key_bits=3, value_bits=2, key_mode="prod")


# ------------------------------------------------------------------------------- left padding

PAD_PADS = (0, 3, 13, 20)  # sequence 3: its pads cover the whole first chunk
PAD_CHUNKS = (16, 9, 1, 30)


@pytest.mark.parametrize("settings", [MSE3, PROD3], ids=["mse3", "prod3"])
def test_left_padding_equals_single_sequence_caches(settings: dict) -> None:
    """Per sequence, the padded batch attends and stores exactly what a cache of that sequence alone does."""
    config = KVCacheConfig(**settings)
    h_kv, h_q, d, n = 2, 4, 64, sum(PAD_CHUNKS)
    k, v = padded_kv(PAD_PADS, h_kv, n, d, seed=1)
    valid = left_pad_mask(PAD_PADS, n)
    batch = TurboQuantKVCache(config, len(PAD_PADS), h_kv, dtype=torch.float32)
    singles = [TurboQuantKVCache(config, 1, h_kv, dtype=torch.float32) for _ in PAD_PADS]
    for step, (start, stop) in enumerate(bounds(PAD_CHUNKS)):
        batch.append(k[:, :, start:stop], v[:, :, start:stop], valid=valid[:, start:stop])
        for b, pad in enumerate(PAD_PADS):
            lo = max(start, pad)
            if lo < stop:  # the real tokens of this chunk only
                singles[b].append(k[b : b + 1, :, lo:stop], v[b : b + 1, :, lo:stop])
        assert batch.kv_start.tolist() == [min(p, stop) for p in PAD_PADS]
        assert batch.get_seq_length() == stop
        for n_q in (1, 5) if step == len(PAD_CHUNKS) - 1 else (1,):
            q = randn(len(PAD_PADS), h_q, n_q, d, seed=10 * step + n_q)
            out, lse = batch.attend_with_lse(q)
            assert out.shape == q.shape and lse.shape == q.shape[:3]
            for b, pad in enumerate(PAD_PADS):
                if pad >= stop:  # nothing real yet: the row sees no key
                    assert torch.all(out[b] == 0) and torch.all(lse[b] == float("-inf"))
                    continue
                ref_out, ref_lse = singles[b].attend_with_lse(q[b : b + 1])
                assert rel_err(out[b : b + 1], ref_out) < FP32_RTOL
                assert torch.allclose(lse[b : b + 1], ref_lse, rtol=0, atol=1e-5)
            assert rel_err(batch.attend(q), out) == 0.0

    rows = compressed_rows(batch)
    for b, pad in enumerate(PAD_PADS):
        assert singles[b].get_seq_length() == n - pad
        for name, t in compressed_rows(singles[b]).items():
            assert torch.equal(rows[name][b, :, pad:n], t[0, :, : n - pad]), (b, name)
    assert set(rows) == set(compressed_rows(singles[0]))


def test_left_padding_in_single_token_appends() -> None:
    """A sequence may stay all-pad across decode-sized appends and start later; pads are never attended."""
    config = KVCacheConfig(**MSE3)
    pads, n = (0, 5), 9
    k, v = padded_kv(pads, 1, n, 64, seed=3)
    valid = left_pad_mask(pads, n)
    cache = build(config, k, v, (1,) * n, valid)
    assert cache.kv_start.tolist() == list(pads)
    q = randn(2, 2, 1, 64, seed=4)
    k_hat, v_hat = cache.dequantize()
    ref = attention_oracle(q, k_hat, v_hat, visibility(list(range(n)), [n - 1], list(pads)))
    assert_attention(*cache.attend_with_lse(q), *ref)


def _valid_cases() -> list[tuple[str, list[torch.Tensor]]]:
    t, f = True, False
    return [
        ("pad-after-real", [torch.tensor([[t, t, t], [f, t, f]])]),
        ("pad-between-real", [torch.tensor([[t, f, t], [t, t, t]])]),
        ("pad-after-start-later-call", [torch.tensor([[t, t, t], [f, t, t]]), torch.tensor([[t, t, t], [f, t, t]])]),
        ("all-pad-after-start", [torch.tensor([[t, t, t], [t, t, t]]), torch.tensor([[t, t, t], [f, f, f]])]),
        ("shape-long", [torch.ones(2, 4, dtype=torch.bool)]),
        ("shape-1d", [torch.ones(2, dtype=torch.bool)]),
        ("shape-transposed", [torch.ones(3, 2, dtype=torch.bool)]),
        ("dtype-uint8", [torch.ones(2, 3, dtype=torch.uint8)]),
        ("dtype-int64", [torch.ones(2, 3, dtype=torch.int64)]),
        ("dtype-float", [torch.ones(2, 3)]),
    ]


@pytest.mark.parametrize("name,masks", _valid_cases(), ids=[c[0] for c in _valid_cases()])
def test_valid_rejects_anything_but_left_padding(name: str, masks: list[torch.Tensor]) -> None:
    """The last mask is refused with ValueError and leaves the cache as it was."""
    cache = TurboQuantKVCache(KVCacheConfig(**MSE3), 2, 1, dtype=torch.float32)
    k, v = padded_kv((0, 0), 1, 3 * len(masks), 64, seed=5)
    for i, mask in enumerate(masks[:-1]):
        cache.append(k[:, :, 3 * i : 3 * i + 3], v[:, :, 3 * i : 3 * i + 3], valid=mask)
    before = (cache.get_seq_length(), cache.kv_start.clone(), cache.seq_lens.clone())
    with pytest.raises(ValueError, match="valid"):
        cache.append(k[:, :, -3:], v[:, :, -3:], valid=masks[-1])
    assert cache.get_seq_length() == before[0]
    assert torch.equal(cache.kv_start, before[1]) and torch.equal(cache.seq_lens, before[2])


# -------------------------------------------------------------------------- queries after the cache

AFTER_PADS = (0, 5, 30)  # sequence 2 starts in the second append
AFTER_CHUNKS = (25, 15)


@pytest.mark.parametrize("n_c", [1, 4])
@pytest.mark.parametrize(
    "settings",
    [dict(MSE3, residual_window=8, flush_block=4), PROD3],
    ids=["mse3-window", "prod3"],
)
def test_after_merged_with_exact_chunk(settings: dict, n_c: int) -> None:
    """Cache part (after=True) merged with the caller's exact causal chunk = attention over both at once."""
    config = KVCacheConfig(**settings)
    h_kv, h_q, d, n = 2, 8, 64, sum(AFTER_CHUNKS)
    k, v = padded_kv(AFTER_PADS, h_kv, n, d, seed=20)
    cache = build(config, k, v, AFTER_CHUNKS, left_pad_mask(AFTER_PADS, n))
    k_new, v_new = randn(3, h_kv, n_c, d, seed=21), randn(3, h_kv, n_c, d, seed=22)
    q = randn(3, h_q, n_c, d, seed=23)
    q_pos = list(range(n, n + n_c))

    out_c, lse_c = cache.attend_with_lse(q, after=True)
    exact = attention_oracle(q, k_new, v_new, visibility(q_pos, q_pos, [n] * 3))  # the caller's chunk
    out, lse = merge_attention(out_c.double(), lse_c.double(), *exact)

    k_hat, v_hat = cache.dequantize()
    visible = visibility(list(range(n + n_c)), q_pos, list(AFTER_PADS))
    ref = attention_oracle(q, torch.cat((k_hat, k_new), dim=2), torch.cat((v_hat, v_new), dim=2), visible)
    assert_attention(out, lse, *ref)
    # the cache part alone: every real cached key, none of the chunk
    assert_attention(out_c, lse_c, *attention_oracle(q, k_hat, v_hat, visible[:, :, :n]))


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("window", [1, 7, 25, 50])
@pytest.mark.parametrize(
    "settings,pads,chunks",
    [
        (dict(MSE3, residual_window=8, flush_block=4), (0, 9), (30, 29, 1)),
        (dict(MSE3, ring_window=32), (0, 45), (20, 10, 39, 1)),  # wraps; stored slots of sequence 1 hold pads
        (dict(PROD3, ring_window=32), (0, 3), (20, 10, 39, 1)),
    ],
    ids=["window", "ring-pads", "ring-prod"],
)
def test_sliding_window(settings: dict, pads: tuple[int, ...], chunks: tuple[int, ...], window: int) -> None:
    """A query at t sees the keys at p > t − W (and p <= t when causal), against an explicit mask on dequantize()."""
    config = KVCacheConfig(**settings)
    h_kv, h_q, d, n = 2, 4, 64, sum(chunks)
    k, v = padded_kv(pads, h_kv, n, d, seed=30 + window)
    valid = left_pad_mask(pads, n)
    cache = TurboQuantKVCache(config, 2, h_kv, dtype=torch.float32)
    ring = config.ring_window
    for step, (start, stop) in enumerate(bounds(chunks)):
        cache.append(k[:, :, start:stop], v[:, :, start:stop], valid=valid[:, start:stop])
        k_hat, v_hat = cache.dequantize()
        first = stop - k_hat.shape[2]  # ring: only the last ring_window positions are held
        assert first == (max(0, stop - ring) if ring else 0)
        key_pos = list(range(first, stop))
        cases = [(1, False), (4, True)]
        if ring is None or stop <= ring:  # several newest queries (refused once the ring wrapped)
            cases.append((3, False))
        for n_q, after in cases:
            q = randn(2, h_q, n_q, d, seed=100 * step + 10 * n_q + after)
            q_pos = list(range(stop, stop + n_q)) if after else list(range(stop - n_q, stop))
            ref = attention_oracle(q, k_hat, v_hat, visibility(key_pos, q_pos, list(pads), not after, window))
            assert_attention(*cache.attend_with_lse(q, after=after, sliding_window=window), *ref)
        if ring is not None and stop > ring:
            with pytest.raises(ValueError, match="ring"):
                cache.attend(randn(2, h_q, 3, d, seed=7), sliding_window=window)


# ------------------------------------------------------------------------------------- sinks

SINK_PADS = (0, 14, 20)  # sequence 1: two real tokens after the first chunk; sequence 2 starts in the third
SINK_CHUNKS = (16, 1, 20, 3)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("settings", [MSE3, PROD3], ids=["mse3", "prod3"])
def test_sink_tokens_with_padding_and_window(settings: dict, sinks: int) -> None:
    """The first S real tokens of each sequence are attended exact; every other position as stored."""
    config = KVCacheConfig(**settings, sink_tokens=sinks, residual_window=8, flush_block=4)
    h_kv, h_q, d, n = 2, 4, 64, sum(SINK_CHUNKS)
    k, v = padded_kv(SINK_PADS, h_kv, n, d, seed=40)
    valid = left_pad_mask(SINK_PADS, n)
    cache = TurboQuantKVCache(config, 3, h_kv, dtype=torch.float32)
    for step, (start, stop) in enumerate(bounds(SINK_CHUNKS)):
        cache.append(k[:, :, start:stop], v[:, :, start:stop], valid=valid[:, start:stop])
        starts = [min(p, stop) for p in SINK_PADS]
        assert cache.kv_start.tolist() == starts
        k_ref, v_ref = (t.clone() for t in cache.dequantize())
        assert k_ref.shape[2] == stop
        for b, s in enumerate(starts):
            held = min(s + sinks, stop) - s  # sink slots filled so far
            assert torch.equal(cache.sink_k[b, :, :held], k[b, :, s : s + held])
            assert torch.equal(cache.sink_v[b, :, :held], v[b, :, s : s + held])
            k_ref[b, :, s : s + held] = k[b, :, s : s + held]  # the oracle: sinks exact
            v_ref[b, :, s : s + held] = v[b, :, s : s + held]
        for n_q, after in ((1, False), (min(3, stop - start), False), (2, True)):
            q = randn(3, h_q, n_q, d, seed=50 + 10 * step + n_q + after)
            q_pos = list(range(stop, stop + n_q)) if after else list(range(stop - n_q, stop))
            ref = attention_oracle(q, k_ref, v_ref, visibility(list(range(stop)), q_pos, starts, not after))
            assert_attention(*cache.attend_with_lse(q, after=after), *ref)
    if sinks:  # the exact sinks matter: the stored (compressed) version of them gives another answer
        q = randn(3, h_q, 1, d, seed=60)
        k_hat, v_hat = cache.dequantize()
        stored = attention_oracle(q, k_hat, v_hat, visibility(list(range(n)), [n - 1], list(SINK_PADS)))[0]
        assert rel_err(cache.attend(q), stored) > 10 * FP32_RTOL


# ------------------------------------------------------------------------------- centred keys


def assert_merge_with_exact_chunk(cache, q, k_hat, v_hat, pads: tuple[int, ...], seed: int) -> None:
    """The cache attended with after=True, merged by log-sum-exp with 3 exact new tokens (causal among
    themselves), equals the oracle over the dequantized past plus those tokens: q [B, H_q, 3, D]."""
    b, h_kv, n, d = k_hat.shape
    k_new, v_new = randn(b, h_kv, 3, d, seed=seed), randn(b, h_kv, 3, d, seed=seed + 1)
    q_pos = list(range(n, n + 3))
    out_c, lse_c = cache.attend_with_lse(q, after=True)
    out, lse = merge_attention(
        out_c.double(), lse_c.double(), *attention_oracle(q, k_new, v_new, visibility(q_pos, q_pos, [n] * b))
    )
    visible = visibility(list(range(n + 3)), q_pos, list(pads))
    ref = attention_oracle(q, torch.cat((k_hat, k_new), dim=2), torch.cat((v_hat, v_new), dim=2), visible)
    assert_attention(out, lse, *ref)


@pytest.mark.parametrize("window", [0, 8])
@pytest.mark.parametrize("settings", [MSE3, PROD3], ids=["mse3", "prod3"])
def test_center_keys(settings: dict, window: int) -> None:
    """Keys are stored minus the mean of the first append's real keys; attention and lse are those of the
    de-centred keys, so merging with an exact chunk stays exact."""
    config = KVCacheConfig(**settings, center_keys=True, residual_window=window, flush_block=4)
    pads, chunks, h_kv, h_q, d = (0, 3), (20, 12, 1), 2, 4, 64
    n = sum(chunks)
    k, v = padded_kv(pads, h_kv, n, d, seed=70)
    k = k + 3.0 * randn(2, h_kv, 1, d, seed=71)  # a large common offset per (sequence, head)
    valid = left_pad_mask(pads, n)
    cache = build(config, k, v, chunks, valid)

    first = chunks[0]
    mean = torch.stack([k[b, :, pads[b] : first].mean(dim=1) for b in range(2)])  # [B, H, D]
    assert cache.key_mean.shape == (2, h_kv, d)
    assert torch.allclose(cache.key_mean, mean, rtol=0, atol=1e-5)

    # stored keys: the quantizer's round trip of the centred keys, de-centred by dequantize()
    k_hat, v_hat = cache.dequantize()
    n_c = cache.num_compressed
    assert n_c > 0
    kq = key_quantizer(config)
    centred = k[:, :, :n_c] - cache.key_mean[:, :, None, :]
    expect = kq.decompress(kq.compress(centred)) + cache.key_mean[:, :, None, :]
    assert rel_err(k_hat[:, :, :n_c], expect) < 1e-6
    assert torch.equal(k_hat[:, :, n_c:], k[:, :, n_c:])

    for n_q in (1, 3):
        q = randn(2, h_q, n_q, d, seed=72 + n_q)
        q_pos = list(range(n - n_q, n))
        ref = attention_oracle(q, k_hat, v_hat, visibility(list(range(n)), q_pos, list(pads)))
        assert_attention(*cache.attend_with_lse(q), *ref)

    # merged with an exact chunk after the cache: needs the lse of the de-centred keys
    q = randn(2, h_q, 3, d, seed=77) + 0.5 * cache.key_mean.repeat_interleave(2, dim=1)[:, :, None, :]
    assert_merge_with_exact_chunk(cache, q, k_hat, v_hat, pads, seed=75)


@pytest.mark.parametrize("settings", [MSE3, PROD3], ids=["mse3", "prod3"])
def test_center_keys_reduce_error_under_a_common_offset(settings: dict) -> None:
    """With a large shared offset, centred storage reconstructs the keys far better than plain storage."""
    pads, n, d = (0, 4), 48, 64
    k, v = padded_kv(pads, 2, n, d, seed=80)
    k = k + 4.0 * randn(2, 2, 1, d, seed=81)
    valid = left_pad_mask(pads, n)
    errors = {}
    for center in (False, True):
        cache = build(KVCacheConfig(**settings, center_keys=center), k, v, (16, n - 16), valid)
        k_hat, _ = cache.dequantize()
        errors[center] = max(rel_err(k_hat[b, :, p:], k[b, :, p:]) for b, p in enumerate(pads))
    assert errors[True] < 0.5 * errors[False]


# ------------------------------------------------------------------------------- scaled keys


@pytest.mark.parametrize("settings", [MSE3, PROD3], ids=["mse3", "prod3"])
def test_scale_keys_is_exact_for_attention(settings: dict) -> None:
    """Keys stored as (k - μ)/s and the store attended with q·s: attention and lse are those of the keys that
    dequantize() returns (de-scaled, de-centred), also merged with an exact chunk; the scales follow the
    formula from the first append's real keys and queries, and select_batch carries them."""
    config = KVCacheConfig(**settings, center_keys=True, scale_keys=True, residual_window=8, flush_block=4)
    pads, chunks, h_kv, h_q, d = (0, 3), (20, 12, 1), 2, 4, 64
    n = sum(chunks)
    k, v = padded_kv(pads, h_kv, n, d, seed=90)
    channel = torch.logspace(-1, 1, d)  # very unequal channels, in keys and (differently) in queries
    k = k * channel
    q_all = randn(2, h_q, n, d, seed=91) * channel.flip(0)
    valid = left_pad_mask(pads, n)
    cache = build(config, k, v, chunks, valid, queries=q_all)

    first = chunks[0]
    kc = [k[b, :, pads[b] : first] - cache.key_mean[b, :, None, :] for b in range(2)]
    qs = [q_all[b, :, pads[b] : first].reshape(h_kv, 2, -1, d) for b in range(2)]
    k2 = torch.stack([x.pow(2).mean(dim=1) for x in kc])  # [B, H, D]
    q2 = torch.stack([x.pow(2).mean(dim=(1, 2)) for x in qs])
    k2, q2 = (x + 1e-6 * x.mean(dim=-1, keepdim=True) for x in (k2, q2))  # the floor against empty channels
    s = (k2 / q2).pow(0.25)
    s = s / s.log().mean(dim=-1, keepdim=True).exp()
    assert torch.allclose(cache.key_scale, s, rtol=1e-4)

    k_hat, v_hat = cache.dequantize()
    n_c = cache.num_compressed
    kq = key_quantizer(config)
    scaled = (k[:, :, :n_c] - cache.key_mean[:, :, None, :]) / cache.key_scale[:, :, None, :]
    expect = kq.decompress(kq.compress(scaled)) * cache.key_scale[:, :, None, :] + cache.key_mean[:, :, None, :]
    assert rel_err(k_hat[:, :, :n_c], expect) < 1e-6
    for n_q in (1, 3):
        q = randn(2, h_q, n_q, d, seed=92 + n_q) * channel.flip(0)
        ref = attention_oracle(q, k_hat, v_hat, visibility(list(range(n)), list(range(n - n_q, n)), list(pads)))
        assert_attention(*cache.attend_with_lse(q), *ref)
    assert_merge_with_exact_chunk(cache, randn(2, h_q, 3, d, seed=97), k_hat, v_hat, pads, seed=95)

    before = cache.key_scale.clone()
    cache.select_batch(torch.tensor([1, 1, 0]))
    assert torch.equal(cache.key_scale, before[[1, 1, 0]])


def test_scale_keys_lowers_the_logit_error_as_predicted() -> None:
    """Keys and queries with unequal channel spectra: the logit error power of the stored keys falls by the
    ratio the derivation predicts, (Σ_c √(E q_c² E k_c²))² / (Σ_c E q_c² · Σ_c E k_c²) (here 0.56), within
    10% (each error power is a mean over 2·2048·8 logits)."""
    d, n, h_kv, h_q = 64, 2048, 2, 8
    k_std, q_std = torch.logspace(-0.5, 0.5, d), torch.logspace(0.5, -0.5, d).roll(16)
    k = randn(1, h_kv, n, d, seed=100) * k_std
    v = randn(1, h_kv, n, d, seed=101)
    q = randn(1, h_q, n, d, seed=102) * q_std
    power = {}
    for scaled in (False, True):
        config = KVCacheConfig(head_dim=d, key_bits=4, value_bits=4, scale_keys=scaled)
        cache = build(config, k, v, (n,), queries=q)
        k_hat, _ = cache.dequantize()
        qg = q.reshape(1, h_kv, h_q // h_kv, n, d)
        power[scaled] = torch.einsum("bhgnd,bhmd->bhgnm", qg[:, :, :, :8], k_hat - k).pow(2).mean().item()
    e_q, e_k = q_std.pow(2), k_std.pow(2)
    predicted = ((e_q * e_k).sqrt().sum() ** 2 / (e_q.sum() * e_k.sum())).item()
    assert abs(power[True] / power[False] / predicted - 1) < 0.1


def test_scale_keys_needs_queries_and_checks_them() -> None:
    config = KVCacheConfig(**MSE3, scale_keys=True)
    k, v = randn(1, 2, 5, 64, seed=110), randn(1, 2, 5, 64, seed=111)
    cache = TurboQuantKVCache(config, 1, 2, dtype=torch.float32)
    cache.append(k, v)  # no queries: keys stored unscaled, and stay so
    assert cache.key_scale is None
    cache.append(k, v, queries=randn(1, 4, 5, 64, seed=112))
    assert cache.key_scale is None
    with pytest.raises(ValueError, match="queries must be"):
        TurboQuantKVCache(config, 1, 2, dtype=torch.float32).append(k, v, queries=randn(1, 3, 5, 64, seed=113))


def test_prompt_statistics_over_a_long_padded_prompt(monkeypatch) -> None:
    """The key mean and key scales of a prompt of many statistics blocks (summed block by block; here blocks of 200
    and 100 tokens, the last one partial) equal the formulas of TurboQuantKVCache._key_scales in float64 over the
    real tokens."""
    monkeypatch.setattr(cache_module, "_STATISTICS_ELEMENTS", 2 * 4 * 64 * 100)
    config = KVCacheConfig(**MSE3, center_keys=True, scale_keys=True)
    n, pads = 1100, (0, 700)
    k = randn(2, 2, n, 64, seed=114) * torch.logspace(-1, 1, 64) + 2.0
    q = randn(2, 4, n, 64, seed=115) * torch.logspace(1, -1, 64)
    valid = left_pad_mask(pads, n)
    cache = TurboQuantKVCache(config, 2, 2, dtype=torch.float32)
    cache.append(k, randn(2, 2, n, 64, seed=116), valid=valid, queries=q)
    w = valid.double()[:, None, :, None]
    count = w.sum(dim=2)
    mean = (k.double() * w).sum(dim=2) / count
    k2 = ((k.double() - mean[:, :, None]) ** 2 * w).sum(dim=2) / count
    q2 = (q.double().reshape(2, 2, 2, n, 64) ** 2 * w[:, :, None]).sum(dim=(2, 3)) / (2 * count)
    k2, q2 = (x + 1e-6 * x.mean(dim=-1, keepdim=True) for x in (k2, q2))  # the regularisation of _key_scales
    log_s = 0.25 * (k2.log() - q2.log())
    scale = (log_s - log_s.mean(dim=-1, keepdim=True)).exp()
    assert torch.allclose(cache.key_mean.double(), mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cache.key_scale.double(), scale, rtol=1e-4)


def test_short_steps_after_every_sequence_started_check_their_mask() -> None:
    """Once every sequence holds a real token, a short step's padding mask can only be all true: one with a pad
    (right padding) or of the wrong shape is refused, and the cache is left as it was."""
    config = KVCacheConfig(**MSE3)
    k, v = padded_kv((0, 3), 2, 8, 64, seed=87)
    cache = build(config, k, v, (8,), left_pad_mask((0, 3), 8))
    q, k_new, v_new = randn(2, 4, 3, 64, seed=88), randn(2, 2, 3, 64, seed=89), randn(2, 2, 3, 64, seed=90)
    right_pad = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match="left padding"):
        cache.attend_and_append(q, k_new, v_new, valid=right_pad)
    with pytest.raises(ValueError, match=r"valid must be a bool tensor \[B=2, N=3\]"):
        cache.attend_and_append(q, k_new, v_new, valid=torch.ones(2, 4, dtype=torch.bool))
    assert cache.get_seq_length() == 8
    out = cache.attend_and_append(q, k_new, v_new, valid=torch.ones(2, 3, dtype=torch.bool))
    assert rel_err(out, build(config, k, v, (8,), left_pad_mask((0, 3), 8)).attend_and_append(q, k_new, v_new)) == 0


def test_center_keys_after_an_empty_first_append() -> None:
    """Appending zero positions changes nothing, also before the first real keys of a centred cache."""
    config = KVCacheConfig(**MSE3, center_keys=True)
    k, v = padded_kv((0, 0), 2, 20, 64, seed=85)
    k = k + 2.0
    direct = build(config, k, v, (20,))
    cache = TurboQuantKVCache(config, 2, 2, dtype=torch.float32)
    cache.append(k[:, :, :0], v[:, :, :0])
    cache.append(k, v)
    q = randn(2, 4, 2, 64, seed=86)
    out = cache.attend(q)
    assert torch.isfinite(out).all()
    assert rel_err(out, direct.attend(q)) < FP32_RTOL
    assert torch.allclose(cache.key_mean, direct.key_mean)


# -------------------------------------------------------------------------- batch select and crop

EDIT_SETTINGS = [
    dict(MSE3),
    dict(PROD3, residual_window=8, flush_block=4, sink_tokens=3, center_keys=True),
]
EDIT_IDS = ["mse3", "prod3-window-sinks-centred"]


def assert_same_cache(a: TurboQuantKVCache, b: TurboQuantKVCache, n_stored: int | None = None) -> None:
    """Same lengths, same stored rows (used slots), same window, sinks, kv_start and key mean."""
    assert a.get_seq_length() == b.get_seq_length() and a.num_compressed == b.num_compressed
    n_stored = a.num_compressed if n_stored is None else n_stored
    ba, bb = a.buffers(), b.buffers()
    assert set(ba) == set(bb)
    for name in ba:
        if name in COMPRESSED:
            assert torch.equal(ba[name][:, :, :n_stored], bb[name][:, :, :n_stored]), name
        elif name in ("sink_k", "sink_v"):  # filled slots only
            for i, s in enumerate(a.kv_start.tolist()):
                held = max(0, min(a.config.sink_tokens, a.get_seq_length() - s))
                assert torch.equal(ba[name][i, :, :held], bb[name][i, :, :held]), name
        else:
            assert torch.equal(ba[name], bb[name]), name


@pytest.mark.parametrize("indices", [[2, 0, 0, 3], [1], [3, 2, 1, 0]], ids=["reorder-repeat", "subset", "reverse"])
@pytest.mark.parametrize("settings", EDIT_SETTINGS, ids=EDIT_IDS)
def test_select_batch_equals_cache_of_selected_sequences(settings: dict, indices: list[int]) -> None:
    config = KVCacheConfig(**settings)
    pads, chunks, h_kv, d = (0, 5, 18, 2), (16, 9, 3), 2, 64
    n = sum(chunks)
    k, v = padded_kv(pads, h_kv, n, d, seed=90)
    valid = left_pad_mask(pads, n)
    head = chunks[0] + chunks[1]
    cache = build(config, k[:, :, :head], v[:, :, :head], chunks[:2], valid[:, :head])
    cache.select_batch(torch.tensor(indices))
    idx = torch.tensor(indices)
    direct = build(config, k[idx, :, :head], v[idx, :, :head], chunks[:2], valid[idx, :head])
    assert cache.batch_size == len(indices)
    assert_same_cache(cache, direct)
    q = randn(len(indices), 4, 2, d, seed=91)
    assert rel_err(cache.attend(q), direct.attend(q)) < FP32_RTOL
    # both go on identically
    for c in (cache, direct):
        c.append(k[idx, :, head:], v[idx, :, head:], valid=valid[idx, head:])
    assert_same_cache(cache, direct)
    assert rel_err(cache.attend(q), direct.attend(q)) < FP32_RTOL
    for x, y in zip(cache.dequantize(), direct.dequantize(), strict=True):
        assert torch.equal(x, y)


def test_select_batch_rejects_bad_indices() -> None:
    cache = build(KVCacheConfig(**MSE3), *padded_kv((0, 0), 1, 4, 64, seed=92), (4,))
    for bad in ([], [2], [-1], [[0, 1]]):
        with pytest.raises(ValueError, match="indices"):
            cache.select_batch(torch.tensor(bad, dtype=torch.int64))
    assert cache.batch_size == 2


CROP_PADS = (0, 7, 35)
CROP_CHUNKS = (20, 30)


@pytest.mark.parametrize("length", [45, 30, -20, -5, 12])
def test_crop_equals_cache_of_first_positions(length: int) -> None:
    """Without a window, crop(n) / crop(-n) leave exactly the cache of the first positions, and re-appending
    the removed positions gives back the uncropped cache bit for bit."""
    config = KVCacheConfig(**MSE3, chunk_size=16)
    h_kv, d, n = 2, 64, sum(CROP_CHUNKS)
    k, v = padded_kv(CROP_PADS, h_kv, n, d, seed=95)
    valid = left_pad_mask(CROP_PADS, n)
    cache = build(config, k, v, CROP_CHUNKS, valid)
    kept = length if length >= 0 else n + length
    cache.crop(length)
    first = tuple(min(stop, kept) - start for start, stop in bounds(CROP_CHUNKS) if start < kept)
    direct = build(config, k[:, :, :kept], v[:, :, :kept], first, valid[:, :kept])
    assert cache.get_seq_length() == kept and cache.kv_start.tolist() == [min(p, kept) for p in CROP_PADS]
    assert_same_cache(cache, direct)
    q = randn(3, 4, 2, d, seed=96)
    assert rel_err(cache.attend(q), direct.attend(q)) < FP32_RTOL

    cache.append(k[:, :, kept:], v[:, :, kept:], valid=valid[:, kept:])
    whole = build(config, k, v, CROP_CHUNKS, valid)
    assert_same_cache(cache, whole)
    assert rel_err(cache.attend(q), whole.attend(q)) < FP32_RTOL


@pytest.mark.parametrize("length", [45, 42, 30, -20, 12])
def test_crop_with_residual_window(length: int) -> None:
    """With a window, crop keeps the stored rows and the exact window of the first positions (no position is
    re-quantized or dropped early), attends them correctly, and appends after the crop store what a fresh
    quantization of those positions stores."""
    config = KVCacheConfig(**MSE3, residual_window=8, flush_block=4, chunk_size=16)
    plain = KVCacheConfig(**MSE3)
    h_kv, d, n = 2, 64, sum(CROP_CHUNKS)
    k, v = padded_kv(CROP_PADS, h_kv, n, d, seed=97)
    valid = left_pad_mask(CROP_PADS, n)
    cache = build(config, k, v, CROP_CHUNKS, valid)
    assert cache.num_compressed == 40
    k_full, v_full = cache.dequantize()
    kept = length if length >= 0 else n + length
    cache.crop(length)
    assert cache.get_seq_length() == kept and cache.kv_start.tolist() == [min(p, kept) for p in CROP_PADS]
    k_hat, v_hat = cache.dequantize()
    assert torch.equal(k_hat, k_full[:, :, :kept]) and torch.equal(v_hat, v_full[:, :, :kept])
    assert cache.num_compressed == min(kept, 40)
    q = randn(3, 4, 2, d, seed=98)
    starts = [min(p, kept) for p in CROP_PADS]
    ref = attention_oracle(q, k_hat, v_hat, visibility(list(range(kept)), [kept - 2, kept - 1], starts))
    assert_attention(*cache.attend_with_lse(q), *ref)

    cache.append(k[:, :, kept:], v[:, :, kept:], valid=valid[:, kept:])
    assert cache.get_seq_length() == n and cache.kv_start.tolist() == list(CROP_PADS)
    n_c = cache.num_compressed
    assert 8 <= n - n_c
    stored = build(plain, k[:, :, :n_c], v[:, :, :n_c], (n_c,))  # per-token quantization of the flushed ones
    k_hat, v_hat = cache.dequantize()
    k_ref, v_ref = stored.dequantize()
    assert torch.equal(k_hat[:, :, :n_c], k_ref) and torch.equal(v_hat[:, :, :n_c], v_ref)
    assert torch.equal(k_hat[:, :, n_c:], k[:, :, n_c:]) and torch.equal(v_hat[:, :, n_c:], v[:, :, n_c:])
    ref = attention_oracle(q, k_hat, v_hat, visibility(list(range(n)), [n - 2, n - 1], list(CROP_PADS)))
    assert_attention(*cache.attend_with_lse(q), *ref)


def test_crop_refusals_and_no_op() -> None:
    k, v = padded_kv((0, 0), 1, 30, 64, seed=99)
    ring = build(KVCacheConfig(**MSE3, ring_window=16), k, v, (30,))
    with pytest.raises(ValueError, match="ring"):
        ring.crop(10)
    cache = build(KVCacheConfig(**MSE3), k, v, (30,))
    with pytest.raises(ValueError, match="30"):
        cache.crop(-31)
    assert cache.get_seq_length() == 30
    before = {name: t.clone() for name, t in cache.buffers().items()}
    cache.crop(40)  # longer than the cache: nothing to remove
    assert cache.get_seq_length() == 30
    assert all(torch.equal(t, before[name]) for name, t in cache.buffers().items())


# ------------------------------------------------------------------------- ring fallback predicate


def test_ring_with_pads_among_stored_slots_is_not_left_to_the_kernel() -> None:
    """The fused kernel cannot mask pads once a ring wrapped (it gets kv_start = 0 there), so backend="auto"
    must not pick it when a stored slot holds a pad, however the pads were appended (here one per step)."""
    config = KVCacheConfig(**MSE3, ring_window=8)
    pads, n = (0, 10), 14
    k, v = padded_kv(pads, 1, n, 64, seed=110)
    cache = build(config, k, v, (1,) * n, left_pad_mask(pads, n))
    oldest = n - config.ring_window
    assert cache.kv_start.tolist() == list(pads)
    pads_stored = any(p > oldest for p in pads)  # positions oldest .. p-1 of that sequence are pads
    assert pads_stored
    q = randn(2, 2, 1, 64, seed=111)
    k_hat, v_hat = cache.dequantize()
    ref = attention_oracle(q, k_hat, v_hat, visibility(list(range(oldest, n)), [n - 1], list(pads)))
    assert_attention(*cache.attend_with_lse(q), *ref)  # reference path
    # the predicate backend="auto" consults on CUDA before launching the kernel
    assert cache._kernel_applies(n - 1, None) is (not pads_stored)


# ------------------------------------------------------------------------ fused kernel, kv_start


def _poison_workspaces() -> None:
    from turboquant.kernels import decode

    for o_part, l_part in decode._WORKSPACES.values():
        o_part.fill_(float("nan"))
        l_part.fill_(float("nan"))


def assert_kernel_matches_reference(cache: TurboQuantKVCache, q: torch.Tensor, **kw) -> None:
    _poison_workspaces()
    ref_out, ref_lse = cache.attend_with_lse(q, backend="reference", **kw)
    out, lse = cache.attend_with_lse(q, backend="triton", **kw)
    assert rel_err(out, ref_out) < KERNEL_TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() < 1e-2


# (settings, pads, chunks, queries as (N_q, after))
KERNEL_CASES = [
    (MSE3, (0, 5, 40), (30, 40), ((1, False), (3, False))),  # sequence 2 starts in the second append
    (dict(PROD3, sink_tokens=2, center_keys=True), (0, 9), (8, 7), ((2, True), (1, False))),
]


@needs_triton
@pytest.mark.parametrize("settings,pads,chunks,queries", KERNEL_CASES, ids=["mse3-n70", "prod3-n15-sinks-centred"])
def test_decode_kernel_with_left_padding(settings: dict, pads: tuple, chunks: tuple, queries: tuple) -> None:
    """GQA 4, head_dim 64: the fused kernel skips each sequence's pads (and sinks) like the reference."""
    config = KVCacheConfig(**settings, chunk_size=64)
    n = sum(chunks)
    k, v = padded_kv(pads, 2, n, 64, seed=120 + n)
    cache = build(config, k, v, chunks, left_pad_mask(pads, n), device=DEVICE)
    for n_q, after in queries:
        q = randn(len(pads), 8, n_q, 64, seed=121 + n_q).to(DEVICE)
        assert_kernel_matches_reference(cache, q, after=after)
    # the reference itself is right: the oracle on dequantize() with the sinks exact and the pads masked
    k_ref, v_ref = (t.cpu() for t in cache.dequantize())
    for b, p in enumerate(pads):
        s = config.sink_tokens
        k_ref[b, :, p : p + s], v_ref[b, :, p : p + s] = k[b, :, p : p + s], v[b, :, p : p + s]
    q = randn(len(pads), 8, 1, 64, seed=122).to(DEVICE)
    ref = attention_oracle(q, k_ref, v_ref, visibility(list(range(n)), [n - 1], list(pads)))
    assert_attention(*cache.attend_with_lse(q, backend="reference"), *ref)


@needs_triton
def test_decode_kernel_is_not_used_where_it_does_not_apply() -> None:
    """backend="triton" with a sliding window that excludes stored keys must not silently attend all of them:
    it either gives the windowed attention or refuses."""
    config = KVCacheConfig(**MSE3)
    k, v = padded_kv((0,), 1, 40, 64, seed=130)
    cache = build(config, k, v, (40,), device=DEVICE)
    q = randn(1, 4, 1, 64, seed=131).to(DEVICE)
    k_hat, v_hat = cache.dequantize()
    ref = attention_oracle(q, k_hat, v_hat, visibility(list(range(40)), [39], [0], window=10))
    assert_attention(*cache.attend_with_lse(q, sliding_window=10, backend="reference"), *ref)
    try:
        out, lse = cache.attend_with_lse(q, sliding_window=10, backend="triton")
    except ValueError:
        return
    assert_attention(out, lse, *ref, tol=KERNEL_TOL)
