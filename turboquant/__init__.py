"""turboquant: TurboQuant (arXiv:2504.19874) KV-cache compression and attention over it.

Layers, each importing only from those above it:
  codebook, rotation          - the math: Lloyd-Max codebooks for f_d, Haar / Hadamard / QJL matrices
  packing, quantizers         - bit packing; TurboQuantMSE, TurboQuantProd, ValueQuantizer
"""

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
    "MSECompressed",
    "ProdCompressed",
    "TurboQuantMSE",
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
    "unpack_indices",
]
