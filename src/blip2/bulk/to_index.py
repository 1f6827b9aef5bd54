"""``blip2 index --from DIR``: a search index (blip2.index) from the output of ``blip2 bulk embed``.

No model is loaded: the embeddings are already what the index stores (normalised, float16), so a
collection embedded on a cluster is indexed and searched on a laptop. Re-running adds what is new or
changed (by the input's size and mtime, as ``blip2 index`` does for a folder) and skips the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from ..errors import InputError
from ..index import META, Index
from .read import dense_embeddings
from .store import INPUTS, part_files, read_job


@dataclass
class FromBulkReport:
    added: int = 0
    unchanged: int = 0
    unreadable: int = 0  # rows of the bulk output with an error (no embedding)
    missing_parts: int = 0  # parts the bulk job has not written yet
    search: str = "exact"


def index_from_bulk(
    bulk_dir: str | os.PathLike, out: str | os.PathLike, *, ann: str = "auto"
) -> FromBulkReport:
    """Add every embedding of the bulk output ``bulk_dir`` to the index ``out`` (created, or resumed)."""
    bulk_dir, out = Path(bulk_dir), Path(out)
    job = read_job(bulk_dir)
    emb = job.get("embedding")
    if job["task"]["verb"] != "embed" or not emb:
        raise InputError(f"{bulk_dir} holds `bulk {job['task']['verb']}` output; an index needs `bulk embed`")
    kind, q, e = emb["kind"], int(emb["num_queries"]), int(emb["dim"])
    if (out / META).is_file():
        index = Index.open(out)
        want = {"kind": kind, "num_queries": q, "dim": e, "model": job["model"]}
        have = {k: index.meta[k] for k in want}
        if have != want:
            raise InputError(f"{out} holds other embeddings ({have}); {bulk_dir} has {want}")
        index.truncate_to_manifest()
    else:
        index = Index.create(
            out, model=job["model"], kind=kind, num_queries=q, dim=e, root=job.get("base") or ""
        )
    stamps = pq.read_table(bulk_dir / INPUTS, columns=["key", "mtime_ns", "size"]).to_pylist()
    stamp = {r["key"]: (r["mtime_ns"], r["size"]) for r in stamps}
    report = FromBulkReport()
    parts = part_files(bulk_dir)
    report.missing_parts = -(-int(job["inputs"]) // int(job["part_size"])) - len(parts)
    for part in parts:
        table = pq.read_table(part, columns=["key", "embedding"])
        data, missing = dense_embeddings(table.column("embedding"))
        keep, records = [], []
        for i, key in enumerate(table.column("key").to_pylist()):
            if missing[i]:
                report.unreadable += 1
                continue
            mtime, size = stamp.get(key, (0, -1))
            old = index.records.get(key)
            if old and old.get("mtime_ns") == mtime and old.get("size") == size:
                report.unchanged += 1
                continue
            keep.append(i)
            records.append({"path": key, "mtime_ns": mtime, "size": size})
        if keep:
            index.append(data[keep], records)
            report.added += len(keep)
    index.save_meta()
    report.search = index.update_ann(ann)
    return report
