"""Fused quantize-on-write: new K/V tokens straight into the compressed cache rows (Triton).

What the encode computes (the reference is ``TurboQuantKVCache._encode``, i.e.
``TurboQuantMSE.quantize`` / ``TurboQuantProd.quantize`` / ``ValueQuantizer.quantize`` followed by
``packing.pack_key_codes`` and ``packing.pack_planar``), reading each input row once and writing nothing but the
packed rows:

- keys, TurboQuant (arXiv:2504.19874) Algorithm 1: norm ‖x‖, unit vector u = x / ‖x‖, rotation
  y = u Πᵀ (a dense tl.dot for both the Haar and the randomized-Hadamard Π), index of the nearest
  centroid of √d·y (a count of the decision boundaries, the midpoints of the sorted centroids,
  that it exceeds: ``torch.bucketize``; for 3- and 4-bit MSE keys by one lookup in a table of bins that hold
  one boundary each, ``grid_table``, and one comparison), optionally the corrected norm ‖x‖ / ‖c[idx] / √d‖;
- prod keys, Algorithm 2: the residual r = x - Πᵀ ŷ, ŷ = c[idx] · fp16(norm) / √d, handled in
  the rotated basis, Π r = ‖x‖·y - ŷ, so that S r = (Π r)(Π Sᵀ) with Π Sᵀ precomputed; the
  stored bits are sign(S r) >= 0 and γ = ‖r‖ (the residual of x itself, not of the unit vector,
  as the reference stores it);
- values: per group of g coordinates, zero = fp16(min), scale = fp16((max - min) / (2^b - 1)),
  code = round_half_even((x - zero) / scale) clamped to [0, 2^b - 1] (0 where scale = 0);
- every index plane packed in the planar layout of ``pack_planar`` (3 bits = a 2-bit plane then
  a 1-bit plane; key indices as the key rows of ``packing.pack_key_codes``, sign-magnitude at 4 bits) and
  stored at slot ``slots[n]`` of every (batch, head).

Two launches, one pass over each input: grid (cdiv(B·H·N, BN),) over the flattened
(batch, head, token) rows, one for the keys and one for the values (so the light value programs
do not inherit the key programs' registers and shared memory); a small chunk (a decode step) takes
one launch whose programs do both. The rotation is computed in column
chunks of DC: chunk j of Πᵀ ([D, DC]) is loaded once per program, and the indices of chunk j are
OR-ed into the bytes of the planar fields it covers, so no [D, D] operand is held at once (D = 256
fits). For prod keys, S r accumulates over the chunks as Σ_j (Π r)_j (Π Sᵀ)_j.

Bytes a 32k-token prefill chunk must move (B = 1, H_kv = 8, N = 32768, D = 128, bf16 input;
262,144 rows each of K and V): reads 2 · 262,144 · 256 B = 134.2 MB; writes 146 B per row
pair (K4/V4 mse: 64 + 2 key, 64 + 16 value) = 38.3 MB, 98 B (K3/V2 mse) = 25.7 MB, 100 B
(K3/V2 prod: 32 + 2 + 16 + 2 key, 48 value) = 26.2 MB. At 4.26 TB/s (the H200's copy rate)
that is 40.5 µs (K4/V4), 37.5 µs (K3/V2 mse) and 37.7 µs (K3/V2 prod); copying the bf16 K/V
into a bf16 cache moves 268.4 MB, 63.0 µs. The rotation costs 2·D² FLOPs per key (4·D² for
prod keys): 8.6 (17.2) GFLOP for the chunk, which must be done to fp32 accuracy, so the encode
sits near the line between memory- and compute-bound.

Numerics (why the codes match the reference's bit for bit away from ties):
- value scales and codes, and every quotient of the prod keys' γ and of the float32 rotation path, round as IEEE
  (``div_rn``, ``sqrt_rn``; the value quotients (max - min) / levels and (x - zero) / scale from the rounded
  reciprocal with Markstein's fused correction, which gives the correctly rounded quotient); a key row's norm
  ‖x‖, its reciprocal and the norm-corrected ‖x‖ / ‖ĉ‖ take the hardware's square root and division (within
  2 ulps: one multiplier of the row's coordinates, far inside the codes' tie band, and a stored fp16 norm within
  one ulp of the reference's; the IEEE routines, replicated on the 16 threads that hold a row, cost the H200 4%
  of the key kernel's time for a 32k-token chunk at K4/V4: 94 vs 90 µs);
- Πᵀ is split into two fp16 parts, Πᵀ = P0 + s·P1 (s = 2^-11: 22 significant bits, within 2^-23 of
  Πᵀ). 16-bit keys (bf16, fp16) are rotated as x Πᵀ / ‖x‖: x times a power of two 2^e that puts ‖x‖ in
  [2^14, 2^15) is exact in fp16 (bf16's 8 significant bits fit fp16's 11; only elements below 2^-29 ‖x‖
  round), so two tensor-core products with fp32 accumulation are exact products; float32 MSE keys, and
  MSE keys centred or scaled in the kernel (float32 values), as u Πᵀ with the unit vector u = x / ‖x‖ in
  two fp16 parts (u0 + s·u1, as many bits as float32) and three fp16 products (u0·P0 + s·(u0·P1 +
  u1·P0); the dropped s²·u1·P1 is 2^-22 of y); those of prod keys, and (Π r)(Π Sᵀ), with
  ``input_precision="tf32x3"`` (the CPU interpreter computes every dot in exact fp32 products). The
  rotated coordinates are thus within ~2^-22 of the exact ones, as close as float32 computes them;
- so codes equal the reference's except where √d·y lies within float rounding of a decision
  boundary (or S r within rounding of 0); norms, γ, scales and zeros are equal up to the last
  fp16 bit (γ with norm correction is formed as ‖Π x‖² - 2f⟨Π x, c⟩ + f²‖c‖², f = stored norm / √d,
  since f is known only after the last chunk).
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..packing import to_key_codes
from ..quantizers import TurboQuantMSE, TurboQuantProd, ValueQuantizer
from .launch import PreparedLaunch, check_value_affine, on_device

__all__ = ["ENCODE_HEAD_DIMS", "LAUNCH_DEFAULTS", "encode_kv"]

ENCODE_HEAD_DIMS = (64, 128, 256)
_TINY = torch.finfo(torch.float32).tiny  # the reference's clamp of ‖x‖ before x / ‖x‖


@triton.jit
def _pack_chunk(idx, j: tl.constexpr, BITS: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, BN: tl.constexpr):
    """Bytes of a planar plane (fields of DP columns, BITS each) contributed by column chunk j.

    idx: [BN, DC] int32 indices of columns [j·DC, (j+1)·DC) -> [BN, DP] int32 (fields OR-ed in,
    as a sum of disjoint bits). Column c lies in field c // DP, at byte c % DP, bits (c // DP)·BITS.
    """
    if DC >= DP:  # the chunk spans whole fields j·NF .. j·NF + NF - 1
        NF: tl.constexpr = DC // DP
        o_f = j * NF + tl.arange(0, NF)
        return tl.sum(tl.reshape(idx, (BN, NF, DP)) << (o_f * BITS)[None, :, None], axis=1)
    else:  # the chunk is byte block S of field F
        NS: tl.constexpr = DP // DC
        F: tl.constexpr = (j * DC) // DP
        S: tl.constexpr = ((j * DC) % DP) // DC
        o_s = tl.arange(0, NS)
        part = tl.where((o_s == S)[None, :, None], (idx << (F * BITS))[:, None, :], 0)  # [BN, NS, DC]
        return tl.reshape(part, (BN, DP))


@triton.jit
def _pack_key4_chunk(code, j: tl.constexpr, D: tl.constexpr, DC: tl.constexpr, BN: tl.constexpr):
    """The 16-bit elements of 4-bit key rows (packing.pack_key_codes) contributed by column chunk j.

    code: [BN, DC] int32 sign-magnitude codes of columns [j·DC, (j+1)·DC) -> [BN, D/4] int32. Column c = f·D/2 + m
    is nibble n = 2·(m mod 2) + f of element m // 2: its rank in bits 4n..4n+2, its sign at bit 7, 15, 3 or 11
    (n = 0..3), so that every element is written whole (the sign of a nibble may lie in the element's other byte).
    """
    E: tl.constexpr = D // 4  # elements per row
    rank = code & 7
    sign = code >> 3
    o_p = tl.arange(0, 2)  # column parity m mod 2
    if DC >= D // 2:  # the chunk spans whole fields j·NF .. j·NF + NF - 1
        NF: tl.constexpr = DC // (D // 2)
        n = 2 * o_p[None, :] + (j * NF + tl.arange(0, NF))[:, None]  # [NF, 2]
        r_sh = (4 * n)[None, :, None, :]
        s_sh = (7 + 8 * (n % 2) - 4 * (n // 2))[None, :, None, :]
        part = (tl.reshape(rank, (BN, NF, E, 2)) << r_sh) | (tl.reshape(sign, (BN, NF, E, 2)) << s_sh)
        return tl.sum(tl.sum(part, axis=3), axis=1)
    else:  # the chunk is byte block S of field F: elements [S·DC/2, (S+1)·DC/2)
        F: tl.constexpr = (j * DC) // (D // 2)
        S: tl.constexpr = ((j * DC) % (D // 2)) // DC
        NS: tl.constexpr = (D // 2) // DC
        n = 2 * o_p + F
        r_sh = (4 * n)[None, None, :]
        s_sh = (7 + 8 * (n % 2) - 4 * (n // 2))[None, None, :]
        part = (tl.reshape(rank, (BN, DC // 2, 2)) << r_sh) | (tl.reshape(sign, (BN, DC // 2, 2)) << s_sh)
        part = tl.sum(part, axis=2)  # [BN, DC/2]
        o_s = tl.arange(0, NS)
        return tl.reshape(tl.where((o_s == S)[None, :, None], part[:, None, :], 0), (BN, E))


@triton.jit
def _count_boundaries(b_x, TAB, FIRST: tl.constexpr, NC: tl.constexpr, CENTROIDS: tl.constexpr,
                      SCALED: tl.constexpr):  # fmt: skip
    """m = #{t ≥ FIRST : x > b_t} over the ascending boundaries of TAB (see _encode_keys), per element of b_x, and
    (CENTROIDS, SCALED; else zeros) the centroid c[FIRST + m] and c[FIRST + m] / √d.

    Seven or three boundaries by binary search where it ran faster on the H200 (benchmarks/RESULTS.md, twelfth
    session): the magnitude search of 4-bit indices (FIRST > 0), and searches that also select the centroid / √d for
    norm correction (SCALED) but not the centroid of prod keys. Each comparison halves the candidates, its threshold
    chosen by the comparisons before (the same count, as the boundaries are sorted), and the centroids come from a
    select tree on the comparisons. Otherwise one comparison per boundary: a plain 3-bit search by halves took 190
    registers instead of 128 (one 8-warp program per SM instead of two: 139 vs 101 µs for a 32k chunk), and the
    prod-key kernel spilled registers with it."""
    K: tl.constexpr = NC - 1 - FIRST  # boundaries searched
    BINARY: tl.constexpr = (K == 7 or K == 3) and (FIRST > 0 or (SCALED and not CENTROIDS))
    b_c = tl.zeros(b_x.shape, dtype=tl.float32)
    b_cs = tl.zeros(b_x.shape, dtype=tl.float32)
    if BINARY and K == 7:
        u1 = b_x > tl.load(TAB + FIRST + 3)
        u2 = b_x > tl.where(u1, tl.load(TAB + FIRST + 5), tl.load(TAB + FIRST + 1))
        t3 = tl.where(u1, tl.where(u2, tl.load(TAB + FIRST + 6), tl.load(TAB + FIRST + 4)),
                      tl.where(u2, tl.load(TAB + FIRST + 2), tl.load(TAB + FIRST + 0)))  # fmt: skip
        u3 = b_x > t3
        b_m = u1.to(tl.int32) * 4 + u2.to(tl.int32) * 2 + u3.to(tl.int32)
        if CENTROIDS:
            b_c = _select8(TAB + NC + FIRST, u1, u2, u3)
        if SCALED:
            b_cs = _select8(TAB + 2 * NC + FIRST, u1, u2, u3)
    elif BINARY:  # K == 3
        u1 = b_x > tl.load(TAB + FIRST + 1)
        u2 = b_x > tl.where(u1, tl.load(TAB + FIRST + 2), tl.load(TAB + FIRST + 0))
        b_m = u1.to(tl.int32) * 2 + u2.to(tl.int32)
        if CENTROIDS:
            b_c = _select4(TAB + NC + FIRST, u1, u2)
        if SCALED:
            b_cs = _select4(TAB + 2 * NC + FIRST, u1, u2)
    else:
        b_m = tl.zeros(b_x.shape, dtype=tl.int32)
        if CENTROIDS:
            b_c += tl.load(TAB + NC + FIRST)
        if SCALED:
            b_cs += tl.load(TAB + 2 * NC + FIRST)
        for t in tl.static_range(FIRST, NC - 1):
            m_t = b_x > tl.load(TAB + t)
            b_m += m_t.to(tl.int32)
            if CENTROIDS:
                b_c = tl.where(m_t, tl.load(TAB + NC + t + 1), b_c)
            if SCALED:
                b_cs = tl.where(m_t, tl.load(TAB + 2 * NC + t + 1), b_cs)
    return b_m, b_c, b_cs


@triton.jit
def _select4(C, u1, u2):
    """C[2·u1 + u2] (C: 4 scalars in memory), per element of the comparisons u1, u2."""
    return tl.where(u1, tl.where(u2, tl.load(C + 3), tl.load(C + 2)), tl.where(u2, tl.load(C + 1), tl.load(C)))


@triton.jit
def _select8(C, u1, u2, u3):
    """C[4·u1 + 2·u2 + u3] (C: 8 scalars in memory), per element of the comparisons u1, u2, u3."""
    return tl.where(u1, _select4(C + 4, u2, u3), _select4(C, u2, u3))


@triton.jit
def _grid_search(b_x, GRID, GRID_SHIFT: tl.constexpr, GRID_BINS: tl.constexpr, SCALED: tl.constexpr,
                 GRID_ASM: tl.constexpr):  # fmt: skip
    """The stored code (packing.to_key_codes) of idx = #{t : x > b_t} over every boundary by one table lookup, and
    (SCALED; else zeros) the squared scaled centroid (c[idx] / √d)², per element of b_x; GRID: int64 [2, GRID_BINS]
    from grid_table. GRID_ASM (CUDA): the same in PTX (_grid_asm), which keeps the tile's layout (Triton's loads
    of a gathered address take a layout of their own and round trips through shared memory).

    The bin of x is k = clamp(RNE(x·2^GRID_SHIFT) + GRID_BINS / 2, 0, GRID_BINS - 1), read from the float bits of
    x·2^GRID_SHIFT + 1.5·2^23 (exact: the product scales by a power of two and the sum rounds once to an integer).
    k is monotone in x and no two boundaries share a bin, so idx = (the boundaries in lower bins) + [x > the
    boundary of bin k]: the same indices as a comparison per boundary, with no margin."""
    if GRID_ASM != "":
        b_base = tl.zeros(b_x.shape, tl.int64) + GRID.to(tl.int64)
        return tl.inline_asm_elementwise(GRID_ASM, "=r,=r,r,l", [b_x, b_base], dtype=(tl.int32, tl.float32),
                                         is_pure=True, pack=1)  # fmt: skip
    b_v = b_x * (2.0**GRID_SHIFT) + 12582912.0
    b_k = b_v.to(tl.int32, bitcast=True) - (0x4B400000 - GRID_BINS // 2)
    b_k = tl.minimum(tl.maximum(b_k, 0), GRID_BINS - 1)
    b_e = tl.load(GRID + b_k)
    b_up = b_x > b_e.to(tl.int32).to(tl.float32, bitcast=True)
    b_codes = (b_e >> 32).to(tl.int32)
    b_code = tl.where(b_up, b_codes >> 16, b_codes & 0xFFFF)
    b_cs2 = tl.zeros(b_x.shape, dtype=tl.float32)
    if SCALED:
        b_c2 = tl.load(GRID + GRID_BINS + b_k)
        b_cs2 = tl.where(b_up, (b_c2 >> 32).to(tl.int32), b_c2.to(tl.int32)).to(tl.float32, bitcast=True)
    return b_code, b_cs2


@triton.jit
def _encode_keys(
    p_x, p_m, p_s, row, m_r, TAB, GRID, RT, RS, MT, KC, KN, KS, KR,
    D: tl.constexpr, KEY_BITS: tl.constexpr, NC: tl.constexpr, PROD: tl.constexpr,
    NORM_CORRECTION: tl.constexpr, SCALE: tl.constexpr, TINY: tl.constexpr,
    ROTATE: tl.constexpr, SPLIT_SCALE: tl.constexpr,
    BN: tl.constexpr, DC: tl.constexpr, PRECISION: tl.constexpr, SEARCH: tl.constexpr,
    GRID_SHIFT: tl.constexpr, GRID_BINS: tl.constexpr, GRID_ASM: tl.constexpr,
    CENTER: tl.constexpr, KEY_SCALE: tl.constexpr,
):  # fmt: skip
    """Algorithm 1 (and 2 for PROD) on BN key rows p_x [BN, D] -> buffer rows ``row`` [BN].

    CENTER / KEY_SCALE: the rows are first x - μ, then (x - μ) / s in float32, μ and s at p_m, p_s [BN, D] (the
    row's head's mean key and key scales, as TurboQuantKVCache keeps them), as the cache's reference does.

    TAB: [3·NC] float32 = boundaries (NC - 1) and a pad, centroids c (NC), c / √d (NC).
    RT: Πᵀ [D, D] float32.  MT: Π Sᵀ [D, D] float32 (PROD).
    ROTATE, how y = u Πᵀ is computed, with RS = [2, D, D] fp16 parts of Πᵀ = P0 + s·P1, s = SPLIT_SCALE: "x16"
    (keys stored in 16 bits): x·2^e Πᵀ / (‖x‖·2^e) by two tensor-core products of the keys scaled by a power of
    two into fp16 (exact), with fp32 accumulation; "u16" (MSE keys in float32, or centred or scaled): the unit
    vector as two fp16 parts u = u0 + s·u1 (24 bits, as float32) and three products u0·P0 + s·(u0·P1 + u1·P0)
    (the dropped s²·u1·P1 is 2^-22 of y, below the search's concern); "fp32": one fp32 (PRECISION) dot.
    SEARCH, of idx = #{t : √d·y > b_t}: "full" (a comparison per boundary), "symmetric" (of the antisymmetric
    codebook by |√d·y|: half the comparisons, the same indices; encode_kv checks the codebook) or "grid" (MSE keys:
    one lookup in GRID, int64 [2, GRID_BINS] from grid_table, see _grid_search; the same indices).
    """
    o_d = tl.arange(0, D)
    o_c = tl.arange(0, DC)
    b_xs = tl.load(p_x, mask=m_r[:, None], other=0.0)  # [BN, D] as stored
    b_x = b_xs.to(tl.float32)
    if CENTER:
        b_x = b_x - tl.load(p_m, mask=m_r[:, None], other=0.0)
    if KEY_SCALE:  # the "fp32" path divides as IEEE, the others by the hardware's division (within 2 ulps)
        b_ks = tl.load(p_s, mask=m_r[:, None], other=1.0)
        b_x = tl.div_rn(b_x, b_ks) if ROTATE == "fp32" else tl.fdiv(b_x, b_ks)
    b_n = tl.sqrt(tl.sum(b_x * b_x, axis=1))  # [BN] ‖x‖
    b_inv = tl.fdiv(tl.full((BN,), 1.0, tl.float32), tl.maximum(b_n, TINY))  # 1 / ‖x‖
    if ROTATE == "x16":  # x·2^e in fp16 with 2^e·‖x‖ in [2^14, 2^15) (every |x_i| ≤ ‖x‖ < 2^15 stays finite)
        e = tl.minimum(tl.maximum(141 - ((b_n.to(tl.int32, bitcast=True) >> 23) & 0xFF), -126), 126)
        b_up = ((e + 127) << 23).to(tl.float32, bitcast=True)  # 2^e
        b_down = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e
        b_xd = (b_x * b_up[:, None]).to(tl.float16)  # the products' left operand
        b_inv = b_inv * b_down  # 1 / (‖x‖·2^e), exactly
    elif ROTATE == "u16":  # u = x · (1 / ‖x‖) = u0 + s·u1: u - u0 is exact, and |u1| ≤ |u| / 2 rounds at 2^-12 of that
        b_u = b_x * b_inv[:, None]
        b_u0 = b_u.to(tl.float16)
        b_u1 = ((b_u - b_u0.to(tl.float32)) * (1.0 / SPLIT_SCALE)).to(tl.float16)
    else:
        b_u = tl.div_rn(b_x, tl.broadcast_to(tl.maximum(b_n, TINY)[:, None], (BN, D)))  # [BN, D] x / ‖x‖
    if PROD and not NORM_CORRECTION:
        b_f = tl.div_rn(b_n.to(tl.float16).to(tl.float32), tl.full((BN,), SCALE, tl.float32))  # stored ‖x‖ / √d
    KB: tl.constexpr = D * KEY_BITS // 8
    HALF: tl.constexpr = NC // 2
    if KEY_BITS == 3:
        b_lo = tl.zeros((BN, D // 4), dtype=tl.int32)  # 2-bit plane
        b_hi = tl.zeros((BN, D // 8), dtype=tl.int32)  # 1-bit plane
    elif KEY_BITS == 4:
        b_pk = tl.zeros((BN, D // 4), dtype=tl.int32)  # 16-bit elements
    else:
        b_pk = tl.zeros((BN, KB), dtype=tl.int32)
    if NORM_CORRECTION:
        b_cn = tl.zeros((BN,), dtype=tl.float32)  # ‖c[idx] / √d‖²
    if PROD:
        b_sr = tl.zeros((BN, D), dtype=tl.float32)  # S r (with norm correction: Π x Π Sᵀ)
        b_g = tl.zeros((BN,), dtype=tl.float32)  # ‖r‖²
        if NORM_CORRECTION:
            b_a2 = tl.zeros((BN, D), dtype=tl.float32)  # c[idx] Π Sᵀ
            b_pp = tl.zeros((BN,), dtype=tl.float32)  # ‖Π x‖², ⟨Π x, c[idx]⟩, ‖c[idx]‖²
            b_pc = tl.zeros((BN,), dtype=tl.float32)
            b_cc = tl.zeros((BN,), dtype=tl.float32)
    for j in tl.static_range(D // DC):
        p_rs = RS + o_d[:, None] * D + (j * DC + o_c)[None, :]  # [D, DC] columns j·DC.. of each part
        if ROTATE == "x16":  # Π x·2^e from two exact fp16 products, the small part first
            b_px = tl.dot(b_xd, tl.load(p_rs + D * D))
            b_px = tl.dot(b_xd, tl.load(p_rs), b_px * SPLIT_SCALE)
            b_y = b_px * b_inv[:, None]  # y = Π x / ‖x‖
            if PROD:
                b_px = b_px * b_down[:, None]  # Π x
        elif ROTATE == "u16":  # y = Π u from three exact fp16 products, the small terms first
            b_p0 = tl.load(p_rs)
            b_y = tl.dot(b_u1, b_p0)
            b_y = tl.dot(b_u0, tl.load(p_rs + D * D), b_y)
            b_y = tl.dot(b_u0, b_p0, b_y * SPLIT_SCALE)
            b_px = b_n[:, None] * b_y
        else:
            b_rt = tl.load(RT + o_d[:, None] * D + (j * DC + o_c)[None, :])  # [D, DC] columns j·DC.. of Πᵀ
            b_y = tl.dot(b_u, b_rt, input_precision=PRECISION)  # [BN, DC] y = u Πᵀ
            b_px = b_n[:, None] * b_y
        b_s = b_y * SCALE  # √d·y
        if SEARCH == "grid":  # MSE keys: the index and its scaled centroid's square by one table lookup
            b_i, b_cs2 = _grid_search(b_s, GRID, GRID_SHIFT, GRID_BINS, NORM_CORRECTION, GRID_ASM)  # stored codes
        elif SEARCH == "symmetric":
            # idx = #{t : √d·y > b_t} over the ascending boundaries, which are antisymmetric (b_t = -b_{NC-2-t},
            # the middle one 0): with a = |√d·y| and m = #{t ≥ NC/2 : a' > b_t}, idx = NC/2 + m where √d·y > 0
            # (a' = a) and NC/2 - 1 - m elsewhere (a' = the float above a, as a ≥ b ⟺ a' > b): half the compares
            b_pos = b_s > 0.0
            b_a = tl.abs(b_s)
            b_a = tl.where(b_pos, b_a, (b_a.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True))
            b_i, b_c, b_cs = _count_boundaries(b_a, TAB, HALF, NC, PROD, NORM_CORRECTION)  # |c[idx]| = c[NC/2 + m]
            b_i = tl.where(b_pos, HALF + b_i, HALF - 1 - b_i)
            b_c = tl.where(b_pos, b_c, -b_c)  # (b_cs keeps |c| / √d: only its square is used)
        else:  # idx = #{t : √d·y > b_t}
            b_i, b_c, b_cs = _count_boundaries(b_s, TAB, 0, NC, PROD, NORM_CORRECTION)
        if SEARCH != "grid":
            b_cs2 = b_cs * b_cs
        if KEY_BITS == 3:
            b_lo += _pack_chunk(b_i & 3, j, 2, D // 4, DC, BN)
            b_hi += _pack_chunk(b_i >> 2, j, 1, D // 8, DC, BN)
        elif KEY_BITS == 4:  # stored as sign-magnitude codes (packing.to_key_codes), written as the key rows
            b_code = b_i if SEARCH == "grid" else tl.where(b_i >= HALF, b_i - HALF, NC - 1 - b_i)
            b_pk += _pack_key4_chunk(b_code, j, D, DC, BN)
        else:
            b_pk += _pack_chunk(b_i, j, KEY_BITS, KB, DC, BN)
        if NORM_CORRECTION:
            b_cn += tl.sum(b_cs2, axis=1)
        if PROD:
            b_m = tl.load(MT + (j * DC + o_c)[:, None] * D + o_d[None, :])  # [DC, D] rows j·DC.. of Π Sᵀ
            if NORM_CORRECTION:  # the stored norm is known after the last chunk: keep Π x and c apart
                b_sr += tl.dot(b_px, b_m, input_precision=PRECISION)  # [BN, D]
                b_a2 += tl.dot(b_c, b_m, input_precision=PRECISION)  # [BN, D]
                b_pp += tl.sum(b_px * b_px, axis=1)
                b_pc += tl.sum(b_px * b_c, axis=1)
                b_cc += tl.sum(b_c * b_c, axis=1)
            else:
                b_pr = b_px - b_f[:, None] * b_c  # [BN, DC] Π r = Π x - ŷ on this chunk
                b_sr += tl.dot(b_pr, b_m, input_precision=PRECISION)  # [BN, D]
                b_g += tl.sum(b_pr * b_pr, axis=1)
    m_w = m_r[:, None]
    if KEY_BITS == 3:
        tl.store(KC + row[:, None] * KB + tl.arange(0, D // 4)[None, :], b_lo.to(tl.uint8), mask=m_w)
        tl.store(KC + row[:, None] * KB + D // 4 + tl.arange(0, D // 8)[None, :], b_hi.to(tl.uint8), mask=m_w)
    elif KEY_BITS == 4:
        p_e = KC.to(tl.pointer_type(tl.int16)) + row[:, None] * (KB // 2) + tl.arange(0, KB // 2)[None, :]
        tl.store(p_e, b_pk.to(tl.int16), mask=m_w)
    else:
        tl.store(KC + row[:, None] * KB + tl.arange(0, KB)[None, :], b_pk.to(tl.uint8), mask=m_w)
    if NORM_CORRECTION:
        b_nk = tl.fdiv(b_n, tl.sqrt(b_cn)).to(tl.float16)  # ‖x‖ / ‖c[idx] / √d‖
    else:
        b_nk = b_n.to(tl.float16)
    tl.store(KN + row, b_nk, mask=m_r)
    if PROD:
        if NORM_CORRECTION:
            b_f = tl.div_rn(b_nk.to(tl.float32), tl.full((BN,), SCALE, tl.float32))
            b_sr = b_sr - b_f[:, None] * b_a2  # S r = (Π x - (fp16 norm / √d) c[idx]) Π Sᵀ
            b_g = tl.maximum(b_pp - 2.0 * b_f * b_pc + b_f * b_f * b_cc, 0.0)
        b_sg = _pack_chunk((b_sr >= 0).to(tl.int32), 0, 1, D // 8, D, BN)  # [BN, D/8]
        tl.store(KS + row[:, None] * (D // 8) + tl.arange(0, D // 8)[None, :], b_sg.to(tl.uint8), mask=m_w)
        tl.store(KR + row, tl.sqrt_rn(b_g).to(tl.float16), mask=m_r)


@triton.jit
def _encode_values(
    V, SLOTS, VC, VA, R, N, H, C, s_b, s_h, s_n,
    D: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Per-group min/max affine codes of program i's BN value rows of V (strides s_b, s_h, s_n; see _rows) -> their
    buffer rows: the codes, and per group the (scale, zero) pair.

    The rows are read as BN·D/g group rows [BN·D/g, g] (each contiguous: 16-byte loads), so that a group's min and
    max reduce within the few threads that hold it, and its scale, zero and reciprocal are computed once."""
    NG: tl.constexpr = D // GROUP
    LEVELS: tl.constexpr = (1 << VALUE_BITS) - 1
    INV_LEVELS: tl.constexpr = 1.0 / LEVELS  # (in float32: RN(1 / levels) for every width 1-8)
    VB: tl.constexpr = D * VALUE_BITS // 8
    i_b, i_h, i_n, m_g, row_g = _rows(SLOTS, R, N, H, C, BN, NG)  # [BN·NG] each: the row of each group row
    o_g = (tl.arange(0, BN * NG) % NG) * GROUP  # its first column
    p_x = V + (i_b * s_b + i_h * s_h + i_n * s_n + o_g)[:, None] + tl.arange(0, GROUP)[None, :]
    b_x = tl.load(p_x, mask=m_g[:, None], other=0.0).to(tl.float32)  # [BN·NG, GROUP]
    b_min = tl.min(b_x, axis=1)  # [BN·NG]
    b_max = tl.max(b_x, axis=1)
    b_z = b_min.to(tl.float16)
    # RN((max - min) / levels) by the constant's rounded reciprocal (Markstein, as for the codes below), where
    # the range is finite (an infinite one stays infinite)
    b_rg = b_max - b_min
    b_sq = b_rg * INV_LEVELS
    b_sc = tl.where(b_sq == float("inf"), b_sq, tl.fma(tl.fma(-b_sq, LEVELS, b_rg), INV_LEVELS, b_sq)).to(tl.float16)
    # one 4-byte word per (scale, zero) pair, scale in the low half (the layout of value_affine [..., NG, 2])
    b_w = b_sc.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF | (b_z.to(tl.int16, bitcast=True).to(tl.int32) << 16)
    tl.store(VA.to(tl.pointer_type(tl.int32)) + row_g * NG + o_g // GROUP, b_w, mask=m_g)
    b_s = b_sc.to(tl.float32)
    b_d = tl.maximum(b_s, 1e-30)  # the reference's clamp_min
    # RN(1 / scale); 0 where the scale is 0 (or NaN), whose codes are 0: q = a·0 (clamped below if a is not finite)
    b_r = tl.where(b_s > 0, tl.div_rn(tl.full((BN * NG,), 1.0, tl.float32), b_d), 0.0)[:, None]
    b_d = b_d[:, None]
    # (x - zero) / scale correctly rounded from the rounded reciprocal (Markstein): q = RN(a·r),
    # then q + RN(a - q·scale)·r with both steps fused multiply-adds
    b_a = b_x - b_z.to(tl.float32)[:, None]  # [BN·NG, GROUP]
    b_q = b_a * b_r
    b_q = tl.fma(tl.fma(-b_q, b_d, b_a), b_r, b_q)
    b_q = tl.minimum(tl.maximum(b_q, 0.0), LEVELS)  # (clamping first: same codes; max(NaN, 0) = 0)
    # round half to even, as torch.round: 1.5·2^23 + q lies where the float32 spacing is 1, so the addition rounds q
    # to the nearest integer, ties to even, and leaves it in the low mantissa bits
    b_q = (b_q + 1.5 * 2.0**23).to(tl.int32, bitcast=True) & 0xFF
    b_q = tl.reshape(b_q, (BN, D))  # [BN, D]
    _, _, _, m_r, row = _rows(SLOTS, R, N, H, C, BN, 1)
    m_w = m_r[:, None]
    if VALUE_BITS == 8:
        tl.store(VC + row[:, None] * VB + tl.arange(0, D)[None, :], b_q.to(tl.uint8), mask=m_w)
    elif VALUE_BITS == 3:
        b_p = _pack_chunk(b_q & 3, 0, 2, D // 4, D, BN)
        tl.store(VC + row[:, None] * VB + tl.arange(0, D // 4)[None, :], b_p.to(tl.uint8), mask=m_w)
        b_p = _pack_chunk(b_q >> 2, 0, 1, D // 8, D, BN)
        tl.store(VC + row[:, None] * VB + D // 4 + tl.arange(0, D // 8)[None, :], b_p.to(tl.uint8), mask=m_w)
    else:
        b_p = _pack_chunk(b_q, 0, VALUE_BITS, VB, D, BN)
        tl.store(VC + row[:, None] * VB + tl.arange(0, VB)[None, :], b_p.to(tl.uint8), mask=m_w)


@triton.jit
def _rows(SLOTS, R, N, H, C, BN: tl.constexpr, REP: tl.constexpr):
    """Program i's BN flattened (batch, head, token) rows: (batch, head, token, mask, buffer row), [BN·REP] each
    (each row REP times in a row).

    Row numbers in int32 (R < 2^31, checked by encode_kv): int64 division is a long subroutine; the batch,
    head and token indices come back as int64 for the address arithmetic. Where a head holds at least BN rows
    (a prefill chunk), the program's rows lie in one head or two adjacent ones, so two scalar divisions find them
    all (a division per row took 13% of the value kernel's instructions; H200, 32k-token chunk: values 44.5 -> 42.5
    µs at K4/V4, 50.5 -> 43 at K3/V2, keys 97 -> 94 µs; benchmarks/RESULTS.md, fifteenth session)."""
    r0 = tl.program_id(0) * BN
    o_r = r0 + tl.arange(0, BN * REP) // REP
    m_r = o_r < R
    if N >= BN:  # the rows lie in head q0 or q0 + 1
        q0 = r0 // N
        nxt = o_r - q0 * N >= N  # in head q0 + 1
        i_bh = q0 + nxt.to(tl.int32)
        b0 = q0 // H
        i_b = b0 + (nxt & (q0 - b0 * H == H - 1)).to(tl.int32)
    else:
        i_bh = o_r // N
        i_b = i_bh // H
    i_n = o_r - i_bh * N
    row = i_bh.to(tl.int64) * C + tl.load(SLOTS + i_n, mask=m_r, other=0)  # slot of token n in head (b, h)
    return i_b.to(tl.int64), (i_bh - i_b * H).to(tl.int64), i_n.to(tl.int64), m_r, row


@triton.jit
def _encode_keys_kernel(
    K, SLOTS, TAB, GRID, RT, RS, MT, KC, KN, KS, KR, KM, KSC,
    R, N, H, C, s_b, s_h, s_n,
    D: tl.constexpr, KEY_BITS: tl.constexpr, NC: tl.constexpr, PROD: tl.constexpr,
    NORM_CORRECTION: tl.constexpr, SCALE: tl.constexpr, TINY: tl.constexpr,
    ROTATE: tl.constexpr, SPLIT_SCALE: tl.constexpr,
    BN: tl.constexpr, DC: tl.constexpr, PRECISION: tl.constexpr, SEARCH: tl.constexpr,
    GRID_SHIFT: tl.constexpr, GRID_BINS: tl.constexpr, GRID_ASM: tl.constexpr,
    CENTER: tl.constexpr, KEY_SCALE: tl.constexpr,
):  # fmt: skip
    i_b, i_h, i_n, m_r, row = _rows(SLOTS, R, N, H, C, BN, 1)
    p_k = K + (i_b * s_b + i_h * s_h + i_n * s_n)[:, None] + tl.arange(0, D)[None, :]  # [BN, D]
    o_ms = ((i_b * H + i_h) * D)[:, None] + tl.arange(0, D)[None, :]  # [BN, D] the row's head's μ and s
    _encode_keys(p_k, KM + o_ms, KSC + o_ms, row, m_r, TAB, GRID, RT, RS, MT, KC, KN, KS, KR, D, KEY_BITS, NC,
                 PROD, NORM_CORRECTION, SCALE, TINY, ROTATE, SPLIT_SCALE, BN, DC, PRECISION, SEARCH, GRID_SHIFT,
                 GRID_BINS, GRID_ASM, CENTER, KEY_SCALE)  # fmt: skip


@triton.jit
def _encode_values_kernel(
    V, SLOTS, VC, VA, R, N, H, C, s_b, s_h, s_n,
    D: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    _encode_values(V, SLOTS, VC, VA, R, N, H, C, s_b, s_h, s_n, D, VALUE_BITS, GROUP, BN)


@triton.jit
def _encode_kv_kernel(
    K, V, SLOTS, TAB, GRID, RT, RS, MT, KC, KN, KS, KR, KM, KSC, VC, VA,
    R, N, H, C, s_b, s_h, s_n, v_b, v_h, v_n,
    D: tl.constexpr, KEY_BITS: tl.constexpr, NC: tl.constexpr, PROD: tl.constexpr,
    NORM_CORRECTION: tl.constexpr, SCALE: tl.constexpr, TINY: tl.constexpr,
    ROTATE: tl.constexpr, SPLIT_SCALE: tl.constexpr,
    BN: tl.constexpr, DC: tl.constexpr, PRECISION: tl.constexpr, SEARCH: tl.constexpr,
    GRID_SHIFT: tl.constexpr, GRID_BINS: tl.constexpr, GRID_ASM: tl.constexpr,
    CENTER: tl.constexpr, KEY_SCALE: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """Keys and values of the same BN rows in one program: the single launch of a small chunk (a decode step),
    where the two kernels would take the same rows and warps and the launches, not the work, cost the time."""
    i_b, i_h, i_n, m_r, row = _rows(SLOTS, R, N, H, C, BN, 1)
    p_k = K + (i_b * s_b + i_h * s_h + i_n * s_n)[:, None] + tl.arange(0, D)[None, :]  # [BN, D]
    o_ms = ((i_b * H + i_h) * D)[:, None] + tl.arange(0, D)[None, :]
    _encode_keys(p_k, KM + o_ms, KSC + o_ms, row, m_r, TAB, GRID, RT, RS, MT, KC, KN, KS, KR, D, KEY_BITS, NC,
                 PROD, NORM_CORRECTION, SCALE, TINY, ROTATE, SPLIT_SCALE, BN, DC, PRECISION, SEARCH, GRID_SHIFT,
                 GRID_BINS, GRID_ASM, CENTER, KEY_SCALE)  # fmt: skip
    _encode_values(V, SLOTS, VC, VA, R, N, H, C, v_b, v_h, v_n, D, VALUE_BITS, GROUP, BN)


# Launch configuration (defaults from H200 sweeps at D = 128): key rows per program (block_n), columns of Πᵀ per
# rotation chunk (chunk, capped at D) and warps (num_warps) of the key kernel, None = per key kind (_key_launch);
# a chunk of at most small_rows rows (e.g. a decode step) takes one launch for keys and values at 16 rows and 4 warps
# (head_dim 256: the warps of _key_launch) (for longer chunks one launch was slower at every size tried: the value
# work then runs at the key kernel's occupancy); pipeline depth; the precision of the fp32 dots ("tf32x3" keeps fp32
# accuracy on tensor cores; "ieee" uses FMAs); whether keys are rotated by 16-bit products (split: the stored 16-bit
# keys, or the unit vector in two fp16 parts; else one fp32 dot); rows / warps per program of the value kernel (None
# warps: 2, and 4 at head_dim 256, where a 32k chunk's values take 84 µs on 4 warps against 108 on 2; at 128 the two
# are equal); the codebook search ("full": a comparison per decision boundary; "symmetric": by magnitude in an
# antisymmetric codebook, half the comparisons (for 4-bit MSE keys 0.228 ms vs 0.248 full, a 32k chunk on the H200,
# sixth session); "grid": MSE keys, one table lookup per coordinate; the same indices by all three; None: grid for
# MSE keys of 3 and 4 bits (H200, 32k chunk, CUDA graphs: K4/V4 0.1268 ms vs 0.1341 symmetric, centred 0.1727 vs
# 0.2029; K3/V2 0.1267 vs 0.1321 full), full for the rest (2-bit codebooks, of MSE keys and of 3-bit prod keys: as
# many instructions either way; prod keys need the centroid itself, not in the table)); and a cap on the key
# kernel's registers per thread in its long launch (max_registers, CUDA only; 0: none; None: per key kind,
# _key_launch).
LAUNCH_DEFAULTS = dict(
    block_n=None, small_rows=1024, chunk=None, num_warps=None, num_stages=1, precision="tf32x3", split=True,
    value_block_n=32, value_num_warps=None, search=None, max_registers=None,
)  # fmt: skip


def _key_launch(bits: int, prod: bool, d: int, rotate: str) -> tuple[int, int, int, int]:
    """(block_n, chunk, num_warps, max_registers) of the key kernel's long launch, by rotation path (see
    _encode_keys), from H200 sweeps of a 32k-token chunk (benchmarks/RESULTS.md, thirteenth session: rows 64/128 x
    warps 4/8, 64-column chunks; fourteenth: register caps).

    Keys as stored ("x16"): MSE keys 64 rows and 4 warps (head_dim 128, K3/V2: 0.145 ms vs 0.175 at 128 and 8; K4/V4
    0.160 ms, and 0.154 at 128 rows and 4 warps, which spill 144 B of registers, 704 with norm correction; at 256
    0.41 / 0.38 ms, 128 and 8 within 1%), but 2- and 3-bit keys at head_dim 64 128 rows and 8 warps (0.084 vs
    0.132). Centred and scaled MSE keys ("u16", the cache's defaults, with norm correction): 64 rows and 4 warps
    (head_dim 128 K4/V4 0.241 ms vs 0.258 at 128 and 8, K3/V2 0.231 vs 0.248), but 128 rows and 8 warps at head_dim
    256 (K4/V4 0.92 vs 1.01 ms, K3/V2 0.78 vs 0.81) and for 4-bit keys at 64 (0.103 vs 0.121). Prod keys as stored:
    128 rows and 8 warps (0.416 ms vs 0.536 at 32 and 4); at head_dim 256 16 rows and 8 warps: with more rows their
    per-thread tiles overflow the registers into a stack of 2-50 KB (K3/V2 prod 2.9 ms vs 34 ms at 32 rows and 4
    warps), and 64 rows of float32 operands need 256 KB of shared memory, more than the H200's 227 KB. Keys rotated
    by one fp32 dot (prod keys centred or scaled, the cache's defaults): 128 rows and 8 warps (head_dim 128: 1.30
    ms, the best of six), at head_dim 256 16 rows, 32-column chunks and 4 warps (K3/V2 prod 17.8 ms vs 53.9 with
    64-column chunks and 8 warps, where the chunk's [256, 64] float32 operands put ptxas on a 15 KB stack).

    At head_dim 128 the 64-row, 4-warp launches of 4-bit keys and of centred keys take 173-255 registers (two programs
    per SM); capped at 168 (three; offline up to 264 B of stack) they ran 7-9% faster (K4/V4 as stored 0.147 vs 0.161
    ms, centred 0.211 vs 0.232, K3/V2 centred 0.214 vs 0.231); 3-bit keys as stored did not (0.148 vs 0.145) until
    their search became one table lookup ("grid", the default for MSE keys: 0.127 ms capped vs 0.138; 128 registers,
    four programs per SM, 0.128; CUDA-graph sweep, sixteenth session). Keys given in float32 take the centred keys'
    rotation ("u16") and its cap (not timed apart).
    """
    if prod or rotate == "fp32":
        if d <= 128:
            return 128, 64, 8, 0
        return (16, 32, 4, 0) if rotate == "fp32" else (16, 64, 8, 0)
    cap = 168 if d == 128 and (bits >= 3 or rotate == "u16") else 0
    if rotate == "u16":
        return (128, 64, 8, 0) if d > 128 or (d == 64 and bits == 4) else (64, 64, 4, cap)
    return (128, 64, 8, 0) if d == 64 and bits < 4 else (64, 64, 4, cap)


SEARCHES = ("full", "symmetric", "grid")
_GRID_MAX_SHIFT = 12


def _grid_asm(shift: int, bins: int, scaled: bool) -> str:
    """PTX of _grid_search for one element: $0 the stored code, $1 (c[idx] / √d)² (scaled; else 0) <- $2 x, $3 the
    table's address (grid_table)."""
    lines = [
        ".reg .f32 v; .reg .s32 k; .reg .b64 a; .reg .b32 bl, bh, cl, ch; .reg .pred up;",
        f"fma.rn.f32 v, $2, 0f{0x3F800000 + (shift << 23):08X}, 0f4B400000;",  # x·2^shift + 1.5·2^23
        "mov.b32 k, v;",
        f"sub.s32 k, k, {0x4B400000 - bins // 2};",  # RNE(x·2^shift) + bins / 2
        "max.s32 k, k, 0;",
        f"min.s32 k, k, {bins - 1};",
        "mad.wide.s32 a, k, 8, $3;",
        "ld.global.nc.v2.b32 {bl, bh}, [a];",  # the bin's boundary, its two codes
        "setp.gt.f32 up, $2, bl;",
        "selp.b32 k, 0x5432, 0x5410, up;",
        "prmt.b32 $0, bh, 0, k;",  # the code above the boundary (bits 16-31) or below (0-15)
    ]
    if scaled:
        lines += [f"ld.global.nc.v2.b32 {{cl, ch}}, [a+{8 * bins}];", "selp.b32 $1, ch, cl, up;"]
    else:
        lines.append("mov.b32 $1, 0;")
    return "{\n " + "\n ".join(lines) + "\n}"


def grid_table(boundaries: torch.Tensor, scaled_centroids: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """The lookup table of the "grid" codebook search (_grid_search): bins of width 2^-shift, at most one decision
    boundary each.

    boundaries: [2^b - 1] float32 ascending; scaled_centroids: [2^b] float32 c / √d. Returns (table int64 [2, bins],
    shift, bins) with the smallest shift ≤ 12 that puts the boundaries in distinct bins and the fewest bins (a power
    of two) that hold them, or None where none does. Per bin k, with i the number of boundaries in lower bins and j
    = i + 1 where the bin holds a boundary, else i: row 0 = the float bits of its boundary (+inf where it has none)
    | (the stored codes of i and j, packing.to_key_codes, in bits 32-47 and 48-63); row 1 = the float bits of
    (c[i] / √d)² and of (c[j] / √d)² << 32, squared in float32 as the searches by comparison square them.
    """
    b = boundaries.detach().to("cpu", torch.float32)
    sq = scaled_centroids.detach().to("cpu", torch.float32) ** 2
    magic = torch.tensor(12582912.0, dtype=torch.float32)  # 1.5·2^23: adding it rounds to an integer

    def bits(t: torch.Tensor) -> torch.Tensor:  # float32 -> its bits as a non-negative int64
        return t.view(torch.int32).long() & 0xFFFFFFFF

    for shift in range(_GRID_MAX_SHIFT + 1):
        r = (b * 2.0**shift + magic).view(torch.int32) - 0x4B400000  # RNE(b·2^shift), as the kernel computes it
        if torch.unique(r).numel() < r.numel():
            continue
        bins = 2
        while bins // 2 <= max(int(r.max()), -int(r.min()) - 1):
            bins *= 2
        k = (r + bins // 2).long()  # the boundaries' bins, ascending and distinct
        below = torch.searchsorted(k, torch.arange(bins))  # boundaries in lower bins
        has = torch.zeros(bins, dtype=torch.bool)
        has[k] = True
        bound = torch.full((bins,), float("inf"), dtype=torch.float32)
        bound[k] = b
        above = torch.where(has, below + 1, below)
        codes = to_key_codes(torch.arange(sq.numel()), sq.numel().bit_length() - 1)
        row0 = bits(bound) | codes[below] << 32 | codes[above] << 48
        return torch.stack((row0, bits(sq[below]) | bits(sq[above]) << 32)), shift, bins
    return None


# Per key quantizer: table [3·2^b] float32 (boundaries and a pad, centroids, centroids / √d), Πᵀ [D, D], whether
# the codebook is antisymmetric (for search="symmetric"; read once, not on every call), Π Sᵀ [D, D] (prod keys),
# the two fp16 parts of Πᵀ = P0 + SPLIT_SCALE·P1 (the scale keeps P1 a normal fp16 number) and, for MSE keys, the
# grid search's (table, shift, bins) from grid_table (None where the boundaries share a bin). Keyed weakly by the
# quantizer.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
SPLIT_SCALE = 2.0**-11


def _prepare(key_quantizer: TurboQuantMSE | TurboQuantProd) -> dict[str, torch.Tensor | bool]:
    if key_quantizer not in _PREPARED:
        mse = key_quantizer if isinstance(key_quantizer, TurboQuantMSE) else key_quantizer.mse
        pad = mse.boundaries.new_zeros(1)
        # centroids / √d as the reference divides them (tensor / Python float on this device)
        table = torch.cat((mse.boundaries, pad, mse.centroids, mse.centroids / mse.scale)).float().contiguous()
        rot_t = mse.rotation.T.contiguous().float()
        p0 = rot_t.to(torch.float16)
        p1 = ((rot_t.double() - p0.double()) / SPLIT_SCALE).to(torch.float16)
        prep = {"table": table, "rot_t": rot_t, "parts": torch.stack((p0, p1)).contiguous(),
                "antisymmetric": torch.equal(mse.centroids, -mse.centroids.flip(0)), "grid": None}  # fmt: skip
        nc = mse.centroids.numel()
        grid = None if isinstance(key_quantizer, TurboQuantProd) else grid_table(table[: nc - 1], table[2 * nc :])
        if grid is not None:  # (MSE keys only: prod keys need the centroid itself, which the table does not hold)
            prep["grid"] = (grid[0].to(table.device), grid[1], grid[2])
        if isinstance(key_quantizer, TurboQuantProd):
            prep["m_t"] = (mse.rotation.double() @ key_quantizer.qjl.double().T).float().contiguous()
        _PREPARED[key_quantizer] = prep
    return _PREPARED[key_quantizer]


def _buffer_specs(d: int, key_bits: int, prod: bool, value_bits: int, group: int) -> dict:
    specs = {
        "key_codes": ((d * key_bits // 8,), torch.uint8),
        "key_norms": ((), torch.float16),
        "value_codes": ((d * value_bits // 8,), torch.uint8),
        "value_affine": ((d // group, 2), torch.float16),
    }
    if prod:
        specs["key_signs"] = ((d // 8,), torch.uint8)
        specs["key_rnorms"] = ((), torch.float16)
    return specs


def encode_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    buffers: dict[str, torch.Tensor],
    slots: torch.Tensor,
    *,
    key_quantizer: TurboQuantMSE | TurboQuantProd,
    value_quantizer: ValueQuantizer,
    key_mean: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    check_slots: bool = True,
    **launch,
) -> None:
    """Quantize k, v and write their packed rows into the cache buffers at ``slots`` (one launch for a small
    chunk, else two: keys, values).

    Writes exactly the rows ``TurboQuantKVCache._encode`` produces (TurboQuant, arXiv:2504.19874,
    Algorithm 1 for MSE keys, Algorithm 2 for prod keys; per-group affine values), in place.

    Args:
        k, v: [B, H_kv, N, D] float32 / float16 / bfloat16, last dim contiguous (other strides free,
            so a slice of a larger tensor needs no copy); D in (64, 128, 256).
        buffers: the cache buffers, each contiguous on k's device, with C the capacity:
            ``key_codes`` uint8 [B, H_kv, C, D·kb/8] (kb = key bits, minus 1 for prod keys),
            ``key_norms`` float16 [B, H_kv, C], ``value_codes`` uint8 [B, H_kv, C, D·vb/8],
            ``value_affine`` float16 [B, H_kv, C, D/g, 2] (scale, zero per group); prod keys also
            ``key_signs`` uint8 [B, H_kv, C, D/8] and ``key_rnorms`` float16 [B, H_kv, C].
            Other entries (window, seq_lens) are ignored.
        slots: [N] int64 on k's device, distinct slot indices in [0, C), the same for every
            (batch, head): token n is written to ``buffers[...][:, :, slots[n]]``.
        key_quantizer: the TurboQuantMSE or TurboQuantProd whose rows the cache stores.
        value_quantizer: the ValueQuantizer (group size g dividing D).
        key_mean, key_scale: optional [B, H_kv, D] float32 contiguous: the keys are quantized as (k - key_mean) /
            key_scale (in float32, as TurboQuantKVCache centres and scales them), without a copy of k.
        check_slots: verify 0 <= slots < C on the host (a device sync; pass False inside a
            CUDA graph capture or when the caller guarantees the range).
        launch: overrides of LAUNCH_DEFAULTS (block_n, small_rows, chunk, num_warps, num_stages,
            precision, split, value_block_n, value_num_warps, search, max_registers).

    Unlike the reference, values outside the float16 range are stored as ±inf instead of raising.
    """
    unknown = set(launch) - set(LAUNCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown launch options {sorted(unknown)}; allowed: {sorted(LAUNCH_DEFAULTS)}")
    launch = {**LAUNCH_DEFAULTS, **launch}
    if launch["search"] is not None and launch["search"] not in SEARCHES:
        raise ValueError(f"search must be None or one of {SEARCHES}, got {launch['search']!r}")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H_kv, N, D], got {tuple(t.shape)}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {t.stride()}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.device != v.device:
        raise ValueError(f"k and v must be on the same device, got {k.device} and {v.device}")
    b, h, n, d = k.shape
    if d not in ENCODE_HEAD_DIMS:
        raise ValueError(f"the fused encode kernel supports head_dim 64, 128 or 256, got {d}")

    if isinstance(key_quantizer, TurboQuantProd):
        prod, mse = True, key_quantizer.mse
    elif isinstance(key_quantizer, TurboQuantMSE):
        prod, mse = False, key_quantizer
    else:
        raise ValueError(f"key_quantizer must be a TurboQuantMSE or TurboQuantProd, got {type(key_quantizer).__name__}")
    if not isinstance(value_quantizer, ValueQuantizer):
        raise ValueError(f"value_quantizer must be a ValueQuantizer, got {type(value_quantizer).__name__}")
    if mse.head_dim != d:
        raise ValueError(f"key_quantizer has head_dim={mse.head_dim} but k has D={d}")
    if mse.rotation.device != k.device or (prod and key_quantizer.qjl.device != k.device):
        raise ValueError(f"key_quantizer lives on {mse.rotation.device} but k is on {k.device}")
    group = value_quantizer.group_size
    if d % group:  # D is a power of two, so the group size is one too
        raise ValueError(f"value_quantizer.group_size={group} must divide D={d}")

    specs = _buffer_specs(d, mse.bits, prod, value_quantizer.bits, group)
    missing = sorted(set(specs) - set(buffers))
    if missing:
        raise ValueError(f"buffers lacks {missing} (needed for key_mode={'prod' if prod else 'mse'})")
    codes = buffers["key_codes"]
    c = codes.shape[2] if isinstance(codes, torch.Tensor) and codes.dim() == 4 else -1
    for name, (tail, dtype) in specs.items():
        t = buffers[name]
        expect = (b, h, c, *tail)
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != expect:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"buffer {name} must be {dtype} [B, H_kv, C, ...] = {expect}, got {got}")
        if t.device != k.device or not t.is_contiguous():
            raise ValueError(f"buffer {name} must be contiguous and on {k.device}")
    check_value_affine(buffers["value_affine"])

    if not isinstance(slots, torch.Tensor) or slots.dtype != torch.int64 or slots.shape != (n,):
        got = f"{slots.dtype} {tuple(slots.shape)}" if isinstance(slots, torch.Tensor) else type(slots).__name__
        raise ValueError(f"slots must be an int64 tensor of shape [N={n}], got {got}")
    if slots.device != k.device:
        raise ValueError(f"slots must be on {k.device}, got {slots.device}")
    if not slots.is_contiguous():
        raise ValueError("slots must be contiguous")
    for name, t in (("key_mean", key_mean), ("key_scale", key_scale)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (b, h, d)
                                  and t.is_contiguous() and t.device == k.device):  # fmt: skip
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a contiguous float32 tensor [B, H_kv, D] = {(b, h, d)} on {k.device}, "
                             f"got {got}")  # fmt: skip
    if n == 0 or b * h == 0:
        return
    if check_slots:
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"slots must lie in [0, C={c}), got values in [{lo}, {hi}]")

    plan = EncodePlan(k, v, buffers, key_quantizer=key_quantizer, value_quantizer=value_quantizer, launch=launch,
                      centred=key_mean is not None, scaled=key_scale is not None)  # fmt: skip
    plan(k, v, slots, key_mean, key_scale)


class EncodePlan:
    """The launches of encode_kv for fixed cache buffers and quantizers, decided once (prepared tables, codebook
    search, block sizes, compile-time constants) for chunks of one shape and dtype. Calling it launches them for a
    chunk without re-checking it: encode_kv builds one per call after validating its inputs; a cache keeps one
    across steps (its buffers must stay the same tensors). k, v: example chunks, as every call will pass;
    centred, scaled: whether calls pass a key mean, key scales (encode_kv's key_mean, key_scale). ``label`` says
    what it launches; ``key_register_cap`` is the key kernel's register cap per thread in its long launch (0: none;
    applied on CUDA only)."""

    def __init__(
        self, k: torch.Tensor, v: torch.Tensor, buffers: dict[str, torch.Tensor], *,
        key_quantizer: TurboQuantMSE | TurboQuantProd, value_quantizer: ValueQuantizer, launch: dict,
        centred: bool = False, scaled: bool = False,
    ):  # fmt: skip
        prod = isinstance(key_quantizer, TurboQuantProd)
        mse = key_quantizer.mse if prod else key_quantizer
        b, h, n, d = k.shape
        c = buffers["key_codes"].shape[2]
        # the rotation: the stored 16-bit keys times 16-bit parts of Πᵀ, exactly ("x16"); MSE keys in float32, and
        # centred or scaled ones (float32 values), as the unit vector in two fp16 parts ("u16"); see _encode_keys.
        # Prod keys take one fp32 dot there: on the H200 (Triton 3.6) their u16 launches wrote wrong codes or faulted
        # (an illegal memory access) where the CPU interpreter writes the reference's rows
        stored16 = k.dtype in (torch.float16, torch.bfloat16) and not (centred or scaled)
        rotate = ("x16" if stored16 else "fp32" if prod else "u16") if launch["split"] else "fp32"
        prep = _prepare(key_quantizer)
        search = launch["search"]
        if search is None:
            search = "grid" if not prod and mse.bits >= 3 and prep["grid"] is not None else "full"
        if search == "symmetric" and not prep["antisymmetric"]:
            raise ValueError('search="symmetric" needs an antisymmetric codebook (c[i] = -c[2^b - 1 - i])')
        if search == "grid" and (prod or prep["grid"] is None):
            why = "prod keys" if prod else f"boundaries closer than 2^-{_GRID_MAX_SHIFT} apart"
            raise ValueError(f'search="grid" is for MSE keys with boundaries in distinct bins, not {why}')
        grid, grid_shift, grid_bins = prep["grid"] if search == "grid" else (prep["table"], 0, 2)
        # on CUDA the lookup is inline PTX, elsewhere (the interpreter) its portable twin
        grid_asm = _grid_asm(grid_shift, grid_bins, mse.norm_correction) if search == "grid" and k.is_cuda else ""
        rows = b * h * n
        if rows >= 2**31:
            raise ValueError(f"at most 2^31 - 1 rows (B·H_kv·N) per call, got {rows}: append in smaller chunks")
        small = rows <= launch["small_rows"]
        auto_n, auto_chunk, auto_warps, auto_cap = _key_launch(mse.bits, prod, d, rotate)
        block_n = 16 if small else launch["block_n"] or auto_n
        # a small chunk: 4 warps, at head_dim 256 those of its kind's long launch (the same registers per thread)
        num_warps = (4 if d <= 128 else auto_warps) if small else launch["num_warps"] or auto_warps
        self.buffers = buffers
        self._key_args = (
            prep["table"], grid, prep["rot_t"], prep["parts"] if rotate != "fp32" else prep["rot_t"],
            prep["m_t"] if prod else prep["rot_t"],
            buffers["key_codes"], buffers["key_norms"], buffers["key_signs"] if prod else buffers["key_codes"],
            buffers["key_rnorms"] if prod else buffers["key_norms"],
        )  # fmt: skip
        self._key_consts = dict(
            D=d, KEY_BITS=mse.bits, NC=2**mse.bits, PROD=prod, NORM_CORRECTION=mse.norm_correction,
            SCALE=mse.scale, TINY=_TINY, ROTATE=rotate, SPLIT_SCALE=SPLIT_SCALE,
            BN=block_n, DC=min(launch["chunk"] or auto_chunk, d), PRECISION=launch["precision"], SEARCH=search,
            GRID_SHIFT=grid_shift, GRID_BINS=grid_bins, GRID_ASM=grid_asm, CENTER=centred, KEY_SCALE=scaled,
            num_warps=num_warps, num_stages=launch["num_stages"],
        )  # fmt: skip
        # the key kernel's register cap per thread in the long launch (the automatic one goes with the automatic rows
        # and warps); applied on CUDA only
        if small:
            cap = 0
        elif launch["max_registers"] is not None:
            cap = launch["max_registers"]
        else:
            cap = 0 if launch["block_n"] or launch["num_warps"] else auto_cap
        self.key_register_cap = cap
        if cap and k.is_cuda:
            self._key_consts["maxnreg"] = cap
        value_block_n = 16 if small else launch["value_block_n"]
        # 2 warps up to head_dim 128, 4 at 256: the same values per thread (at 256, 32 rows on 2 warps take 245-255
        # registers and spill 2-bit values, in the offline sm_90 compile; 128 and no spill on 4)
        value_warps = launch["value_num_warps"] or (4 if d > 128 else 2)
        self._value_consts = dict(D=d, VALUE_BITS=value_quantizer.bits, GROUP=value_quantizer.group_size,
                                  BN=value_block_n, num_warps=value_warps)  # fmt: skip
        self._rows = (rows, n, h, c)
        self._one_launch = small  # keys and values of the same rows in one program
        # prepared launches (kernels.launch.PreparedLaunch): a cache launches them at every append. The key kernel's
        # buffer arguments follow K and SLOTS in its signature (and in _encode_kv_kernel's, by the same names)
        row_fixed = dict(R=rows, N=n, H=h, C=c)
        key_names = _encode_keys_kernel.arg_names[2 : 2 + len(self._key_args)]
        key_fixed = {**dict(zip(key_names, self._key_args, strict=True)), **row_fixed}
        value_fixed = dict(VC=buffers["value_codes"], VA=buffers["value_affine"], **row_fixed)
        key_grid, value_grid = (triton.cdiv(rows, block_n),), (triton.cdiv(rows, value_block_n),)
        if small:
            vc = self._value_consts
            both = dict(self._key_consts, VALUE_BITS=vc["VALUE_BITS"], GROUP=vc["GROUP"])
            self._launches = (PreparedLaunch(_encode_kv_kernel, key_grid, both, {**key_fixed, **value_fixed}),)
        else:
            keys = PreparedLaunch(_encode_keys_kernel, key_grid, self._key_consts, key_fixed)
            value_launch = PreparedLaunch(_encode_values_kernel, value_grid, self._value_consts, value_fixed)
            self._launches = (keys, value_launch)
        values = "" if self._one_launch else f" values {value_block_n} rows {value_warps} warps"
        self.label = (f"{block_n} rows {num_warps} warps chunk {self._key_consts['DC']} {search} {rotate}"
                      + (f" cap {cap}" if cap else "") + (" one launch" if self._one_launch else values))  # fmt: skip

    @property
    def key_kernel_constants(self) -> dict:
        """The compile-time constants and launch options (num_warps, num_stages) of the key kernel."""
        return dict(self._key_consts)

    def key_kernel_args(self, k: torch.Tensor, slots: torch.Tensor, key_mean: torch.Tensor,
                        key_scale: torch.Tensor) -> tuple:  # fmt: skip
        """The runtime arguments of the key kernel (_encode_keys_kernel) for a chunk k at slots, in its order;
        key_mean, key_scale: float32 tensors (any, where the plan was built without them)."""
        return (k, slots, *self._key_args, key_mean, key_scale, *self._rows, k.stride(0), k.stride(1), k.stride(2))

    def __call__(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, key_mean: torch.Tensor | None = None,
                 key_scale: torch.Tensor | None = None) -> None:  # fmt: skip
        """Write the chunk k, v [B, H_kv, N, D] (the plan's shape and dtype) at ``slots`` [N], keys as (k - key_mean)
        / key_scale where the plan was built for them (see encode_kv)."""
        unused = self._key_args[2]  # a float32 tensor in the place of an absent mean or scale
        km = unused if key_mean is None else key_mean
        ks = unused if key_scale is None else key_scale
        with on_device(k.device):
            try:
                if self._one_launch:
                    self._launches[0](k, v, slots, km, ks, k.stride(0), k.stride(1), k.stride(2), v.stride(0),
                                      v.stride(1), v.stride(2))  # fmt: skip
                    return
                self._launches[0](k, slots, km, ks, k.stride(0), k.stride(1), k.stride(2))
                self._launches[1](v, slots, v.stride(0), v.stride(1), v.stride(2))
            except OutOfResources as err:  # raised at the first launch of a configuration
                raise ValueError(
                    f"the encode launch ({self.label}) needs {err.required} of {err.name} where this GPU has "
                    f"{err.limit}: pass a smaller chunk or block_n"
                ) from err
