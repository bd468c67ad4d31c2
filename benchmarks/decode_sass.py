"""Instruction count of the decode kernel's main loop, compiled offline for the H200 (sm_90; no GPU needed).

Compiles ``_decode_split_kernel_2d`` with Triton's bundled ptxas, disassembles it with nvdisasm and counts
the SASS instructions of its main loop over full blocks (one block of block_n tokens, no masks; the masked loop
over a split's last block is reported beside it): warp-instructions per token is the
figure to compare with the budget (an SM issues at most 4 warp-instructions per cycle; at the H200's memory
rate a K4/V4 token of one KV head leaves about 43). Pointers and the capacity are assumed 16-aligned, as
Triton specialises them at launch; block size, pipeline depth and register cap are DecodePlan's
(``decode.kernel_2d_constants``) unless given.

    python benchmarks/decode_sass.py                       # K4/V4, inline PTX and portable unpacking
    python benchmarks/decode_sass.py --bits 4,2 --warps 4 --block-n 64 128
    python benchmarks/decode_sass.py --bits 2,2 --prod --head-dim 256   # K3/V2 prod keys (2 index bits + QJL)

The counts depend on the Triton version (layout conversions especially). To see what a GPU machine's Triton
compiles without that machine, install its version beside the project's and put it first on the path:

    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH=/tmp/triton36:. python benchmarks/decode_sass.py --bits 4,4 3,2
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from turboquant.cache import kernel_codebook
from turboquant.kernels import decode
from turboquant.quantizers import TurboQuantMSE

POINTERS = {"Q": "*fp32", "SQ": "*fp32", "KC": "*u8", "KN": "*fp16", "KS": "*u8", "KR": "*fp16", "VC": "*u8",
            "VA": "*i32", "CB": "*fp32", "KT": "*i32", "SEQ_LEN": "*i64", "KV_START": "*i64",
            "Q_START": "*i64", "O_PART": "*fp32", "L_PART": "*fp32"}  # fmt: skip
SCALARS = {"Q_SCALE": "fp32"}


# shared-memory stores and loads, and barriers: the cost of the layout conversions Triton routes through shared memory
SHARED_MEMORY = ("STS", "LDS", "LDSM", "BAR")


def compile_kernel(key_bits: int, value_bits: int, asm: bool, num_warps: int | None = None, block_n: int | None = None,
                   d: int = 128, prod: bool = False, key_table_source: str = "immediates",
                   num_stages: int | None = None, max_registers: int | None = None, rows: int = 8):  # fmt: skip
    """(compiled _decode_split_kernel_2d, its block_n, its warps) with the constants DecodePlan gives it on a GPU,
    launch options as given (None: the plan's own). key_bits: codebook index bits (prod adds the QJL bit);
    key_table_source, max_registers: the launch options of those names (max_registers 0: no cap); rows: query rows
    per program (8: a decode step of GQA up to 8, in tiles of 16 rows)."""
    fn = decode._decode_split_kernel_2d
    names = fn.arg_names
    words = None
    if asm and key_table_source == "immediates":  # the tables of the codebook the cache hands the kernel
        words = tuple(decode.key_lookup_tables(kernel_codebook(TurboQuantMSE(d, key_bits))).tolist())
    layout = decode.tiles_2d_layout(d, key_bits + prod, "prod" if prod else "mse", value_bits, 32)
    launch = dict(decode.LAUNCH_DEFAULTS, inline_asm=asm, num_warps=num_warps, block_n=block_n,
                  num_stages=num_stages, key_table_source=key_table_source, max_registers=max_registers)  # fmt: skip
    const = decode.kernel_2d_constants(d, layout, value_bits, 32, True, rows, launch, True, words)
    options = {name: const.pop(name) for name in ("num_warps", "num_stages", "maxnreg") if name in const}
    sig = {n: "constexpr" if n in const else POINTERS.get(n, SCALARS.get(n, "i32")) for n in names}
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names if n in POINTERS or n == "C"},
    )  # fmt: skip
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options), const["BN"], options["num_warps"]


def _cubin_tool(kernel, tool: str, *args: str) -> str:
    """The output of one of Triton's bundled CUDA binary tools run on the kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    try:
        return subprocess.run([path, *args, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def sass(kernel) -> str:
    return _cubin_tool(kernel, "nvdisasm", "-c")


def resource_usage(kernel) -> dict[str, int]:
    """Per thread: registers, stack and local memory (spills) bytes, as cuobjdump reports them (empty if it does
    not)."""
    text = _cubin_tool(kernel, "cuobjdump", "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", text)
    return dict(zip(("registers", "stack", "local"), map(int, m.groups()), strict=True)) if m else {}


def resources(kernel) -> str:
    """Registers per thread and the bytes it spills (ptxas puts spilled registers on the stack; cuobjdump's local
    memory is reported apart and stays 0 for them)."""
    use = resource_usage(kernel)
    return f"{use['registers']} registers, {use['stack']} B stack" if use else "resources unknown"


def _instruction(line: str) -> str | None:
    """The instruction of one line of nvdisasm's output (its text before the `;`), or None."""
    m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
    return m.group(1) if m else None


def instruction_count(text: str) -> int:
    """How many instructions nvdisasm's output lists."""
    return sum(_instruction(line) is not None for line in text.splitlines())


def main_loops(text: str) -> list[collections.Counter]:
    """Opcode counts of the kernel's two longest loops (spans between a label and a backward branch to it),
    shortest first: the loop over full blocks (no masks), then the one over a split's last block (masked)."""
    labels, ins = {}, []
    for line in text.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        op = _instruction(line)
        if op is not None:
            ins.append(op)
    loops = []
    for j, t in enumerate(ins):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", t)
        if m and labels.get(m.group(1), j + 1) <= j:
            loops.append((j - labels[m.group(1)] + 1, labels[m.group(1)], j))
    spans = sorted(sorted(loops)[-2:])
    return [collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in ins[a : b + 1])
            for _, a, b in spans]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--bits", nargs="*", default=["4,4"], help="key_bits,value_bits pairs (MSE keys 2-4, values 2 or 4)"
    )
    ap.add_argument("--prod", action="store_true", help="prod keys: the index bits plus the QJL plane")
    ap.add_argument("--warps", nargs="*", type=int, default=[0], help="warps per program (0: the plan's choice)")
    ap.add_argument("--block-n", nargs="*", type=int, default=[0], help="tokens per block (0: the plan's choice)")
    ap.add_argument("--stages", type=int, default=0, help="pipeline depth (0: the plan's choice)")
    ap.add_argument("--cap", type=int, default=None, help="register cap per thread (0: none; default: the plan's)")
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    ap.add_argument(
        "--key-table-source", choices=decode.KEY_TABLE_SOURCES, default=decode.LAUNCH_DEFAULTS["key_table_source"]
    )
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__} (the SASS depends on its version: compare counts from one version)")
    for pair in args.bits:
        kb, vb = (int(x) for x in pair.split(","))
        for asm in (True, False):
            for warps in args.warps:
                for bn in args.block_n:
                    kernel, bn, w = compile_kernel(kb, vb, asm, warps or None, bn or None, d=args.head_dim,
                                                   prod=args.prod, key_table_source=args.key_table_source,
                                                   num_stages=args.stages or None, max_registers=args.cap)  # fmt: skip
                    loops = main_loops(sass(kernel))
                    if not loops:
                        print(f"K{kb}/V{vb} asm={asm} warps {w} block_n {bn}: no loop in the SASS")
                        continue
                    n = [sum(ops.values()) for ops in loops]
                    top = " ".join(f"{k}:{v}" for k, v in loops[0].most_common(12))
                    smem = " ".join(f"{k}:{loops[0][k]}" for k in SHARED_MEMORY)
                    print(f"K{kb}/V{vb} D={args.head_dim} {'inline PTX' if asm else 'portable  '} warps {w} "
                          f"block_n {bn} ({resources(kernel)}): "
                          f"{n[0] * w / bn:.1f} warp-instructions per token in full blocks ({n[0]} per thread "
                          f"per block), {n[-1] * w / bn:.1f} in the masked last block | shared memory and "
                          f"barriers {smem}, {kernel.metadata.shared // 1024} KB | {top}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
