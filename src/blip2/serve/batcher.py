"""Dynamic batching: a bounded queue of jobs and one worker thread that owns the model.

Request handlers (on the event loop) :meth:`Batcher.submit` a :class:`Job` and await its events; the
worker takes the oldest job, waits up to ``wait_s`` for more *compatible* jobs (equal ``key``, rows up
to ``max_batch``, and for generation a shared context that still fits), runs them as one forward pass
through a handler, and sends each job its events from the worker thread with ``call_soon_threadsafe``.

- The queue is bounded: past ``max_queue`` waiting jobs, :meth:`submit` raises :class:`QueueFull`.
- A cancelled job (client gone, timeout) leaves the queue at once; in a running batch, generation
  stops as soon as every job of the batch is cancelled or finished.
- A batch that fails is re-run one job at a time (its unfinished jobs), so one bad request never fails
  the others. A job may have been sent events before the failure: a handler keeps each job's progress
  on the job, so that its run alone continues from there and never sends an event twice (the engine's
  generation resumes from the tokens already streamed). A job that fails alone gets an error event
  after whatever it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError, QueueFull

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One request's work. ``rows``: how many batch rows it takes; ``length`` / ``max_new``: its
    prompt positions and output budget (generation), used to keep a batch inside the context."""

    kind: str
    key: Hashable
    payload: Any
    loop: asyncio.AbstractEventLoop
    rows: int = 1
    length: int = 0
    max_new: int = 0
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    finished: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)

    def send(self, kind: str, value: Any = None) -> None:
        """From the worker thread: hand an event to the waiting handler."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def finish(self, value: Any) -> None:
        self.finished = True
        self.send("done", value)

    def fail(self, error: BaseException) -> None:
        self.finished = True
        self.send("error", error)


Handler = Callable[[list[Job]], None]  # runs a batch; every job must end with finish() or fail()


class Batcher:
    def __init__(
        self,
        handlers: dict[str, Handler],
        *,
        max_batch: int,
        max_queue: int,
        wait_s: float,
        retry_after: int = 1,
        context_limit: int | None = None,
        on_queue: Callable[[int], None] | None = None,
        on_batch: Callable[[str, int], None] | None = None,
    ):
        self.handlers = handlers
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.wait_s = wait_s
        self.retry_after = retry_after
        self.context_limit = context_limit
        self.on_queue = on_queue or (lambda depth: None)
        self.on_batch = on_batch or (lambda kind, rows: None)
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._thread: threading.Thread | None = None

    # ---- the handlers' side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="blip2-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise APIError(
                    503,
                    "the server is shutting down",
                    code="shutting_down",
                    headers={"Retry-After": str(self.retry_after)},
                )
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self.retry_after)
            self._queue.append(job)
            self.on_queue(len(self._queue))
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client left or its time ran out: drop the job from the queue, or stop it running."""
        job.cancelled = True
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.on_queue(len(self._queue))
                self._cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker -----------------------------------------------------------------------------

    def _fits(self, batch: list[Job], job: Job) -> bool:
        if job.key != batch[0].key or sum(j.rows for j in batch) + job.rows > self.max_batch:
            return False
        if self.context_limit is None or job.kind != "generate":
            return True
        longest = max(job.length, *(j.length for j in batch))
        budget = max(job.max_new, *(j.max_new for j in batch))
        return longest + budget <= self.context_limit

    def _select(self) -> list[Job]:
        batch = [self._queue[0]]
        for job in self._queue[1:]:
            if self._fits(batch, job):
                batch.append(job)
        return batch

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the compatible ones that arrive within ``wait_s``."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                deadline = time.perf_counter() + self.wait_s
                while True:
                    batch = self._select()
                    left = deadline - time.perf_counter()
                    full = sum(j.rows for j in batch) >= self.max_batch
                    if full or left <= 0 or self._closed or self.max_batch == 1:
                        break
                    self._cond.wait(left)
                    if not self._queue:
                        break  # everything was cancelled meanwhile
                if not self._queue:
                    continue
                for job in batch:
                    self._queue.remove(job)
                self.on_queue(len(self._queue))
                self._busy = True
                return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                batch = [j for j in batch if not j.cancelled]
                if batch:
                    self._run(batch)
            finally:
                with self._cond:
                    self._busy = False

    def _run(self, batch: list[Job]) -> None:
        kind = batch[0].kind
        handler = self.handlers[kind]
        self.on_batch(kind, sum(j.rows for j in batch))
        try:
            handler(batch)
        except Exception as e:
            if len(batch) > 1:
                log.info("a batch of %d failed (%s); running its jobs one at a time", len(batch), e)
                for job in batch:
                    if not job.finished:
                        self._run_alone(handler, job)
                return
            for job in batch:
                if not job.finished:
                    job.fail(e)
            _log_unexpected(e)
            return
        for job in batch:  # a handler that forgot a job must not leave its client waiting
            if not job.finished:
                job.fail(RuntimeError("the job ended without a result"))

    def _run_alone(self, handler: Handler, job: Job) -> None:
        if job.cancelled:
            return
        try:
            handler([job])
        except Exception as e:
            _log_unexpected(e)
            if not job.finished:
                job.fail(e)


def _log_unexpected(e: Exception) -> None:
    from ..errors import Blip2Error

    if not isinstance(e, Blip2Error | APIError):
        log.error("the model failed on a request", exc_info=e)
