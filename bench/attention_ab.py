"""Two builds of ``csrc/decode_attention.c`` side by side on a decode step's attention calls, in one
process, their calls alternating (as ``kernel_ab.py`` does for the low-bit products).

A step's attention reads each layer's KV cache after that layer's weights have streamed through the
caches, so here each of the 24 layers' calls follows a read of 6 MB (an int4 layer of OPT-350m's shape):
the keys and values come from memory, as in a real step. Each round times both builds (alternating which
goes first); the median of the per-round ratios is reported with each build's best, and the two builds'
outputs are compared.

    git show HEAD~1:src/blip2/csrc/decode_attention.c > /tmp/old.c
    python bench/attention_ab.py /tmp/old.c src/blip2/csrc/decode_attention.c --rows 1 4 --positions 45 200
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from kernel_ab import alternate

from blip2 import native


def build(source: str, folder: str, index: int):
    kind = native.kernel_kind()
    library = Path(folder) / f"attention{index}.so"
    subprocess.run(
        ["cc", *native.ATTENTION_FLAGS, *native.KINDS[kind], source, "-o", str(library)], check=True
    )
    return native._bind_decode_attention(ctypes.CDLL(str(library)))


def step(function, q, caches, weights, mask, length: int) -> tuple[float, list[torch.Tensor]]:
    """One decode step's attention calls by ``function``: the seconds they took, and their outputs."""
    spent, outputs = 0.0, []
    for (k, v), w in zip(caches, weights, strict=True):
        w.sum()  # this layer's weights, streamed
        start = time.perf_counter()
        outputs.append(native.decode_attention(q, k[:, :, :length], v[:, :, :length], mask, None, function))
        spent += time.perf_counter() - start
    return spent, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--positions", type=int, nargs="+", default=[45, 200])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(6 * 2**20 // 4, generator=generator) for _ in range(args.layers)]
    print(f"kind {native.kernel_kind()}, {args.threads} threads, {args.layers} layers of {args.heads} x "
          f"{args.head_dim}, 6 MB read before each layer's call")  # fmt: skip
    print(
        f"| rows | positions | old ms a step | new ms a step | new/old median of {args.rounds} | largest difference |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        functions = [build(args.old, folder, 0), build(args.new, folder, 1)]
        for rows in args.rows:
            for length in args.positions:
                shape = (rows, args.heads, length + 8, args.head_dim)  # a cache with room left
                caches = [(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
                          for _ in range(args.layers)]  # fmt: skip
                q = torch.randn(rows, args.heads, 1, args.head_dim, generator=generator)
                mask = torch.ones(rows, 1, 1, length, dtype=torch.bool)

                call = (q, caches, weights, mask, length)
                ratios, best = alternate(lambda k, call=call: step(functions[k], *call)[0], args.rounds)
                old, new = (step(function, *call)[1] for function in functions)
                difference = max((a - b).abs().max().item() for a, b in zip(old, new, strict=True))
                print(f"| {rows} | {length} | {best[0] * 1e3:.3f} | {best[1] * 1e3:.3f} "
                      f"| {statistics.median(ratios):.3f} | {difference:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
