"""Fused quantize-on-write (kernels.encode) vs copying bf16 K/V into a bf16 cache, on a GPU.

For each shape and configuration: encode bf16 K/V into poisoned cache buffers with the fused
kernel and check the rows against the PyTorch reference (``TurboQuantKVCache._encode``) on the
same GPU (the gate: no speed is printed for a configuration whose check failed), then time with
triton.testing.do_bench (median), called from Python ("encode ms", launch overhead included) and
as a CUDA-graph replay ("graph ms"). GB/s (of the first) counts the bytes the encode must move:
the bf16 K and V read and the packed rows written. The baseline is the same-run copy of the bf16
K/V into a bf16 cache at the same slots (``cache[:, :, slots] = k``, for K and V).

Shapes (H_kv = 8, D = 128 or --head-dim): a 32k-token prefill chunk (B = 1, N = 32768) and decode steps
(B = 16 and 64, N = 1, written at slot 4095 of a 4096-slot cache).

    python benchmarks/encode.py                 # every shape and configuration
    python benchmarks/encode.py --quick         # the prefill chunk and B = 16 decode, shorter timing
    python benchmarks/encode.py --sweep         # also try launch configurations per shape (by graph replays)
    python benchmarks/encode.py --quick --sweep --block-n 64 128 --chunks 64 128 --warps 4 8 \
        --value-block-n 16 32 --value-warps 2 4   # a chosen grid
    python benchmarks/encode.py --quick --kernel-times   # GPU time of the key and the value kernel apart
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from timing import kernel_times, median_ms

from turboquant.cache import KVCacheConfig, TurboQuantKVCache
from turboquant.kernels.encode import LAUNCH_DEFAULTS, SEARCHES, EncodePlan, encode_kv
from turboquant.packing import unpack_key_codes, unpack_planar

CONFIGS = {
    "K4/V4 mse": dict(key_bits=4, value_bits=4, key_mode="mse"),
    "K3/V2 mse": dict(key_bits=3, value_bits=2, key_mode="mse"),
    "K3/V2 prod": dict(key_bits=3, value_bits=2, key_mode="prod"),
}
SHAPES = {"prefill 32k (1, 32768)": (1, 32768, 32768), "decode (16, 1)": (16, 1, 4096), "decode (64, 1)": (64, 1, 4096)}
H_KV, D = 8, 128
COPY_TBPS = 4.26  # H200 device-to-device copy rate measured here (read + write), TB/s
POISON = 0xAB


def fp16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float16 ulps (-1 if either side is not finite or the signs differ)."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()) or ((a >= 0) != (b >= 0)).any():
        return -1
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max()) if a.numel() else 0


def check(cache: TurboQuantKVCache, k, v, bufs: dict, slots: torch.Tensor) -> tuple[bool, str]:
    """The kernel's rows against cache._encode(k, v) on this device.

    Codes may differ only at a decision the reference takes within rounding: a key coordinate
    within 1e-4 of a boundary, a sign with |S r| < 1e-4·‖x‖·‖S_j‖; value codes by one step where the
    reference's scale differs by its last fp16 bit (PyTorch's CUDA division by a Python number
    multiplies by its reciprocal); norms, γ, scales and zeros within one fp16 ulp. At most 1e-3 of
    the coordinates may differ. Untouched slots must keep the poison.
    """
    cfg = cache.config
    d = cfg.head_dim
    mse, kq = cache.mse_quantizer, cache.key_quantizer
    ref = cache._encode(k, v)
    got = {name: t[:, :, slots] for name, t in bufs.items()}
    notes = []
    rest = torch.ones(bufs["key_codes"].shape[2], dtype=torch.bool, device=slots.device)
    rest[slots] = False
    for name, t in bufs.items():
        kept = t[:, :, rest].isnan().all() if t.dtype.is_floating_point else (t[:, :, rest] == POISON).all()
        if not kept:
            notes.append(f"{name}: untouched slots overwritten")
    # stored key codes -> codebook indices (a near tie is then ±1)
    idx_ref = unpack_key_codes(ref["key_codes"], cfg.key_index_bits, d).long()
    idx_got = unpack_key_codes(got["key_codes"], cfg.key_index_bits, d).long()
    bad = idx_ref != idx_got
    frac = bad.float().mean().item()
    if frac > 1e-3:
        notes.append(f"key codes differ at {frac:.2e} of coords")
    elif bad.any():
        xf = k.float()
        coord = mse.rotate(xf / xf.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)) * mse.scale
        far = (coord[bad] - mse.boundaries[torch.minimum(idx_ref, idx_got)[bad]]).abs().max().item()
        if far >= 1e-4 or ((idx_ref - idx_got).abs()[bad] != 1).any():
            notes.append(f"key code differs {far:.1e} from a boundary")
    ok_rows = ~bad.any(-1)
    fp16 = {"key_norms": (got["key_norms"], ref["key_norms"]),
            "value scales": (got["value_affine"][..., 0], ref["value_affine"][..., 0]),
            "value zeros": (got["value_affine"][..., 1], ref["value_affine"][..., 1])}  # fmt: skip
    if cfg.key_mode == "prod":
        fp16["key_rnorms"] = (got["key_rnorms"], ref["key_rnorms"])
    for name, (g, r) in fp16.items():
        sel = ok_rows if name.startswith("key") else slice(None)
        ulps = fp16_ulps(g[sel], r[sel])
        if ulps < 0 or ulps > 1:
            notes.append(f"{name}: {ulps} fp16 ulps")
    c_ref = unpack_planar(ref["value_codes"], cfg.value_bits, d).int()
    c_got = unpack_planar(got["value_codes"], cfg.value_bits, d).int()
    vdiff = (c_ref - c_got).abs()
    if vdiff.max().item() > 1 or (vdiff > 0).float().mean().item() > 1e-3:
        notes.append(f"value codes: max diff {vdiff.max().item()}, {(vdiff > 0).float().mean().item():.2e} differ")
    if cfg.key_mode == "prod":
        s_ref = unpack_planar(ref["key_signs"], 1, d).bool()
        s_got = unpack_planar(got["key_signs"], 1, d).bool()
        flipped = (s_ref != s_got) & ok_rows[..., None]
        if flipped.float().mean().item() > 1e-3:
            notes.append(f"signs differ at {flipped.float().mean().item():.2e}")
        elif flipped.any():
            xf = k.float()
            sr = (xf - mse.unrotate(mse.dequantize_indices(idx_ref, ref["key_norms"]))) @ kq.qjl.T
            rel = (sr.abs() / (xf.norm(dim=-1, keepdim=True) * kq.qjl.norm(dim=-1)))[flipped].max().item()
            if rel >= 1e-4:
                notes.append(f"sign flipped at |S r| = {rel:.1e}·‖x‖‖S_j‖")
    detail = f"{int(bad.sum())} near-tie key codes, {int((vdiff > 0).sum())} value codes ±1"
    return not notes, "; ".join(notes) if notes else detail


def row_bytes(cfg: KVCacheConfig) -> int:
    """Bytes one (token, head) moves: bf16 K and V read, the packed K and V rows written."""
    return 2 * 2 * cfg.head_dim + cfg.bytes_per_token_per_head()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the prefill chunk and the B = 16 decode step, shorter timing")
    ap.add_argument("--sweep", action="store_true", help="try block_n / chunk / num_warps per shape")
    ap.add_argument("--block-n", nargs="*", type=int, default=[32, 64, 128], help="key rows per program (sweep)")
    ap.add_argument("--chunks", nargs="*", type=int, default=[32, 64, 128], help="rotation column chunks (sweep)")
    ap.add_argument("--warps", nargs="*", type=int, default=[4, 8], help="key kernel warps (sweep)")
    ap.add_argument("--value-block-n", nargs="*", type=int, default=[LAUNCH_DEFAULTS["value_block_n"]],
                    help="value rows per program (sweep)")  # fmt: skip
    ap.add_argument("--caps", nargs="*", type=int, default=[0],
                    help="register caps per thread of the key kernel (sweep; 0: none)")  # fmt: skip
    ap.add_argument("--value-warps", nargs="*", type=int, default=[0],
                    help="value kernel warps (sweep; 0: the default, 2 or 4 at head_dim 256)")  # fmt: skip
    ap.add_argument("--prefill-only", action="store_true", help="only the 32k-token prefill chunk")
    ap.add_argument("--kernel-times", action="store_true",
                    help="also print each kernel's GPU time (torch.profiler) at the chosen launch")  # fmt: skip
    ap.add_argument("--searches", nargs="*", default=[], choices=SEARCHES,
                    help="codebook searches to time (default: encode_kv's per-configuration choice)")  # fmt: skip
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--head-dim", type=int, default=D, choices=(64, 128, 256))
    ap.add_argument(
        "--centred",
        action="store_true",
        help="keys centred and scaled per channel in the kernel, and norm correction (TurboQuantCache's defaults)",
    )
    ap.add_argument("--out", type=Path, default=Path("results/encode.md"))
    args = ap.parse_args(argv)
    d = args.head_dim
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/encode.py needs a CUDA GPU")
    import triton

    shapes = {name: SHAPES[name] for name in list(SHAPES)[: 1 if args.prefill_only else 2 if args.quick else 3]}
    rep_ms = 50 if args.quick else 200
    launches = [{"search": s} for s in args.searches] or [{}]
    if args.sweep:
        launches = [
            dict(block_n=bn, chunk=ch, num_warps=w, search=s, value_block_n=vbn, value_num_warps=vw, max_registers=cap)
            for s in args.searches or [None]
            for cap in args.caps
            for bn in args.block_n
            for ch in args.chunks
            for w in args.warps
            for vbn in args.value_block_n
            for vw in args.value_warps
        ]
    gen = torch.Generator(device="cuda").manual_seed(0)
    header = (
        "| shape (B, N) | config | encode ms | graph ms | GB/s | floor ms (4.26 TB/s) | bf16 copy ms | copy GB/s | "
        "encode / copy | check | launch |"
    )
    print(header, flush=True)
    rows = []
    for shape_name, (batch, n, capacity) in shapes.items():
        k = torch.randn(batch, H_KV, n, d, device="cuda", generator=gen).to(torch.bfloat16)
        v = torch.randn(batch, H_KV, n, d, device="cuda", generator=gen).to(torch.bfloat16)
        slots = torch.arange(capacity - n, capacity, device="cuda")
        k_cache = torch.zeros(batch, H_KV, capacity, d, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)

        def copy(k=k, v=v, slots=slots, k_cache=k_cache, v_cache=v_cache):
            k_cache[:, :, slots] = k
            v_cache[:, :, slots] = v

        t_copy = median_ms([copy], rep_ms)
        copy_bytes = 2 * 2 * (batch * H_KV * n * d * 2)
        for name in args.configs:
            cfg = KVCacheConfig(head_dim=d, norm_correction=args.centred, **CONFIGS[name])
            cache = TurboQuantKVCache(cfg, batch, H_KV, device="cuda", dtype=torch.bfloat16, capacity=capacity)
            bufs = {key: t for key, t in cache.buffers().items() if key in cache._buffer_specs()}
            kw = dict(key_quantizer=cache.key_quantizer, value_quantizer=cache.value_quantizer, check_slots=False)
            k_ref = k
            if args.centred:  # keys stored as (k - μ) / s in float32, as TurboQuantCache's defaults store them
                kw["key_mean"] = torch.randn(batch, H_KV, d, device="cuda", generator=gen) * 0.5
                kw["key_scale"] = torch.exp(0.5 * torch.randn(batch, H_KV, d, device="cuda", generator=gen))
                k_ref = (k.float() - kw["key_mean"][:, :, None]) / kw["key_scale"][:, :, None]
            for t in bufs.values():
                t.fill_(float("nan") if t.dtype.is_floating_point else POISON)
            encode_kv(k, v, bufs, slots, **kw)
            torch.cuda.synchronize()
            ok, detail = check(cache, k_ref, v, bufs, slots)
            moved = batch * H_KV * n * row_bytes(cfg)
            floor_ms = moved / (COPY_TBPS * 1e9)
            best = None
            if ok:
                sweep = len(launches) > 1  # launches compared by graph replays: the GPU's time, not the host's
                for launch in launches:
                    step = functools.partial(encode_kv, k, v, bufs, slots, **kw, **launch)
                    try:
                        t = median_ms([step], rep_ms, graphs=sweep)
                    except ValueError as err:  # a launch that does not fit this GPU (encode_kv names it)
                        print(f"  sweep {shape_name} {name} {launch}: {err}", flush=True)
                        continue
                    if sweep:
                        print(f"  sweep {shape_name} {name} {launch}: {t:.4f} ms (graph)", flush=True)
                    if best is None or t < best[0]:
                        best = (t, launch)
                best_step = functools.partial(encode_kv, k, v, bufs, slots, **kw, **best[1])
                t_graph = median_ms([best_step], rep_ms, graphs=True)
                if sweep:
                    best = (median_ms([best_step], rep_ms), best[1])
                if args.kernel_times:
                    print(f"  kernels {shape_name} {name} {best[1]}: {kernel_times(best_step)}", flush=True)
            if best is None:
                line = (
                    f"| {shape_name} | {name} | CHECK FAILED | - | - | {floor_ms:.4f} | {t_copy:.4f} | "
                    f"{copy_bytes / t_copy / 1e6:.0f} | - | {detail} | - |"
                )
            else:
                t, launch = best
                label = EncodePlan(
                    k,
                    v,
                    bufs,
                    key_quantizer=cache.key_quantizer,
                    value_quantizer=cache.value_quantizer,
                    launch={**LAUNCH_DEFAULTS, **launch},
                    centred=args.centred,
                    scaled=args.centred,
                ).label
                line = (
                    f"| {shape_name} | {name} | {t:.4f} | {t_graph:.4f} | {moved / t / 1e6:.0f} | {floor_ms:.4f} | "
                    f"{t_copy:.4f} | "
                    f"{copy_bytes / t_copy / 1e6:.0f} | {t / t_copy:.2f}x | ok ({detail}) | "
                    f"{label} |"
                )
            print(line, flush=True)
            rows.append(line)
            del cache, bufs
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    args.out.write_text(
        f"# encode benchmark, {stamp}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}\n\n" + header + "\n|" + "---|" * 11 + "\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
