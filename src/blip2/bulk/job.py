"""One bulk job from start to end: open (or resume) the output, pick the pending units, run an engine."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .sources import scan
from .store import Sink, Store
from .tasks import Task, describe

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


@dataclass
class Summary:
    output: Path
    inputs: int  # images in the job
    done_before: int  # of them, written by an earlier run
    images: int  # processed by this run
    errors: int  # of those, unreadable (their rows carry the reason)
    seconds: float


def run_bulk(task: Task, source: str, output: str | os.PathLike, *, model: str, device: str | None = None,
             dtype: str | None = None, quantize: str | None = None, exact: bool = False, batch_size: int = 16,
             engine: str = "local", address: str | None = None, workers: int = 1,
             worker_cpus: float | None = None, decoders: int | None = None, part_size: int = 1000,
             progress: bool = True) -> Summary:  # fmt: skip
    """Run ``task`` over every image of ``source`` into the Parquet dataset ``output`` (resuming it).

    ``engine="local"``: decode processes (``decoders``) feed the model in this process. ``engine="ray"``:
    Ray Data decodes on CPU tasks and runs the model in ``workers`` actors (one GPU each where the cluster
    has GPUs); ``address`` joins a running cluster, else a local Ray runtime is started. ``device`` (default:
    a GPU when there is one) and ``dtype`` / ``quantize`` / ``exact`` go to :func:`blip2.load`.

    The local engine's decode processes start as ``multiprocessing``'s do: a script that calls this must
    do so under ``if __name__ == "__main__":``.
    """
    from tqdm import tqdm

    for name, value in (("batch_size", batch_size), ("part_size", part_size), ("workers", workers)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, not {value}")
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "local" and address is not None:
        raise InputError("--address joins a Ray cluster: use it with --engine ray")
    if decoders is not None and decoders < 1:
        raise InputError(f"decoders must be at least 1, not {decoders}")

    model_id = str(Path(model).resolve()) if Path(model).exists() else str(model)
    info = describe(model_id)  # a missing or broken checkpoint fails here, before any work
    job = {
        "task": task.spec(),
        "model": model_id,
        "dtype": dtype,
        "quantize": quantize,
        "exact": exact,
        "source": source,
        "part_size": part_size,
        "embedding": info.embedding if task.verb == "embed" else None,
    }
    out = Path(output)
    t0 = time.perf_counter()
    if engine == "ray":
        from .ray_engine import ray_session

        session = ray_session(address)  # a bad address fails here, before the output is touched
    else:
        session = contextlib.nullcontext()
    with session, Store.open(out, job, lambda: scan(source, skip=out)) as store:
        units = store.pending_units()
        total = store.inputs.num_rows
        todo = sum(store.unit_size(u) for u in units)
        bar = tqdm(total=total, initial=total - todo, unit="img", desc=f"bulk {task.verb}",
                   disable=not progress or not todo, file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        load_options = {"device": device, "dtype": dtype, "quantize": quantize, "exact": exact}
        with contextlib.closing(bar), Sink(store, units, bar) as sink:
            if units and engine == "local":
                from .local import default_decoders, run_local

                run_local(store, sink, units, info.image_processor, lambda: _load(model_id, load_options),
                          batch_size=batch_size, decoders=decoders or default_decoders())  # fmt: skip
            elif units:
                from .ray_engine import run_ray

                run_ray(store, sink, units, info.image_processor, model_id, load_options,
                        batch_size=batch_size, workers=workers, worker_cpus=worker_cpus)  # fmt: skip
        if not sink.done:
            raise InputError(
                f"{len(sink.waiting)} parts were not completed; run the same command again to finish"
            )
        return Summary(out, total, total - todo, sink.images, sink.errors, time.perf_counter() - t0)


def _load(model: str, options: dict):
    """``blip2.load`` with bulk's device default: a GPU when there is one."""
    import torch

    import blip2

    device = options["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    return blip2.load(model, device=device, dtype=options["dtype"], quantize=options["quantize"],
                      exact=options["exact"])  # fmt: skip
