"""``python -m turboquant demo``: compress one attention layer's KV cache and attend over it.

Synthetic K/V with the structure of a Llama-3-8B layer (B=1, H_q=32, H_kv=8, D=128, 4096 tokens of context, fixed
seed) go into a :class:`~turboquant.cache.TurboQuantKVCache` at K4/V4 and K3/V2 (MSE keys); one decode query attends
over each cache. The demo prints the bytes of the bf16 cache and of the compressed store (from the buffers' real
``nbytes``), the compression ratio, the attention output's cosine similarity and relative error against exact
attention on the bf16 K/V, and the time per ``attend`` call. On a GPU the cache attends with the fused Triton decode
kernel and torch SDPA on the bf16 K/V is timed beside it as the baseline; on a CPU only the reference PyTorch path
runs, and its time says nothing about the fused path.

The synthetic data generators live here too (:func:`synthetic_qkv`, :func:`rope`), so that the demo needs nothing
outside the package; ``benchmarks/quality.py`` uses the same generators.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch

from .cache import KVCacheConfig, TurboQuantKVCache

__all__ = [
    "DATASETS",
    "OUTLIER_CHANNELS",
    "OUTLIER_SCALES",
    "exact_attention",
    "output_errors",
    "print_demo",
    "rope",
    "run_demo",
    "synthetic_qkv",
]

DATASETS = ("isotropic", "llm-like")
# Two RoPE pairs (j, j + D/2) at low frequency; channels given for D = 128 and scaled to other D.
OUTLIER_CHANNELS = (40, 104, 56, 120)
OUTLIER_SCALES = (10.0, 15.0, 20.0, 30.0)


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Standard (Llama, rotate-half) rotary embedding: channel j and j + D/2 rotate by angle p · base^(-2j/D).

    x: [..., N, D] float32; positions: [N] -> [..., N, D] float32.
    """
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [D/2]
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [N, D/2]
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).float()  # [N, D]
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1).float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _outlier_channels(head_dim: int) -> list[int]:
    return [c * head_dim // 128 for c in OUTLIER_CHANNELS]


def synthetic_qkv(
    kind: str,
    context: int,
    n_queries: int,
    *,
    batch: int = 1,
    num_q_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    seed: int = 0,
    query_position: int | None = None,
    outlier_scales: tuple[float, ...] = OUTLIER_SCALES,
    prompt_queries: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Synthetic queries, keys and values in bfloat16.

    Returns q ``[B, H_q, N_q, D]`` and k, v ``[B, H_kv, L, D]`` (L = ``context``), generated in float32 with a
    ``torch.Generator`` seeded by ``seed`` and rounded to bfloat16. Query head h belongs to KV head h // (H_q / H_kv).
    With ``prompt_queries`` also the queries of the context's own positions, ``[B, H_q, L, D]`` (what a model's
    prefill hands the cache; drawn after q, k, v, which stay the same): i.i.d. N(0, 1) for ``"isotropic"``; for
    ``"llm-like"`` queries made as below at positions 0 .. L-1, each with four needles of its own.

    ``kind="isotropic"``: q, k, v i.i.d. N(0, 1). Attention logits are then N(0, 1) (after the 1/√D scale): nearly
    uniform attention, the easy case for the rotation-based quantizers (their analysis assumes no structure).

    ``kind="llm-like"``: the structure real LLM keys have, which a quantizer must survive.

    - Keys, per KV head, before RoPE: ``k = s ⊙ (z + m)`` with z ~ N(0, I). The channel scale s is
      exp(0.3·N(0, 1)) for regular channels and ``outlier_scales`` (default 10, 15, 20, 30) for four outlier
      channels (``OUTLIER_CHANNELS``: two RoPE pairs (j, j + D/2) at low frequency, so the outliers persist across
      positions as they do in real models). The per-channel mean m is 0.5·N(0, 1) for regular channels and ±1 for
      outlier channels (a consistent sign, as in real models). Key norms are therefore dominated by the outliers
      (≈ 55 against ≈ 13 for the regular part; ≈ 150 with outlier scales 10, 25, 50, 100). Then RoPE (base 10000,
      rotate-half) at positions 0 .. L-1.
    - Values: ``v = σ ⊙ z`` with a per-channel, per-head σ = exp(0.25·N(0, 1)) (mild scale variation).
    - Queries, all at position ``query_position`` (default L, the decode token after the context), each the sum of
      two parts, so that attention is neither uniform nor one-hot:
        * a positional part: RoPE of ``s ⊙ z_q`` (the keys' channel scaling, outliers included), scaled so that its
          logits over the context have standard deviation 1.5 (smooth, position-dependent attention);
        * a retrieval part: the sum of four "needle" keys' unit directions (each needle's centred key, outlier
          channels removed, normalised), scaled so that each needle's logit rises by Δ = ln(L/4) + 1.5²/2 + U(-2, 2),
          which gives the needles about half of the attention mass at every context length.
    """
    if kind not in DATASETS:
        raise ValueError(f"kind must be one of {DATASETS}, got {kind!r}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if len(outlier_scales) != len(OUTLIER_CHANNELS):
        raise ValueError(f"outlier_scales must hold {len(OUTLIER_CHANNELS)} values, got {outlier_scales!r}")
    g = torch.Generator().manual_seed(seed)
    b, h_kv, d, n = batch, num_kv_heads, head_dim, context
    group = num_q_heads // num_kv_heads

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    if kind == "isotropic":
        q, k, v = randn(b, num_q_heads, n_queries, d), randn(b, h_kv, n, d), randn(b, h_kv, n, d)
        if prompt_queries:
            return q.bfloat16(), k.bfloat16(), v.bfloat16(), randn(b, num_q_heads, n, d).bfloat16()
        return q.bfloat16(), k.bfloat16(), v.bfloat16()

    outliers = _outlier_channels(d)
    scale = torch.exp(0.3 * randn(b, h_kv, 1, d))
    mean = 0.5 * randn(b, h_kv, 1, d)
    scale[..., outliers] = torch.tensor(outlier_scales, dtype=torch.float32)
    mean[..., outliers] = torch.sign(randn(b, h_kv, 1, len(outliers)))
    positions = torch.arange(n)
    k = rope(scale * (randn(b, h_kv, n, d) + mean), positions)  # [B, H_kv, L, D]
    v = torch.exp(0.25 * randn(b, h_kv, 1, d)) * randn(b, h_kv, n, d)
    k = k.bfloat16().float()  # the queries are calibrated against the keys the model would store

    q_pos = torch.full((1,), n if query_position is None else query_position)
    sm_scale = 1.0 / math.sqrt(d)
    # Positional part, per query: [B, H_kv, G·N_q, D], calibrated on its logit spread over the context.
    base = rope(scale * randn(b, h_kv, group * n_queries, d), q_pos)
    base_logits = sm_scale * base @ k.transpose(-1, -2)  # [B, H_kv, G·N_q, L]
    spread = 1.5 / base_logits.std(dim=-1, keepdim=True)  # [B, H_kv, G·N_q, 1]
    base = base * spread
    # Retrieval part: four needles per query, regular channels of the centred key.
    n_needles = min(4, n)
    regular = torch.ones(d)
    regular[outliers] = 0.0
    centred = (k - k.mean(dim=2, keepdim=True)) * regular  # [B, H_kv, L, D]
    needles = torch.randint(0, n, (b, h_kv, group * n_queries, n_needles), generator=g)
    bi = torch.arange(b).view(b, 1, 1, 1)
    hi = torch.arange(h_kv).view(1, h_kv, 1, 1)
    picked = centred[bi, hi, needles]  # [B, H_kv, G·N_q, n_needles, D]
    norms = picked.norm(dim=-1, keepdim=True)
    retrieval = (picked / norms).sum(dim=3)  # [B, H_kv, G·N_q, D]
    delta = math.log(n / n_needles) + 1.5**2 / 2 + 4 * torch.rand(b, h_kv, group * n_queries, 1, generator=g) - 2
    retrieval = retrieval * delta / (sm_scale * norms.mean(dim=3))
    q = (base + retrieval).reshape(b, num_q_heads, n_queries, d)
    if prompt_queries:  # the same two parts at every context position (the spread's mean as calibration)
        prompt = rope(scale[:, :, None] * randn(b, h_kv, group, n, d), positions)  # [B, H_kv, G, L, D]
        prompt = (prompt * spread.mean(dim=2)[:, :, None, None]).reshape(b, h_kv, group * n, d)
        picks = torch.randint(0, n, (b, h_kv, group * n, n_needles), generator=g)
        found, norm_sum = torch.zeros_like(prompt), torch.zeros(b, h_kv, group * n, 1)
        for j in range(n_needles):
            picked = centred[bi, hi, picks[..., j : j + 1]][:, :, :, 0]  # [B, H_kv, G·L, D]
            norms = picked.norm(dim=-1, keepdim=True)
            found += picked / norms
            norm_sum += norms
        delta = math.log(n / n_needles) + 1.5**2 / 2 + 4 * torch.rand(b, h_kv, group * n, 1, generator=g) - 2
        prompt += found * delta / (sm_scale * norm_sum / n_needles)
        return q.bfloat16(), k.bfloat16(), v.bfloat16(), prompt.reshape(b, num_q_heads, n, d).bfloat16()
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention in float32 on the given (bf16-rounded) inputs, GQA without repeating K/V.

    q: [B, H_q, N_q, D]; k, v: [B, H_kv, L, D] -> [B, H_q, N_q, D] float32.
    """
    b, h_q, n_q, d = q.shape
    h_kv = k.shape[1]
    qg = q.float().reshape(b, h_kv, (h_q // h_kv) * n_q, d)  # query heads of one KV head stacked
    out = torch.nn.functional.scaled_dot_product_attention(qg, k.float(), v.float())
    return out.reshape(b, h_q, n_q, d)


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(‖out - ref‖ / ‖ref‖ over the whole tensor, mean cosine similarity of the [..., D] output vectors)."""
    out, ref = out.float(), ref.float()
    rel = float((out - ref).norm() / ref.norm())
    cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())
    return rel, cos


def _time_cpu(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _time_cuda(fn: Callable[[], object]) -> float:
    """Median GPU time of fn() in milliseconds: triton.testing.do_bench if importable, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, return_mode="median"))
    for _ in range(5):
        fn()
    times = []
    for _ in range(50):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


DEMO_CONFIGS = (("K4/V4 (mse)", 4, 4), ("K3/V2 (mse)", 3, 2))
# TurboQuantCache's defaults (integrations.transformers) but its 16-bit window of recent tokens: every token past the
# sinks quantized, so that the demo's figures are those of the compressed store
DEMO_SETTINGS = dict(norm_correction=True, center_keys=True, scale_keys=True, sink_tokens=4)


def run_demo(device: torch.device | str | None = None) -> dict:
    """Compress a synthetic Llama-3-8B-like layer's KV cache (4096 tokens) at K4/V4 and K3/V2; attend once.

    The cache takes TurboQuantCache's default settings but its 16-bit window (DEMO_SETTINGS; the key scales from
    the prompt's queries).
    On CUDA the cache attends with the fused Triton decode kernel (``backend="triton"``) when triton imports, else
    with the reference PyTorch path. Returns a dict with the shape, device, ``backend``, ``sdpa_ms`` (bf16 SDPA time on
    a GPU, else None) and ``results``: one
    dict per configuration with ``bf16_bytes``, ``compressed_bytes`` (everything the cache holds: nbytes),
    ``store_bytes`` (the compressed store's buffers), ``ratio`` (bf16 over compressed bytes), ``cosine``,
    ``rel_err`` and ``attend_ms``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    b, h_q, h_kv, d, context = 1, 32, 8, 128, 4096
    q, k, v, prompt_q = synthetic_qkv("llm-like", context, 1, batch=b, num_q_heads=h_q, num_kv_heads=h_kv,
                                      head_dim=d, seed=0, prompt_queries=True)  # fmt: skip
    q, k, v, prompt_q = q.to(device), k.to(device), v.to(device), prompt_q.to(device)
    ref = exact_attention(q, k, v)
    bf16_bytes = k.numel() * k.element_size() + v.numel() * v.element_size()
    on_gpu = device.type == "cuda"
    timer = _time_cuda if on_gpu else _time_cpu
    backend = "triton" if on_gpu and _triton_available() else "reference"

    results = []
    for name, key_bits, value_bits in DEMO_CONFIGS:
        config = KVCacheConfig(head_dim=d, key_bits=key_bits, value_bits=value_bits, chunk_size=context,
                               **DEMO_SETTINGS)  # fmt: skip
        cache = TurboQuantKVCache(config, b, h_kv, device=device, dtype=torch.bfloat16)
        cache.append(k, v, queries=prompt_q)
        out = cache.attend(q, after=True, backend=backend)  # decode: the query comes after every cached token
        rel, cos = output_errors(out, ref)
        compressed = cache.nbytes()
        results.append(
            dict(
                config=name,
                key_bits=key_bits,
                value_bits=value_bits,
                bf16_bytes=bf16_bytes,
                compressed_bytes=compressed,
                store_bytes=cache.store_nbytes(),
                ratio=bf16_bytes / compressed,
                cosine=cos,
                rel_err=rel,
                attend_ms=timer(lambda cache=cache: cache.attend(q, after=True, backend=backend)),
            )
        )

    sdpa_ms = None
    if on_gpu:
        group = h_q // h_kv
        qg = q.reshape(b, h_kv, group, d)  # the GQA query heads of one KV head as its query rows
        sdpa_ms = _time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(qg, k, v))
    return dict(
        shape=dict(batch=b, num_q_heads=h_q, num_kv_heads=h_kv, head_dim=d, context=context),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if on_gpu else "cpu",
        torch_version=torch.__version__,
        backend=backend,
        sdpa_ms=sdpa_ms,
        results=results,
    )


def print_demo(report: dict) -> None:
    """Print :func:`run_demo`'s report as a short table."""
    s = report["shape"]
    print(
        f"TurboQuant demo: one Llama-3-8B-like attention layer, synthetic llm-like K/V (outlier channels, RoPE)\n"
        f"  B={s['batch']}, H_q={s['num_q_heads']}, H_kv={s['num_kv_heads']}, D={s['head_dim']}, "
        f"context={s['context']} tokens, one decode query; device: {report['device_name']}, "
        f"torch {report['torch_version']}\n"
        f"  settings: TurboQuantCache's defaults but its 16-bit window (centred keys scaled per channel from the "
        f"prompt's queries, 4 exact sink tokens, norm correction; every other token quantized)\n"
    )
    header = (
        f"{'config':<12} {'bf16 KV':>10} {'compressed':>11} {'ratio':>6} {'cosine':>8} {'rel err':>8} {'attend':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        print(
            f"{r['config']:<12} {_mib(r['bf16_bytes']):>10} {_mib(r['compressed_bytes']):>11} {r['ratio']:>5.2f}x "
            f"{r['cosine']:>8.5f} {r['rel_err']:>8.4f} {r['attend_ms']:>7.2f} ms"
        )
    print(
        "\ncompressed = everything the cache holds (nbytes: codes, norms, scales and zeros, the exact sink tokens, "
        "the key mean and scales); errors against exact fp32 attention on the bf16 K/V."
    )
    if report["sdpa_ms"] is None:
        print("attend time: reference PyTorch path on CPU. no GPU: speed not measured on the fused path.")
        return
    path = "fused Triton decode kernel" if report["backend"] == "triton" else "reference PyTorch path (no triton)"
    print(f"GPU timing (median of repeated calls), attend = cache.attend on the {path}:")
    print(f"  torch SDPA on the bf16 K/V (baseline): {report['sdpa_ms'] * 1e3:8.1f} us")
    for r in report["results"]:
        print(
            f"  {r['config']:<12} cache.attend:        {r['attend_ms'] * 1e3:8.1f} us "
            f"({report['sdpa_ms'] / r['attend_ms']:.2f}x the speed of bf16 SDPA)"
        )


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> dict:
    """Run the demo and print it (``argv`` accepts ``--device``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="turboquant demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    report = run_demo(args.device)
    print_demo(report)
    return report


if __name__ == "__main__":
    main()
