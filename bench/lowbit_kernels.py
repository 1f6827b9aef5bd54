"""Low-bit linear layers: float32 (blip2's native few-row kernel / oneDNN), fbgemm's dynamic int8 (what
int8 ran on before), and blip2's int8 and int4 kernels (``csrc/lowbit_linear.c``).

Runs every linear layer of an OPT-350m-sized decoder (24 x {4 x 1024->1024, 1024->4096, 4096->1024}
and the 1024 -> 50272 head; 1.41 GB in float32, 0.35 GB in int8, 0.19 GB in int4: more than the
cache, so the weights come from memory) for each row count, best of --repeat; ms per pass and the
stored bytes read per second.

    python bench/lowbit_kernels.py --rows 1 4 8 64 256
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from blip2.models.layers import Linear
from blip2.quantize import Int4Linear, Int8Linear, kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 64, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if kernels.native_kind() is None:
        raise SystemExit("no native low-bit kernel here (run with a C compiler on Linux x86-64 with AVX2)")
    torch.manual_seed(0)
    shapes = [(1024, 1024)] * 4 + [(1024, 4096), (4096, 1024)]
    floats = [Linear(i, o) for _ in range(24) for i, o in shapes] + [Linear(1024, 50272, bias=False)]
    for layer in floats:
        nn.init.normal_(layer.weight, std=0.02)
        layer.requires_grad_(False)
    layers = {
        "float32": floats,
        "fbgemm int8": [Int8Linear.from_linear(f, kernel="fbgemm") for f in floats],
        "int8": [Int8Linear.from_linear(f, kernel="native") for f in floats],
        "int4": [Int4Linear.from_linear(f, kernel="native") for f in floats],
    }
    stored = {
        name: sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in group)
        for name, group in layers.items()
    }
    stored["fbgemm int8"] = stored["int8"]
    print(
        f"kind {kernels.native_kind()} (1 AVX2, 2 AVX-512 VNNI), {args.threads} threads; ms per pass (GB/s)"
    )
    print(f"| rows | {' | '.join(layers)} | int4 / int8 |")
    print("|---" * (len(layers) + 2) + "|")
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k) for k in (1024, 4096)}
            times = {}
            for name, group in layers.items():
                best = float("inf")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    for layer in group:
                        layer(inputs[layer.in_features])
                    best = min(best, time.perf_counter() - t0)
                times[name] = best
            cells = " | ".join(f"{t * 1e3:.1f} ({stored[n] / t / 1e9:.0f})" for n, t in times.items())
            print(f"| {rows} | {cells} | {times['int4'] / times['int8']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
