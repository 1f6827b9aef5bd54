"""Reading a bulk output back: the whole dataset, rows of a table, embeddings as dense arrays."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .store import part_files, read_job
from .tasks import Row, Task


def read_output(folder: str | os.PathLike) -> pa.Table:
    """Every row written to a bulk output folder so far, in input order."""
    job = read_job(folder)
    files = part_files(folder)
    task = Task.from_spec(job["task"])
    emb = job.get("embedding")
    schema = task.schema((emb["num_queries"], emb["dim"]) if emb else None)
    return (
        pa.concat_tables([pq.read_table(f, schema=schema) for f in files]) if files else schema.empty_table()
    )


def dense_embeddings(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """An ``embedding`` column -> ((n, Q, E) float16, zeros where null; (n,) bool, True where null)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    q = arr.type.list_size
    e = arr.type.value_type.list_size
    n = len(arr)
    inner = arr.values.slice(arr.offset * q, n * q)  # .values ignores the parent's offset
    flat = inner.values.slice(inner.offset * e, n * q * e)
    data = np.frombuffer(flat.buffers()[1], np.float16, n * q * e, flat.offset * 2).reshape(n, q, e)
    missing = arr.is_null().to_numpy(zero_copy_only=False)
    if missing.any():  # what a null row's slots hold is up to the writer
        data = np.where(missing[:, None, None], np.float16(0), data)
    return data, missing


def table_rows(task: Task, table: pa.Table) -> list[Row]:
    """The rows of a table in the task's output schema (the inverse of ``Task.table``)."""
    n = table.num_rows
    keys = table.column("key").to_pylist()
    questions = table.column("question").to_pylist() if task.verb == "ask" else [None] * n
    errors = table.column("error").to_pylist()
    if task.verb == "embed":
        data, missing = dense_embeddings(table.column("embedding"))
        values: list = [None if m else data[i] for i, m in enumerate(missing)]
    else:
        values = table.column("text").to_pylist()
    return list(zip(keys, questions, values, errors, strict=True))
