"""InstructBLIP with Vicuna-7B's layer shapes: blip2 (float32, int8, int4) against the reference, on CPU.

    python bench/instruct.py      # instructblip-vicuna-1b (built if absent): reference, blip2, -int8, -int4
    python bench/make_checkpoint.py --shape instructblip-vicuna-7b
    python bench/instruct.py --shape instructblip-vicuna-7b --libs blip2-int8,blip2-int4

``instructblip-vicuna-1b`` is the released instructblip-vicuna-7b (ViT-g, the instruction-aware BERT-base
Q-Former) with 4 of Vicuna-7B's 32 decoder layers (1.07 B language-model parameters); ``-7b`` has all 32.
Each (library, task) runs in its own process through ``bench/run.py``'s worker protocol, so load time and
peak RSS (VmHWM) belong to that library alone. Libraries: ``reference`` (``transformers``'
``InstructBlipForConditionalGeneration``, float32), ``blip2`` (float32), ``blip2-int8`` and ``blip2-int4``
(``blip2.load(..., quantize=...)``; a quantization this checkout's ``blip2.load`` refuses is reported as
n/a). Tasks:

- ``caption``: ``--batch`` images, InstructBLIP's captioning instruction ``A short image description:``,
  exactly ``--tokens`` new tokens, greedy;
- ``decode``: tokens/s of one image's caption, (t(N tokens) - t(1 token)) / (N - 1);
- ``ask``: 4 questions about one image, ``--answer-tokens`` each: the reference one ``generate`` per
  question, blip2 one ``ask(image, questions)`` (the image encoded once; the Q-Former reads each question).

blip2's image, prefix and prefill caches are cleared before every timed call. One warm-up call, then the
best of ``--repeat``. Load time: the smallest of a library's task processes (page cache warm after the
first). Texts are compared with the reference's. The machine may be shared: each process waits for it to
be idle (``--wait-idle``), records the cores other processes used while it timed (``others_cpu``), and
is run again (``--retries``) when that exceeds ``BUSY_CORES``. Results: a table on stdout and JSON in
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from run import QUESTIONS, WEIGHT_BYTES, Ours, Reference, measure, peak_rss_mb, save_results, spawn

CAPTION_PROMPT = "A short image description:"  # what blip2's caption() gives an InstructBLIP
TASKS = ("caption", "decode", "ask")
QUANTIZE = {"blip2": None, "blip2-int8": "int8", "blip2-int4": "int4"}
LIBS = ("reference", *QUANTIZE)
BUSY_CORES = 0.1  # other work beyond this, on average, and a timing is not taken as clean


class InstructReference(Reference):
    """The reference's InstructBLIP, float32: the question itself is the prompt (and the instruction)."""

    def __init__(self, path: str):
        import torch
        from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

        self.torch = torch
        self.model = InstructBlipForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.proc = InstructBlipProcessor.from_pretrained(path)
        self.proc.tokenizer.padding_side = "left"

    def ask(self, image, questions, n):
        return [self.generate([image], [q], n)[0] for q in questions]


def cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat, all cores; idle and iowait left out)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class OthersCpu:
    """Cores that other processes kept busy, on average, over a ``with`` block: the machine is shared."""

    cores: float = 0.0

    def __enter__(self) -> OthersCpu:
        self.wall, self.busy, self.own = time.perf_counter(), cpu_seconds(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc) -> None:
        others = cpu_seconds() - self.busy - (sum(os.times()[:2]) - self.own)
        self.cores = max(0.0, others) / (time.perf_counter() - self.wall)


def wait_until_idle(max_wait: float, busy_cores: float = BUSY_CORES) -> float:
    """Wait (at most ``max_wait`` s) for a second in which the machine's other work uses < ``busy_cores``;
    return the cores in use when it stopped waiting."""
    deadline = time.monotonic() + max_wait
    while True:
        with OthersCpu() as others:
            time.sleep(1.0)
        if others.cores < busy_cores or time.monotonic() > deadline:
            return others.cores
        time.sleep(4.0)


def worker(args) -> None:
    import torch

    from factory import make_images

    torch.set_num_threads(args.threads)
    images = make_images(max(4, args.batch), size=224, seed=1)
    res: dict = {"lib": args.lib, "task": args.task}
    t0 = time.perf_counter()
    if args.lib == "reference":
        runner = InstructReference(args.ckpt)
    else:
        quantize = QUANTIZE[args.lib]
        try:
            runner = Ours(args.ckpt, quantize)
        except ValueError as e:
            if quantize is None or repr(quantize) not in str(e):
                raise
            print("RESULT " + json.dumps(dict(res, unavailable=str(e))))  # this blip2 has no such mode
            return
    res["load_s"] = time.perf_counter() - t0
    with OthersCpu() as others:
        res.update(measure(runner, args, images, prompt=CAPTION_PROMPT))
    res["others_cpu"] = others.cores
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


# ============================================================================ parent side


def decode_gb_fp32(ckpt: Path) -> float:
    """GB of language-model weights one decode step reads at float32 (decoder layers + output layer)."""
    t = json.loads((ckpt / "config.json").read_text())["text_config"]
    d, ff, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = t.get("num_key_value_heads") or t["num_attention_heads"]
    kv_width = kv * d // t["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv_width + 3 * d * ff
    return (layers * per_layer + t["vocab_size"] * d) * 4 / 1e9


def table(results: dict, args, gb_fp32: float) -> str:
    libs = [lib for lib in LIBS if lib in results]
    ref = results.get("reference")
    others = [lib for lib in libs if lib != "reference"] if ref else []

    def value(lib: str, task: str, key: str):
        r = results[lib].get(task, {})
        if key == "load_s":  # the warmest of the library's processes
            loads = [x["load_s"] for x in results[lib].values() if "load_s" in x]
            return min(loads) if loads else None
        return r.get(key)

    def unavailable(lib: str) -> bool:
        return all("unavailable" in r for r in results[lib].values())

    rows = [
        ("load (s)", "caption", "load_s", "{:.1f}"),
        ("peak RSS (MB), caption run", "caption", "peak_rss_mb", "{:.0f}"),
        (f"caption {args.batch} image(s) × {args.tokens} tokens (s)", "caption", "seconds", "{:.2f}"),
        ("decode, 1 image (tokens/s)", "decode", "tokens_per_s", "{:.2f}"),
        (f"{len(QUESTIONS)} questions × {args.answer_tokens} tokens, one image (s)", "ask", "seconds", "{:.2f}"),
        ("other processes' CPU in the caption run (cores)", "caption", "others_cpu", "{:.2f}"),
        ("the same, decode run", "decode", "others_cpu", "{:.2f}"),
        ("the same, ask run", "ask", "others_cpu", "{:.2f}"),
    ]  # fmt: skip
    out = [
        "| measure | " + " | ".join(libs) + "".join(f" | {lib}/ref" for lib in others) + " |",
        "|---" * (1 + len(libs) + len(others)) + "|",
    ]
    for label, task, key, fmt in rows:
        cells, ratios = [], []
        for lib in libs:
            v = value(lib, task, key)
            cells.append("n/a" if unavailable(lib) else "–" if v is None else fmt.format(v))
        for lib in others:
            v, r = value(lib, task, key), value("reference", task, key)
            if key == "tokens_per_s":  # report the ratio of times, as for the other rows
                v, r = r, v
            if key == "others_cpu":
                v = None  # not a ratio
            ratios.append(f"{v / r:.2f}" if v and r else "n/a" if unavailable(lib) else "–")
        if key == "tokens_per_s" and others:
            label += " [ratio of times]"
        out.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    out.append("")
    for lib in libs:
        if unavailable(lib):
            reason = next(iter(results[lib].values()))["unavailable"]
            out.append(f"- {lib}: n/a ({reason})")
            continue
        notes = []
        tps = value(lib, "decode", "tokens_per_s")
        if tps:
            gb = gb_fp32 * WEIGHT_BYTES.get(lib, 4.0) / 4
            notes.append(f"decode reads ~{gb * tps:.1f} GB/s of language-model weights ({gb:.2f} GB a token)")
        if ref and lib != "reference":
            same = [
                t for t in TASKS if t in ref and results[lib].get(t, {}).get("texts") == ref[t].get("texts")
            ]
            compared = [t for t in TASKS if t in ref and "texts" in results[lib].get(t, {})]
            notes.append(
                f"texts == reference in {len(same)}/{len(compared)} tasks ({', '.join(same) or 'none'})"
            )
        if notes:
            out.append(f"- {lib}: " + "; ".join(notes))
    for lib in libs:
        if not unavailable(lib) and "caption" in results[lib]:
            out.append(f"- {lib} caption[0]: {results[lib]['caption']['texts'][0]!r}")
    return "\n".join(out)  # fmt: skip


def run_undisturbed(lib: str, task: str, args) -> dict:
    """One (library, task) process, started once the machine is idle; a run that other work disturbed
    (more than ``BUSY_CORES`` on average) is done again, ``--retries`` times at most: the least
    disturbed is kept."""
    best = None
    for attempt in range(1 + args.retries):
        if args.wait_idle > 0 and (busy := wait_until_idle(args.wait_idle)) >= BUSY_CORES:
            print(f"the machine stayed busy ({busy:.1f} cores of other work): going on", flush=True)
        r = spawn(lib, task, args, script=__file__)
        if "unavailable" in r:
            return r
        r["attempts"] = attempt + 1
        if best is None or r["others_cpu"] < best["others_cpu"]:
            best = r
        if r["others_cpu"] < BUSY_CORES:
            break
        print(f"{lib} {task}: other work took {r['others_cpu']:.2f} cores ({r['seconds']:.2f} s)", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="instructblip-vicuna-1b", help="instructblip-vicuna-1b | -7b")
    ap.add_argument("--ckpt", type=Path, default=None, help="default: bench/checkpoints/<shape>")
    ap.add_argument("--libs", default=",".join(LIBS), help=f"any of {', '.join(LIBS)}")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"any of {', '.join(TASKS)}")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    ap.add_argument("--answer-tokens", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per task (the best is kept)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    ap.add_argument("--batch", type=int, default=4, help="images per caption call")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=300,
        help="seconds to wait, before each process, for other work on the machine to drop under 0.1 cores",
    )
    ap.add_argument("--retries", type=int, default=2, help="re-runs of a process that other work disturbed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from make_checkpoint import default_dir, write

    libs, tasks = args.libs.split(","), args.tasks.split(",")
    for name, chosen, known in (("library", libs, LIBS), ("task", tasks, TASKS)):
        if set(chosen) - set(known):
            sys.exit(f"unknown {name}(s) {sorted(set(chosen) - set(known))}; choose from {', '.join(known)}")
    args.ckpt = args.ckpt or default_dir(args.shape)
    if not (args.ckpt / "config.json").is_file():
        if args.shape != "instructblip-vicuna-1b":
            sys.exit(
                f"{args.ckpt}: no checkpoint; run `python bench/make_checkpoint.py --shape {args.shape}`"
            )
        print(f"building {args.ckpt} ...", flush=True)
        write(args.shape, args.ckpt)
    results: dict = {}
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    for task in tasks:
        for lib in libs:
            if any("unavailable" in r for r in results.get(lib, {}).values()):
                results[lib][task] = dict(next(iter(results[lib].values())), task=task)
                continue
            r = run_undisturbed(lib, task, args)
            results.setdefault(lib, {})[task] = r
            if "unavailable" in r:
                print(f"{lib:>11} {task:<8} n/a: {r['unavailable']}", flush=True)
                continue
            extra = f" {r['tokens_per_s']:.2f} tok/s" if "tokens_per_s" in r else ""
            print(f"{lib:>11} {task:<8} load {r['load_s']:.1f} s  {r['seconds']:.2f} s{extra}  "
                  f"rss {r['peak_rss_mb']:.0f} MB  others {r['others_cpu']:.2f} cores", flush=True)  # fmt: skip
    text = table(results, args, decode_gb_fp32(args.ckpt))
    cmd = "python bench/instruct.py " + " ".join(sys.argv[1:])
    head = (
        f"`{cmd}` — {args.ckpt.name}, {args.threads} threads, {time.perf_counter() - t0:.0f} s, "
        f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"\n{head}\n\n{text}")
    path = save_results(args.ckpt.name, {"command": cmd, "head": head, "results": results, "table": text})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
