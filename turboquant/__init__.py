"""turboquant: TurboQuant (arXiv:2504.19874) KV-cache compression and attention over it.

Layers, each importing only from those above it:
  codebook, rotation          - the math: Lloyd-Max codebooks for f_d, Haar / Hadamard / QJL matrices
  packing, quantizers         - bit packing; TurboQuantMSE, TurboQuantProd, ValueQuantizer
  attention                   - reference attention over compressed K/V (turboquant_attention)
  kernels                     - fused Triton kernels (decode attention)
  cache                       - TurboQuantKVCache: one layer's compressed cache, quantize-on-write
  demo, cli                   - ``python -m turboquant demo | quality | codebooks``
"""

from .attention import turboquant_attention
from .cache import KVCacheConfig, TurboQuantKVCache
from .codebook import codebook_distortion, generate_lloyd_max_codebook, get_codebook
from .packing import pack_indices, packed_size, unpack_indices
from .quantizers import (
    MSECompressed,
    ProdCompressed,
    TurboQuantMSE,
    TurboQuantProd,
    ValueCompressed,
    ValueQuantizer,
    compression_ratio,
)
from .rotation import (
    clear_cache,
    fast_hadamard_transform,
    get_hadamard_rotation,
    get_qjl_matrix,
    get_rotation_matrix,
)

__version__ = "0.1.0"

__all__ = [
    "KVCacheConfig",
    "MSECompressed",
    "ProdCompressed",
    "TurboQuantMSE",
    "TurboQuantKVCache",
    "TurboQuantProd",
    "ValueCompressed",
    "ValueQuantizer",
    "clear_cache",
    "codebook_distortion",
    "compression_ratio",
    "fast_hadamard_transform",
    "generate_lloyd_max_codebook",
    "get_codebook",
    "get_hadamard_rotation",
    "get_qjl_matrix",
    "get_rotation_matrix",
    "pack_indices",
    "packed_size",
    "turboquant_attention",
    "unpack_indices",
]
