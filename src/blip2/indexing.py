"""Filling and querying an :mod:`blip2.index` with a model: ``build_index`` embeds a folder of images
(resumable: unchanged files are skipped, changed ones re-embedded, removed ones dropped), ``search_index``
answers a text or image query, optionally re-ranked by ITM. ``blip2.index`` itself knows no model."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .index import META, Hit, Index

# ---- building from a folder of images -----------------------------------------------------------------


@dataclass
class BuildReport:
    added: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)
    not_images: list[str] = field(default_factory=list)
    search: str = "exact"


def image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def scan(root: Path, skip: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``root``, sorted; hidden files and ``skip`` (the index) left out."""
    exts = image_extensions()
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or here / d != skip)
        )
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            (images if Path(name).suffix.lower() in exts else others).append(here / name)
    return images, others


def build_index(pipe, image_dir: str | os.PathLike, out: str | os.PathLike, *, model: str,
                batch_size: int = 32, ann: str = "auto", progress: bool = True,
                on_error=None) -> BuildReport:  # fmt: skip
    """Embed every image under ``image_dir`` into the index ``out``, resuming what is there.

    Files already indexed with the same size and mtime are skipped; new and changed files are embedded
    and appended; files gone from the folder are dropped. Unreadable files are passed to ``on_error``
    (path, message) and skipped. ``ann`` (auto | faiss | exact) says whether to build the FAISS index.
    """
    from tqdm import tqdm

    from .errors import ImageError
    from .images import load_image
    from .retrieval import embed_image_batch, normalized

    root = Path(image_dir).resolve()
    if not root.is_dir():
        raise InputError(f"{image_dir}: not a folder of images")
    out = Path(out)
    cfg = pipe.config
    kind = "itc" if cfg.retrieval else "qformer"
    dim = cfg.image_text_hidden_size if cfg.retrieval else cfg.qformer.hidden_size
    if (out / META).is_file():
        index = Index.open(out)
        want = {"kind": kind, "num_queries": cfg.num_query_tokens, "dim": dim}
        have = {k: index.meta[k] for k in want}
        if have != want or index.meta["model"] != model:
            raise InputError(
                f"{out} was built with {index.meta['model']} ({have}); cannot add {model} ({want}) embeddings"
            )
        index.truncate_to_manifest()
        index.meta["root"] = str(root)
    else:
        index = Index.create(out, model=model, kind=kind, num_queries=cfg.num_query_tokens, dim=dim,
                             root=str(root))  # fmt: skip
    report = BuildReport()
    files, others = scan(root, skip=out.resolve())
    report.not_images = [str(p.relative_to(root)) for p in others]
    todo: list[tuple[Path, dict[str, Any]]] = []
    seen = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        seen.add(rel)
        st = path.stat()
        rec = {"path": rel, "mtime_ns": st.st_mtime_ns, "size": st.st_size}
        old = index.records.get(rel)
        if old and old["mtime_ns"] == rec["mtime_ns"] and old["size"] == rec["size"]:
            report.unchanged += 1
        else:
            todo.append((path, rec))
    gone = [p for p in index.records if p not in seen]
    if gone:
        index.remove(gone)
        report.removed = len(gone)

    bar = tqdm(total=len(todo), unit="img", desc="indexing", disable=not progress, file=sys.stderr)
    processor = pipe.processor.image_processor
    dtype = pipe.model.vision.patch_embed.weight.dtype
    for start in range(0, len(todo), batch_size):
        arrays, recs = [], []
        for path, rec in todo[start : start + batch_size]:
            try:
                arrays.append(processor.preprocess(load_image(path)))
                recs.append(rec)
            except (ImageError, InputError) as e:
                report.failed.append((rec["path"], str(e)))
                if on_error is not None:
                    on_error(rec["path"], str(e))
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
    report.search = index.update_ann(ann)
    return report


def search_index(pipe, index: Index, query: Any, *, top: int = 10, rerank: int = 0,
                 nprobe: int = 32) -> list[Hit]:  # fmt: skip
    """Best ``top`` images of ``index`` for a text (str) or an image (a path, PIL image, …).

    ``rerank``: re-rank the best ``rerank`` hits (-1: all ``top``) by ITM, reading them from the image
    folder; text queries on retrieval checkpoints only.
    """
    from .retrieval import embed_images, embed_texts, itm, normalized

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
        root = Path(index.meta["root"])
        probs = itm(pipe, [root / h.path for h in hits[:k]], query).tolist()
        head = [Hit(h.row, h.path, h.score, p) for h, p in zip(hits[:k], probs, strict=True)]
        hits = sorted(head, key=lambda h: -(h.itm or 0.0)) + hits[k:]
    return hits
