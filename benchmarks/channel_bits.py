"""Uneven bits over key channel groups, studied by fake quantization inside a real model (CPU).

Not the cache: a registered attention function replaces each stored key by its reconstruction, so that key
quantizers the cache does not have can be compared on the model_quality protocol's numbers. One forward over P + T
tokens of text; queries at positions < P attend exactly (the prefill); a query at t >= P attends to the
reconstructions of every earlier key and to its own key exactly, which is what the step-by-step protocol computes
(position t's hidden states come from the same attention), in float64; sliding-window layers see their window.
Keys as TurboQuantCache's defaults prepare them: centred by the prompt's mean key, divided per channel by the key
scales fitted on the prompt's keys and queries, the first SINKS tokens exact, norm correction. Then either
- ``uniform``: TurboQuant MSE (Haar rotation, Lloyd-Max codebook) at 4 bits over all D channels, or
- ``halves``: the D channels split in two by the fitted weight √(E[k̃_c²]E[q_c²]) of each channel, the heavier half
  at 5 bits and the other at 3 (each half its own rotation, codebook and norm: 4 bits on average, one more norm per
  key), or
- ``qdir1``, ``qdir2``: uniform, plus each key's projection on the top 1 or 2 eigenvectors u of the prompt's scaled
  queries' second moment Σ q qᵀ stored exactly (fp16), so that a score's quantization error is only that of the
  query's part orthogonal to u (one or two more scalars per key), or
- ``halves_qdir1``: halves, plus the projection on the top query direction as in qdir1, or
- ``heads``: 5, 4 and 3 bits over each layer's KV heads (the upper half of an even count at 5 bits, the lower at 3),
  ranked by their sensitivity on the prompt: E[‖q s‖² (1 - Σ p²)] · E[‖k̃ / s‖²] (the logit-noise power of an
  isotropic key error, times how much the softmax moves with it), or
- ``plain``, ``proj``: uniform with another stored norm in place of norm correction's ‖x‖ / ‖ĉ‖ (ĉ = c[idx] / √d,
  the reconstructed unit vector in the rotated basis): ``plain`` ‖x‖ (the paper's), ``proj`` ‖x‖ / ⟨Π u, ĉ⟩, which
  makes the reconstruction's projection on the key's own direction exact (no shrinkage of ⟨q, k⟩ along k), or
- ``recentR`` (R = 2, 8, 32): uniform, but each query sees its R most recent keys and values exact (where the error
  that remains without a full-precision window comes from), or ``attendedR`` (R = 8, 32): uniform, but per head the R
  tokens that the queries after the prompt attend to most (an oracle: measured with the exact keys) exact.
Values exact, or 4-bit per-group affine (ValueQuantizer, groups of 32). Prints KL(16-bit ‖ method) of the
next-token distributions over the T positions, and perplexity, for each.

    OMP_NUM_THREADS=1 python benchmarks/channel_bits.py --model smollm2 [--offset N] [--methods uniform proj ...]
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
from models import MODELS, load_model, load_tokens
from transformers import AttentionInterface

from turboquant.codebook import generate_lloyd_max_codebook
from turboquant.demo import DEMO_SETTINGS
from turboquant.quantizers import ValueQuantizer
from turboquant.rotation import get_rotation_matrix

SINKS = DEMO_SETTINGS["sink_tokens"]  # TurboQuantCache's default
# method -> (bits over the channels: "uniform" 4 or "halves" 5/3; the stored norm, see fake_quantize; the number of
# top query directions along which each key's projection is stored exactly)
METHODS = {
    "uniform": ("uniform", "nc", 0),
    "halves": ("halves", "nc", 0),
    "qdir1": ("uniform", "nc", 1),
    "qdir2": ("uniform", "nc", 2),
    "plain": ("uniform", "plain", 0),
    "proj": ("uniform", "proj", 0),
    "halves_qdir1": ("halves", "nc", 1),
    "heads": ("heads", "nc", 0),
}
# method -> (which tokens are exact besides the sinks: "recent" keys of each query or the most "attended", how many)
TOKEN_METHODS = {"recent2": ("recent", 2), "recent8": ("recent", 8), "recent32": ("recent", 32),
                 "attended8": ("attended", 8), "attended32": ("attended", 32)}  # fmt: skip


@functools.cache
def _codebook(d: int, bits: int) -> torch.Tensor:
    return generate_lloyd_max_codebook(d, bits).double()


def fake_quantize(x: torch.Tensor, bits: int, norm: str = "nc") -> torch.Tensor:
    """TurboQuant MSE (fp16 norms) of the rows of x [..., d] float64: the reconstruction ĉ Π · n, ĉ = c[idx] / √d,
    with the stored norm n = ‖x‖ / ‖ĉ‖ (norm correction, "nc": ‖x̂‖ = ‖x‖), ‖x‖ ("plain") or ‖x‖ / ⟨Π u, ĉ⟩
    ("proj": ⟨x̂, u⟩ = ‖x‖ for the unit vector u = x / ‖x‖)."""
    d = x.shape[-1]
    rot = get_rotation_matrix(d).double()
    norms = x.norm(dim=-1, keepdim=True)
    y = (x / norms.clamp_min(1e-300)) @ rot.T * math.sqrt(d)
    c = _codebook(d, bits)
    unit = c[torch.bucketize(y, (c[1:] + c[:-1]) / 2)] / math.sqrt(d)  # ĉ
    if norm == "nc":
        norms = norms / unit.norm(dim=-1, keepdim=True)
    elif norm == "proj":
        norms = norms / (unit * y / math.sqrt(d)).sum(-1, keepdim=True)
    return (unit @ rot) * norms.half().double()


class Study:
    """The registered attention: exact for the prompt's queries, reconstructed past keys (and values) after it."""

    def __init__(self, prompt: int):
        self.prompt, self.method, self.values, self.scale, self.attended = prompt, None, None, 1.0, None

    def keys(self, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Reconstructed keys of one layer: k [H_kv, N, D], q [H_kv, G, N, D] float64."""
        p = self.prompt
        mu = k[:, :p].mean(1, keepdim=True)
        kc = k - mu
        k2, q2 = kc[:, :p].pow(2).mean(1), q[:, :, :p].pow(2).mean((1, 2))  # [H_kv, D]
        k2 = k2 + 1e-6 * k2.mean(-1, keepdim=True) + 1e-300  # as TurboQuantKVCache._key_scales: no zero channel
        q2 = q2 + 1e-6 * q2.mean(-1, keepdim=True) + 1e-300
        s = (k2 / q2) ** 0.25
        ks = kc / s[:, None]
        split, norm, directions = METHODS.get(self.method, METHODS["uniform"])
        if split == "uniform":
            rec = fake_quantize(ks, 4, norm)
        elif split == "heads":  # bits by head: the logit-error sensitivity of each KV head on the prompt
            qs = q[:, :, :p] * s[:, None, None]  # [H_kv, G, P, D] scaled queries
            causal = torch.arange(p)[None, :] <= torch.arange(p)[:, None]
            probs = (torch.einsum("hgtd,hid->hgti", q[:, :, :p], k[:, :p]) * self.scale).masked_fill(
                ~causal, float("-inf")).softmax(-1)  # fmt: skip
            spread = 1 - probs.pow(2).sum(-1)  # [H_kv, G, P]: 1 - Σ p², the softmax's sensitivity to logit noise
            weight = (qs.pow(2).sum(-1) * spread).mean((1, 2)) * ks[:, :p].pow(2).sum(-1).mean(1)  # [H_kv]
            ranks = torch.argsort(torch.argsort(weight, descending=True))  # 0 = the most sensitive head
            h_kv = k.shape[0]
            rec = torch.empty_like(ks)
            for h in range(h_kv):
                r = int(ranks[h])
                bits = 4 if h_kv == 1 or (h_kv % 2 and r == h_kv // 2) else (5 if r < h_kv / 2 else 3)
                rec[h] = fake_quantize(ks[h], bits, norm)
        else:
            rec = torch.empty_like(ks)
            order = torch.argsort(k2 * q2, dim=-1, descending=True)
            half = k.shape[-1] // 2
            for h in range(k.shape[0]):
                for channels, bits in ((order[h, :half], 5), (order[h, half:], 3)):
                    rec[h][:, channels] = fake_quantize(ks[h][:, channels], bits, norm)
        if directions:  # plus ⟨u, k⟩ exact (fp16) along the top query directions u
            qs = (q[:, :, :p] * s[:, None, None]).reshape(k.shape[0], -1, k.shape[-1])  # [H_kv, G·P, D] scaled queries
            u = torch.linalg.eigh(qs.transpose(1, 2) @ qs).eigenvectors[..., -directions:]  # [H_kv, D, r]
            a = (ks @ u).half().double()  # the stored projections
            rec = rec + (a - rec @ u) @ u.transpose(1, 2)
        rec = rec * s[:, None] + mu
        rec[:, :SINKS] = k[:, :SINKS]
        tokens, count = TOKEN_METHODS.get(self.method, (None, 0))
        if tokens == "attended":  # the oracle: the tokens with the most attention mass after the prompt, exact
            n = k.shape[1]
            scores = torch.einsum("hgnd,hmd->hgnm", q, k) * self.scale
            causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
            mass = scores.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, p:].sum((1, 2))  # [H_kv, N]
            mass[:, :SINKS] = -1.0
            self.attended = mass.topk(count, dim=-1).indices  # [H_kv, count]: their values are exact too
            for h, top in enumerate(self.attended):
                rec[h, top] = k[h, top]
        return rec

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k, v = query[0].double(), key[0].double(), value[0].double()  # [H, N, D]
        h_q, n, d = q.shape
        g = h_q // k.shape[0]
        self.scale = scaling if scaling is not None else d**-0.5
        tokens, count = TOKEN_METHODS.get(self.method, (None, 0))
        k_rec = self.keys(k, q.reshape(k.shape[0], g, n, d))
        v_rec = v
        if self.values:
            vq = ValueQuantizer(4, group_size=32)
            v_rec = vq.dequantize_codes(*vq.quantize(v.float())).double()
            v_rec[:, :SINKS] = v[:, :SINKS]
            if tokens == "attended":
                for h, top in enumerate(self.attended):
                    v_rec[h, top] = v[h, top]
        pos = torch.arange(n)
        exact = (pos < self.prompt)[:, None] | (pos[None, :] == pos[:, None])  # [N, N]: prefill, or a query's own key
        if tokens == "recent":  # and its `count` most recent keys
            exact |= pos[:, None] - pos[None, :] <= count
        causal = pos[None, :] <= pos[:, None]
        window = kwargs.get("sliding_window")
        if window:  # a sliding-window layer: keys within the last `window` positions
            causal &= pos[None, :] > pos[:, None] - window
        k_x, v_x = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        k_r, v_r = k_rec.repeat_interleave(g, 0), v_rec.repeat_interleave(g, 0)
        scores = torch.where(exact, q @ k_x.transpose(-1, -2), q @ k_r.transpose(-1, -2)) * self.scale
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = torch.where(exact, p, 0.0) @ v_x + torch.where(exact, 0.0, p) @ v_r
        return out.transpose(0, 1)[None].to(query.dtype), None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--methods", nargs="*", choices=[*METHODS, *TOKEN_METHODS], default=list(METHODS))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model)
    ids = load_tokens(tokenizer, args.prefill + args.tokens, offset=args.offset)
    p, t = args.prefill, args.tokens
    study = Study(p)
    AttentionInterface.register("turboquant_channel_bits_study", study)
    target = ids[0, p : p + t]

    def log_probs(method: str | None, values: bool) -> torch.Tensor:
        study.method, study.values = method, values
        model.set_attn_implementation("sdpa" if method is None else "turboquant_channel_bits_study")
        return model(ids).logits[0, p - 1 : p + t - 1].double().log_softmax(-1)

    ref = log_probs(None, False)
    ppl_ref = math.exp(-ref[torch.arange(t), target].mean().item())
    print(f"{args.model}, text offset {args.offset}, {p} prefilled + {t} tokens; 16-bit perplexity {ppl_ref:.3f}")
    print("| values | keys | KL | perplexity |\n|---|---|---|---|")
    for values in (False, True):
        for method in args.methods:
            lp = log_probs(method, values)
            kl = (ref.exp() * (ref - lp)).sum(-1).mean().item()
            ppl = math.exp(-lp[torch.arange(t), target].mean().item())
            change = 100 * (ppl / ppl_ref - 1)
            kind = "4-bit" if values else "exact"
            print(f"| {kind} | {method} | {kl:.4f} | {ppl:.3f} ({change:+.2f}%) |", flush=True)


if __name__ == "__main__":
    main()
