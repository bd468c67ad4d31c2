"""Hugging Face transformers integration: a compressed ``Cache`` and the attention that reads it.

Usage::

    cache = TurboQuantCache(model, key_bits=4, value_bits=4)   # also switches the model's attention
    out = model.generate(input_ids, cache=cache, max_new_tokens=64)   # past_key_values=cache in 5.17

How a step runs (transformers 5.x): the model projects q, k, v and calls ``cache.update(k, v, layer_idx)``;
our layer keeps the new k, v pending and returns them tagged with the layer (``LayerKeys``). The
registered attention function ``"turboquant"`` then computes, for the step's queries,

    attention over [compressed past (kernel on CUDA, reference elsewhere)] ∪ [the exact window of recent
    tokens and sink tokens] ∪ [this step's exact k, v]

merged by log-sum-exp (on CUDA, for a step of up to 16 tokens without padding — a decode step, a speculative
verification — inside the decode kernel's merge), and only then writes the step's k, v into the window, whose
oldest tokens go to the compressed store (by default the 128 most recent tokens stay exact; with
residual_window=0 the step's k, v are quantized at once). So a prompt
attends to itself exactly (as with a 16-bit cache) and every later query reads older tokens from the
codes; the whole cache is never decompressed. Masks: the registered mask function passes the 2-D padding
mask through unchanged; causal order, sliding windows and left padding are applied by the attention itself
(left pads are stored but never attended, see ``TurboQuantKVCache.append``).

Layers: ``config.layer_types`` decides per layer: "full_attention" layers get a growing compressed store,
"sliding_attention" layers a ring that, with the layer's exact window (flushed one token at a time),
holds the last ``sliding_window - 1`` tokens (what the next query can see). Layers listed in
``skip_layers`` keep transformers' own 16-bit layers.
"""

from __future__ import annotations

import inspect
import math

import torch
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface

from ..attention import chunk_attention
from ..cache import KVCacheConfig, TurboQuantKVCache

__all__ = [
    "ATTENTION_NAME",
    "LayerKeys",
    "TurboQuantCache",
    "TurboQuantLayer",
    "cache_keyword",
    "turboquant_attention_forward",
]

ATTENTION_NAME = "turboquant"
LAYER_TYPES = ("full_attention", "sliding_attention")


def cache_keyword(model: PreTrainedModel) -> str:
    """The keyword by which ``model.forward`` and ``generate`` take a cache object in the installed transformers:
    ``cache`` from 5.2x on (``past_key_values`` is then deprecated), ``past_key_values`` before (5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class LayerKeys(torch.Tensor):
    """The key states of one step, returned by ``TurboQuantLayer.update``, carrying the layer (``.layer``)
    that will attend over them and then store them. Any operation on it yields a plain tensor."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def wrap(keys: torch.Tensor, layer: TurboQuantLayer) -> LayerKeys:
        tagged = torch.Tensor._make_subclass(LayerKeys, keys)
        tagged.layer = layer
        return tagged


class TurboQuantLayer(CacheLayerMixin):
    """One decoder layer's compressed cache (a transformers cache layer over TurboQuantKVCache).

    Args:
        settings: KVCacheConfig fields except head_dim (taken from the first update).
        sliding_window: the layer's window W for sliding-attention layers (the store is then a ring of
            W - 1 - R tokens, R the exact window, flushed one token at a time).
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, settings: dict, sliding_window: int | None = None):
        super().__init__()
        self.settings = dict(settings)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        if self.is_sliding:  # ring + exact window hold exactly the last sliding_window - 1 tokens
            window = min(self.settings.get("residual_window", 0), sliding_window - 2)
            self.settings.update(ring_window=max(sliding_window - 1 - window, 1), residual_window=max(window, 0),
                                 flush_block=1, sink_tokens=0)  # fmt: skip
            self.is_croppable = False
        self.store: TurboQuantKVCache | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.backend = "auto"  # attention over the store: "auto" (fused kernel on CUDA), "triton" or "reference"

    # transformers layer API -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.initialize(b, h, d, key_states.device, key_states.dtype)

    def initialize(self, batch_size: int, num_kv_heads: int, head_dim: int, device, dtype, capacity: int = 0) -> None:
        """Create the layer's store (``capacity`` tokens preallocated) before any update."""
        config = KVCacheConfig(head_dim=head_dim, **self.settings)
        self.store = TurboQuantKVCache(config, batch_size, num_kv_heads, device=device, dtype=dtype, capacity=capacity)
        self.dtype, self.device = dtype, self.store.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Hold k, v [B, H_kv, N, D] until the attention of this step has read the store; returns (LayerKeys, v)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:
            raise RuntimeError(
                "the previous step's keys were never attended: a TurboQuantCache needs the model's attention "
                f"implementation to be {ATTENTION_NAME!r} (TurboQuantCache(model, ...) sets it; or call "
                f"model.set_attn_implementation({ATTENTION_NAME!r}))"
            )
        self._pending = (key_states, value_states)
        return LayerKeys.wrap(key_states, self), value_states

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.store.total_tokens + (self._pending[0].shape[2] if self._pending is not None else 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store, self._pending, self.is_initialized = None, None, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.store.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.store.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            b = self.store.batch_size
            self.store.select_batch(torch.arange(b, device=self.store.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """A negative value removes that many positions; a positive one keeps that many (older API)."""
        if self.is_initialized and tokens_to_remove != 0:
            self.store.crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Bytes the layer's tensors occupy."""
        return self.store.nbytes() if self.is_initialized else 0

    # attention ----------------------------------------------------------------------------------
    def attend_and_store(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Attention of query [B, H_q, N, D] over the stored past and the pending chunk; then store the chunk.

        attention_mask: None or the [B, ≥N] bool padding mask whose last N columns belong to the chunk.
        Returns [B, H_q, N, D] in the query's dtype.
        """
        if self._pending is None:
            raise RuntimeError("attend_and_store called without a pending update for this layer")
        k_new, v_new = self._pending
        store, n = self.store, k_new.shape[2]
        valid = _chunk_validity(attention_mask, n)
        out = store.attend_and_append(query, k_new, v_new, valid=valid, scale=scale,
                                      sliding_window=self.sliding_window, backend=self.backend)  # fmt: skip
        self._pending = None
        return out


def _chunk_validity(attention_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The chunk's columns of a 2-D padding mask ([B, N] bool), None when there is no padding mask."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"the {ATTENTION_NAME!r} attention expects the 2-D padding mask from its registered mask function, "
            f"got a {attention_mask.dim()}-D mask (custom 4-D masks are not supported)"
        )
    return attention_mask[:, -n:].to(torch.bool)


def turboquant_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered ``"turboquant"`` attention: query [B, H_q, N, D], key/value from the cache's update.

    Compressed layers (key is LayerKeys) attend over their store plus the step's exact chunk; layers kept in
    16 bits (skip_layers) attend exactly. Returns (out [B, N, H_q, D], None).
    """
    if dropout and module.training:
        raise ValueError(f"the {ATTENTION_NAME!r} attention is for inference; attention dropout is not supported")
    if softcap is not None or getattr(module, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(f"the {ATTENTION_NAME!r} attention does not support attention logit soft-capping")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    if isinstance(key, LayerKeys):
        out = key.layer.attend_and_store(query, attention_mask, scale)
    else:  # a layer kept in 16 bits: key, value hold its whole (or windowed) history
        valid = None if attention_mask is None else _chunk_validity(attention_mask, key.shape[2])
        out = chunk_attention(query, key, value, valid, scale=scale, sliding_window=sliding_window)
    return out.transpose(1, 2).contiguous(), None


def _pass_padding_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function of the ``"turboquant"`` attention: the 2-D padding mask, unchanged (or None)."""
    return attention_mask


AttentionInterface.register(ATTENTION_NAME, turboquant_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, _pass_padding_mask)


def _decoder_config(config: PreTrainedConfig) -> PreTrainedConfig:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _layer_types(config: PreTrainedConfig) -> list[str]:
    """Attention type of every decoder layer, checked against what the cache supports."""
    if getattr(config, "kv_lora_rank", None):
        raise ValueError(
            "models with compressed latent attention (MLA, kv_lora_rank) are not supported: TurboQuantCache "
            "compresses per-head keys and values of multi-head, grouped-query or multi-query attention"
        )
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        types = [kind] * n
    unsupported = sorted(set(types) - set(LAYER_TYPES))
    if unsupported:
        raise ValueError(f"layer types {unsupported} are not supported; supported: {LAYER_TYPES}")
    return list(types)


class TurboQuantCache(Cache):
    """A transformers Cache holding every decoder layer's K/V compressed with TurboQuant.

    Args:
        model: the PreTrainedModel (its attention implementation is switched to "turboquant") or its config
            (then call ``model.set_attn_implementation("turboquant")`` yourself).
        key_bits, value_bits, key_mode, rotation, norm_correction, group_size: the quantizers (KVCacheConfig;
            group_size None: 32 values per (scale, zero), or the largest divisor of head_dim below 32).
        residual_window, flush_block: recent tokens kept in 16 bits, flushed in blocks.
        center_keys: subtract each head's mean prompt key before quantizing (exact for attention).
        scale_keys: divide key channels by scales set from the prompt's keys and queries, and multiply the
            queries by them (exact for attention; lowers the logit error, see TurboQuantKVCache._key_scales).
        sink_tokens: keep the first real tokens of each sequence in 16 bits.
        skip_layers: decoder layer indices kept in transformers' 16-bit layers.

    The defaults are what measured best (benchmarks/RESULTS.md): the 128 most recent tokens kept in 16 bits
    (between 128 and 191 of them; at K4/V4 on SmolLM2, eight texts, perplexity +0.18% ± 0.15 over the 16-bit
    cache and KL 0.0019, against +2.5% and KL 0.020 with none, for ~2% more bytes at 32k tokens and no slower a
    decode step: the fused kernel attends the window too); without a window, centring with sinks on SmolLM2 and
    Gemma-3, key scaling on both (KL of the next-token distribution −18% on SmolLM2 over three texts, −65% on
    Gemma-3), norm correction on SmolLM2 (on Gemma-3 it is 3% worse). ``residual_window=0`` quantizes every
    token, as the paper does; with ``norm_correction=False, center_keys=False, scale_keys=False, sink_tokens=0``
    too, the paper's quantizers are unchanged.
    """

    def __init__(
        self,
        model: PreTrainedModel | PreTrainedConfig,
        *,
        key_bits: int = 4,
        value_bits: int = 4,
        key_mode: str = "mse",
        rotation: str = "haar",
        norm_correction: bool = True,
        group_size: int | None = None,
        residual_window: int = 128,
        flush_block: int = 64,
        center_keys: bool = True,
        scale_keys: bool = True,
        sink_tokens: int = 4,
        skip_layers: tuple[int, ...] | list[int] = (),
    ):
        config = model.config if isinstance(model, PreTrainedModel) else model
        text = _decoder_config(config)
        types = _layer_types(text)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        settings = dict(
            key_bits=key_bits, value_bits=value_bits, key_mode=key_mode, rotation=rotation,
            norm_correction=norm_correction, group_size=group_size, residual_window=residual_window,
            flush_block=flush_block, center_keys=center_keys, scale_keys=scale_keys, sink_tokens=sink_tokens,
        )  # fmt: skip
        KVCacheConfig(head_dim=head_dim, **settings)  # validate every option now, with its message
        bad = [i for i in skip_layers if not 0 <= i < len(types)]
        if bad:
            raise ValueError(f"skip_layers {bad} out of range: the model has {len(types)} decoder layers")
        window = getattr(text, "sliding_window", None)
        layers = []
        for i, kind in enumerate(types):
            sliding = window if kind == "sliding_attention" else None
            if i in skip_layers:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window) if sliding else DynamicLayer())
            else:
                layers.append(TurboQuantLayer(settings, sliding_window=sliding))
        super().__init__(layers=layers)
        if isinstance(model, PreTrainedModel):
            model.set_attn_implementation(ATTENTION_NAME)

    def nbytes(self) -> int:
        """Bytes held by every layer (compressed stores, windows, sinks; 16-bit layers count their tensors)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, TurboQuantLayer):
                total += layer.nbytes()
            elif getattr(layer, "is_initialized", False):
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total
