"""The local engine: decode workers (processes) feed full batches of ready pixels to the model here.

Decoding starts before the model is loaded and runs ahead of it by a bounded window, so the model does not
wait on JPEG decoding and memory stays bounded. The workers run at a lower priority (``nice``): where
cores are few, the model keeps them and decoding fills the time the model leaves idle.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .tasks import Task, decode

if TYPE_CHECKING:
    from ..images import ImageProcessor
    from .store import Sink, Store

log = logging.getLogger(__name__)

DECODE_CHUNK = 8  # inputs per job sent to a decode worker
WORKER_NICE = 10

_processor: ImageProcessor | None = None  # a decode worker's image processor (set by _init_worker)

Item = tuple[int, int, str, str, int, int, Any]  # unit, position, key, path, offset, size, error


def default_decoders() -> int:
    """Decode processes: the cores the model leaves (at least one), at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def run_local(store: Store, sink: Sink, units: list[int], processor: ImageProcessor, load, *,
              batch_size: int, decoders: int) -> None:  # fmt: skip
    """Process ``units`` of ``store`` into ``sink``; ``load()`` returns the Pipeline (called once)."""
    task = store.task
    pool = Decoders(decoders, processor)
    try:
        jobs = _chunks(_items(store, units), DECODE_CHUNK)
        window: deque[tuple[list[Item], Future]] = deque()
        depth = 2 * decoders + -(-2 * batch_size // DECODE_CHUNK)

        def fill() -> None:
            while len(window) < depth:
                job = next(jobs, None)
                if job is None:
                    return
                window.append((job, pool.submit(job)))

        fill()  # the workers decode while the model loads
        pipe = load()
        batch: list[tuple[Item, np.ndarray]] = []
        while window:
            job, future = window.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:  # a file killed its decoder: find it, and go on without it
                pool.restart()
                results = pool.one_by_one(job)
                window = deque((j, pool.submit(j)) for j, _ in window)  # they died with the pool
            fill()
            for item, (pixels, error) in zip(job, results, strict=True):
                if pixels is None:
                    sink.add_image(item[0], item[1], task.rows(item[2], None, error))
                    continue
                batch.append((item, pixels))
                if len(batch) == batch_size:
                    run_batch(pipe, task, batch, sink)
                    batch = []
        if batch:
            run_batch(pipe, task, batch, sink)
    finally:
        pool.close()


class Decoders:
    """The pool of decode processes. One that dies (a file crashed the image library) is replaced; the
    file that did it becomes an error row instead of ending the job."""

    CRASHED = "the image decoder crashed on this file (its process died)"

    def __init__(self, n: int, processor: ImageProcessor):
        self.n, self.processor = n, processor
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.n, mp_context=_context(), initializer=_init_worker,
                                   initargs=(self.processor,))  # fmt: skip

    def submit(self, job: list[Item]) -> Future:
        return self.pool.submit(_decode_job, [item[3:] for item in job])

    def restart(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._start()

    def one_by_one(self, job: list[Item]) -> list[tuple[np.ndarray | None, str | None]]:
        results = []
        for item in job:
            try:
                results += self.submit([item]).result()
            except BrokenProcessPool:
                log.warning("%s: %s", item[2], self.CRASHED)
                self.restart()
                results.append((None, self.CRASHED))
        return results

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _context() -> multiprocessing.context.BaseContext:
    """Fresh worker processes (never a fork of this one, whose torch threads a fork would break): from a
    fork server that has imported this module once, so a second pool in the same process starts fast."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def run_batch(pipe, task: Task, batch: list[tuple[Item, np.ndarray]], sink: Sink) -> None:
    """The model on one batch of decoded images; their rows into the sink."""
    pixels = torch.from_numpy(np.stack([p for _, p in batch]))
    results = task.run(pipe, pixels)
    per = task.rows_per_image
    for i, (item, _) in enumerate(batch):
        sink.add_image(item[0], item[1], task.rows(item[2], results[i * per : (i + 1) * per], None))


def _items(store: Store, units: list[int]) -> Iterator[Item]:
    for unit in units:
        t = store.unit_inputs(unit)
        columns = [t.column(name).to_pylist() for name in ("key", "path", "offset", "size", "error")]
        for pos, (key, path, offset, size, error) in enumerate(zip(*columns, strict=True)):
            yield unit, pos, key, path, offset, size, error


def _chunks(items: Iterator[Item], n: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- in the decode workers -------------------------------------------------------------------------


def _init_worker(processor: ImageProcessor) -> None:
    global _processor
    _processor = processor
    with contextlib.suppress(OSError):  # not permitted here: run at the same priority
        os.nice(WORKER_NICE)


def _decode_job(records: list[tuple[str, int, int, Any]]) -> list[tuple[np.ndarray | None, str | None]]:
    assert _processor is not None
    return [decode(path, offset, size, error, _processor) for path, offset, size, error in records]
