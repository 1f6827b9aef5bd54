"""Two builds of ``csrc/lowbit_linear.c`` side by side on a quantized checkpoint's own layers, in one
process, their calls alternating.

This VM's speed drifts by tens of percent within minutes, so a kernel change is measured against the
build before it in the same process: each round times both builds (alternating which goes first) and
the median of the per-round ratios is reported, with each build's best. Every output of the two builds
is also compared (a change meant to keep the results must give the same bits).

    python bench/kernel_ab.py OLD.c NEW.c                     # small-int4: image encoder and prefill shapes
    python bench/kernel_ab.py OLD.c NEW.c --ckpt bench/checkpoints/small-int8 --step 1
                                                              # a whole decode step's layers, 1 row

``--step R``: every language-model layer but the head, at R rows, in order (weights come from memory,
as in a decode step); else single layers at the rows they meet in a 4-image caption.
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

import blip2
from blip2.native import LOWBIT_FLAGS

ROOT = Path(__file__).resolve().parent


def build(source: str, folder: str, index: int):
    library = Path(folder) / f"build{index}.so"
    subprocess.run(["cc", *LOWBIT_FLAGS, source, "-o", str(library)], check=True)
    function = ctypes.CDLL(str(library)).blip2_lowbit_linear
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
    return function


def alternate(timed, rounds: int) -> tuple[list[float], list[float]]:
    """``timed(k)`` (seconds taken by build k, 0 or 1) once each untimed, then ``rounds`` rounds timing
    both, alternating which goes first: the per-round ratios (second / first build) and each one's best."""
    timed(0), timed(1)
    ratios, best = [], [float("inf")] * 2
    for r in range(rounds):
        times = {}
        for k in (0, 1) if r % 2 else (1, 0):
            times[k] = timed(k)
            best[k] = min(best[k], times[k])
        ratios.append(times[1] / times[0])
    return ratios, best


def compare(functions, cases, rounds: int, calls: int, threads: int) -> tuple[list[float], list[float]]:
    """Per-round ratios (second / first build) and each build's best time of ``cases`` run in order."""

    def timed(k: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            for layer, x, y in cases:
                functions[k](ctypes.byref(layer), x.data_ptr(), x.shape[0], y.data_ptr(), threads)
        return (time.perf_counter() - start) / calls

    return alternate(timed, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--ckpt", default=str(ROOT / "checkpoints" / "small-int4"), help="a quantized checkpoint")
    ap.add_argument("--step", type=int, default=0, help="rows of a decode step (0: single layers)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = blip2.load(args.ckpt).model
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "native_linear")}
    if not layers:
        raise SystemExit(f"{args.ckpt}: no quantized layers (write one with `blip2 quantize`)")

    def case(module, rows):
        native = module.native_linear()  # (kernel address, the layer's description, its tensors)
        if native is None:
            raise SystemExit(
                "no native low-bit kernel here (a C compiler on Linux x86-64 with AVX2 is needed)"
            )
        return native[1], torch.randn(rows, module.in_features), torch.empty(rows, module.out_features)

    with tempfile.TemporaryDirectory() as folder:
        functions = [build(args.old, folder, 0), build(args.new, folder, 1)]
        if args.step:
            step = [case(m, args.step) for n, m in layers.items() if n.startswith("language_model.layers.")]
            nbytes = sum(
                t.numel() * t.element_size()
                for n, m in layers.items()
                if n.startswith("language_model.layers.")
                for t in m.buffers()
            )
            ratios, best = compare(functions, step, args.rounds, 5, args.threads)
            print(f"decode step, {args.step} row(s), {len(step)} layers, {nbytes / 1e6:.0f} MB: old {best[0] * 1e3:.2f} ms "
                  f"({nbytes / best[0] / 1e9:.0f} GB/s), new {best[1] * 1e3:.2f} ms ({nbytes / best[1] / 1e9:.0f} GB/s), "
                  f"new/old median {statistics.median(ratios):.3f}")  # fmt: skip
            return
        block, lm = model.vision.blocks[0], model.language_model.layers[0]
        rows = 4 * (model.vision.pos_embed.shape[1])  # 4 images' tokens
        named = {
            "image encoder qkv": (block.attn.qkv, rows),
            "image encoder proj": (block.attn.proj, rows),
            "image encoder fc1": (block.mlp.fc1, rows),
            "image encoder fc2": (block.mlp.fc2, rows),
        }
        named.update(
            {
                f"language model {n}, 132 rows": (m, 132)
                for n, m in lm.named_modules()
                if hasattr(m, "native_linear")
            }
        )
        print(
            f"| layer | rows | old ms (GMAC/s) | new ms (GMAC/s) | new/old median of {args.rounds} | same bits |"
        )
        print("|---|---|---|---|---|---|")
        for name, (module, n) in named.items():
            layer, x, y = case(module, n)
            outputs = []
            for function in functions:
                function(ctypes.byref(layer), x.data_ptr(), n, y.data_ptr(), args.threads)
                outputs.append(y.clone())
            ratios, best = compare(functions, [(layer, x, y)], args.rounds, 20, args.threads)
            gmac = n * module.in_features * module.out_features / 1e9
            print(f"| {name} | {n} | {best[0] * 1e3:.3f} ({gmac / best[0]:.0f}) | {best[1] * 1e3:.3f} ({gmac / best[1]:.0f}) "
                  f"| {statistics.median(ratios):.3f} | {torch.equal(*outputs)} |")  # fmt: skip


if __name__ == "__main__":
    main()
