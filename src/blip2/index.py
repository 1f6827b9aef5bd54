"""An on-disk image index: per-image query embeddings for exact scoring, a summary matrix for scale.

Folder layout (``INDEX/``)::

    meta.json         format, model, kind ("itc" | "qformer"), num_queries, dim, image root, ann state,
                      generation (which set of the files below is current)
    manifest.jsonl    one JSON line per event: {"path", "mtime_ns", "size", "row"} or {"path", "removed": true};
                      the last line of a path wins, so re-indexing only appends
    embeddings.f16    (rows, Q, E) float16, row-major, appended batch by batch; read as a memory map
    summary.f16       (rows, E) float16: each row's normalised mean query vector, appended with it
    ann.faiss         optional (``--ann faiss``): FAISS IVF-PQ over every query vector (id = row),
                      covering rows [0, ann.rows)
    lock              held (flock) by the one process writing the index (:func:`blip2.locking.folder_lock`)

Rows of removed or changed files stay in the files until :meth:`Index.compact` rewrites the live rows
into a new *generation* of them (``embeddings.3.f16``, ``summary.3.f16``, ``manifest.3.jsonl``; generation
0 keeps the plain names above, so folders written before compaction existed read as they are). The
switch is the atomic replacement of ``meta.json``: a crash at any moment leaves one whole generation.

Search scores an image by the max over its queries (and over the query's vectors, for an image query)
of the cosine similarity, exactly as ITC does. Small indexes (< :data:`ANN_MIN_ROWS`) are scanned exactly
in chunks of the memory map. Large ones pick candidates with one matrix-vector product of the query's
(mean) vector against the summary matrix (512 MB per million images, no training), then re-score only
those candidate rows exactly from the embeddings: approximate in which images are considered, exact in
how they are scored. With a FAISS index, FAISS nominates the candidates instead; rows appended since it
was last extended are scanned exactly, so the answer never misses new images.

Shapes: ``R`` rows, ``Q`` queries per image, ``E`` embedding width, ``M`` query vectors.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .locking import FolderBusyError, folder_lock

log = logging.getLogger(__name__)

FORMAT = 2  # 2: generations of data files (format 1, generation 0 only, is read as well)
READABLE_FORMATS = (1, 2)
META, MANIFEST, EMBEDDINGS, ANN = "meta.json", "manifest.jsonl", "embeddings.f16", "ann.faiss"
SUMMARY = "summary.f16"
LOCK = "lock"
# Data files of any generation (and their temporaries): generation 0 has no number.
DATA_FILE = re.compile(r"(embeddings|summary|manifest|ann)(?:\.(\d+))?\.(f16|jsonl|faiss)(\.tmp)?")
# An index is compacted when at least this fraction of its rows is dead, or whenever it is this small.
COMPACT_DEAD_FRACTION = 0.25
COMPACT_ALWAYS_BYTES = 256 << 20
# Below this many images an exact scan of the memory map is fast (~50 ms per 10k rows): no candidate stage.
ANN_MIN_ROWS = 20_000
# Candidate rows re-scored exactly by the summary search (32 MB of random reads at 16 KiB per row).
CANDIDATES = 2000


def write_lock(folder: str | os.PathLike):
    """Context manager holding ``folder``'s write lock (see :func:`blip2.locking.folder_lock`): one
    `blip2 index` at a time; another fails at once with :class:`~blip2.locking.FolderBusyError`."""
    return folder_lock(folder, what="index", holder="another `blip2 index`", name=LOCK)


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Hit:
    row: int
    path: str
    score: float
    itm: float | None = None


@dataclass
class Index:
    folder: Path
    meta: dict[str, Any]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> its live record
    _ann: Any = field(default=None, repr=False)  # the FAISS index, read once per Index
    _rows: tuple[np.ndarray, dict[int, str]] | None = field(default=None, repr=False)  # (live, paths) cache

    # ---- opening ------------------------------------------------------------------------------------

    @classmethod
    def create(cls, folder: str | os.PathLike, *, model: str, kind: str, num_queries: int, dim: int,
               root: str) -> Index:  # fmt: skip
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "model": model,
            "kind": kind,
            "num_queries": num_queries,
            "dim": dim,
            "dtype": "float16",
            "root": root,
            "ann": None,
        }
        index = cls(folder, meta)
        index.save_meta()
        for name in (MANIFEST, EMBEDDINGS, SUMMARY):
            index.file(name).touch()
        return index

    @classmethod
    def open(cls, folder: str | os.PathLike, *, retry: bool = True) -> Index:
        folder = Path(folder)
        if not (folder / META).is_file():
            raise InputError(f"{folder}: not a blip2 index (no {META}); build one with `blip2 index`")
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{folder / META}: unreadable ({e})") from None
        if meta.get("format") not in READABLE_FORMATS:
            raise InputError(
                f"{folder}: index format {meta.get('format')!r}, this blip2 reads {READABLE_FORMATS}; "
                "rebuild it with `blip2 index`"
            )
        index = cls(folder, meta)
        try:
            index._read_manifest()
        except FileNotFoundError:
            if retry:  # compacted (and the old generation swept) between reading meta and manifest
                return cls.open(folder, retry=False)
            raise
        return index

    @property
    def generation(self) -> int:
        return int(self.meta.get("generation", 0))

    def file(self, name: str, generation: int | None = None) -> Path:
        """Path of data file ``name`` (e.g. :data:`EMBEDDINGS`) in the current (or given) generation."""
        gen = self.generation if generation is None else generation
        if gen == 0:
            return self.folder / name
        stem, ext = name.split(".", 1)
        return self.folder / f"{stem}.{gen}.{ext}"

    def refresh(self) -> None:
        """Re-open if another process compacted the index since this object read it (a new generation)."""
        try:
            gen = int(json.loads((self.folder / META).read_text()).get("generation", 0))
        except (OSError, ValueError):
            return
        if gen != self.generation:
            fresh = Index.open(self.folder)
            self.meta, self.records, self._rows, self._ann = fresh.meta, fresh.records, None, None

    def _read_manifest(self) -> None:
        """Replay the manifest; rows beyond what the embeddings file holds (a crash mid-write) are dropped."""
        stored = self.stored_rows()
        self.records, self._rows = {}, None
        with open(self.file(MANIFEST), encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                if rec.get("removed"):
                    self.records.pop(rec["path"], None)
                elif rec.get("row", stored) < stored:
                    self.records[rec["path"]] = rec

    def save_meta(self) -> None:
        tmp = self.folder / (META + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.meta, indent=2) + "\n")
            _sync(f)
        tmp.replace(self.folder / META)

    # ---- sizes and storage --------------------------------------------------------------------------

    @property
    def row_shape(self) -> tuple[int, int]:
        return int(self.meta["num_queries"]), int(self.meta["dim"])

    @property
    def row_bytes(self) -> int:
        q, e = self.row_shape
        return q * e * 2

    def stored_rows(self) -> int:
        return self.file(EMBEDDINGS).stat().st_size // self.row_bytes

    def __len__(self) -> int:
        """Live images (removed and replaced files excluded)."""
        return len(self.records)

    def embeddings(self) -> np.ndarray:
        """(R, Q, E) float16 memory map (copy-on-write: never written back) of every stored row."""
        rows = self.stored_rows()
        if rows == 0:
            return np.zeros((0, *self.row_shape), np.float16)
        return np.memmap(self.file(EMBEDDINGS), np.float16, "c", shape=(rows, *self.row_shape))

    def summary_rows(self) -> int:
        f = self.file(SUMMARY)
        return f.stat().st_size // (self.row_shape[1] * 2) if f.exists() else 0

    def summary(self) -> np.ndarray:
        """(R, E) float16 memory map of the per-row normalised mean query vectors."""
        rows, e = self.summary_rows(), self.row_shape[1]
        if rows == 0:
            return np.zeros((0, e), np.float16)
        return np.memmap(self.file(SUMMARY), np.float16, "c", shape=(rows, e))

    def sync_summary(self, chunk_rows: int = 16_384) -> None:
        """Make ``summary.f16`` cover exactly the stored embedding rows: cut rows past them (a crash between
        the two writes), compute missing ones from the embeddings (an index built before summaries)."""
        rows, have = self.stored_rows(), self.summary_rows()
        f = self.file(SUMMARY)
        if have > rows or (f.exists() and f.stat().st_size != have * self.row_shape[1] * 2):
            os.truncate(f, min(have, rows) * self.row_shape[1] * 2)
            have = min(have, rows)
        if have == rows:
            return
        log.info("%s: computing summaries of rows %d..%d", self.folder, have, rows)
        emb = self.embeddings()
        with open(f, "ab") as out:
            for start in range(have, rows, chunk_rows):
                out.write(_summarise(np.asarray(emb[start : start + chunk_rows])).tobytes())
            _sync(out)

    def _row_cache(self) -> tuple[np.ndarray, dict[int, str]]:
        if self._rows is None or self._rows[0].shape[0] != self.stored_rows():
            live = np.zeros(self.stored_rows(), dtype=bool)
            live[[rec["row"] for rec in self.records.values()]] = True
            self._rows = (live, {rec["row"]: path for path, rec in self.records.items()})
        return self._rows

    def live_rows(self) -> np.ndarray:
        """(R,) bool: which rows belong to a file still in the index."""
        return self._row_cache()[0]

    def paths_by_row(self) -> dict[int, str]:
        return self._row_cache()[1]

    def truncate_to_manifest(self) -> None:
        """Drop embedding rows no manifest line points to (written before a crash): resume appends after."""
        rows = max((rec["row"] for rec in self.records.values()), default=-1) + 1
        with open(self.file(MANIFEST), encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "row" in rec:
                    rows = max(rows, rec["row"] + 1)
        rows = min(rows, self.stored_rows())
        os.truncate(self.file(EMBEDDINGS), rows * self.row_bytes)
        self._rows = None
        self.sync_summary()

    def append(self, embeds: np.ndarray, records: list[dict[str, Any]]) -> None:
        """Write (B, Q, E) embeddings, then their summaries, then their manifest lines (so a crash never
        names missing rows; :meth:`truncate_to_manifest` cuts both files back to the manifest)."""
        if embeds.shape[1:] != self.row_shape:
            raise InputError(f"embeddings of shape {embeds.shape[1:]} do not fit this index {self.row_shape}")
        embeds = np.ascontiguousarray(embeds, dtype=np.float16)
        self.sync_summary()
        start = self.stored_rows()
        for name, data in ((EMBEDDINGS, embeds), (SUMMARY, _summarise(embeds))):
            with open(self.file(name), "ab") as f:
                f.write(data.tobytes())
                _sync(f)
        self._rows = None
        with open(self.file(MANIFEST), "a", encoding="utf-8") as f:
            for i, rec in enumerate(records):
                rec = {**rec, "row": start + i}
                self.records[rec["path"]] = rec
                f.write(json.dumps(rec) + "\n")

    def remove(self, paths: list[str]) -> None:
        self._rows = None
        with open(self.file(MANIFEST), "a", encoding="utf-8") as f:
            for path in paths:
                self.records.pop(path, None)
                f.write(json.dumps({"path": path, "removed": True}) + "\n")

    # ---- reclaiming the rows of removed and changed files ---------------------------------------------

    def dead_rows(self) -> int:
        """Stored rows no live file points to (removed files, old versions of changed ones)."""
        return self.stored_rows() - len(self.records)

    def wants_compaction(self) -> bool:
        """Whether :meth:`compact` is worth its copy: a quarter of the rows dead, or any in a small index
        (so storage stays within 4/3 of the live rows, and the copying is paid for by the rows it frees)."""
        dead = self.dead_rows()
        small = self.stored_rows() * self.row_bytes <= COMPACT_ALWAYS_BYTES
        return dead > 0 and (small or dead >= COMPACT_DEAD_FRACTION * self.stored_rows())

    def compact(self, chunk_rows: int = 4096) -> int:
        """Rewrite the live rows, in their order, into a new generation of the data files and switch to
        it; returns how many rows were dropped. Call it holding the write lock.

        The new files are complete and synced before ``meta.json`` names them, and the old ones are
        deleted only after, so a crash leaves either generation whole. Row numbers change, so a FAISS
        index is not carried over: the next :meth:`update_ann` rebuilds it.
        """
        self.sync_summary()
        live = sorted(self.records.values(), key=lambda rec: rec["row"])
        old_rows = np.array([rec["row"] for rec in live], dtype=np.int64)
        dropped = self.stored_rows() - len(live)
        gen = self.generation + 1
        summary = self.summary()
        with open(self.file(EMBEDDINGS, gen), "wb") as emb, open(self.file(SUMMARY, gen), "wb") as summ:
            for start in range(0, len(old_rows), chunk_rows):
                part = old_rows[start : start + chunk_rows]
                emb.write(self._read_rows(part).tobytes())
                summ.write(np.asarray(summary[part]).tobytes())
            _sync(emb)
            _sync(summ)
        records = {rec["path"]: {**rec, "row": i} for i, rec in enumerate(live)}
        with open(self.file(MANIFEST, gen), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records.values())
            _sync(f)
        ann = self.meta.get("ann") or {}
        self.meta = {**self.meta, "format": FORMAT, "generation": gen}
        if ann.get("type") == "faiss":
            self.meta["ann"] = {**ann, "rows": 0}
        self.save_meta()  # the switch
        self.records, self._rows, self._ann = records, None, None
        self.sweep()
        return dropped

    def sweep(self) -> None:
        """Delete data files of other generations (the old one after a compaction, or a new one left
        half-written by a crash) and temporaries a crash left. Call it holding the write lock."""
        for f in self.folder.iterdir():
            m = DATA_FILE.fullmatch(f.name)
            if m and (m.group(4) or int(m.group(2) or 0) != self.generation):
                f.unlink(missing_ok=True)

    # ---- candidate stage ----------------------------------------------------------------------------

    def update_ann(self, mode: str = "auto", chunk_rows: int = 16_384) -> str:
        """Prepare the candidate stage for large indexes. ``mode``: auto | faiss | exact.

        Returns what search of this index will use: "summary", "faiss" or "exact". ``auto`` keeps the
        summary matrix up to date (no training, written with the rows) and extends a FAISS index only if
        one was built before; ``faiss`` builds or extends FAISS IVF-PQ over every query vector; ``exact``
        drops FAISS and makes every search a full exact scan.
        """
        if mode not in ("auto", "faiss", "exact"):
            raise InputError(f"ann mode must be auto, faiss or exact, not {mode!r}")
        self.sync_summary(chunk_rows)
        rows = self.stored_rows()
        ann_file = self.file(ANN)
        state = self.meta.get("ann") or {}
        unassisted = "summary" if rows >= ANN_MIN_ROWS else "exact"
        if mode == "exact":
            ann_file.unlink(missing_ok=True)
            self._ann = None
            self.meta["ann"] = {"type": "exact"}
            self.save_meta()
            return "exact"
        if mode == "auto" and state.get("type") != "faiss":
            if state:
                self.meta["ann"] = None
                self.save_meta()
            return unassisted
        if not have_faiss():
            if mode == "auto":  # built with FAISS elsewhere: keep it for when FAISS is back
                log.warning("%s: FAISS is not installed; searching without it", self.folder)
                return unassisted
            raise InputError("FAISS is not installed: pip install 'blip2[index]' (or faiss-cpu)")
        import faiss

        q, e = self.row_shape
        self._ann = None
        if rows == 0:  # nothing to train on yet: the first run that adds images builds it
            ann_file.unlink(missing_ok=True)
            self.meta["ann"] = {"type": "faiss", "factory": None, "rows": 0}
            self.save_meta()
            return unassisted
        emb = self.embeddings()
        factory = _ann_factory(rows * q, e)
        if state.get("factory") == factory and ann_file.exists():
            ann, done = faiss.read_index(str(ann_file)), int(state["rows"])
        else:  # new, compacted (row numbers changed), or grown past what its lists were sized for
            ann, done = _new_ann(faiss, emb, factory), 0
        for start in range(done, rows, chunk_rows):
            block = torch.from_numpy(np.asarray(emb[start : start + chunk_rows])).float().numpy()  # (c, Q, E)
            ids = np.repeat(np.arange(start, start + block.shape[0], dtype=np.int64), q)
            ann.add_with_ids(block.reshape(-1, e), ids)
        faiss.write_index(ann, str(ann_file) + ".tmp")
        os.replace(str(ann_file) + ".tmp", ann_file)
        self.meta["ann"] = {"type": "faiss", "factory": factory, "rows": rows}
        self.save_meta()
        return "faiss"

    def _read_rows(self, rows: np.ndarray, threads: int = 16) -> np.ndarray:
        """(c, Q, E) float16 embeddings of ``rows``. Read by several threads at once: candidate rows are
        random 16 KiB reads, and a cold disk answers many in flight far faster than one page fault at a time."""
        if not hasattr(os, "preadv") or len(rows) < 64:
            return np.asarray(self.embeddings()[rows])
        out = np.empty((len(rows), *self.row_shape), np.float16)
        buf = out.reshape(len(rows), -1).view(np.uint8)  # (c, row bytes)
        fd = os.open(self.file(EMBEDDINGS), os.O_RDONLY)

        def read(part: np.ndarray) -> None:
            for i in part:
                os.preadv(fd, [buf[i]], int(rows[i]) * self.row_bytes)

        try:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(read, np.array_split(np.arange(len(rows)), threads)))
        finally:
            os.close(fd)
        return out

    def _summary_candidates(self, q: torch.Tensor, k: int, live: np.ndarray,
                            chunk_rows: int = 65_536) -> np.ndarray | None:  # fmt: skip
        """Sorted rows of the ``k`` live images whose summary best matches the (M, E) query's mean vector;
        None when the summary cannot be brought up to date (a read-only index folder, or one a `blip2 index`
        is writing: it brings the summary up to date itself)."""
        if self.summary_rows() < live.shape[0]:
            try:
                with write_lock(self.folder):
                    self.sync_summary()
            except FolderBusyError:
                return None
            except OSError as e:
                log.warning("%s: cannot update %s (%s); scanning exactly", self.folder, SUMMARY, e)
                return None
        summ = self.summary()[: live.shape[0]]  # a concurrent `blip2 index` may have written more rows
        if summ.shape[0] < live.shape[0]:
            return None
        qm = torch.nn.functional.normalize(q.mean(0), dim=0).half()  # (E,)
        scores = torch.empty(summ.shape[0])
        for start in range(0, summ.shape[0], chunk_rows):
            block = torch.from_numpy(np.asarray(summ[start : start + chunk_rows]))  # (c, E) float16
            scores[start : start + block.shape[0]] = (block @ qm).float()
        scores[torch.from_numpy(~live)] = -torch.inf
        return np.sort(torch.topk(scores, min(k, int(live.sum()))).indices.numpy())

    # ---- search -------------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor | np.ndarray, top: int = 10, *, nprobe: int = 32,
               candidates: int | None = None, exact_below: int = ANN_MIN_ROWS,
               chunk_rows: int = 8192) -> list[Hit]:  # fmt: skip
        """Best ``top`` live images for (M, E) normalised query vectors, by max-over-vectors cosine.

        Indexes of fewer than ``exact_below`` rows are scanned exactly. Larger ones take the ``candidates``
        rows (default :data:`CANDIDATES`) whose summary best matches the query's mean vector and score
        those exactly. With a FAISS index, ``candidates`` query vectors per query vector (default
        ``max(256, 32·top)``) nominate the rows instead; rows FAISS does not cover are scanned exactly.
        """
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32)).contiguous()
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.row_shape[1]:
            raise InputError(
                f"query vectors of shape {tuple(q.shape)} do not fit this index (dim {self.row_shape[1]})"
            )
        self.refresh()
        emb = self.embeddings()
        live = self.live_rows()
        rows = emb.shape[0]
        if rows == 0 or not live.any():
            return []
        state = self.meta.get("ann") or {}
        covered = 0
        cand: list[np.ndarray] = []
        if state.get("type") == "faiss" and state.get("rows") and self.file(ANN).exists() and have_faiss():
            import faiss

            if self._ann is None:
                self._ann = faiss.read_index(str(self.file(ANN)))
            ann = self._ann
            faiss.extract_index_ivf(ann).nprobe = nprobe
            covered = min(int(state["rows"]), rows)
            k = candidates or max(256, 32 * top)
            _, ids = ann.search(q.numpy(), min(k, ann.ntotal))
            found = np.unique(ids[(ids >= 0) & (ids < rows)])
            cand.append(found[live[found]])
        elif state.get("type") != "exact" and rows >= exact_below and live.sum() > (candidates or CANDIDATES):
            found = self._summary_candidates(q, max(top, candidates or CANDIDATES), live)
            if found is not None:
                cand.append(found)
                covered = rows
        scores_all: list[tuple[np.ndarray, np.ndarray]] = []
        if cand:
            picked = np.sort(np.concatenate(cand))
            if picked.size:
                block = torch.from_numpy(self._read_rows(picked)).float()
                scores_all.append((picked, _max_cos(block, q)))
        for start in range(covered, rows, chunk_rows):
            block = torch.from_numpy(np.asarray(emb[start : start + chunk_rows])).float()
            scores = _max_cos(block, q)
            idx = np.arange(start, start + block.shape[0])
            keep = live[idx]
            scores, idx = scores[keep], idx[keep]
            if scores.size > top:
                best = np.argpartition(-scores, top)[:top]
                scores, idx = scores[best], idx[best]
            scores_all.append((idx, scores))
        if not scores_all:
            return []
        idx = np.concatenate([i for i, _ in scores_all])
        scores = np.concatenate([s for _, s in scores_all])
        order = np.argsort(-scores, kind="stable")[:top]
        paths = self.paths_by_row()
        return [Hit(int(idx[i]), paths[int(idx[i])], float(scores[i])) for i in order]


def _max_cos(block: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """(c, Q, E) rows with (M, E) query vectors -> (c,) max over both of the dot product."""
    return torch.einsum("cqe,me->cqm", block, queries).flatten(1).amax(dim=1).numpy()


def _summarise(embeds: np.ndarray) -> np.ndarray:
    """(B, Q, E) float16 query embeddings -> (B, E) float16 normalised means (the candidate-stage rows)."""
    mean = torch.from_numpy(np.ascontiguousarray(embeds)).float().mean(dim=1)
    return torch.nn.functional.normalize(mean, dim=-1).half().numpy()


def _ann_factory(n_vectors: int, dim: int) -> str:
    """FAISS factory string for ``n_vectors`` of width ``dim``: inverted lists of ~4k-30k vectors each
    (k-means needs ~39 points per list); PQ codes of 8-dim sub-vectors (32 B per 256-d vector) once there
    are enough vectors to train them, else raw vectors. An index whose factory no longer matches its
    size is rebuilt (each time the vector count about quadruples: amortised, a constant per vector)."""
    nlist = int(min(4096, max(1, 2 ** round(np.log2(max(n_vectors, 1) ** 0.5 / 4)))))
    nlist = max(1, min(nlist, n_vectors // 39))
    m = next(m for m in (dim // 8, dim // 4, dim // 2, dim) if dim % m == 0)
    return f"IVF{nlist},PQ{m}" if n_vectors >= 65_536 else f"IVF{nlist},Flat"


def _new_ann(faiss, emb: np.ndarray, factory: str):
    """An IVF index (inner product) built from ``factory``, trained on a sample of the stored vectors."""
    dim = emb.shape[2]
    ann = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    nlist = faiss.extract_index_ivf(ann).nlist
    n_vectors = emb.shape[0] * emb.shape[1]
    want = min(n_vectors, max(nlist * 40, 10_000), 262_144)
    rng = np.random.default_rng(0)
    q = emb.shape[1]
    rows = np.sort(rng.choice(emb.shape[0], size=min(emb.shape[0], -(-want // q)), replace=False))
    sample = np.asarray(emb[rows], dtype=np.float32).reshape(-1, dim)
    ann.train(sample)
    return ann


def _sync(f) -> None:
    """Flush a file written in Python to the disk."""
    f.flush()
    os.fsync(f.fileno())
