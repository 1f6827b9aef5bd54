"""Bulk jobs: caption, ask or embed every image of a folder, list or WebDataset into a Parquet dataset.

Sources (:mod:`.sources`) -> decode workers and batches of the shared per-batch function (:mod:`.tasks`)
-> a sink of Parquet parts (:mod:`.store`). The local engine (:mod:`.local`) and the Ray Data engine
(:mod:`.ray_engine`) share all of that and differ only in who schedules the work. ``blip2 bulk`` is the
command (:mod:`.cli`); :func:`run_bulk` the same from Python. Needs the ``bulk`` extra (pyarrow), and
the ``ray`` extra for the Ray engine.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Summary", "Task", "read_output", "run_bulk"]


def __getattr__(name: str) -> Any:
    # Lazy: `blip2.bulk.cli` is imported by every `blip2` command, and must not need pyarrow.
    if name in ("Summary", "run_bulk"):
        from . import job

        return getattr(job, name)
    if name == "Task":
        from .tasks import Task

        return Task
    if name == "read_output":
        from .read import read_output

        return read_output
    raise AttributeError(name)
