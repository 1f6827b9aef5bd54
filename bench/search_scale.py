"""How fast and how good is `blip2 search` on a large index? Synthesises N images' worth of clustered,
normalised query embeddings (N, 32, 256) straight into an index folder (not through the model), then
times text and image queries and measures recall@top against an exact scan.

    python bench/search_scale.py --n 1000000                 # timings at 1M (~17 GB in /tmp, deleted after)
    python bench/search_scale.py --n 100000 --recall         # + recall@10 vs an exact scan, per --candidates

Data: image i = normalise(centre of its cluster + noise), its 32 query vectors = normalise(image + noise),
so images of a cluster resemble each other and a query has a meaningful top 10 (on unstructured random
vectors every score is ≈ 0 and recall means nothing); ``--spread`` makes an image's 32 vectors differ
more from each other (harder for the mean-vector candidate stage). A text-like query is one stored query
vector of a random image plus noise; an image-like query is all 32 of them plus noise. One thread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from blip2.index import EMBEDDINGS, SUMMARY, Index  # noqa: E402


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def synthesise(folder: Path, n: int, q: int, dim: int, clusters: int, spread: float = 1.0,
               chunk: int = 8192) -> Index:  # fmt: skip
    """Write N clustered images through Index.append (embeddings, summaries, manifest), chunk by chunk."""
    if folder.exists():
        shutil.rmtree(folder)
    index = Index.create(folder, model="random", kind="itc", num_queries=q, dim=dim, root="/nonexistent")
    g = torch.Generator().manual_seed(0)
    centres = unit(torch.randn(clusters, dim, generator=g))
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        ids = torch.randint(clusters, (c,), generator=g)
        images = unit(centres[ids] + torch.randn(c, dim, generator=g) / dim**0.5)  # (c, E)
        x = unit(images[:, None] + spread * torch.randn(c, q, dim, generator=g) / dim**0.5)  # (c, Q, E)
        recs = [{"path": f"img/{start + i:08d}.jpg", "mtime_ns": 0, "size": 0} for i in range(c)]
        index.append(x.half().numpy(), recs)
    return index


def make_queries(index: Index, count: int, seed: int = 1):
    g = np.random.default_rng(seed)
    emb = index.embeddings()
    q, dim = index.row_shape
    targets = np.sort(g.choice(emb.shape[0], size=count, replace=False))
    texts, images = [], []
    for r in targets:
        v = torch.from_numpy(np.asarray(emb[r], dtype=np.float32))
        noise = torch.from_numpy(g.standard_normal((q, dim), dtype=np.float32)) / dim**0.5
        texts.append(unit(v[g.integers(q)] + noise[0])[None])
        images.append(unit(v + noise))
    return targets, texts, images


def exact_top(index: Index, queries: list[torch.Tensor], top: int, chunk: int = 8192) -> list[set[int]]:
    """Exact top rows for several queries in one pass over the memory map."""
    emb = index.embeddings()
    best = [(torch.empty(0), torch.empty(0, dtype=torch.long)) for _ in queries]
    for start in range(0, emb.shape[0], chunk):
        block = torch.from_numpy(np.asarray(emb[start : start + chunk])).float()
        rows = torch.arange(start, start + block.shape[0])
        for j, qv in enumerate(queries):
            s = torch.einsum("cqe,me->cqm", block, qv).flatten(1).amax(1)
            scores, idx = torch.cat([best[j][0], s]), torch.cat([best[j][1], rows])
            keep = torch.topk(scores, min(top, scores.numel())).indices
            best[j] = (scores[keep], idx[keep])
    return [set(r.tolist()) for _, r in best]


def evict(folder: Path) -> None:
    """Drop this index's files from the page cache (a cold-ish start without root)."""
    for name in (EMBEDDINGS, SUMMARY):
        fd = os.open(folder / name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="images in the index")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/blip2-bench-index"))
    ap.add_argument("--clusters", type=int, default=0, help="image clusters (default: one per 1000 images)")
    ap.add_argument("--spread", type=float, default=1.0,
                    help="query-vector noise relative to the image (higher: an image's queries differ more)")  # fmt: skip
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument(
        "--candidates", type=int, nargs="+", default=[2000], help="candidate rows (first is timed)"
    )
    ap.add_argument("--recall", action="store_true", help="also compute recall@top against an exact scan")
    ap.add_argument("--keep", action="store_true", help="keep the index folder afterwards")
    ap.add_argument("--reuse", action="store_true", help="search a folder kept by --keep instead of writing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    q, dim = 32, 256
    clusters = args.clusters or max(1, args.n // 1000)

    t0 = time.perf_counter()
    if not (args.reuse and args.dir.exists() and Index.open(args.dir).stored_rows() == args.n):
        synthesise(args.dir, args.n, q, dim, clusters, args.spread)
    t_write = time.perf_counter() - t0
    size = {p.name: p.stat().st_size for p in args.dir.iterdir()}
    evict(args.dir)
    t0 = time.perf_counter()
    index = Index.open(args.dir)
    t_open = time.perf_counter() - t0
    targets, texts, images = make_queries(index, args.queries)
    cand = args.candidates[0]

    def timed(queries):
        evict(args.dir)
        t = time.perf_counter()
        index.search(queries[-1], args.top, candidates=cand)
        cold = time.perf_counter() - t
        times, hits = [], []
        for qv in queries:
            t = time.perf_counter()
            hits.append(index.search(qv, args.top, candidates=cand))
            times.append(time.perf_counter() - t)
        return cold, float(np.median(times)), hits

    c_text, t_text, hits_text = timed(texts)
    c_image, t_image, hits_image = timed(images)
    first = np.mean([h[0].row == r for h, r in zip(hits_text, targets, strict=True)])
    first_img = np.mean([h[0].row == r for h, r in zip(hits_image, targets, strict=True)])
    print(
        f"N={args.n:,} images × {q} × {dim} in {clusters:,} clusters, spread {args.spread}; {cand} candidates"
    )
    print(f"  write index: {t_write:.0f} s; open (manifest): {t_open:.1f} s")
    print("  disk: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in sorted(size.items())))
    print(f"  text query  (1 vector):   cold {c_text * 1000:.0f} ms, warm median {t_text * 1000:.0f} ms; "
          f"source image first in {first:.0%}")  # fmt: skip
    print(f"  image query ({q} vectors): cold {c_image * 1000:.0f} ms, warm median {t_image * 1000:.0f} ms; "
          f"source image first in {first_img:.0%}")  # fmt: skip
    if args.recall:
        t0 = time.perf_counter()
        exact = exact_top(index, texts + images, args.top)
        t_exact = (time.perf_counter() - t0) / len(exact)
        print(f"  exact scan for reference: ~{t_exact:.1f} s per query (one pass for all)")
        for c in args.candidates:
            for name, qs, ex in (
                ("text", texts, exact[: len(texts)]),
                ("image", images, exact[len(texts) :]),
            ):
                got = [{h.row for h in index.search(qv, args.top, candidates=c)} for qv in qs]
                rec = np.mean([len(e & g) / args.top for e, g in zip(ex, got, strict=True)])
                print(f"  {name:5s} recall@{args.top} vs exact, {c} candidates: {rec:.3f}")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
