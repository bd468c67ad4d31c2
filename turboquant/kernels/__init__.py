"""Fused Triton kernels over the compressed cache (CUDA; the CPU interpreter with TRITON_INTERPRET=1)."""

from .decode import decode_attention

__all__ = ["decode_attention"]
