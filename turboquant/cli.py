"""Command line: ``turboquant {demo,quality,codebooks}`` (also ``python -m turboquant ...``).

- ``demo``: compress a synthetic Llama-3-8B-like layer's KV cache and attend over it (:mod:`turboquant.demo`).
- ``quality``: the attention-quality benchmark, ``benchmarks/quality.py`` of the source tree; every argument after
  ``quality`` is passed to it (``turboquant quality --help`` shows them).
- ``codebooks``: regenerate the shipped Lloyd-Max codebooks (:func:`turboquant.codebook.main`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

__all__ = ["main"]

_QUALITY_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turboquant", description="TurboQuant KV-cache compression (arXiv:2504.19874)."
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,quality,codebooks}", required=True)
    demo = sub.add_parser("demo", help="compress a synthetic layer's KV cache; print compression, quality, speed")
    demo.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    sub.add_parser(
        "quality",
        help="attention-quality benchmark (benchmarks/quality.py; arguments are passed through)",
        add_help=False,  # `turboquant quality --help` shows the benchmark's own options
    )
    codebooks = sub.add_parser("codebooks", help="regenerate the shipped Lloyd-Max codebooks")
    codebooks.add_argument("--out-dir", type=Path, default=None, help="where to write them (default: the package)")
    return parser


def _run_quality(args: list[str]) -> int:
    if not _QUALITY_SCRIPT.is_file():
        print(
            f"error: the quality benchmark ships with the source tree (benchmarks/quality.py), not with the installed "
            f"package; it was not found at {_QUALITY_SCRIPT}. Clone the repository and run "
            f"`python benchmarks/quality.py` there.",
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location("turboquant_benchmarks_quality", _QUALITY_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(args, prog="turboquant quality")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``turboquant`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "quality":
        i = argv.index("quality")  # everything after the subcommand goes to the benchmark, in order
        return _run_quality(argv[i + 1 :])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from .demo import print_demo, run_demo

        print_demo(run_demo(args.device))
        return 0
    if args.command == "codebooks":
        from .codebook import main as codebook_main

        codebook_main([] if args.out_dir is None else ["--out-dir", str(args.out_dir)])
        return 0
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks the choices
    return 2
