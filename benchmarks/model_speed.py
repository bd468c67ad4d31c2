"""End-to-end decode through a transformers model on a GPU: DynamicCache + SDPA vs TurboQuantCache.

A Llama-3-8B-shaped model (32 layers, 32 query / 8 KV heads, head_dim 128, hidden 4096, bf16) is
built from its config with random weights (no download). For each cache and batch, every layer is
filled directly with random K/V up to the context (the compressed cache quantizes them on write),
then decode steps run through ``model(input_ids, cache=cache)`` (``past_key_values=cache`` before transformers
5.2x): one new token per sequence per step. Reported: median step time over timed steps, tokens/s over the batch,
peak GPU memory, the cache's bytes, and for one step the split of its time (decode-attention kernels, other
GPU work, and host time the GPU sits idle). The largest batch that fits is found per cache by
trying batches downwards from an estimate made from the measured bytes per sequence.

Correctness gate first (no speed is printed if it fails): at a small shape, the logits of a decode
step through TurboQuantCache with the fused kernel equal those with the PyTorch reference attention.

    python benchmarks/model_speed.py                      # batch 8 at 32k, then the largest batches
    python benchmarks/model_speed.py --batches 8 --no-max # batch 8 only
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.integrations.transformers import TurboQuantCache, TurboQuantLayer, cache_keyword

# The paper's quantizers (no sink tokens, no key centring or scaling, no norm correction): a decode step merges the
# step's own token inside the decode kernel (TurboQuantKVCache._fused_step). "defaults": TurboQuantCache as a user
# gets it (norm correction, centred and scaled keys, 4 exact sink tokens, also merged inside the kernel); "window R":
# the R most recent tokens (up to R + 63, flushed in blocks of 64) kept in 16 bits, merged there too.
PLAIN = dict(norm_correction=False, center_keys=False, scale_keys=False, sink_tokens=0, residual_window=0)
CACHES = {
    "bf16 DynamicCache + SDPA": None,
    "TurboQuant K4/V4": dict(key_bits=4, value_bits=4, **PLAIN),
    "TurboQuant K3/V2": dict(key_bits=3, value_bits=2, **PLAIN),
    "TurboQuant K4/V4 defaults": dict(key_bits=4, value_bits=4),
    "TurboQuant K3/V2 defaults": dict(key_bits=3, value_bits=2),
    "TurboQuant K4/V4 defaults, window 0": dict(key_bits=4, value_bits=4, residual_window=0),
    "TurboQuant K4/V4 defaults, window 128": dict(key_bits=4, value_bits=4, residual_window=128),
}
# Tokens per sequence and append of the fill: FILL_TOKENS over the batch (4096 at batch 8), a multiple of 256, so
# that the fill's temporaries (the chunk's random k, v and, for the key scales, queries) stay the same size at any
# batch: at 4096-token chunks they were [B, 32, 4096, 128] bf16 queries (3.3 GB at batch 99) beside the filled cache,
# which then decided the largest batch instead of the cache (benchmarks/RESULTS.md, nineteenth session)
FILL_TOKENS = 8 * 4096


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_model(layers: int, tiny: bool = False) -> LlamaForCausalLM:
    """Llama-3-8B shapes with random bf16 weights (``tiny``: a 2-layer stand-in for a CPU smoke run)."""
    hidden, inter, vocab = (256, 512, 1000) if tiny else (4096, 14336, 128256)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=32 if not tiny
        else 8, num_key_value_heads=8 if not tiny else 2, head_dim=128, vocab_size=vocab,
        max_position_embeddings=262144, rope_theta=500000.0, attn_implementation="sdpa",
    )  # fmt: skip
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def filled_cache(model, spec: dict | None, batch: int, context: int, steps: int, seed: int = 0):
    """A cache for ``model`` whose every layer holds ``context`` random tokens per sequence."""
    cfg = model.config
    h, d = cfg.num_key_value_heads, cfg.head_dim
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    if spec is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=cfg)
    else:
        cache = TurboQuantCache(model, **spec)
    if spec is None:
        for i in range(cfg.num_hidden_layers):
            k, v = (torch.randn(batch, h, context, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
                    for _ in range(2))  # fmt: skip
            cache.update(k, v, i)
        return cache
    # every layer's buffers first, then the fill's temporaries: allocated between the layers' buffers, the
    # temporaries left the caching allocator's blocks split around them (H200, 32k context: the largest batch found
    # was 95 for K4/V4 and 137 for K3/V2, against 103 and 152 this way; benchmarks/RESULTS.md)
    layers: list[TurboQuantLayer] = list(cache.layers)
    for layer in layers:
        layer.initialize(batch, h, d, DEVICE, torch.bfloat16, capacity=context + steps)
    for layer in layers:
        fill_store(layer.store, context, gen, cfg.num_attention_heads)
    return cache


def fill_store(store: TurboQuantKVCache, context: int, gen: torch.Generator, num_q_heads: int = 32) -> None:
    """Append ``context`` random bf16 tokens per sequence to a store, in chunks of FILL_TOKENS sequence-tokens
    (temporaries of one size at any batch); with scale_keys, random queries for the first chunk (they set the key
    scales)."""
    shape = (store.batch_size, store.num_kv_heads)
    d = store.config.head_dim
    chunk = max(256, FILL_TOKENS // store.batch_size // 256 * 256)
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        k, v = (torch.randn(*shape, n, d, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(2))
        q = None
        if start == 0 and store.config.scale_keys:
            q = torch.randn(store.batch_size, num_q_heads, n, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        store.append(k, v, queries=q)


def decode_steps(
    model, cache, batch: int, steps: int, seed: int = 1, tokens: int = 1
) -> tuple[list[float], torch.Tensor]:
    """Run ``steps`` decode steps of ``tokens`` new tokens per sequence (more than one: the shape of a speculative
    verification); returns per-step ms and the last logits."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    times, logits = [], None
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device=DEVICE, generator=gen)
        sync()
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache}).logits
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, logits


def step_split(model, cache, batch: int, tokens: int = 1) -> dict[str, float]:
    """One decode step under the profiler: ms of attention kernels, other GPU kernels, and wall time. Only the
    kernel events count (an aten operator's event also carries its kernels' device time). A merge kernel launched
    early (a window's, decode.DEPENDENT_LAUNCHES) runs beside its split kernel's last programs and waits there: its
    duration overlaps the split kernel's, so the attention time overstates the GPU time by that overlap."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.zeros(batch, tokens, dtype=torch.long, device=DEVICE)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
        sync()
        wall = (time.perf_counter() - t0) * 1e3
    attn = other = 0.0
    for e in prof.key_averages():
        gpu_us = e.self_device_time_total
        if e.device_type != torch.autograd.DeviceType.CUDA or gpu_us <= 0:
            continue
        name = e.key.lower()
        if any(part in name for part in ("decode_split", "merge_splits", "merge_window", "flash", "fmha")):
            attn += gpu_us / 1e3
        else:
            other += gpu_us / 1e3
    return dict(wall=wall, attention=attn, other_gpu=other, host_idle=max(0.0, wall - attn - other))


def cache_bytes(cache) -> int:
    if isinstance(cache, TurboQuantCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def free_all() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def correctness_gate(batch: int, context: int) -> float:
    """Max relative error of one layer's decode attention at the benchmark shape, fused kernel vs reference.

    (Through the random-weight model, bf16 rounding of each layer's output amplifies any difference, so
    the attention itself is compared; the model's logits are compared in the output for information.)
    """
    worst = 0.0
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    for name in ("TurboQuant K4/V4", "TurboQuant K3/V2"):
        store = TurboQuantKVCache(KVCacheConfig(head_dim=128, **CACHES[name]), batch, 8, device=DEVICE,
                                  dtype=torch.bfloat16, capacity=context)  # fmt: skip
        fill_store(store, context, gen)
        q = torch.randn(batch, 32, 1, 128, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        out, _ = store.attend_with_lse(q, after=True, backend="triton")
        ref, _ = store.attend_with_lse(q, after=True, backend="reference")
        worst = max(worst, ((out - ref).norm() / ref.norm()).item())
        del store
    free_all()
    return worst


def logits_difference(model) -> float:
    """Relative difference of decode logits through the whole model, fused kernel vs reference (B=2, 2048)."""
    out = {}
    for backend in ("triton", "reference"):
        cache = filled_cache(model, CACHES["TurboQuant K4/V4"], 2, 2048, 4)
        for layer in cache.layers:
            layer.backend = backend
        _, logits = decode_steps(model, cache, 2, 1)
        out[backend] = logits.float()
    return ((out["triton"] - out["reference"]).norm() / out["reference"].norm()).item()


def run(model, name: str, batch: int, context: int, steps: int, tokens: int = 1) -> dict:
    spec = CACHES[name]
    free_all()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cache = filled_cache(model, spec, batch, context, (steps + 3) * tokens)
    fill_s = time.perf_counter() - t0
    times, _ = decode_steps(model, cache, batch, steps + 2, tokens=tokens)
    step_ms = statistics.median(times[2:])
    split = step_split(model, cache, batch, tokens)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    row = dict(cache=name, batch=batch, context=context, step_ms=step_ms, tok_s=batch * tokens / step_ms * 1e3,
               peak_gib=peak, cache_gib=cache_bytes(cache) / 2**30,
               fill_s=fill_s, **split)  # fmt: skip
    del cache
    free_all()
    return row


def largest_batch(model, name: str, context: int, steps: int, per_seq_bytes: float) -> dict | None:
    """Try batches downwards, one at a time, from the most that the free memory could hold at ``per_seq_bytes`` per
    sequence, until one fills and decodes without running out of memory."""
    free, _ = torch.cuda.mem_get_info()
    guess = int(free / per_seq_bytes)
    for batch in range(guess, int(guess * 0.8), -1):
        try:
            return run(model, name, batch, context, steps)
        except torch.cuda.OutOfMemoryError:
            print(f"  {name}: batch {batch} does not fit ({torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free)",
                  flush=True)  # fmt: skip
        free_all()  # after the except clause, whose traceback held the partly filled cache
    return None


def fmt(row: dict) -> str:
    return (f"| {row['cache']} | {row['batch']} | {row['context']} | {row['step_ms']:.2f} | {row['tok_s']:.0f} | "
            f"{row['peak_gib']:.1f} | {row['cache_gib']:.1f} | {row['attention']:.2f} | {row['other_gpu']:.2f} | "
            f"{row['host_idle']:.2f} |")  # fmt: skip


HEADER = ("| cache | batch | context | step ms | tokens/s | peak GiB | cache GiB | attention GPU ms | other GPU ms "
          "| host/idle ms |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batches", type=int, nargs="*", default=[8])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--step-tokens", type=int, default=1,
                    help="new tokens per sequence and step (more than one: a speculative verification's shape; "
                         "tokens/s then counts them all)")  # fmt: skip
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--caches", nargs="*", default=list(CACHES), choices=list(CACHES))
    ap.add_argument("--no-max", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--tiny", action="store_true", help="a small stand-in model (smoke run; CPU allowed)")
    ap.add_argument("--out", type=Path, default=Path("results/model_speed.md"))
    args = ap.parse_args(argv)
    if DEVICE != "cuda" and not args.tiny:
        raise SystemExit("benchmarks/model_speed.py needs a CUDA GPU (or --tiny for a smoke run)")
    torch.set_grad_enabled(False)
    model = build_model(args.layers, args.tiny)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, model {args.layers} layers", flush=True)
    if DEVICE == "cuda":  # (a CPU smoke run has no kernels to check)
        err = correctness_gate(max(args.batches), args.context)
        print(f"gate: one layer's decode attention at ({max(args.batches)}, {args.context}), fused kernel vs "
              f"reference: rel err {err:.2e}; whole-model logits (B=2, 2048 tokens): rel diff "
              f"{logits_difference(model):.2e}", flush=True)  # fmt: skip
        if not err < 2e-3:
            raise SystemExit("correctness gate failed: no speed reported")
    rows = []
    print(HEADER, flush=True)
    for batch in args.batches:
        for name in args.caches:
            rows.append(run(model, name, batch, args.context, args.steps, args.step_tokens))
            print(fmt(rows[-1]), flush=True)
    if not args.no_max and DEVICE == "cuda":
        for name in args.caches:
            small = next(r for r in rows if r["cache"] == name)
            per_seq = small["cache_gib"] * 2**30 / small["batch"]
            row = largest_batch(model, name, args.context, 4, per_seq)
            if row is not None:
                rows.append(row)
                print(fmt(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(HEADER + "\n" + "\n".join(fmt(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
