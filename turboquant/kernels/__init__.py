"""Fused Triton kernels over the compressed cache (CUDA; the CPU interpreter with TRITON_INTERPRET=1)."""

from .decode import decode_attention
from .encode import encode_kv

__all__ = ["decode_attention", "encode_kv"]
