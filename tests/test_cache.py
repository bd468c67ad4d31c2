"""TurboQuantKVCache: chunked appends store exactly what one-shot compression stores, attend equals SDPA on
dequantize() with the bottom-right causal mask, the full-precision window and the ring keep the right
tokens, capacity grows without touching stored rows, byte accounting, shared quantizers, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import COMPRESSED, randn, rel_err

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.quantizers import TurboQuantMSE, TurboQuantProd, ValueQuantizer

FP32_RTOL = 1e-4


def make_kv(b: int, h: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return randn(b, h, n, d, seed=seed), randn(b, h, n, d, seed=seed + 1)


def compressed_buffers(cache: TurboQuantKVCache) -> dict[str, torch.Tensor]:
    return {name: t for name, t in cache.buffers().items() if name in COMPRESSED}


def filled(
    config: KVCacheConfig,
    k: torch.Tensor,
    v: torch.Tensor,
    chunks: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> TurboQuantKVCache:
    """A cache holding k, v [B, H, N, D], appended in ``chunks`` (one call when None)."""
    cache = TurboQuantKVCache(config, k.shape[0], k.shape[1], dtype=dtype)
    start = 0
    for n in chunks or (k.shape[2],):
        cache.append(k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
    assert start == k.shape[2]
    return cache


def bottom_right_mask(n_q: int, n_k: int) -> torch.Tensor:
    """Independent oracle: query i sits at position n_k − n_q + i and sees the keys j <= that position."""
    return torch.tensor([[j <= n_k - n_q + i for j in range(n_k)] for i in range(n_q)], dtype=torch.bool)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Plain fp32 SDPA with K/V heads repeated for GQA and the explicit bottom-right causal mask."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    mask = bottom_right_mask(q.shape[2], k.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask)


def check_attend(cache: TurboQuantKVCache, q: torch.Tensor, causal: bool = True) -> None:
    """attend (and attend_with_lse's lse) equal plain SDPA over cache.dequantize()."""
    k_hat, v_hat = cache.dequantize()
    out = cache.attend(q, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, sdpa(q, k_hat, v_hat, causal)) < FP32_RTOL
    _, lse = cache.attend_with_lse(q, causal=causal)
    group = q.shape[1] // cache.num_kv_heads
    scores = q.float() @ k_hat.float().repeat_interleave(group, dim=1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(~bottom_right_mask(q.shape[2], k_hat.shape[2]), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(scores, dim=-1), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ appends

STORE_CONFIGS = [
    KVCacheConfig(head_dim=128, key_bits=4, value_bits=4),
    KVCacheConfig(head_dim=64, key_bits=3, value_bits=2),
    KVCacheConfig(head_dim=128, key_bits=3, value_bits=2, key_mode="prod"),
    KVCacheConfig(head_dim=64, key_bits=2, value_bits=3, key_mode="prod"),
    KVCacheConfig(head_dim=64, key_bits=2, value_bits=8, rotation="hadamard", norm_correction=True, group_size=16),
]


def config_id(c: KVCacheConfig) -> str:
    extra = ("-hadamard" if c.rotation == "hadamard" else "") + ("-nc" if c.norm_correction else "")
    return f"{c.key_mode}{c.key_bits}-v{c.value_bits}-d{c.head_dim}{extra}"


@pytest.mark.parametrize("config", STORE_CONFIGS, ids=config_id)
def test_chunked_appends_equal_one_shot(config: KVCacheConfig) -> None:
    k, v = make_kv(3, 2, 300, config.head_dim, seed=STORE_CONFIGS.index(config))
    one = filled(config, k, v)
    steps = filled(config, k, v, chunks=(1, 15, 63, 221))
    assert one.num_compressed == steps.num_compressed == 300
    assert torch.equal(one.seq_lens, torch.full((3,), 300)) and torch.equal(steps.seq_lens, one.seq_lens)
    a, b = one.buffers(), steps.buffers()
    prod_only = {"key_signs", "key_rnorms"}
    stored = set(COMPRESSED) if config.key_mode == "prod" else set(COMPRESSED) - prod_only
    assert set(a) == set(b) == stored | {"window_k", "window_v", "seq_lens", "kv_start"}
    for name in a:
        if name in stored:  # used slots only: capacity may differ
            assert torch.equal(a[name][:, :, :300], b[name][:, :, :300]), name
        else:
            assert torch.equal(a[name], b[name]), name
    assert one.window_k.shape[2] == 0
    for x, y in zip(one.dequantize(), steps.dequantize(), strict=True):
        assert x.shape == (3, 2, 300, config.head_dim)
        assert torch.equal(x, y)


@pytest.mark.parametrize("config", STORE_CONFIGS, ids=config_id)
def test_dequantize_is_the_quantizer_round_trip(config: KVCacheConfig) -> None:
    """The stored rows are the quantizers' own compression (planar packing loses nothing)."""
    k, v = make_kv(3, 2, 63, config.head_dim, seed=10 + STORE_CONFIGS.index(config))
    cache = filled(config, k, v, chunks=(1, 62))
    kw = dict(rotation=config.rotation, norm_correction=config.norm_correction)
    if config.key_mode == "mse":
        kq = TurboQuantMSE(config.head_dim, config.key_bits, None, config.seed, **kw)
    else:
        kq = TurboQuantProd(config.head_dim, config.key_bits, None, config.seed, qjl_seed=config.qjl_seed, **kw)
    vq = ValueQuantizer(config.value_bits, config.group_size)
    k_hat, v_hat = cache.dequantize()
    assert rel_err(k_hat, kq.decompress(kq.compress(k))) < 1e-6
    assert rel_err(v_hat, vq.decompress(vq.compress(v))) < 1e-6


# ------------------------------------------------------------------------------------- attend

HADAMARD = dict(rotation="hadamard", norm_correction=True, group_size=16)

# (key_mode, key_bits, value_bits, h_q, h_kv, d, prefill, other config settings)
ATTEND_CASES = [
    ("mse", 2, 2, 2, 2, 64, 300, {}),
    ("mse", 3, 4, 8, 2, 128, 300, {}),
    ("mse", 4, 4, 8, 1, 64, 300, {}),
    ("mse", 4, 2, 4, 1, 128, 1100, {}),  # more than one block of the online softmax
    ("prod", 2, 3, 2, 2, 128, 63, {}),
    ("prod", 3, 2, 4, 1, 128, 300, {}),
    ("prod", 4, 4, 16, 2, 64, 300, {}),
    ("mse", 3, 2, 4, 2, 64, 63, HADAMARD),
    ("prod", 3, 4, 2, 1, 128, 63, HADAMARD),
]


def attend_id(case: tuple) -> str:
    mode, kb, vb, h_q, h_kv, d, n, extra = case
    return f"{mode}{kb}-v{vb}-gqa{h_q // h_kv}-d{d}-n{n}" + ("-hadamard-nc-g16" if extra else "")


@pytest.mark.parametrize("case", ATTEND_CASES, ids=attend_id)
def test_attend_equals_sdpa_on_dequantized(case: tuple) -> None:
    """Causal prefill, a causal chunk of 5 queries, decode, and non-causal attention over the cache."""
    mode, kb, vb, h_q, h_kv, d, n, extra = case
    seed = 100 * ATTEND_CASES.index(case)
    config = KVCacheConfig(head_dim=d, key_bits=kb, value_bits=vb, key_mode=mode, **extra)
    k, v = make_kv(3, h_kv, n + 6, d, seed=seed)
    cache = TurboQuantKVCache(config, 3, h_kv, dtype=torch.float32)
    cache.append(k[:, :, :15], v[:, :, :15])
    check_attend(cache, randn(3, h_q, 15, d, seed=seed + 2))  # prefill: every query of the prompt
    cache.append(k[:, :, 15:n], v[:, :, 15:n])
    cache.append(k[:, :, n : n + 5], v[:, :, n : n + 5])
    check_attend(cache, randn(3, h_q, 5, d, seed=seed + 3))  # chunked prefill
    cache.append(k[:, :, n + 5 :], v[:, :, n + 5 :])
    check_attend(cache, randn(3, h_q, 1, d, seed=seed + 4))  # decode
    check_attend(cache, randn(3, h_q, 5, d, seed=seed + 5), causal=False)
    assert cache.get_seq_length() == n + 6


def test_attend_bf16_query_returns_bf16() -> None:
    config = KVCacheConfig(head_dim=64, key_bits=3, value_bits=4)
    k, v = make_kv(1, 2, 40, 64, seed=1)
    cache = filled(config, k, v, dtype=torch.bfloat16)
    q = randn(1, 4, 5, 64, seed=2)
    out = cache.attend(q.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = cache.attend(q.bfloat16().float())
    assert torch.equal(out, ref.bfloat16())


# ------------------------------------------------------------------------- full-precision window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_window(dtype: torch.dtype) -> None:
    r, fb = 16, 8
    config = KVCacheConfig(head_dim=64, key_bits=3, value_bits=4, residual_window=r, flush_block=fb)
    plain = KVCacheConfig(head_dim=64, key_bits=3, value_bits=4)
    chunks = (5, 9, 1, 3, 30, 7, 1, 64, 2, 8)
    k, v = make_kv(3, 2, sum(chunks), 64, seed=21)
    cache = TurboQuantKVCache(config, 3, 2, dtype=dtype)
    total = 0
    for step, n in enumerate(chunks):
        cache.append(k[:, :, total : total + n], v[:, :, total : total + n])
        total += n
        n_win = cache.window_k.shape[2]
        if total < r:
            assert n_win == total
        else:
            assert r <= n_win <= r + fb - 1
        n_c = total - n_win
        assert cache.num_compressed == n_c and n_c % fb == 0 and cache.get_seq_length() == total
        assert torch.equal(cache.seq_lens, torch.full((3,), n_c))
        assert cache.window_k.dtype == cache.window_v.dtype == dtype
        assert torch.equal(cache.window_k, k[:, :, n_c:total].to(dtype))
        assert torch.equal(cache.window_v, v[:, :, n_c:total].to(dtype))

        k_hat, v_hat = cache.dequantize()
        assert k_hat.shape == v_hat.shape == (3, 2, total, 64) and k_hat.dtype == dtype
        assert torch.equal(k_hat[:, :, n_c:], k[:, :, n_c:total].to(dtype))
        assert torch.equal(v_hat[:, :, n_c:], v[:, :, n_c:total].to(dtype))
        if n_c:  # the compressed part is the one-shot compression of the flushed tokens
            ref = filled(plain, k[:, :, :n_c].to(dtype), v[:, :, :n_c].to(dtype), dtype=dtype)
            for name, t in compressed_buffers(ref).items():
                assert torch.equal(getattr(cache, name)[:, :, :n_c], t[:, :, :n_c]), name
            ref_k, ref_v = ref.dequantize()
            assert torch.equal(k_hat[:, :, :n_c], ref_k) and torch.equal(v_hat[:, :, :n_c], ref_v)

        if dtype == torch.float32:
            check_attend(cache, randn(3, 8, 1, 64, seed=100 + step))
            check_attend(cache, randn(3, 4, min(n, 5), 64, seed=200 + step))
            check_attend(cache, randn(3, 2, total, 64, seed=300 + step))  # queries in the compressed part too


# ------------------------------------------------------------------------------------- ring


@pytest.mark.parametrize(
    "chunks", [(7, 30, 20, 1, 1, 40, 3), (120,), (10, 75, 1), (50, 50, 1)], ids=lambda c: "-".join(map(str, c))
)
@pytest.mark.parametrize("key_mode", ["mse", "prod"])
def test_ring_keeps_the_last_w_tokens(chunks: tuple[int, ...], key_mode: str) -> None:
    w, d = 50, 64
    config = KVCacheConfig(head_dim=d, key_bits=3, value_bits=2, key_mode=key_mode, ring_window=w)
    plain = KVCacheConfig(head_dim=d, key_bits=3, value_bits=2, key_mode=key_mode)
    k, v = make_kv(3, 2, sum(chunks), d, seed=sum(chunks))
    cache = TurboQuantKVCache(config, 3, 2, dtype=torch.float32)
    assert cache.capacity == w
    total = 0
    for step, n in enumerate(chunks):
        cache.append(k[:, :, total : total + n], v[:, :, total : total + n])
        total += n
        kept = min(total, w)
        assert cache.capacity == w and cache.get_seq_length() == total
        assert torch.equal(cache.seq_lens, torch.full((3,), kept))
        bufs = compressed_buffers(cache)
        assert all(t.shape[2] == w for t in bufs.values())

        ref = filled(plain, k[:, :, total - kept : total], v[:, :, total - kept : total])
        slots = torch.arange(total - kept, total) % w  # position p lives in slot p mod W
        for name, t in compressed_buffers(ref).items():
            assert torch.equal(bufs[name][:, :, slots], t[:, :, :kept]), name
        k_hat, v_hat = cache.dequantize()
        ref_k, ref_v = ref.dequantize()
        assert k_hat.shape == (3, 2, kept, d)
        assert torch.equal(k_hat, ref_k) and torch.equal(v_hat, ref_v)

        q = randn(3, 8, 1, d, seed=1000 + step)
        assert rel_err(cache.attend(q), sdpa(q, ref_k, ref_v, causal=False)) < FP32_RTOL
        q = randn(3, 4, 5, d, seed=2000 + step)
        if total > w:
            with pytest.raises(ValueError, match="ring"):
                cache.attend(q)
        else:
            check_attend(cache, q)
    assert total > w


# ------------------------------------------------------------------------------------ storage


def test_capacity_grows_in_chunks_without_touching_stored_rows() -> None:
    config = KVCacheConfig(head_dim=64, key_bits=3, value_bits=2, key_mode="prod", chunk_size=16)
    k, v = make_kv(3, 2, 60, 64, seed=5)
    cache = TurboQuantKVCache(config, 3, 2, dtype=torch.float32)
    assert cache.capacity == 0
    total = 0
    for n, capacity in [(10, 16), (6, 16), (14, 32), (3, 48), (27, 64)]:
        before = {name: t.clone() for name, t in compressed_buffers(cache).items()}
        before_k, before_v = cache.dequantize()
        cache.append(k[:, :, total : total + n], v[:, :, total : total + n])
        assert cache.capacity == capacity
        for name, t in compressed_buffers(cache).items():
            assert t.shape[2] == capacity and t.is_contiguous()
            assert torch.equal(t[:, :, :total], before[name][:, :, :total]), name
        k_hat, v_hat = cache.dequantize()
        assert torch.equal(k_hat[:, :, :total], before_k) and torch.equal(v_hat[:, :, :total], before_v)
        total += n

    preallocated = TurboQuantKVCache(config, 3, 2, dtype=torch.float32, capacity=40)
    preallocated.append(k[:, :, :40], v[:, :, :40])
    assert preallocated.capacity == 40
    preallocated.append(k[:, :, 40:45], v[:, :, 40:45])
    assert preallocated.capacity == 48


@pytest.mark.parametrize(
    "config,expected",
    [
        (KVCacheConfig(head_dim=128, key_bits=4, value_bits=4), 146),
        (KVCacheConfig(head_dim=128, key_bits=3, value_bits=2), 98),
        (KVCacheConfig(head_dim=128, key_bits=3, value_bits=2, key_mode="prod"), 100),
        (KVCacheConfig(head_dim=64, key_bits=2, value_bits=4, group_size=16), 16 + 2 + 32 + 16),
    ],
    ids=["K4V4", "K3V2", "prodK3V2", "d64-K2V4-g16"],
)
def test_nbytes(config: KVCacheConfig, expected: int) -> None:
    assert config.bytes_per_token_per_head() == expected
    b, h, d = 3, 2, config.head_dim
    k, v = make_kv(b, h, 100, d, seed=8)
    for dtype in (torch.float32, torch.bfloat16):
        cache = filled(config, k, v, dtype=dtype)
        assert cache.nbytes() == sum(t.numel() * t.element_size() for t in cache.buffers().values())
        compressed = sum(t.numel() * t.element_size() for t in compressed_buffers(cache).values())
        assert compressed == expected * b * h * cache.capacity
        assert cache.nbytes() == compressed + 16 * b  # + int64 seq_lens and kv_start, empty window

    windowed = KVCacheConfig(**{**config.__dict__, "residual_window": 16, "flush_block": 8})
    cache = filled(windowed, k, v, dtype=torch.bfloat16)
    assert cache.window_k.shape[2] >= 16
    compressed = sum(t.numel() * t.element_size() for t in compressed_buffers(cache).values())
    assert compressed == expected * b * h * cache.capacity
    rows = 16 + 8 - 1  # the window's preallocated rows: R + F - 1, what it holds at most
    assert cache.nbytes() == compressed + 2 * b * h * rows * d * 2 + 16 * b


def test_window_rows_grow_with_the_first_tokens() -> None:
    """A window's ring (R + F - 1 rows) is allocated as the first tokens come, doubling, so that a short context
    does not hold the whole ring; its tokens stay in place as it grows and after it wraps."""
    config = KVCacheConfig(head_dim=64, key_bits=4, value_bits=4, residual_window=40, flush_block=16)
    k, v = make_kv(2, 2, 120, 64, seed=9)
    cache = TurboQuantKVCache(config, 2, 2, dtype=torch.float32)
    rows = []
    for start, stop in ((0, 5), (5, 6), (6, 20), (20, 40), (40, 41), (41, 120)):
        cache.append(k[:, :, start:stop], v[:, :, start:stop])
        rows.append(cache.buffers()["window_k"].shape[2])
        n_c = cache.num_compressed
        assert torch.equal(cache.window_k, k[:, :, n_c:stop]) and torch.equal(cache.window_v, v[:, :, n_c:stop])
    assert rows == [16, 16, 32, 55, 55, 55]  # 55 = R + F - 1
    assert 40 <= cache.n_window <= 55 and cache.num_compressed % 16 == 0 and cache.num_compressed > 55


def test_quantizers_are_shared() -> None:
    config = KVCacheConfig(head_dim=64, key_bits=3, value_bits=2, seed=4242)
    a = TurboQuantKVCache(config, 1, 2, dtype=torch.float32)
    b = TurboQuantKVCache(KVCacheConfig(head_dim=64, key_bits=3, value_bits=2, seed=4242), 3, 4)
    assert a.key_quantizer is b.key_quantizer and a.value_quantizer is b.value_quantizer
    assert a.key_quantizer.rotation is b.key_quantizer.rotation
    # settings that do not change quantization share the quantizers too
    c = TurboQuantKVCache(KVCacheConfig(head_dim=64, key_bits=3, value_bits=2, seed=4242, residual_window=8), 1, 2)
    assert c.key_quantizer is a.key_quantizer
    # other bit widths are other quantizers, on the same rotation matrix
    other = TurboQuantKVCache(KVCacheConfig(head_dim=64, key_bits=4, value_bits=4, seed=4242), 1, 2)
    prod = TurboQuantKVCache(KVCacheConfig(head_dim=64, key_bits=3, key_mode="prod", seed=4242), 1, 2)
    assert other.key_quantizer is not a.key_quantizer
    assert other.key_quantizer.rotation is a.key_quantizer.rotation
    assert prod.key_quantizer.mse.rotation is a.key_quantizer.rotation
    # another seed is another rotation
    reseeded = TurboQuantKVCache(KVCacheConfig(head_dim=64, key_bits=3, value_bits=2, seed=4243), 1, 2)
    assert not torch.equal(reseeded.key_quantizer.rotation, a.key_quantizer.rotation)


# --------------------------------------------------------------------------------- bad inputs


def _bad_calls() -> list[tuple[str, object, str]]:
    config = KVCacheConfig(head_dim=64, key_bits=3, value_bits=2)
    k, v = make_kv(2, 2, 5, 64, seed=0)

    def cache() -> TurboQuantKVCache:
        return TurboQuantKVCache(config, 2, 2, dtype=torch.float32)

    def full() -> TurboQuantKVCache:
        c = cache()
        c.append(k, v)
        return c

    q = randn(2, 4, 1, 64, seed=1)
    return [
        ("append-batch", lambda: cache().append(k[:1], v[:1]), "shape"),
        ("append-heads", lambda: cache().append(k[:, :1], v[:, :1]), "shape"),
        ("append-head-dim", lambda: cache().append(k[..., :32], v[..., :32]), "head_dim"),
        ("append-3d", lambda: cache().append(k[0], v[0]), "shape"),
        ("append-kv-mismatch", lambda: cache().append(k, v[:, :, :3]), "same shape"),
        ("append-int", lambda: cache().append(k.to(torch.int32), v.to(torch.int32)), "dtype"),
        ("q-3d", lambda: full().attend(q[:, :, 0]), "shape"),
        ("q-batch", lambda: full().attend(q[:1]), "shape"),
        ("q-heads", lambda: full().attend(q[:, :3]), "shape"),
        ("q-head-dim", lambda: full().attend(q[..., :32]), "head_dim"),
        ("q-int", lambda: full().attend(q.to(torch.int64)), "dtype"),
        ("attend-backend", lambda: full().attend(q, backend="cuda"), "backend"),
        ("attend-before-append", lambda: cache().attend(q), "append"),
        ("more-queries-than-tokens", lambda: full().attend(randn(2, 4, 6, 64, seed=2)), "append"),
        ("cache-batch", lambda: TurboQuantKVCache(config, 0, 2), "batch_size"),
        ("cache-dtype", lambda: TurboQuantKVCache(config, 1, 2, dtype=torch.int8), "dtype"),
        ("key-bits-mse", lambda: KVCacheConfig(head_dim=64, key_bits=5), "key_bits"),
        ("key-bits-prod", lambda: KVCacheConfig(head_dim=64, key_bits=1, key_mode="prod"), "key_bits"),
        ("value-bits", lambda: KVCacheConfig(head_dim=64, value_bits=1), "value_bits"),
        ("key-mode", lambda: KVCacheConfig(head_dim=64, key_mode="qjl"), "key_mode"),
        ("group-size", lambda: KVCacheConfig(head_dim=64, group_size=48), "group_size"),
        (
            "group-size-80",
            lambda: KVCacheConfig(head_dim=80, group_size=32),
            r"head_dim=80 \(e.g. 8, 10, 16, 20, 40, 80\)",
        ),
        ("group-size-0", lambda: KVCacheConfig(head_dim=64, group_size=0), "group_size"),
        ("head-dim-100", lambda: KVCacheConfig(head_dim=100), "head_dim"),
        ("head-dim-8", lambda: KVCacheConfig(head_dim=8, group_size=8), "head_dim"),
        ("rotation", lambda: KVCacheConfig(head_dim=64, rotation="dct"), "rotation"),
        ("hadamard-96", lambda: KVCacheConfig(head_dim=96, rotation="hadamard"), "power-of-two"),
        ("ring-and-sinks", lambda: KVCacheConfig(head_dim=64, ring_window=32, sink_tokens=4), "ring_window"),
        ("ring-0", lambda: KVCacheConfig(head_dim=64, ring_window=0), "ring_window"),
        ("window-negative", lambda: KVCacheConfig(head_dim=64, residual_window=-1), "residual_window"),
        ("flush-block-0", lambda: KVCacheConfig(head_dim=64, residual_window=8, flush_block=0), "flush_block"),
        ("chunk-size-0", lambda: KVCacheConfig(head_dim=64, chunk_size=0), "chunk_size"),
    ]


@pytest.mark.parametrize("name,call,match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise(name: str, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_valid_configs_construct() -> None:
    """Positive controls for the config checks above."""
    KVCacheConfig(head_dim=96)  # Haar works for any multiple of 16
    KVCacheConfig(head_dim=64, rotation="hadamard", ring_window=32)
    KVCacheConfig(head_dim=64, key_bits=2, key_mode="prod", residual_window=8, flush_block=1)


@pytest.mark.parametrize("key_mode", ["mse", "prod"])
def test_ring_with_exact_window_covers_the_sliding_window(key_mode: str) -> None:
    """A sliding-window layer's store: ring of W - 1 - R compressed tokens + an exact window of R (flushed one
    token at a time). Every decode step (attend_and_append) equals softmax attention over the positions
    (p - W, p]: the newest R (and the step's own token) exact, older ones as one-shot compression stores them."""
    w, r, d, group = 12, 4, 64, 2
    cfg = KVCacheConfig(head_dim=d, key_mode=key_mode, key_bits=3, value_bits=4, ring_window=w - 1 - r,
                        residual_window=r, flush_block=1)  # fmt: skip
    k, v = make_kv(2, 2, 40, d, seed=31)
    q = randn(2, 2 * group, 40, d, seed=33)
    full = filled(KVCacheConfig(head_dim=d, key_mode=key_mode, key_bits=3, value_bits=4), k, v)
    k_hat, v_hat = full.dequantize()  # the compressed form of every position
    cache = filled(cfg, k[:, :, :20], v[:, :, :20])  # a prompt longer than the window
    for p in range(20, 40):
        assert cache.num_compressed == p - r and cache.window_k.shape[2] == r
        out = cache.attend_and_append(q[:, :, p : p + 1], k[:, :, p : p + 1], v[:, :, p : p + 1], sliding_window=w)
        lo = p - w + 1  # oldest visible position
        keys = torch.cat((k_hat[:, :, lo : p - r], k[:, :, p - r : p + 1]), dim=2).double()
        values = torch.cat((v_hat[:, :, lo : p - r], v[:, :, p - r : p + 1]), dim=2).double()
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        weights = torch.softmax((q[:, :, p : p + 1].double() @ keys.transpose(-1, -2)) / math.sqrt(d), dim=-1)
        assert rel_err(out, weights @ values) < FP32_RTOL, p


@pytest.mark.parametrize("head_dim,group", [(64, 32), (128, 32), (256, 32), (96, 32), (80, 20), (48, 24), (112, 28)])
def test_default_group_size_divides_head_dim(head_dim, group):
    """By default values are grouped by 32, or by the largest divisor of head_dim below 32 (head_dim 80: 20)."""
    assert KVCacheConfig(head_dim=head_dim).group_size == group
    assert KVCacheConfig(head_dim=head_dim, group_size=16).group_size == 16
