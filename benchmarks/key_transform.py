"""How much a linear key transform lowers the logit error of quantized keys, on a real model's keys and queries (CPU).

A quantizer whose error is isotropic with a power proportional to ‖k‖² (TurboQuant's MSE keys) perturbs the logit
q·k by an error of power ∝ E‖k‖²·E‖q‖². Storing A k instead (and attending with A⁻ᵀ q: the logits are unchanged)
makes it ∝ E‖A k‖²·E‖A⁻ᵀ q‖². Three transforms of the centred keys, fitted on the prompt's tokens like
TurboQuantCache's key scales:
- none: A = I;
- per-channel scales (``scale_keys``, TurboQuantCache's default): A = diag(1/s), s_c = (E[k_c²]/E[q_c²])^¼;
- a full matrix: A = M^½ with M = Σ_k⁻¹ # Σ_q (the matrix geometric mean), the minimum over every A of
  E‖A k‖²·E‖A⁻ᵀ q‖² = (Σ_i √λ_i(Σ_k Σ_q))².
Prints, per layer (mean over KV heads), the error power of each transform relative to none, measured on the tokens
after the prompt (out of sample) and on the prompt itself.

Then, for the scaled keys after the prompt, what giving channels different bit widths would do (the paper's outlier
channels, §4.3): each group of channels quantized on its own (its error isotropic within the group, of power
D_b·E‖k_g‖²), relative to 4 bits on every channel, for half the channels at 5 bits and half at 3 (the halves
chosen by the fitted weight √(E[k_c²]E[q_c²]) of each channel), and for the best real-valued bits per channel under
D_b ∝ 4^-b (a bound for any such split at 4 bits on average).

    OMP_NUM_THREADS=1 python benchmarks/key_transform.py --model smollm2 [--offset N]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from models import MODELS, load_model, load_tokens
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from turboquant.codebook import codebook_distortion, get_codebook
from turboquant.demo import DEMO_SETTINGS

# the first tokens, kept exact by TurboQuantCache's default: left out of the statistics
SINKS = DEMO_SETTINGS["sink_tokens"]
GAUSSIAN_D5 = 0.002499  # Lloyd-Max distortion of one N(0, 1) coordinate at 5 bits (Max, 1960): no shipped codebook


def capture(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The queries [H_q, T, D] and keys [H_kv, T, D] (after RoPE) of every layer for one forward over ids [1, T]."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (query[0].detach().double(), key[0].detach().double())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("turboquant_key_transform_probe", recording)
    model.set_attn_implementation("turboquant_key_transform_probe")
    with torch.inference_mode():
        model(ids)
    return seen


def psd_power(a: torch.Tensor, p: float) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=1e-12 * w.max()) ** p) @ v.T


def transforms(k: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """A [D, D] per transform, fitted on centred keys k [N, D] and queries q [M, D] (rows: A k is k @ Aᵀ)."""
    d = k.shape[1]
    sk, sq = k.T @ k / len(k), q.T @ q / len(q)
    eps = 1e-6 * (sk.trace() / d)
    sk = sk + eps * torch.eye(d, dtype=sk.dtype)
    sq = sq + 1e-6 * (sq.trace() / d) * torch.eye(d, dtype=sq.dtype)
    scales = (sk.diagonal() / sq.diagonal()) ** 0.25
    root = psd_power(sk, 0.5)
    inv_root = psd_power(sk, -0.5)
    mean = inv_root @ psd_power(root @ sq @ root, 0.5) @ inv_root  # Σ_k⁻¹ # Σ_q
    return {"none": torch.eye(d, dtype=k.dtype), "scales": torch.diag(1.0 / scales), "full": psd_power(mean, 0.5)}


def error_power(a: torch.Tensor, k: torch.Tensor, q: torch.Tensor) -> float:
    """E‖A k‖²·E‖A⁻ᵀ q‖² over the rows of k and q."""
    ak = k @ a.T
    aq = q @ torch.linalg.inv(a)  # (A⁻ᵀ q)ᵀ = qᵀ A⁻¹
    return (ak.pow(2).sum(1).mean() * aq.pow(2).sum(1).mean()).item()


def bit_split_powers(fit_k, fit_q, out_k, out_q, dist: dict[int, float]) -> tuple[float, float]:
    """(half the channels at 5 bits and half at 3, the best real-valued bits per channel): the logit-error power of
    the scaled keys k/s after the prompt, relative to 4 bits on every channel (see the module docstring)."""
    s = (fit_k.pow(2).mean(0) / fit_q.pow(2).mean(0)) ** 0.25
    a, b = out_k.pow(2).mean(0) / s**2, out_q.pow(2).mean(0) * s**2  # per channel: E[(k/s)²], E[(q·s)²]
    d = len(a)
    uniform = dist[4] / d * a.sum() * b.sum()
    order = torch.argsort(fit_k.pow(2).mean(0) * fit_q.pow(2).mean(0), descending=True)
    top, rest = order[: d // 2], order[d // 2 :]
    split = (dist[5] * a[top].sum() * b[top].sum() + dist[3] * a[rest].sum() * b[rest].sum()) / (d // 2)
    best = dist[4] * d * (a * b).log().mean().exp()  # Σ_c D(b_c)·a_c·b_c at the optimal b_c, mean b_c = 4
    return (split / uniform).item(), (best / uniform).item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--prefill", type=int, default=256, help="prompt tokens the transforms are fitted on")
    ap.add_argument("--tokens", type=int, default=512, help="tokens after the prompt they are measured on")
    ap.add_argument("--offset", type=int, default=0, help="start this many tokens into the text")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model)
    ids = load_tokens(tokenizer, args.prefill + args.tokens, offset=args.offset)
    layers = capture(model, ids)
    p = args.prefill
    print(f"{args.model}, text offset {args.offset}: keys fitted on tokens {SINKS}..{p - 1}, measured on "
          f"{p}..{p + args.tokens - 1} (out of sample) and on the fit tokens; error power relative to "
          "none")  # fmt: skip
    print("| layer | scales, out | full, out | scales, fit | full, fit |\n|---|---|---|---|---|")
    totals: dict[str, list[float]] = {key: [] for key in ("so", "fo", "si", "fi")}
    d = next(iter(layers.values()))[1].shape[-1]
    dist = {b: codebook_distortion(d, get_codebook(d, b)) for b in (3, 4)} | {5: GAUSSIAN_D5}
    splits, bests = [], []
    for i in sorted(layers):
        q, k = layers[i]
        h_kv, group = k.shape[0], q.shape[0] // k.shape[0]
        row: dict[str, list[float]] = {key: [] for key in totals}
        for h in range(h_kv):
            kh, qh = k[h], q[h * group : (h + 1) * group]
            mu = kh[SINKS:p].mean(0)
            fit_k, fit_q = kh[SINKS:p] - mu, qh[:, SINKS:p].reshape(-1, k.shape[-1])
            out_k, out_q = kh[p:] - mu, qh[:, p:].reshape(-1, k.shape[-1])
            a = transforms(fit_k, fit_q)
            for key, (kk, qq) in (("o", (out_k, out_q)), ("i", (fit_k, fit_q))):
                base = error_power(a["none"], kk, qq)
                row["s" + key].append(error_power(a["scales"], kk, qq) / base)
                row["f" + key].append(error_power(a["full"], kk, qq) / base)
            split, best = bit_split_powers(fit_k, fit_q, out_k, out_q, dist)
            splits.append(split)
            bests.append(best)
        means = {key: statistics.mean(v) for key, v in row.items()}
        for key in totals:
            totals[key].append(means[key])
        print(f"| {i} | {means['so']:.3f} | {means['fo']:.3f} | {means['si']:.3f} | {means['fi']:.3f} |")
    mean = {key: statistics.mean(v) for key, v in totals.items()}
    print(f"| mean | {mean['so']:.3f} | {mean['fo']:.3f} | {mean['si']:.3f} | {mean['fi']:.3f} |")
    print(f"scaled keys after the prompt, relative to 4 bits on every channel (median over heads): half the channels "
          f"at 5 bits and half at 3: {statistics.median(splits):.3f}; the best real-valued bits per channel: "
          f"{statistics.median(bests):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
