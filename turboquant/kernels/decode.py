"""Fused decode attention straight from the compressed cache (flash-decoding, Triton).

Algorithm (the reference is ``TurboQuantKVCache.attend_with_lse``):
- the host rotates each query once, q_rot = Πq (and S q for prod keys); the kernels multiply them by
  q_scale = softmax scale · log2(e) as they load them, and never de-rotate a key;
- grid (B·H_kv, splits, row tiles): one program owns one KV head, a range of token slots and up to
  MAX_ROWS (64) of the head's G·N_q query rows (GQA), which share every dequantised K/V tile through
  tl.dot; a decode step (and up to 16 speculative queries at GQA 4) is one row tile, a longer chunk
  of queries takes more (the 2-D kernel holds 8 rows of a decode step of GQA up to 8 in 16-row tiles, the
  tensor cores' least, and drops the padding rows' softmax work);
- a key's codes are unpacked from the planar layout (packing.pack_planar) into fields of contiguous
  columns, each dotted with the matching slice of the query; the key norm (and, for prod keys, γ) is
  applied once per score;
- values are dequantised in registers (code · scale + zero per group);
- online softmax in base 2; each split writes its partial output and log-sum-exp, and a second
  kernel merges the splits (optionally with exact key/value rows: the step's own tokens and the sink tokens,
  per query row in ``_merge_splits_kernel``; with a full-precision window of recent tokens too, per KV head in
  ``_merge_window_kernel``, which reads the window once for all the head's query rows). On sm_90+ the merge is a
  programmatic dependent launch that attends the exact rows before it waits for the splits' results.
The grid depends only on the cache capacity, lengths are read on the device, and workspaces are
cached, so a decode step can be captured in a CUDA graph.

Two split kernels:
- ``_decode_split_kernel_2d`` (every configuration of 2-4-bit MSE or prod keys with 2/4-bit values at
  head_dim 64/128/256, where its tiles are at least 16 wide): 2-D tiles, the key tile never transposed, and
  on CUDA the unpacking in inline PTX (``key_asm_code``, ``_value_asm``, ``_sign_asm``): centroids looked
  up with prmt byte permutes from tables (``key_lookup_tables``), value codes masked into the mantissa of
  a power of two and scaled with one f16x2 fma. Key codes are read as int16 elements (two of them fill a
  32-bit register) and the key lookup's only operands are the codes, so Triton loads them from shared
  memory straight into the tensor-core operand layout (ldmatrix) and the lookup writes operand registers:
  each output register pairs the same code of the two elements, as the operand pairs adjacent columns; the
  field tiles follow (``_query_tiles`` gives each tile's query columns). The value tiles are still staged
  through shared memory for the P·V product (their per-group scale and zero operands keep Triton from
  laying the lookup out in the operand layout). A portable Triton twin computes the same tiles in the CPU
  interpreter, and tests/test_inline_ptx.py runs the PTX strings in a CPU model of their instructions.
- ``_decode_split_kernel``: the generic 3-D-field kernel for the rest (1-bit keys, 3- and 8-bit values, ...).
"""

from __future__ import annotations

import collections
import functools

import torch
import triton
import triton.language as tl

from .launch import PreparedLaunch, check_value_affine, on_device

__all__ = [
    "decode_attention",
    "kernel_2d_constants",
    "key_asm_code",
    "key_lookup_tables",
    "num_splits_for",
    "tiles_2d_layout",
]

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)


@triton.jit
def _load_fields(p_row, m_n, BITS: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, P: tl.constexpr,
                 DP: tl.constexpr):  # fmt: skip
    """Planar-packed codes of BN rows -> [P, BN, DP] int32 (field f = columns [f·DP, (f+1)·DP))."""
    o_c = tl.arange(0, DP)
    o_f = tl.arange(0, P)
    if BITS == 3:
        # 2-bit plane: field f is byte columns [(f % 2)·DP, ...) shifted by 2·(f // 2)
        o_h = tl.arange(0, 2)
        p_lo = p_row[None, :, None] + o_h[:, None, None] * DP + o_c[None, None, :]  # [2, BN, DP]
        b_lo = tl.load(p_lo, mask=m_n[None, :, None], other=0).to(tl.int32)
        b_lo = tl.reshape(tl.broadcast_to(b_lo[None, :, :, :], (4, 2, BN, DP)), (8, BN, DP))
        lo = (b_lo >> ((o_f // 2) * 2)[:, None, None]) & 3
        # 1-bit plane after the d/4 bytes of the 2-bit plane: field f is bit f
        p_hi = p_row[:, None] + D // 4 + o_c[None, :]  # [BN, DP]
        b_hi = tl.load(p_hi, mask=m_n[:, None], other=0).to(tl.int32)
        hi = (b_hi[None, :, :] >> o_f[:, None, None]) & 1
        return lo | (hi << 2)
    else:
        b = tl.load(p_row[:, None] + o_c[None, :], mask=m_n[:, None], other=0).to(tl.int32)  # [BN, DP]
        return (b[None, :, :] >> (o_f * BITS)[:, None, None]) & ((1 << BITS) - 1)


@triton.jit
def _load_key_fields(p_row, m_n, BITS: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, P: tl.constexpr,
                     DP: tl.constexpr):  # fmt: skip
    """Key codes of BN rows (packing.pack_key_codes) -> [P, BN, DP] int32, as _load_fields. At 4 bits the sign of
    a nibble may sit in the other byte of its 16-bit element: byte 2e holds the signs of its own low nibble (bit 7)
    and of byte 2e + 1's low nibble (bit 3); byte 2e + 1 those of byte 2e's high nibble (bit 7) and of its own
    high nibble (bit 3)."""
    if BITS == 4:
        o_c = tl.arange(0, DP)
        b = tl.load(p_row[:, None] + o_c[None, :], mask=m_n[:, None], other=0).to(tl.int32)  # [BN, DP]
        b_o = tl.load(p_row[:, None] + (o_c ^ 1)[None, :], mask=m_n[:, None], other=0).to(tl.int32)  # the other
        even = (o_c % 2 == 0)[None, :]
        s_lo = tl.where(even, b >> 7, b_o >> 3) & 1
        s_hi = tl.where(even, b_o >> 7, b >> 3) & 1
        o_f = tl.arange(0, P)[:, None, None]
        sign = tl.where(o_f == 0, s_lo[None, :, :], s_hi[None, :, :])
        return ((b[None, :, :] >> (o_f * 4)) & 7) | (sign << 3)
    else:
        return _load_fields(p_row, m_n, BITS, D, BN, P, DP)


@triton.jit
def _fields_scores(q, q_t, k, DP: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """Σ_f q[f] @ k[f]ᵀ: q [P, M, DP] (q_t = q permuted to [P, DP, M]), k [P, N, DP] -> [M, N] float32.

    KEY_MAJOR computes (Σ_f k[f] @ q[f]ᵀ)ᵀ, transposing the small [N, M] result instead of the key tile.
    """
    if DP >= 16:
        if KEY_MAJOR:
            return tl.trans(tl.sum(tl.dot(k, q_t), axis=0))
        else:
            return tl.sum(tl.dot(q, tl.permute(k, (0, 2, 1))), axis=0)
    else:
        return tl.sum(tl.sum(q[:, :, None, :].to(tl.float32) * k[:, None, :, :].to(tl.float32), axis=3), axis=0)


@triton.jit
def _fields_dot_nn(p, v, P: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr):
    """p @ v[f] for every field: p [M, N], v [P, N, DP] -> [P, M, DP] float32."""
    if DP >= 16:
        return tl.dot(tl.broadcast_to(p[None, :, :], (P, BM, BN)), v)
    else:
        return tl.sum(p[None, :, :, None].to(tl.float32) * v[:, None, :, :].to(tl.float32), axis=2)


@triton.jit
def _split_range(i_b, i_s, SEQ_LEN, KV_START, Q_START, SPLIT_SIZE, N_Q, CAUSAL: tl.constexpr):
    """Slots [start, end) of split i_s for sequence i_b, and the position of its first query: left padding
    (slots before kv_start) skipped and, with CAUSAL, nothing after the last query's position."""
    q_start = tl.load(Q_START + i_b).to(tl.int32)
    start = i_s * SPLIT_SIZE
    end = tl.minimum(start + SPLIT_SIZE, tl.load(SEQ_LEN + i_b).to(tl.int32))
    start = tl.maximum(start, tl.load(KV_START + i_b).to(tl.int32))
    if CAUSAL:
        end = tl.minimum(end, q_start + N_Q)
    return start, end, q_start


@triton.jit
def _online_softmax_step(b_s, b_m, b_l):
    """One tile of the online softmax in base 2: scores b_s [M, N] (-inf where masked), running max b_m and
    sum b_l [M] -> (probabilities [M, N], rescale factor of earlier tiles [M], new max, new sum)."""
    m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(b_m - m_safe)
    b_p = tl.exp2(b_s - m_safe[:, None])
    return b_p, alpha, m_new, b_l * alpha + tl.sum(b_p, axis=1)


@triton.jit
def _decode_split_kernel(
    Q, SQ, KC, KN, KS, KR, VC, VA, CB, SEQ_LEN, KV_START, Q_START, O_PART, L_PART,
    H_KV, C, M, N_Q, SPLIT_SIZE, Q_SCALE,
    D: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP: tl.constexpr,
    PROD: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    P_K: tl.constexpr, DP_K: tl.constexpr, P_V: tl.constexpr, DP_V: tl.constexpr,
    NUM_SPLITS: tl.constexpr, REGISTER_CODEBOOK: tl.constexpr, KEY_MAJOR: tl.constexpr,
):  # fmt: skip
    i_bh = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    start, end, q_start = _split_range(i_bh // H_KV, i_s, SEQ_LEN, KV_START, Q_START, SPLIT_SIZE, N_Q, CAUSAL)

    o_m = tl.program_id(2) * BM + tl.arange(0, BM)  # this program's query rows
    m_m = o_m < M
    q_pos = q_start + o_m % N_Q  # [BM] position of each query row
    # query fields: [P_K, BM, DP_K]
    o_fk = tl.arange(0, P_K)
    o_ck = tl.arange(0, DP_K)
    p_q = Q + i_bh * M * D + o_m[None, :, None] * D + (o_fk * DP_K)[:, None, None] + o_ck[None, None, :]
    b_q = (tl.load(p_q, mask=m_m[None, :, None], other=0.0) * Q_SCALE).to(tl.float16)
    b_qt = tl.permute(b_q, (0, 2, 1))  # [P_K, DP_K, BM]
    if PROD:
        o_fs = tl.arange(0, 8)
        o_cs = tl.arange(0, D // 8)
        p_sq = SQ + i_bh * M * D + o_m[None, :, None] * D + (o_fs * (D // 8))[:, None, None] + o_cs[None, None, :]
        b_sq = (tl.load(p_sq, mask=m_m[None, :, None], other=0.0) * Q_SCALE).to(tl.float16)  # [8, BM, D/8]
        b_sqt = tl.permute(b_sq, (0, 2, 1))

    KB: tl.constexpr = D * (KEY_BITS if not PROD else KEY_BITS - 1) // 8
    VB: tl.constexpr = D * VALUE_BITS // 8
    NG: tl.constexpr = D // GROUP
    o_fv = tl.arange(0, P_V)
    o_cv = tl.arange(0, DP_V)

    NC: tl.constexpr = 2 ** (KEY_BITS - PROD)
    if REGISTER_CODEBOOK:
        b_cb = tl.load(CB + tl.arange(0, NC))  # [NC]
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([P_V, BM, DP_V], dtype=tl.float32)
    for n0 in range(start, end, BN):
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < end
        row = i_bh * C + o_n.to(tl.int64)  # [BN] token rows of this head
        # scores: [BM, BN]
        k_idx = _load_key_fields(KC + row * KB, m_n, KEY_BITS - PROD, D, BN, P_K, DP_K)
        if REGISTER_CODEBOOK:  # centroids held in registers, looked up with a gather
            b_k = tl.gather(tl.broadcast_to(b_cb[None, None, :], (P_K, BN, NC)), k_idx, axis=2)
        else:  # centroids gathered from global memory (L1-resident)
            b_k = tl.load(CB + k_idx)
        b_k = b_k.to(tl.float16)  # [P_K, BN, DP_K] centroids (√d units)
        b_s = (
            _fields_scores(b_q, b_qt, b_k, DP_K, KEY_MAJOR)
            * tl.load(KN + row, mask=m_n, other=0.0).to(tl.float32)[None, :]
        )
        if PROD:
            bits = _load_fields(KS + row * (D // 8), m_n, 1, D, BN, 8, D // 8)
            b_sgn = (bits * 2 - 1).to(tl.float16)  # [8, BN, D/8]
            b_r = tl.load(KR + row, mask=m_n, other=0.0).to(tl.float32)
            b_s += _fields_scores(b_sq, b_sqt, b_sgn, D // 8, KEY_MAJOR) * b_r[None, :]
        visible = m_n[None, :]
        if CAUSAL:
            visible = visible & (o_n[None, :] <= q_pos[:, None])
        b_s = tl.where(visible, b_s, float("-inf"))
        # online softmax (base 2)
        b_p, alpha, m_new, b_l = _online_softmax_step(b_s, b_m, b_l)
        # values: [P_V, BN, DP_V]
        codes = _load_fields(VC + row * VB, m_n, VALUE_BITS, D, BN, P_V, DP_V).to(tl.float32)
        if DP_V >= GROUP:
            o_g = tl.arange(0, DP_V // GROUP)
            p_g = row[None, :, None] * NG + (o_fv * (DP_V // GROUP))[:, None, None] + o_g[None, None, :]
            m_g = m_n[None, :, None]
            b_sc = tl.load(VA + 2 * p_g, mask=m_g, other=0.0).to(tl.float32)  # [P_V, BN, DP_V/GROUP]
            b_z = tl.load(VA + 2 * p_g + 1, mask=m_g, other=0.0).to(tl.float32)
            b_sc = tl.reshape(tl.broadcast_to(b_sc[:, :, :, None], (P_V, BN, DP_V // GROUP, GROUP)), (P_V, BN, DP_V))
            b_z = tl.reshape(tl.broadcast_to(b_z[:, :, :, None], (P_V, BN, DP_V // GROUP, GROUP)), (P_V, BN, DP_V))
        else:
            p_g = row[None, :, None] * NG + ((o_fv * DP_V) // GROUP)[:, None, None]  # [P_V, BN, 1]
            b_sc = tl.load(VA + 2 * p_g, mask=m_n[None, :, None], other=0.0).to(tl.float32)
            b_z = tl.load(VA + 2 * p_g + 1, mask=m_n[None, :, None], other=0.0).to(tl.float32)
        b_v = (codes * b_sc + b_z).to(tl.float16)
        b_acc = b_acc * alpha[None, :, None] + _fields_dot_nn(b_p.to(tl.float16), b_v, P_V, BM, BN, DP_V)
        b_m = m_new

    # partial results, normalised; lse in base 2 (-inf where this split saw nothing)
    b_out = b_acc / tl.where(b_l == 0.0, 1.0, b_l)[None, :, None]
    part = (i_bh * NUM_SPLITS + i_s) * (tl.num_programs(2) * BM)
    p_o = O_PART + (part + o_m)[None, :, None] * D + (o_fv * DP_V)[:, None, None] + o_cv[None, None, :]
    tl.store(p_o, b_out, mask=m_m[None, :, None])
    lse = tl.where(b_l == 0.0, float("-inf"), b_m + tl.log2(tl.where(b_l == 0.0, 1.0, b_l)))
    tl.store(L_PART + part + o_m, lse, mask=m_m)


def _value_asm(bits: int) -> str:
    """Inline assembly dequantising values: 4 bytes of planar codes (one 32-bit register, pack=4) -> per field,
    4 values x·s + z in fp16 (elementwise: output k of field f comes from byte k).

    prmt spreads bytes (0, 1) and (2, 3) to the two halves of a register; field f's code, at bits [b·f, b·f + b)
    of each half, is masked in place into the mantissa of the power of two 2^(10 - b·f) (f16 0x6400, 0x5C00,
    0x5400, 0x4C00), whose mantissa bit b·f weighs 1: that gives 2^(10 - b·f) + x exactly, one f16x2 subtraction
    leaves x, one f16x2 fma gives x·s + z with a single rounding. 14 instructions per 8 codes of 4 bits, 26 per
    16 of 2 bits. Operands: outputs $0.. (field f in registers 2f, 2f+1), then the code register, then per
    field two registers of s and two of z (fp16 pairs, elements 0-1 and 2-3).
    """
    fields = 8 // bits
    n_out = 2 * fields
    src = n_out  # the code register
    lines = ["{ .reg .b32 x0, x1, t, k;", f"prmt.b32 x0, ${src}, 0, 0x4140;", f"prmt.b32 x1, ${src}, 0, 0x4342;"]
    for f in range(fields):
        base = (25 - bits * f) << 10  # fp16 bit pattern of 2^(10 - b·f)
        mask = ((1 << bits) - 1) << (bits * f)
        scale, zero = src + 1 + 4 * f, src + 3 + 4 * f
        lines.append(f"mov.b32 k, {base * 0x10001:#x};")
        for x in range(2):
            lines += [f"lop3.b32 t, x{x}, {mask * 0x10001:#x}, k, 0xEA;", "sub.f16x2 t, t, k;",
                      f"fma.rn.f16x2 ${2 * f + x}, t, ${scale + x}, ${zero + x};"]  # fmt: skip
    return "\n".join(lines + ["}"])


_VALUE_ASM_4 = tl.constexpr(_value_asm(4))
_VALUE_ASM_2 = tl.constexpr(_value_asm(2))


def key_lookup_tables(codebook: torch.Tensor) -> torch.Tensor:
    """prmt byte tables of the key centroid lookup: int32 [4] on the codebook's device (no host transfer).

    codebook: [2^b] (b = 2, 3, 4) centroids divided by √d in the order of the stored codes: ascending for 2 and 3
    bits, sign-magnitude for 4 (packing.to_key_codes: codes 0-7 the magnitudes, ascending). The tables hold
    the fp16 bit patterns of codes 0-7 (padded with zeros to 8 for 2 bits): low bytes of entries 0-3, low bytes
    of 4-7, high bytes of 0-3, high bytes of 4-7."""
    n = codebook.numel()
    if n not in (4, 8, 16):
        raise ValueError(f"the key lookup takes codebooks of 4, 8 or 16 centroids, got {n}")
    entries = codebook[:8]
    bits = entries.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    bits = torch.cat((bits, bits.new_zeros(8 - bits.numel())))
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=bits.device)
    planes = torch.stack((bits & 0xFF, bits >> 8)).reshape(4, 4)  # [low 0-3, low 4-7, high 0-3, high 4-7]
    words = (planes << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _table_registers(words: tuple[int, ...] | None, operands: list[str]) -> tuple[list[str], list[str], str]:
    """(the four table registers, their declarations, the moves that fill them): the operands as given, or, with
    the table words, four local registers set from immediates (key_asm_code)."""
    if words is None:
        return operands, [], ""
    if len(words) != 4 or not all(isinstance(w, int) for w in words):
        raise ValueError(f"the key lookup takes the four int32 words of key_lookup_tables, got {words!r}")
    names = [f"tab{i}" for i in range(4)]
    return names, names, "".join(f"mov.b32 {n}, {w & 0xFFFFFFFF:#x};\n" for n, w in zip(names, words, strict=True))


def _key4_asm(words: tuple[int, ...] | None = None) -> str:
    """4-bit centroids: two int16 elements of 4 codes each (one 32-bit register, pack=2) -> 4 tiles of fp16
    pairs: output j holds the code of nibble j of element 0 and of element 1, the pairing of a tensor-core operand
    register.

    The codes are sign-magnitude (packing.to_key_codes): nibble j holds the rank of |c| in bits 0-2 (the tables,
    key_lookup_tables, hold the fp16 patterns of the ranks), and its sign sits where packing.pack_key_codes puts
    it: nibble 0's at bit 7 of the element, 1's at bit 15, 2's at bit 3, 3's at bit 11. The bytes are reordered
    (0, 2, 1, 3) so that each looked-up pair comes from the two elements; the low and high bytes of |c| are looked
    up four ranks at a time with prmt; the signs of nibbles 0 and 1 are then bit 7 of every byte of the codes as
    given, those of nibbles 2 and 3 bit 7 of every byte of the codes shifted left by 4, each or-ed into the high
    bytes with one lop3; last the bytes are interleaved into f16x2 pairs: 14 instructions per 8 codes. Operands:
    outputs $0-$3, the codes $4, then (without ``words``) the four tables $5, $7, $9, $11 (pack=2 gives each
    32-bit input two registers)."""
    (l0, l1, h0, h1), extra, moves = _table_registers(words, ["$5", "$7", "$9", "$11"])
    return (
        f"{{ .reg .b32 {', '.join(['w', 'r', 'sb', 'la', 'ha', 'lb', 'hb', 't', *extra])};\n"
        + moves
        + "prmt.b32 w, $4, 0, 0x3120;\n"  # bytes (0, 2, 1, 3): element 0's byte k beside element 1's
        "and.b32 r, w, 0x77777777;\n"  # the rank of every code
        "shr.u32 sb, r, 16;\n"
        f"prmt.b32 la, {l0}, {l1}, r;\n prmt.b32 ha, {h0}, {h1}, r;\n"
        f"prmt.b32 lb, {l0}, {l1}, sb;\n prmt.b32 hb, {h0}, {h1}, sb;\n"
        "lop3.b32 ha, ha, $4, 0x80808080, 0xF8;\n"  # ha | ($4 & 0x80808080): the signs of nibbles 0 and 1
        "shl.b32 t, $4, 4;\n lop3.b32 hb, hb, t, 0x80808080, 0xF8;\n"  # those of nibbles 2 and 3
        "prmt.b32 $0, la, ha, 0x6240;\n prmt.b32 $1, la, ha, 0x7351;\n"
        "prmt.b32 $2, lb, hb, 0x6240;\n prmt.b32 $3, lb, hb, 0x7351;\n}"
    )


def _plane_lookup(plane: str, high: str | None, tables: list[str], out) -> list[str]:
    """The lookup of _key_plane_asm and _key3_pairs_asm for one register of 2-bit-plane bytes ``plane`` and, for
    3-bit indices, the register ``high`` holding field f's high bit at bit 2f of each byte: nibble selectors
    A = fields 0, 2 and B = fields 1, 3 of every byte (low 2 bits from the plane, bit 2 from the high plane) index
    an 8-entry prmt table directly; field f of bytes (0, 1) (x = 0) or (2, 3) (x = 1) goes to register out(f, x).
    Uses the scratch registers a, b, s, t, la, ha."""
    l0, l1, h0, h1 = tables
    lines = [f"shr.u32 b, {plane}, 2;"]
    if high is not None:
        lines += [f"shl.b32 t, {high}, 2;", "and.b32 t, t, 0x44444444;", f"lop3.b32 a, {plane}, 0x33333333, t, 0xEA;",
                  f"and.b32 t, {high}, 0x44444444;", "lop3.b32 b, b, 0x33333333, t, 0xEA;"]  # fmt: skip
    else:
        lines += [f"and.b32 a, {plane}, 0x33333333;", "and.b32 b, b, 0x33333333;"]
    for sel, (fa, fb) in (("a", (0, 2)), ("b", (1, 3))):
        for x in range(2):  # bytes (0, 1), then (2, 3)
            if x:
                lines.append(f"shr.u32 s, {sel}, 16;")
            src = "s" if x else sel
            lines += [f"prmt.b32 la, {l0}, {l1}, {src};", f"prmt.b32 ha, {h0}, {h1}, {src};",
                      f"prmt.b32 {out(fa, x)}, la, ha, 0x6240;", f"prmt.b32 {out(fb, x)}, la, ha, 0x7351;"]  # fmt: skip
    return lines


def _key_plane_asm(high: bool, words: tuple[int, ...] | None = None, pairs: bool = False) -> str:
    """2- or 3-bit centroids from 4 bytes of a 2-bit plane (4 fields per byte) and, for 3 bits, 4 bytes of the
    1-bit plane that hold field f's high bit at bit 2f + h (_plane_lookup).

    pairs=False (pack=4 bytes; for 3 bits h, 0 or 1 and the same for the 4 bytes, in the third input): -> 4
    fields × 4 fp16, elementwise (output k of field f from byte k), field f in registers 2f, 2f + 1; 22
    instructions per 16 codes. pairs=True (2 bits only; two int16 elements of 8 codes, pack=2): -> 8 tiles of
    fp16 pairs, tile j = f + 4·b holding field f of byte b of element 0 and of element 1 (the pairing of a
    tensor-core operand register); the bytes are reordered (0, 2, 1, 3) first. Operands: outputs $0-$7, the
    2-bit plane $8, then (3 bits) the 1-bit plane $9 and h $10, then (without ``words``) the four tables
    (key_lookup_tables), one input's registers apart (4, or 2 with pairs)."""
    if high and pairs:
        raise ValueError("3-bit int16 pairs take _key3_pairs_asm")
    t, step = (11 if high else 9), (2 if pairs else 4)
    tables, extra, moves = _table_registers(words, [f"${t + step * i}" for i in range(4)])
    names = ["a", "b", "s", "t", "h", "la", "ha", *(["w"] if pairs else []), *extra]
    lines = [f"{{ .reg .b32 {', '.join(names)};", moves]
    plane = "$8"
    if pairs:
        lines.append("prmt.b32 w, $8, 0, 0x3120;")  # bytes (0, 2, 1, 3): element 0's byte k beside element 1's
        plane = "w"
    if high:
        lines += ["and.b32 h, $10, 1;", "shr.u32 h, $9, h;"]  # bit 2f + h -> bit 2f (other bits are not read)
    lines += _plane_lookup(plane, "h" if high else None, tables,
                           lambda f, x: f"${f + 4 * x}" if pairs else f"${2 * f + x}")  # fmt: skip
    return "\n".join(lines + ["}"])


def _key3_pairs_asm(words: tuple[int, ...] | None = None) -> str:
    """3-bit centroids of a [BN, 16] tile of int16 2-bit-plane elements (head_dim 128), pack=8: the eight elements
    a thread holds of a tensor-core operand, in its register order (row g, columns 2t, 2t+1), (row g + 8, the
    same columns), (row g, columns 2t + 8, 2t + 9), (row g + 8, those), four registers. Plane bytes c and c + 16
    share high-plane byte c mod 16 (bit 2f for c < 16, bit 2f + 1 above), so the high bits of registers 2 and 3
    are those of registers 0 and 1 one bit up: the high tile is loaded for columns 0-7 only (its registers 0
    and 1), and the assembly knows each register's shift from its position, with no per-column operand.

    -> 8 tiles × 4 registers of fp16 pairs, tile j = f + 4·b (field f of byte b of each element), register r of
    tile j at $(4j + r). Per register: the lookup of _key_plane_asm with pairs (_plane_lookup). Operands: outputs
    $0-$31, the plane $32-$35, the high plane $36-$39 (registers 2 and 3 unread), then (without ``words``) the
    four tables, eight registers apart."""
    tables, extra, moves = _table_registers(words, [f"${40 + 8 * i}" for i in range(4)])
    lines = [f"{{ .reg .b32 {', '.join(['a', 'b', 's', 't', 'h', 'la', 'ha', 'w', *extra])};", moves]
    for r in range(4):
        lines += [f"prmt.b32 w, ${32 + r}, 0, 0x3120;", f"prmt.b32 h, ${36 + r % 2}, 0, 0x3120;"]  # bytes (0, 2, 1, 3)
        if r >= 2:
            lines.append("shr.u32 h, h, 1;")  # columns 8-15: bit 2f + 1 -> bit 2f (other bits are not read)
        lines += _plane_lookup("w", "h", tables, lambda f, x, r=r: f"${4 * (f + 4 * x) + r}")
    return "\n".join(lines + ["}"])


@functools.cache
def key_asm_code(key_bits: int, table_words: tuple[int, ...] | None = None, pairs: bool = False) -> str:
    """Inline assembly of the key centroid lookup of _decode_split_kernel_2d for 2-, 3- or 4-bit codebook
    indices. The centroids come in as operands (key_lookup_tables), or, given the four table words (the same
    int32 values on the host), as immediates: the assembly then takes only the codes, which lets Triton read
    them from shared memory straight into the tensor-core operand layout (launch option key_table_source).
    pairs (2 and 3 bits: the key tiles' P_K == 8): int16 elements of the 2-bit plane (3 bits: _key3_pairs_asm), else
    bytes; 4-bit codes are always int16 elements."""
    if key_bits == 4:
        return _key4_asm(table_words)
    if key_bits == 3 and pairs:
        return _key3_pairs_asm(table_words)
    if key_bits in (2, 3):
        return _key_plane_asm(key_bits == 3, table_words, pairs)
    raise ValueError(f"the key lookup takes 2-, 3- or 4-bit indices, got {key_bits}")


@triton.jit
def _key_fields(KC, row, m_n, b_cb, kt0, kt1, kt2, kt3, KEY_BITS: tl.constexpr, D: tl.constexpr,
                P_K: tl.constexpr, DP_K: tl.constexpr, KEY_ASM: tl.constexpr, TABLES_IN_ASM: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """Centroids (√d units, fp16) of BN keys as P_K field tiles [BN, DP_K] (k0-k7; unused ones repeat k0), in the
    columns of _query_tiles.

    4 bits: the codes read as int16 elements of 4 codes, tile j = nibble j of element e; 2 and 3 bits with
    P_K = 8 (head_dim 128): the 2-bit plane as int16 elements of 8 codes, tile f + 4b = field f of byte b of
    element e, for 3 bits with the high bits from int16 element e mod DP_K/2 of the 1-bit plane, bit 2f + e //
    (DP_K/2) of each byte (_key3_pairs_asm). There the inline assembly turns the elements into tensor-core operand
    registers directly. 2 and 3 bits with P_K = 4: bytes, tile f = field f of byte e of the 2-bit plane, for 3 bits
    with the high bit of column f·D/4 + e from bit 2f + e // (D/8) of byte e mod D/8 of the 1-bit plane. With
    KEY_ASM: kt0-kt3, the int32 tables of key_lookup_tables (TABLES_IN_ASM: none, the assembly holds them); else
    b_cb, the [BN, 2^kb] codebook (in the order of the stored codes) of the portable lookup."""
    KB: tl.constexpr = D * KEY_BITS // 8  # bytes per key
    PAIRS: tl.constexpr = P_K == 8 or KEY_BITS == 4  # int16 elements, else bytes
    o_k = tl.arange(0, DP_K)
    if PAIRS:
        KC16 = KC.to(tl.pointer_type(tl.int16))
        p_k = KC16 + row[:, None] * (KB // 2) + o_k[None, :]
    else:
        p_k = KC + row[:, None] * KB + o_k[None, :]
    if MASKED:
        kb = tl.load(p_k, mask=m_n[:, None], other=0)
    else:
        kb = tl.load(p_k)
    if KEY_BITS == 3 and PAIRS:  # the 1-bit plane (after the D/4 bytes of the 2-bit plane) as int16 elements
        H: tl.constexpr = DP_K // 2  # element e's high bits: element e mod H, bit 2f + e // H of each byte
        p_h = KC16 + row[:, None] * (KB // 2) + DP_K + (o_k % H)[None, :]
        if KEY_ASM != "":  # columns < H only (_key3_pairs_asm)
            hb = tl.load(p_h, mask=m_n[:, None] & (o_k < H)[None, :], other=0)
        elif MASKED:
            hb = tl.load(p_h, mask=m_n[:, None], other=0)
        else:
            hb = tl.load(p_h)
    elif KEY_BITS == 3:  # the 1-bit plane as bytes, shifted per column
        H: tl.constexpr = DP_K // 2
        p_h = KC + row[:, None] * KB + DP_K + (o_k % H)[None, :]
        if MASKED:
            hb = tl.load(p_h, mask=m_n[:, None], other=0)
        else:
            hb = tl.load(p_h)
        hh = tl.broadcast_to((o_k // H).to(tl.uint8)[None, :], hb.shape)  # which bit of the byte: 0 or 1
    k4 = None
    k5 = None
    k6 = None
    k7 = None
    if KEY_ASM != "" and TABLES_IN_ASM:  # only the codes as operands (pure: Triton may move it past a conversion)
        if KEY_BITS == 4:
            k0, k1, k2, k3 = tl.inline_asm_elementwise(KEY_ASM, "=r,=r,=r,=r,r", [kb], dtype=(tl.float16,) * 4,
                                                       is_pure=True, pack=2)  # fmt: skip
        elif PAIRS and KEY_BITS == 3:
            k0, k1, k2, k3, k4, k5, k6, k7 = tl.inline_asm_elementwise(
                KEY_ASM, "=r" + ",=r" * 31 + ",r" * 8, [kb, hb], dtype=(tl.float16,) * 8, is_pure=True, pack=8
            )
        elif PAIRS:
            k0, k1, k2, k3, k4, k5, k6, k7 = tl.inline_asm_elementwise(
                KEY_ASM, "=r" + ",=r" * 7 + ",r", [kb], dtype=(tl.float16,) * 8, is_pure=True, pack=2
            )
        elif KEY_BITS == 3:
            k0, k1, k2, k3 = tl.inline_asm_elementwise(
                KEY_ASM, "=r" + ",=r" * 7 + ",r,r,r", [kb, hb, hh], dtype=(tl.float16,) * 4, is_pure=True, pack=4
            )
        else:
            k0, k1, k2, k3 = tl.inline_asm_elementwise(
                KEY_ASM, "=r" + ",=r" * 7 + ",r", [kb], dtype=(tl.float16,) * 4, is_pure=True, pack=4
            )
    elif KEY_ASM != "":
        z = tl.zeros(kb.shape, tl.int32)  # the tables as (uniform) operand tensors
        t0 = z + kt0
        t1 = z + kt1
        t2 = z + kt2
        t3 = z + kt3
        if KEY_BITS == 4:
            k0, k1, k2, k3 = tl.inline_asm_elementwise(KEY_ASM, "=r,=r,=r,=r,r" + ",r" * 8, [kb, t0, t1, t2, t3],
                                                       dtype=(tl.float16,) * 4, is_pure=False, pack=2)  # fmt: skip
        elif PAIRS and KEY_BITS == 3:
            k0, k1, k2, k3, k4, k5, k6, k7 = tl.inline_asm_elementwise(
                KEY_ASM, "=r" + ",=r" * 31 + ",r" * 8 + ",r" * 32, [kb, hb, t0, t1, t2, t3], dtype=(tl.float16,) * 8,
                is_pure=False, pack=8)  # fmt: skip
        elif PAIRS:
            k0, k1, k2, k3, k4, k5, k6, k7 = tl.inline_asm_elementwise(
                KEY_ASM, "=r" + ",=r" * 7 + ",r" + ",r" * 8, [kb, t0, t1, t2, t3], dtype=(tl.float16,) * 8,
                is_pure=False, pack=2)  # fmt: skip
        elif KEY_BITS == 3:
            k0, k1, k2, k3 = tl.inline_asm_elementwise(
                KEY_ASM, "=r" + ",=r" * 7 + ",r,r,r" + ",r" * 16, [kb, hb, hh, t0, t1, t2, t3],
                dtype=(tl.float16,) * 4, is_pure=False, pack=4)  # fmt: skip
        else:
            k0, k1, k2, k3 = tl.inline_asm_elementwise(
                KEY_ASM, "=r" + ",=r" * 7 + ",r" + ",r" * 16, [kb, t0, t1, t2, t3],
                dtype=(tl.float16,) * 4, is_pure=False, pack=4)  # fmt: skip
    else:
        kb = kb.to(tl.int32)
        if KEY_BITS == 4:  # nibble j's rank, and its sign from bit 7, 15, 3 or 11 (packing.pack_key_codes)
            kb = kb & 0xFFFF
            k0 = tl.gather(b_cb, (kb & 7) | ((kb >> 4) & 8), axis=1)
            k1 = tl.gather(b_cb, ((kb >> 4) & 7) | ((kb >> 12) & 8), axis=1)
            k2 = tl.gather(b_cb, ((kb >> 8) & 7) | (kb & 8), axis=1)
            k3 = tl.gather(b_cb, ((kb >> 12) & 7) | ((kb >> 8) & 8), axis=1)
        elif PAIRS:
            kb = kb & 0xFFFF
            if KEY_BITS == 3:  # field f of byte b's high bit, bit 8b + 2f + e // H, moved to bit 8b + 2f + 2
                hb = ((hb.to(tl.int32) & 0xFFFF) >> (o_k // H)[None, :] & 0x5555) << 2
            else:
                hb = tl.zeros_like(kb)
            k0 = tl.gather(b_cb, (kb & 3) | (hb & 4), axis=1)
            k1 = tl.gather(b_cb, ((kb >> 2) & 3) | ((hb >> 2) & 4), axis=1)
            k2 = tl.gather(b_cb, ((kb >> 4) & 3) | ((hb >> 4) & 4), axis=1)
            k3 = tl.gather(b_cb, ((kb >> 6) & 3) | ((hb >> 6) & 4), axis=1)
            k4 = tl.gather(b_cb, ((kb >> 8) & 3) | ((hb >> 8) & 4), axis=1)
            k5 = tl.gather(b_cb, ((kb >> 10) & 3) | ((hb >> 10) & 4), axis=1)
            k6 = tl.gather(b_cb, ((kb >> 12) & 3) | ((hb >> 12) & 4), axis=1)
            k7 = tl.gather(b_cb, ((kb >> 14) & 3) | ((hb >> 14) & 4), axis=1)
        else:
            if KEY_BITS == 3:
                hb = hb.to(tl.int32) >> hh.to(tl.int32)
            else:
                hb = tl.zeros_like(kb)
            k0 = tl.gather(b_cb, (kb & 3) | ((hb & 1) << 2), axis=1)
            k1 = tl.gather(b_cb, ((kb >> 2) & 3) | (hb & 4), axis=1)
            k2 = tl.gather(b_cb, ((kb >> 4) & 3) | (((hb >> 4) & 1) << 2), axis=1)
            k3 = tl.gather(b_cb, ((kb >> 6) & 3) | (((hb >> 6) & 1) << 2), axis=1)
    if P_K == 4:
        k4 = k0
        k5 = k0
        k6 = k0
        k7 = k0
    return k0, k1, k2, k3, k4, k5, k6, k7


@triton.jit
def _query_tiles(p_q, m_m, Q_SCALE, KEY_BITS: tl.constexpr, D: tl.constexpr, P_K: tl.constexpr, DP_K: tl.constexpr,
                 SIGNS: tl.constexpr):  # fmt: skip
    """The query columns that meet the P_K key field tiles of _key_fields (SIGNS: the columns of S q that meet
    the sign tiles of _qjl_scores), each transposed, fp16 [DP_K, BM]; t4-t7 repeat t0 where P_K = 4."""
    t0 = _query_tile(p_q, m_m, Q_SCALE, 0, KEY_BITS, D, P_K, DP_K, SIGNS)
    t1 = _query_tile(p_q, m_m, Q_SCALE, 1, KEY_BITS, D, P_K, DP_K, SIGNS)
    t2 = _query_tile(p_q, m_m, Q_SCALE, 2, KEY_BITS, D, P_K, DP_K, SIGNS)
    t3 = _query_tile(p_q, m_m, Q_SCALE, 3, KEY_BITS, D, P_K, DP_K, SIGNS)
    t4 = t0
    t5 = t0
    t6 = t0
    t7 = t0
    if P_K == 8:
        t4 = _query_tile(p_q, m_m, Q_SCALE, 4, KEY_BITS, D, P_K, DP_K, SIGNS)
        t5 = _query_tile(p_q, m_m, Q_SCALE, 5, KEY_BITS, D, P_K, DP_K, SIGNS)
        t6 = _query_tile(p_q, m_m, Q_SCALE, 6, KEY_BITS, D, P_K, DP_K, SIGNS)
        t7 = _query_tile(p_q, m_m, Q_SCALE, 7, KEY_BITS, D, P_K, DP_K, SIGNS)
    return t0, t1, t2, t3, t4, t5, t6, t7


@triton.jit
def _query_tile(p_q, m_m, Q_SCALE, j: tl.constexpr, KEY_BITS: tl.constexpr, D: tl.constexpr, P_K: tl.constexpr,
                DP_K: tl.constexpr, SIGNS: tl.constexpr):  # fmt: skip
    """Tile j of _query_tiles: fp16 [DP_K, BM].

    Keys: the cache packs key column c of a 4-bit key into byte c mod D/2 (low nibble below D/2), and of a 2- or
    3-bit key into field c // (D/4) of byte c mod D/4 of the 2-bit plane. 4 bits: nibble j of int16 element e is
    byte 2e + j // 2, nibble j % 2; 2 and 3 bits, P_K = 8: field j % 4 of byte 2e + j // 4; P_K = 4: field j of
    byte e. Signs (bit g of byte b of the 1-bit plane is column g·D/8 + b): P_K = 8, bit j of byte 2e for
    e < DP_K/2 and of byte 2(e - DP_K/2) + 1 above; P_K = 4, column j·DP_K + e."""
    o_e = tl.arange(0, DP_K)
    if SIGNS and P_K == 8:
        H: tl.constexpr = DP_K // 2
        cols = j * (D // 8) + 2 * (o_e % H) + o_e // H
    elif SIGNS:
        cols = j * DP_K + o_e
    elif KEY_BITS == 4:
        cols = 2 * o_e + (j // 2) + (D // 2) * (j % 2)
    elif P_K == 8:
        cols = (j % 4) * (D // 4) + 2 * o_e + j // 4
    else:
        cols = j * DP_K + o_e
    return (tl.load(p_q + cols[:, None], mask=m_m[None, :], other=0.0) * Q_SCALE).to(tl.float16)


def _sign_asm() -> str:
    """QJL signs as ±1 fp16: 4 bytes of the 1-bit plane holding field t's bit at bit 2t + h, h (0 or 1, the same
    for the 4 bytes) in a second register -> 4 fields × 4 values, elementwise.

    The word shifted right by h; bytes (0, 1) and (2, 3) spread to register halves with prmt; field t's bit
    shifted to bit 15 of each half and xor-ed with -1.0 (0xBC00): bit 1 gives +1.0 (0x3C00), bit 0 gives -1.0.
    Outputs $0-$7 (field t in registers 2t, 2t+1), the bytes $8, h $9."""
    lines = ["{ .reg .b32 x0, x1, t, w;", "and.b32 t, $9, 1;", "shr.u32 w, $8, t;", "prmt.b32 x0, w, 0, 0x4140;",
             "prmt.b32 x1, w, 0, 0x4342;"]  # fmt: skip
    for f in range(4):
        for x in range(2):
            lines += [f"shl.b32 t, x{x}, {15 - 2 * f};", f"lop3.b32 ${2 * f + x}, t, 0x80008000, 0xBC00BC00, 0x6A;"]
    return "\n".join(lines + ["}"])


_SIGN_ASM = tl.constexpr(_sign_asm())


def _sign_pairs_asm() -> str:
    """QJL signs as ±1 fp16 from a [BN, 16] tile of int16 sign-plane elements (head_dim 128: the plane's 8
    elements in columns 0-7, columns 8-15 not loaded), pack=8, in the register order of a tensor-core operand
    (see _key3_pairs_asm): registers 0 and 1 hold elements (2t, 2t + 1) of rows g and g + 8; the positions of
    registers 2 and 3 (columns 2t + 8, 2t + 9) take bits 8-15 of those same elements instead.

    -> 8 tiles × 4 registers, tile j register r at $(4j + r): bit j (r < 2) or j + 8 (r ≥ 2) of both elements
    of register r mod 2, shifted to bit 15 of each half and xor-ed with -1.0 (0xBC00): bit 1 gives +1.0,
    bit 0 gives -1.0; one shift and one lop3 per pair. Operands: outputs $0-$31, the elements $32-$35."""
    lines = ["{ .reg .b32 t;"]
    for j in range(8):
        for r in range(4):
            shift = 15 - j - 8 * (r // 2)
            lines += [f"shl.b32 t, ${32 + r % 2}, {shift};", f"lop3.b32 ${4 * j + r}, t, 0x80008000, 0xBC00BC00, 0x6A;"]
    return "\n".join(lines + ["}"])


_SIGN_PAIRS_ASM = tl.constexpr(_sign_pairs_asm())


@triton.jit
def _qjl_scores(KS, row, m_n, sq0, sq1, sq2, sq3, sq4, sq5, sq6, sq7, D: tl.constexpr, P_K: tl.constexpr,
                ASM: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Σ_j (Sq)_j · sign_j over BN keys -> [BN, BM] float32 from the 1-bit plane [BN, D/8] (bit g of byte b: column
    g·D/8 + b), each ±1 tile dotted with its query tile (_query_tiles with SIGNS).

    P_K = 8 (head_dim 128): the plane as int16 elements, 8 tiles [BN, 16], tile j column e = bit j of element e
    (e < 8), bit j + 8 of element e - 8 (e ≥ 8), read straight into the tensor-core operand (_sign_pairs_asm).
    Else 4 tiles [BN, D/4] of bytes, tile t column e from bit 2t + e // (D/8) of byte e mod D/8."""
    H: tl.constexpr = D // 8
    if P_K == 8:
        o_e = tl.arange(0, 16)
        p_s = KS.to(tl.pointer_type(tl.int16)) + row[:, None] * (H // 2) + (o_e % 8)[None, :]
        if ASM:
            sb = tl.load(p_s, mask=m_n[:, None] & (o_e < 8)[None, :], other=0)
            g0, g1, g2, g3, g4, g5, g6, g7 = tl.inline_asm_elementwise(
                _SIGN_PAIRS_ASM, "=r" + ",=r" * 31 + ",r" * 4, [sb], dtype=(tl.float16,) * 8, is_pure=True, pack=8
            )
        else:
            if MASKED:
                sb = tl.load(p_s, mask=m_n[:, None], other=0)
            else:
                sb = tl.load(p_s)
            sb = (sb.to(tl.int32) & 0xFFFF) >> (8 * (o_e // 8))[None, :]
            g0 = _plus_minus_one(sb, 0)
            g1 = _plus_minus_one(sb, 1)
            g2 = _plus_minus_one(sb, 2)
            g3 = _plus_minus_one(sb, 3)
            g4 = _plus_minus_one(sb, 4)
            g5 = _plus_minus_one(sb, 5)
            g6 = _plus_minus_one(sb, 6)
            g7 = _plus_minus_one(sb, 7)
    else:
        o_e = tl.arange(0, 2 * H)
        p_s = KS + row[:, None] * H + (o_e % H)[None, :]
        if MASKED:
            sb = tl.load(p_s, mask=m_n[:, None], other=0)
        else:
            sb = tl.load(p_s)
        hh = tl.broadcast_to((o_e // H).to(tl.uint8)[None, :], sb.shape)  # which bit of the byte: 0 or 1
        if ASM:
            g0, g1, g2, g3 = tl.inline_asm_elementwise(
                _SIGN_ASM, "=r" + ",=r" * 7 + ",r,r", [sb, hh], dtype=(tl.float16,) * 4, is_pure=False, pack=4
            )
        else:
            sb = sb.to(tl.int32) >> hh.to(tl.int32)
            g0 = _plus_minus_one(sb, 0)
            g1 = _plus_minus_one(sb, 2)
            g2 = _plus_minus_one(sb, 4)
            g3 = _plus_minus_one(sb, 6)
        g4, g5, g6, g7 = g0, g1, g2, g3  # (unused with 4 tiles)
    return _tile_dots(g0, g1, g2, g3, g4, g5, g6, g7, sq0, sq1, sq2, sq3, sq4, sq5, sq6, sq7, P_K)


@triton.jit
def _tile_dots(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, P: tl.constexpr):
    """Σ_j a_j @ b_j over the P (4 or 8) field tiles of a key or sign tile and their query tiles."""
    acc = tl.dot(a0, b0)
    acc += tl.dot(a1, b1)
    acc += tl.dot(a2, b2)
    acc += tl.dot(a3, b3)
    if P == 8:
        acc += tl.dot(a4, b4)
        acc += tl.dot(a5, b5)
        acc += tl.dot(a6, b6)
        acc += tl.dot(a7, b7)
    return acc


@triton.jit
def _plus_minus_one(sb, bit: tl.constexpr):
    """Bit ``bit`` of every element of sb as +1.0 (set) or -1.0 (clear), fp16: the portable twin of the sign
    assembly."""
    return (((sb >> bit) & 1) * 2 - 1).to(tl.float16)


@triton.jit
def _group_affine(VA, row, m_n, g: tl.constexpr, NG: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
                  MASKED: tl.constexpr):  # fmt: skip
    """The (scale, zero) of BN rows over W columns from group g on (one group, or W / GROUP whole groups), as
    stored, fp16, repeated along the rows of a [BN, W] tile.

    VA: the (scale, zero) pairs as int32 words. Loaded as [BN, W/16] and broadcast over 16 columns, so that the
    tile matches the code tile's layout (16 bytes per thread); one 4-byte word per pair lets Triton stage the
    loads through shared memory with the codes' (cp.async) and read them back in that layout, where two 2-byte
    loads each needed a layout conversion (a shared-memory round trip with two barriers) on Triton 3.6."""
    R: tl.constexpr = 16 if W >= 16 else W
    rr = row[:, None] + tl.zeros([1, W // R], tl.int64)
    p_a = VA + rr * NG + g
    if W > GROUP:  # 16-column run r lies in group g + r·16 / GROUP
        p_a += (tl.arange(0, W // R) * R // GROUP)[None, :]
    if MASKED:
        w = tl.load(p_a, mask=tl.broadcast_to(m_n[:, None], rr.shape), other=0)
    else:
        w = tl.load(p_a)
    sc = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    z = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    BN: tl.constexpr = row.shape[0]
    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BN, W // R, R)), (BN, W))
    z = tl.reshape(tl.broadcast_to(z[:, :, None], (BN, W // R, R)), (BN, W))
    return sc, z


@triton.jit
def _dequant_field(vb, f: tl.constexpr, sc, z, VALUE_BITS: tl.constexpr):
    """Portable twin of the inline assembly: field f of value bytes vb [BN, W] -> x·s + z in fp16."""
    x = ((vb >> (f * VALUE_BITS)) & ((1 << VALUE_BITS) - 1)).to(tl.float32)
    return (x * sc.to(tl.float32) + z.to(tl.float32)).to(tl.float16)


@triton.jit
def _value_fields(VC, VA, row, m_n, h: tl.constexpr, VALUE_BITS: tl.constexpr, D: tl.constexpr,
                  GROUP: tl.constexpr, W: tl.constexpr, DP_V: tl.constexpr, ASM: tl.constexpr,
                  MASKED: tl.constexpr):  # fmt: skip
    """Values s·x + z (fp16) of value bytes [h·W, (h+1)·W) of BN rows, one tile [BN, W] per field (2 for 4-bit
    values, 4 for 2-bit): tile column e of field f is value column f·DP_V + h·W + e (one group, or whole groups)."""
    NG: tl.constexpr = D // GROUP
    o_w = tl.arange(0, W)
    p_v = VC + row[:, None] * (D * VALUE_BITS // 8) + h * W + o_w[None, :]
    if MASKED:
        vb = tl.load(p_v, mask=m_n[:, None], other=0)
    else:
        vb = tl.load(p_v)
    sc0, z0 = _group_affine(VA, row, m_n, (h * W) // GROUP, NG, W, GROUP, MASKED)
    sc1, z1 = _group_affine(VA, row, m_n, (DP_V + h * W) // GROUP, NG, W, GROUP, MASKED)
    if VALUE_BITS == 2:
        sc2, z2 = _group_affine(VA, row, m_n, (2 * DP_V + h * W) // GROUP, NG, W, GROUP, MASKED)
        sc3, z3 = _group_affine(VA, row, m_n, (3 * DP_V + h * W) // GROUP, NG, W, GROUP, MASKED)
    if ASM:
        if VALUE_BITS == 4:
            v0, v1 = tl.inline_asm_elementwise(_VALUE_ASM_4, "=r,=r,=r,=r" + ",r" * 9, [vb, sc0, z0, sc1, z1],
                                               dtype=(tl.float16, tl.float16), is_pure=False, pack=4)  # fmt: skip
            v2 = v0
            v3 = v0
        else:
            v0, v1, v2, v3 = tl.inline_asm_elementwise(
                _VALUE_ASM_2, "=r" + ",=r" * 7 + ",r" * 17, [vb, sc0, z0, sc1, z1, sc2, z2, sc3, z3],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=False, pack=4)  # fmt: skip
    else:
        vb = vb.to(tl.int16)
        v0 = _dequant_field(vb, 0, sc0, z0, VALUE_BITS)
        v1 = _dequant_field(vb, 1, sc1, z1, VALUE_BITS)
        if VALUE_BITS == 2:
            v2 = _dequant_field(vb, 2, sc2, z2, VALUE_BITS)
            v3 = _dequant_field(vb, 3, sc3, z3, VALUE_BITS)
        else:
            v2 = v0
            v3 = v0
    return v0, v1, v2, v3


@triton.jit
def _store_chunk(O_PART, part, o_m, m_m, acc, l_div, ch: tl.constexpr, W: tl.constexpr, NH: tl.constexpr,
                 DP_V: tl.constexpr, D: tl.constexpr):  # fmt: skip
    o_w = tl.arange(0, W)
    col: tl.constexpr = (ch // NH) * DP_V + (ch % NH) * W
    tl.store(O_PART + (part + o_m)[:, None] * D + col + o_w[None, :], acc / l_div[:, None], mask=m_m[:, None])


@triton.jit
def _block_scalars(KN, KR, i_bh, C, n0, end, BN: tl.constexpr, PROD: tl.constexpr, LOAD: tl.constexpr):
    """The key norms and (PROD; else the norms again) γ of tokens [n0, n0 + BN) of head i_bh, 0 past `end`: [BN]
    (not LOAD: zeros, loading nothing)."""
    if LOAD:
        o_n = n0 + tl.arange(0, BN)
        row = i_bh * C + o_n.to(tl.int64)
        norm = tl.load(KN + row, mask=o_n < end, other=0.0)
        gamma = tl.load(KR + row, mask=o_n < end, other=0.0) if PROD else norm
    else:
        norm = tl.zeros([BN], tl.float16)
        gamma = norm
    return norm, gamma


@triton.jit
def _attend_block_2d(
    n0, end, i_bh, q_pos, qt0, qt1, qt2, qt3, qt4, qt5, qt6, qt7, sq0, sq1, sq2, sq3, sq4, sq5, sq6, sq7,
    b_cb, kt0, kt1, kt2, kt3, b_m, l_acc, acc0, acc1, acc2, acc3, norm, gamma, KC, KN, KS, KR, VC, VA, C,
    AHEAD: tl.constexpr, PROD: tl.constexpr,
    D: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
    BN: tl.constexpr, P_K: tl.constexpr, DP_K: tl.constexpr, NCH: tl.constexpr, W: tl.constexpr, NH: tl.constexpr,
    DP_V: tl.constexpr, KEY_ASM: tl.constexpr, TABLES_IN_ASM: tl.constexpr, VALUE_ASM: tl.constexpr,
    MASKED: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """Tokens [n0, n0 + BN) of one head folded into the online softmax. AHEAD: norm, gamma [BN] are their key norms
    and (prod keys) γ, loaded one block ahead by the caller (_block_scalars); else they are loaded here. MASKED: the
    block may reach past `end` or past a query's causal limit (the last block of a split); other blocks load and
    score without masks."""
    o_n = n0 + tl.arange(0, BN)
    m_n = o_n < end
    row = i_bh * C + o_n.to(tl.int64)
    k0, k1, k2, k3, k4, k5, k6, k7 = _key_fields(KC, row, m_n, b_cb, kt0, kt1, kt2, kt3, KEY_BITS, D, P_K, DP_K,
                                                 KEY_ASM, TABLES_IN_ASM, MASKED)  # fmt: skip
    s_t = _tile_dots(k0, k1, k2, k3, k4, k5, k6, k7, qt0, qt1, qt2, qt3, qt4, qt5, qt6, qt7, P_K)
    if not AHEAD:
        norm = tl.load(KN + row, mask=m_n, other=0.0) if MASKED else tl.load(KN + row)
    s_t = s_t * norm.to(tl.float32)[:, None]
    if PROD:  # the QJL term: γ · ⟨S q, sign(S r)⟩ (its constant folded into S q)
        if not AHEAD:
            gamma = tl.load(KR + row, mask=m_n, other=0.0) if MASKED else tl.load(KR + row)
        s_qjl = _qjl_scores(KS, row, m_n, sq0, sq1, sq2, sq3, sq4, sq5, sq6, sq7, D, P_K, VALUE_ASM, MASKED)
        s_t += s_qjl * gamma.to(tl.float32)[:, None]
    b_s = tl.trans(s_t)  # [BM, BN]
    BM: tl.constexpr = b_s.shape[0]
    real = tl.arange(0, BM) < BR  # [BM]
    if BR < BM:  # rows from BR on are padding: constant, so that the compiler drops their products and exponentials
        b_s = tl.where(real[:, None], b_s, float("-inf"))
    if MASKED:
        visible = m_n[None, :]
        if CAUSAL:
            visible = visible & (o_n[None, :] <= q_pos[:, None])
        b_s = tl.where(visible, b_s, float("-inf"))
    m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(b_m - m_safe)
    b_m = m_new
    p = tl.exp2(b_s - m_safe[:, None])
    if BR < BM:
        p = tl.where(real[:, None], p, 0.0)
        alpha = tl.where(real, alpha, 1.0)
    p16 = p.to(tl.float16)
    # the softmax denominator by the tensor cores (P times a ones tile), as the outputs: no sum across warps
    l_acc = l_acc * alpha[:, None] + tl.dot(p16, tl.full([BN, 16], 1.0, tl.float16))
    # value chunk ch = f·NH + h: field f of value bytes [h·W, (h+1)·W)
    v0, v1, v2, v3 = _value_fields(VC, VA, row, m_n, 0, VALUE_BITS, D, GROUP, W, DP_V, VALUE_ASM, MASKED)
    if NH == 2:  # 4-bit values in two byte chunks: fields 0, 1 of each
        acc0 = acc0 * alpha[:, None] + tl.dot(p16, v0)
        acc2 = acc2 * alpha[:, None] + tl.dot(p16, v1)
        v0, v1, v2, v3 = _value_fields(VC, VA, row, m_n, 1, VALUE_BITS, D, GROUP, W, DP_V, VALUE_ASM, MASKED)
        acc1 = acc1 * alpha[:, None] + tl.dot(p16, v0)
        acc3 = acc3 * alpha[:, None] + tl.dot(p16, v1)
    else:  # one byte chunk holding every field
        acc0 = acc0 * alpha[:, None] + tl.dot(p16, v0)
        acc1 = acc1 * alpha[:, None] + tl.dot(p16, v1)
        if NCH > 2:
            acc2 = acc2 * alpha[:, None] + tl.dot(p16, v2)
            acc3 = acc3 * alpha[:, None] + tl.dot(p16, v3)
    return b_m, l_acc, acc0, acc1, acc2, acc3


@triton.jit
def _decode_split_kernel_2d(
    Q, SQ, KC, KN, KS, KR, VC, VA, CB, KT, SEQ_LEN, KV_START, Q_START, O_PART, L_PART,
    H_KV, C, M, N_Q, SPLIT_SIZE, Q_SCALE,
    D: tl.constexpr, KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, GROUP: tl.constexpr, PROD: tl.constexpr,
    CAUSAL: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, P_K: tl.constexpr,
    DP_K: tl.constexpr, NCH: tl.constexpr, W: tl.constexpr, NH: tl.constexpr, DP_V: tl.constexpr,
    KEY_ASM: tl.constexpr, VALUE_ASM: tl.constexpr, TABLES_IN_ASM: tl.constexpr, DEPENDENTS: tl.constexpr = False,
):  # fmt: skip
    """The split kernel for keys with 2-, 3- or 4-bit codebook indices (PROD: plus the 1-bit QJL plane) and
    values of 2 or 4 bits in 2-D tiles (two or four key tiles and value chunks): scores as
    Σ_f c[idx_f] @ (Πq)_fᵀ with the key tile never transposed (+ γ · Σ_g sign_g @ (Sq)_gᵀ), values dequantised
    per element. Same inputs and outputs as _decode_split_kernel; KEY_BITS counts the index bits.

    KEY_ASM (from key_asm_code; TABLES_IN_ASM: built with the table words) and VALUE_ASM unpack with inline PTX
    (CUDA only); otherwise portable Triton (the CPU interpreter) computes the same tiles, the key lookup with a
    register-table gather. Blocks that lie wholly inside the split and before every query's causal limit skip
    all masks.

    BR query rows per program in tiles of BM ≥ BR rows (BR = 8 < BM = 16: a decode step of GQA up to 8, as the
    tensor cores take 16 rows at least); the rows from BR on are constant padding, so that the compiler drops their
    share of the softmax (sm_90: 7% fewer instructions per token at head_dim 128, 9-15% at 64; H200: 3-11% less
    time at head_dim 64, 1-6% at 256, 0-4% at 128; benchmarks/RESULTS.md, fourteenth session).

    DEPENDENTS (CUDA, sm_90+; the merge kernel launched as its programmatic dependent): let the merge's programs
    launch as soon as every program of this kernel has started, so that they take each SM as its split programs
    finish and attend the exact rows before they wait for the splits' results."""
    if DEPENDENTS:
        tl.extra.cuda.gdc_launch_dependents()
    i_bh = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    start, end, q_start = _split_range(i_bh // H_KV, i_s, SEQ_LEN, KV_START, Q_START, SPLIT_SIZE, N_Q, CAUSAL)
    o_m = tl.program_id(2) * BR + tl.arange(0, BM)  # this program's BR query rows, in a tile of BM
    m_m = (tl.arange(0, BM) < BR) & (o_m < M)
    q_pos = q_start + o_m % N_Q
    # transposed query tiles [DP_K, BM] matching the key tiles, loaded once
    p_q = Q + i_bh * M * D + o_m[None, :] * D
    qt0, qt1, qt2, qt3, qt4, qt5, qt6, qt7 = _query_tiles(p_q, m_m, Q_SCALE, KEY_BITS, D, P_K, DP_K, False)
    if PROD:  # S q as the sign tiles' query tiles
        p_sq = SQ + i_bh * M * D + o_m[None, :] * D
        sq0, sq1, sq2, sq3, sq4, sq5, sq6, sq7 = _query_tiles(p_sq, m_m, Q_SCALE, KEY_BITS, D, P_K, DP_K, True)
    else:  # (unused)
        sq0, sq1, sq2, sq3, sq4, sq5, sq6, sq7 = qt0, qt1, qt2, qt3, qt4, qt5, qt6, qt7
    NC: tl.constexpr = 2**KEY_BITS
    b_cb = tl.broadcast_to(tl.load(CB + tl.arange(0, NC)).to(tl.float16)[None, :], (BN, NC))
    kt0 = tl.load(KT)
    kt1 = tl.load(KT + 1)
    kt2 = tl.load(KT + 2)
    kt3 = tl.load(KT + 3)
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_acc = tl.zeros([BM, 16], dtype=tl.float32)  # the running sum, in each of 16 equal columns
    acc0 = tl.zeros([BM, W], dtype=tl.float32)
    acc1 = tl.zeros([BM, W], dtype=tl.float32)
    acc2 = tl.zeros([BM, W], dtype=tl.float32)
    acc3 = tl.zeros([BM, W], dtype=tl.float32)
    # full blocks: in the split, and (causal) at or before the first query's position
    full_end = end
    if CAUSAL:
        full_end = tl.minimum(full_end, q_start + 1)
    n_full = tl.maximum(full_end - start, 0) // BN
    # the key norms (and γ) one block ahead: their loads are not pipelined with the tiles' (which feed products),
    # so each would otherwise stall its block for a global-memory round trip (H200: 1-8% faster at head_dim 64 and
    # 128). Prod keys at head_dim 256 load them in the block, after the key products: with the loads outside the
    # block, one block ahead or not, they ran 10% slower there (1.78 vs 1.62 ms at (16, 65536))
    AHEAD: tl.constexpr = not (PROD and D > 128)
    norm, gamma = _block_scalars(KN, KR, i_bh, C, start, end, BN, PROD, AHEAD)
    for n0 in range(start, start + n_full * BN, BN):
        norm_next, gamma_next = _block_scalars(KN, KR, i_bh, C, n0 + BN, end, BN, PROD, AHEAD)
        b_m, l_acc, acc0, acc1, acc2, acc3 = _attend_block_2d(
            n0, end, i_bh, q_pos, qt0, qt1, qt2, qt3, qt4, qt5, qt6, qt7, sq0, sq1, sq2, sq3, sq4, sq5, sq6, sq7,
            b_cb, kt0, kt1, kt2, kt3, b_m, l_acc, acc0, acc1, acc2, acc3, norm, gamma, KC, KN, KS, KR, VC, VA, C,
            AHEAD, PROD, D, KEY_BITS, VALUE_BITS,
            GROUP, CAUSAL, BN, P_K, DP_K, NCH, W, NH, DP_V, KEY_ASM, TABLES_IN_ASM, VALUE_ASM, False, BR)  # fmt: skip
        norm, gamma = norm_next, gamma_next
    for n0 in range(start + n_full * BN, end, BN):
        norm_next, gamma_next = _block_scalars(KN, KR, i_bh, C, n0 + BN, end, BN, PROD, AHEAD)
        b_m, l_acc, acc0, acc1, acc2, acc3 = _attend_block_2d(
            n0, end, i_bh, q_pos, qt0, qt1, qt2, qt3, qt4, qt5, qt6, qt7, sq0, sq1, sq2, sq3, sq4, sq5, sq6, sq7,
            b_cb, kt0, kt1, kt2, kt3, b_m, l_acc, acc0, acc1, acc2, acc3, norm, gamma, KC, KN, KS, KR, VC, VA, C,
            AHEAD, PROD, D, KEY_BITS, VALUE_BITS,
            GROUP, CAUSAL, BN, P_K, DP_K, NCH, W, NH, DP_V, KEY_ASM, TABLES_IN_ASM, VALUE_ASM, True, BR)  # fmt: skip
        norm, gamma = norm_next, gamma_next

    part = (i_bh * tl.num_programs(1) + i_s) * (tl.num_programs(2) * BR)
    b_l = tl.max(l_acc, axis=1)
    l_div = tl.where(b_l == 0.0, 1.0, b_l)
    _store_chunk(O_PART, part, o_m, m_m, acc0, l_div, 0, W, NH, DP_V, D)
    _store_chunk(O_PART, part, o_m, m_m, acc1, l_div, 1, W, NH, DP_V, D)
    if NCH > 2:
        _store_chunk(O_PART, part, o_m, m_m, acc2, l_div, 2, W, NH, DP_V, D)
        _store_chunk(O_PART, part, o_m, m_m, acc3, l_div, 3, W, NH, DP_V, D)
    lse = tl.where(b_l == 0.0, float("-inf"), b_m + tl.log2(l_div))
    tl.store(L_PART + part + o_m, lse, mask=m_m)


def tiles_2d_layout(d: int, key_bits: int, key_mode: str, value_bits: int, group_size: int) -> dict | None:
    """Constexprs of _decode_split_kernel_2d for this configuration, or None where it does not apply.

    key_bits counts the QJL bit of prod keys (their codebook index has key_bits - 1)."""
    prod = key_mode == "prod"
    key_bits = key_bits - 1 if prod else key_bits
    if key_bits not in (2, 3, 4) or value_bits not in (2, 4) or d not in (64, 128, 256):
        return None
    # key field tiles (_key_fields): 2- and 3-bit indices at head_dim 128 as int16 elements, 8 tiles of D/8
    # columns; at head_dim 64 (D/8 = 8 columns, below a tensor-core step) and 256 as bytes, 4 tiles of D/4
    p_k, p_v = 8 if key_bits < 4 and d == 128 else 4, 8 // value_bits
    dp_v = d // p_v
    # value chunks of W columns: one group each up to head_dim 128; at 256, 64 columns (whole groups of ≥ 16
    # columns: the scales are broadcast per 16 columns), so that four chunks still cover D
    w = min(dp_v, group_size if d <= 128 else 64)
    if (group_size % w and (w % group_size or group_size % 16)) or dp_v % w or w < 16 or d // p_k < 16:
        return None
    nch = d // w
    if nch not in (2, 4):
        return None
    return dict(KEY_BITS=key_bits, PROD=prod, P_K=p_k, DP_K=d // p_k, NCH=nch, W=w, NH=dp_v // w, DP_V=dp_v)


@triton.jit
def _merge_splits_kernel(O_PART, L_PART, OUT, LSE, M, QX, KX, VX, H_KV, sx_b, sx_h, sx_n, SK, SV, KM, SINK_START,
                         Q_START, Q_SCALE, WK, WV, WC, WIN_POS, KV_LO,
                         D: tl.constexpr, MP: tl.constexpr, NUM_SPLITS: tl.constexpr, BS: tl.constexpr,
                         EXACT: tl.constexpr, XP: tl.constexpr, SINKS: tl.constexpr, SP: tl.constexpr,
                         CENTER: tl.constexpr, WAIT: tl.constexpr):  # fmt: skip
    """Combine the splits of one KV head: out = Σ_s 2^(lse_s - lse) out_s; LSE in natural log. The split kernel
    wrote MP rows (M rounded up to whole row tiles) per (head, split).

    EXACT (> 0): also attend the step's own EXACT tokens (not yet stored), exact key/value rows KX, VX at
    KX + b·sx_b + h·sx_h + j·sx_n (j < EXACT, in XP ≥ EXACT tile rows), causally: row m = g·EXACT + i (query i of
    query head g) sees rows j ≤ i; a base-2 logit is Q_SCALE·⟨QX[m], KX[j]⟩ (Q_SCALE = scale·log2(e)). SINKS (> 0,
    with EXACT): also attend the exact sink rows SK, SV
    [B·H_KV, SINKS + 1, D], row j at position SINK_START[b] + j, those before Q_START[b]. CENTER: the exact and
    sink keys minus the key mean KM [B·H_KV, D], as the stored keys are. WK, WV, WC, WIN_POS, KV_LO: a window of
    exact rows, attended by _merge_window_kernel (a step with a window launches that kernel instead, with the same
    arguments); unread here. WAIT: launched as a programmatic dependent of the split kernel (CUDA, sm_90+), so it
    waits for the split kernel's results before reading them; the exact and sink rows come first, so that (with the
    split kernel's DEPENDENTS) they overlap the split kernel's last programs.
    """
    pid = tl.program_id(0).to(tl.int64)  # one program per (head, row): a 1-D grid, as M may exceed 65535
    i_bh = pid // M
    i_m = pid - i_bh * M
    o_d = tl.arange(0, D)
    # the exact rows first (they do not depend on the split kernel): acc, w_sum relative to 2^l_max, l_max their
    # running maximum (finite: a query always sees its own token)
    if EXACT > 0:
        o_x = tl.arange(0, XP)
        m_x = o_x <= i_m % EXACT  # the step's tokens in causal order (one token: itself)
        p_x = (i_bh // H_KV) * sx_b + (i_bh % H_KV) * sx_h + o_x[:, None] * sx_n + o_d[None, :]
        b_qx = tl.load(QX + (i_bh * M + i_m) * D + o_d) * Q_SCALE
        if CENTER:
            b_km = tl.load(KM + i_bh * D + o_d)
        b_kx = tl.load(KX + p_x, mask=m_x[:, None], other=0.0).to(tl.float32)  # [XP, D]
        if CENTER:
            b_kx -= b_km[None, :]
        s_x = tl.where(m_x, tl.sum(b_kx * b_qx[None, :], axis=1), float("-inf"))
        l_max = tl.max(s_x, axis=0)
        if SINKS > 0:
            i_b = i_bh // H_KV
            o_j = tl.arange(0, SP)
            m_j = (o_j < SINKS) & (o_j < tl.load(Q_START + i_b) - tl.load(SINK_START + i_b))
            p_sk = (i_bh * (SINKS + 1) + o_j)[:, None] * D + o_d[None, :]
            b_sk = tl.load(SK + p_sk, mask=m_j[:, None], other=0.0).to(tl.float32)  # [SP, D]
            if CENTER:
                b_sk -= b_km[None, :]
            s_j = tl.where(m_j, tl.sum(b_sk * b_qx[None, :], axis=1), float("-inf"))
            l_max = tl.maximum(l_max, tl.max(s_j, axis=0))
        w_x = tl.exp2(s_x - l_max)  # 0 where masked
        acc = tl.sum(w_x[:, None] * tl.load(VX + p_x, mask=m_x[:, None], other=0.0).to(tl.float32), axis=0)
        w_sum = tl.sum(w_x, axis=0)
        if SINKS > 0:
            w_j = tl.exp2(s_j - l_max)  # 0 where masked
            acc += tl.sum(w_j[:, None] * tl.load(SV + p_sk, mask=m_j[:, None], other=0.0).to(tl.float32), axis=0)
            w_sum += tl.sum(w_j, axis=0)
    if WAIT:  # then the splits' results, once the split kernel has written them
        tl.extra.cuda.gdc_wait()
    if EXACT > 0:
        _finish_row(O_PART, L_PART, OUT, LSE, i_bh, i_m, M, acc, l_max, w_sum, D, MP, NUM_SPLITS, BS, True)
    else:
        _finish_row(O_PART, L_PART, OUT, LSE, i_bh, i_m, M, 0.0, 0.0, 0.0, D, MP, NUM_SPLITS, BS, False)


@triton.jit
def _finish_row(O_PART, L_PART, OUT, LSE, i_bh, i_m, M, acc, l_max, w_sum, D: tl.constexpr, MP: tl.constexpr,
                NUM_SPLITS: tl.constexpr, BS: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
    """Row i_m of head i_bh (if i_m < M): its splits' results (O_PART, L_PART) merged with, if EXACT, the exact
    rows' acc [D], w_sum relative to 2^l_max (finite); OUT = the normalised sum, LSE in natural log."""
    o_d = tl.arange(0, D)
    o_s = tl.arange(0, BS)
    m_s = (o_s < NUM_SPLITS) & (i_m + 0 * o_s < M)  # (a vector comparison: the interpreter's & of a bool scalar
    # with a vector gives ints)
    parts = (i_bh * NUM_SPLITS + o_s) * MP + i_m
    b_l = tl.load(L_PART + parts, mask=m_s, other=float("-inf"))  # [BS]
    b_o = tl.load(O_PART + parts[:, None] * D + o_d[None, :], mask=m_s[:, None], other=0.0)  # [BS, D]
    if EXACT:
        m_new = tl.maximum(l_max, tl.max(b_l, axis=0))
        alpha = tl.exp2(l_max - m_new)
        w = tl.exp2(b_l - m_new)
        acc = acc * alpha + tl.sum(b_o * w[:, None], axis=0)
        w_sum = w_sum * alpha + tl.sum(w, axis=0)
        l_safe = m_new
    else:
        l_max = tl.max(b_l, axis=0)
        l_safe = tl.where(l_max == float("-inf"), 0.0, l_max)
        w = tl.exp2(b_l - l_safe)
        acc = tl.sum(b_o * w[:, None], axis=0)
        w_sum = tl.sum(w, axis=0)
    out = acc / tl.where(w_sum == 0.0, 1.0, w_sum)
    tl.store(OUT + (i_bh * M + i_m) * D + o_d, out, mask=i_m + 0 * o_d < M)
    lse = tl.where(w_sum == 0.0, float("-inf"), (l_safe + tl.log2(tl.where(w_sum == 0.0, 1.0, w_sum))) / LOG2E_C)
    tl.store(LSE + i_bh * M + i_m, lse, mask=i_m < M)


@triton.jit
def _split_dot(a, b, PARTS16: tl.constexpr):
    """a @ b to about float32 accuracy on the tensor cores: a [M, K] float32, b [K, N] in float32 (tf32x3) or 16
    bits: with PARTS16, a taken as the sum of two parts of b's dtype, products accumulated in float32 (exact where
    a holds values of that dtype); without (the CPU interpreter, whose 16-bit dot products are not those of a GPU),
    b converted to float32."""
    if b.dtype == tl.float32 or not PARTS16:
        return tl.dot(a, b.to(tl.float32), input_precision="tf32x3")
    a_hi = a.to(b.dtype)
    return tl.dot(a_hi, b) + tl.dot((a - a_hi.to(tl.float32)).to(b.dtype), b)


@triton.jit
def _attend_exact_tile(b_q, b_qmu, Q_SCALE, K, V, kv_rows, m_kv, visible, b_km, b_m, b_l, acc, D: tl.constexpr,
                       CENTER: tl.constexpr, PARTS16: tl.constexpr):  # fmt: skip
    """One tile of R exact key/value rows for a tile of query rows: b_q [RT, D] float32 queries, key/value row r at
    K, V + kv_rows[r] (contiguous D), m_kv [R] the rows to read, visible [RT, R]; logits Q_SCALE·⟨q, k − μ⟩ (CENTER:
    μ = b_km [D], b_qmu [RT] = ⟨q, μ⟩) -> the online softmax's running max b_m, sum b_l [RT] and acc [RT, D]
    updated, the products on the tensor cores (_split_dot, PARTS16)."""
    o_d = tl.arange(0, D)
    b_k = tl.load(K + kv_rows[:, None] + o_d[None, :], mask=m_kv[:, None], other=0.0)  # [R, D]
    if CENTER and b_k.dtype == tl.float32:
        s = _split_dot(b_q, tl.trans(b_k - b_km[None, :]), PARTS16)
    else:
        s = _split_dot(b_q, tl.trans(b_k), PARTS16)
        if CENTER:
            s -= b_qmu[:, None]
    s = tl.where(visible, s * Q_SCALE, float("-inf"))
    b_p, alpha, b_m, b_l = _online_softmax_step(s, b_m, b_l)
    b_v = tl.load(V + kv_rows[:, None] + o_d[None, :], mask=m_kv[:, None], other=0.0)
    return b_m, b_l, acc * alpha[:, None] + _split_dot(b_p, b_v, PARTS16)


@triton.jit
def _merge_window_kernel(O_PART, L_PART, OUT, LSE, M, QX, KX, VX, H_KV, sx_b, sx_h, sx_n, SK, SV, KM, SINK_START,
                         Q_START, Q_SCALE, WK, WV, WC, WIN_POS, KV_LO,
                         D: tl.constexpr, MP: tl.constexpr, NUM_SPLITS: tl.constexpr, BS: tl.constexpr,
                         EXACT: tl.constexpr, XP: tl.constexpr, SINKS: tl.constexpr, SP: tl.constexpr,
                         CENTER: tl.constexpr, WINDOW: tl.constexpr, WAIT: tl.constexpr, RT: tl.constexpr,
                         RL: tl.constexpr, PARTS16: tl.constexpr):  # fmt: skip
    """_merge_splits_kernel for a step with a full-precision window (same arguments and results, EXACT > 0): also
    attend the exact window rows WK, WV [B·H_KV, WC, D] (the cache's window of recent tokens, a ring: position p in
    row p mod WC, the oldest at WIN_POS[b]), those at or after KV_LO[b] and before Q_START[b]. One program per
    (head, tile of RT ≥ 16 query rows): the exact rows (the step's own tokens in a tile of XP ≥ 16 rows, the sinks
    in SP ≥ 16, the window WINDOW rows at a time) are read once for all the head's query rows and attended with
    tensor-core products and an online softmax (_attend_exact_tile; PARTS16 on CUDA); then, after WAIT,
    the splits' results are merged row by row (the tile's first RL rows, those that can exist: RL = min(RT, M
    rounded up to a power of two))."""
    i_bh = tl.program_id(0).to(tl.int64)
    o_t = tl.program_id(1) * RT + tl.arange(0, RT)
    m_t = o_t < M
    o_d = tl.arange(0, D)
    b_q = tl.load(QX + (i_bh * M + o_t)[:, None] * D + o_d[None, :], mask=m_t[:, None], other=0.0)
    b_km = tl.load(KM + i_bh * D + o_d) if CENTER else tl.zeros([D], dtype=tl.float32)
    b_qmu = tl.sum(b_q * b_km[None, :], axis=1)
    b_m = tl.full([RT], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([RT], dtype=tl.float32)
    acc = tl.zeros([RT, D], dtype=tl.float32)
    # the step's own tokens, causally (row m = g·EXACT + i sees tokens j <= i)
    o_x = tl.arange(0, XP)
    m_x = o_x < EXACT
    x_rows = (i_bh // H_KV) * sx_b + (i_bh % H_KV) * sx_h + o_x * sx_n
    visible = m_t[:, None] & m_x[None, :] & (o_x[None, :] <= (o_t % EXACT)[:, None])
    b_m, b_l, acc = _attend_exact_tile(b_q, b_qmu, Q_SCALE, KX, VX, x_rows, m_x, visible, b_km, b_m, b_l, acc, D,
                                       CENTER, PARTS16)  # fmt: skip
    i_b = i_bh // H_KV
    hi = tl.load(Q_START + i_b)
    if SINKS > 0:
        o_j = tl.arange(0, SP)
        m_j = (o_j < SINKS) & (o_j < hi - tl.load(SINK_START + i_b))
        b_m, b_l, acc = _attend_exact_tile(b_q, b_qmu, Q_SCALE, SK, SV, (i_bh * (SINKS + 1) + o_j) * D, m_j,
                                           m_t[:, None] & m_j[None, :], b_km, b_m, b_l, acc, D, CENTER,
                                           PARTS16)  # fmt: skip
    w_pos = tl.load(WIN_POS + i_b)
    lo = tl.load(KV_LO + i_b)
    o_w = tl.arange(0, WINDOW)
    for j0 in range(0, WC, WINDOW):
        o_r = j0 + o_w
        pos = w_pos + (o_r - w_pos % WC + WC) % WC  # the position row o_r holds (or would hold next)
        m_r = (o_r < WC) & (pos >= lo) & (pos < hi)
        b_m, b_l, acc = _attend_exact_tile(b_q, b_qmu, Q_SCALE, WK, WV, (i_bh * WC + o_r) * D, m_r,
                                           m_t[:, None] & m_r[None, :], b_km, b_m, b_l, acc, D, CENTER,
                                           PARTS16)  # fmt: skip
    if WAIT:  # then the splits' results, once the split kernel has written them
        tl.extra.cuda.gdc_wait()
    o_rt = tl.arange(0, RT)
    for r in tl.static_range(RL):
        row = o_rt == r
        acc_r = tl.sum(tl.where(row[:, None], acc, 0.0), axis=0)
        m_r = tl.max(tl.where(row, b_m, float("-inf")), axis=0)
        m_r = tl.where(m_r == float("-inf"), 0.0, m_r)  # (rows past M: nothing attended, nothing stored)
        l_r = tl.sum(tl.where(row, b_l, 0.0), axis=0)
        i_m = tl.program_id(1) * RT + r
        _finish_row(O_PART, L_PART, OUT, LSE, i_bh, i_m, M, acc_r, m_r, l_r, D, MP, NUM_SPLITS, BS, True)


# Launch configuration of the split kernels: tokens per block, warps (None: per configuration, see _auto_blocks),
# pipeline depth, programs per SM that the splits aim for, codebook lookup (registers or global memory), the
# orientation of the score dot (see _fields_scores), the 2-D kernel's register cap (0: none; None: per
# configuration, see _auto_blocks), where its key lookup tables live: "immediates" (written into the assembly, see
# key_asm_code; the codes are then read from shared memory straight into the tensor-core operand layout) or
# "operands" (registers loaded once per program; the centroids then pass through shared memory as an fp16 tile),
# and how the merge kernel is launched (DEPENDENT_LAUNCHES).
LAUNCH_DEFAULTS = dict(
    block_n=None, num_warps=None, num_stages=None, programs_per_sm=None, register_codebook=True, key_major=False,
    tiles_2d=True, inline_asm=True, max_registers=None, key_table_source="immediates", dependent_launch=None,
)  # fmt: skip
# How the merge kernel follows the split kernel on CUDA (sm_90+): "off" (a plain launch after it), "wait" (a
# programmatic dependent launch, which waits for the split kernel's results: its launch overlaps the split kernel's
# end; H200, CUDA graphs: 0-1.6% less time per step, benchmarks/RESULTS.md) or "early" (the same, and the 2-D split
# kernel lets the merge launch once all its programs have started: the merge's programs take the SMs that the split
# programs leave, attend the exact rows and wait there for the splits). None: "early" for a step with a window,
# "wait" otherwise (H200, K4/V4 at 32k, one layer's step with TurboQuantCache's 128-token window: early 0.1742 ms vs
# wait 0.1896 at batch 8, 1.1672 vs 1.1815 at 64; without a window early was 1-6% slower at batch 1-8;
# benchmarks/RESULTS.md, twenty-first session)
DEPENDENT_LAUNCHES = ("off", "wait", "early")
KEY_TABLE_SOURCES = ("operands", "immediates")
# 2-D kernel: at most 168 registers per thread lets three 4-warp programs share an SM's 64K registers (128-token
# blocks take 174-190 uncapped: two per SM; ptxas fits them in 168 without spilling), or six 2-warp programs
THREE_PER_SM_REGISTERS = 168
# Query rows (G·N_q) per split-kernel program: more rows take more programs (a third grid axis), each reading the
# whole key/value range again, so that a long chunk of queries (a prompt attending to a compressed past) compiles
# and runs with bounded tiles; 64 rows hold a decode step of GQA up to 64 and speculative verification of 16
# queries at GQA 4 in one program.
MAX_ROWS = 64
# _merge_window_kernel: window rows per step of its loop over a cache's full-precision window, query rows per program
# (the tensor cores' least: a decode step's G rows pad to it) and warps (H200, head_dim 128, K4/V4 at 32k with
# TurboQuantCache's defaults, one layer's step, early launch: 32 rows and 4 warps 0.1742 / 1.1672 ms at batch 8 / 64;
# 16 rows 0.1787 / 1.1671; 8 warps 0.1814-0.1860 / 1.19-1.20; benchmarks/RESULTS.md, twenty-first session; registers
# and stack offline: benchmarks/launch_resources.py --merge)
WINDOW_ROWS = 32
MERGE_ROWS = 16
MERGE_WARPS = 4


def _tile_rows(rows: int) -> int:
    """Query rows of a split kernel's tiles for ``rows`` (a power of two) rows per program: 16 at least, the tensor
    cores' least."""
    return max(16, rows)


def kernel_2d_constants(d: int, layout: dict, value_bits: int, group_size: int, causal: bool, rows: int,
                        launch: dict, cuda: bool, table_words: tuple[int, ...] | None) -> dict:  # fmt: skip
    """The compile-time constants and launch options (num_warps, num_stages, maxnreg) of _decode_split_kernel_2d, as
    DecodePlan launches it (and benchmarks/decode_sass.py compiles it offline).

    layout: tiles_2d_layout(...) of the configuration; rows: query rows per program (BR; its tiles hold BM =
    _tile_rows(rows)); launch: LAUNCH_DEFAULTS
    with overrides; cuda: whether it runs on a GPU (inline assembly and the register cap only there); table_words:
    key_lookup_tables(codebook) as ints, needed where the tables go into the assembly (key_table_source
    "immediates"). Block size and warps are _auto_blocks' unless the launch gives them (a block size given without
    warps runs on 4)."""
    bm = _tile_rows(rows)
    block_n, num_stages, _, max_registers, num_warps = _auto_blocks(True, d, bm, layout["W"])
    use_asm = launch["inline_asm"] and cuda
    tables_in_asm = use_asm and launch["key_table_source"] == "immediates"
    key_asm = (
        key_asm_code(layout["KEY_BITS"], table_words if tables_in_asm else None, layout["P_K"] == 8) if use_asm else ""
    )
    if launch["num_warps"] is not None or launch["block_n"] is not None:  # (block and warps were chosen together)
        num_warps = launch["num_warps"] or 4
    if launch["max_registers"] is not None:
        max_registers = launch["max_registers"]
    elif not cuda or num_warps not in (2, 4):  # (the cap fits three 4-warp or six 2-warp programs in an SM)
        max_registers = 0
    consts = dict(D=d, VALUE_BITS=value_bits, GROUP=group_size, CAUSAL=causal, BM=bm, BR=rows,
                  BN=launch["block_n"] or block_n, KEY_ASM=key_asm, TABLES_IN_ASM=tables_in_asm,
                  VALUE_ASM=use_asm, num_warps=num_warps, num_stages=launch["num_stages"] or num_stages,
                  **layout)  # fmt: skip
    if max_registers:
        consts["maxnreg"] = max_registers
    return consts


def _auto_blocks(tiles_2d: bool, d: int, rows: int, value_width: int = 32) -> tuple[int, int, int, int, int]:
    """(block_n, num_stages, programs_per_sm, max_registers, num_warps) from H200 sweeps (benchmarks/RESULTS.md,
    `decode.py --graphs --sweep`). The 2-D kernel (with its key tables as immediates, the default key_table_source):
    128-token blocks, three pipeline stages, 4 warps and a cap of 168 registers, so that three programs share an SM
    instead of two (K4/V4 (16, 65536): 0.722 ms vs 0.758 with two stages and 0.766 uncapped; K3/V2 prod 0.778 vs
    0.805 and 0.853); at other head dims the blocks that hold the same tile bytes per thread, 256 tokens at head_dim
    64 and 64 at 256 (in the same cap and the shared memory of three programs per SM; at 64, 128-token blocks on 4
    warps route 2-bit values and 2- and 3-bit keys through shared memory element by element, 1.5x the instructions
    per token in the offline SASS) — at head_dim 64 for up to 16 query rows per program (rows, a decode step), as
    256-token blocks with 64 rows take 120 KB of shared memory (one program per SM). Value chunks 16 columns wide
    (value_width: 2-bit values at head_dim 64) with up to 16 rows take 2 warps and 128-token blocks instead, so that
    each warp computes its own 8 of the 16 columns of every P·V product (on 4 warps two computed each column; K3/V2
    (16, 65536) 0.409 ms vs 0.509, prod keys 0.398 vs 0.585). On CUDA its split count comes from its occupancy
    (decode_attention: one wave of programs), so programs_per_sm applies only elsewhere. The generic kernel:
    64-token blocks, three stages, 2 programs per SM, 4 warps."""
    if tiles_2d and value_width < 32 and rows <= 16:
        return 128, 3, 2, THREE_PER_SM_REGISTERS, 2
    if tiles_2d:
        return 128 * 128 // d if d > 64 or rows <= 16 else 128, 3, 2, THREE_PER_SM_REGISTERS, 4
    return 64, 3, 2, 0, 4


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def num_splits_for(
    batch_heads: int, capacity: int, block_n: int, device: torch.device, per_sm: int = 2, one_wave: bool = False
) -> int:
    """Splits of the token axis so that B·H_kv·splits gives every SM per_sm programs, from the capacity alone.

    one_wave: per_sm is how many programs an SM holds at once; round down, so that every program starts in the
    first wave (a partial second wave would double the time of the programs it holds)."""
    target = per_sm * _sm_count(device) if device.type == "cuda" else 4
    return _split_count(batch_heads, capacity, block_n, target, one_wave)


def _split_count(batch_heads: int, capacity: int, block_n: int, target: int, one_wave: bool) -> int:
    blocks = max(1, -(-capacity // block_n))
    per_head = target // batch_heads if one_wave else -(-target // batch_heads)
    return max(1, min(blocks, per_head, 128))


# A denser launch of the 2-D kernel at head_dim 128 (4 warps, 16-row tiles): a cap of 128 registers and two stages
# fit four programs per SM instead of three, each a little slower: on the H200 at (16, 65536), where both fill
# their slots, an SM does DENSE_RATE of the default's work or more (prod keys 0.559 vs 0.647 ms, K3/V2 0.534 vs
# 0.566, K4/V4 0.542 vs 0.558). DecodePlan takes it where its busy slots times DENSE_RATE exceed the default's (a
# grid of heads that fills the default's waves badly): (32, 8192) and (64, 8192), K4/V4 0.152 vs 0.166 and 0.287 vs
# 0.303 ms (benchmarks/RESULTS.md, fourteenth session).
DENSE_LAUNCH = dict(max_registers=128, num_stages=2)
DENSE_RATE = 0.86


def slot_use(batch_heads: int, capacity: int, block_n: int, slots: int) -> float:
    """Share of a one-wave-split launch's program slots (programs per SM × SMs) kept busy over its waves: the
    split count as num_splits_for(one_wave=True) gives it for that many slots."""
    programs = batch_heads * _split_count(batch_heads, capacity, block_n, slots, True)
    return programs / (slots * -(-programs // slots))


_RESIDENT: dict[tuple, int] = {}


def _resident_programs(kernel, device: torch.device, num_warps: int) -> int:
    """Programs of a compiled kernel one SM holds at once: the least of its register, shared-memory and
    warp limits (registers are allocated per warp in units of 256)."""
    kernel._init_handles()
    props = torch.cuda.get_device_properties(device)
    regs = -(-kernel.n_regs * 32 // 256) * 256 * num_warps
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // max(regs, 1)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    by_smem = smem // (kernel.metadata.shared + 1024) if kernel.metadata.shared else 32
    by_warps = props.max_threads_per_multi_processor // (32 * num_warps)
    return max(1, min(by_regs, by_smem, by_warps, 32))


# Partial-result workspaces by shape, shared by the plans of that shape; the least recently used are forgotten
# beyond MAX_WORKSPACES, or beyond MAX_WORKSPACE_BYTES together (their memory goes once no plan holds them), so that
# chunks of many lengths do not keep growing the GPU memory held.
_WORKSPACES: collections.OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
MAX_WORKSPACES = 16
MAX_WORKSPACE_BYTES = 2**30


def _workspace(device, bh: int, splits: int, rows: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_part [bh·splits·rows, d], l_part [bh·splits·rows]) float32 on device."""
    key = (device, bh, splits, rows, d)
    if key in _WORKSPACES:
        _WORKSPACES.move_to_end(key)
    else:
        _WORKSPACES[key] = (
            torch.empty(bh * splits * rows, d, dtype=torch.float32, device=device),
            torch.empty(bh * splits * rows, dtype=torch.float32, device=device),
        )
        while len(_WORKSPACES) > 1 and (
            len(_WORKSPACES) > MAX_WORKSPACES
            or sum(o.nbytes + l.nbytes for o, l in _WORKSPACES.values()) > MAX_WORKSPACE_BYTES
        ):
            _WORKSPACES.popitem(last=False)  # the least recently used (never the one just made)
    return _WORKSPACES[key]


def _split_plan(bh: int, row_tiles: int, capacity: int, block_n: int, device, per_sm: int, mp: int, d: int,
                one_wave: bool = False):  # fmt: skip
    """(splits, split_size, o_part, l_part) of a split-kernel launch over bh heads × row_tiles query-row tiles:
    num_splits_for, split_size a multiple of block_n, and the cached workspaces (mp rows per head and split)."""
    splits = num_splits_for(bh * row_tiles, capacity, block_n, device, per_sm, one_wave=one_wave)
    split_size = -(-max(capacity, 1) // (splits * block_n)) * block_n
    return (splits, split_size, *_workspace(device, bh, splits, mp, d))


def decode_attention(
    q_rot: torch.Tensor,
    sq: torch.Tensor | None,
    buffers: dict[str, torch.Tensor],
    codebook: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_start: torch.Tensor,
    q_start: torch.Tensor,
    *,
    key_bits: int,
    key_mode: str,
    value_bits: int,
    group_size: int,
    n_q: int,
    causal: bool = True,
    q_scale: float = 1.0,
    exact: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    sinks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    window: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    key_mean: torch.Tensor | None = None,
    key_tables: torch.Tensor | None = None,
    key_table_words: tuple[int, ...] | None = None,
    **launch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of prepared queries over a compressed cache.

    Args:
        q_rot: [B, H_kv, M, D] float32, M = G·N_q rows (query heads of one KV head, then queries; any M, in
            tiles of MAX_ROWS rows per program), already rotated (Πq); times q_scale it holds the logits' factor
            scale·log2(e).
        sq: [B, H_kv, M, D] float32, S q times √(π/2)/d (prod keys; also times q_scale in the kernel), else None.
        q_scale: multiplies q_rot, sq and the exact queries in the kernels (a caller passes scale·log2(e) here
            instead of scaling its query tensors).
        buffers: the cache buffers (``key_codes`` [B, H_kv, C, D·kb/8], ``key_norms`` [B, H_kv, C], ...).
        codebook: [2^kb] float32 centroids divided by √d.
        seq_lens: [B] int, stored slots per sequence.  kv_start: [B] int, first slot to attend (slots
            before it hold left padding).  q_start: [B] int, position of query 0.
        exact: optional (qx, k, v) adding the queries' own N_q tokens as exact key/value rows, in causal order
            (query i sees tokens 0 .. i; a decode step: its one token): qx [B, H_kv, M, D] float32 contiguous, the
            unrotated queries (times q_scale in the kernel); k, v [B, H_kv, N_q, D] any float dtype, last
            dimension contiguous.
        sinks: optional (k, v, start) adding exact sink rows to an ``exact`` step: k, v [B, H_kv, S + 1, D]
            contiguous, row j the token at position start[b] + j (start [B] int), attended where before q_start.
        window: optional (k, v, start, lower) adding the exact rows of a full-precision window of recent tokens to
            an ``exact`` step: k, v [B, H_kv, W, D] contiguous, a ring of W rows (position p in row p mod W) whose
            oldest position is start[b] (start, lower [B] int), attended where at or after lower[b] and before
            q_start[b].
        key_mean: optional [B, H_kv, D] float32 subtracted from the exact, sink and window keys (as it was from
            the stored ones).
        key_tables: key_lookup_tables(codebook), computed once by the caller (else here, on every call).
        key_table_words: the same four int32 values on the host, for the launch option key_table_source="immediates"
            (else read from the device on every call, which synchronises).
        launch: overrides of LAUNCH_DEFAULTS (block_n, num_warps, num_stages, programs_per_sm, register_codebook,
            key_major; tiles_2d: use _decode_split_kernel_2d where the configuration allows; inline_asm: let it
            unpack with inline PTX, on CUDA only; max_registers: its per-thread register cap, 0 for none;
            key_table_source: "operands" or "immediates", where its key lookup tables live).
    Returns:
        out [B, H_kv, M, D] float32 and lse [B, H_kv, M] float32 (natural log; -inf where no key).
    """
    unknown = set(launch) - set(LAUNCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown launch options {sorted(unknown)}; allowed: {sorted(LAUNCH_DEFAULTS)}")
    launch = {**LAUNCH_DEFAULTS, **launch}
    if launch["key_table_source"] not in KEY_TABLE_SOURCES:
        raise ValueError(f"key_table_source must be one of {KEY_TABLE_SOURCES}, got {launch['key_table_source']!r}")
    if launch["dependent_launch"] not in (None, *DEPENDENT_LAUNCHES):
        raise ValueError(f"dependent_launch must be None (automatic) or one of {DEPENDENT_LAUNCHES}, got "
                         f"{launch['dependent_launch']!r}")  # fmt: skip
    b, h_kv, m, d = q_rot.shape
    if d not in (64, 128, 256):
        raise ValueError(f"the fused decode kernel supports head_dim 64, 128 or 256, got {d}")
    if not (q_rot.is_contiguous() and q_rot.dtype == torch.float32):
        raise ValueError("q_rot must be a contiguous float32 tensor [B, H_kv, M, D]")
    for name, t in buffers.items():
        if t.device != q_rot.device or not t.is_contiguous():
            raise ValueError(f"buffer {name} must be contiguous and on {q_rot.device}")
    check_value_affine(buffers["value_affine"])
    if exact is not None:
        qx, kx, vx = exact
        if not (qx.shape == q_rot.shape and qx.dtype == torch.float32 and qx.is_contiguous()):
            raise ValueError(f"exact queries must be a contiguous float32 tensor of shape {tuple(q_rot.shape)}")
        if m % n_q:
            raise ValueError(f"an exact step takes M = G·N_q query rows (G query heads per KV head), got M = {m} "
                             f"for N_q = {n_q}")  # fmt: skip
        for name, t in (("k", kx), ("v", vx)):
            if t.shape != (b, h_kv, n_q, d) or t.stride(-1) != 1 or t.device != q_rot.device:
                raise ValueError(f"exact {name} must be [B, H_kv, N_q, D] = {(b, h_kv, n_q, d)} with a contiguous "
                                 f"last dimension on {q_rot.device}, got {tuple(t.shape)}")  # fmt: skip
    n_sinks = 0
    if sinks is not None:
        sk, sv, _ = sinks
        n_sinks = sk.shape[2] - 1
        if exact is None:
            raise ValueError("sinks are attended in an exact step only (pass exact)")
        for name, t in (("k", sk), ("v", sv)):
            if t.shape[:2] != (b, h_kv) or t.shape[3] != d or not t.is_contiguous() or t.device != q_rot.device:
                raise ValueError(f"sink {name} must be a contiguous [B, H_kv, S + 1, D] = [{b}, {h_kv}, S + 1, {d}] "
                                 f"tensor on {q_rot.device}, got {tuple(t.shape)}")  # fmt: skip
    window_rows = 0
    if window is not None:
        wk, wv, w_start, w_lower = window
        window_rows = wk.shape[2]
        if exact is None:
            raise ValueError("a window is attended in an exact step only (pass exact)")
        for name, t in (("k", wk), ("v", wv)):
            if t.shape != (b, h_kv, window_rows, d) or not t.is_contiguous() or t.device != q_rot.device:
                raise ValueError(f"window {name} must be a contiguous [B, H_kv, W, D] = [{b}, {h_kv}, W, {d}] tensor "
                                 f"on {q_rot.device}, got {tuple(t.shape)} (k's W = {window_rows})")  # fmt: skip
        for name, t in (("start", w_start), ("lower", w_lower)):
            if t.shape != (b,) or t.dtype not in (torch.int32, torch.int64) or t.device != q_rot.device:
                raise ValueError(f"window {name} must be an int tensor [B] = [{b}] on {q_rot.device}, got "
                                 f"{t.dtype} {tuple(t.shape)}")  # fmt: skip
    km = key_mean
    if km is not None and (km.shape != (b, h_kv, d) or km.dtype != torch.float32 or not km.is_contiguous()):
        raise ValueError(f"key_mean must be a contiguous float32 tensor [{b}, {h_kv}, {d}]")
    plan = DecodePlan(
        q_rot, sq, buffers, codebook, seq_lens, kv_start, q_start, key_bits=key_bits, key_mode=key_mode,
        value_bits=value_bits, group_size=group_size, n_q=n_q, causal=causal, exact=exact is not None,
        n_sinks=n_sinks, window_rows=window_rows, key_tables=key_tables, key_table_words=key_table_words,
        launch=launch,
    )  # fmt: skip
    return plan(q_rot, sq, seq_lens, kv_start, q_start, q_scale=q_scale, exact=exact, sinks=sinks, window=window,
                key_mean=km)  # fmt: skip


class DecodePlan:
    """A decode launch over fixed cache buffers, decided once: kernel, layouts, block size, pipeline depth, split
    count (from the compiled kernel's occupancy), workspaces and compile-time constants. Calling it launches the
    split kernel and the merge with one step's queries, without re-checking them: decode_attention builds one per
    call after validating its inputs; a cache keeps one across steps (its buffers must stay the same tensors), whose
    launches after the first skip Triton's argument binding (kernels.launch.PreparedLaunch; split_launch is the
    split kernel's).

    The constructor takes example inputs of the shapes and dtypes every call will pass (see decode_attention for
    their meaning) and ``exact`` / ``n_sinks`` / ``window_rows``: whether calls add the queries' own tokens as exact
    rows, how many sink rows, and the rows of the window's buffers (0: no window)."""

    def __init__(self, q_rot, sq, buffers, codebook, seq_lens, kv_start, q_start, *, key_bits: int, key_mode: str,
                 value_bits: int, group_size: int, n_q: int, causal: bool, exact: bool, n_sinks: int,
                 key_tables: torch.Tensor | None, key_table_words: tuple[int, ...] | None, launch: dict,
                 window_rows: int = 0):  # fmt: skip
        b, h_kv, m, d = q_rot.shape
        key_codes = buffers["key_codes"]
        c = key_codes.shape[2]
        prod = key_mode == "prod"
        kb = key_bits - 1 if prod else key_bits
        layout_2d = tiles_2d_layout(d, key_bits, key_mode, value_bits, group_size) if launch["tiles_2d"] else None
        # query rows per tile (bm) and per program (br): the 2-D kernel takes 8 rows in 16-row tiles
        rows = triton.next_power_of_2(min(m, MAX_ROWS))
        bm = _tile_rows(rows)
        br = max(8, rows) if layout_2d is not None else bm
        row_tiles = triton.cdiv(m, br)
        mp = row_tiles * br
        one_wave = q_rot.is_cuda and launch["programs_per_sm"] is None
        # the merge as a programmatic dependent launch: sm_90+
        cuda_90 = q_rot.is_cuda and torch.cuda.get_device_capability(q_rot.device)[0] >= 9
        pdl = (launch["dependent_launch"] or ("early" if window_rows else "wait")) if cuda_90 else "off"
        signs = buffers["key_signs"] if prod else key_codes
        rnorms = buffers["key_rnorms"] if prod else key_codes
        if layout_2d is not None:
            if key_tables is None:
                key_tables = key_lookup_tables(codebook)
            in_asm = q_rot.is_cuda and launch["inline_asm"] and launch["key_table_source"] == "immediates"
            if in_asm and key_table_words is None:
                key_table_words = tuple(key_tables.tolist())
            self._buffer_args = (key_codes, buffers["key_norms"], signs, rnorms, buffers["value_codes"],
                                 buffers["value_affine"].view(torch.int32), codebook, key_tables)  # fmt: skip
            consts = kernel_2d_constants(d, layout_2d, value_bits, group_size, causal, br, launch, q_rot.is_cuda,
                                         key_table_words)  # fmt: skip
            consts["DEPENDENTS"] = pdl == "early"

            def programs_per_sm(consts: dict) -> int:  # (compiles the kernel once per set of constants)
                key = (q_rot.device, *sorted(consts.items()))
                if key not in _RESIDENT:
                    o_part, l_part = _workspace(q_rot.device, b * h_kv, 1, mp, d)
                    with on_device(q_rot.device):  # (loads the compiled kernel on the cache's device)
                        compiled = _decode_split_kernel_2d.warmup(
                            q_rot, sq if prod else q_rot, *self._buffer_args, seq_lens, kv_start, q_start, o_part,
                            l_part, h_kv, c, m, n_q, c, 1.0, grid=(1, 1, 1), **consts,
                        )  # fmt: skip
                        _RESIDENT[key] = _resident_programs(compiled, q_rot.device, consts["num_warps"])
                return _RESIDENT[key]

            if not one_wave:
                per_sm = launch["programs_per_sm"] or _auto_blocks(True, d, bm, layout_2d["W"])[2]
            else:  # as many splits as the SMs hold programs at once (the splits do not change the code)
                per_sm = programs_per_sm(consts)
                sms, heads = _sm_count(q_rot.device), b * h_kv * row_tiles
                use = slot_use(heads, c, consts["BN"], per_sm * sms)
                default = all(launch[k] is None for k in DENSE_LAUNCH)
                if d == 128 and bm == 16 and consts["num_warps"] == 4 and default and use < DENSE_RATE:
                    dense = kernel_2d_constants(d, layout_2d, value_bits, group_size, causal, br,
                                                {**launch, **DENSE_LAUNCH}, True, key_table_words)  # fmt: skip
                    dense["DEPENDENTS"] = pdl == "early"
                    dense_per_sm = programs_per_sm(dense)
                    if slot_use(heads, c, dense["BN"], dense_per_sm * sms) * DENSE_RATE > use:
                        consts, per_sm = dense, dense_per_sm
            block_n = consts["BN"]
            splits, split_size, o_part, l_part = _split_plan(b * h_kv, row_tiles, c, block_n, q_rot.device, per_sm,
                                                             mp, d, one_wave)  # fmt: skip
            kernel = _decode_split_kernel_2d
        else:
            block_n, num_stages, per_sm, _, num_warps = _auto_blocks(False, d, bm)
            block_n, per_sm = launch["block_n"] or block_n, launch["programs_per_sm"] or per_sm
            num_stages = launch["num_stages"] or num_stages
            splits, split_size, o_part, l_part = _split_plan(b * h_kv, row_tiles, c, block_n, q_rot.device, per_sm,
                                                             mp, d)  # fmt: skip
            p_k = 8 if kb == 3 else 8 // kb
            p_v = 8 if value_bits == 3 else 8 // value_bits
            self._buffer_args = (key_codes, buffers["key_norms"], signs, rnorms, buffers["value_codes"],
                                 buffers["value_affine"], codebook)  # fmt: skip
            consts = dict(
                D=d, KEY_BITS=key_bits, VALUE_BITS=value_bits, GROUP=group_size, PROD=prod, CAUSAL=causal,
                BM=bm, BN=block_n, P_K=p_k, DP_K=d // p_k, P_V=p_v, DP_V=d // p_v, NUM_SPLITS=splits,
                REGISTER_CODEBOOK=launch["register_codebook"], KEY_MAJOR=launch["key_major"],
                num_warps=launch["num_warps"] or num_warps, num_stages=num_stages,
            )  # fmt: skip
            kernel = _decode_split_kernel
        self.buffers = buffers
        self._prod, self._shape = prod, (b, h_kv, m, d)
        self._workspaces = (o_part, l_part)
        self._exact = exact
        fixed = dict(zip(kernel.arg_names[2 : 2 + len(self._buffer_args)], self._buffer_args, strict=True))
        fixed.update(O_PART=o_part, L_PART=l_part, H_KV=h_kv, C=c, M=m, N_Q=n_q, SPLIT_SIZE=split_size)
        # (q, sq, lens, starts, scale)
        self.split_launch = PreparedLaunch(kernel, (b * h_kv, splits, row_tiles), consts, fixed)
        self._merge_consts = dict(D=d, MP=mp, NUM_SPLITS=splits, BS=triton.next_power_of_2(splits),
                                  EXACT=n_q if exact else 0, XP=triton.next_power_of_2(n_q), SINKS=n_sinks,
                                  SP=triton.next_power_of_2(max(n_sinks, 1)), WAIT=pdl != "off")  # fmt: skip
        self._merge_kernel, self._merge_grid = _merge_splits_kernel, (b * h_kv * m,)
        if window_rows:  # (decode_attention has checked that a window comes with exact rows)
            self._merge_consts.update(XP=max(16, self._merge_consts["XP"]), SP=max(16, self._merge_consts["SP"]),
                                      WINDOW=WINDOW_ROWS, RT=MERGE_ROWS, RL=min(MERGE_ROWS, triton.next_power_of_2(m)),
                                      PARTS16=q_rot.is_cuda, num_warps=MERGE_WARPS)  # fmt: skip
            self._merge_kernel, self._merge_grid = _merge_window_kernel, (b * h_kv, triton.cdiv(m, MERGE_ROWS))
        self._window_rows = window_rows
        if pdl != "off":
            self._merge_consts["launch_pdl"] = True
        self._merges = {}  # CENTER -> the merge's PreparedLaunch

    def __call__(self, q_rot, sq, seq_lens, kv_start, q_start, *, q_scale=1.0, exact=None, sinks=None, window=None,
                 key_mean=None, out_dtype=torch.float32):  # fmt: skip
        """Launch: the arguments as in decode_attention, ``exact``, ``sinks`` and ``window`` given exactly when the
        plan was built for them. Returns (out [B, H_kv, M, D] in out_dtype, lse [B, H_kv, M] float32)."""
        b, h_kv, m, d = self._shape
        o_part, l_part = self._workspaces
        out = torch.empty(b, h_kv, m, d, dtype=out_dtype, device=q_rot.device)
        lse = torch.empty(b, h_kv, m, dtype=torch.float32, device=q_rot.device)
        if self._exact:
            qx, kx, vx = exact
            if kx.stride()[:3] != vx.stride()[:3]:
                kx, vx = kx.contiguous(), vx.contiguous()
            sx_b, sx_h, sx_n = kx.stride()[:3]
        else:
            qx = kx = vx = q_rot
            sx_b = sx_h = sx_n = 0
        sk, sv, sink_start = sinks if sinks is not None else (q_rot, q_rot, q_start)
        wk, wv, w_start, w_lower = window if window is not None else (q_rot, q_rot, q_start, q_start)
        center = key_mean is not None and self._exact
        merge = self._merges.get(center)
        if merge is None:
            merge = self._merges[center] = PreparedLaunch(
                self._merge_kernel, self._merge_grid, dict(self._merge_consts, CENTER=center),
                dict(O_PART=o_part, L_PART=l_part, M=m, H_KV=h_kv, WC=self._window_rows),
            )  # fmt: skip
        with on_device(q_rot.device):
            self.split_launch(q_rot, sq if self._prod else q_rot, seq_lens, kv_start, q_start, q_scale)
            merge(out, lse, qx, kx, vx, sx_b, sx_h, sx_n, sk, sv, q_rot if key_mean is None else key_mean, sink_start,
                  q_start, q_scale, wk, wv, w_start, w_lower)  # fmt: skip
        return out, lse
