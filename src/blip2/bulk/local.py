"""The local engine: decode workers (processes) feed full batches of ready pixels to the model here.

Decoding starts before the model is loaded and runs ahead of it by a bounded window, so the model does not
wait on JPEG decoding and memory stays bounded. On Linux the workers are forks of this process made before
torch is imported (``blip2 bulk`` gets here without it), so the first images are decoded while torch
imports and the model loads. Once the model turns out to take most of the time, the workers drop to a
lower priority (``nice``): where cores are few, the model keeps them and decoding fills the time the
model leaves idle. Until then they run at the model's priority, where decoding is most of the
work (and where other programs share the machine, which niced decoders would yield to as well).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

import numpy as np

from .tasks import Task, decode

if TYPE_CHECKING:
    from ..images import ImageProcessor
    from .store import Sink, Store

log = logging.getLogger(__name__)

DECODE_CHUNK = 8  # inputs per job sent to a decode worker
LOAD_AHEAD_BYTES = 256 << 20  # decoded pixels the workers may get ready while the model loads
WORKER_NICE = 10

_processor: ImageProcessor | None = None  # a decode worker's image processor (set by _init_worker)

Item = tuple[int, int, str, str, int, int, Any]  # unit, position, key, path, offset, size, error
Decoded = tuple[np.ndarray | None, str | None]  # pixels, or None and why


def default_decoders() -> int:
    """Decode processes: one per core, at most 8; the model's threads and the decoders share the cores as
    :class:`ThreadTuner` finds best."""
    return max(1, min(8, os.cpu_count() or 2))


def run_local(store: Store, sink: Sink, units: list[int], processor: ImageProcessor, load, *,
              batch_size: int, decoders: int) -> None:  # fmt: skip
    """Process ``units`` of ``store`` into ``sink``; ``load()`` returns the Pipeline (called once)."""
    task = store.task
    pool = Decoders(decoders, processor)
    tuner = None
    try:
        jobs = _chunks(_items(store, units), DECODE_CHUNK)
        window: deque[tuple[list[Item], Future]] = deque()
        depth = 2 * decoders + -(-2 * batch_size // DECODE_CHUNK)  # jobs in the window (grown after the load)

        def submit_next() -> bool:
            """The next job to the workers; False when there is none, or the pool broke (the loop below
            restarts it, and the job is sent again)."""
            nonlocal jobs
            job = next(jobs, None)
            if job is None:
                return False
            try:
                window.append((job, pool.submit(job)))
            except BrokenProcessPool:
                jobs = itertools.chain([job], jobs)
                return False
            return True

        def fill() -> None:
            while len(window) < depth and submit_next():
                pass

        loaded: Future = Future()
        failed: list[BaseException] = []
        ready = [0]  # bytes of pixels decoded while the model loads

        def count(future: Future) -> None:  # (in the pool's thread)
            if not future.cancelled() and future.exception() is None:
                ready[0] += sum(pixels.nbytes for pixels, _ in future.result()[0] if pixels is not None)

        def fill_while_loading() -> None:
            """Keep ``depth`` jobs with the workers until the model is loaded, the pixels made ready by then
            bounded by LOAD_AHEAD_BYTES: decoding has the time of torch's import and the model's load."""
            try:
                fill()
                while not loaded.done() and ready[0] < LOAD_AHEAD_BYTES:
                    busy = [f for _, f in window if not f.done()]
                    if len(busy) >= depth:
                        futures.wait([loaded, *busy], return_when=futures.FIRST_COMPLETED)
                    elif submit_next():
                        window[-1][1].add_done_callback(count)
                    else:
                        return
            except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
                failed.append(e)

        # Forked workers start at once, so from this thread: before load() imports torch. Others wait for
        # the fork server's imports, so from the other thread.
        if pool.forks:
            fill()
        ahead = threading.Thread(target=fill_while_loading, name="blip2-bulk-decode-ahead", daemon=True)
        ahead.start()
        try:
            pipe = load()
        finally:
            loaded.set_result(None)
            ahead.join()
        if failed:
            raise failed[0]
        # what was decoded meanwhile is the window's size from now on: as it is used up, decoding goes on
        depth = max(depth, len(window))
        tuner = ThreadTuner(decoders)
        warm_up = bool(tuner.plan)  # the first full batch runs alone, the decoders idle: a clean measure
        batch: list[tuple[Item, np.ndarray]] = []
        while window:
            job, future = window.popleft()
            try:
                results, seconds = future.result()
                tuner.decoded(len(job), seconds)
            except BrokenProcessPool:  # a file killed its decoder: find it, and go on without it
                pool.restart()
                results = pool.one_by_one(job)
                window = deque((j, pool.submit(j)) for j, _ in window)  # they died with the pool
            if not warm_up:
                fill()
            for item, (pixels, error) in zip(job, results, strict=True):
                if pixels is None:
                    sink.add_image(item[0], item[1], task.rows(item[2], None, error))
                    continue
                batch.append((item, pixels))
                if len(batch) == batch_size:
                    if warm_up:  # the decoders finish the jobs they have, and get no more until it ran
                        futures.wait([f for _, f in window])
                        warm_up = False
                    tuner.batch_done(len(batch), run_batch(pipe, task, batch, sink))
                    if tuner.threads == tuner.initial:  # the model takes every core: decoders yield to it
                        pool.nice = WORKER_NICE
                    batch = []
            fill()
        if batch:
            run_batch(pipe, task, batch, sink)
    finally:
        pool.close()
        if tuner is not None:
            tuner.restore()


class ThreadTuner:
    """Picks the model's torch threads: every core, or the cores the decode processes leave (lean).

    A model that takes long per image next to decoding one wants every core, and the decoders (niced
    then) fill the gaps; one quicker than decoding had better leave the cores to the decoders: next to
    busy decoders its threads would mostly wait for cores (a thread that waits holds up the others). The
    warm-up batch runs on every core with the decoders idle; when decoding an image takes under a tenth
    of the model's time for it, every core it is. The next batch runs lean: when decoding an image takes
    longer than the model, lean it is. Otherwise batches run with each setting in turn and the faster
    is kept (time per full batch, waiting for decoded images included)."""

    MINOR_DECODE = 0.1  # decoding / model time per image below which the decoders need no core of their own

    def __init__(self, decoders: int, probes: int = 2):
        import torch  # (loaded with the model by now)

        self.initial = torch.get_num_threads()
        self.lean = max(1, self.initial - decoders)
        # interleaved, so that a busy spell of the machine weighs on both alike; 0: the warm-up batch
        self.plan = [] if self.lean == self.initial else [0] + [self.lean, self.initial] * probes
        self.threads: int | None = None if self.plan else self.initial  # the choice, once made
        self.seconds = dict.fromkeys((self.initial, self.lean), 0.0)
        self.decode_seconds, self.decode_images = 0.0, 0
        self.last = time.perf_counter()

    def decoded(self, images: int, seconds: float) -> None:
        self.decode_images += images
        self.decode_seconds += seconds

    def batch_done(self, images: int, model_seconds: float) -> None:
        """A batch of ``images`` ran; the model took ``model_seconds`` of it."""
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        if not self.plan:
            return
        threads = self.plan.pop(0)
        if threads:
            self.seconds[threads] += elapsed
        if self.decode_images:
            decode, model = self.decode_seconds / self.decode_images, model_seconds / images
            why = f"decoding {1000 * decode:.1f} ms/image, the model {1000 * model:.1f}"
            if threads == self.lean and decode >= model:
                self.plan = []  # decoding is the larger share: the cores are for the decoders
                return self._choose(self.lean, why)
            if threads != self.lean and decode < self.MINOR_DECODE * model:
                self.plan = []  # decoding is a minor share: no need to try fewer threads
                return self._choose(self.initial, why)
        if self.plan:
            _set_threads(self.plan[0])
        else:
            self._choose(min(self.seconds, key=self.seconds.get), f"seconds per probe: {self.seconds}")

    def _choose(self, threads: int, why: str) -> None:
        self.threads = threads
        _set_threads(threads)
        log.info("model threads: %d (%s)", threads, why)

    def restore(self) -> None:
        _set_threads(self.initial)


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class Decoders:
    """The pool of decode processes. One that dies (a file crashed the image library) is replaced; the
    file that did it becomes an error row instead of ending the job."""

    CRASHED = "the image decoder crashed on this file (its process died)"

    def __init__(self, n: int, processor: ImageProcessor):
        self.n, self.processor = n, processor
        self.nice = 0  # the niceness jobs sent from now on run at (a worker can only raise its own)
        self.context = _context()
        self.forks = self.context.get_start_method() == "fork"  # its workers start at once
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.n, mp_context=self.context, initializer=_init_worker,
                                   initargs=(self.processor,))  # fmt: skip

    def submit(self, job: list[Item]) -> Future:
        return self.pool.submit(_decode_job, [item[3:] for item in job], self.nice)

    def restart(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._start()

    def one_by_one(self, job: list[Item]) -> list[Decoded]:
        results = []
        for item in job:
            try:
                results += self.submit([item]).result()[0]
            except BrokenProcessPool:
                log.warning("%s: %s", item[2], self.CRASHED)
                self.restart()
                results.append((None, self.CRASHED))
        return results

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _context() -> multiprocessing.context.BaseContext:
    """Forks of this process where fork is safe to use (Linux): they start at once, with nothing to import.

    The model process may hold torch's thread pools (a pool restarted after a crash forks it with the model
    loaded): a fork's child that ran torch ops could hang on their locks, but decode workers never do, they
    run Pillow and numpy only. Elsewhere (macOS, Windows), fresh processes from a fork server that imports
    this module once, so that a second pool in the same process starts fast."""
    methods = multiprocessing.get_all_start_methods()
    if sys.platform.startswith("linux") and "fork" in methods:
        return multiprocessing.get_context("fork")
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def run_batch(pipe, task: Task, batch: list[tuple[Item, np.ndarray]], sink: Sink) -> float:
    """The model on one batch of decoded images; their rows into the sink. Returns the model's seconds."""
    import torch

    pixels = torch.from_numpy(np.stack([p for _, p in batch]))
    t0 = time.perf_counter()
    results = task.run(pipe, pixels)
    seconds = time.perf_counter() - t0
    per = task.rows_per_image
    for i, (item, _) in enumerate(batch):
        sink.add_image(item[0], item[1], task.rows(item[2], results[i * per : (i + 1) * per], None))
    return seconds


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


def _decode_job(records: list[tuple[str, int, int, Any]], nice: int) -> tuple[list[Decoded], float]:
    """The job's images decoded (at niceness ``nice`` or more), and the CPU seconds that took (not the
    wall time, which counts the waits for a core: while the model loads, or next to its threads)."""
    assert _processor is not None
    with contextlib.suppress(OSError):  # not permitted here: run at the same priority
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    t0 = time.process_time()
    results = [decode(path, offset, size, error, _processor) for path, offset, size, error in records]
    return results, time.process_time() - t0
