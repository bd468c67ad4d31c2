"""TurboQuantKVCache: one attention layer's compressed K/V cache for multi-step decode.

Buffer layout (B = batch, H = KV heads, C = capacity in tokens, D = head_dim; every buffer is
contiguous with tokens of one (batch, head) pair adjacent, so a program that owns one KV head
streams its rows with coalesced loads; rows are D·bits/8 bytes, a multiple of 16 at D = 128):

    key_codes      uint8   [B, H, C, D·kb/8]   planar-packed codebook indices (packing.pack_planar),
                                               kb = key_bits for "mse", key_bits - 1 for "prod"
    key_norms      float16 [B, H, C]           ‖k‖ (or ‖k‖/‖ŷ‖ with norm correction)
    key_signs      uint8   [B, H, C, D/8]      prod only: planar-packed sign(S r)
    key_rnorms     float16 [B, H, C]           prod only: γ = ‖r‖
    value_codes    uint8   [B, H, C, D·vb/8]   planar-packed affine codes
    value_scales   float16 [B, H, C, D/g]
    value_zeros    float16 [B, H, C, D/g]
    seq_lens       int64   [B]                 compressed tokens per sequence

Keys are stored in the rotated basis: the score of a query q is norm · ⟨Πq, c[idx]⟩ / √d, so
attention rotates each query once and never de-rotates a key. An optional full-precision
window keeps the most recent tokens exact (between R and R + flush_block - 1 of them) and flushes
the oldest ones to the compressed store in blocks of ``flush_block``. In ring mode the store has a
fixed capacity W and position p lives in slot p mod W (a sliding window of the last W tokens).

The reference ``attend`` walks the store in fixed-size blocks with an online softmax, so its
temporaries do not grow with the cache length; the fused kernels follow the same algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import KEY_MODES, merge_attention, softmax_block
from .codebook import SUPPORTED_BITS
from .packing import pack_planar, planar_size, unpack_planar
from .quantizers import (
    FLOAT_DTYPES,
    PROD_BITS,
    VALUE_BITS,
    TurboQuantMSE,
    TurboQuantProd,
    ValueQuantizer,
    check_float_input,
)
from .rotation import DEFAULT_QJL_SEED, DEFAULT_ROTATION_SEED, ROTATIONS, _device_key

__all__ = ["KVCacheConfig", "TurboQuantKVCache", "get_quantizers"]

_ATTEND_BLOCK = 1024  # tokens per block of the reference attention


@dataclass(frozen=True)
class KVCacheConfig:
    """Validated settings of a compressed KV cache (shared by every layer of a model)."""

    head_dim: int
    key_bits: int = 4
    value_bits: int = 4
    key_mode: str = "mse"
    group_size: int = 32
    rotation: str = "haar"
    norm_correction: bool = False
    residual_window: int = 0
    flush_block: int = 64
    ring_window: int | None = None
    chunk_size: int = 1024
    seed: int = DEFAULT_ROTATION_SEED
    qjl_seed: int = DEFAULT_QJL_SEED

    def __post_init__(self):
        if not isinstance(self.head_dim, int) or self.head_dim < 16 or self.head_dim % 16:
            raise ValueError(f"head_dim must be a multiple of 16 (e.g. 64, 96, 128, 256), got {self.head_dim!r}")
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES}, got {self.key_mode!r}")
        allowed = SUPPORTED_BITS if self.key_mode == "mse" else PROD_BITS
        if self.key_bits not in allowed:
            raise ValueError(f"key_bits for key_mode={self.key_mode!r} must be one of {allowed}, got {self.key_bits!r}")
        if self.value_bits not in VALUE_BITS:
            raise ValueError(f"value_bits must be one of {VALUE_BITS}, got {self.value_bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1 or self.head_dim % self.group_size:
            raise ValueError(f"group_size must divide head_dim={self.head_dim}, got {self.group_size!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.rotation == "hadamard" and self.head_dim & (self.head_dim - 1):
            raise ValueError(f"rotation='hadamard' needs a power-of-two head_dim, got {self.head_dim}")
        for name in ("residual_window",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("flush_block", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ring_window is not None:
            if self.ring_window < 1:
                raise ValueError(f"ring_window must be >= 1 or None, got {self.ring_window}")
            if self.residual_window:
                raise ValueError("ring_window and residual_window cannot be combined")

    @property
    def key_index_bits(self) -> int:
        """Bits of the stored codebook index (key_bits - 1 for prod keys)."""
        return self.key_bits if self.key_mode == "mse" else self.key_bits - 1

    def bytes_per_token_per_head(self) -> int:
        """Compressed bytes one token occupies in one KV head (keys + values)."""
        d = self.head_dim
        key = planar_size(d, self.key_index_bits) + 2 + ((d // 8 + 2) if self.key_mode == "prod" else 0)
        return key + planar_size(d, self.value_bits) + 4 * (d // self.group_size)


_QUANTIZERS: dict[tuple, tuple] = {}


def get_quantizers(config: KVCacheConfig, device) -> tuple[TurboQuantMSE | TurboQuantProd, ValueQuantizer]:
    """(key quantizer, value quantizer) for a config, built once per (config, device) and shared."""
    device = _device_key(device)
    key = (config.head_dim, config.key_bits, config.key_mode, config.rotation, config.norm_correction,
           config.seed, config.qjl_seed, config.value_bits, config.group_size, device)  # fmt: skip
    if key not in _QUANTIZERS:
        if config.key_mode == "mse":
            kq = TurboQuantMSE(config.head_dim, config.key_bits, device, config.seed,
                               rotation=config.rotation, norm_correction=config.norm_correction)  # fmt: skip
        else:
            kq = TurboQuantProd(config.head_dim, config.key_bits, device, config.seed, qjl_seed=config.qjl_seed,
                                rotation=config.rotation, norm_correction=config.norm_correction)  # fmt: skip
        _QUANTIZERS[key] = (kq, ValueQuantizer(config.value_bits, config.group_size))
    return _QUANTIZERS[key]


class TurboQuantKVCache:
    """Compressed K/V of one attention layer: quantize-on-write, attention from the codes.

    Args:
        config: KVCacheConfig (bits, key mode, rotation, window, ring, growth chunk).
        batch_size: B.  num_kv_heads: H.
        device: where the buffers live.  dtype: dtype of the full-precision window and of outputs.
        capacity: tokens to preallocate (grows by config.chunk_size; fixed in ring mode).
    """

    def __init__(
        self,
        config: KVCacheConfig,
        batch_size: int,
        num_kv_heads: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        capacity: int = 0,
    ):
        if batch_size < 1 or num_kv_heads < 1:
            raise ValueError(f"batch_size and num_kv_heads must be >= 1, got {batch_size}, {num_kv_heads}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
        self.config = config
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.device = _device_key(device)
        self.dtype = dtype
        self.key_quantizer, self.value_quantizer = get_quantizers(config, self.device)
        # the codebook stage of the keys: the key quantizer itself, or the MSE part of a prod quantizer
        self.mse_quantizer = self.key_quantizer if config.key_mode == "mse" else self.key_quantizer.mse
        self.seq_lens = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.total_tokens = 0  # tokens appended per sequence (uniform appends)
        if config.ring_window is not None:
            capacity = config.ring_window
        self.capacity = 0
        self._allocate(capacity)
        d = config.head_dim
        self.window_k = torch.empty(batch_size, num_kv_heads, 0, d, dtype=dtype, device=self.device)
        self.window_v = torch.empty_like(self.window_k)

    # ----------------------------------------------------------------------------------- storage
    def _buffer_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        c, d = self.config, self.config.head_dim
        specs = {
            "key_codes": ((planar_size(d, c.key_index_bits),), torch.uint8),
            "key_norms": ((), torch.float16),
            "value_codes": ((planar_size(d, c.value_bits),), torch.uint8),
            "value_scales": ((d // c.group_size,), torch.float16),
            "value_zeros": ((d // c.group_size,), torch.float16),
        }
        if c.key_mode == "prod":
            specs["key_signs"] = ((d // 8,), torch.uint8)
            specs["key_rnorms"] = ((), torch.float16)
        return specs

    def _allocate(self, capacity: int) -> None:
        """Grow every buffer to ``capacity`` tokens, copying (never re-quantizing) what is stored."""
        b, h = self.batch_size, self.num_kv_heads
        for name, (tail, dtype) in self._buffer_specs().items():
            new = torch.zeros(b, h, capacity, *tail, dtype=dtype, device=self.device)
            if self.capacity:
                new[:, :, : self.capacity] = getattr(self, name)
            setattr(self, name, new)
        self.capacity = capacity

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every tensor the cache holds, by name."""
        out = {name: getattr(self, name) for name in self._buffer_specs()}
        out.update(window_k=self.window_k, window_v=self.window_v, seq_lens=self.seq_lens)
        return out

    def nbytes(self) -> int:
        """Bytes the cache's tensors really occupy (allocated capacity, window and lengths included)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    def store_nbytes(self) -> int:
        """Bytes of the compressed store alone (codes, norms, signs, scales, zeros; no window, no lengths)."""
        return sum(t.numel() * t.element_size() for name, t in self.buffers().items() if name in self._buffer_specs())

    def get_seq_length(self) -> int:
        """Tokens appended per sequence so far (uniform appends), window included."""
        return self.total_tokens

    @property
    def num_compressed(self) -> int:
        """Tokens written to the compressed store per sequence (in ring mode, only the last
        ring_window of them are still held)."""
        return self.total_tokens - self.window_k.shape[2]

    # ------------------------------------------------------------------------------------- write
    def _check_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        expect = (self.batch_size, self.num_kv_heads)
        for name, t in (("k", k), ("v", v)):
            check_float_input(t, self.config.head_dim, self.device, name)
            if t.dim() != 4 or tuple(t.shape[:2]) != expect:
                raise ValueError(
                    f"{name} must have shape [B={expect[0]}, H_kv={expect[1]}, N, D={self.config.head_dim}], "
                    f"got {tuple(t.shape)}"
                )
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append N tokens to every sequence: k, v [B, H_kv, N, D]."""
        self._check_kv(k, v)
        if self.config.residual_window == 0:
            self._write_compressed(k, v)
        else:
            wk = torch.cat((self.window_k, k.to(self.dtype)), dim=2)
            wv = torch.cat((self.window_v, v.to(self.dtype)), dim=2)
            excess = wk.shape[2] - self.config.residual_window
            n_flush = (excess // self.config.flush_block) * self.config.flush_block if excess > 0 else 0
            if n_flush:
                self._write_compressed(wk[:, :, :n_flush], wv[:, :, :n_flush])
            self.window_k = wk[:, :, n_flush:].contiguous()
            self.window_v = wv[:, :, n_flush:].contiguous()
        self.total_tokens += k.shape[2]

    def _write_compressed(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        if n == 0:
            return
        start = self.num_compressed
        ring = self.config.ring_window
        if ring is None and start + n > self.capacity:
            chunk = self.config.chunk_size
            self._allocate(-(-(start + n) // chunk) * chunk)
        if ring is not None and n > ring:  # only the last W tokens can survive
            k, v, start, n = k[:, :, -ring:], v[:, :, -ring:], start + n - ring, ring
        rows = self._encode(k, v)
        slots = torch.arange(start, start + n, device=self.device)
        if ring is not None:
            slots = slots % ring
        for name, value in rows.items():
            getattr(self, name)[:, :, slots] = value
        self.seq_lens.fill_(min(start + n, ring) if ring is not None else start + n)

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize and planar-pack k, v [B, H, N, D] into buffer rows."""
        c = self.config
        rows = {}
        if c.key_mode == "mse":
            idx, norms = self.key_quantizer.quantize(k)
        else:
            idx, norms, signs, rnorms = self.key_quantizer.quantize(k)
            rows["key_signs"] = pack_planar(signs, 1)
            rows["key_rnorms"] = rnorms
        rows["key_codes"] = pack_planar(idx, c.key_index_bits)
        rows["key_norms"] = norms
        codes, scales, zeros = self.value_quantizer.quantize(v)
        rows.update(value_codes=pack_planar(codes, c.value_bits), value_scales=scales, value_zeros=zeros)
        return rows

    # -------------------------------------------------------------------------------------- read
    def _slot_positions(self, start: int, stop: int) -> torch.Tensor:
        """Absolute token position held by store slots [start, stop): [stop - start] int64."""
        slots = torch.arange(start, stop, device=self.device)
        ring = self.config.ring_window
        if ring is None or self.num_compressed <= ring:
            return slots
        total = self.num_compressed  # newest position is total - 1, held in slot (total - 1) % ring
        return total - 1 - ((total - 1 - slots) % ring)

    def _dequantize_block(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated basis, norm applied) and values of store slots [start, stop): [B, H, n, D] f32."""
        c, d = self.config, self.config.head_dim
        idx = unpack_planar(self.key_codes[:, :, start:stop], c.key_index_bits, d)
        k_rot = self.mse_quantizer.dequantize_indices(idx, self.key_norms[:, :, start:stop])
        codes = unpack_planar(self.value_codes[:, :, start:stop], c.value_bits, d)
        v = self.value_quantizer.dequantize_codes(
            codes, self.value_scales[:, :, start:stop], self.value_zeros[:, :, start:stop]
        )
        return k_rot, v

    def attend(
        self, q: torch.Tensor, *, scale: float | None = None, causal: bool = True, backend: str = "auto"
    ) -> torch.Tensor:
        """Attention of the newest N_q tokens' queries over everything cached.

        q: [B, H_q, N_q, D] (H_q a multiple of H_kv). Query i sits at position L - N_q + i, with L the
        tokens appended so far; with ``causal`` it sees keys at positions <= its own.
        backend: "triton" (fused kernel), "reference" (PyTorch), or "auto" (triton on CUDA).
        Returns [B, H_q, N_q, D] in q's dtype.
        """
        out, _ = self.attend_with_lse(q, scale=scale, causal=causal, backend=backend)
        return out.to(q.dtype)

    def attend_with_lse(
        self, q: torch.Tensor, *, scale: float | None = None, causal: bool = True, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`attend`, returning (out [B, H_q, N_q, D] float32, lse [B, H_q, N_q] float32)."""
        c, d = self.config, self.config.head_dim
        check_float_input(q, d, self.device, "q")
        if q.dim() != 4 or q.shape[0] != self.batch_size or q.shape[1] % self.num_kv_heads:
            raise ValueError(
                f"q must have shape [B={self.batch_size}, H_q (a multiple of {self.num_kv_heads}), N_q, {d}], "
                f"got {tuple(q.shape)}"
            )
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        b, h_q, n_q, _ = q.shape
        if n_q > self.total_tokens:
            raise ValueError(f"{n_q} queries but only {self.total_tokens} tokens cached: append before attend")
        if c.ring_window is not None and n_q > 1 and causal and self.num_compressed > c.ring_window:
            raise ValueError(
                "ring mode keeps only the last ring_window tokens: attend with N_q > 1 after the ring wrapped "
                "would miss keys that earlier queries of the chunk need; attend one query at a time"
            )
        if backend == "auto":
            backend = "triton" if q.is_cuda else "reference"
        h_kv, group = self.num_kv_heads, h_q // self.num_kv_heads
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        q_pos = torch.arange(self.total_tokens - n_q, self.total_tokens, device=self.device)  # [N_q]
        qg = q.float().reshape(b, h_kv, group * n_q, d)  # query heads of one KV head share its keys
        if backend == "triton":
            out, lse = self._attend_compressed_triton(qg, n_q, scale, causal)
        else:
            out, lse = self._attend_compressed_reference(qg, q_pos, group, scale, causal)

        n_win = self.window_k.shape[2]
        if n_win:
            scores = (qg @ self.window_k.float().transpose(-1, -2)) * scale
            if causal:
                win_pos = torch.arange(self.num_compressed, self.total_tokens, device=self.device)
                visible = win_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
                scores = scores.masked_fill(~visible.repeat(group, 1), float("-inf"))
            out, lse = merge_attention(out, lse, *softmax_block(scores, self.window_v.float()))
        return out.reshape(b, h_q, n_q, d), lse.reshape(b, h_q, n_q)

    def _attend_compressed_reference(
        self, qg: torch.Tensor, q_pos: torch.Tensor, group: int, scale: float, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocked online-softmax attention over the store: qg [B, H_kv, G·N_q, D] -> (out, lse)."""
        c, d = self.config, self.config.head_dim
        b, h_kv, m, _ = qg.shape
        kq = self.key_quantizer
        q_rot = self.mse_quantizer.rotate(qg) * scale  # Π q, once
        sq = (qg @ kq.qjl.T) * scale if c.key_mode == "prod" else None  # S q, once
        out = torch.zeros(b, h_kv, m, d, device=self.device)
        lse = torch.full((b, h_kv, m), float("-inf"), device=self.device)
        stored = min(self.num_compressed, self.capacity)
        for start in range(0, stored, _ATTEND_BLOCK):
            stop = min(start + _ATTEND_BLOCK, stored)
            k_rot, v = self._dequantize_block(start, stop)
            scores = q_rot @ k_rot.transpose(-1, -2)  # [B, H_kv, G·N_q, n]
            if sq is not None:
                signs = unpack_planar(self.key_signs[:, :, start:stop], 1, d)
                scores = scores + kq.qjl_score(sq, signs, self.key_rnorms[:, :, start:stop])
            if causal:
                visible = self._slot_positions(start, stop).unsqueeze(0) <= q_pos.unsqueeze(1)  # [N_q, n]
                scores = scores.masked_fill(~visible.repeat(group, 1), float("-inf"))
            out, lse = merge_attention(out, lse, *softmax_block(scores, v))
        return out, lse

    def _attend_compressed_triton(
        self, qg: torch.Tensor, n_q: int, scale: float, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused decode kernel over the store (kernels.decode): qg [B, H_kv, G·N_q, D] -> (out, lse)."""
        from .kernels.decode import decode_attention

        return decode_attention(**self.decode_inputs(qg, n_q, scale), causal=causal)

    def decode_inputs(self, qg: torch.Tensor, n_q: int, scale: float) -> dict:
        """Arguments of kernels.decode.decode_attention for queries qg [B, H_kv, G·N_q, D] (float32).

        Rotates the queries once (Πq, and S q for prod keys) with the softmax scale and log2(e) folded in.
        """
        from .kernels.decode import LOG2E

        c, kq, mse = self.config, self.key_quantizer, self.mse_quantizer
        q_rot = (mse.rotate(qg) * (scale * LOG2E)).contiguous()
        sq = (qg @ kq.qjl.T) * (scale * LOG2E * kq.qjl_coef) if c.key_mode == "prod" else None
        # ring mode after a wrap: every stored slot precedes the queries, so the causal limit is the total
        q_start = torch.full((self.batch_size,), self.total_tokens - n_q, dtype=torch.int64, device=self.device)
        return dict(
            q_rot=q_rot, sq=sq, buffers=self.buffers(), codebook=mse.centroids / mse.scale, seq_lens=self.seq_lens,
            q_start=q_start, key_bits=c.key_bits, key_mode=c.key_mode, value_bits=c.value_bits,
            group_size=c.group_size, n_q=n_q,
        )  # fmt: skip

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompressed (k, v) in position order, window included: [B, H_kv, L, D] in self.dtype.

        For debugging and tests; attention never calls it. L = min(total, ring_window) in ring mode.
        """
        stored = min(self.num_compressed, self.capacity)
        k_rot, v = self._dequantize_block(0, stored)
        k = self.mse_quantizer.unrotate(k_rot)
        if self.config.key_mode == "prod":
            signs = unpack_planar(self.key_signs[:, :, :stored], 1, self.config.head_dim)
            k = k + self.key_quantizer.qjl_correction(signs, self.key_rnorms[:, :, :stored])
        order = torch.argsort(self._slot_positions(0, stored))
        k, v = k[:, :, order], v[:, :, order]
        k = torch.cat((k.to(self.dtype), self.window_k), dim=2)
        v = torch.cat((v.to(self.dtype), self.window_v), dim=2)
        return k, v
