"""Bit packing of b-bit indices into bytes: the dense container layout and the kernels' planar layout.

Dense layout (containers): the d indices of a vector form one little-endian bit stream, index j occupying bits
[j·b, (j+1)·b) with its least significant bit first; bit k of the stream is bit (k mod 8) of byte
k // 8. So 4-bit index 2j is the low nibble of byte j, and 3-bit vectors take ceil(3d/8) bytes.

Key codes (what a cache stores for b-bit codebook indices of an antisymmetric codebook, to_key_codes): the indices
themselves, except at 4 bits, where they are sign-magnitude: code i - 8 for an index i ≥ 8 (the positive centroids,
ascending) and 15 - i below, so that bits 0-2 are the rank of |c[i]| and bit 3 its sign; the decode kernel looks
the magnitude up by the low bits and takes the sign from the top one.

Key rows (pack_key_codes): the key codes in the planar layout, except that at 4 bits the four sign bits of every
16-bit element (bytes 2e, 2e + 1: the codes of columns 2e, 2e + d/2, 2e + 1, 2e + 1 + d/2, its nibbles 0-3) are
permuted: nibble j keeps its rank in bits 4j..4j+2, and the sign of nibble 0 sits at bit 7, of nibble 1 at bit 15,
of nibble 2 at bit 3, of nibble 3 at bit 11. Those are the positions the decode kernel's lookup needs them at (bit 7
of every byte of the element pair, and of the pair shifted by 4), so that it ors them into the looked-up high
bytes with one instruction per four codes instead of moving each one.
"""

from __future__ import annotations

import torch

__all__ = [
    "PACK_BITS",
    "PLANAR_BITS",
    "from_key_codes",
    "pack_indices",
    "pack_key_codes",
    "pack_planar",
    "packed_size",
    "planar_size",
    "to_key_codes",
    "unpack_indices",
    "unpack_key_codes",
    "unpack_planar",
]

PACK_BITS = (1, 2, 3, 4, 8)
PLANAR_BITS = (1, 2, 3, 4, 8)

_BYTE_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits must be one of {PACK_BITS}, got {bits!r}")


def packed_size(d: int, bits: int) -> int:
    """Bytes that d indices of ``bits`` bits occupy: ceil(d·bits / 8)."""
    _check_bits(bits)
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    return (d * bits + 7) // 8


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in [0, 2^bits) along the last dim.

    indices: [..., d] any integer dtype -> [..., packed_size(d, bits)] uint8.
    """
    _check_bits(bits)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be an integer tensor, got {indices.dtype}")
    d = indices.shape[-1]
    n_bytes = packed_size(d, bits)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**bits):
        raise ValueError(f"indices must lie in [0, {2**bits}) for {bits}-bit packing")
    if bits == 8:
        return indices.to(torch.uint8)
    idx = indices.to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32, device=idx.device)
    stream = ((idx.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., d*bits]
    pad = n_bytes * 8 - stream.shape[-1]
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    stream = stream.unflatten(-1, (n_bytes, 8))
    weights = _BYTE_WEIGHTS.to(idx.device)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: [..., packed_size(d, bits)] uint8 -> [..., d] uint8."""
    n_bytes = packed_size(d, bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if packed.shape[-1] != n_bytes:
        raise ValueError(
            f"packed has {packed.shape[-1]} bytes in its last dim; {d} indices of {bits} bits need {n_bytes}"
        )
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : d * bits]
    stream = stream.unflatten(-1, (d, bits))
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (stream * weights).sum(-1).to(torch.uint8)


def planar_size(d: int, bits: int) -> int:
    """Bytes of one vector in the planar layout (same as the dense one: d·bits/8, d a multiple of 8)."""
    if bits not in PLANAR_BITS:
        raise ValueError(f"planar bits must be one of {PLANAR_BITS}, got {bits!r}")
    if not isinstance(d, int) or d < 8 or d % 8:
        raise ValueError(f"the planar layout needs d to be a positive multiple of 8, got {d!r}")
    return d * bits // 8


def pack_planar(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack indices in the kernels' planar layout: [..., d] -> [..., d·bits/8] uint8.

    For bits b in {1, 2, 4, 8}, with p = 8 / b fields per byte, byte m holds the indices
    m + k·(d/p) for k = 0..p-1, index k in bits [k·b, (k+1)·b). Field k of a row of bytes is
    then the contiguous slice [k·d/p, (k+1)·d/p) of the vector, so a kernel that unpacks it with
    one shift and one mask pairs it with a contiguous slice of the query or the output.
    3-bit indices are a 2-bit plane (low bits, d/4 bytes) followed by a 1-bit plane (high bit, d/8).
    """
    d = indices.shape[-1]
    planar_size(d, bits)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**bits):
        raise ValueError(f"indices must lie in [0, {2**bits}) for {bits}-bit packing")
    if bits == 3:
        return torch.cat((pack_planar(indices & 3, 2), pack_planar(indices >> 2, 1)), dim=-1)
    p = 8 // bits
    fields = indices.to(torch.int32).unflatten(-1, (p, d // p))  # [..., p, d/p]
    shifts = (torch.arange(p, dtype=torch.int32, device=indices.device) * bits).unsqueeze(-1)
    return (fields << shifts).sum(-2).to(torch.uint8)


def unpack_planar(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_planar`: [..., d·bits/8] uint8 -> [..., d] uint8."""
    n_bytes = planar_size(d, bits)
    if packed.dtype != torch.uint8 or packed.shape[-1] != n_bytes:
        raise ValueError(
            f"packed must be uint8 [..., {n_bytes}] for d={d}, bits={bits}; got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == 3:
        lo = unpack_planar(packed[..., : d // 4], 2, d)
        hi = unpack_planar(packed[..., d // 4 :], 1, d)
        return lo | (hi << 2)
    p = 8 // bits
    shifts = (torch.arange(p, dtype=torch.int32, device=packed.device) * bits).unsqueeze(-1)
    fields = (packed.to(torch.int32).unsqueeze(-2) >> shifts) & (2**bits - 1)  # [..., p, d/p]
    return fields.flatten(-2).to(torch.uint8)


def to_key_codes(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """b-bit codebook indices (ascending centroids of an antisymmetric codebook) -> the codes a cache stores: the
    indices, or at 4 bits sign-magnitude codes, i - 8 for i ≥ 8 and 15 - i below (bits 0-2 the rank of |c|, bit 3
    set for the negative centroids)."""
    if bits != 4:
        return indices
    return torch.where(indices >= 8, indices - 8, 15 - indices).to(indices.dtype)


def from_key_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`to_key_codes`: at 4 bits codes s < 8 are index s + 8, the others 15 - s."""
    if bits != 4:
        return codes
    return torch.where(codes < 8, codes + 8, 15 - codes).to(codes.dtype)


# sign bits of a 16-bit element of 4-bit key codes: (bit in the planar layout, bit in the key rows), nibbles 0-3
_KEY4_SIGN_BITS = ((3, 7), (7, 15), (11, 3), (15, 11))


def _move_key4_signs(packed: torch.Tensor, to_rows: bool) -> torch.Tensor:
    """Permute the sign bits of every 16-bit element of 4-bit planar key codes (see the module docstring):
    [..., d/2] uint8 -> the same shape; to_rows: planar -> key rows, else back."""
    elements = packed.to(torch.int32).unflatten(-1, (-1, 2))
    e = elements[..., 0] | elements[..., 1] << 8  # [..., d/4]
    out = e & 0x7777
    for planar, row in _KEY4_SIGN_BITS:
        src, dst = (planar, row) if to_rows else (row, planar)
        out |= ((e >> src) & 1) << dst
    return torch.stack((out & 0xFF, out >> 8), dim=-1).flatten(-2).to(torch.uint8)


def pack_key_codes(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Codebook indices -> the key rows a cache stores: [..., d] -> [..., d·bits/8] uint8 (the planar layout of
    to_key_codes(indices), with the 4-bit sign bits where the decode kernel reads them; module docstring)."""
    packed = pack_planar(to_key_codes(indices, bits), bits)
    return _move_key4_signs(packed, True) if bits == 4 else packed


def unpack_key_codes(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_key_codes`: [..., d·bits/8] uint8 -> [..., d] codebook indices (uint8)."""
    if bits == 4 and packed.dtype == torch.uint8 and packed.shape[-1] == planar_size(d, 4):
        packed = _move_key4_signs(packed, False)
    return from_key_codes(unpack_planar(packed, bits, d), bits)
