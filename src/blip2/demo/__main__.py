"""``python -m blip2.demo reproduce|eval|examples``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2.demo", description="The small BLIP-2 trained on scenes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reproduce", help="train the demo model from nothing (about 27-30 min on 2 CPU cores)")
    p.add_argument("--out", default="demo-build", help="working and output folder (default ./demo-build)")
    p.add_argument(
        "--tiny", action="store_true", help="a seconds-long run of every phase at toy size (for tests)"
    )
    p.add_argument("--seed", type=int, default=None, help="training seed (default the recipe's, 0)")
    p.add_argument("--device", default=None, help="torch device for every training phase (default cpu)")
    p.add_argument(
        "--install", action="store_true", help="copy the result over the checkpoint shipped in the package"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (on a busy machine 1 can be fastest)"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field"
    )

    p = sub.add_parser("eval", help="score a model on fresh held-out scenes; prints one JSON line")
    p.add_argument("--seed", type=int, required=True, help="seed of the scenes")
    p.add_argument("--count", type=int, default=100, help="number of scenes (default 100)")
    p.add_argument("--model", default="demo", help="checkpoint (default: the shipped demo)")
    p.add_argument("--batch-size", type=int, default=64)

    p = sub.add_parser("examples", help="write a few held-out scene images and their captions")
    p.add_argument("folder")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--count", type=int, default=4)

    args = parser.parse_args(argv)
    if args.command == "reproduce":
        from .reproduce import FULL, TINY, install, reproduce

        recipe = TINY if args.tiny else FULL
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.seed is not None:
            recipe = replace(recipe, seed=args.seed)
        for item in args.set:
            key, _, value = item.partition("=")
            if key not in recipe.__dataclass_fields__:
                parser.error(f"--set: the recipe has no field {key!r}")
            kind = type(getattr(recipe, key))
            recipe = replace(recipe, **{key: kind(value)})
        record = reproduce(args.out, recipe, device=args.device)
        if args.install:
            install(args.out)
        print(json.dumps(record))
        return 0
    if args.command == "eval":
        from .evaluate import evaluate

        print(json.dumps(evaluate(args.model, seed=args.seed, count=args.count, batch_size=args.batch_size)))
        return 0
    from pathlib import Path

    from .scenes import generate

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(generate(args.seed, args.count, "heldout")):
        scene.render().save(folder / f"scene{i + 1}.png")
        print(f"scene{i + 1}.png\t{scene.caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
