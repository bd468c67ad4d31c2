"""The quantizers: TurboQuantMSE (Algorithm 1), TurboQuantProd (Algorithm 2), ValueQuantizer.

Shapes: inputs are ``x: [..., d]`` (any leading dims; float32, float16 or bfloat16) and
``decompress`` returns ``[..., d]`` in the input's dtype. Containers are dataclasses of tensors;
``nbytes()`` counts every byte they hold. Arithmetic is float32 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .codebook import SUPPORTED_BITS, get_codebook
from .packing import pack_indices, packed_size, unpack_indices, unpack_key_codes
from .rotation import DEFAULT_QJL_SEED, DEFAULT_ROTATION_SEED, ROTATIONS, _device_key, get_qjl_matrix, get_rotation

__all__ = [
    "FLOAT_DTYPES",
    "MSECompressed",
    "ProdCompressed",
    "TurboQuantMSE",
    "TurboQuantProd",
    "ValueCompressed",
    "VALUE_BITS",
    "ValueQuantizer",
    "compression_ratio",
    "default_group_size",
    "key_bytes_per_vector",
    "value_bytes_per_vector",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PROD_BITS = (2, 3, 4)
VALUE_BITS = (2, 3, 4, 8)
QJL_SCALE = math.sqrt(math.pi / 2)  # E[sign(s·r)(s·q)] = √(2/π)·⟨q, r⟩/‖r‖ for Gaussian s
_FP16_MAX = torch.finfo(torch.float16).max


class _Container:
    def nbytes(self) -> int:
        """Bytes held by every tensor in the container (nested containers included)."""
        total = 0
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif isinstance(v, _Container):
                total += v.nbytes()
        return total


@dataclass
class MSECompressed(_Container):
    """Algorithm 1 output. indices: [..., packed_size(d, bits)] uint8; norms: [...] float16."""

    indices: torch.Tensor
    norms: torch.Tensor
    head_dim: int
    bits: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.norms.shape


@dataclass
class ProdCompressed(_Container):
    """Algorithm 2 output: MSE at bits-1, signs: [..., ceil(d/8)] uint8 of sign(S r), residual_norms: [...]."""

    mse: MSECompressed
    signs: torch.Tensor
    residual_norms: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.residual_norms.shape


@dataclass
class ValueCompressed(_Container):
    """Per-group affine codes: codes [..., packed_size(d, bits)] uint8; scales, zeros [..., d/group_size] fp16."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    head_dim: int
    bits: int
    group_size: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.scales.shape[:-1]


def check_float_input(x: torch.Tensor, head_dim: int | None, device: torch.device | None, name: str = "x") -> None:
    """Raise ValueError unless x is a float32/16/bf16 tensor [..., head_dim] on ``device``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must have dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., d], got a scalar")
    if head_dim is not None and x.shape[-1] != head_dim:
        raise ValueError(f"{name} must have shape [..., {head_dim}] (head_dim), got {tuple(x.shape)}")
    if device is not None and _device_key(x.device) != device:
        raise ValueError(f"{name} is on {x.device} but the quantizer was built for {device}")


def _to_fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.numel() and float(t.abs().max()) > _FP16_MAX:
        raise ValueError(f"{what} exceed the float16 range ({_FP16_MAX}); rescale the input")
    return t.to(torch.float16)


class TurboQuantMSE:
    """Algorithm 1 (TurboQuant_mse): rotate, scale by √d, nearest Lloyd-Max centroid per coordinate.

    Args:
        head_dim: d, >= 16.
        bits: b in {1, 2, 3, 4}.
        device: where the rotation and codebook live; inputs must be there too.
        seed: rotation seed.
        rotation: "haar" (dense Haar Π) or "hadamard" (random signs + Walsh–Hadamard, d a power of 2).
        norm_correction: store ‖x‖ / ‖ŷ‖ instead of ‖x‖ so that ‖x̂‖ = ‖x‖ exactly.
    """

    def __init__(
        self,
        head_dim: int,
        bits: int,
        device: torch.device | str | None = None,
        seed: int = DEFAULT_ROTATION_SEED,
        *,
        rotation: str = "haar",
        norm_correction: bool = False,
    ):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"TurboQuantMSE bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        self.head_dim = head_dim
        self.bits = bits
        self.device = _device_key(device)
        self.seed = seed
        self.rotation_kind = rotation
        self.norm_correction = norm_correction
        self.centroids = get_codebook(head_dim, bits, self.device)  # [2^b], √d units
        self.boundaries = (self.centroids[1:] + self.centroids[:-1]) / 2  # [2^b - 1]
        self.rotation = get_rotation(rotation, head_dim, self.device, seed)  # Π: [d, d]
        self.scale = math.sqrt(head_dim)
        self._key4 = None  # dequantize_key_rows' table, built on first use

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Π x for rows: [..., d] -> [..., d] float32 (also used to rotate queries once)."""
        return x.float() @ self.rotation.T

    def quantize_rotated(self, y: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of √d·y per coordinate: [..., d] float32 -> [..., d] int64 indices."""
        return torch.bucketize(y * self.scale, self.boundaries)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1 without packing: x [..., d] -> (indices [..., d] int64, norms [...] float16).

        With norm_correction the stored norm is ‖x‖ / ‖c[idx]/√d‖, so that ‖x̂‖ = ‖x‖.
        """
        check_float_input(x, self.head_dim, self.device)
        xf = x.float()
        norms = xf.norm(dim=-1)
        unit = xf / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        idx = self.quantize_rotated(self.rotate(unit))
        if self.norm_correction:
            norms = norms / (self.centroids[idx] / self.scale).norm(dim=-1)
        return idx, _to_fp16(norms, "vector norms")

    def compress(self, x: torch.Tensor) -> MSECompressed:
        """x: [..., d] -> MSECompressed with [..., packed_size(d, bits)] indices and [...] norms."""
        idx, norms = self.quantize(x)
        return MSECompressed(
            indices=pack_indices(idx, self.bits), norms=norms, head_dim=self.head_dim, bits=self.bits, dtype=x.dtype
        )

    def dequantize_indices(self, idx: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Rotated-basis reconstruction from indices [..., d] and norms [...]: [..., d] float32."""
        return self.centroids[idx.long()] * (norms.float() / self.scale).unsqueeze(-1)

    def dequantize_key_rows(self, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Rotated-basis reconstruction from key rows as a cache stores them (packing.pack_key_codes of this
        quantizer's indices) [..., d·b/8] uint8 and norms [...]: [..., d] float32, equal to dequantize_indices of
        their unpack_key_codes.

        4-bit rows are read as their 16-bit elements, each looked up whole in a table of the four centroids it
        holds (built once, from unpack_key_codes itself): on the CPU about half the time of unpacking the bits and
        looking the indices up (3 heads × 768 rows at head_dim 64: 0.8 vs 1.65 ms)."""
        d = self.head_dim
        if self.bits != 4 or rows.shape[-1] != d // 2 or rows.dtype != torch.uint8:
            return self.dequantize_indices(unpack_key_codes(rows, self.bits, d), norms)
        try:
            elements = rows.view(torch.int16)  # (a slice of a cache's buffer needs no copy)
        except RuntimeError:  # strides or offset odd in bytes
            elements = rows.contiguous().view(torch.int16)
        elements = elements.to(torch.int32) & 0xFFFF  # [..., d/4]
        # element e's nibble 2·p + f holds column f·d/2 + 2e + p (packing.pack_key_codes): [..., d/4, f, p]
        values = self._key4_table()[elements].unflatten(-1, (2, 2)).transpose(-3, -2)
        return values.reshape(*rows.shape[:-1], d) * (norms.float() / self.scale).unsqueeze(-1)

    def _key4_table(self) -> torch.Tensor:
        """[65536, 4] float32: the centroids of every 16-bit element of 4-bit key rows, in the order (field 0,
        parity 0), (0, 1), (1, 0), (1, 1), i.e. columns 0, 1, 4, 5 of an 8-column row whose first element it is."""
        if self._key4 is None:
            e = torch.arange(65536, dtype=torch.int32, device=self.centroids.device)
            rows = torch.stack((e & 0xFF, e >> 8, 0 * e, 0 * e), dim=-1).to(torch.uint8)  # [65536, 4 bytes]: d = 8
            self._key4 = self.centroids[unpack_key_codes(rows, 4, 8).long()][:, [0, 1, 4, 5]].contiguous()
        return self._key4

    def _check_container(self, c: MSECompressed) -> None:
        if not isinstance(c, MSECompressed):
            raise ValueError(f"expected an MSECompressed container, got {type(c).__name__}")
        if c.head_dim != self.head_dim or c.bits != self.bits:
            raise ValueError(
                f"container holds head_dim={c.head_dim}, bits={c.bits}; "
                f"this quantizer has head_dim={self.head_dim}, bits={self.bits}"
            )

    def dequantize_rotated(self, c: MSECompressed) -> torch.Tensor:
        """The reconstruction in the rotated basis, norm included: [..., d] float32 (x̂ = this @ Π)."""
        self._check_container(c)
        return self.dequantize_indices(unpack_indices(c.indices, self.bits, self.head_dim), c.norms)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """Πᵀ y for rows: [..., d] -> [..., d] float32."""
        return y @ self.rotation

    def decompress_float(self, c: MSECompressed) -> torch.Tensor:
        """x̂ = ‖x‖ · Πᵀ (c[idx] / √d): [..., d] float32."""
        return self.unrotate(self.dequantize_rotated(c))

    def decompress(self, c: MSECompressed) -> torch.Tensor:
        """x̂ in the dtype the container was compressed from: [..., d]."""
        return self.decompress_float(c).to(c.dtype)


class TurboQuantProd:
    """Algorithm 2 (TurboQuant_prod): MSE at bits-1, then 1-bit QJL of the residual.

    ⟨q, k⟩ ≈ ⟨q, x̂_mse⟩ + √(π/2)/d · γ · ⟨S q, sign(S r)⟩, unbiased (Theorem 2), with
    r = k - x̂_mse, γ = ‖r‖ and S a d×d matrix of i.i.d. N(0, 1) entries.

    Args:
        head_dim: d, >= 16.
        bits: total bits per coordinate b in {2, 3, 4} (b-1 for the MSE stage, 1 for QJL).
        device, seed, rotation, norm_correction: as in TurboQuantMSE (for the MSE stage).
        qjl_seed: seed of S.
    """

    def __init__(
        self,
        head_dim: int,
        bits: int,
        device: torch.device | str | None = None,
        seed: int = DEFAULT_ROTATION_SEED,
        *,
        qjl_seed: int = DEFAULT_QJL_SEED,
        rotation: str = "haar",
        norm_correction: bool = False,
    ):
        if bits not in PROD_BITS:
            raise ValueError(f"TurboQuantProd bits must be one of {PROD_BITS}, got {bits!r}")
        self.head_dim = head_dim
        self.bits = bits
        self.mse = TurboQuantMSE(head_dim, bits - 1, device, seed, rotation=rotation, norm_correction=norm_correction)
        self.device = self.mse.device
        self.qjl = get_qjl_matrix(head_dim, self.device, qjl_seed)  # S: [d, d]
        self.qjl_coef = QJL_SCALE / head_dim

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Algorithm 2 without packing: x [..., d] -> (indices [..., d] int64, norms [...] fp16,
        sign bits [..., d] uint8 (1 where (S r)_j >= 0), residual norms γ [...] fp16)."""
        idx, norms = self.mse.quantize(x)
        residual = x.float() - self.mse.unrotate(self.mse.dequantize_indices(idx, norms))
        signs = ((residual @ self.qjl.T) >= 0).to(torch.uint8)
        return idx, norms, signs, _to_fp16(residual.norm(dim=-1), "residual norms")

    def compress(self, x: torch.Tensor) -> ProdCompressed:
        """x: [..., d] -> ProdCompressed (MSE container, packed signs, residual norms)."""
        idx, norms, signs, residual_norms = self.quantize(x)
        mse = MSECompressed(
            indices=pack_indices(idx, self.mse.bits),
            norms=norms,
            head_dim=self.head_dim,
            bits=self.mse.bits,
            dtype=x.dtype,
        )
        return ProdCompressed(mse=mse, signs=pack_indices(signs, 1), residual_norms=residual_norms, dtype=x.dtype)

    def qjl_score(self, sq: torch.Tensor, sign_bits: torch.Tensor, residual_norms: torch.Tensor) -> torch.Tensor:
        """QJL term √(π/2)/d · γ · ⟨S q, ±1⟩ from S q [..., M, d], sign bits [..., N, d] and γ [..., N]: [..., M, N]."""
        signs = sign_bits.float() * 2 - 1
        return (sq @ signs.transpose(-1, -2)) * (self.qjl_coef * residual_norms.float()).unsqueeze(-2)

    @staticmethod
    def _check_container(c: ProdCompressed) -> None:
        if not isinstance(c, ProdCompressed):
            raise ValueError(f"expected a ProdCompressed container, got {type(c).__name__}")

    def qjl_correction(self, sign_bits: torch.Tensor, residual_norms: torch.Tensor) -> torch.Tensor:
        """√(π/2)/d · γ · Sᵀ sign from sign bits [..., d] (0/1) and γ [...]: [..., d] float32."""
        signs = sign_bits.float() * 2 - 1
        return (signs @ self.qjl) * (self.qjl_coef * residual_norms.float()).unsqueeze(-1)

    def decompress_float(self, c: ProdCompressed) -> torch.Tensor:
        """DeQuant_prod: x̂_mse + √(π/2)/d · γ · Sᵀ sign: [..., d] float32."""
        self._check_container(c)
        signs = unpack_indices(c.signs, 1, self.head_dim)
        return self.mse.decompress_float(c.mse) + self.qjl_correction(signs, c.residual_norms)

    def decompress(self, c: ProdCompressed) -> torch.Tensor:
        return self.decompress_float(c).to(c.dtype)

    def inner_product_score(self, q: torch.Tensor, c: ProdCompressed) -> torch.Tensor:
        """Unbiased ⟨q, k⟩ estimates with q kept continuous.

        q: [..., n_q, d]; c holds keys with leading shape [..., n_k] -> scores [..., n_q, n_k] float32.
        """
        check_float_input(q, self.head_dim, self.device, "q")
        self._check_container(c)
        q_rot = self.mse.rotate(q)  # Π q, once per query
        k_rot = self.mse.dequantize_rotated(c.mse)  # [..., n_k, d]
        mse_part = q_rot @ k_rot.transpose(-1, -2)
        sq = q.float() @ self.qjl.T  # S q, once per query
        return mse_part + self.qjl_score(sq, unpack_indices(c.signs, 1, self.head_dim), c.residual_norms)


def default_group_size(head_dim: int) -> int:
    """Values per (scale, zero) group when none is given: 32, or the largest divisor of head_dim below 32 (20 at
    head_dim 80), so that every head_dim has a default."""
    return max(g for g in range(1, 33) if head_dim % g == 0)


class ValueQuantizer:
    """Per-group asymmetric affine quantization (min/max per group, fp16 scale and zero).

    x ≈ zero + scale · code with code = round((x - zero) / scale) in [0, 2^bits), per group of
    ``group_size`` consecutive coordinates. bits in {2, 3, 4, 8}; group_size must divide d.
    """

    def __init__(self, bits: int, group_size: int = 32):
        if bits not in VALUE_BITS:
            raise ValueError(f"ValueQuantizer bits must be one of {VALUE_BITS}, got {bits!r}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        self.bits = bits
        self.group_size = group_size
        self.levels = 2**bits - 1

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., d] -> (codes [..., d] uint8, scales [..., d/g] fp16, zeros [..., d/g] fp16)."""
        check_float_input(x, None, None)
        d = x.shape[-1]
        if d % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide the last dimension d={d}")
        xg = x.float().unflatten(-1, (d // self.group_size, self.group_size))
        lo, hi = xg.amin(-1), xg.amax(-1)
        zeros = _to_fp16(lo, "value minima")
        scales = _to_fp16((hi - lo) / self.levels, "value scales")
        s = scales.float().unsqueeze(-1)
        codes = torch.where(s > 0, (xg - zeros.float().unsqueeze(-1)) / s.clamp_min(1e-30), 0.0)
        codes = codes.round().clamp(0, self.levels).to(torch.uint8).flatten(-2)
        return codes, scales, zeros

    def compress(self, x: torch.Tensor) -> ValueCompressed:
        """x: [..., d] with d % group_size == 0 -> ValueCompressed."""
        codes, scales, zeros = self.quantize(x)
        d = x.shape[-1]
        return ValueCompressed(
            codes=pack_indices(codes, self.bits),
            scales=scales,
            zeros=zeros,
            head_dim=d,
            bits=self.bits,
            group_size=self.group_size,
            dtype=x.dtype,
        )

    def decompress_float(self, c: ValueCompressed) -> torch.Tensor:
        """zero + scale · code: [..., d] float32."""
        if not isinstance(c, ValueCompressed) or c.bits != self.bits or c.group_size != self.group_size:
            raise ValueError("container does not match this ValueQuantizer's bits and group_size")
        return self.dequantize_codes(unpack_indices(c.codes, self.bits, c.head_dim), c.scales, c.zeros)

    def dequantize_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """zero + scale · code from codes [..., d], scales and zeros [..., d/g]: [..., d] float32."""
        grouped = codes.float().unflatten(-1, (-1, self.group_size))
        return (zeros.float().unsqueeze(-1) + scales.float().unsqueeze(-1) * grouped).flatten(-2)

    def decompress(self, c: ValueCompressed) -> torch.Tensor:
        return self.decompress_float(c).to(c.dtype)


def key_bytes_per_vector(head_dim: int, bits: int, mode: str = "mse") -> int:
    """Bytes one compressed key holds: packed indices + fp16 norm (+ signs and residual norm for prod)."""
    if mode == "mse":
        return packed_size(head_dim, bits) + 2
    if mode == "prod":
        return packed_size(head_dim, bits - 1) + packed_size(head_dim, 1) + 2 + 2
    raise ValueError(f"key mode must be 'mse' or 'prod', got {mode!r}")


def value_bytes_per_vector(head_dim: int, bits: int, group_size: int = 32) -> int:
    """Bytes one compressed value holds: packed codes + fp16 scale and zero per group."""
    return packed_size(head_dim, bits) + 4 * (head_dim // group_size)


def compression_ratio(
    head_dim: int, key_bits: int, value_bits: int, *, key_mode: str = "mse", group_size: int = 32
) -> float:
    """bf16 K+V bytes per token over the bytes our compressed K+V containers hold.

    Counts packed indices, fp16 norms, QJL signs and residual norms (prod keys), and fp16 value
    scales and zeros. At d=128: K4 MSE + V4 (group 32) = 512/146 ≈ 3.5×; K3 + V2 = 512/98 ≈ 5.2×.
    """
    if key_mode == "mse" and key_bits not in SUPPORTED_BITS:
        raise ValueError(f"MSE key_bits must be one of {SUPPORTED_BITS}, got {key_bits!r}")
    if key_mode == "prod" and key_bits not in PROD_BITS:
        raise ValueError(f"prod key_bits must be one of {PROD_BITS}, got {key_bits!r}")
    if value_bits not in VALUE_BITS:
        raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {value_bits!r}")
    if head_dim % group_size:
        raise ValueError(f"group_size={group_size} must divide head_dim={head_dim}")
    compressed = key_bytes_per_vector(head_dim, key_bits, key_mode) + value_bytes_per_vector(
        head_dim, value_bits, group_size
    )
    return 2 * 2 * head_dim / compressed
