"""Float32 linear layers: MKL's sgemm (F.linear), oneDNN and blip2's native kernel of each kind.

Decode table: every linear layer of an OPT-350m-sized decoder (24 x {4 x 1024->1024, 1024->4096,
4096->1024} and the 1024 -> 50272 head: 1.41 GB, so the weights come from memory, not cache) for each
row count, best of --repeat, ms per pass and the weight bytes the native kernel reads per second.
Compute table (--compute): the shapes of an image encoder and a prefill, ms per call and GFLOP/s.

    python bench/linear_kernels.py --rows 1 2 4 8 16 32 64 128 256
    python bench/linear_kernels.py --compute
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from blip2 import native

# (what, rows, in_features, out_features)
COMPUTE_SHAPES = [
    ("small ViT, 4 images: qkv", 4 * 257, 768, 2304),
    ("small ViT, 4 images: fc1", 4 * 257, 768, 3072),
    ("small ViT, 4 images: fc2", 4 * 257, 3072, 768),
    ("ViT-g, 1 image: qkv", 257, 1408, 4224),
    ("ViT-g, 1 image: fc1", 257, 1408, 6144),
    ("ViT-g, 1 image: fc2", 257, 6144, 1408),
    ("ViT-g, 8 images: fc1", 8 * 257, 1408, 6144),
    ("OPT-350m prefill 4 x 33: fc1", 4 * 33, 1024, 4096),
    ("OPT-350m prefill 8 x 33: fc1", 8 * 33, 1024, 4096),
    ("OPT-350m prefill 8 x 33: fc2", 8 * 33, 4096, 1024),
]


def onednn(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def kernels() -> dict:
    found = {"F.linear (MKL)": F.linear, "oneDNN": onednn}
    for kind in native.KINDS:
        if (kernel := native.skinny_linear_kernel(kind)) is not None:
            found[f"native {kind}"] = lambda x, w, b, kernel=kernel: native.skinny_linear(x, w, b, kernel)
    if len(found) == 2:
        raise SystemExit("no native kernel here (run with a C compiler on Linux x86-64 with AVX2)")
    return found


def best_time(fn, args: tuple, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def _every_layer(fn, layers, inputs) -> None:
    for weight, bias in layers:
        fn(inputs[weight.shape[1]], weight, bias)


def decode_table(rows_list: list[int], repeat: int) -> None:
    found = kernels()
    native_name = f"native {native.kernel_kind()}"
    generator = torch.Generator().manual_seed(0)
    shapes = [(1024, 1024)] * 4 + [(4096, 1024), (1024, 4096)]
    layers = [
        (torch.randn(shape, generator=generator) * 0.02, torch.zeros(shape[0]))
        for _ in range(24)
        for shape in shapes
    ]
    layers.append((torch.randn(50272, 1024, generator=generator) * 0.02, None))
    total_bytes = sum(w.numel() * 4 for w, _ in layers)
    print(f"| rows | {' | '.join(f'{k} ms' for k in found)} | {native_name} GB/s | {native_name} / oneDNN |")
    print("|---" * (len(found) + 3) + "|")
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k, generator=generator) for k in (1024, 4096)}

        times = {name: best_time(_every_layer, (fn, layers, inputs), repeat) for name, fn in found.items()}
        cells = " | ".join(f"{t * 1e3:.1f}" for t in times.values())
        rate = total_bytes / times[native_name] / 1e9
        print(f"| {rows} | {cells} | {rate:.1f} | {times[native_name] / times['oneDNN']:.2f} |", flush=True)


def compute_table(repeat: int) -> None:
    found = kernels()
    native_name = f"native {native.kernel_kind()}"
    generator = torch.Generator().manual_seed(0)
    print(
        f"| shape | rows, in → out | {' | '.join(f'{k} ms (GFLOP/s)' for k in found)} | {native_name} / oneDNN |"
    )
    print("|---" * (len(found) + 3) + "|")
    for what, rows, in_features, out_features in COMPUTE_SHAPES:
        x = torch.randn(rows, in_features, generator=generator)
        weight = torch.randn(out_features, in_features, generator=generator) * 0.02
        bias = torch.zeros(out_features)
        times = {}
        for name, fn in found.items():
            fn(x, weight, bias)  # warm: caches, oneDNN's primitive
            times[name] = best_time(fn, (x, weight, bias), repeat)
        flops = 2 * rows * in_features * out_features
        cells = " | ".join(f"{t * 1e3:.1f} ({flops / t / 1e9:.0f})" for t in times.values())
        ratio = times[native_name] / times["oneDNN"]
        print(f"| {what} | {rows}, {in_features} → {out_features} | {cells} | {ratio:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--compute", action="store_true", help="image-encoder and prefill shapes instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        if args.compute:
            compute_table(max(args.repeat, 5))
        else:
            decode_table(args.rows, args.repeat)


if __name__ == "__main__":
    main()
