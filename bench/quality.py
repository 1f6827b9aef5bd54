"""How far int8 / int4 move blip2 from float32: the demo model's scores (a model that has learned
something) and the logits of the random test checkpoints.

    python bench/quality.py                         # demo: 2 seeds x 200 held-out scenes; 4 + 4 test checkpoints
    python bench/quality.py --count 50 --seeds 90210

Demo: caption exact match and VQA accuracy (``blip2.demo.evaluate``) on held-out scenes of each seed.
Test checkpoints: ``tests/factory.py`` OPT and T5 ones (seeds 0-3), two images and prompts each; the
cosine of the logits to float32's, flattened per sample (as ``tests/test_quantize.py``), the mean and
the lowest over samples and checkpoints. The demo model's logits likewise, on 8 held-out scenes.
"int4 GPTQ": int4 calibrated (``blip2 quantize --calibration``) on 32 other images with the same prompts
(test checkpoints, as ``tests/test_gptq.py``) or on 32 training scenes, each with a caption prompt or its
own question (demo, as ``tests/test_quantize_demo.py``).

What 4 bits can do on those checkpoints (``--bound``): the language model's weights (where int4 costs the
most) replaced, in the float model, by int4's dequantized weights; by the best affine 4-bit grid per group
that an exhaustive search finds (any scale and minimum; the format every int4 kernel uses); and by
Gaussian noise at the rate-distortion bound for 4 bits a weight (rms = the group's spread / 16: no code
of 4 bits a weight does better on Gaussian weights, whatever its format).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

METHODS = (None, "int8", "int4", "int4 GPTQ")
PROMPTS = ["a photo of", "Question: what? Answer:"]
T5_DECODER_INPUT = [[0, 5, 9, 3], [0, 7, 2, 4]]


def _calibrated(path, images, prompts):
    """``path`` loaded and quantized to int4 by GPTQ on ``images`` / ``prompts``."""
    import blip2
    from blip2.quantize.calibrate import quantize_calibrated

    pipe = blip2.load(path)
    quantize_calibrated(pipe, images, prompts=prompts, count=len(images), progress=False)
    return pipe


def _demo(method: str | None):
    import blip2
    from blip2.chat import QUESTION_TEMPLATE
    from blip2.demo.scenes import generate

    if method != "int4 GPTQ":
        return blip2.load("demo", quantize=method)
    scenes = generate(0, 32, "train")
    rng = np.random.default_rng(0)
    prompts = [  # one per scene (prompts go to the images in turn): a caption prompt or its own question
        "a photo of" if i % 2 == 0 else QUESTION_TEMPLATE.format(s.sample_questions(rng, 1)[0][0])
        for i, s in enumerate(scenes)
    ]
    return _calibrated("demo", [s.render() for s in scenes], prompts)


def demo_scores(seeds: list[int], count: int) -> list[str]:
    from blip2.demo.evaluate import evaluate

    lines = [
        "| seed | scenes | float32 caption / VQA | int8 | int4 | int4 GPTQ |",
        "|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        cells = []
        for method in METHODS:
            s = evaluate(pipeline=_demo(method), seed=seed, count=count)
            cells.append(f"{s['caption_exact_match']:.3f} / {s['vqa_accuracy']:.3f}")
        lines.append(f"| {seed} | {count} | " + " | ".join(cells) + " |")
    return lines


def _cells(found: dict[str, list[float]]) -> list[str]:
    return [f"{sum(v) / len(v):.4f} / {min(v):.4f}" for v in found.values()]


def demo_cosines(seed: int) -> list[str]:
    import blip2
    from blip2.chat import QUESTION_TEMPLATE
    from blip2.demo.scenes import generate

    scenes = generate(seed, 8, "heldout")
    rng = np.random.default_rng(seed)
    questions = [QUESTION_TEMPLATE.format(s.sample_questions(rng, 1)[0][0]) for s in scenes[4:]]
    ref = blip2.load("demo")
    enc = ref.processor(images=[s.render() for s in scenes], text=["a photo of"] * 4 + questions)
    found: dict[str, list[float]] = {}
    with torch.inference_mode():
        a = ref.model(**enc).logits
        for method in METHODS[1:]:
            b = _demo(method).model(**enc).logits
            found[method] = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).tolist()
    return ["| demo, seed " + str(seed) + " | " + " | ".join(_cells(found)) + " |"]


def _test_checkpoints(tmp: str, lm: str, count: int):
    """(path, inputs, extra forward arguments, float32 logits) of ``count`` random test checkpoints."""
    import blip2
    from factory import build_checkpoint, make_images

    for seed in range(count):
        path = build_checkpoint(Path(tmp) / f"{lm}{seed}", lm=lm, seed=seed)
        ref = blip2.load(path)
        enc = ref.processor(images=make_images(2, seed=seed), text=PROMPTS)
        kwargs = {"decoder_input_ids": torch.tensor(T5_DECODER_INPUT)} if lm == "t5" else {}
        with torch.inference_mode():
            yield path, enc, kwargs, ref.model(**enc, **kwargs).logits


def logit_cosines(checkpoints: int) -> list[str]:
    import blip2
    from factory import make_images

    lines = [
        "| checkpoints | int8 mean / lowest | int4 mean / lowest | int4 GPTQ mean / lowest |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for lm in ("opt", "t5"):
            found: dict[str, list[float]] = {method: [] for method in METHODS[1:]}
            for seed, (path, enc, kwargs, a) in enumerate(_test_checkpoints(tmp, lm, checkpoints)):
                with torch.inference_mode():
                    for method in found:
                        if method == "int4 GPTQ":
                            model = _calibrated(path, make_images(32, seed=1000 + seed), PROMPTS).model
                        else:
                            model = blip2.load(path, quantize=method).model
                        b = model(**enc, **kwargs).logits
                        found[method] += F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).tolist()
            lines.append(f"| {lm} × {checkpoints} | " + " | ".join(_cells(found)) + " |")
    return lines


def best_affine_grid(w: torch.Tensor, steps: int = 36) -> torch.Tensor:
    """(rows, in) -> the dequantized weights of the affine 4-bit grid per row (one group) with the least
    squared error that a search finds: the row's [min, max] cut by 0-35 % at each end independently, each
    with and without a least-squares refit of scale and minimum."""
    low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    width = high - low
    best, best_err = w.clone(), torch.full((w.shape[0],), float("inf"))
    cuts = torch.linspace(0, 0.35, steps)
    for a in cuts:
        for b in cuts:
            minimum = low + a * width
            scale = ((high - b * width - minimum) / 15).clamp_min(1e-12)
            q = ((w - minimum) / scale).round().clamp(0, 15)
            centred, w_mean = q - q.mean(1, keepdim=True), w.mean(1, keepdim=True)
            spread = centred.square().sum(1, keepdim=True)
            fit = torch.where(
                spread > 0, (centred * (w - w_mean)).sum(1, keepdim=True) / spread.clamp_min(1e-12), scale
            )
            for grid in (q * scale + minimum, q * fit + (w_mean - fit * q.mean(1, keepdim=True))):
                err = (grid - w).square().sum(1)
                better = err < best_err
                best[better], best_err = grid[better], torch.minimum(err, best_err)
    return best


def four_bit_bound(checkpoints: int) -> list[str]:
    import blip2
    from blip2.quantize.int4 import Int4Linear
    from blip2.quantize.model import plan

    def int4(w, lin, gen):
        return Int4Linear.from_linear(lin, 128).dequantized()

    def best(w, lin, gen):
        return best_affine_grid(w)

    def shannon(w, lin, gen):
        return w + torch.randn(w.shape, generator=gen) * w.std(1, keepdim=True) / 16

    variants = {"int4's fit": int4, "best affine grid": best, "noise at the 4-bit bound": shannon}
    lines = [
        "| checkpoints | "
        + " | ".join(f"{k} mean / lowest" for k in variants)
        + " | weight error int4 / best |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for lm in ("opt", "t5"):
            found: dict[str, list[float]] = {k: [] for k in variants}
            errors: dict[str, list[float]] = {"int4": [], "best": []}
            for seed, (path, enc, kwargs, a) in enumerate(_test_checkpoints(tmp, lm, checkpoints)):
                for key, replace in variants.items():
                    model = blip2.load(path).model
                    gen = torch.Generator().manual_seed(seed)
                    with torch.no_grad():
                        for name in plan(model, "int4"):
                            if not name.startswith("language_model."):
                                continue
                            lin = model.get_submodule(name)
                            w = lin.weight.float()
                            grid = replace(w, lin, gen)
                            if key != "noise at the 4-bit bound":
                                rel = ((grid - w).square().mean() / w.var()).sqrt().item()
                                errors["int4" if key == "int4's fit" else "best"].append(rel)
                            lin.weight.copy_(grid)
                        b = model(**enc, **kwargs).logits
                    found[key] += F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).tolist()
            err = " / ".join(f"{sum(v) / len(v):.4f}" for v in errors.values())
            lines.append(f"| {lm} × {checkpoints} | " + " | ".join(_cells(found)) + f" | {err} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[90210, 4242])
    ap.add_argument("--count", type=int, default=200, help="held-out scenes per seed")
    ap.add_argument("--checkpoints", type=int, default=4, help="random test checkpoints per language model")
    ap.add_argument("--bound", action="store_true", help="also what 4 bits can do on the test checkpoints")
    args = ap.parse_args()
    cmd = "python bench/quality.py " + " ".join(sys.argv[1:])
    print(f"`{cmd}`\n")
    print("\n".join(demo_scores(args.seeds, args.count)))
    print()
    print("\n".join(logit_cosines(args.checkpoints)))
    for seed in args.seeds:
        print("\n".join(demo_cosines(seed)))
    if args.bound:
        print()
        print("\n".join(four_bit_bound(args.checkpoints)))


if __name__ == "__main__":
    main()
