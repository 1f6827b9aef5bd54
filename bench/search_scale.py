"""How fast is `blip2 search` on a large index? Synthesises N images' worth of random normalised
query embeddings (N, 32, 256) into an index folder, builds the FAISS index, and times queries.

    python bench/search_scale.py --n 1000000 --dir /tmp/bench-index     # ~16 GB on disk
    python bench/search_scale.py --n 100000 --mode exact                # no FAISS: exact memmap scan

Queries are made to have a true answer: a text-like query is one stored query vector of a random image
plus noise; an image-like query is all 32 vectors of a random image plus noise. Reports the build time,
the disk use, the median latency of both query kinds, and recall@10 against an exact scan.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from blip2.index import EMBEDDINGS, Index  # noqa: E402


def synthesise(folder: Path, n: int, q: int, dim: int, chunk: int = 8192) -> Index:
    if folder.exists():
        shutil.rmtree(folder)
    index = Index.create(folder, model="random", kind="itc", num_queries=q, dim=dim, root="/nonexistent")
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        x = rng.standard_normal((c, q, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        recs = [{"path": f"img/{start + i:08d}.jpg", "mtime_ns": 0, "size": 0} for i in range(c)]
        index.append(x.astype(np.float16), recs)
    return index


def exact_top(index: Index, queries: list[np.ndarray], top: int, chunk: int = 8192) -> list[set[int]]:
    """Exact top rows for several queries in one pass over the memory map."""
    emb = index.embeddings()
    best = [(np.empty(0), np.empty(0, dtype=np.int64)) for _ in queries]
    for start in range(0, emb.shape[0], chunk):
        block = torch.from_numpy(np.asarray(emb[start : start + chunk])).float()
        for j, qv in enumerate(queries):
            s = torch.einsum("cqe,me->cqm", block, torch.from_numpy(qv)).flatten(1).amax(1).numpy()
            scores = np.concatenate([best[j][0], s])
            rows = np.concatenate([best[j][1], np.arange(start, start + len(s))])
            keep = np.argsort(-scores)[:top]
            best[j] = (scores[keep], rows[keep])
    return [set(r.tolist()) for _, r in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="images in the index")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/blip2-bench-index"))
    ap.add_argument("--mode", choices=["faiss", "exact"], default="faiss")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--recall", action="store_true", help="also compute recall@top against an exact scan")
    ap.add_argument("--keep", action="store_true", help="keep the index folder afterwards")
    args = ap.parse_args()
    q, dim = 32, 256

    t0 = time.perf_counter()
    index = synthesise(args.dir, args.n, q, dim)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    used = index.update_ann(args.mode)
    t_ann = time.perf_counter() - t0
    index = Index.open(args.dir)
    size = {p.name: p.stat().st_size for p in args.dir.iterdir()}

    rng = np.random.default_rng(1)
    emb = index.embeddings()
    targets = rng.choice(args.n, size=args.queries, replace=False)
    texts, images = [], []
    for r in targets:
        v = np.asarray(emb[r], dtype=np.float32)
        t = v[rng.integers(q)] + 0.5 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
        texts.append((t / np.linalg.norm(t))[None].astype(np.float32))
        im = v + 0.5 * rng.standard_normal((q, dim)).astype(np.float32) / np.sqrt(dim)
        images.append((im / np.linalg.norm(im, axis=-1, keepdims=True)).astype(np.float32))

    def timed(queries):
        index.search(queries[0], args.top, nprobe=args.nprobe)  # warm (reads the FAISS file)
        times, hits = [], []
        for qv in queries:
            t = time.perf_counter()
            hits.append(index.search(qv, args.top, nprobe=args.nprobe))
            times.append(time.perf_counter() - t)
        return float(np.median(times)), hits

    t_text, hits_text = timed(texts)
    t_image, hits_image = timed(images)
    found = np.mean([h[0].row == r for h, r in zip(hits_text, targets, strict=True)])
    found_img = np.mean([h[0].row == r for h, r in zip(hits_image, targets, strict=True)])
    print(f"N={args.n:,} images × {q} × {dim}, search={used}")
    print(f"  write embeddings: {t_write:.1f} s; build ANN: {t_ann:.1f} s")
    print("  disk: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in sorted(size.items())))
    print(f"  text query  (1 vector):   median {t_text * 1000:.1f} ms, source image first in {found:.0%}")
    print(
        f"  image query ({q} vectors): median {t_image * 1000:.1f} ms, source image first in {found_img:.0%}"
    )
    if args.recall:
        t0 = time.perf_counter()
        exact = exact_top(index, texts[:5], args.top)
        t_exact = (time.perf_counter() - t0) / 5
        rec = np.mean(
            [len(e & {h.row for h in got}) / args.top for e, got in zip(exact, hits_text, strict=False)]
        )
        print(f"  text recall@{args.top} vs exact: {rec:.2f}; exact scan: ~{t_exact:.1f} s per query")
    if not args.keep:
        shutil.rmtree(args.dir)
    assert EMBEDDINGS in size


if __name__ == "__main__":
    main()
