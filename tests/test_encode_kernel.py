"""The fused encode kernel (kernels.encode) against the reference rows of TurboQuantKVCache._encode.

Buffers are poisoned before the launch; written slots must hold the reference rows, the others
the poison. Integer codes are compared exactly, except where the reference's input lies within
float rounding of a decision: a key coordinate √d·(Πu)_j at a codebook boundary, or (S r)_j at 0.
On a machine without a GPU these run in Triton's CPU interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from helpers import search_inputs

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.packing import to_key_codes, unpack_key_codes, unpack_planar
from turboquant.quantizers import TurboQuantMSE, ValueQuantizer

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from turboquant.kernels.encode import encode_kv, grid_table  # noqa: E402 (after the skip: needs triton)

POISON = 0xAB
# A code may differ from the reference only where the reference's coordinate is this close to the
# decision (√d-scaled coordinates are ~N(0, 1)); float32 rounding moves them by ~1e-6.
NEAR = 1e-4
MAX_MISMATCH = 1e-3  # fraction of coordinates allowed to differ at all


def _setup(mode, kb, vb, d, rotation, nc, n, bh, dtype=torch.float32, extra=0):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((mode, kb, vb, d, rotation, nc, n, bh, dtype)).encode()))
    cfg = KVCacheConfig(head_dim=d, key_bits=kb, value_bits=vb, key_mode=mode, rotation=rotation, norm_correction=nc)
    cache = TurboQuantKVCache(cfg, *bh, device=DEVICE, capacity=n + extra)
    k = torch.randn(*bh, n, d, generator=gen)
    v = torch.randn(*bh, n, d, generator=gen) * torch.rand(*bh, n, 1, generator=gen) * 4 + 1
    slots = torch.randperm(n + extra, generator=gen)[:n]
    return cache, k.to(DEVICE, dtype), v.to(DEVICE, dtype), slots.to(DEVICE)


def _poisoned_buffers(cache):
    bufs = {name: t for name, t in cache.buffers().items() if name in cache._buffer_specs()}
    for t in bufs.values():
        t.fill_(float("nan") if t.dtype.is_floating_point else POISON)
    return bufs


def _fp16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between float16 tensors (finite, same sign)."""
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert ((a >= 0) == (b >= 0)).all()
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max()) if a.numel() else 0


def _check_rows(cache, k, v, bufs, slots, max_mismatch=MAX_MISMATCH):
    """Compare the written rows with cache._encode(k, v); returns the number of near-tie codes."""
    cfg, d = cache.config, cache.config.head_dim
    mse, kq = cache.mse_quantizer, cache.key_quantizer
    ref = cache._encode(k, v)
    got = {name: t[:, :, slots] for name, t in bufs.items()}

    # untouched slots keep the poison
    rest = torch.ones(bufs["key_codes"].shape[2], dtype=torch.bool, device=slots.device)
    rest[slots] = False
    for name, t in bufs.items():
        untouched = t[:, :, rest]
        kept = untouched.isnan().all() if t.dtype.is_floating_point else (untouched == POISON).all()
        assert kept, name

    # values: exactly the reference's on the CPU (same IEEE divisions and rounding); PyTorch's CUDA
    # division by a Python number multiplies by its reciprocal, which can move a scale by one ulp
    if k.device.type == "cpu":
        for name in ("value_codes", "value_affine"):
            assert torch.equal(got[name], ref[name]), name
    else:
        assert torch.equal(got["value_affine"][..., 1], ref["value_affine"][..., 1])  # zeros
        assert _fp16_ulps(got["value_affine"][..., 0], ref["value_affine"][..., 0]) <= 1  # scales
        c_ref = unpack_planar(ref["value_codes"], cfg.value_bits, d).int()
        c_diff = (unpack_planar(got["value_codes"], cfg.value_bits, d).int() - c_ref).abs()
        assert c_diff.max().item() <= 1 and (c_diff > 0).float().mean().item() <= MAX_MISMATCH

    # key codes: equal, or at a boundary of the reference's rotated, scaled coordinate
    # stored key codes -> codebook indices (a near tie is then ±1)
    idx_ref = unpack_key_codes(ref["key_codes"], cfg.key_index_bits, d).long()
    idx_got = unpack_key_codes(got["key_codes"], cfg.key_index_bits, d).long()
    xf = k.float()
    unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    coord = mse.rotate(unit) * mse.scale  # what the reference bucketizes
    bad = idx_ref != idx_got
    assert bad.float().mean().item() <= max_mismatch
    if bad.any():
        assert ((idx_ref - idx_got).abs()[bad] == 1).all()
        boundary = mse.boundaries[torch.minimum(idx_ref, idx_got)[bad]]
        assert (coord[bad] - boundary).abs().max().item() < NEAR
    ok_rows = ~bad.any(-1)  # rows whose codes match: their norms, signs and γ are comparable

    # norms (with norm correction they depend on every code of the row) within one fp16 ulp
    assert _fp16_ulps(got["key_norms"][ok_rows], ref["key_norms"][ok_rows]) <= 1
    if cfg.key_mode == "prod":
        assert _fp16_ulps(got["key_rnorms"][ok_rows], ref["key_rnorms"][ok_rows]) <= 1
        s_ref = unpack_planar(ref["key_signs"], 1, d).bool()
        s_got = unpack_planar(got["key_signs"], 1, d).bool()
        flipped = (s_ref != s_got) & ok_rows[..., None]
        assert flipped.float().mean().item() <= max_mismatch
        if flipped.any():  # (S r)_j at 0, on the scale ‖x‖·‖S_j‖ of its rounding error
            residual = xf - mse.unrotate(mse.dequantize_indices(idx_ref, ref["key_norms"]))
            sr = residual @ kq.qjl.T
            scale = xf.norm(dim=-1, keepdim=True) * kq.qjl.norm(dim=-1)
            assert (sr.abs() / scale)[flipped].max().item() < NEAR
        return int(bad.sum()) + int(flipped.sum())
    return int(bad.sum())


# (key_mode, key_bits, value_bits, head_dim, rotation, norm_correction, N, (B, H_kv), launch overrides)
CASES = [
    ("mse", 1, 2, 64, "haar", False, 15, (2, 3), {}),
    ("mse", 2, 3, 128, "hadamard", False, 63, (1, 2), {}),
    ("mse", 3, 4, 64, "haar", True, 300, (1, 2), {"small_rows": 0}),
    ("mse", 4, 8, 128, "haar", False, 1, (3, 2), {}),
    ("mse", 4, 4, 128, "hadamard", True, 300, (2, 1), {"small_rows": 0, "chunk": 32}),
    ("mse", 3, 2, 128, "haar", False, 63, (1, 3), {"chunk": 32}),
    ("mse", 2, 8, 64, "hadamard", True, 1, (1, 1), {}),
    ("prod", 2, 4, 128, "haar", True, 15, (2, 2), {}),
    ("prod", 3, 2, 64, "hadamard", False, 300, (1, 2), {"small_rows": 0, "chunk": 16}),
    ("prod", 4, 3, 64, "haar", False, 1, (2, 3), {}),
    ("prod", 3, 8, 128, "haar", True, 63, (1, 2), {"chunk": 32}),
    ("prod", 4, 2, 128, "hadamard", True, 300, (1, 2), {"small_rows": 0}),
    ("prod", 2, 3, 64, "hadamard", False, 63, (3, 1), {}),
    ("prod", 4, 4, 256, "haar", False, 15, (1, 1), {}),
    ("mse", 4, 4, 256, "haar", True, 80, (1, 1), {"small_rows": 0}),  # head_dim 256's own launch (32 rows)
    ("prod", 3, 2, 256, "hadamard", True, 70, (1, 1), {"small_rows": 0}),
    # float32 MSE keys are rotated as the unit vector in two fp16 parts by default; split=False: one fp32 dot
    ("mse", 4, 4, 128, "haar", True, 300, (1, 2), {"small_rows": 0, "split": False}),
    ("prod", 3, 2, 64, "hadamard", True, 63, (1, 2), {"split": False}),
    # the default searches MSE keys of 3 and 4 bits by one table lookup (grid), the rest by every boundary (full);
    # by magnitude (symmetric) on request: each search on the other widths, the same indices
    ("mse", 1, 2, 64, "haar", False, 15, (2, 3), {"search": "symmetric"}),
    ("mse", 4, 4, 128, "hadamard", True, 300, (2, 1), {"small_rows": 0, "search": "full"}),
    ("mse", 4, 2, 64, "haar", False, 15, (1, 2), {"search": "full"}),
    ("mse", 3, 2, 128, "haar", False, 63, (1, 3), {"search": "symmetric"}),
    ("mse", 4, 4, 128, "haar", True, 300, (2, 1), {"small_rows": 0, "search": "symmetric"}),
    ("prod", 4, 2, 128, "hadamard", True, 300, (1, 2), {"small_rows": 0, "search": "symmetric"}),
    ("prod", 3, 2, 64, "hadamard", False, 300, (1, 2), {"search": "symmetric"}),
    # MSE keys searched by one table lookup
    ("mse", 1, 2, 64, "haar", True, 15, (2, 3), {"search": "grid"}),
    ("mse", 2, 4, 128, "hadamard", False, 63, (1, 2), {"search": "grid"}),
    ("mse", 3, 2, 64, "haar", True, 300, (1, 2), {"small_rows": 0, "search": "grid"}),
    ("mse", 4, 4, 128, "haar", True, 300, (2, 1), {"small_rows": 0, "search": "grid"}),
    ("mse", 4, 2, 128, "hadamard", False, 300, (1, 2), {"small_rows": 0, "split": False, "search": "grid"}),
    ("mse", 4, 4, 256, "haar", True, 80, (1, 1), {"small_rows": 0, "search": "grid"}),
]


@pytest.mark.parametrize("mode,kb,vb,d,rotation,nc,n,bh,launch", CASES)
def test_encode_matches_reference(mode, kb, vb, d, rotation, nc, n, bh, launch):
    cache, k, v, slots = _setup(mode, kb, vb, d, rotation, nc, n, bh, extra=9)
    bufs = _poisoned_buffers(cache)
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer, **launch)
    _check_rows(cache, k, v, bufs, slots)


@pytest.mark.parametrize("n,launch", [(70, {"small_rows": 0}), (37, {"small_rows": 0}), (5, {})])
def test_encode_heads_read_from_a_token_major_layout(n, launch):
    """K and V as a model holds them before its transpose ([B, N, H, D] in memory, seen as [B, H, N, D]: batch
    stride ≠ H × head stride), in launches whose programs' rows cross heads and sequences: every row's batch and
    head are found (_rows), not only its flat offset."""
    cache, k, v, slots = _setup("mse", 4, 4, 128, "haar", False, n, (2, 3), extra=3)
    k_t, v_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    assert k_t.stride(0) != 3 * k_t.stride(1)
    bufs = _poisoned_buffers(cache)
    encode_kv(k_t, v_t, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer,
              **launch)  # fmt: skip
    _check_rows(cache, k, v, bufs, slots)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encode_half_inputs_and_strided_slices(dtype):
    """bf16 / fp16 inputs read in place from slices of larger tensors (the window flush of the cache)."""
    cache, k, v, slots = _setup("prod", 3, 4, 128, "haar", False, 40, (2, 2), dtype=dtype)
    k_big = torch.cat((k, k[:, :, :7]), dim=2)  # [B, H, N + 7, D]: k is its prefix
    v_big = torch.cat((v[:, :, :5], v), dim=2)
    k_view, v_view = k_big[:, :, :40], v_big[:, :, 5:]
    assert not k_view.is_contiguous() and not v_view.is_contiguous()
    bufs = _poisoned_buffers(cache)
    encode_kv(k_view, v_view, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    _check_rows(cache, k, v, bufs, slots)


@pytest.mark.parametrize("mode,kb", [("mse", 4), ("prod", 3)])
def test_encode_bf16_keys_outside_the_fp16_range(mode, kb):
    """bf16 keys are rotated in fp16 after a power-of-two scaling of each row: rows whose elements lie far below
    fp16's normal range (norms from 2^-24 up to 2^13), and elements 2^-40 below their row's norm, still give the
    reference's rows."""
    cache, k, v, slots = _setup(mode, kb, 4, 128, "haar", False, 12, (1, 2), dtype=torch.bfloat16)
    exps = torch.tensor([-27, -24, -20, -17, -14, -8, -1, 0, 1, 5, 8, 10], dtype=torch.float32, device=k.device)
    k = (k.float() * torch.exp2(exps)[None, None, :, None]).to(torch.bfloat16)
    k[:, :, 6, :8] = (k[:, :, 6, :8].float() * 2.0**-40).to(torch.bfloat16)
    assert (k[:, :, 1].float().abs().max() < 2.0**-14).item()  # every element of that row is subnormal in fp16
    bufs = _poisoned_buffers(cache)
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    _check_rows(cache, k, v, bufs, slots)


@pytest.mark.parametrize("vb", [2, 4])
def test_encode_value_groups_of_every_magnitude(vb):
    """Value groups at every float32 magnitude (levels 2^-40 to 2^15, spreads from 2^-20 of the level up; the
    scale (max - min) / (2^b - 1) is computed by the constant's reciprocal and one correction): scales, zeros and
    codes equal the reference's bit for bit; a range beyond float32 (float32 input) stores an infinite scale."""
    cache, k, v, slots = _setup("mse", 4, vb, 128, "haar", False, 64, (1, 2), extra=2)
    gen = torch.Generator().manual_seed(vb)
    level = torch.exp2(torch.randint(-40, 16, (1, 2, 64, 4, 1), generator=gen).float())
    spread = torch.exp2(-torch.randint(0, 21, (1, 2, 64, 4, 1), generator=gen).float())
    v = (level * (1 + spread * torch.rand(1, 2, 64, 4, 32, generator=gen))).flatten(-2).to(v.device)
    bufs = _poisoned_buffers(cache)
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    _check_rows(cache, k, v, bufs, slots)
    v[0, 1, 3, :2] = torch.tensor([-3e38, 3e38])  # group 0 of that row: max - min overflows float32
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    assert bufs["value_affine"][0, 1, slots[3], 0, 0].item() == float("inf")


def test_encode_ring_slots_and_degenerate_rows():
    """Slots in any order (a wrapped ring); zero and constant rows (zero norm, zero value scale)."""
    cache, k, v, _ = _setup("mse", 4, 4, 64, "haar", True, 20, (1, 2))
    k[:, 0, 3] = 0.0
    v[:, 1, 5] = 2.5
    slots = (torch.arange(20, device=k.device) + 13) % 20
    bufs = _poisoned_buffers(cache)
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    _check_rows(cache, k, v, bufs, slots)
    assert bufs["key_norms"][0, 0, slots[3]].item() == 0.0
    assert bufs["value_affine"][0, 1, slots[5], :, 0].eq(0).all()  # zero scales


@pytest.mark.parametrize("vb", [2, 4])
def test_encode_values_on_half_steps(vb):
    """Values exactly halfway between two levels round half to even, as the reference (torch.round)."""
    cache, k, v, slots = _setup("mse", 2, vb, 64, "haar", False, 24, (1, 2))
    levels = 2**vb - 1
    gen = torch.Generator().manual_seed(7)
    half = torch.randint(0, levels, (1, 2, 24, 64), generator=gen).float() + 0.5  # k + 1/2, scale 1 below
    half[..., ::32] = 0.0  # each group of 32 spans [0, levels]: zero 0, scale 1
    half[..., 1::32] = float(levels)
    v = (half * 0.25 - 3.0).to(DEVICE)  # scale 1/4, zero -3: exact in fp16, and (x - zero) / scale = k + 1/2
    bufs = _poisoned_buffers(cache)
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    _check_rows(cache, k, v, bufs, slots)
    codes = unpack_planar(bufs["value_codes"][:, :, slots], vb, 64).float()
    inner = torch.ones(64, dtype=torch.bool)
    inner[::32] = inner[1::32] = False
    expect = torch.round(half)[..., inner]  # ties to even
    assert torch.equal(codes[..., inner].cpu(), expect) and not torch.equal(expect, torch.floor(half[..., inner] + 0.5))


def test_encode_keys_on_decision_boundaries():
    """Keys whose rotated coordinates sit exactly on boundaries: either side is right, nothing else."""
    cache, k, v, slots = _setup("mse", 3, 4, 64, "haar", False, 32, (1, 2))
    mse = cache.mse_quantizer
    gen = torch.Generator().manual_seed(5)
    on = mse.boundaries[torch.randint(0, 7, (1, 2, 32, 32), generator=gen)].cpu() / mse.scale  # half the coords
    rest = torch.randn(1, 2, 32, 32, generator=gen)
    rest = rest / rest.norm(dim=-1, keepdim=True) * (1 - on.pow(2).sum(-1, keepdim=True)).clamp_min(0.01).sqrt()
    y = torch.cat((on, rest), dim=-1)  # [1, 2, 32, 64], ‖y‖ ~ 1: x = yΠ has Πx/‖x‖ ≈ y
    k = ((y / y.norm(dim=-1, keepdim=True)).to(DEVICE) @ mse.rotation) * 3.0
    bufs = _poisoned_buffers(cache)
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    _check_rows(cache, k, v, bufs, slots, max_mismatch=1.0)


@pytest.mark.parametrize("mode,kb,dtype,n,launch,d", [
    ("mse", 4, torch.bfloat16, 40, {}, 64),  # one launch for keys and values (a small chunk)
    ("mse", 3, torch.float32, 300, {"small_rows": 0}, 64),
    ("prod", 3, torch.bfloat16, 63, {"small_rows": 0}, 64),
    ("mse", 4, torch.bfloat16, 70, {"small_rows": 0}, 256),  # the defaults of TurboQuantCache on a Gemma-3 layer
])  # fmt: skip
def test_encode_centres_and_scales_keys(mode, kb, dtype, n, launch, d):
    """key_mean and key_scale: the keys written are those of (k - μ) / s in float32, what TurboQuantKVCache stores
    with center_keys and scale_keys, from the keys as given (16-bit keys are not rounded in between)."""
    cache, k, v, slots = _setup(mode, kb, 4, d, "haar", True, n, (2, 2), dtype=dtype, extra=5)
    gen = torch.Generator().manual_seed(3)
    mean = (torch.randn(2, 2, d, generator=gen) * 0.5).to(DEVICE)
    scale = torch.exp(0.5 * torch.randn(2, 2, d, generator=gen)).to(DEVICE)
    bufs = _poisoned_buffers(cache)
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer,
              key_mean=mean, key_scale=scale, **launch)  # fmt: skip
    _check_rows(cache, (k.float() - mean[:, :, None, :]) / scale[:, :, None, :], v, bufs, slots)


def test_encode_empty_chunk_writes_nothing():
    cache, k, v, slots = _setup("mse", 2, 2, 64, "haar", False, 0, (1, 1), extra=4)
    bufs = _poisoned_buffers(cache)
    encode_kv(k, v, bufs, slots, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    assert (bufs["key_codes"] == POISON).all() and bufs["key_norms"].isnan().all()


def test_symmetric_search_refuses_an_asymmetric_codebook():
    cache, k, v, slots = _setup("mse", 4, 2, 64, "haar", False, 4, (1, 1), extra=4)
    own = TurboQuantMSE(64, 4, device=DEVICE)  # not the cache's shared quantizer: its codebook may be changed
    own.centroids = own.centroids + 0.01
    kw = dict(key_quantizer=own, value_quantizer=cache.value_quantizer)
    by_default, full = _poisoned_buffers(cache), {n: t.clone() for n, t in _poisoned_buffers(cache).items()}
    encode_kv(k, v, by_default, slots, **kw)  # by default a grid lookup, which takes any ascending codebook,
    encode_kv(k, v, full, slots, search="full", **kw)  # as a comparison per boundary does
    assert torch.equal(by_default["key_codes"], full["key_codes"])
    with pytest.raises(ValueError, match="antisymmetric codebook"):
        encode_kv(k, v, _poisoned_buffers(cache), slots, search="symmetric", **kw)


def _grid_lookup(x: torch.Tensor, table: torch.Tensor, shift: int, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid search of the kernel (_grid_search) in float32 torch ops: (stored codes, squared scaled centroids)."""
    v = x * 2.0**shift + torch.tensor(12582912.0)
    k = ((v.view(torch.int32) - (0x4B400000 - bins // 2)).clamp(0, bins - 1)).long()
    e, c2 = table[0, k], table[1, k]
    up = x > (e & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    codes = torch.where(up, e >> 48, (e >> 32) & 0xFFFF)
    return codes, torch.where(up, c2 >> 32, c2 & 0xFFFFFFFF).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_grid_table_gives_the_codes_of_the_comparisons(d, bits):
    """The portable grid lookup (the interpreter's) gives the stored code of idx = #{t : x > b_t} and (c[idx] / √d)²
    on a dense sweep of √d-scaled coordinates, every boundary, the floats next to it, ±0, far values (clamped bins)
    and ±inf."""
    q = TurboQuantMSE(d, bits)
    b = q.boundaries.float().cpu()
    cs = (q.centroids / q.scale).float().cpu()
    table, shift, bins = grid_table(b, cs)
    assert table.dtype == torch.int64 and table.shape == (2, bins)
    x = search_inputs(b, 200_001)
    codes, c2 = _grid_lookup(x, table, shift, bins)
    expect = torch.bucketize(x, b, right=False)  # #{t : b_t < x}
    assert torch.equal(codes, to_key_codes(expect, bits))
    assert torch.equal(c2, cs[expect] * cs[expect])


def test_grid_search_needs_boundaries_in_distinct_bins():
    """Two boundaries closer than the finest bin (2^-12): no table; by default the comparisons take them (the same
    codes as search="full"), and search="grid" is refused with the reason."""
    cache, k, v, slots = _setup("mse", 3, 2, 64, "haar", False, 20, (1, 1), extra=4)
    own = TurboQuantMSE(64, 3, device=DEVICE)  # not the cache's shared quantizer: its boundaries may be changed
    own.boundaries = own.boundaries.clone()
    own.boundaries[4] = own.boundaries[3] + 2.0**-14
    kw = dict(key_quantizer=own, value_quantizer=cache.value_quantizer)
    by_default = _poisoned_buffers(cache)
    full = {name: t.clone() for name, t in by_default.items()}
    encode_kv(k, v, by_default, slots, **kw)
    encode_kv(k, v, full, slots, search="full", **kw)
    assert not (full["key_codes"][:, :, slots] == POISON).all()
    assert torch.equal(by_default["key_codes"], full["key_codes"])
    with pytest.raises(ValueError, match=r"boundaries closer than 2\^-12 apart"):
        encode_kv(k, v, _poisoned_buffers(cache), slots, search="grid", **kw)


def test_grid_search_is_for_mse_keys():
    cache, k, v, slots = _setup("prod", 3, 2, 64, "haar", False, 4, (1, 1), extra=4)
    with pytest.raises(ValueError, match='search="grid" is for MSE keys'):
        encode_kv(k, v, _poisoned_buffers(cache), slots, key_quantizer=cache.key_quantizer,
                  value_quantizer=cache.value_quantizer, search="grid")  # fmt: skip


class _TooBig:
    """Stands in for a kernel whose launch configuration needs more shared memory than the GPU has: Triton raises
    OutOfResources at its first launch, which only a GPU does (the interpreter has no such limit). It takes the
    arguments of ``kernel``."""

    def __init__(self, kernel):
        self.arg_names = kernel.arg_names
        self.__name__ = "too_big"

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(262144, 232448, "shared memory")

        return launch


def test_encode_names_a_launch_that_does_not_fit(monkeypatch):
    import turboquant.kernels.encode as encode

    cache, k, v, slots = _setup("prod", 4, 2, 128, "haar", True, 300, (1, 2), extra=4)
    monkeypatch.setattr(encode, "_encode_keys_kernel", _TooBig(encode._encode_keys_kernel))
    with pytest.raises(ValueError, match=r"128 rows 8 warps chunk 128 .*shared memory.*smaller chunk or block_n"):
        encode_kv(k, v, _poisoned_buffers(cache), slots, key_quantizer=cache.key_quantizer,
                  value_quantizer=cache.value_quantizer, small_rows=0, chunk=128)  # fmt: skip


@pytest.mark.parametrize(
    "d,kb,dtype,centred,launch,cap",
    [(128, 4, torch.bfloat16, False, {}, 168), (128, 4, torch.bfloat16, True, {}, 168),
     (128, 3, torch.bfloat16, True, {}, 168), (128, 3, torch.bfloat16, False, {}, 168),
     (128, 2, torch.bfloat16, False, {}, 0), (64, 4, torch.bfloat16, False, {}, 0),
     (256, 4, torch.bfloat16, True, {}, 0),
     (128, 4, torch.bfloat16, False, {"block_n": 128}, 0), (128, 3, torch.bfloat16, False, {"max_registers": 200}, 200),
     (128, 4, torch.bfloat16, False, {"small_rows": 10**6}, 0)],
)  # fmt: skip
def test_encode_key_register_cap(d, kb, dtype, centred, launch, cap):
    """The key kernel's register cap per launch (H200 sweeps, _key_launch): 168 for the 64-row, 4-warp launches of
    3- and 4-bit keys and of centred keys at head_dim 128 (three programs per SM instead of two), none elsewhere, none
    when the caller picks the rows or warps, the caller's when given, none for one small launch."""
    from turboquant.kernels.encode import LAUNCH_DEFAULTS, EncodePlan

    cache = TurboQuantKVCache(KVCacheConfig(head_dim=d, key_bits=kb, value_bits=4), 1, 8, device="cpu", capacity=4096)
    k = torch.zeros(1, 8, 4096, d, dtype=dtype)
    bufs = {name: t for name, t in cache.buffers().items() if name in cache._buffer_specs()}
    plan = EncodePlan(k, k, bufs, key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer,
                      launch={**LAUNCH_DEFAULTS, **launch}, centred=centred, scaled=centred)  # fmt: skip
    assert plan.key_register_cap == cap
    assert "maxnreg" not in plan.key_kernel_constants  # (applied on CUDA only)


def _bad_inputs(case):
    cache, k, v, slots = _setup("prod", 3, 4, 64, "haar", False, 4, (1, 2), extra=4)
    bufs = {name: t for name, t in cache.buffers().items() if name in cache._buffer_specs()}
    kw = dict(key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer)
    if case == "head_dim":
        other = TurboQuantKVCache(KVCacheConfig(head_dim=96), 1, 2, device=DEVICE, capacity=8)
        k96 = torch.zeros(1, 2, 4, 96, device=DEVICE)
        return (k96, k96, other.buffers(), slots), dict(key_quantizer=other.key_quantizer,
                                                        value_quantizer=other.value_quantizer)  # fmt: skip
    if case == "dtype":
        k = k.to(torch.int32)
    elif case == "shape":
        v = v[:, :, :3]
    elif case == "rank":
        k, v = k[0], v[0]
    elif case == "last_dim_stride":
        k = k.transpose(2, 3).contiguous().transpose(2, 3)
    elif case == "slots_range":
        slots = slots + 5
    elif case == "slots_dtype":
        slots = slots.int()
    elif case == "slots_shape":
        slots = slots[:3]
    elif case == "missing_buffer":
        bufs = {name: t for name, t in bufs.items() if name != "key_signs"}
    elif case == "buffer_dtype":
        bufs = {**bufs, "key_norms": bufs["key_norms"].float()}
    elif case == "buffer_shape":
        bufs = {**bufs, "value_affine": bufs["value_affine"][:, :1]}
    elif case == "buffer_alignment":  # contiguous, but one float16 past a 4-byte boundary
        va = bufs["value_affine"]
        bufs = {**bufs, "value_affine": torch.empty(va.numel() + 1, dtype=va.dtype, device=DEVICE)[1:].view(va.shape)}
    elif case == "buffer_contiguous":
        bufs = {**bufs, "value_codes": bufs["value_codes"].transpose(2, 3).contiguous().transpose(2, 3)}
    elif case == "quantizer":
        kw["key_quantizer"] = cache.value_quantizer
    elif case == "quantizer_head_dim":
        kw["key_quantizer"] = TurboQuantKVCache(KVCacheConfig(head_dim=128), 1, 1, device=DEVICE).key_quantizer
    elif case == "group_size":
        kw["value_quantizer"] = ValueQuantizer(4, 3)
    elif case == "launch":
        kw["block_size"] = 32
    elif case == "search":
        kw["search"] = "binary"
    elif case == "key_mean":
        kw["key_mean"] = torch.zeros(1, 2, 32, device=DEVICE)  # [B, H_kv, D] with D = 64 expected
    elif case == "key_scale_dtype":
        kw["key_scale"] = torch.ones(1, 2, 64, device=DEVICE, dtype=torch.float16)
    return (k, v, bufs, slots), kw


BAD = {
    "head_dim": "head_dim 64, 128 or 256",
    "dtype": "float32, float16 or bfloat16",
    "shape": "same shape",
    "rank": r"\[B, H_kv, N, D\]",
    "last_dim_stride": "contiguous in its last dim",
    "slots_range": r"slots must lie in \[0, C=8\)",
    "slots_dtype": "int64",
    "slots_shape": r"shape \[N=4\]",
    "missing_buffer": "key_signs",
    "buffer_dtype": "buffer key_norms",
    "buffer_shape": "buffer value_affine",
    "buffer_contiguous": "buffer value_codes",
    "buffer_alignment": "value_affine must start at a 4-byte aligned address",
    "quantizer": "TurboQuantMSE or TurboQuantProd",
    "quantizer_head_dim": "head_dim=128",
    "group_size": "group_size=3 must divide D=64",
    "launch": "unknown launch options",
    "search": r"search must be None or one of \('full', 'symmetric', 'grid'\), got 'binary'",
    "key_mean": r"key_mean must be a contiguous float32 tensor \[B, H_kv, D\] = \(1, 2, 64\)",
    "key_scale_dtype": r"key_scale must be a contiguous float32 tensor .* got torch.float16",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_encode_rejects_bad_inputs(case):
    args, kw = _bad_inputs(case)
    with pytest.raises(ValueError, match=BAD[case]):
        encode_kv(*args, **kw)


def test_near_tie_tolerance_is_meaningful():
    """The boundary tolerance is far below the codebook's cell widths, so it cannot hide a wrong code."""
    cfg = KVCacheConfig(head_dim=128, key_bits=4)
    mse = TurboQuantKVCache(cfg, 1, 1, device=DEVICE).mse_quantizer
    assert NEAR < 1e-2 * torch.diff(mse.boundaries).min().item()
