"""`blip2 bulk caption` against a plain loop of ``caption(batch)`` over the same files, same batch size.

    python bench/bulk.py --model demo                       # the demo model: reading images is most of the work
    python bench/bulk.py --shape small --ray 1,2            # the small real-shaped checkpoint, + Ray, 1 and 2 actors

Each run is a fresh process and is timed from its start to its end (model load, decode-worker or Ray
start-up included): ``plain`` loads the model and loops ``caption(paths[i:i + B])``; ``local`` is
``blip2 bulk caption DIR -o OUT`` with the local engine; ``ray-N`` the same with ``--engine ray --workers N``
(a local Ray runtime started by the command). ``steady`` is the rate between the first and the last part
file written (their mtimes; for ``plain``, of the loop alone), which leaves out start-up: for Ray it is
what more images would approach. With ``--repeat`` the runs go in rounds and the fastest of each is kept
(on a shared machine a busy spell slows whatever runs then).
The images are photo-sized JPEGs (640x480, the size of COCO's) of the demo's scenes, made once. Every
run's captions are checked against the plain loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

PLAIN = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import blip2
paths, batch, tokens, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
paths = Path(paths).read_text().split()
model = blip2.load(sys.argv[5])
loaded = time.perf_counter()
texts = []
for i in range(0, len(paths), batch):
    texts += model.caption(paths[i : i + batch], max_new_tokens=tokens)
end = time.perf_counter()
Path(out).write_text(json.dumps({"texts": dict(zip(paths, texts)), "load": loaded - t0, "loop": end - loaded}))
"""


def make_images(folder: Path, n: int) -> list[str]:
    from blip2.demo import scenes

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes.generate(seed=4242, count=n)):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            scene.render(640).crop((0, 80, 640, 560)).save(path, quality=90)
        paths.append(str(path))
    return paths


def run(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])}... failed:\n{proc.stderr[-3000:]}")
    return wall


def steady_rate(out: Path, part_size: int) -> float:
    """Images/s between the first and the last part written (start-up left out)."""
    times = sorted(p.stat().st_mtime for p in out.glob("part-*.parquet"))
    if len(times) < 2 or times[-1] <= times[0]:
        return float("nan")
    return (len(times) - 1) * part_size / (times[-1] - times[0])


def micro(paths: list[str], model: str) -> None:
    """What bounds a cluster: decode rate of one core, the driver's rate of taking rows in and writing
    Parquet parts (captions and embeddings), the model's load time."""
    import tempfile

    import numpy as np

    import blip2
    from blip2.bulk.read import table_rows
    from blip2.bulk.store import Sink, Store
    from blip2.bulk.tasks import Task, decode, describe

    info = describe(model)
    for size in (224, 364):
        proc = type(info.image_processor)(size=(size, size))
        sample = paths[:128]
        t0 = time.perf_counter()
        for p in sample:
            decode(p, -1, -1, None, proc)
        dt = time.perf_counter() - t0
        print(
            f"decode {size}px: {len(sample) / dt:.1f} img/s on one core ({1000 * dt / len(sample):.1f} ms/img)"
        )
    t0 = time.perf_counter()
    blip2.load(model)
    print(f"model load: {time.perf_counter() - t0:.2f} s")
    n = 4096
    rng = np.random.default_rng(0)
    words = np.array(
        ["a", "the", "large", "small", "red", "blue", "circle", "square", "in", "on", "left", "top"]
    )
    captions = [" ".join(rng.choice(words, 12)) for _ in range(n)]
    embeds = rng.standard_normal((n, 32, 256)).astype(np.float16) / 16
    for task, values in ((Task.make("caption"), captions), (Task.make("embed"), list(embeds))):
        rows = [(f"photos/{i:07d}.jpg", None, v, None) for i, v in enumerate(values)]
        emb = {"kind": "itc", "num_queries": 32, "dim": 256} if task.verb == "embed" else None
        with tempfile.TemporaryDirectory() as tmp:
            import pyarrow as pa

            from blip2.bulk.sources import INPUT_SCHEMA, Inputs

            inputs = Inputs(pa.Table.from_pylist([{"key": r[0]} for r in rows], schema=INPUT_SCHEMA), "/")
            job = {"task": task.spec(), "model": model, "dtype": None, "quantize": None, "exact": False,
                   "source": "x", "part_size": 1024, "embedding": emb}  # fmt: skip
            with Store.open(Path(tmp) / "out", job, lambda inputs=inputs: inputs) as store:
                table = task.table(rows, store.embedding_shape)  # what an actor sends back
                t0 = time.perf_counter()
                with Sink(store, list(range(store.num_units))) as sink:
                    for unit in range(store.num_units):
                        part = table.slice(unit * 1024, 1024)
                        for pos, row in enumerate(table_rows(task, part)):
                            sink.add(unit, pos, 0, row)
                dt = time.perf_counter() - t0
                size = sum(p.stat().st_size for p in (Path(tmp) / "out").glob("part-*.parquet"))
        print(f"driver, {task.verb}: {n / dt:.0f} rows/s taken in and written ({size / n:.0f} B/row on disk)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default: bench/checkpoints/SHAPE)")
    ap.add_argument("--shape", default="small", help="make_checkpoint.py shape when --model is not given")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=20, help="max new tokens per caption")
    ap.add_argument("--part-size", type=int, default=64)
    ap.add_argument("--ray", default="", help="comma-separated actor counts for --engine ray runs, e.g. 1,2")
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all runs; the fastest of each is kept")
    ap.add_argument("--work", default=str(ROOT / "bench" / "bulk_work"), help="images and outputs")
    ap.add_argument("--micro", action="store_true", help="only the per-stage rates (decode, driver, load)")
    args = ap.parse_args()

    model = args.model
    if model is None:
        from make_checkpoint import default_dir

        folder = default_dir(args.shape)
        if not (folder / "config.json").exists():
            subprocess.run(
                [sys.executable, str(ROOT / "bench" / "make_checkpoint.py"), "--shape", args.shape],
                check=True,
            )
        model = str(folder)
    work = Path(args.work)
    paths = make_images(work / "images", args.images)
    listing = work / "images.txt"
    listing.write_text("\n".join(paths) + "\n")
    if args.micro:
        micro(paths, model)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    n, b = len(paths), args.batch_size
    print(f"{n} images, batch {b}, {args.tokens} tokens, model {model}, best of {args.repeat}", flush=True)

    configs = [("plain", None)] + ([] if args.skip_local else [("local", [])])
    configs += [(f"ray-{w}", ["--engine", "ray", "--workers", w]) for w in args.ray.split(",") if w]
    results: dict[str, dict] = {}
    texts: dict[str, str] = {}
    for _ in range(args.repeat):  # rounds of every configuration, so that a busy spell hits them alike
        for name, extra in configs:
            if extra is None:
                out = work / "plain.json"
                wall = run(
                    [sys.executable, "-c", PLAIN, str(listing), str(b), str(args.tokens), str(out), model],
                    env,
                )
                plain = json.loads(out.read_text())
                texts = plain["texts"]
                r = {"wall": wall, "steady": n / plain["loop"], "load": plain["load"]}
            else:
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "blip2", "bulk", "caption", str(listing), "-o", str(out), "-m", model,
                       "--batch-size", str(b), "--max-new-tokens", str(args.tokens), "--part-size",
                       str(args.part_size), "-q", *extra]  # fmt: skip
                wall = run(cmd, env)
                import pyarrow.parquet as pq

                table = pq.read_table(out, columns=["key", "text"]).to_pylist()
                same = sum(texts.get(row["key"]) == row["text"] for row in table)
                r = {"wall": wall, "steady": steady_rate(out, args.part_size), "same_texts": same}
            r["rate"] = n / r["wall"]
            best = results.get(name)
            if best is None or r["wall"] < best["wall"]:
                results[name] = r
            print(f"  {name:6s} {wall:7.1f} s", flush=True)
    for name, r in results.items():
        extra = f"texts equal {r['same_texts']}/{n}; " if "same_texts" in r else f"load {r['load']:.1f} s; "
        print(f"{name:6s} {r['wall']:7.1f} s  {r['rate']:6.2f} img/s  {r['rate'] / results['plain']['rate']:.2f}x plain  "
              f"({extra}{r['steady']:.2f} img/s steady)", flush=True)  # fmt: skip
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
