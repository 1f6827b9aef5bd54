"""Filling and querying an :mod:`blip2.index` with a model: ``build_index`` embeds a folder of images
(resumable: unchanged files are skipped, changed ones re-embedded, removed ones dropped), ``search_index``
answers a text or image query, optionally re-ranked by ITM. ``blip2.index`` itself knows no model."""

from __future__ import annotations

import logging
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .images import scan_images
from .index import META, Hit, Index, write_lock

log = logging.getLogger(__name__)

# ---- building from a folder of images -----------------------------------------------------------------


@dataclass
class BuildReport:
    added: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)
    not_images: list[str] = field(default_factory=list)
    reclaimed: int = 0  # rows of removed or changed files dropped by compaction
    search: str = "exact"


def inside(root: Path, rel: str | os.PathLike) -> Path | None:
    """``root / rel`` with every link followed, or None where that leads out of (resolved) ``root``:
    an absolute or ``..`` path, or a link to elsewhere."""
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) else None


def _file_record(root: Path, path: Path) -> dict[str, Any]:
    """The manifest record of an image file found by :func:`scan`; :class:`InputError` saying why the
    file cannot be indexed (gone since the walk, a dangling link, a link out of ``root``, not a file)."""
    rel = path.relative_to(root).as_posix()
    try:
        st = path.stat()
    except OSError as e:
        if path.is_symlink():
            raise InputError(f"a link to a missing file ({os.readlink(path)})") from None
        raise InputError(f"cannot read it ({e.strerror or e}); deleted while indexing?") from None
    if path.is_symlink() and inside(root, rel) is None:
        raise InputError(f"a link out of the indexed folder ({os.readlink(path)}); not followed")
    if not stat.S_ISREG(st.st_mode):
        raise InputError("not a regular file")
    return {"path": rel, "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def build_index(pipe, image_dir: str | os.PathLike, out: str | os.PathLike, *, model: str,
                batch_size: int = 32, ann: str = "auto", progress: bool = True,
                on_error=None) -> BuildReport:  # fmt: skip
    """Embed every image under ``image_dir`` into the index ``out``, resuming what is there.

    Files already indexed with the same size and mtime are skipped; new and changed files are embedded
    and appended; files gone from the folder (or no longer readable) are dropped, and once enough rows
    are dead the index is compacted. Files that cannot be indexed are passed to ``on_error``
    (path, message) and skipped. ``ann`` (auto | faiss | exact) says whether to build the FAISS index.
    Holds the index's write lock throughout: a concurrent build fails at once with
    :class:`~blip2.locking.FolderBusyError`.
    """
    root = Path(image_dir).resolve()
    if not root.is_dir():
        raise InputError(f"{image_dir}: not a folder of images")
    with write_lock(out):
        return _build(pipe, root, Path(out), model, batch_size, ann, progress, on_error)


def _open_for_build(pipe, root: Path, out: Path, model: str) -> Index:
    """The index at ``out``, created or checked to hold this model's embeddings, crash leftovers cut."""
    cfg = pipe.config
    kind = "itc" if cfg.retrieval else "qformer"
    dim = cfg.image_text_hidden_size if cfg.retrieval else cfg.qformer.hidden_size
    if not (out / META).is_file():
        return Index.create(out, model=model, kind=kind, num_queries=cfg.num_query_tokens, dim=dim,
                            root=str(root))  # fmt: skip
    index = Index.open(out)
    want = {"kind": kind, "num_queries": cfg.num_query_tokens, "dim": dim}
    have = {k: index.meta[k] for k in want}
    if have != want or index.meta["model"] != model:
        raise InputError(
            f"{out} was built with {index.meta['model']} ({have}); cannot add {model} ({want}) embeddings"
        )
    index.sweep()
    index.truncate_to_manifest()
    index.meta["root"] = str(root)
    return index


def _build(pipe, root: Path, out: Path, model: str, batch_size: int, ann: str, progress: bool,
           on_error) -> BuildReport:  # fmt: skip
    from tqdm import tqdm

    from .errors import ImageError
    from .images import load_image
    from .retrieval import embed_image_batch, normalized

    index = _open_for_build(pipe, root, out, model)
    report = BuildReport()

    def fail(rel: str, message: str) -> None:
        report.failed.append((rel, message))
        if on_error is not None:
            on_error(rel, message)

    unlisted: list[str] = []  # folders that could not be read: what was indexed under them is kept

    def unlistable(folder: Path, message: str) -> None:
        rel = _relative(folder, root)
        unlisted.append("" if rel == "." else rel + "/")
        fail(rel, message)

    files, others = scan_images(root, skip=out.resolve(), on_error=unlistable)
    report.not_images = [str(p.relative_to(root)) for p in others]
    todo: list[tuple[Path, dict[str, Any]]] = []
    seen = set()
    for path in files:
        try:
            rec = _file_record(root, path)
        except InputError as e:  # not seen: an indexed version of it is dropped below
            fail(path.relative_to(root).as_posix(), str(e))
            continue
        seen.add(rec["path"])
        old = index.records.get(rec["path"])
        if old and old["mtime_ns"] == rec["mtime_ns"] and old["size"] == rec["size"]:
            report.unchanged += 1
        else:
            todo.append((path, rec))
    gone = [p for p in index.records if p not in seen and not p.startswith(tuple(unlisted))]
    if gone:
        index.remove(gone)
        report.removed = len(gone)

    bar = tqdm(total=len(todo), unit="img", desc="indexing", disable=not progress, file=sys.stderr)
    processor = pipe.processor.image_processor
    dtype = pipe.model.vision.patch_embed.weight.dtype
    kind = index.meta["kind"]
    for start in range(0, len(todo), batch_size):
        arrays, recs, stale = [], [], []
        for path, rec in todo[start : start + batch_size]:
            try:
                arrays.append(processor.preprocess(load_image(path)))
                recs.append(rec)
            except (ImageError, InputError) as e:
                fail(rec["path"], str(e))
                if rec["path"] in index.records:  # changed, and now unreadable: the old rows are stale
                    stale.append(rec["path"])
        if stale:
            index.remove(stale)
        if arrays:
            pixels = torch.from_numpy(np.stack(arrays)).to(pipe.device, dtype)
            embeds = embed_image_batch(pipe, pixels)
            if kind == "qformer":
                embeds = normalized(embeds)
            index.append(embeds.cpu().numpy(), recs)
            report.added += len(recs)
        bar.update(len(todo[start : start + batch_size]))
    bar.close()
    index.save_meta()
    if index.wants_compaction():
        report.reclaimed = index.compact()
    report.search = index.update_ann(ann)
    return report


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def search_index(pipe, index: Index, query: Any, *, top: int = 10, rerank: int = 0,
                 nprobe: int = 32) -> list[Hit]:  # fmt: skip
    """Best ``top`` images of ``index`` for a text (str) or an image (a path, PIL image, …).

    ``rerank``: re-rank the best ``rerank`` hits (-1: all ``top``) by ITM, reading them from the image
    folder; text queries on retrieval checkpoints only. A hit whose file is gone, unreadable, or outside
    the indexed folder (a crafted row, a link out) is not opened: it is left out, with a warning.
    """
    from .retrieval import embed_images, embed_texts, normalized

    if top < 1:
        raise InputError(f"top must be at least 1, got {top}")
    kind = "itc" if pipe.config.retrieval else "qformer"
    if kind != index.meta["kind"]:
        raise InputError(f"{index.folder} holds {index.meta['kind']} embeddings; this model gives {kind}")
    if isinstance(query, str):
        if kind != "itc":
            raise InputError("text search needs a retrieval checkpoint (e.g. Salesforce/blip2-itm-vit-g)")
        vectors = embed_texts(pipe, query)  # (1, E)
    else:
        vectors = embed_images(pipe, query)[0]  # (Q, E)
        if kind == "qformer":
            vectors = normalized(vectors)
        if rerank:
            raise InputError("re-ranking by ITM needs a text query")
    hits = index.search(vectors, top, nprobe=nprobe)
    if rerank:
        k = len(hits) if rerank < 0 else min(rerank, len(hits))
        hits = _rerank(pipe, Path(index.meta["root"]).resolve(), hits[:k], query) + hits[k:]
    return hits


def _rerank(pipe, root: Path, hits: list[Hit], text: str, batch_size: int = 32) -> list[Hit]:
    """``hits`` with their ITM probability, best first, reading at most ``batch_size`` images at a time;
    a hit that cannot be read from inside ``root`` is left out with a warning."""
    from .errors import ImageError
    from .images import load_image
    from .retrieval import itm

    scored: list[Hit] = []
    for start in range(0, len(hits), batch_size):
        kept, images = [], []
        for hit in hits[start : start + batch_size]:
            path = inside(root, hit.path)
            if path is None:
                log.warning("%s: outside the indexed folder %s; not opened, left out", hit.path, root)
                continue
            try:
                images.append(load_image(path))
            except ImageError as e:
                log.warning("%s; left out (re-run `blip2 index` to update the index)", e)
                continue
            kept.append(hit)
        if kept:
            probs = itm(pipe, images, text, batch_size).tolist()
            scored += [Hit(h.row, h.path, h.score, p) for h, p in zip(kept, probs, strict=True)]
    return sorted(scored, key=lambda h: -(h.itm or 0.0))
