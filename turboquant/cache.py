"""TurboQuantKVCache: one attention layer's compressed K/V cache for multi-step decode.

Buffer layout (B = batch, H = KV heads, C = capacity in tokens, D = head_dim; every buffer is
contiguous with tokens of one (batch, head) pair adjacent, so a program that owns one KV head
streams its rows with coalesced loads; rows are D·bits/8 bytes, a multiple of 16 at D = 128):

    key_codes      uint8   [B, H, C, D·kb/8]   planar-packed codebook indices (packing.pack_key_codes),
                                               kb = key_bits for "mse", key_bits - 1 for "prod"; 4-bit indices
                                               sign-magnitude, the sign bits where the decode kernel reads them
    key_norms      float16 [B, H, C]           ‖k‖ (or ‖k‖/‖ŷ‖ with norm correction)
    key_signs      uint8   [B, H, C, D/8]      prod only: planar-packed sign(S r)
    key_rnorms     float16 [B, H, C]           prod only: γ = ‖r‖
    value_codes    uint8   [B, H, C, D·vb/8]   planar-packed affine codes
    value_affine   float16 [B, H, C, D/g, 2]   per group of g values: (scale, zero), one 32-bit word
    seq_lens       int64   [B]                 compressed tokens per sequence
    window_k/_v    dtype   [B, H, W, D]        the full-precision window (R = residual_window, F = flush_block;
                                               W = R + F - 1, fewer until that many tokens came; no rows without a
                                               window), a ring: position p in row p mod W; it holds the n_window
                                               newest positions

Keys are stored in the rotated basis: the score of a query q is norm · ⟨Πq, c[idx]⟩ / √d, so
attention rotates each query once and never de-rotates a key. An optional full-precision
window keeps the most recent tokens exact (between R and R + flush_block - 1 of them) and flushes
the oldest ones to the compressed store in blocks of ``flush_block``. In ring mode the store has a
fixed capacity W and position p lives in slot p mod W (a sliding window of the last W compressed
tokens; with a window, ring + window hold the last W + R tokens when flush_block is 1).

The reference ``attend`` walks the store in fixed-size blocks with an online softmax, so its
temporaries do not grow with the cache length; the fused kernels follow the same algorithm. On CUDA the
cache keeps the kernels' launch plans (kernels.decode.DecodePlan, kernels.encode.EncodePlan) across steps
while its buffers stay the same tensors, so that a decode step's host work is its few launches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import KEY_MODES, chunk_attention, merge_attention, softmax_block
from .codebook import SUPPORTED_BITS
from .packing import from_key_codes, pack_key_codes, pack_planar, planar_size, unpack_planar
from .quantizers import (
    FLOAT_DTYPES,
    PROD_BITS,
    VALUE_BITS,
    TurboQuantMSE,
    TurboQuantProd,
    ValueQuantizer,
    check_float_input,
    default_group_size,
)
from .rotation import DEFAULT_QJL_SEED, DEFAULT_ROTATION_SEED, ROTATIONS, _device_key

__all__ = ["KVCacheConfig", "TurboQuantKVCache", "get_quantizers", "kernel_codebook"]

_ATTEND_BLOCK = 1024  # tokens per block of the reference attention
# float32 elements per block of the prompt statistics (key mean, key scales): their temporaries stay this size at any
# batch, prompt length and head count (at batch 104 a 256-token block of 32 query heads was 1.3 GB of them)
_STATISTICS_ELEMENTS = 1 << 22
# Tokens of a step that the fused kernels attend with their own exact tokens merged in-kernel (a decode step, or the
# tokens of a speculative verification); longer chunks attend the store with the kernel and themselves with SDPA
FUSED_STEP_TOKENS = 16


@dataclass(frozen=True)
class KVCacheConfig:
    """Validated settings of a compressed KV cache (shared by every layer of a model)."""

    head_dim: int
    key_bits: int = 4
    value_bits: int = 4
    key_mode: str = "mse"
    group_size: int | None = None  # None: quantizers.default_group_size(head_dim), 32 for power-of-two head_dim
    rotation: str = "haar"
    norm_correction: bool = False
    residual_window: int = 0
    flush_block: int = 64
    center_keys: bool = False
    scale_keys: bool = False
    sink_tokens: int = 0
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
        if self.group_size is None:
            object.__setattr__(self, "group_size", default_group_size(self.head_dim))
        if not isinstance(self.group_size, int) or self.group_size < 1 or self.head_dim % self.group_size:
            divisors = [g for g in range(8, self.head_dim + 1) if self.head_dim % g == 0]
            raise ValueError(f"group_size must divide head_dim={self.head_dim} (e.g. {', '.join(map(str, divisors))}), "
                             f"got {self.group_size!r}")  # fmt: skip
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.rotation == "hadamard" and self.head_dim & (self.head_dim - 1):
            raise ValueError(f"rotation='hadamard' needs a power-of-two head_dim, got {self.head_dim}")
        for name in ("residual_window", "sink_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("flush_block", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ring_window is not None:
            if self.ring_window < 1:
                raise ValueError(f"ring_window must be >= 1 or None, got {self.ring_window}")
            if self.sink_tokens:
                raise ValueError("ring_window cannot be combined with sink_tokens (the ring drops the first tokens)")

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


def _statistics_blocks(n: int, elements_per_token: int) -> list[slice]:
    """Token slices of a prompt of n tokens whose float32 copies hold about _STATISTICS_ELEMENTS elements each."""
    step = max(1, _STATISTICS_ELEMENTS // elements_per_token)
    return [slice(t, min(t + step, n)) for t in range(0, n, step)]


def _check_left_padding(ok: torch.Tensor, wait: bool) -> None:
    """Raise unless ``ok`` (a bool scalar tensor) holds: a padding mask marked only left padding. With ``wait``
    False, a device-side assertion that does not synchronise with the host (a decode step's)."""
    message = "valid may only mark left padding: pads before a sequence's first real token, none after"
    if not wait:
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def kernel_codebook(mse: TurboQuantMSE) -> torch.Tensor:
    """The fused kernels' codebook [2^b], indexed by the stored key codes (packing.to_key_codes): centroids / √d
    made exactly antisymmetric (they are, up to float rounding), so that the 4-bit lookup by magnitude and sign
    (kernels.decode.key_lookup_tables) holds the same values."""
    cb = mse.centroids / mse.scale
    order = from_key_codes(torch.arange(cb.numel(), device=cb.device), mse.bits)
    return ((cb - cb.flip(0)) / 2)[order]


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
        config: KVCacheConfig (bits, key mode, rotation, window, ring, sinks, centring, growth chunk).
        batch_size: B.  num_kv_heads: H.
        device: where the buffers live.  dtype: dtype of the full-precision window, the sinks and outputs.
        capacity: tokens to preallocate (grows by config.chunk_size; fixed in ring mode).

    Positions are shared by the batch (token t of every sequence is appended by the same call);
    left padding is expressed by ``append(..., valid=mask)``: the leading pads of each sequence
    are stored but never attended (``kv_start`` holds each sequence's first real position).
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
        self._kernel_codebook = kernel_codebook(self.mse_quantizer)
        self._key_tables = None  # byte tables of the kernel's key lookup, built on the first kernel call
        self._key_table_words: tuple[int, ...] | None = None  # the same on the host
        self._store_names = tuple(self._buffer_specs())
        # launch plans of the fused kernels, kept across steps while the store's buffers stay the same tensors
        self._decode_plans: dict[tuple, object] = {}
        self._encode_plans: dict[tuple, object] = {}
        self._kv_start_memo: tuple[torch.Tensor, bool, torch.Tensor] | None = None  # see _kernel_kv_start
        self.seq_lens = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.kv_start = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self._max_kv_start = 0  # host copy of kv_start.max(), refreshed by multi-token appends
        self.total_tokens = 0  # positions appended per sequence (pads included)
        if config.ring_window is not None:
            capacity = config.ring_window
        self.capacity = 0
        self._allocate(capacity)
        d, s = config.head_dim, config.sink_tokens
        # the full-precision window: R to R + F - 1 tokens once R are appended, in a ring of R + F - 1 rows (fewer
        # while the first tokens fit: allocated as they come, see _grow_window)
        self._window_k = torch.zeros(batch_size, num_kv_heads, 0, d, dtype=dtype, device=self.device)
        self._window_v = torch.zeros_like(self._window_k)
        self.n_window = 0
        self._window_start_memo: tuple[int, torch.Tensor] | None = None  # see _window_start
        # sink tokens: the first S real tokens of each sequence, exact (one spare slot takes discarded writes)
        self.sink_k = torch.zeros(batch_size, num_kv_heads, s + 1 if s else 0, d, dtype=dtype, device=self.device)
        self.sink_v = torch.zeros_like(self.sink_k)
        self.key_mean: torch.Tensor | None = None  # [B, H, D] float32 with center_keys, set by the first append
        self.key_scale: torch.Tensor | None = None  # [B, H, D] float32 with scale_keys, set by the first append

    # ----------------------------------------------------------------------------------- storage
    def _buffer_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        c, d = self.config, self.config.head_dim
        specs = {
            "key_codes": ((planar_size(d, c.key_index_bits),), torch.uint8),
            "key_norms": ((), torch.float16),
            "value_codes": ((planar_size(d, c.value_bits),), torch.uint8),
            "value_affine": ((d // c.group_size, 2), torch.float16),
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
        self._drop_plans()

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every tensor the cache holds, by name."""
        out = {name: getattr(self, name) for name in self._buffer_specs()}
        out.update(window_k=self._window_k, window_v=self._window_v, seq_lens=self.seq_lens, kv_start=self.kv_start)
        if self.config.sink_tokens:
            out.update(sink_k=self.sink_k, sink_v=self.sink_v)
        if self.key_mean is not None:
            out["key_mean"] = self.key_mean
        if self.key_scale is not None:
            out["key_scale"] = self.key_scale
        return out

    def nbytes(self) -> int:
        """Bytes the cache's tensors really occupy (allocated capacity, window, sinks and lengths included)."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    def store_nbytes(self) -> int:
        """Bytes of the compressed store alone (codes, norms, signs, scales, zeros; no window, no lengths)."""
        return sum(t.numel() * t.element_size() for name, t in self.buffers().items() if name in self._buffer_specs())

    def get_seq_length(self) -> int:
        """Positions appended per sequence so far (pads and window included)."""
        return self.total_tokens

    @property
    def _ring_wrapped(self) -> bool:
        """Whether the ring has overwritten slots (slots then no longer equal positions)."""
        return self.config.ring_window is not None and self.num_compressed > self.config.ring_window

    @property
    def all_sequences_started(self) -> bool:
        """Whether every sequence already holds a real token (so a new single token cannot be left padding)."""
        return self._max_kv_start < self.total_tokens

    @property
    def num_compressed(self) -> int:
        """Positions written to the compressed store per sequence (in ring mode, only the last
        ring_window of them are still held)."""
        return self.total_tokens - self.n_window

    @property
    def window_k(self) -> torch.Tensor:
        """The full-precision window's keys in position order: [B, H_kv, n_window, D], positions num_compressed on
        (a view of the ring's rows, or a copy where they wrap)."""
        return self._window_rows(self._window_k)

    @property
    def window_v(self) -> torch.Tensor:
        """The full-precision window's values, as window_k."""
        return self._window_rows(self._window_v)

    def _window_rows(self, ring: torch.Tensor) -> torch.Tensor:
        """The window's tokens of one of its rings (_window_k or _window_v), in position order."""
        parts = [ring[:, :, a:b] for a, b in self._window_slots(self.num_compressed, self.total_tokens)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=2) if parts else ring[:, :, :0]

    def _window_slots(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The window's row ranges (at most two, in position order) that hold positions [start, stop)."""
        rows = self._window_k.shape[2]
        if stop <= start:
            return []
        a = start % rows
        b = a + stop - start
        return [(a, b)] if b <= rows else [(a, rows), (0, b - rows)]

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

    def append(
        self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None, queries: torch.Tensor | None = None
    ) -> None:
        """Append N positions to every sequence: k, v [B, H_kv, N, D].

        valid: optional [B, N] bool, False for left padding. A sequence's pads must come before its
        first real token (in this call or an earlier one); pads are stored but never attended.
        queries: optional [B, H_q, N, D], the chunk's queries: with scale_keys, those of the first append set the
        per-channel key scales (see _key_scales); if the first append has none, keys are never scaled (what is
        stored cannot be rescaled).
        """
        self._check_kv(k, v)
        if valid is not None:
            self._start_sequences(valid, k.shape[2])
        if self.config.sink_tokens and self.total_tokens < self._max_kv_start + self.config.sink_tokens:
            self._write_sinks(k, v)  # (once every sequence has its S sinks, no new token can be one)
        if self.config.center_keys and self.key_mean is None and k.shape[2]:
            self.key_mean = self._mean_key(k, valid)
        if self.config.scale_keys and queries is not None and self.total_tokens == 0 and k.shape[2]:
            self.key_scale = self._key_scales(k, queries, valid)
        if self.config.residual_window == 0:
            self._write_compressed(k, v)
        else:
            self._append_window(k, v)
        self.total_tokens += k.shape[2]

    def _append_window(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v [B, H, N, D] (positions total_tokens on) to the full-precision window; once it would hold
        R + F tokens or more, its oldest whole blocks of F go to the compressed store first (the window keeps R to
        R + F - 1), in the cache's dtype. Flushed tokens are written from the ring's rows and from the chunk as
        they are: no copy of a long chunk, no rows moved."""
        k, v = k.to(self.dtype), v.to(self.dtype)  # (as every token passes through the window: no copy if equal)
        old, n = self.n_window, k.shape[2]
        excess = old + n - self.config.residual_window
        n_flush = (excess // self.config.flush_block) * self.config.flush_block if excess > 0 else 0
        first = self.num_compressed
        self._grow_window(old + n if first == 0 and n_flush == 0 else None)
        for a, b in self._window_slots(first, first + min(n_flush, old)):  # the window's oldest rows
            self._write_compressed(self._window_k[:, :, a:b], self._window_v[:, :, a:b])
            self.n_window -= b - a  # (the next write starts after them)
        if n_flush > old:  # then the chunk's first rows
            self._write_compressed(k[:, :, : n_flush - old], v[:, :, : n_flush - old])
            k, v = k[:, :, n_flush - old :], v[:, :, n_flush - old :]
        i, pos = 0, self.total_tokens + n - k.shape[2]
        for a, b in self._window_slots(pos, pos + k.shape[2]):
            self._window_k[:, :, a:b] = k[:, :, i : i + b - a]
            self._window_v[:, :, a:b] = v[:, :, i : i + b - a]
            i += b - a
        self.n_window += k.shape[2]

    def _grow_window(self, rows: int | None) -> None:
        """Give the window at least ``rows`` rows (None: all R + F - 1 of its ring), growing by doubling. Until a
        first flush the window holds positions 0 .. n_window - 1 in rows of the same numbers (p mod W = p for any
        W above them), so a larger ring keeps them where they are."""
        full = self.config.residual_window + self.config.flush_block - 1
        have = self._window_k.shape[2]
        rows = full if rows is None else min(full, rows)
        if rows <= have:
            return
        rows = min(full, max(rows, 2 * have, 16))
        for name in ("_window_k", "_window_v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], rows, old.shape[3])
            new[:, :, :have] = old
            setattr(self, name, new)

    def _start_sequences(self, valid: torch.Tensor, n: int) -> None:
        """Advance kv_start past the leading pads of sequences that have no real token yet."""
        valid = self._checked_validity(valid, n)
        leading = (~valid).to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B] pads before the first real token
        fresh = self.kv_start == self.total_tokens  # no real token yet
        ok = (valid.sum(dim=1) == n - leading) & (fresh | (leading == 0))
        _check_left_padding(ok.all(), wait=self.device.type != "cuda" or n > 1)
        self.kv_start = torch.where(fresh, self.kv_start + leading, self.kv_start)
        if n > 1 or self.device.type != "cuda":
            self._max_kv_start = int(self.kv_start.max())
        elif self._max_kv_start == self.total_tokens:  # some sequence may still be all padding: an upper bound
            self._max_kv_start += 1

    def _checked_validity(self, valid: torch.Tensor, n: int) -> torch.Tensor:
        """valid, checked to be a bool [B, N] tensor, on the cache's device."""
        if valid.shape != (self.batch_size, n) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor [B={self.batch_size}, N={n}], got "
                             f"{valid.dtype} {tuple(valid.shape)}")  # fmt: skip
        return valid.to(self.device)

    def _mean_key(self, k: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Per-(sequence, head) mean of the real keys: [B, H, D] float32 (zero where none is real)."""
        b, h, n, d = k.shape
        w = torch.ones(b, n, device=self.device) if valid is None else valid.to(self.device, torch.float32)
        total = torch.zeros(b, h, d, device=self.device)
        for sl in _statistics_blocks(n, b * h * d):
            total += k[:, :, sl].to(torch.float32, copy=True).mul_(w[:, None, sl, None]).sum(2)
        return total / w.sum(dim=1).clamp(min=1.0)[:, None, None]

    def _key_scales(self, k: torch.Tensor, q: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Per-(sequence, head, channel) key scales s = (E[k̃_c²] / E[q_c²])^(1/4): [B, H, D] float32.

        Keys are stored as k̃/s (k̃ = k - μ with centring) and the store is attended with q·s, so the logits are
        unchanged. The quantization error of k̃/s is isotropic with power ∝ Σ_c E[k̃_c²]/s_c², and reaches a
        logit through q·s: its power Σ_c E[q_c²] s_c² · Σ_c E[k̃_c²]/s_c² is smallest (Cauchy–Schwarz) at these
        s, which weigh the channels where queries are large. Statistics over the real tokens of the first chunk
        and the G query heads of each KV head; normalised to a geometric mean of 1."""
        b, h, n, d = k.shape
        if q.shape[0] != b or q.shape[2] != n or q.shape[3] != d or q.shape[1] % h:
            raise ValueError(f"queries must be [B={b}, H_q (a multiple of {h}), N={n}, D={d}], got {tuple(q.shape)}")
        g = q.shape[1] // h
        w = torch.ones(b, n, device=self.device) if valid is None else valid.to(self.device, torch.float32)
        count = w.sum(dim=1).clamp(min=1.0)[:, None, None]  # [B, 1, 1]
        k2 = torch.zeros(b, h, d, device=self.device)
        q2 = torch.zeros(b, h, d, device=self.device)
        for sl in _statistics_blocks(n, b * q.shape[1] * d):
            wt = w[:, sl]
            kc = k[:, :, sl].to(torch.float32, copy=True)
            if self.key_mean is not None:
                kc.sub_(self.key_mean[:, :, None, :])
            k2 += kc.square_().mul_(wt[:, None, :, None]).sum(dim=2)
            qg = q[:, :, sl].to(torch.float32, copy=True).reshape(b, h, g, -1, d)
            q2 += qg.square_().mul_(wt[:, None, None, :, None]).sum(dim=(2, 3))
        k2, q2 = k2 / count, q2 / (count * g)  # [B, H, D]
        tiny = torch.finfo(torch.float32).tiny
        k2 = k2 + 1e-6 * k2.mean(dim=-1, keepdim=True) + tiny
        q2 = q2 + 1e-6 * q2.mean(dim=-1, keepdim=True) + tiny
        log_s = 0.25 * (k2.log() - q2.log())
        return (log_s - log_s.mean(dim=-1, keepdim=True)).exp()

    def _store_queries(self, qg: torch.Tensor) -> torch.Tensor:
        """Queries [B, H_kv, M, D] as the compressed store sees them: times the key scales, if any."""
        return qg if self.key_scale is None else qg * self.key_scale[:, :, None, :]

    def _write_sinks(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy the positions kv_start .. kv_start + S - 1 of each sequence into the exact sink buffers."""
        s, n = self.config.sink_tokens, k.shape[2]
        pos = torch.arange(self.total_tokens, self.total_tokens + n, device=self.device)
        j = pos[None, :] - self.kv_start[:, None]  # [B, N] sink slot of each position
        j = torch.where((j >= 0) & (j < s), j, s)  # the spare slot s takes everything else
        index = j[:, None, :, None].expand(-1, self.num_kv_heads, -1, self.config.head_dim)
        self.sink_k.scatter_(2, index, k.to(self.dtype))
        self.sink_v.scatter_(2, index, v.to(self.dtype))

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
        slots = torch.arange(start, start + n, device=self.device)
        if ring is not None:
            slots = slots % ring
        if self.device.type == "cuda" and self.config.head_dim in (64, 128, 256):  # fused quantize-on-write
            k = k if k.stride(-1) == 1 else k.contiguous()  # the kernels centre and scale the keys themselves
            v = v if v.stride(-1) == 1 else v.contiguous()
            self._encode_plan(k, v)(k, v, slots, self.key_mean, self.key_scale)
        else:
            if self.key_mean is not None:
                k = k - self.key_mean[:, :, None, :]  # float32
            if self.key_scale is not None:
                k = k / self.key_scale[:, :, None, :]
            for name, value in self._encode(k, v).items():
                getattr(self, name)[:, :, slots] = value
        self.seq_lens.fill_(min(start + n, ring) if ring is not None else start + n)

    def _store_buffers(self) -> dict[str, torch.Tensor]:
        """The compressed store's buffers by name (what the fused kernels read and write)."""
        return {name: getattr(self, name) for name in self._store_names}

    def _plan_is_current(self, plan) -> bool:
        return all(t is getattr(self, name) for name, t in plan.buffers.items())

    def _drop_plans(self) -> None:
        """Forget the kernels' launch plans (after the buffers were replaced: they hold the old ones)."""
        self._decode_plans, self._encode_plans = {}, {}

    def _kept_plan(self, table: str, key: tuple, build):
        """The plan under ``key`` in the plan table named ``table`` (_decode_plans or _encode_plans), built with
        ``build()`` where there is none or it holds replaced buffers (then every plan does: all are dropped)."""
        plan = getattr(self, table).get(key)
        if plan is not None and not self._plan_is_current(plan):
            self._drop_plans()
            plan = None
        if plan is None:
            plans = getattr(self, table)
            if len(plans) >= 8:  # e.g. prefill chunks of many lengths: keep the table small
                plans.clear()
            plan = plans[key] = build()
        return plan

    def _encode_plan(self, k: torch.Tensor, v: torch.Tensor):
        """The fused encode's launch plan for chunks shaped like k, v (kernels.encode.EncodePlan), kept across
        appends of that shape while the buffers stay the same tensors."""
        from .kernels import encode

        centred, scaled = self.key_mean is not None, self.key_scale is not None
        return self._kept_plan(
            "_encode_plans",
            (tuple(k.shape), k.dtype, v.dtype, centred, scaled),
            lambda: encode.EncodePlan(
                k, v, self._store_buffers(), key_quantizer=self.key_quantizer, value_quantizer=self.value_quantizer,
                launch=dict(encode.LAUNCH_DEFAULTS), centred=centred, scaled=scaled,
            ),
        )  # fmt: skip

    def _encode(self, k: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize and planar-pack k, v [B, H, N, D] (keys already centred where configured) into buffer rows."""
        c = self.config
        rows = {}
        if c.key_mode == "mse":
            idx, norms = self.key_quantizer.quantize(k)
        else:
            idx, norms, signs, rnorms = self.key_quantizer.quantize(k)
            rows["key_signs"] = pack_planar(signs, 1)
            rows["key_rnorms"] = rnorms
        rows["key_codes"] = pack_key_codes(idx, c.key_index_bits)
        rows["key_norms"] = norms
        codes, scales, zeros = self.value_quantizer.quantize(v)
        rows.update(value_codes=pack_planar(codes, c.value_bits), value_affine=torch.stack((scales, zeros), -1))
        return rows

    # ----------------------------------------------------------------------------- batch editing
    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) sequences: indices [B'] int into the batch (beam search, batch select)."""
        indices = torch.as_tensor(indices, device=self.device, dtype=torch.int64)
        if indices.dim() != 1 or indices.numel() == 0:
            raise ValueError(f"indices must be a non-empty 1-D tensor, got shape {tuple(indices.shape)}")
        if int(indices.min()) < 0 or int(indices.max()) >= self.batch_size:
            raise ValueError(f"indices must lie in [0, {self.batch_size}), got {indices.tolist()}")
        for name in (*self._buffer_specs(), "_window_k", "_window_v", "sink_k", "sink_v", "seq_lens", "kv_start"):
            setattr(self, name, getattr(self, name).index_select(0, indices))
        if self.key_mean is not None:
            self.key_mean = self.key_mean.index_select(0, indices)
        if self.key_scale is not None:
            self.key_scale = self.key_scale.index_select(0, indices)
        self.batch_size = indices.numel()
        self._drop_plans()

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions of every sequence (a negative value removes that many)."""
        if self.config.ring_window is not None:
            raise ValueError("a ring (sliding-window) cache cannot be cropped: earlier tokens are gone")
        length = self.total_tokens + length if length < 0 else min(length, self.total_tokens)
        if length < 0:
            raise ValueError(f"cannot remove more than the {self.total_tokens} cached positions")
        n_win = max(0, length - self.num_compressed)
        stored = min(length, self.num_compressed)
        self.n_window = n_win
        self.seq_lens = self.seq_lens.clamp(max=stored)
        self.kv_start = self.kv_start.clamp(max=length)
        self._max_kv_start = min(self._max_kv_start, length)
        self.total_tokens = stored + n_win

    # -------------------------------------------------------------------------------------- read
    def _slot_positions(self, start: int, stop: int) -> torch.Tensor:
        """Absolute token position held by store slots [start, stop): [stop - start] int64."""
        slots = torch.arange(start, stop, device=self.device)
        ring = self.config.ring_window
        if ring is None or self.num_compressed <= ring:
            return slots
        total = self.num_compressed  # newest position is total - 1, held in slot (total - 1) % ring
        return total - 1 - ((total - 1 - slots) % ring)

    def _visible(
        self, pos: torch.Tensor, q_pos: torch.Tensor, lower: torch.Tensor, group: int, causal: bool,
        sliding_window: int | None,
    ) -> torch.Tensor:  # fmt: skip
        """Which keys each query row sees: pos [1 or B, n] key positions, q_pos [N_q], lower [B] first
        attended position -> [B, 1, G·N_q, n] bool (rows ordered as the grouped queries)."""
        p, qp = pos[:, None, :], q_pos[None, :, None]
        vis = p >= lower[:, None, None]  # [B, 1, n]
        if causal:
            vis = vis & (p <= qp)
        if sliding_window is not None:
            vis = vis & (p > qp - sliding_window)
        vis = vis.expand(self.batch_size, q_pos.numel(), pos.shape[-1])
        return vis.repeat(1, group, 1)[:, None]

    def _dequantize_block(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated basis, norm applied) and values of store slots [start, stop): [B, H, n, D] f32."""
        c, d = self.config, self.config.head_dim
        rows, norms = self.key_codes[:, :, start:stop], self.key_norms[:, :, start:stop]
        k_rot = self.mse_quantizer.dequantize_key_rows(rows, norms)
        codes = unpack_planar(self.value_codes[:, :, start:stop], c.value_bits, d)
        affine = self.value_affine[:, :, start:stop]
        v = self.value_quantizer.dequantize_codes(codes, affine[..., 0], affine[..., 1])
        return k_rot, v

    def attend(
        self,
        q: torch.Tensor,
        *,
        scale: float | None = None,
        causal: bool = True,
        after: bool = False,
        sliding_window: int | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """Attention of N_q queries over everything cached.

        q: [B, H_q, N_q, D] (H_q a multiple of H_kv). By default query i is one of the newest cached
        tokens, at position L - N_q + i (L = positions appended so far), and with ``causal`` it sees
        keys at positions <= its own. With ``after`` the queries come right after the cache
        (positions L + i, for a chunk the caller attends itself): every cached key precedes them.
        sliding_window: if set, a query at p sees only keys at positions > p - sliding_window.
        backend: "triton" (fused kernel), "reference" (PyTorch), or "auto" (triton on CUDA where it applies).
        Returns [B, H_q, N_q, D] in q's dtype.
        """
        out, _ = self.attend_with_lse(
            q, scale=scale, causal=causal, after=after, sliding_window=sliding_window, backend=backend
        )
        return out.to(q.dtype)

    def attend_with_lse(
        self,
        q: torch.Tensor,
        *,
        scale: float | None = None,
        causal: bool = True,
        after: bool = False,
        sliding_window: int | None = None,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`attend`, returning (out [B, H_q, N_q, D] float32, lse [B, H_q, N_q] float32).

        Rows that see no key get out = 0 and lse = -inf (merge them with merge_attention).
        """
        c, d = self.config, self.config.head_dim
        check_float_input(q, d, self.device, "q")
        if q.dim() != 4 or q.shape[0] != self.batch_size or q.shape[1] % self.num_kv_heads:
            raise ValueError(
                f"q must have shape [B={self.batch_size}, H_q (a multiple of {self.num_kv_heads}), N_q, {d}], "
                f"got {tuple(q.shape)}"
            )
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
        b, h_q, n_q, _ = q.shape
        if not after and n_q > self.total_tokens:
            raise ValueError(f"{n_q} queries but only {self.total_tokens} tokens cached: append before attend")
        first_q = self.total_tokens if after else self.total_tokens - n_q
        if self._ring_wrapped and not after and n_q > 1 and causal:
            raise ValueError(
                "ring mode keeps only the last ring_window tokens: attend with N_q > 1 after the ring wrapped "
                "would miss keys that earlier queries of the chunk need; attend one query at a time"
            )
        causal = causal and not after
        h_kv, group = self.num_kv_heads, h_q // self.num_kv_heads
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        q_pos = torch.arange(first_q, first_q + n_q, device=self.device)  # [N_q]
        lower = self.kv_start + c.sink_tokens  # first position attended outside the sinks
        qg = q.float().reshape(b, h_kv, group * n_q, d)  # query heads of one KV head share its keys
        applies = self._kernel_applies(first_q + n_q - 1, sliding_window)
        if backend == "auto":
            backend = "triton" if q.is_cuda and applies else "reference"
        elif backend == "triton" and not applies:
            raise ValueError(
                "the fused kernel cannot express this attention (head_dim other than 64/128/256, keys outside a "
                "sliding window still stored, or left padding among the slots of a wrapped ring): use backend='auto'"
            )
        if backend == "triton":
            out, lse = self._attend_compressed_triton(qg, n_q, first_q, scale, causal)
        else:
            out, lse = self._attend_compressed_reference(qg, q_pos, lower, group, scale, causal, sliding_window)
        if self.key_mean is not None:
            lse = self._restore_key_mean(lse, qg, scale)

        if self.n_window:
            win_pos = torch.arange(self.num_compressed, self.total_tokens, device=self.device)[None]
            scores = (qg @ self.window_k.float().transpose(-1, -2)) * scale
            visible = self._visible(win_pos, q_pos, lower, group, causal, sliding_window)
            out, lse = merge_attention(out, lse, *softmax_block(scores.masked_fill(~visible, float("-inf")),
                                                                self.window_v.float()))  # fmt: skip
        if c.sink_tokens:
            out, lse = self._merge_sinks(qg, out, lse, q_pos, group, scale, causal, sliding_window)
        return out.reshape(b, h_q, n_q, d), lse.reshape(b, h_q, n_q)

    def _restore_key_mean(self, lse: torch.Tensor, qg: torch.Tensor, scale: float) -> torch.Tensor:
        """Centred keys shift every stored logit by -scale·q·μ: add it back to lse [B, H_kv, M] (outputs are
        unchanged), so that merges with exact keys stay right."""
        return lse + scale * (qg @ self.key_mean[:, :, :, None]).squeeze(-1)

    def _merge_sinks(self, qg, out, lse, q_pos, group: int, scale: float, causal: bool, sliding_window):
        """Merge attention over the exact sink tokens into (out [B, H_kv, M, D], lse [B, H_kv, M])."""
        s = self.config.sink_tokens
        sink_pos = self.kv_start[:, None] + torch.arange(s, device=self.device)  # [B, S]
        filled = (sink_pos < self.total_tokens)[:, None, None, :]
        scores = (qg @ self.sink_k[:, :, :s].float().transpose(-1, -2)) * scale
        visible = self._visible(sink_pos, q_pos, self.kv_start, group, causal, sliding_window) & filled
        return merge_attention(out, lse, *softmax_block(scores.masked_fill(~visible, float("-inf")),
                                                        self.sink_v[:, :, :s].float()))  # fmt: skip

    def attend_and_append(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        scale: float | None = None,
        sliding_window: int | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """One model step: the queries of a new chunk attend to the cache and, exactly, to the chunk itself
        (causal, left padding ``valid``, sliding window); then the chunk is appended.

        q: [B, H_q, N, D]; k, v: [B, H_kv, N, D], the chunk's keys and values at positions L .. L + N - 1.
        A step of up to FUSED_STEP_TOKENS tokens without padding (no ``valid``, or every sequence already started)
        on the fused kernel adds its own exact keys/values inside the kernel's merge (no extra launches); otherwise
        the two parts are merged by log-sum-exp. Returns [B, H_q, N, D] in q's dtype.
        """
        valid, scale = self._step_arguments(q, k, v, valid, scale)
        out = self._attend_step(q, k, v, valid, scale, sliding_window, backend)
        self.append(k, v, valid=valid, queries=q)
        return out

    def attend_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        scale: float | None = None,
        sliding_window: int | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """The attention of attend_and_append (same arguments, same result: q [B, H_q, N, D] attends to the cache
        and to the chunk k, v [B, H_kv, N, D] at positions L .. L + N - 1), without appending the chunk: for a step
        whose tokens may not all be kept (speculative verification: append the accepted ones after), or to time or
        check a step. Returns [B, H_q, N, D] in q's dtype."""
        valid, scale = self._step_arguments(q, k, v, valid, scale)
        return self._attend_step(q, k, v, valid, scale, sliding_window, backend)

    def _step_arguments(self, q, k, v, valid, scale) -> tuple[torch.Tensor | None, float]:
        """(valid, scale) of a step after the checks: valid None where it only confirms that every sequence has
        started (a short step's mask; its value checked without a host synchronisation on CUDA)."""
        self._check_kv(k, v)
        if q.dim() != 4 or q.shape[2] != k.shape[2]:
            raise ValueError(f"q must be [B, H_q, N, D] with the chunk's N = {k.shape[2]}, got {tuple(q.shape)}")
        scale = 1.0 / math.sqrt(self.config.head_dim) if scale is None else scale
        n = q.shape[2]
        if valid is not None and n <= FUSED_STEP_TOKENS and self.total_tokens and self.all_sequences_started:
            # no token after a sequence's first real one is padding: the mask of a short step only confirms it (a
            # single token's value is not read; a longer step's without a host synchronisation on CUDA)
            valid = self._checked_validity(valid, n)
            if n > 1:
                _check_left_padding(valid.all(), wait=self.device.type != "cuda")
            valid = None
        return valid, scale

    def _attend_step(self, q, k, v, valid, scale: float, sliding_window: int | None, backend: str) -> torch.Tensor:
        if self.total_tokens == 0:
            return chunk_attention(q, k, v, valid, scale=scale, sliding_window=sliding_window)
        if self._fused_step_applies(q, valid, sliding_window, backend):
            return self._fused_step(q, k, v, scale)
        past = self.attend_with_lse(q, scale=scale, after=True, sliding_window=sliding_window, backend=backend)
        chunk = chunk_attention(q, k, v, valid, scale=scale, sliding_window=sliding_window, with_lse=True)
        return merge_attention(*past, *chunk)[0].to(q.dtype)

    def _fused_step_applies(self, q: torch.Tensor, valid, sliding_window: int | None, backend: str) -> bool:
        n = q.shape[2]
        plain = n <= FUSED_STEP_TOKENS and valid is None and (sliding_window is None or n <= sliding_window)
        wants_kernel = backend == "triton" or (backend == "auto" and q.is_cuda)
        return plain and wants_kernel and self._kernel_applies(self.total_tokens + n - 1, sliding_window)

    def _fused_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """A step of N tokens (decode: one) with the fused kernel, their own exact k, v (in causal order), the exact
        sink tokens and the full-precision window merged in-kernel: q [B, H_q, N, D], k, v [B, H_kv, N, D].

        Centred keys: the step's keys, the sinks' and the window's are centred in the kernel too, so all logits
        there share the shift -q·μ. (The fused path applies only where no stored key, hence no sink, is outside the
        sliding window: _kernel_applies.)"""
        b, h_q, n, d = q.shape
        qg = q.float().reshape(b, self.num_kv_heads, h_q // self.num_kv_heads * n, d).contiguous()
        q_rot, sq = self._kernel_queries(qg)
        q_start = torch.full((b,), self.total_tokens, dtype=torch.int64, device=self.device)
        sinks = (self.sink_k, self.sink_v, self.kv_start) if self.config.sink_tokens else None
        window = None
        if self.config.residual_window:  # rows past the sinks and pads (the kernel's first slot), before the token
            window = (self._window_k, self._window_v, self._window_start(), self._kernel_kv_start())
        out, _ = self._run_decode(q_rot, sq, q_start, n, scale, causal=False, exact=(qg, k, v), sinks=sinks,
                                  window=window, out_dtype=q.dtype)  # fmt: skip
        return out.reshape(b, h_q, n, d)

    def _window_start(self) -> torch.Tensor:
        """Position of the window's oldest token per sequence, [B] int64 (num_compressed; a new tensor only after a
        flush)."""
        memo = self._window_start_memo
        if memo is None or memo[0] != self.num_compressed or memo[1].shape[0] != self.batch_size:
            start = torch.full((self.batch_size,), self.num_compressed, dtype=torch.int64, device=self.device)
            memo = self._window_start_memo = (self.num_compressed, start)
        return memo[1]

    def _kernel_applies(self, last_q_pos: int, sliding_window: int | None) -> bool:
        """Whether the fused kernel's masks (a per-sequence lower slot bound) express this attention."""
        if self.config.head_dim not in (64, 128, 256):
            return False
        stored = min(self.num_compressed, self.capacity)
        oldest = self.num_compressed - stored  # position of the oldest stored token
        if sliding_window is not None and oldest <= last_q_pos - sliding_window:
            return False  # some stored keys fall out of the window of some query
        # pads among the slots of a wrapped ring: the kernel's slot bound cannot skip them
        return not (self._ring_wrapped and self._max_kv_start + self.config.sink_tokens > oldest)

    def _attend_compressed_reference(
        self, qg: torch.Tensor, q_pos: torch.Tensor, lower: torch.Tensor, group: int, scale: float, causal: bool,
        sliding_window: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Blocked online-softmax attention over the store: qg [B, H_kv, G·N_q, D] -> (out, lse)."""
        c, d = self.config, self.config.head_dim
        b, h_kv, m, _ = qg.shape
        kq = self.key_quantizer
        qg = self._store_queries(qg)
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
            visible = self._visible(self._slot_positions(start, stop)[None], q_pos, lower, group, causal,
                                    sliding_window)  # fmt: skip
            out, lse = merge_attention(out, lse, *softmax_block(scores.masked_fill(~visible, float("-inf")), v))
        return out, lse

    def _attend_compressed_triton(
        self, qg: torch.Tensor, n_q: int, first_q: int, scale: float, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused decode kernel over the store (kernels.decode): qg [B, H_kv, G·N_q, D] -> (out, lse)."""
        q_rot, sq = self._kernel_queries(qg)
        q_start = torch.full((self.batch_size,), first_q, dtype=torch.int64, device=self.device)
        return self._run_decode(q_rot, sq, q_start, n_q, scale, causal=causal)

    def decode_inputs(self, qg: torch.Tensor, n_q: int, scale: float, first_q: int | None = None) -> dict:
        """Arguments of kernels.decode.decode_attention for queries qg [B, H_kv, G·N_q, D] (float32).

        Rotates the queries once (Πq, and S q for prod keys); the kernel multiplies them by q_scale, the softmax
        scale times log2(e). first_q: position of query 0 (default: the newest n_q cached tokens).
        """
        from .kernels.decode import LOG2E

        c = self.config
        q_rot, sq = self._kernel_queries(qg)
        first_q = self.total_tokens - n_q if first_q is None else first_q
        q_start = torch.full((self.batch_size,), first_q, dtype=torch.int64, device=self.device)
        return dict(
            q_rot=q_rot, sq=sq, buffers=self._store_buffers(), codebook=self._kernel_codebook,
            key_tables=self._kernel_key_tables(), key_table_words=self._key_table_words, seq_lens=self.seq_lens,
            kv_start=self._kernel_kv_start(), q_start=q_start, key_bits=c.key_bits, key_mode=c.key_mode,
            value_bits=c.value_bits, group_size=c.group_size, n_q=n_q, q_scale=scale * LOG2E,
        )  # fmt: skip

    def _kernel_queries(self, qg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Πq, S q or None) of queries qg [B, H_kv, M, D] float32 as the kernel takes them: [B, H_kv, M, D]
        float32 contiguous, with the key scales (and √(π/2)/d for S q) folded in; the kernel applies the softmax
        scale."""
        kq = self.key_quantizer
        qg = self._store_queries(qg)
        q_rot = self.mse_quantizer.rotate(qg)
        sq = (qg @ kq.qjl.T).mul_(kq.qjl_coef) if self.config.key_mode == "prod" else None
        return q_rot, sq

    def _kernel_kv_start(self) -> torch.Tensor:
        """First slot the kernel attends per sequence, [B] int64: past the left pads and the sinks (attended from
        their exact copies); every stored slot once the ring has wrapped (_kernel_applies has checked that no pad
        is among them). Recomputed only when kv_start or the wrap changes."""
        wrapped = self._ring_wrapped
        memo = self._kv_start_memo
        if memo is None or memo[0] is not self.kv_start or memo[1] != wrapped:
            if wrapped:
                start = torch.zeros_like(self.kv_start)
            else:
                start = self.kv_start + self.config.sink_tokens if self.config.sink_tokens else self.kv_start
            memo = self._kv_start_memo = (self.kv_start, wrapped, start)
        return memo[2]

    def _kernel_key_tables(self) -> torch.Tensor:
        """The kernel's key lookup tables (kernels.decode.key_lookup_tables) and their host copy, built once."""
        if self._key_tables is None:
            from .kernels.decode import key_lookup_tables

            self._key_tables = key_lookup_tables(self._kernel_codebook)
            self._key_table_words = tuple(self._key_tables.tolist())  # one read, on the first kernel call
        return self._key_tables

    def _run_decode(
        self, q_rot: torch.Tensor, sq: torch.Tensor | None, q_start: torch.Tensor, n_q: int, scale: float, *,
        causal: bool, exact: tuple | None = None, sinks: tuple | None = None, window: tuple | None = None,
        out_dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """kernels.decode over the store with a launch plan (DecodePlan) kept across steps while the buffers stay
        the same tensors: the inputs are the cache's own, so the plan's launch skips decode_attention's checks."""
        from .kernels import decode

        c = self.config
        n_sinks = 0 if sinks is None else sinks[0].shape[2] - 1
        window_rows = 0 if window is None else window[0].shape[2]
        kv_start = self._kernel_kv_start()
        plan = self._kept_plan(
            "_decode_plans",
            (tuple(q_rot.shape), n_q, causal, exact is not None, n_sinks, window_rows),
            lambda: decode.DecodePlan(
                q_rot, sq, self._store_buffers(), self._kernel_codebook, self.seq_lens, kv_start, q_start,
                key_bits=c.key_bits, key_mode=c.key_mode, value_bits=c.value_bits, group_size=c.group_size, n_q=n_q,
                causal=causal, exact=exact is not None, n_sinks=n_sinks, key_tables=self._kernel_key_tables(),
                key_table_words=self._key_table_words, launch=dict(decode.LAUNCH_DEFAULTS), window_rows=window_rows,
            ),
        )  # fmt: skip
        key_mean = self.key_mean if exact is not None else None
        return plan(q_rot, sq, self.seq_lens, kv_start, q_start, q_scale=scale * decode.LOG2E, exact=exact,
                    sinks=sinks, window=window, key_mean=key_mean, out_dtype=out_dtype)  # fmt: skip

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompressed (k, v) in position order, window included: [B, H_kv, L, D] in self.dtype.

        For debugging and tests; attention never calls it. L = min(total, ring_window) in ring mode.
        Pads and sink positions are included as stored in the compressed store.
        """
        stored = min(self.num_compressed, self.capacity)
        k_rot, v = self._dequantize_block(0, stored)
        k = self.mse_quantizer.unrotate(k_rot)
        if self.config.key_mode == "prod":
            signs = unpack_planar(self.key_signs[:, :, :stored], 1, self.config.head_dim)
            k = k + self.key_quantizer.qjl_correction(signs, self.key_rnorms[:, :, :stored])
        if self.key_scale is not None:
            k = k * self.key_scale[:, :, None, :]
        if self.key_mean is not None:
            k = k + self.key_mean[:, :, None, :]
        order = torch.argsort(self._slot_positions(0, stored))
        k, v = k[:, :, order], v[:, :, order]
        k = torch.cat((k.to(self.dtype), self.window_k), dim=2)
        v = torch.cat((v.to(self.dtype), self.window_v), dim=2)
        return k, v
