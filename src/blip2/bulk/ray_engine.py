"""The Ray engine: Ray Data decodes on CPU tasks and runs the model in a pool of actors; this process
(the driver) collects the rows and writes the parts, so the output folder needs to exist only here.

Pipeline: the pending inputs (``from_arrow``, one block per batch) -> ``map_batches(decode)`` on CPU
tasks -> ``map_batches(ModelWorker)`` on an actor pool of ``workers`` actors, each loading the model once
(one GPU per actor where the cluster has GPUs) -> rows streamed back to the driver's :class:`Sink`.

Faults: Ray Data restarts an actor whose process dies and runs its batch again (its actor pools default to
``max_restarts=-1``, ``max_task_retries=-1``); the sink drops rows it already has, so every row is written
once. An actor whose model fails to load is not retried: the job stops with that error, parts written so
far kept.

Inputs are read where the tasks run: on a cluster, SOURCE's files must be at the same paths on every node
(a shared file system), and the model must load there (the same folder, or a hub id in each node's cache).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..errors import Blip2Error, CheckpointError, InputError
from .tasks import Task, decode, one_line

if TYPE_CHECKING:
    from ..images import ImageProcessor
    from .store import Sink, Store

log = logging.getLogger(__name__)

DECODE_CPUS = 0.5  # CPUs each decode task asks for (decoding a block is light next to the model)
# Defaults for the Ray processes a job starts (set only where unset): no usage reporting and nothing fetched
# (the machine may be offline); Ray's C++ core logs to its files but not, below fatal, on the terminal.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_BACKEND_LOG_LEVEL": "fatal",
}


def run_ray(store: Store, sink: Sink, units: list[int], processor: ImageProcessor, model: str,
            load_options: dict[str, Any], *, batch_size: int, workers: int,
            worker_cpus: float | None) -> None:  # fmt: skip
    """Process ``units`` of ``store`` into ``sink`` on the Ray cluster this process is connected to
    (:func:`ray_session`)."""
    import ray
    import ray.data

    try:
        device, num_gpus, num_cpus = _placement(ray, load_options["device"], workers, worker_cpus)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows its own
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run notes, not needed here
        inputs = _pending_inputs(store, units)
        # a block per batch: decode tasks that small keep the actors fed evenly, results stream back batch
        # by batch, and an actor that dies costs the re-run of a batch or two, not of a long block
        blocks = [inputs.slice(i, batch_size) for i in range(0, inputs.num_rows, batch_size)]
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(_decode_batch, fn_kwargs={"processor": processor}, batch_size=None,
                            batch_format="pyarrow", num_cpus=DECODE_CPUS)  # fmt: skip
        ds = ds.map_batches(
            ModelWorker,
            fn_constructor_kwargs={
                "task": store.task,
                "model": model,
                "embedding_shape": store.embedding_shape,
                "load_options": {**load_options, "device": device},
            },  # fmt: skip
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            _collect(store.task, table, sink)
    except ray.exceptions.RayError as e:
        raise _explain(e) from None


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Join the cluster at ``address`` (or use this process's running Ray), else start a local Ray
    runtime; leave it (stopping a runtime it started) at the end."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'blip2[ray]'") from None
    if ray.is_initialized():
        yield
        return
    if address is not None:
        _probe(address)
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    # its notice that a new local runtime uses token authentication (Ray's default) is not ours to show
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True)  # fmt: skip
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
        raise InputError(f"cannot start or join {where}: {one_line(e)}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nothing listens at (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        if address == "auto":
            return
        raise InputError(
            f"--address {address!r}: expected host:port (e.g. 10.0.0.1:6379), ray://host:port or auto"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _placement(ray, device: str | None, workers: int, worker_cpus: float | None) -> tuple[str, int, float]:
    """(device, GPUs, CPUs) of each model actor. With GPUs in the cluster (and no --device cpu) each actor
    takes one GPU and one CPU. Without, each takes one CPU, or less where the cluster would otherwise
    have no CPU left for the decode tasks."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    device = device or ("cuda" if gpus else "cpu")
    num_gpus = 1 if device.startswith("cuda") else 0
    if num_gpus and workers > gpus:
        raise InputError(f"{workers} workers need {workers} GPUs; the Ray cluster has {gpus}")
    if worker_cpus is None:
        worker_cpus = 1.0 if num_gpus else min(1.0, (cpus - DECODE_CPUS) / workers)
    if worker_cpus <= 0 or workers * worker_cpus + DECODE_CPUS > cpus:
        raise InputError(
            f"{workers} workers of {worker_cpus:g} CPUs and the decode tasks ({DECODE_CPUS:g} CPU) do not "
            f"fit the Ray cluster's {cpus:g} CPUs: use fewer --workers or less --worker-cpus"
        )
    return device, num_gpus, worker_cpus


def _pending_inputs(store: Store, units: list[int]) -> pa.Table:
    """The inputs of ``units`` with their (unit, position) and an empty error for the readable ones."""
    tables = []
    for unit in units:
        t = store.unit_inputs(unit).select(["key", "path", "offset", "size", "error"])
        n = t.num_rows
        t = t.append_column("unit", pa.array(np.full(n, unit, np.int64)))
        tables.append(t.append_column("pos", pa.array(np.arange(n, dtype=np.int64))))
    return pa.concat_tables(tables)


# ---- on the cluster --------------------------------------------------------------------------------


def _decode_batch(batch: pa.Table, processor: ImageProcessor) -> dict[str, np.ndarray]:
    """A decode task: inputs -> ready pixels (zeros where unreadable) and the error ("" where none)."""
    columns = [batch.column(n).to_pylist() for n in ("path", "offset", "size", "error")]
    results = [decode(*record, processor) for record in zip(*columns, strict=True)]
    shape = next((p.shape for p, _ in results if p is not None), (3, 1, 1))
    return {
        "unit": batch.column("unit").to_numpy(),
        "pos": batch.column("pos").to_numpy(),
        "key": np.array(batch.column("key").to_pylist(), dtype=object),
        "error": np.array([e or "" for _, e in results], dtype=object),
        "pixels": np.stack([p if p is not None else np.zeros(shape, np.float32) for p, _ in results]),
    }


class ModelWorker:
    """A Ray Data actor: loads the model once, then runs batches of pixels (the shared per-batch function)."""

    def __init__(self, task: Task, model: str, embedding_shape, load_options: dict[str, Any]):
        import blip2

        self.task, self.embedding_shape = task, embedding_shape
        self.pipe = blip2.load(model, **load_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        task = self.task
        errors = [e or None for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if e is None]
        results: list[Any] = []
        if good:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))
            results = task.run(self.pipe, pixels)
        per = task.rows_per_image
        rows, units, positions, indexes = [], [], [], []
        done = 0
        for i, (key, error) in enumerate(zip(batch["key"], errors, strict=True)):
            mine = None if error else results[done * per : (done + 1) * per]
            done += error is None
            image_rows = task.rows(str(key), mine, error)
            rows += image_rows
            units += [int(batch["unit"][i])] * len(image_rows)
            positions += [int(batch["pos"][i])] * len(image_rows)
            indexes += list(range(len(image_rows)))
        table = task.table(rows, self.embedding_shape)
        for name, values in (("_unit", units), ("_pos", positions), ("_index", indexes)):
            table = table.append_column(name, pa.array(values, pa.int64()))
        return table


# ---- back on the driver ----------------------------------------------------------------------------


def _collect(task: Task, table: pa.Table, sink: Sink) -> None:
    from .read import table_rows

    rows = table_rows(task, table)
    units, positions, indexes = (table.column(n).to_pylist() for n in ("_unit", "_pos", "_index"))
    for unit, pos, index, row in zip(units, positions, indexes, rows, strict=True):
        sink.add(unit, pos, index, row)


def _explain(e: Exception) -> Blip2Error:
    """A Ray failure as one line: a model that would not load on a worker says so."""
    text = str(e)
    for kind in ("CheckpointError", "InputError", "ImageError", "OutOfMemoryError"):
        if kind in text:
            detail = next((line for line in text.splitlines() if kind + ":" in line), text.splitlines()[-1])
            detail = detail.split(kind + ":", 1)[-1].strip()
            return CheckpointError(f"the model failed on a Ray worker: {detail}")
    return InputError(f"the Ray job failed: {type(e).__name__}: {one_line(e)}")
