"""blip2 against the reference (`transformers`), side by side, on one random-weight checkpoint.

    python bench/run.py                      # --shape small: builds bench/checkpoints/small if absent
    python bench/run.py --shape opt-2.7b     # needs `python bench/make_checkpoint.py --shape opt-2.7b` first

Every (library, task) runs in its own fresh process, so load time and peak RSS (VmHWM, file-backed
pages included) belong to that library alone. Libraries: the reference in float32, blip2 in
float32, blip2 with ``quantize="int8"`` and ``"int4"`` (quantized at load); on request (``--libs``)
``blip2-int8-saved`` / ``blip2-int4-saved`` (checkpoints written by ``blip2 quantize``, made next to
the source on first use and loaded as they are) and ``blip2-exact``, float32 with ``exact=True`` (the
reference's matmul kernel). Tasks:

- ``load``: ``from_pretrained`` + processor / ``blip2.load``;
- ``vision``: the image encoder on one image;
- ``caption``: a batch of 4 images, exactly ``--tokens`` new tokens each, greedy;
- ``decode``: tokens/s of one image's greedy decode, (t(N tokens) - t(1 token)) / (N - 1);
- ``ask``: 4 questions about one image, ``--answer-tokens`` new tokens each, each library through its
  API: the reference one ``generate`` per question (its processor takes one image per prompt), blip2 one
  ``ask(image, questions)`` call (image encoded and prefilled once, the 4 answers decoded together);
- ``ask-batched``: the same, the reference given the image 4 times in one padded batch (what a user of it
  can do by hand), blip2 as in ``ask``.

Timed calls are preceded by one warm-up call and the best of ``--repeat`` is kept; ``--rounds N`` runs
every library's process N times, alternating their order, and keeps each library's best. Texts of the
float32 runs must equal the reference's. Results: a table on stdout and JSON in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

MACHINE_GFLOPS = 67.0  # float32 matmul, 2 cores, measured
MACHINE_GBS = 22.0  # memory read
TASKS = ("load", "vision", "caption", "decode", "ask", "ask-batched")
LIBS = (
    "reference",
    "blip2",
    "blip2-int8",
    "blip2-int4",
    "blip2-int8-saved",
    "blip2-int4-saved",
    "blip2-exact",
)
DEFAULT_LIBS = LIBS[:4]
# bytes of language-model weights a decode step reads per weight (int4: 4 bits + float16 scale and
# minimum per 128; the embedding is not read whole)
WEIGHT_BYTES = {
    "blip2-int8": 1.0,
    "blip2-int4": 4.25 / 8,
    "blip2-int8-saved": 1.0,
    "blip2-int4-saved": 4.25 / 8,
}
QUESTIONS = [
    "what colour is the cube?",
    "how many dogs are there?",
    "where is the red cat?",
    "is the bird yellow?",
]


# ============================================================================ worker side


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def best_of(fn, repeat: int, warmup: int = 1) -> tuple[float, object]:
    for _ in range(warmup):
        fn()
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


class Reference:
    def __init__(self, path: str):
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.torch = torch
        self.model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.proc = Blip2Processor.from_pretrained(path)
        self.proc.tokenizer.padding_side = "left"

    def vision(self, images):
        pixels = self.proc(images=images, return_tensors="pt")["pixel_values"]
        with self.torch.inference_mode():
            return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def generate(self, images, prompts, n):
        inputs = self.proc(images=images, text=prompts, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1
            )
        if self.model.config.use_decoder_only_language_model:  # the prompt comes back in front
            out = out[:, inputs["input_ids"].shape[1] :]
        return self.proc.batch_decode(out, skip_special_tokens=True)

    def ask(self, image, questions, n):
        return [self.generate([image], [f"Question: {q} Answer:"], n)[0] for q in questions]

    def ask_batched(self, image, questions, n):
        return self.generate([image] * len(questions), [f"Question: {q} Answer:" for q in questions], n)


class Ours:
    def __init__(self, path: str, quantize: str | None, exact: bool = False):
        import torch

        import blip2

        self.torch = torch
        self.m = blip2.load(path, quantize=quantize, exact=exact)

    def vision(self, images):
        pixels = self.m.processor(images=images)["pixel_values"]
        with self.torch.inference_mode():
            return self.m.model.vision(pixels)

    def clear(self) -> None:
        """Every timed call pays for its images, as the reference's do."""
        self.m.clear_caches()

    def generate(self, images, prompts, n):
        self.clear()
        return self.m.generate(images, prompts, max_new_tokens=n, min_new_tokens=n)

    def ask(self, image, questions, n):
        self.clear()
        return self.m.ask(image, questions, max_new_tokens=n, min_new_tokens=n)

    ask_batched = ask


def worker(args) -> None:
    import torch

    from factory import make_images

    torch.set_num_threads(args.threads)
    images = make_images(max(4, args.batch), size=224, seed=1)
    t0 = time.perf_counter()
    if args.lib == "reference":
        runner = Reference(args.ckpt)
    elif args.lib.endswith("-saved"):
        runner = Ours(saved_dir(args.ckpt, args.lib), None)
    else:
        quantize = args.lib.removeprefix("blip2-") if args.lib in ("blip2-int8", "blip2-int4") else None
        runner = Ours(args.ckpt, quantize, exact=args.lib == "blip2-exact")
    load_s = time.perf_counter() - t0
    res: dict = {"lib": args.lib, "task": args.task, "load_s": load_s}
    res.update(measure(runner, args, images))
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res))


def measure(runner, args, images, prompt: str = "") -> dict:
    """Time ``args.task`` on a loaded runner; captions and decodes continue ``prompt``."""
    res: dict = {}
    n, r, w, nb = args.tokens, args.repeat, args.warmup, args.batch
    if args.task == "vision":
        res["seconds"], _ = best_of(lambda: runner.vision(images[:1]), r, w)
    elif args.task == "caption":
        res["seconds"], texts = best_of(lambda: runner.generate(images[:nb], [prompt] * nb, n), r, w)
        res["texts"] = texts
    elif args.task == "decode":
        t1, _ = best_of(lambda: runner.generate(images[:1], [prompt], 1), r, w)
        tn, texts = best_of(lambda: runner.generate(images[:1], [prompt], n), r, w)
        res["seconds"] = tn
        res["tokens_per_s"] = (n - 1) / max(tn - t1, 1e-9)
        res["texts"] = texts
    elif args.task in ("ask", "ask-batched"):
        ask = runner.ask if args.task == "ask" else runner.ask_batched
        res["seconds"], texts = best_of(lambda: ask(images[0], QUESTIONS, args.answer_tokens), r, w)
        res["texts"] = texts
    return res


# ============================================================================ parent side


def saved_dir(ckpt: Path, lib: str) -> Path:
    """Where the ``blip2 quantize`` copy of ``ckpt`` for ``lib`` (blip2-int8-saved / -int4-saved) lies."""
    return ckpt.parent / f"{ckpt.name}-{lib.removeprefix('blip2-').removesuffix('-saved')}"


def ensure_saved(ckpt: Path, lib: str) -> None:
    out = saved_dir(ckpt, lib)
    if (out / "config.json").is_file():
        return
    bits = "4" if "int4" in lib else "8"
    print(f"writing {out} (blip2 quantize --bits {bits}) ...", flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    subprocess.run(
        [sys.executable, "-m", "blip2", "quantize", str(ckpt), str(out), "--bits", bits], check=True, env=env
    )


def work_model(ckpt: Path, tokens: int) -> dict:
    """FLOPs of the image encoder and bytes of weights read per decode step, from config.json."""
    cfg = json.loads((ckpt / "config.json").read_text())
    v, t = cfg["vision_config"], cfg["text_config"]
    d, mlp, layers = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    n_img = (v["image_size"] // v["patch_size"]) ** 2 + 1
    vision_flops = layers * (2 * n_img * (4 * d * d + 2 * d * mlp) + 4 * n_img * n_img * d)
    if t.get("model_type") == "t5":
        dm, ff, vocab = t["d_model"], t["d_ff"], t["vocab_size"]
        inner = t["num_heads"] * t["d_kv"]
        dec = t.get("num_decoder_layers") or t["num_layers"]
        lm_params = dec * (8 * dm * inner + 3 * dm * ff) + vocab * dm  # self + cross attention, gated FFN
    else:
        dm, ff, vocab = t["hidden_size"], t["ffn_dim"], t["vocab_size"]
        lm_params = t["num_hidden_layers"] * (4 * dm * dm + 2 * dm * ff) + vocab * dm
    return {"vision_gflop": vision_flops / 1e9, "lm_weight_gb_fp32": lm_params * 4 / 1e9, "tokens": tokens}


def spawn(lib: str, task: str, args, script: str = __file__) -> dict:
    """Run ``script --worker`` for one (library, task) with ``args``' settings; its RESULT line's dict."""
    cmd = [
        sys.executable, script, "--worker", "--lib", lib, "--task", task, "--ckpt", str(args.ckpt),
        "--tokens", str(args.tokens), "--answer-tokens", str(args.answer_tokens),
        "--repeat", str(args.repeat), "--threads", str(args.threads),
        "--warmup", str(args.warmup), "--batch", str(args.batch),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    sys.stderr.write(proc.stderr[-3000:])
    raise RuntimeError(f"{lib}/{task} failed (exit {proc.returncode})")


def fmt_ratio(a, b) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}"


def report(results: dict, work: dict, args) -> str:
    def get(lib, task, key):
        return results.get(lib, {}).get(task, {}).get(key)

    libs = [lib for lib in LIBS if lib in results]
    rows = [
        ("load (s)", "load", "load_s"),
        ("peak RSS (MB), caption run", "caption", "peak_rss_mb"),
        ("image encoder, 1 image (s)", "vision", "seconds"),
        (f"caption {args.batch} images × {args.tokens} tokens (s)", "caption", "seconds"),
        ("decode, 1 image (tokens/s)", "decode", "tokens_per_s"),
        (f"4 questions × {args.answer_tokens} tokens, one image (s)", "ask", "seconds"),
        ("the same, reference batching them by hand (s)", "ask-batched", "seconds"),
    ]
    head = "| measure | " + " | ".join(libs) + " | " + " | ".join(f"{x}/ref" for x in libs[1:]) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(libs) - 1)]
    for label, task, key in rows:
        vals = [get(lib, task, key) for lib in libs]
        cells = ["–" if v is None else (f"{v:.0f}" if key == "peak_rss_mb" else f"{v:.2f}") for v in vals]
        ref = vals[0] if libs and libs[0] == "reference" else None
        ratios = [fmt_ratio(v, ref) for v in vals[1:]]
        if key == "tokens_per_s":  # higher is better: report the time ratio
            ratios = [fmt_ratio(ref, v) if v else "–" for v in vals[1:]]
            label += " [ratio of times]"
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    # machine limits
    lines.append("")
    lines.append(f"Machine limits ({MACHINE_GFLOPS:.0f} GFLOP/s float32, {MACHINE_GBS:.0f} GB/s read):")
    for lib in libs:
        vs = get(lib, "vision", "seconds")
        tps = get(lib, "decode", "tokens_per_s")
        gb = work["lm_weight_gb_fp32"] / 4 * WEIGHT_BYTES.get(lib, 4.0)
        parts = []
        if vs:
            parts.append(
                f"image encoder {work['vision_gflop'] / vs:.1f} GFLOP/s = {100 * work['vision_gflop'] / vs / MACHINE_GFLOPS:.0f}%"
            )
        if tps:
            parts.append(f"decode {gb * tps:.1f} GB/s of weights = {100 * gb * tps / MACHINE_GBS:.0f}%")
        lines.append(f"- {lib}: " + ", ".join(parts))
    floor = work["vision_gflop"] / MACHINE_GFLOPS + args.tokens * work["lm_weight_gb_fp32"] / MACHINE_GBS
    lines.append(
        f"- float32 floor for one image, {args.tokens}-token caption: {floor:.1f} s "
        f"(vision {work['vision_gflop']:.0f} GFLOP, {work['lm_weight_gb_fp32']:.2f} GB of LM weights per token)"
    )
    # text parity
    lines.append("")
    ref_texts = {t: get("reference", t, "texts") for t in ("caption", "decode", "ask", "ask-batched")}
    for lib in libs[1:]:
        same = [get(lib, t, "texts") == ref_texts[t] for t in ref_texts if ref_texts[t] is not None]
        lines.append(f"- texts {lib} == reference: {sum(same)}/{len(same)} tasks identical")
    if ref_texts.get("caption"):
        lines.append(f"- reference caption[0]: {ref_texts['caption'][0]!r}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shape", default="small", help="small | opt-2.7b | flan-t5-xl (checkpoint in bench/checkpoints)"
    )
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument(
        "--libs", default=",".join(DEFAULT_LIBS), help=f"any of {', '.join(LIBS)} (default: the first three)"
    )
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--answer-tokens", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per task (the best is kept)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every library's process this many times, alternating their order, and keep each one's "
        "best (on a machine whose speed drifts, each library then gets its fast moments)",
    )
    ap.add_argument("--batch", type=int, default=4, help="images per caption call")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from make_checkpoint import default_dir, write

    args.ckpt = args.ckpt or default_dir(args.shape)
    if not (args.ckpt / "config.json").is_file():
        if args.shape != "small":
            sys.exit(
                f"{args.ckpt}: no checkpoint; run `python bench/make_checkpoint.py --shape {args.shape}`"
            )
        print(f"building {args.ckpt} ...", flush=True)
        write("small", args.ckpt)
    work = work_model(args.ckpt, args.tokens)
    for lib in args.libs.split(","):
        if lib.endswith("-saved"):
            ensure_saved(args.ckpt, lib)
    results: dict = {}
    t0 = time.perf_counter()
    libs = args.libs.split(",")
    for task in args.tasks.split(","):
        for turn in range(args.rounds):
            for lib in libs if turn % 2 == 0 else libs[::-1]:
                r = spawn(lib, task, args)
                best = results.setdefault(lib, {}).get(task)
                if best is None or _cost(r) < _cost(best):
                    results[lib][task] = r
                extra = f" {r['tokens_per_s']:.2f} tok/s" if "tokens_per_s" in r else ""
                print(f"{lib:>11} {task:<8} load {r['load_s']:.2f} s  {r.get('seconds', 0):.2f} s{extra}  "
                      f"rss {r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    table = report(results, work, args)
    cmd = "python bench/run.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()
    print(f"\n`{cmd}` — {args.ckpt.name}, {args.threads} threads, load average at end {load[0]:.1f}, "
          f"{time.perf_counter() - t0:.0f} s\n")  # fmt: skip
    print(table)
    path = save_results(args.ckpt.name, {"command": cmd, "work": work, "results": results, "table": table})
    print(f"\nwrote {path}")


def _cost(result: dict) -> float:
    """What a better run has less of: time per token for a decode, else the timed call's seconds (load:
    the load time)."""
    if "tokens_per_s" in result:
        return 1.0 / result["tokens_per_s"]
    return result.get("seconds", result["load_s"])


def save_results(name: str, data: dict) -> Path:
    """Write ``data`` as bench/results/<name>-<date>-<time>.json."""
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


if __name__ == "__main__":
    main()
