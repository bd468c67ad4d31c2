"""Fused Triton kernels against the PyTorch reference on awkward shapes.

On a machine without a GPU these run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by
scripts/test.sh); on a GPU they run the compiled kernels.
"""

from __future__ import annotations

import contextlib
import os
import zlib

import pytest
import torch

from turboquant.cache import KVCacheConfig, TurboQuantKVCache

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

# fp16 operands in the kernel's dots (queries, centroids, values, probabilities): relative error
# ~1e-3 against the float32 reference; a wrong index, mask or scale is off by O(1).
TOL = 4e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _filled_cache(cfg, batch, h_kv, n, gen, dtype=torch.float32, steps=(None,)):
    cache = TurboQuantKVCache(cfg, batch, h_kv, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, h_kv, n, cfg.head_dim, generator=gen).to(DEVICE, dtype)
    v = torch.randn(batch, h_kv, n, cfg.head_dim, generator=gen).to(DEVICE, dtype)
    start = 0
    for step in steps:
        stop = n if step is None else min(n, start + step)
        cache.append(k[:, :, start:stop], v[:, :, start:stop])
        start = stop
    return cache


def _poison_workspaces():
    from turboquant.kernels import decode

    for o_part, l_part in decode._WORKSPACES.values():
        o_part.fill_(float("nan"))
        l_part.fill_(float("nan"))


# (key_mode, key_bits, value_bits, head_dim, GQA ratio, N_q, context)
CASES = [
    ("mse", 4, 4, 128, 4, 1, 300),
    ("mse", 3, 2, 128, 1, 1, 63),
    ("mse", 2, 4, 64, 8, 1, 15),
    ("mse", 4, 2, 64, 4, 3, 300),
    ("mse", 3, 4, 64, 1, 5, 63),
    ("mse", 2, 2, 128, 8, 16, 300),
    ("prod", 3, 2, 128, 8, 1, 300),
    ("prod", 4, 4, 128, 1, 1, 1),
    ("prod", 3, 4, 64, 4, 5, 63),
    ("prod", 4, 2, 64, 8, 1, 15),
    ("mse", 4, 4, 256, 4, 1, 300),
    ("mse", 3, 2, 256, 2, 2, 63),
    ("prod", 3, 4, 256, 1, 1, 15),
]


@pytest.mark.parametrize("mode,kb,vb,d,group,n_q,n", CASES)
def test_decode_kernel_matches_reference(mode, kb, vb, d, group, n_q, n):
    _check_decode(mode, kb, vb, d, group, n_q, n)


@pytest.mark.parametrize("mode,kb,vb,d,group,n_q,n", CASES[::3])
def test_decode_kernel_global_codebook(mode, kb, vb, d, group, n_q, n, monkeypatch):
    """The generic kernel (the 2-D kernel has no such option) with the codebook read from global memory."""
    from turboquant.kernels import decode

    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "tiles_2d", False)
    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "register_codebook", False)
    _check_decode(mode, kb, vb, d, group, n_q, n)


@pytest.mark.parametrize("mode,kb,vb,d,group,n_q,n", CASES[1::3])
def test_decode_kernel_key_major_scores(mode, kb, vb, d, group, n_q, n, monkeypatch):
    """The generic kernel (the 2-D kernel has no such option) with the score dot in key-major orientation."""
    from turboquant.kernels import decode

    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "tiles_2d", False)
    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "key_major", True)
    _check_decode(mode, kb, vb, d, group, n_q, n)


@pytest.mark.parametrize("mode,kb,vb,d,group,n_q,n", CASES[2::3])
def test_decode_kernel_64_token_blocks(mode, kb, vb, d, group, n_q, n, monkeypatch):
    """The 2-D kernel with 64-token blocks (the defaults: 256 tokens at head_dim 64 for a decode step, 128 at 128)."""
    from turboquant.kernels import decode

    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "block_n", 64)
    _check_decode(mode, kb, vb, d, group, n_q, n)


@pytest.mark.parametrize("dependent_launch", [None, "off", "wait", "early"])
@pytest.mark.parametrize("mode,kb,vb,d,group,n_q,n", CASES[1:4])
def test_decode_kernel_dependent_launch(mode, kb, vb, d, group, n_q, n, dependent_launch, monkeypatch):
    """The merge kernel as a plain launch and as a programmatic dependent launch that waits for the split kernel,
    launched when the split kernel ends or ("early") once all its programs have started (on sm_90+; elsewhere the
    plan launches it plainly)."""
    from turboquant.kernels import decode

    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "dependent_launch", dependent_launch)
    _check_decode(mode, kb, vb, d, group, n_q, n)


@pytest.mark.parametrize("mode,kb,d,vb,group_size", [("mse", 4, 256, 4, 16), ("prod", 3, 256, 2, 128),
                                                      ("mse", 2, 256, 4, 64), ("mse", 3, 128, 4, 64)])  # fmt: skip
def test_decode_kernel_value_group_sizes(mode, kb, d, vb, group_size):
    """The 2-D kernel with value groups other than 32 columns: narrower than its value tiles (head_dim 256: 64
    columns, scales per 16-column run) and as wide or wider."""
    from turboquant.kernels.decode import tiles_2d_layout

    assert tiles_2d_layout(d, kb, mode, vb, group_size) is not None
    _check_decode(mode, kb, vb, d, 4, 1, 63, group_size=group_size)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_two_d_kernel_takes_every_supported_head_dim(d):
    """2-4-bit MSE keys and 3-4-bit prod keys with 2- or 4-bit values in default groups run on the 2-D kernel at
    every head_dim the kernels support (at 256 it once fell back to the generic kernel, 2.5-5.5x slower than bf16
    on the H200)."""
    from turboquant.kernels.decode import tiles_2d_layout
    from turboquant.quantizers import default_group_size

    configs = [("mse", kb) for kb in (2, 3, 4)] + [("prod", kb) for kb in (3, 4)]
    for (mode, kb), vb in ((c, vb) for c in configs for vb in (2, 4)):
        assert tiles_2d_layout(d, kb, mode, vb, default_group_size(d)) is not None, (mode, kb, vb)


@pytest.mark.parametrize("d,vb,rows,warps,block_n", [(64, 2, 16, 2, 128), (64, 2, 64, 4, 128), (64, 4, 16, 4, 256),
                                                      (128, 2, 16, 4, 128), (256, 2, 16, 4, 64)])  # fmt: skip
def test_two_d_kernel_warps_per_configuration(d, vb, rows, warps, block_n):
    """16-column value chunks (2-bit values at head_dim 64) in a decode step run on 2 warps, one per 8-column half of
    each P·V product (on 4, two warps computed each half); the rest on 4; a block size given alone takes 4."""
    from turboquant.kernels.decode import LAUNCH_DEFAULTS, kernel_2d_constants, tiles_2d_layout

    layout = tiles_2d_layout(d, 3, "mse", vb, 32)
    consts = kernel_2d_constants(d, layout, vb, 32, True, rows, dict(LAUNCH_DEFAULTS), True, None)
    assert (consts["num_warps"], consts["BN"], consts["maxnreg"]) == (warps, block_n, 168)
    given = kernel_2d_constants(d, layout, vb, 32, True, rows, dict(LAUNCH_DEFAULTS, block_n=64), True, None)
    assert (given["num_warps"], given["BN"]) == (4, 64)


@pytest.mark.parametrize("mode,kb,vb,d,group,n_q,n", CASES[::2])
def test_decode_kernel_tables_in_assembly(mode, kb, vb, d, group, n_q, n, monkeypatch):
    """Key lookup tables written into the inline assembly (launch option key_table_source="immediates"; on the GPU: the
    interpreter runs the portable lookup either way)."""
    from turboquant.kernels import decode

    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "key_table_source", "immediates")
    _check_decode(mode, kb, vb, d, group, n_q, n)


@pytest.mark.parametrize("mode,kb,vb", [("mse", 4, 4), ("mse", 3, 2), ("prod", 3, 2)])
def test_decode_kernel_dense_launch(mode, kb, vb, monkeypatch):
    """The denser launch DecodePlan takes for grids that fill the default's waves badly (decode.DENSE_LAUNCH: four
    programs per SM, fewer registers and stages) computes the same attention."""
    from turboquant.kernels import decode

    for name, value in decode.DENSE_LAUNCH.items():
        monkeypatch.setitem(decode.LAUNCH_DEFAULTS, name, value)
    _check_decode(mode, kb, vb, 128, 4, 1, 300)


@pytest.mark.parametrize(
    "batch,context,dense",
    [(32, 8192, True), (64, 8192, True), (128, 8192, False), (16, 65536, False), (8, 32768, False),
     (1, 131072, False), (1, 8192, False)],
)  # fmt: skip
def test_dense_launch_where_the_default_waves_leave_slots_idle(batch, context, dense):
    """DecodePlan's choice on an H200 (132 SMs, three programs per SM by default, four with DENSE_LAUNCH; H_kv = 8,
    128-token blocks): the denser launch where it measured faster ((32, 8192): 256 heads fill 65% of the default's
    396 slots and 97% of the denser launch's 528 with two splits each; (64, 8192): 512 heads, 1.3 waves against
    0.97), the default where it did."""
    from turboquant.kernels.decode import DENSE_RATE, slot_use

    heads = batch * 8
    use, dense_use = (slot_use(heads, context, 128, per_sm * 132) for per_sm in (3, 4))
    assert (dense_use * DENSE_RATE > use) == dense


@pytest.mark.parametrize("source", ["operands", "immediates"])
def test_decode_kernel_launch_options_beside_cache_inputs(source):
    """Launch options passed as keywords next to the cache's decode_inputs (what benchmarks/decode.py does)."""
    from turboquant.kernels.decode import decode_attention

    gen = torch.Generator().manual_seed(11)
    cfg = KVCacheConfig(head_dim=64, key_bits=4, value_bits=4, chunk_size=64)
    cache = _filled_cache(cfg, 2, 2, 40, gen)
    q = torch.randn(2, 8, 1, 64, generator=gen).to(DEVICE)
    ref, _ = cache.attend_with_lse(q, backend="reference")
    inputs = cache.decode_inputs(q.reshape(2, 2, 4, 64), 1, 64**-0.5)
    out, _ = decode_attention(**inputs, key_table_source=source, num_stages=2)
    assert _rel(out.reshape(ref.shape), ref) < TOL


def test_decode_kernel_rejects_misaligned_value_scales():
    """The (scale, zero) pairs are read as 4-byte words: a contiguous buffer one float16 past a 4-byte boundary is
    refused by name, not read misaligned."""
    from turboquant.kernels.decode import decode_attention

    gen = torch.Generator().manual_seed(13)
    cache = _filled_cache(KVCacheConfig(head_dim=64, key_bits=4, value_bits=4), 1, 1, 8, gen)
    inputs = cache.decode_inputs(torch.randn(1, 1, 1, 64, generator=gen).to(DEVICE), 1, 0.125)
    va = inputs["buffers"]["value_affine"]
    shifted = torch.empty(va.numel() + 1, dtype=va.dtype, device=va.device)[1:].view(va.shape)
    shifted.copy_(va)
    inputs["buffers"] = {**inputs["buffers"], "value_affine": shifted}
    with pytest.raises(ValueError, match="value_affine must start at a 4-byte aligned address"):
        decode_attention(**inputs)


def test_decode_kernel_rejects_unknown_launch_values():
    from turboquant.kernels.decode import decode_attention

    gen = torch.Generator().manual_seed(12)
    cache = _filled_cache(KVCacheConfig(head_dim=64, key_bits=4, value_bits=4), 1, 1, 8, gen)
    inputs = cache.decode_inputs(torch.randn(1, 1, 1, 64, generator=gen).to(DEVICE), 1, 0.125)
    with pytest.raises(
        ValueError, match=r"key_table_source must be one of \('operands', 'immediates'\), got 'registers'"
    ):
        decode_attention(**inputs, key_table_source="registers")
    expected = r"dependent_launch must be None \(automatic\) or one of \('off', 'wait', 'early'\), got 'late'"
    with pytest.raises(ValueError, match=expected):
        decode_attention(**inputs, dependent_launch="late")


def test_decode_kernel_window_arguments_are_checked():
    """decode_attention's window: attended in an exact step only, and its rows and positions named when malformed."""
    from turboquant.kernels.decode import decode_attention

    gen = torch.Generator().manual_seed(14)
    cache = _filled_cache(KVCacheConfig(head_dim=64, key_bits=4, value_bits=4), 2, 1, 8, gen)
    inputs = cache.decode_inputs(torch.randn(2, 1, 1, 64, generator=gen).to(DEVICE), 1, 0.125)
    rows = torch.zeros(2, 1, 5, 64, device=DEVICE)
    start = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    exact = (inputs["q_rot"].clone(), rows[:, :, :1], rows[:, :, :1])
    with pytest.raises(ValueError, match="a window is attended in an exact step only"):
        decode_attention(**inputs, window=(rows, rows, start, start))
    with pytest.raises(ValueError, match=r"window v must be a contiguous \[B, H_kv, W, D\] = \[2, 1, W, 64\]"):
        decode_attention(**inputs, exact=exact, window=(rows, rows[:, :, :4].contiguous(), start, start))
    with pytest.raises(ValueError, match=r"window lower must be an int tensor \[B\] = \[2\]"):
        decode_attention(**inputs, exact=exact, window=(rows, rows, start, start[:1]))


def _check_decode(mode, kb, vb, d, group, n_q, n, **config):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((mode, kb, vb, d, group, n_q, n, config)).encode()))
    cfg = KVCacheConfig(head_dim=d, key_bits=kb, value_bits=vb, key_mode=mode, chunk_size=64, **config)
    cache = _filled_cache(cfg, 2, 2, n, gen)
    q = torch.randn(2, 2 * group, n_q, d, generator=gen).to(DEVICE)
    _poison_workspaces()
    ref_out, ref_lse = cache.attend_with_lse(q, backend="reference")
    out, lse = cache.attend_with_lse(q, backend="triton")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _rel(out, ref_out) < TOL
    assert (lse - ref_lse).abs().max().item() < 1e-2


def test_decode_plans_follow_the_buffers():
    """The cache's launch plans, kept across steps, are rebuilt when the buffers grow or the batch is selected,
    and never hold replaced buffers (which would keep their memory alive)."""
    gen = torch.Generator().manual_seed(13)
    cfg = KVCacheConfig(head_dim=64, key_bits=4, value_bits=2, chunk_size=16)
    cache = _filled_cache(cfg, 3, 2, 10, gen)
    k = torch.randn(3, 2, 40, 64, generator=gen).to(DEVICE)
    v = torch.randn(3, 2, 40, 64, generator=gen).to(DEVICE)
    for step in range(3):  # attends at 10, 11 and 27 tokens, the last after the buffers grew from 16 slots to 32
        q = torch.randn(3, 8, 1, 64, generator=gen).to(DEVICE)
        assert _rel(cache.attend(q, backend="triton"), cache.attend(q, backend="reference")) < TOL
        n = 16 if step == 1 else 1
        cache.append(k[:, :, :n], v[:, :, :n])
        k, v = k[:, :, n:], v[:, :, n:]
    cache.select_batch(torch.tensor([2, 0], device=DEVICE))
    assert not cache._decode_plans
    q = torch.randn(2, 8, 1, 64, generator=gen).to(DEVICE)
    assert _rel(cache.attend(q, backend="triton"), cache.attend(q, backend="reference")) < TOL
    (plan,) = cache._decode_plans.values()
    assert all(t is getattr(cache, name) for name, t in plan.buffers.items())


@pytest.mark.parametrize("window", [0, 16])
def test_decode_kernel_with_window_and_steps(window):
    """Appended in steps, with a full-precision window merged after the kernel."""
    gen = torch.Generator().manual_seed(7)
    cfg = KVCacheConfig(head_dim=64, key_bits=3, value_bits=2, residual_window=window, flush_block=8, chunk_size=32)
    cache = _filled_cache(cfg, 3, 1, 100, gen, steps=(1, 15, 63, None))
    q = torch.randn(3, 4, 2, 64, generator=gen).to(DEVICE)
    ref = cache.attend(q, backend="reference")
    out = cache.attend(q, backend="triton")
    assert _rel(out, ref) < TOL


def test_decode_kernel_ring_after_wrap():
    gen = torch.Generator().manual_seed(3)
    cfg = KVCacheConfig(head_dim=64, key_bits=4, value_bits=4, ring_window=40)
    cache = _filled_cache(cfg, 1, 2, 100, gen, steps=(30, 30, None))
    q = torch.randn(1, 8, 1, 64, generator=gen).to(DEVICE)
    assert _rel(cache.attend(q, backend="triton"), cache.attend(q, backend="reference")) < TOL


def test_decode_kernel_bf16_cache_and_query():
    gen = torch.Generator().manual_seed(11)
    cfg = KVCacheConfig(head_dim=128, key_bits=4, value_bits=4)
    cache = _filled_cache(cfg, 1, 2, 200, gen, dtype=torch.bfloat16)
    q = torch.randn(1, 8, 1, 128, generator=gen).to(DEVICE, torch.bfloat16)
    out = cache.attend(q, backend="triton")
    assert out.dtype == torch.bfloat16
    assert _rel(out, cache.attend(q, backend="reference")) < 1e-2  # bf16 output rounding (2^-8)


def test_decode_kernel_rejects_unsupported_head_dim():
    gen = torch.Generator().manual_seed(0)
    cfg = KVCacheConfig(head_dim=96, key_bits=4, value_bits=4)
    cache = _filled_cache(cfg, 1, 1, 8, gen)
    q = torch.randn(1, 1, 1, 96, generator=gen).to(DEVICE)
    from turboquant.kernels.decode import decode_attention

    with pytest.raises(ValueError, match="head_dim other than 64/128/256"):
        cache.attend(q, backend="triton")
    with pytest.raises(ValueError, match="head_dim 64, 128 or 256"):
        decode_attention(**cache.decode_inputs(q.float().reshape(1, 1, 1, 96), 1, 96**-0.5))


@pytest.mark.parametrize(
    "key_mode,key_bits,value_bits,head_dim,group,context",
    [("mse", 4, 4, 128, 4, 63), ("mse", 3, 2, 64, 8, 15), ("prod", 3, 2, 64, 1, 300)],
)
def test_fused_decode_step_with_its_own_exact_token(key_mode, key_bits, value_bits, head_dim, group, context):
    """attend_and_append with N = 1 on the kernel (the token's exact k, v merged inside the merge kernel)
    equals softmax attention over the dequantized cache plus the exact token, computed independently."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{key_mode}{key_bits}{value_bits}{head_dim}".encode()))
    cfg = KVCacheConfig(head_dim=head_dim, key_bits=key_bits, value_bits=value_bits, key_mode=key_mode)
    h_kv = 2
    cache = _filled_cache(cfg, 2, h_kv, context, gen)
    for _ in range(2):  # two steps: the first token is stored by the first step and read by the second
        q = torch.randn(2, h_kv * group, 1, head_dim, generator=gen).to(DEVICE)
        k_new = torch.randn(2, h_kv, 1, head_dim, generator=gen).to(DEVICE)
        v_new = torch.randn(2, h_kv, 1, head_dim, generator=gen).to(DEVICE)
        k_old, v_old = cache.dequantize()
        keys = torch.cat((k_old.float(), k_new), dim=2).repeat_interleave(group, dim=1)
        values = torch.cat((v_old.float(), v_new), dim=2).repeat_interleave(group, dim=1)
        weights = torch.softmax((q @ keys.transpose(-1, -2)) / head_dim**0.5, dim=-1)
        expected = weights @ values
        _poison_workspaces()
        out = cache.attend_and_append(q, k_new, v_new, backend="triton")
        assert _rel(out, expected) < TOL
    assert cache.total_tokens == context + 2


@pytest.mark.parametrize(
    "mode,kb,vb,d,causal,tiles_2d,max_rows",
    [
        ("mse", 4, 4, 128, True, True, 16),
        ("mse", 4, 4, 128, True, True, 8),  # 8 rows per program in tiles of 16: the padding rows dropped
        ("prod", 3, 2, 64, False, True, 16),
        ("prod", 3, 2, 64, False, True, 8),
        ("mse", 3, 3, 64, True, False, 16),  # 3-bit values: the generic kernel
    ],
)
def test_query_rows_beyond_one_program(mode, kb, vb, d, causal, tiles_2d, max_rows, monkeypatch):
    """A chunk of queries with more rows (G·N_q) than one program holds (MAX_ROWS, lowered to 16 or 8 here) is split
    over programs along a third grid axis; each tile's rows see their own causal limits (a prompt chunk attending to
    its own cached tokens) or none (after=True: a new prompt attending to the compressed past). With 8 rows per
    program, the 2-D kernel's tiles hold 16 (the tensor cores' least): the partial results of rows 8-15 of a tile
    must not land on the next program's rows."""
    from turboquant.kernels import decode

    monkeypatch.setattr(decode, "MAX_ROWS", max_rows)
    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "tiles_2d", tiles_2d)
    gen = torch.Generator().manual_seed(zlib.crc32(repr((mode, kb, vb, d, causal)).encode()))
    cfg = KVCacheConfig(head_dim=d, key_bits=kb, value_bits=vb, key_mode=mode, chunk_size=64)
    cache = _filled_cache(cfg, 2, 2, 150, gen)
    q = torch.randn(2, 8, 11, d, generator=gen).to(DEVICE)  # G = 4: 44 rows, three programs of 16 (or six of 8)
    _poison_workspaces()
    kw = dict(causal=True) if causal else dict(after=True)
    ref_out, ref_lse = cache.attend_with_lse(q, backend="reference", **kw)
    out, lse = cache.attend_with_lse(q, backend="triton", **kw)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert _rel(out, ref_out) < TOL
    assert (lse - ref_lse).abs().max().item() < 1e-2


def test_workspaces_are_bounded_and_plans_keep_theirs(monkeypatch):
    """Chunks of many lengths do not pile up workspaces (least recently used forgotten beyond MAX_WORKSPACES or
    MAX_WORKSPACE_BYTES); a cache's kept plan still holds its own, so attending again with an earlier length stays
    right."""
    from turboquant.kernels import decode

    monkeypatch.setattr(decode, "MAX_WORKSPACES", 2)
    monkeypatch.setattr(decode, "_WORKSPACES", type(decode._WORKSPACES)())
    gen = torch.Generator().manual_seed(7)
    cfg = KVCacheConfig(head_dim=64, key_bits=4, value_bits=4, chunk_size=64)
    cache = _filled_cache(cfg, 1, 2, 70, gen)
    queries = {n_q: torch.randn(1, 8, n_q, 64, generator=gen).to(DEVICE) for n_q in (1, 5, 9)}  # 16, 32, 64 rows
    for n_q in (1, 5, 9, 1):
        ref, _ = cache.attend_with_lse(queries[n_q], backend="reference", after=True)
        out, _ = cache.attend_with_lse(queries[n_q], backend="triton", after=True)
        assert _rel(out, ref) < TOL
        assert len(decode._WORKSPACES) <= 2
    monkeypatch.setattr(decode, "MAX_WORKSPACES", 16)
    monkeypatch.setattr(decode, "MAX_WORKSPACE_BYTES", 1)  # every new shape evicts the others, never itself
    cache._drop_plans()  # (new plans look their workspaces up again: held now, 32 and 64 rows; made, 16 and 64)
    for n_q in (1, 9):
        out, _ = cache.attend_with_lse(queries[n_q], backend="triton", after=True)
        assert len(decode._WORKSPACES) == 1


def test_launches_enter_the_cache_device(monkeypatch):
    """Every launch of the encode and the decode (split kernel and merge) runs inside on_device(the cache's device),
    which makes a CUDA device current only where it is not (Triton launches on the current device)."""
    from turboquant.kernels import decode, encode, launch

    assert isinstance(launch.on_device(torch.device("cpu")), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(launch.on_device(torch.device("cuda", 0)), contextlib.nullcontext)
    assert isinstance(launch.on_device(torch.device("cuda", 1)), torch.cuda.device)
    monkeypatch.undo()

    gen = torch.Generator().manual_seed(9)
    cache = _filled_cache(KVCacheConfig(head_dim=64, key_bits=4, value_bits=4), 1, 2, 40, gen)
    buffers = {name: t for name, t in cache.buffers().items() if name in cache._buffer_specs()}
    entered, inside = [], []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        inside.append(device)
        yield
        inside.pop()

    launches = []

    def launched(kernel):  # a kernel whose launches check that a recording context is open
        class Recorded:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    assert inside == [cache.device], kernel.__name__
                    launches.append(kernel.__name__)
                    return kernel[grid](*args, **kwargs)

                return run

            def __getattr__(self, name):  # warmup (the occupancy query on CUDA) and the rest: the kernel's own
                return getattr(kernel, name)

        return Recorded()

    for module in (decode, encode):
        monkeypatch.setattr(module, "on_device", recording)
    for name in ("_decode_split_kernel_2d", "_decode_split_kernel", "_merge_splits_kernel"):
        monkeypatch.setattr(decode, name, launched(getattr(decode, name)))
    for name in ("_encode_keys_kernel", "_encode_values_kernel", "_encode_kv_kernel"):
        monkeypatch.setattr(encode, name, launched(getattr(encode, name)))
    for n, small_rows in ((1, 1024), (40, 0)):  # one launch (a decode step's token), then keys and values apart
        k, v = (torch.randn(1, 2, n, 64, generator=gen).to(DEVICE) for _ in range(2))
        encode.encode_kv(k, v, buffers, torch.arange(n, device=DEVICE), key_quantizer=cache.key_quantizer,
                         value_quantizer=cache.value_quantizer, small_rows=small_rows)  # fmt: skip
    cache.attend_with_lse(torch.randn(1, 4, 1, 64, generator=gen).to(DEVICE), backend="triton")
    assert launches == ["_encode_kv_kernel", "_encode_keys_kernel", "_encode_values_kernel",
                        "_decode_split_kernel_2d", "_merge_splits_kernel"]  # fmt: skip
    assert len(entered) >= 3  # (on CUDA the decode plan's occupancy query enters it too)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the cache on one, the other current)")
def test_kernels_launch_on_the_cache_device():
    """Triton launches on the current device: a cache on cuda:1 while cuda:0 is current (a model split over GPUs)
    must still encode and attend on cuda:1, as the reference does."""
    gen = torch.Generator().manual_seed(8)
    cfg = KVCacheConfig(head_dim=128, key_bits=4, value_bits=4)
    with torch.cuda.device(0):
        fused = TurboQuantKVCache(cfg, 2, 2, device="cuda:1", dtype=torch.bfloat16)
        reference = TurboQuantKVCache(cfg, 2, 2, device="cpu", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, 300, 128, generator=gen).to(torch.bfloat16) for _ in range(2))
        fused.append(k.to("cuda:1"), v.to("cuda:1"))  # the fused encode
        reference.append(k, v)
        differ = (fused.key_codes.cpu() != reference.key_codes).float().mean().item()
        assert differ < 1e-3  # codes equal but for keys within float rounding of a boundary (tests/test_encode_kernel)
        q = torch.randn(2, 8, 1, 128, generator=gen)
        out, _ = fused.attend_with_lse(q.to("cuda:1"), backend="triton")
        ref, _ = reference.attend_with_lse(q, backend="reference")
        assert _rel(out.cpu(), ref) < TOL


@pytest.mark.parametrize("value_bits", [4, 2])
def test_long_splits(value_bits):
    """One program per (sequence, head) walking many tokens (on a GPU: 288 programs fill the grid, so each
    walks 16k tokens): the value sums must not lose precision as they grow (fp16 products, fp32 sums)."""
    gen = torch.Generator().manual_seed(value_bits)
    cfg = KVCacheConfig(head_dim=64, key_bits=4, value_bits=value_bits)
    batch, h_kv, n = (9, 32, 16384) if DEVICE == "cuda" else (1, 1, 600)
    cache = TurboQuantKVCache(cfg, batch, h_kv, device=DEVICE, dtype=torch.float32)
    k = (0.3 * torch.randn(batch, h_kv, n, 64, generator=gen)).to(DEVICE)
    cache.append(k, torch.randn(batch, h_kv, n, 64, generator=gen).to(DEVICE))
    q = (0.3 * torch.randn(batch, h_kv * 4, 1, 64, generator=gen)).to(DEVICE)
    ref, _ = cache.attend_with_lse(q, backend="reference")
    out, _ = cache.attend_with_lse(q, backend="triton")
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize(
    "key_mode,scale_keys,prompt,pads,sinks,d",
    [("mse", False, 40, 9, 4, 64), ("prod", False, 40, 9, 4, 64), ("mse", True, 40, 9, 4, 64),
     ("prod", True, 40, 9, 4, 64), ("mse", True, 3, 2, 4, 64), ("prod", True, 40, 9, 0, 64),
     ("mse", True, 300, 9, 4, 256)],  # a Gemma-3 head: the prompt (1200 rows) takes the long encode launch
)  # fmt: skip
def test_fused_decode_step_with_sinks_and_centred_keys(key_mode, scale_keys, prompt, pads, sinks, d):
    """The fused single-token step with exact sink tokens (merged in the kernel), centred (and scaled) keys, norm
    correction and left padding (the transformers cache's options) equals the reference path (store attention,
    then merges by log-sum-exp); a short padded prompt leaves sequence 1 with fewer real tokens than sinks. The
    merge centres the step's own key (and the sinks') in the kernel, with or without sinks."""
    gen = torch.Generator().manual_seed(7)
    cfg = KVCacheConfig(head_dim=d, key_bits=4 if key_mode == "mse" else 3, value_bits=4, key_mode=key_mode,
                        sink_tokens=sinks, center_keys=True, scale_keys=scale_keys, norm_correction=True)  # fmt: skip
    caches = [TurboQuantKVCache(cfg, 2, 2, device=DEVICE, dtype=torch.float32) for _ in range(2)]
    k = (1.5 + torch.randn(2, 2, prompt, d, generator=gen)).to(DEVICE)  # a common offset: centring matters
    k = k * torch.logspace(-1, 1, d).to(DEVICE)  # unequal channels: scaling matters
    v = torch.randn(2, 2, prompt, d, generator=gen).to(DEVICE)
    q0 = torch.randn(2, 8, prompt, d, generator=gen).to(DEVICE)
    valid = torch.ones(2, prompt, dtype=torch.bool)
    valid[1, :pads] = False  # left padding: sequence 1's sinks start at position `pads`
    for cache in caches:
        cache.append(k, v, valid=valid.to(DEVICE), queries=q0)
        assert (cache.key_scale is not None) == scale_keys
    for _ in range(5 if prompt < 4 else 2):  # short prompt: steps that fill the sinks
        q = torch.randn(2, 8, 1, d, generator=gen).to(DEVICE)
        k_new = (1.5 + torch.randn(2, 2, 1, d, generator=gen)).to(DEVICE)
        v_new = torch.randn(2, 2, 1, d, generator=gen).to(DEVICE)
        _poison_workspaces()
        fused = caches[0].attend_and_append(q, k_new, v_new, backend="triton")
        ref = caches[1].attend_and_append(q, k_new, v_new, backend="reference")
        assert _rel(fused, ref) < TOL


@pytest.mark.parametrize(
    "key_mode,prompt,pads,sinks,ring,d,window,flush",
    [("mse", 40, 9, 4, None, 64, 8, 4), ("prod", 40, 9, 0, None, 64, 8, 4), ("mse", 3, 2, 4, None, 64, 8, 4),
     ("mse", 40, 0, 0, 24, 64, 6, 1), ("mse", 30, 5, 4, None, 128, 8, 4), ("mse", 12, 3, 4, None, 64, 40, 16),
     ("mse", 100, 3, 4, None, 64, 72, 16), ("mse", 30, 5, 4, None, 256, 40, 4)],
)  # fmt: skip
def test_fused_decode_step_with_window(key_mode, prompt, pads, sinks, ring, d, window, flush):
    """The fused single-token step with a full-precision window (its rows merged in the merge kernel, as a cache
    with residual_window takes it) equals the reference path over steps that flush the window: left padding and
    sinks below the window's first attended row (a short prompt leaves pads and sinks inside the window), centred
    and scaled keys, a ring with its window flushed one token at a time (a sliding-window layer), a window whose
    rows grow during the steps (16 -> 32 of its 55), and windows of more rows than a step of the merge kernel's loop
    over them (87 rows at head_dim 64 and 43 at 256: WINDOW_ROWS = 32, three and two steps)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{key_mode}{prompt}{pads}{sinks}{ring}{window}".encode()))
    cfg = KVCacheConfig(head_dim=d, key_bits=4 if key_mode == "mse" else 3, value_bits=4, key_mode=key_mode,
                        sink_tokens=sinks, center_keys=True, scale_keys=True, norm_correction=True,
                        residual_window=window, flush_block=flush, ring_window=ring)  # fmt: skip
    caches = [TurboQuantKVCache(cfg, 2, 2, device=DEVICE, dtype=torch.float32) for _ in range(2)]
    k = (1.5 + torch.randn(2, 2, prompt, d, generator=gen)).to(DEVICE)
    v = torch.randn(2, 2, prompt, d, generator=gen).to(DEVICE)
    q0 = torch.randn(2, 8, prompt, d, generator=gen).to(DEVICE)
    valid = torch.ones(2, prompt, dtype=torch.bool)
    valid[1, :pads] = False
    for cache in caches:
        cache.append(k, v, valid=valid.to(DEVICE), queries=q0)
    sliding = None if ring is None else ring + window + 1  # what the ring and the window hold, and the query
    fused_steps = []
    take_fused = caches[0]._fused_step
    caches[0]._fused_step = lambda *args: fused_steps.append(1) or take_fused(*args)
    compressed, rows = {caches[0].num_compressed}, {caches[0].buffers()["window_k"].shape[2]}
    for _ in range(10):  # crosses flushes of the window
        q = torch.randn(2, 8, 1, d, generator=gen).to(DEVICE)
        k_new = (1.5 + torch.randn(2, 2, 1, d, generator=gen)).to(DEVICE)
        v_new = torch.randn(2, 2, 1, d, generator=gen).to(DEVICE)
        _poison_workspaces()
        fused = caches[0].attend_and_append(q, k_new, v_new, sliding_window=sliding, backend="triton")
        ref = caches[1].attend_and_append(q, k_new, v_new, sliding_window=sliding, backend="reference")
        assert _rel(fused, ref) < TOL
        compressed.add(caches[0].num_compressed)
        rows.add(caches[0].buffers()["window_k"].shape[2])
    assert len(fused_steps) == 10 and caches[0].num_compressed == caches[1].num_compressed
    assert len(compressed) > 1 or len(rows) > 1  # the window flushed, or (the last case) its rows grew
    for a, b in zip(caches[0].dequantize(), caches[1].dequantize(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dependent_launch,dtype", [("off", torch.float32), ("wait", torch.float32),
                                                    ("early", torch.float32), (None, torch.bfloat16)])  # fmt: skip
def test_fused_step_rows_before_the_merge_waits(dependent_launch, dtype, monkeypatch):
    """The window's merge kernel (_merge_window_kernel: one program per KV head's query rows) attends the step's own
    token, the sinks and the window before it waits for the split kernel (as its programmatic dependent on sm_90+,
    launched when the split kernel ends or once its programs have started): centred keys, a window of several tiles,
    a split count above one, float32 and bf16 caches (products in tf32x3, or in two bf16 parts of the query and of
    the probabilities), every launch mode equal to the reference path."""
    from turboquant.kernels import decode

    monkeypatch.setitem(decode.LAUNCH_DEFAULTS, "dependent_launch", dependent_launch)
    gen = torch.Generator().manual_seed(23)
    cfg = KVCacheConfig(head_dim=64, key_bits=4, value_bits=4, sink_tokens=4, center_keys=True,
                        norm_correction=True, residual_window=72, flush_block=16, chunk_size=64)  # fmt: skip
    caches = [TurboQuantKVCache(cfg, 1, 2, device=DEVICE, dtype=dtype) for _ in range(2)]
    k = (1.5 + torch.randn(1, 2, 400, 64, generator=gen)).to(DEVICE, dtype)
    v = torch.randn(1, 2, 400, 64, generator=gen).to(DEVICE, dtype)
    for cache in caches:
        cache.append(k, v)
    for _ in range(3):
        q = torch.randn(1, 8, 1, 64, generator=gen).to(DEVICE, dtype)
        k_new = (1.5 + torch.randn(1, 2, 1, 64, generator=gen)).to(DEVICE, dtype)
        v_new = torch.randn(1, 2, 1, 64, generator=gen).to(DEVICE, dtype)
        _poison_workspaces()
        fused = caches[0].attend_and_append(q, k_new, v_new, backend="triton")
        ref = caches[1].attend_and_append(q.float(), k_new.float(), v_new.float(), backend="reference")
        assert _rel(fused, ref) < (TOL if dtype == torch.float32 else 1e-2)  # (bf16 output rounding, 2^-8)
    (plan,) = caches[0]._decode_plans.values()
    assert plan._merge_kernel is decode._merge_window_kernel
    assert plan._merge_consts["NUM_SPLITS"] > 1 and plan._merge_consts["WINDOW"] < caches[0].window_k.shape[2]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_attend_step_is_the_attention_of_attend_and_append(backend):
    """attend_step returns what attend_and_append returns (a first chunk, padded steps, single tokens on the fused
    path, a multi-token step, a step that flushes the window) and leaves the cache as it was."""
    gen = torch.Generator().manual_seed(31)
    cfg = KVCacheConfig(head_dim=64, key_bits=4, value_bits=4, sink_tokens=2, center_keys=True, scale_keys=True,
                        norm_correction=True, residual_window=8, flush_block=4)  # fmt: skip
    caches = [TurboQuantKVCache(cfg, 2, 2, device=DEVICE, dtype=torch.float32) for _ in range(2)]
    for n in (20, 1, 1, 3, 1, 5):
        q = torch.randn(2, 8, n, 64, generator=gen).to(DEVICE)
        k, v = (torch.randn(2, 2, n, 64, generator=gen).to(DEVICE) for _ in range(2))
        valid = torch.ones(2, n, dtype=torch.bool, device=DEVICE)
        if n == 20:
            valid[1, :6] = False
        before = [t.clone() for t in caches[0].dequantize()], caches[0].total_tokens
        alone = caches[0].attend_step(q, k, v, valid=valid, backend=backend)
        after = caches[0].dequantize(), caches[0].total_tokens
        assert after[1] == before[1] and all(torch.equal(a, b) for a, b in zip(after[0], before[0], strict=True))
        stepped = caches[1].attend_and_append(q, k, v, valid=valid, backend=backend)
        assert torch.equal(alone, stepped)
        caches[0].append(k, v, valid=valid, queries=q)


@pytest.mark.parametrize(
    "key_mode,d,group,window,sinks,prompt,pads,steps",
    [("mse", 64, 4, 8, 4, 30, 5, (3, 2, 5, 1, 4)), ("prod", 64, 1, 0, 0, 30, 0, (5, 2)),
     ("mse", 128, 4, 6, 4, 30, 0, (16, 9)), ("mse", 64, 8, 0, 4, 30, 3, (2, 7)), ("mse", 64, 1, 8, 4, 3, 2, (3, 2, 4))],
)  # fmt: skip
def test_fused_multi_token_steps(key_mode, d, group, window, sinks, prompt, pads, steps):
    """Steps of N > 1 tokens (speculative verification) take the fused path with their own tokens merged causally
    in the merge kernel (query i sees the step's tokens 0 .. i), beside sinks, left padding below them and a window
    that flushes between steps, and equal the reference path (store by the reference attention, the chunk by
    SDPA, merged by log-sum-exp); GQA 1, 4 and 8, 16 tokens at GQA 4 (64 query rows), and a prompt of one real token
    whose sinks fill during the steps. After a padded prompt the steps pass their (all-true) padding masks, as a
    model does: every sequence has started, so they still take the fused path."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{key_mode}{d}{group}{window}{steps}".encode()))
    cfg = KVCacheConfig(head_dim=d, key_bits=4 if key_mode == "mse" else 3, value_bits=4, key_mode=key_mode,
                        sink_tokens=sinks, center_keys=True, scale_keys=True, norm_correction=True,
                        residual_window=window, flush_block=4)  # fmt: skip
    caches = [TurboQuantKVCache(cfg, 2, 2, device=DEVICE, dtype=torch.float32) for _ in range(2)]
    k = (1.5 + torch.randn(2, 2, prompt, d, generator=gen)).to(DEVICE)
    v = torch.randn(2, 2, prompt, d, generator=gen).to(DEVICE)
    q0 = torch.randn(2, 2 * group, prompt, d, generator=gen).to(DEVICE)
    valid = torch.ones(2, prompt, dtype=torch.bool)
    valid[1, :pads] = False
    for cache in caches:
        cache.append(k, v, valid=valid.to(DEVICE), queries=q0)
    fused_steps = []
    take_fused = caches[0]._fused_step
    caches[0]._fused_step = lambda *args: fused_steps.append(args[0].shape[2]) or take_fused(*args)
    for n in steps:
        q = torch.randn(2, 2 * group, n, d, generator=gen).to(DEVICE)
        k_new = (1.5 + torch.randn(2, n, 2, d, generator=gen)).to(DEVICE).transpose(1, 2)  # as a model's view
        v_new = torch.randn(2, n, 2, d, generator=gen).to(DEVICE).transpose(1, 2)
        mask = torch.ones(2, n, dtype=torch.bool, device=DEVICE) if pads else None
        _poison_workspaces()
        fused = caches[0].attend_and_append(q, k_new, v_new, valid=mask, backend="triton")
        ref = caches[1].attend_and_append(q, k_new, v_new, valid=mask, backend="reference")
        assert _rel(fused, ref) < TOL
        # the step's own tokens in causal order: the first query's output does not depend on the later tokens
        assert _rel(fused[:, :, :1], ref[:, :, :1]) < TOL
    assert fused_steps == list(steps)
    for a, b in zip(caches[0].dequantize(), caches[1].dequantize(), strict=True):
        assert torch.equal(a, b)
