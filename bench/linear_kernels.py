"""Few-row float32 linear layers: MKL's sgemm (F.linear), oneDNN and blip2's native kernel.

Runs every linear layer of an OPT-350m-sized decoder (24 x {4 x 1024->1024, 1024->4096, 4096->1024}
and the 1024 -> 50272 head: 1.41 GB, so the weights come from memory, not cache) for each row count,
best of --repeat, and reports ms per pass and the weight bytes read per second.

    python bench/linear_kernels.py --rows 1 2 4 8 16 32 64 128 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from blip2 import native


def onednn(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = native.skinny_linear_kernel()
    if kernel is None:
        raise SystemExit("no native kernel here (run with a C compiler on Linux x86-64 with AVX2)")
    generator = torch.Generator().manual_seed(0)
    shapes = [(1024, 1024)] * 4 + [(4096, 1024), (1024, 4096)]
    layers = [
        (torch.randn(shape, generator=generator) * 0.02, torch.zeros(shape[0]))
        for _ in range(24)
        for shape in shapes
    ]
    layers.append((torch.randn(50272, 1024, generator=generator) * 0.02, None))
    total_bytes = sum(w.numel() * 4 for w, _ in layers)

    def native_kernel(x, weight, bias):
        return native.skinny_linear(x, weight, bias, kernel)

    kernels = {"F.linear (MKL)": F.linear, "oneDNN": onednn, "native": native_kernel}
    print(f"| rows | {' | '.join(f'{k} ms' for k in kernels)} | native GB/s | native / oneDNN |")
    print("|---" * (len(kernels) + 3) + "|")
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k, generator=generator) for k in (1024, 4096)}
            times = {}
            for name, fn in kernels.items():
                best = float("inf")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    for weight, bias in layers:
                        fn(inputs[weight.shape[1]], weight, bias)
                    best = min(best, time.perf_counter() - t0)
                times[name] = best
            cells = " | ".join(f"{t * 1e3:.1f}" for t in times.values())
            rate = total_bytes / times["native"] / 1e9
            print(f"| {rows} | {cells} | {rate:.1f} | {times['native'] / times['oneDNN']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
