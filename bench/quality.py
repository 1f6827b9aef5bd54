"""How far int8 / int4 move blip2 from float32: the demo model's scores (a model that has learned
something) and the logits of the random test checkpoints.

    python bench/quality.py                         # demo: 2 seeds x 200 held-out scenes; 4 + 4 test checkpoints
    python bench/quality.py --count 50 --seeds 90210

Demo: caption exact match and VQA accuracy (``blip2.demo.evaluate``) on held-out scenes of each seed.
Test checkpoints: ``tests/factory.py`` OPT and T5 ones (seeds 0-3), two images and prompts each; the
cosine of the logits to float32's, flattened per sample (as ``tests/test_quantize.py``), the mean and
the lowest over samples and checkpoints.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

METHODS = (None, "int8", "int4")


def demo_scores(seeds: list[int], count: int) -> list[str]:
    import blip2
    from blip2.demo.evaluate import evaluate

    lines = ["| seed | scenes | float32 caption / VQA | int8 | int4 |", "|---|---|---|---|---|"]
    for seed in seeds:
        cells = []
        for method in METHODS:
            s = evaluate(pipeline=blip2.load("demo", quantize=method), seed=seed, count=count)
            cells.append(f"{s['caption_exact_match']:.3f} / {s['vqa_accuracy']:.3f}")
        lines.append(f"| {seed} | {count} | " + " | ".join(cells) + " |")
    return lines


def logit_cosines(checkpoints: int) -> list[str]:
    import blip2
    from factory import build_checkpoint, make_images

    lines = ["| checkpoints | int8 mean / lowest | int4 mean / lowest |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for lm in ("opt", "t5"):
            found: dict[str, list[float]] = {"int8": [], "int4": []}
            for seed in range(checkpoints):
                path = build_checkpoint(Path(tmp) / f"{lm}{seed}", lm=lm, seed=seed)
                ref = blip2.load(path)
                enc = ref.processor(
                    images=make_images(2, seed=seed), text=["a photo of", "Question: what? Answer:"]
                )
                kwargs = (
                    {"decoder_input_ids": torch.tensor([[0, 5, 9, 3], [0, 7, 2, 4]])} if lm == "t5" else {}
                )
                with torch.inference_mode():
                    a = ref.model(**enc, **kwargs).logits
                    for method in found:
                        b = blip2.load(path, quantize=method).model(**enc, **kwargs).logits
                        found[method] += F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).tolist()
            cells = [f"{sum(v) / len(v):.4f} / {min(v):.4f}" for v in found.values()]
            lines.append(f"| {lm} × {checkpoints} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[90210, 4242])
    ap.add_argument("--count", type=int, default=200, help="held-out scenes per seed")
    ap.add_argument("--checkpoints", type=int, default=4, help="random test checkpoints per language model")
    args = ap.parse_args()
    cmd = "python bench/quality.py " + " ".join(sys.argv[1:])
    print(f"`{cmd}`\n")
    print("\n".join(demo_scores(args.seeds, args.count)))
    print()
    print("\n".join(logit_cosines(args.checkpoints)))


if __name__ == "__main__":
    main()
