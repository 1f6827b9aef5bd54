"""int4 against int8 (or any two blip2 settings) in one process, their timed calls interleaved.

This machine's speed drifts by tens of percent from one minute to the next (other tenants share its
memory bandwidth), so two libraries timed in turn by ``bench/run.py`` can each meet a different
machine. Here both pipelines are loaded in one process and every round times each once, alternating
which goes first (each the best of ``--repeat`` calls); a round's ratio compares two measurements made
seconds apart, and the median over rounds is reported beside each one's best. Each timed call pays for its images (caches cleared), as in
``bench/run.py``.

    python bench/paired.py                                   # small: int8 vs int4 saved checkpoints
    python bench/paired.py --shape opt-2.7b --batch 1 --rounds 6
    python bench/paired.py --split                           # the caption's first token and later steps too
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from run import Ours, best_of, save_results, saved_dir  # (run puts tests/ on sys.path)


def timed(fn, repeat: int) -> float:
    """The best of ``repeat`` calls."""
    return best_of(fn, repeat, warmup=0)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="small")
    ap.add_argument("--libs", default="blip2-int8-saved,blip2-int4-saved", help="two -saved libraries")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per library and round (the best)")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="images per caption call")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--split", action="store_true",
        help="also time the caption's first token and its later steps ((t(n) - t(1)) / (n - 1), all rows)",
    )  # fmt: skip
    args = ap.parse_args()

    import torch
    from make_checkpoint import default_dir

    from factory import make_images

    torch.set_num_threads(args.threads)
    source = default_dir(args.shape)
    libs = args.libs.split(",")
    runners = {lib: Ours(saved_dir(source, lib), None) for lib in libs}
    images = make_images(max(4, args.batch), size=224, seed=1)
    n, k = args.tokens, args.repeat
    caption_name = f"caption, {args.batch} images x {n} tokens (s)"
    first_name = f"caption's first token, {args.batch} images (s)"
    tasks = {
        "decode (s/token)": lambda r: (timed(lambda: r.generate(images[:1], [""], n), k)
                                       - timed(lambda: r.generate(images[:1], [""], 1), k)) / (n - 1),
        caption_name: lambda r: timed(lambda: r.generate(images[: args.batch], [""] * args.batch, n), k),
    }  # fmt: skip
    if args.split:
        tasks[first_name] = lambda r: timed(lambda: r.generate(images[: args.batch], [""] * args.batch, 1), k)
    for r in runners.values():  # warm-up
        for task in tasks.values():
            task(r)
    times: dict[str, dict[str, list[float]]] = {t: {lib: [] for lib in libs} for t in tasks}
    for turn in range(args.rounds):
        for name, task in tasks.items():
            for lib in libs if turn % 2 == 0 else libs[::-1]:
                times[name][lib].append(task(runners[lib]))
    if args.split:  # each round's later steps from its own caption and first token
        times[f"caption's later steps, {args.batch} rows (s/step)"] = {
            lib: [
                (t - t1) / (n - 1)
                for t, t1 in zip(times[caption_name][lib], times[first_name][lib], strict=True)
            ]
            for lib in libs
        }
    a, b = libs
    lines = [
        f"| measure | {a} best | {b} best | time {b} / {a}: median of rounds (range) | {a} / {b} |",
        "|---|---|---|---|---|",
    ]
    for name, by_lib in times.items():
        ratios = [y / x for x, y in zip(by_lib[a], by_lib[b], strict=True)]
        median = statistics.median(ratios)
        lines.append(
            f"| {name} | {min(by_lib[a]):.4f} | {min(by_lib[b]):.4f} | "
            f"**{median:.2f}** ({min(ratios):.2f}-{max(ratios):.2f}) | {1 / median:.2f} |"
        )
    table = "\n".join(lines)
    cmd = "python bench/paired.py " + " ".join(sys.argv[1:])
    print(f"\n`{cmd}`: {args.rounds} rounds, {args.threads} threads\n\n{table}")
    path = save_results(f"paired-{args.shape}", {"command": cmd, "times": times, "table": table})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
