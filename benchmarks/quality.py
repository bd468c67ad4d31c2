"""Attention-output quality of TurboQuantKVCache against exact attention on the bf16 K/V.

For every configuration (keys: MSE 2/3/4 bits and prod 3/4 bits; values: 2/4 bits, group 32) and context length,
a ``TurboQuantKVCache(KVCacheConfig(head_dim=128, ...), B=1, H_kv=8, dtype=bfloat16)`` receives the context's K/V;
then ``cache.attend(q, causal=False)`` runs N_q = 16 decode queries per query head (H_q = 32, GQA 4:1; the queries
are not part of the cache, so all of them see the whole context). Measured against fp32 SDPA on the same
bf16-rounded q, k, v:

- rel err: ‖o - o_ref‖ / ‖o_ref‖ over the whole output [1, 32, 16, 128];
- cosine: mean over the 32 × 16 output vectors of cos(o, o_ref);
- k cos, v cos (diagnostics): mean cosine of each dequantized key / value with the original bf16 vector;
- compression ratio: bf16 K+V bytes per token per head (2·2·D = 512) over the compressed bytes per token per head,
  the real ``nbytes`` of the cache's code, norm, sign, scale and zero buffers divided by B·H·capacity (capacity =
  context: chunk_size = context).

Two data sets (generators in ``turboquant.demo.synthetic_qkv``, documented there):

- "isotropic": q, k, v i.i.d. Gaussian;
- "llm-like": keys with four outlier channels (two low-frequency RoPE pairs, 10-30x the scale of the rest), a
  non-zero per-channel mean and RoPE (base 10000) across positions; values Gaussian with mild per-channel scales;
  queries at the position after the context, each a RoPE'd query with the keys' channel scaling plus the
  directions of four "needle" keys, so that attention is neither uniform nor one-hot.

What to expect on isotropic data (near-uniform attention, logits ~ N(0, 1)): the output error is about the
per-coordinate error of the stored vectors. 4-bit affine values (group 32) alone give rel err ≈ 0.08 (cos ≈ 0.997);
4-bit MSE keys alone (per-key cos ≈ 1 - 0.0093/2 = 0.9953) give ≈ 0.10 through the logits; together ≈ 0.13
(cos ≈ 0.992). The llm-like keys are much harder: their norms are dominated by the outlier channels while the
content-based (needle) attention lives in the regular channels, and TurboQuant's error scales with the whole norm.

Writes ``quality.csv``, ``quality.md`` and ``quality.png`` (relative error against key bits, largest context) to
``--out``. Run ``python benchmarks/quality.py --quick`` (contexts 1024 and 4096) or without ``--quick`` for
1024, 4096, 16384 and 32768 tokens.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import turboquant  # noqa: F401
except ImportError:  # run from a source tree without installing: the package sits beside benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.demo import DATASETS, DEMO_SETTINGS, OUTLIER_SCALES, exact_attention, output_errors, synthetic_qkv

__all__ = [
    "DEFAULT_CONTEXTS",
    "KEY_CONFIGS",
    "QUICK_CONTEXTS",
    "VALUE_BITS",
    "format_table",
    "main",
    "measure",
    "plot",
    "run",
    "write_csv",
    "write_markdown",
]

KEY_CONFIGS = (("mse", 2), ("mse", 3), ("mse", 4), ("prod", 3), ("prod", 4))
VALUE_BITS = (2, 4)
DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768)
QUICK_CONTEXTS = (1024, 4096)
# cache options of every configuration (--settings)
SETTINGS = {
    "paper": {},
    "centred": dict(center_keys=True),
    "defaults": DEMO_SETTINGS,  # TurboQuantCache's defaults but its 16-bit window
}
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_QUERIES = 32, 8, 128, 16
COLUMNS = (
    "data",
    "config",
    "key_mode",
    "key_bits",
    "value_bits",
    "bits_per_coord",
    "bytes_per_token_head",
    "compression",
    "context",
    "rel_err",
    "cosine",
    "key_cos",
    "value_cos",
)


def config_name(key_mode: str, key_bits: int, value_bits: int) -> str:
    """E.g. 'K3 prod / V2'."""
    return f"K{key_bits} {key_mode} / V{value_bits}"


def bits_label(key_mode: str, key_bits: int, value_bits: int) -> str:
    """Key bits per coordinate (QJL bit shown for prod keys) and value bits, e.g. 'K 3 (2+1 QJL), V 2'."""
    key = f"{key_bits} ({key_bits - 1}+1 QJL)" if key_mode == "prod" else f"{key_bits}"
    return f"K {key}, V {value_bits}"


def measure(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref: torch.Tensor,
    *,
    key_mode: str,
    key_bits: int,
    value_bits: int,
    device: torch.device | str = "cpu",
    settings: dict | None = None,
    prompt_q: torch.Tensor | None = None,
) -> dict:
    """Compress k, v in a TurboQuantKVCache (``settings``: more KVCacheConfig options; ``prompt_q`` [1, H_q, L, D]:
    the prompt's queries, which set the key scales with scale_keys), attend with q, compare with ``ref``.

    q: [1, H_q, N_q, D] bf16; k, v: [1, H_kv, L, D] bf16; ref: [1, H_q, N_q, D] float32 exact attention.
    Returns rel_err, cosine, bytes_per_token_head (everything the cache holds but its two per-sequence lengths:
    nbytes), compression (bf16 / compressed) and,
    as diagnostics, key_cos and value_cos: the mean cosine of each dequantized key / value with the original
    (≈ 1 - D_mse/2 for MSE keys, e.g. 0.9953 at 4 bits).
    """
    b, h_kv, context, d = k.shape
    config = KVCacheConfig(head_dim=d, key_bits=key_bits, value_bits=value_bits, key_mode=key_mode, chunk_size=context,
                           **(settings or {}))  # fmt: skip
    cache = TurboQuantKVCache(config, b, h_kv, device=device, dtype=torch.bfloat16)
    cache.append(k, v, queries=prompt_q)
    if cache.capacity != context:
        raise RuntimeError(f"cache capacity {cache.capacity} != context {context}: the ratio would count padding")
    out = cache.attend(q.float(), after=True)  # a float32 query keeps the output in float32 (no bf16 rounding)
    rel, cos = output_errors(out, ref)
    lengths = cache.seq_lens.nbytes + cache.kv_start.nbytes
    per_token = (cache.nbytes() - lengths) / (b * h_kv * cache.capacity)
    k_hat, v_hat = cache.dequantize()  # diagnostics: per-vector reconstruction of what attention reads
    _, key_cos = output_errors(k_hat, k)
    _, value_cos = output_errors(v_hat, v)
    return dict(
        rel_err=rel,
        cosine=cos,
        key_cos=key_cos,
        value_cos=value_cos,
        bytes_per_token_head=per_token,
        compression=2 * 2 * d / per_token,
    )


def run(
    datasets: tuple[str, ...] = DATASETS,
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    outlier_scales: tuple[float, ...] = OUTLIER_SCALES,
    progress: bool = True,
    settings: str = "paper",
) -> list[dict]:
    """Every (dataset, context, key config, value bits): one row dict with the keys in COLUMNS; ``settings`` names
    the cache options of every configuration (SETTINGS; rows named "... centred" or "... defaults")."""
    from tqdm import tqdm

    configs = [(mode, kb, vb) for mode, kb in KEY_CONFIGS for vb in VALUE_BITS]
    rows = []
    with tqdm(total=len(datasets) * len(contexts) * len(configs), disable=not progress, unit="cfg") as bar:
        for data in datasets:
            for context in contexts:
                bar.set_description(f"{data} L={context}: data")
                extra = SETTINGS[settings]
                q, k, v, *prompt = synthetic_qkv(
                    data,
                    context,
                    NUM_QUERIES,
                    num_q_heads=NUM_Q_HEADS,
                    num_kv_heads=NUM_KV_HEADS,
                    head_dim=HEAD_DIM,
                    seed=seed,
                    outlier_scales=outlier_scales,
                    prompt_queries=extra.get("scale_keys", False),
                )
                q, k, v = q.to(device), k.to(device), v.to(device)
                prompt_q = prompt[0].to(device) if prompt else None
                ref = exact_attention(q, k, v)
                for mode, kb, vb in configs:
                    bar.set_description(f"{data} L={context}: {config_name(mode, kb, vb)}")
                    m = measure(q, k, v, ref, key_mode=mode, key_bits=kb, value_bits=vb, device=device,
                                settings=extra, prompt_q=prompt_q)  # fmt: skip
                    rows.append(
                        dict(
                            data=data,
                            config=config_name(mode, kb, vb) + ("" if settings == "paper" else f" {settings}"),
                            key_mode=mode,
                            key_bits=kb,
                            value_bits=vb,
                            bits_per_coord=bits_label(mode, kb, vb),
                            context=context,
                            **m,
                        )
                    )
                    bar.update()
                del q, k, v, ref, prompt_q
    rows.sort(key=lambda r: (DATASETS.index(r["data"]), r["key_mode"], r["key_bits"], r["value_bits"], r["context"]))
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows as a markdown table."""
    header = ["data", "config", "bits/coord", "B/token/head", "ratio", "context", "rel err", "cosine", "k cos", "v cos"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 7) + "|"]
    for r in rows:
        cells = [
            r["data"],
            r["config"],
            r["bits_per_coord"],
            f"{r['bytes_per_token_head']:.0f}",
            f"{r['compression']:.2f}x",
            f"{r['context']}",
            f"{r['rel_err']:.4f}",
            f"{r['cosine']:.5f}",
            f"{r['key_cos']:.5f}",
            f"{r['value_cos']:.5f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r[c] for c in COLUMNS})


def write_markdown(rows: list[dict], path: Path, *, command: str, elapsed_s: float, device: str) -> None:
    """The table with the date, command, versions and run time above it, so that it can be reproduced."""
    header = (
        f"# TurboQuant KV cache: attention-output quality\n\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- command: `{command}`\n"
        f"- torch {torch.__version__}, Python {platform.python_version()}, device {device}, "
        f"{torch.get_num_threads()} CPU threads\n"
        f"- run time: {elapsed_s:.0f} s\n"
        f"- B=1, H_q={NUM_Q_HEADS}, H_kv={NUM_KV_HEADS}, D={HEAD_DIM}, {NUM_QUERIES} decode queries per head "
        f"(non-causal, not in the cache); values group 32; errors against fp32 attention on the bf16 K/V; "
        f"B/token/head from the cache buffers' nbytes (bf16: 512)\n\n"
    )
    path.write_text(header + format_table(rows) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    """Relative error against key bits, one line per key mode × value bits, the largest context, per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["data"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, data in zip(axes[0], datasets, strict=True):
        sub = [r for r in rows if r["data"] == data]
        context = max(r["context"] for r in sub)
        for mode, style in (("mse", "-o"), ("prod", "--s")):
            for vb in VALUE_BITS:
                pts = sorted(
                    (r["key_bits"], r["rel_err"])
                    for r in sub
                    if r["context"] == context and r["key_mode"] == mode and r["value_bits"] == vb
                )
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{mode} keys, V{vb}")
        ax.set_yscale("log")
        ax.set_xticks(sorted({k for _, k in KEY_CONFIGS}))
        ax.set_xlabel("key bits per coordinate (prod: b-1 MSE + 1 QJL)")
        ax.set_ylabel("attention output ‖o - o_ref‖ / ‖o_ref‖")
        ax.set_title(f"{data}, context {context}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_contexts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"contexts must be integers, got {text!r}") from None
    if not values or min(values) < NUM_QUERIES:
        raise argparse.ArgumentTypeError(f"contexts must be integers >= {NUM_QUERIES}, got {text!r}")
    return values


def main(argv: list[str] | None = None, prog: str | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Attention-output quality of the TurboQuant KV cache (relative error, cosine, compression).",
    )
    parser.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXTS} only")
    parser.add_argument(
        "--contexts",
        type=_parse_contexts,
        default=None,
        help=f"context lengths, comma- or space-separated (default {','.join(map(str, DEFAULT_CONTEXTS))})",
    )
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--out", type=Path, default=Path("results/quality"), help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device of the cache (default cpu)")
    parser.add_argument(
        "--outlier-scales",
        type=float,
        nargs=4,
        default=list(OUTLIER_SCALES),
        metavar="S",
        help="scales of the four outlier key channels of the llm-like data (default %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--settings", choices=list(SETTINGS), default="paper",
                        help="cache options of every configuration: the paper's quantizers, centred keys, or "
                             "TurboQuantCache's defaults but its 16-bit window (centred keys scaled from the "
                             "prompt's queries, 4 exact sink tokens, norm correction)")  # fmt: skip
    args = parser.parse_args(argv)
    contexts = args.contexts or (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS)

    t0 = time.perf_counter()
    rows = run(
        tuple(args.datasets),
        contexts,
        seed=args.seed,
        device=args.device,
        outlier_scales=tuple(args.outlier_scales),
        progress=not args.no_progress,
        settings=args.settings,
    )
    elapsed = time.perf_counter() - t0
    table = format_table(rows)
    print(table)
    print(f"\n{len(rows)} measurements in {elapsed:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join([prog or "python benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    write_csv(rows, args.out / "quality.csv")
    write_markdown(rows, args.out / "quality.md", command=command, elapsed_s=elapsed, device=args.device)
    plot(rows, args.out / "quality.png")
    print(f"wrote {args.out / 'quality.csv'}, {args.out / 'quality.md'}, {args.out / 'quality.png'}")
    return rows


if __name__ == "__main__":
    main()
