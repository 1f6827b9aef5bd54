"""The output folder of a bulk job: a Parquet dataset written part by part, resumable, each row once.

Layout (``DIR/``)::

    _job.json           the job (task, model and load options, SOURCE, part size, embedding shape);
                        a second run must describe the same job, and then resumes it
    _inputs.parquet     every input, in order (see blip2.bulk.sources), fixed when the job starts
    part-00000.parquet  the rows of inputs [0, part_size), in input order (then question order)
    part-00001.parquet  ...
    _lock               held (flock) while a job writes here

Readers of the dataset (``pyarrow.dataset``, pandas, Spark, DuckDB's ``part-*.parquet``) skip the files
starting with ``_`` and ``.``. A part is written to ``.part-N.parquet.<pid>.tmp`` and renamed into place
when all its rows are in, so a part file is complete or absent; a restart deletes temporary leftovers,
re-checks the row count of the parts present, and redoes the units that have no (valid) part.
Rows reach the :class:`Sink` keyed by (unit, position, question): a row that arrives twice (a task retried
after a worker died) is dropped, so no row is written twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from .tasks import Row, Task

log = logging.getLogger(__name__)

FORMAT = 1
JOB, INPUTS, LOCK = "_job.json", "_inputs.parquet", "_lock"
_PART = re.compile(r"part-(\d+)\.parquet")
_OURS = re.compile(r"(_job\.json|_inputs\.parquet|_lock|part-\d+\.parquet|\..*\.tmp)")
# Fields of _job.json that make two runs the same job (anything else may change between runs).
IDENTITY = ("task", "model", "dtype", "quantize", "exact", "source")


class Store:
    """An opened (and locked) output folder; use as a context manager, or call :meth:`close`."""

    def __init__(self, folder: Path, job: dict[str, Any], inputs: pa.Table, lock_fd: int):
        self.folder = folder
        self.job = job
        self.inputs = inputs
        self.task = Task.from_spec(job["task"])
        self._lock_fd = lock_fd

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | os.PathLike, job: dict[str, Any], scan) -> Store:
        """Resume the job in ``folder`` if it is ``job``, else start it there (``scan()`` -> the inputs).

        ``job`` holds the :data:`IDENTITY` fields and ``part_size`` / ``embedding``; a folder holding another
        job, or files of something else, is refused.
        """
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{folder}: cannot create the output folder ({e.strerror})") from None
        if not folder.is_dir():
            raise InputError(f"{folder}: the output must be a folder")
        if not (folder / JOB).is_file():
            # before the lock file is made: nothing is left behind in someone else's folder
            _refuse_strangers(folder)
        lock_fd = _lock(folder)
        try:
            if (folder / JOB).is_file():
                stored = _read_job(folder)
                differs = [k for k in IDENTITY if stored.get(k) != job.get(k)]
                if differs:
                    detail = "; ".join(f"{k}: {stored.get(k)!r} there, {job.get(k)!r} now" for k in differs)
                    raise InputError(f"{folder} holds another job ({detail}); give another --output")
                try:
                    inputs = pq.read_table(folder / INPUTS)
                except (OSError, pa.ArrowException) as e:
                    raise InputError(
                        f"{folder / INPUTS}: unreadable ({e}); start again in a new folder"
                    ) from None
                if inputs.num_rows != stored["inputs"]:
                    raise InputError(
                        f"{folder / INPUTS}: {inputs.num_rows} inputs, {JOB} says {stored['inputs']}"
                    )
                return cls(folder, stored, inputs, lock_fd)
            _refuse_strangers(folder)
            for tmp in folder.glob("._*.tmp"):  # a start cut short
                tmp.unlink(missing_ok=True)
            inputs = scan()
            table = inputs.table
            _atomic(folder / INPUTS, lambda tmp: pq.write_table(table, tmp))
            job = {"format": FORMAT, **job, "base": inputs.base, "inputs": table.num_rows}
            _atomic(folder / JOB, lambda tmp: tmp.write_text(json.dumps(job, indent=2) + "\n"))
            return cls(folder, job, table, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- units and parts -----------------------------------------------------------------------

    @property
    def part_size(self) -> int:
        return int(self.job["part_size"])

    @property
    def num_units(self) -> int:
        return -(-self.inputs.num_rows // self.part_size)

    def unit_inputs(self, unit: int) -> pa.Table:
        return self.inputs.slice(unit * self.part_size, self.part_size)

    def unit_size(self, unit: int) -> int:
        return min(self.part_size, self.inputs.num_rows - unit * self.part_size)

    @property
    def embedding_shape(self) -> tuple[int, int] | None:
        emb = self.job.get("embedding")
        return (int(emb["num_queries"]), int(emb["dim"])) if emb else None

    def part_path(self, unit: int) -> Path:
        width = max(5, len(str(self.num_units - 1)))
        return self.folder / f"part-{unit:0{width}d}.parquet"

    def pending_units(self) -> list[int]:
        """Units without a complete part, after clearing what a crash left: temporary files, and parts
        whose row count is wrong (which an atomic rename never leaves, but a copied folder might)."""
        for tmp in self.folder.glob(".part-*.tmp"):
            log.info("removing %s, left by an interrupted run", tmp.name)
            tmp.unlink(missing_ok=True)
        done = set()
        for path in self.folder.glob("part-*.parquet"):
            m = _PART.fullmatch(path.name)
            if not m or int(m.group(1)) >= self.num_units:
                continue
            unit = int(m.group(1))
            try:
                rows = pq.read_metadata(path).num_rows
            except (OSError, pa.ArrowException):
                rows = -1
            if rows == self.unit_size(unit) * self.task.rows_per_image and path == self.part_path(unit):
                done.add(unit)
            else:
                log.warning("%s is incomplete or unreadable: redoing it", path.name)
                path.unlink()
        return [u for u in range(self.num_units) if u not in done]

    def write_part(self, unit: int, rows: list[Row]) -> None:
        table = self.task.table(rows, self.embedding_shape)
        _atomic(self.part_path(unit), lambda tmp: pq.write_table(table, tmp, **_parquet_options(table)))


class Sink:
    """Collects rows of the pending units from any engine, in any order, and writes each unit's part as
    soon as its last row arrives. Rows already received are ignored (a retried task sends them again).

    Parts are written by ``writers`` threads (Parquet encoding releases the GIL), so the engine keeps
    feeding rows meanwhile: on a cluster every row passes through here. Use as a context manager: leaving
    it waits for the writes in flight (and raises the first that failed)."""

    def __init__(self, store: Store, units: list[int], progress=None, writers: int = 4):
        self.store = store
        self.per_image = store.task.rows_per_image
        self.waiting: dict[int, dict[tuple[int, int], Row]] = {u: {} for u in units}
        self.images = 0  # images whose rows are all in
        self.errors = 0  # of them, unreadable
        self.progress = progress
        self._pool = ThreadPoolExecutor(writers, thread_name_prefix="blip2-bulk-write")
        self._writes: deque[Future] = deque()
        self._max_writes = 2 * writers  # rows of more finished units than that wait in memory: hold back

    @property
    def done(self) -> bool:
        return not self.waiting

    def add(self, unit: int, pos: int, index: int, row: Row) -> None:
        """Row ``index`` (its question) of the image at position ``pos`` of ``unit``."""
        got = self.waiting.get(unit)
        if got is None or (pos, index) in got:
            return
        got[(pos, index)] = row
        if all((pos, i) in got for i in range(self.per_image)):
            self.images += 1
            self.errors += row[3] is not None
            if self.progress is not None:
                self.progress.update(1)
        if len(got) == self.store.unit_size(unit) * self.per_image:
            del self.waiting[unit]
            while len(self._writes) >= self._max_writes:
                self._writes.popleft().result()
            self._writes.append(self._pool.submit(self.store.write_part, unit, [got[k] for k in sorted(got)]))

    def add_image(self, unit: int, pos: int, rows: list[Row]) -> None:
        for index, row in enumerate(rows):
            self.add(unit, pos, index, row)

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self._writes:
                self._writes.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


# ---- files ---------------------------------------------------------------------------------------


def _read_job(folder: Path) -> dict[str, Any]:
    try:
        job = json.loads((folder / JOB).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder / JOB}: unreadable ({e}); start again in a new folder") from None
    if job.get("format") != FORMAT:
        raise InputError(f"{folder}: bulk output format {job.get('format')!r}; this blip2 writes {FORMAT}")
    return job


def read_job(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``_job.json`` of a bulk output folder."""
    folder = Path(folder)
    if not (folder / JOB).is_file():
        raise InputError(f"{folder}: not a blip2 bulk output (no {JOB})")
    return _read_job(folder)


def part_files(folder: str | os.PathLike) -> list[Path]:
    """The part files of a bulk output folder, in unit order."""
    return sorted(Path(folder).glob("part-*.parquet"), key=lambda p: int(_PART.fullmatch(p.name).group(1)))


def _parquet_options(table: pa.Table) -> dict[str, Any]:
    """Embeddings are written plain: float16 noise gains ~7 % from dictionary and snappy encoding,
    for 3x the time to write (where a cluster's rows all pass through the driver)."""
    names = table.column_names
    if "embedding" not in names:
        return {}
    return {"use_dictionary": [n for n in names if n != "embedding"],
            "compression": {n: "none" if n == "embedding" else "snappy" for n in names}}  # fmt: skip


def _refuse_strangers(folder: Path) -> None:
    strangers = sorted(p.name for p in folder.iterdir() if not _OURS.fullmatch(p.name))
    if strangers:
        raise InputError(f"{folder}: not empty and not a blip2 bulk output (holds {strangers[0]!r})")


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then flush to disk and rename onto ``path``: the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _lock(folder: Path) -> int:
    """An exclusive lock on ``folder`` for this process (two jobs writing one folder would clash)."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    if sys.platform != "win32":
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"{folder}: another blip2 bulk is writing this folder") from None
    return fd
