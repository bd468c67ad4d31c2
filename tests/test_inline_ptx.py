"""The kernels' inline PTX, run on the CPU by a small interpreter of the instructions it uses.

The GPU tests compare the assembly path with the reference; here (no GPU needed) every unpacking routine is
checked word by word against what its portable Triton twin computes: the same fp16 values, bit for bit,
for random 32-bit words and for the all-zero and all-one words.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import search_inputs

from turboquant.codebook import get_codebook
from turboquant.kernels import decode, encode
from turboquant.packing import from_key_codes, to_key_codes
from turboquant.quantizers import TurboQuantMSE

M32 = 0xFFFFFFFF


def _f16x2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (x & 0xFFFF).astype(np.uint16).view(np.float16), (x >> 16).astype(np.uint16).view(np.float16)


def _pack_f16x2(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return lo.astype(np.float16).view(np.uint16).astype(np.uint64) | (
        hi.astype(np.float16).view(np.uint16).astype(np.uint64) << 16
    )


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a & M32) & (b if i & 2 else ~b & M32) & (c if i & 1 else ~c & M32)
    return out


def _prmt(a, b, c):
    """Default mode: output byte i is byte (c >> 4i) & 7 of {b, a}; with bit 3 of the selector, that byte's
    sign replicated."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = np.choose((sel & 7).astype(np.int64), pool)
        byte = np.where(sel & 8, np.where(byte & 0x80, 0xFF, 0), byte)
        out |= byte.astype(np.uint64) << (8 * i)
    return out


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.uint32).view(np.float32)


def _s32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.uint32).view(np.int32).astype(np.int64)


def run_ptx(code: str, operands: dict[int, np.ndarray],
            memory: tuple[int, bytes] | None = None) -> dict[int, np.ndarray]:  # fmt: skip
    """Execute the instruction subset of the kernels' assembly on uint64 arrays holding 32-bit registers (64-bit
    ones for addresses and .b64 registers); memory: (address, bytes) that global loads may read."""
    regs: dict[str, np.ndarray] = {f"${k}": v.astype(np.uint64) for k, v in operands.items()}
    n = len(next(iter(operands.values())))
    wide = {"$" + str(k) for k, v in operands.items() if v.dtype == np.uint64 and (v > M32).any()}

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if tok.startswith("0f"):  # a float32 immediate, as its bits
            return np.full(n, int(tok[2:], 16), dtype=np.uint64)
        return np.full(n, int(tok, 0) & M32, dtype=np.uint64)

    def load(address: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        base, data = memory
        words = np.frombuffer(data, dtype=np.uint32)
        at = address.astype(np.int64) - base
        assert (at >= 0).all() and (at + 8 <= len(data)).all() and (at % 8 == 0).all(), "load outside the table"
        return words[at // 4].astype(np.uint64), words[at // 4 + 1].astype(np.uint64)

    body = code.strip().removeprefix("{").removesuffix("}")
    for stmt in filter(None, (s.strip() for s in body.split(";"))):
        if stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        if op == "ld.global.nc.v2.b32":  # {lo, hi}, [address(+offset)]
            m = re.fullmatch(r"\{\s*(\w+),\s*(\w+)\s*\},\s*\[(\$?\w+)(?:\+(\d+))?\]", args.strip())
            regs[m.group(1)], regs[m.group(2)] = load(regs[m.group(3)] + np.uint64(int(m.group(4) or 0)))
            continue
        dst, *src = [t.strip() for t in args.split(",")]
        if op == "mad.wide.s32":  # a 64-bit address: a signed 32-bit index times a constant plus a 64-bit base
            assert src[2] in wide, "the base of mad.wide must be a 64-bit operand"
            regs[dst] = (_s32(val(src[0])) * int(src[1]) + regs[src[2]].astype(np.int64)).astype(np.uint64)
            continue
        if op == "setp.gt.f32":
            regs[dst] = _f32(val(src[0])) > _f32(val(src[1]))
            continue
        if op == "fma.rn.f32":  # modelled for a power-of-two multiplier, where the product is exact in float32
            assert (np.frexp(_f32(val(src[1])))[0] == 0.5).all(), "fma.rn.f32 is modelled for a power of two only"
            out = (_f32(val(src[0])) * _f32(val(src[1])) + _f32(val(src[2]))).view(np.uint32)
        elif op in ("selp.b32", "selp.s32"):
            out = np.where(regs[src[2]], val(src[0]), val(src[1]))
        elif op == "sub.s32":
            out = (_s32(val(src[0])) - _s32(val(src[1]))) & M32
        elif op == "max.s32":
            out = np.maximum(_s32(val(src[0])), _s32(val(src[1]))) & M32
        elif op == "min.s32":
            out = np.minimum(_s32(val(src[0])), _s32(val(src[1]))) & M32
        elif op == "mov.b32":
            out = val(src[0])
        elif op == "lop3.b32":
            out = _lop3(val(src[0]), val(src[1]), val(src[2]), int(src[3], 0))
        elif op == "and.b32":
            out = val(src[0]) & val(src[1])
        elif op == "shr.u32":
            out = val(src[0]) >> val(src[1])
        elif op == "shl.b32":
            out = (val(src[0]) << int(src[1])) & M32
        elif op == "mul.lo.u32":
            out = (val(src[0]) * val(src[1])) & M32
        elif op == "prmt.b32":
            out = _prmt(val(src[0]), val(src[1]), val(src[2]))
        elif op == "sub.f16x2":
            (a0, a1), (b0, b1) = _f16x2(val(src[0])), _f16x2(val(src[1]))
            out = _pack_f16x2(a0.astype(np.float64) - b0, a1.astype(np.float64) - b1)
        elif op == "fma.rn.f16x2":  # exact product and sum in float64, one rounding to fp16
            (a0, a1), (b0, b1), (c0, c1) = _f16x2(val(src[0])), _f16x2(val(src[1])), _f16x2(val(src[2]))
            out = _pack_f16x2(a0.astype(np.float64) * b0 + c0, a1.astype(np.float64) * b1 + c1)
        else:
            raise AssertionError(f"instruction {op!r} not modelled")
        regs[dst] = out.astype(np.uint64) & M32
    return {int(k[1:]): v for k, v in regs.items() if re.fullmatch(r"\$\d+", k)}


def _words(seed: int, n: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate(([0, M32], rng.integers(0, 2**32, n, dtype=np.uint64))).astype(np.uint64)


def _bytes(w: np.ndarray) -> list[np.ndarray]:
    return [(w >> (8 * k)) & 0xFF for k in range(4)]


def _field(regs: dict[int, np.ndarray], first: int) -> list[np.ndarray]:
    """The 4 fp16 values of one output field (registers first, first + 1), in element order."""
    lo0, hi0 = _f16x2(regs[first])
    lo1, hi1 = _f16x2(regs[first + 1])
    return [lo0, hi0, lo1, hi1]


def _kernel_codebook(bits: int, d: int = 128) -> torch.Tensor:
    """As TurboQuantKVCache hands it to the kernels: antisymmetric, indexed by the stored codes (4 bits:
    sign-magnitude, packing.to_key_codes)."""
    cb = get_codebook(d, bits, "cpu").double() / d**0.5
    cb = ((cb - cb.flip(0)) / 2).float()
    return cb[from_key_codes(torch.arange(2**bits), bits)]


def _table_operands(cb: torch.Tensor, first: int, n: int, pack: int = 4) -> dict[int, np.ndarray]:
    """The four lookup tables as the kernel passes them: operands first, first + pack, ... (each 32-bit input
    takes ``pack`` registers)."""
    words = decode.key_lookup_tables(cb).numpy().astype(np.int64) & M32
    return {first + pack * i: np.full(n, words[i], dtype=np.uint64) for i in range(4)}


def test_lookup_tables_hold_the_fp16_centroids():
    cb = _kernel_codebook(3)
    words = decode.key_lookup_tables(cb).numpy().astype(np.int64) & M32
    bits = cb.half().view(torch.int16).numpy().astype(np.int64) & 0xFFFF
    for i, b in enumerate(bits):
        lo = (words[i // 4] >> (8 * (i % 4))) & 0xFF
        hi = (words[2 + i // 4] >> (8 * (i % 4))) & 0xFF
        assert lo | hi << 8 == b


def _table_words(cb: torch.Tensor) -> tuple[int, ...]:
    return tuple(decode.key_lookup_tables(cb).tolist())


@pytest.mark.parametrize("tables", ["operands", "immediates"])
def test_key4_lookup_matches_the_codebook(tables):
    cb = _kernel_codebook(4)
    table = cb.half().numpy()
    w = _words(0)
    if tables == "operands":
        regs = run_ptx(decode.key_asm_code(4), {4: w, **_table_operands(cb, 5, len(w), pack=2)})
    else:  # the tables written into the assembly: the codes are its only input
        regs = run_ptx(decode.key_asm_code(4, _table_words(cb)), {4: w})
    elements = (w & 0xFFFF, w >> 16)  # two int16 elements of 4 codes (packing.pack_key_codes)
    sign_bits = (7, 15, 3, 11)  # nibble j's rank in bits 4j..4j+2, its sign at sign_bits[j]
    for j in range(4):  # register j: the code of nibble j of element 0 (low half) and of element 1 (high half)
        for half, got in enumerate(_f16x2(regs[j])):
            e = elements[half]
            code = ((e >> (4 * j)) & 7) | (((e >> sign_bits[j]) & 1) << 3)
            want = table[code.astype(np.int64)]
            np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("tables", ["operands", "immediates"])
@pytest.mark.parametrize("bits", [2, 3])
def test_plane_key_lookup_matches_the_codebook(bits, tables):
    """Bytes (pack=4, head_dim 64): h selects bit 2f + h of the 1-bit plane; output field f in registers 2f, 2f+1."""
    cb = _kernel_codebook(bits)
    table = cb.half().numpy()
    codes, high = _words(1), _words(2)
    n = len(codes)
    half = np.arange(n, dtype=np.uint64) % 2 * 0x01010101  # which bit of the byte, the same for its 4 bytes
    operands = {8: codes, 9: high, 10: half} if bits == 3 else {8: codes}
    if tables == "operands":
        operands.update(_table_operands(cb, 11 if bits == 3 else 9, n))
        regs = run_ptx(decode.key_asm_code(bits, pairs=False), operands)
    else:
        regs = run_ptx(decode.key_asm_code(bits, _table_words(cb), pairs=False), operands)
    for f in range(4):
        got = _field(regs, 2 * f)
        for k, (byte, hb) in enumerate(zip(_bytes(codes), _bytes(high), strict=True)):
            idx = (byte >> (2 * f)) & 3
            if bits == 3:  # the high bit of field f: bit 2f + h of the 1-bit plane byte
                idx = idx | (((hb >> (2 * f + (half & 1))) & 1) << 2)
            want = table[idx.astype(np.int64)]
            np.testing.assert_array_equal(got[k].view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("tables", ["operands", "immediates"])
def test_plane_key_pairs_lookup_matches_the_codebook(tables):
    """2-bit indices as int16 pairs (pack=2): register f + 4b holds field f of byte b of element 0 (low half) and
    of element 1 (high half)."""
    cb = _kernel_codebook(2)
    table = cb.half().numpy()
    codes = _words(4)
    operands = {8: codes}
    if tables == "operands":
        operands.update(_table_operands(cb, 9, len(codes), pack=2))
        regs = run_ptx(decode.key_asm_code(2, pairs=True), operands)
    else:
        regs = run_ptx(decode.key_asm_code(2, _table_words(cb), pairs=True), operands)
    for f in range(4):
        for b in range(2):
            for half, got in enumerate(_f16x2(regs[f + 4 * b])):
                want = table[((codes >> (16 * half + 8 * b + 2 * f)) & 3).astype(np.int64)]
                np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("tables", ["operands", "immediates"])
def test_key3_pairs_lookup_matches_the_codebook(tables):
    """3-bit indices as int16 pairs (pack=8, the four registers of a tensor-core operand tile): register r of tile
    f + 4b holds field f of byte b of both elements of plane register r, its high bit from high register r mod 2,
    bit 8b + 2f (+ 1 for the columns 8-15 registers, r = 2 and 3)."""
    cb = _kernel_codebook(3)
    table = cb.half().numpy()
    planes = [_words(10 + r) for r in range(4)]
    highs = [_words(20), _words(21)]
    n = len(planes[0])
    operands = {32 + r: planes[r] for r in range(4)}
    operands.update({36: highs[0], 37: highs[1], 38: np.full(n, M32, np.uint64), 39: np.full(n, M32, np.uint64)})
    if tables == "operands":
        operands.update(_table_operands(cb, 40, n, pack=8))
        regs = run_ptx(decode.key_asm_code(3, pairs=True), operands)
    else:
        regs = run_ptx(decode.key_asm_code(3, _table_words(cb), pairs=True), operands)
    for f in range(4):
        for b in range(2):
            for r in range(4):
                for half, got in enumerate(_f16x2(regs[4 * (f + 4 * b) + r])):
                    shift = 16 * half + 8 * b + 2 * f
                    idx = ((planes[r] >> shift) & 3) | (((highs[r % 2] >> (shift + r // 2)) & 1) << 2)
                    want = table[idx.astype(np.int64)]
                    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("bits", [2, 4])
def test_value_dequantisation_matches_the_portable_path(bits):
    rng = np.random.default_rng(bits)
    w = _words(3)
    n = len(w)
    fields = 8 // bits
    c = (1 << bits) - 1
    operands = {2 * fields: w}
    scales = []
    for f in range(fields):  # s and z per field, two registers each (elements 0-1, 2-3)
        sc = rng.uniform(0.001, 0.2, (n, 4)).astype(np.float16)
        z = rng.uniform(-1, 1, (n, 4)).astype(np.float16)
        base = 2 * fields + 1 + 4 * f
        operands[base], operands[base + 1] = _pack_f16x2(sc[:, 0], sc[:, 1]), _pack_f16x2(sc[:, 2], sc[:, 3])
        operands[base + 2], operands[base + 3] = _pack_f16x2(z[:, 0], z[:, 1]), _pack_f16x2(z[:, 2], z[:, 3])
        scales.append((sc, z))
    regs = run_ptx(decode._value_asm(bits), operands)
    for f in range(fields):
        got = _field(regs, 2 * f)
        sc, z = scales[f]
        for k, byte in enumerate(_bytes(w)):
            x = ((byte >> (bits * f)) & c).astype(np.float64)
            want = (x * sc[:, k] + z[:, k]).astype(np.float16)
            np.testing.assert_array_equal(got[k].view(np.uint16), want.view(np.uint16))


def test_qjl_signs_are_plus_minus_one():
    w = _words(4)
    half = np.arange(len(w), dtype=np.uint64) % 2 * 0x01010101  # which bit of the byte, the same for its 4 bytes
    regs = run_ptx(decode._sign_asm(), {8: w, 9: half})
    for t in range(4):  # field t: bit 2t + h of every byte
        got = _field(regs, 2 * t)
        for k, byte in enumerate(_bytes(w)):
            want = np.where((byte >> (2 * t + (half & 1))) & 1, 1.0, -1.0).astype(np.float16)
            np.testing.assert_array_equal(got[k], want)


def test_qjl_sign_pairs_are_plus_minus_one():
    """pack=8 (head_dim 128): register r of tile j holds bit j (r < 2) or bit j + 8 (r ≥ 2) of both int16 elements
    of input register r mod 2 (the inputs at positions 2 and 3 are not read)."""
    elements = [_words(30), _words(31)]
    ones = np.full(len(elements[0]), M32, np.uint64)
    regs = run_ptx(decode._sign_pairs_asm(), {32: elements[0], 33: elements[1], 34: ones, 35: ones})
    for j in range(8):
        for r in range(4):
            for half, got in enumerate(_f16x2(regs[4 * j + r])):
                bit = (elements[r % 2] >> (16 * half + j + 8 * (r // 2))) & 1
                np.testing.assert_array_equal(got, np.where(bit, 1.0, -1.0).astype(np.float16))


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("bits,d", [(3, 128), (4, 128), (4, 64), (2, 256)])
def test_grid_search_gives_the_stored_codes(bits, d, scaled):
    """The encode kernel's codebook lookup (_grid_asm) on every boundary, the floats beside it, a dense sweep and
    far values: the stored code of #{t : x > b_t} and (without norm correction, zero) (c[idx] / √d)², bit for bit."""
    q = TurboQuantMSE(d, bits)
    b, cs = q.boundaries.float(), (q.centroids / q.scale).float()
    table, shift, bins = encode.grid_table(b, cs)
    x = search_inputs(b, 50_001)
    base = 0x7F12_3456_7000  # a 64-bit address: the table's bytes live there
    operands = {2: x.view(torch.int32).numpy().astype(np.uint32).astype(np.uint64),
                3: np.full(x.numel(), base, dtype=np.uint64)}  # fmt: skip
    regs = run_ptx(encode._grid_asm(shift, bins, scaled), operands, memory=(base, table.numpy().tobytes()))
    idx = torch.bucketize(x, b, right=False)  # #{t : b_t < x}
    np.testing.assert_array_equal(regs[0], to_key_codes(idx, bits).numpy())
    want = (cs[idx] * cs[idx]).view(torch.int32).numpy().astype(np.uint32) if scaled else np.zeros(x.numel())
    np.testing.assert_array_equal(regs[1], want)


def test_table_words_are_checked():
    with pytest.raises(ValueError, match="four int32 words"):
        decode.key_asm_code(4, (1, 2, 3))


def test_interpreter_models_prmt_sign_mode():
    a = np.array([0x80_7F_01_FF], dtype=np.uint64)
    # selectors: byte 0 as is, byte 1 as is, byte 2 sign-replicated (0x7F -> 0x00), byte 3 sign (0x80 -> 0xFF)
    assert int(_prmt(a, np.zeros_like(a), np.array([0xBA10], dtype=np.uint64))[0]) == 0xFF_00_01_FF
