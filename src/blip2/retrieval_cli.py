"""``blip2 index DIR --out INDEX`` and ``blip2 search QUERY --index INDEX``: thin shells over blip2.indexing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g"


def _model_id(name: str) -> str:
    """A local folder is recorded by its absolute path, a hub id as written."""
    path = Path(name)
    return str(path.resolve()) if path.exists() else name


def _index(args: argparse.Namespace) -> int:
    if args.from_bulk is not None or args.dir is None:
        return _index_from_bulk(args)
    import blip2
    from blip2.index import write_lock
    from blip2.indexing import build_index
    from blip2.models.checkpoint import retrieval_checkpoint

    def report(path: str, message: str) -> None:
        print(f"blip2: skipped {path}: {message}", file=sys.stderr)

    with write_lock(args.out):  # taken before the model loads, so a second run fails at once
        pipe = blip2.load(
            retrieval_checkpoint(args.model), device=args.device, dtype=args.dtype, exact=args.exact
        )
        r = build_index(pipe, args.dir, args.out, model=_model_id(args.model), batch_size=args.batch_size,
                        ann=args.ann, progress=not args.quiet, on_error=report)  # fmt: skip
    for path in r.not_images:
        print(f"blip2: skipped {path}: not an image file (extension)", file=sys.stderr)
    reclaimed = f"; {r.reclaimed} stale rows reclaimed" if r.reclaimed else ""
    print(
        f"blip2: {r.added} added, {r.unchanged} unchanged, {r.removed} removed, "
        f"{len(r.failed) + len(r.not_images)} skipped (unreadable or not images){reclaimed}; search: {r.search}",
        file=sys.stderr,
    )
    return 0


def _index_from_bulk(args: argparse.Namespace) -> int:
    """``blip2 index --from DIR``: the embeddings of ``blip2 bulk embed``, no model loaded."""
    from blip2.errors import InputError

    if args.dir is not None or args.from_bulk is None:
        raise InputError("give a folder of images (DIR) or a `blip2 bulk embed` output (--from), one of them")
    from blip2.bulk.to_index import index_from_bulk

    r = index_from_bulk(args.from_bulk, args.out, ann=args.ann)
    print(
        f"blip2: {r.added} added, {r.unchanged} unchanged, {r.unreadable} unreadable in the bulk output; "
        f"search: {r.search}"
        + (f"; {r.missing_parts} parts of the bulk job not written yet" if r.missing_parts else ""),
        file=sys.stderr,
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    import blip2
    from blip2.index import Index
    from blip2.indexing import search_index
    from blip2.models.checkpoint import retrieval_checkpoint

    index = Index.open(args.index)
    pipe = blip2.load(
        retrieval_checkpoint(args.model or index.meta["model"]),
        device=args.device,
        dtype=args.dtype,
        exact=args.exact,
    )
    query = Path(args.query) if args.image else args.query
    hits = search_index(pipe, index, query, top=args.top, rerank=args.rerank, nprobe=args.nprobe)
    for hit in hits:
        if args.json:
            print(json.dumps({"path": hit.path, "score": hit.score, "itm": hit.itm}))
        elif hit.itm is not None:
            print(f"{hit.itm:.4f}  itc {hit.score:.4f}  {hit.path}")
        else:
            print(f"{hit.score:.4f}  {hit.path}")
    return 0


def register(subparsers) -> None:
    from blip2.cli import model_options

    common = model_options()
    common.set_defaults(model=RETRIEVAL_MODEL)
    p = subparsers.add_parser("index", parents=[common], help="embed every image under a folder (resumable)")
    p.add_argument("dir", metavar="DIR", nargs="?", help="folder of images (searched recursively)")
    p.add_argument("--from", dest="from_bulk", metavar="BULK_DIR", default=None,
                   help="instead of DIR: the output of `blip2 bulk embed` (no model is loaded)")  # fmt: skip
    p.add_argument("--out", "-o", required=True, metavar="INDEX", help="index folder (created or resumed)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--ann", choices=["auto", "faiss", "exact"], default="auto",
                   help="auto: summary candidates + exact re-score for ≥20k images; faiss: IVF-PQ; exact: full scan")  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_index)

    common = model_options()
    common.set_defaults(model=None)
    p = subparsers.add_parser("search", parents=[common], help="search an index by text or by an image")
    p.add_argument("query", metavar="QUERY", help="text, or an image file with --image")
    p.add_argument("--index", "-i", required=True, metavar="INDEX", help="index folder from `blip2 index`")
    p.add_argument("--image", action="store_true", help="QUERY is an image file: find similar images")
    p.add_argument("--top", type=int, default=10, help="how many matches (default 10)")
    p.add_argument("--rerank", nargs="?", type=int, const=-1, default=0, metavar="K",
                   help="re-rank the best K (default: --top) by ITM; text queries only")  # fmt: skip
    p.add_argument("--nprobe", type=int, default=32, help="FAISS lists visited per query vector")
    p.add_argument("--json", action="store_true", help='one JSON line per match: {"path", "score", "itm"}')
    p.set_defaults(func=_search)
