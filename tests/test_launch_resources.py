"""The encode kernel's default long launches fit an H200 block's shared memory, compiled offline for sm_90 (no GPU
needed; benchmarks/launch_resources.py). A launch that does not fit fails only on the GPU, where CI does not run:
at head_dim 256 the cache's default (centred) keys once needed 256 KB of the H200's 227 KB."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "args,launches",
    [
        (["--head-dim", "256", "--key", "mse3", "mse4", "prod3", "--dtype", "bf16"], 6),  # as stored and centred
        (["--head-dim", "128", "--key", "mse3", "prod3", "--dtype", "bf16", "--centred", "1"], 2),  # 128-row programs
    ],
)
def test_default_encode_launches_fit_an_h200(args, launches):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    env["PYTHONPATH"] = str(BENCHMARKS.parent)
    run = subprocess.run([sys.executable, "launch_resources.py", "--check", *args], cwd=BENCHMARKS, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith(f"| {args[1]} |")]
    assert len(rows) == launches, run.stdout  # every launch compiled and reported
