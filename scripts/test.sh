#!/usr/bin/env bash
# Install, then run the test suite (Triton kernels run in the CPU interpreter where no GPU exists).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
python -m ruff check turboquant tests benchmarks examples
export OMP_NUM_THREADS=1  # two test workers, one thread each: no oversubscription on 2 cores
python -m pytest -q -n 2 tests
# the integration also against the oldest transformers it supports (5.17), installed beside the newest with the
# huggingface_hub (< 2) and httpx it needs
oldest="$(mktemp -d)"
python -m pip install -q --no-deps --target "$oldest" "transformers==5.17.0"
python -m pip install -q --target "$oldest" "huggingface_hub>=1.5,<2" httpx
PYTHONPATH="$oldest" python -m pytest -q -n 2 tests/test_transformers.py
rm -rf "$oldest"
