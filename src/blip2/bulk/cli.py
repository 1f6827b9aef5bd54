"""``blip2 bulk caption|ask|embed SOURCE --output DIR``: a thin shell over :func:`blip2.bulk.run_bulk`."""

from __future__ import annotations

import argparse
import sys

TASKS = {
    "caption": "caption every image",
    "ask": "answer the same question(s) about every image",
    "embed": "embed every image (32 query embeddings, for `blip2 index --from`)",
}
SOURCE_HELP = (
    "a folder (recursive), a glob ('photos/**/*.jpg'), a .txt / .jsonl / .parquet list of image paths "
    "(column 'image'), or WebDataset .tar shards (one, or a glob)"
)


def _job_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="Parquet dataset folder: created, or resumed when it holds the same job")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: decode processes feed the model here (default); ray: Ray Data")  # fmt: skip
    p.add_argument("--address", default=None,
                   help="Ray: join this running cluster (e.g. 10.0.0.1:6379, or auto); default: start one here")  # fmt: skip
    p.add_argument("--workers", type=int, default=1,
                   help="Ray: model actors, each loading the model once (one GPU each where there are GPUs)")  # fmt: skip
    p.add_argument("--worker-cpus", type=float, default=None,
                   help="Ray: CPUs each model actor asks for (default 1, less where the cluster is smaller)")  # fmt: skip
    p.add_argument("--decoders", type=int, default=None,
                   help="local: image decoding processes (default: one per core, at most 8)")  # fmt: skip
    p.add_argument("--part-size", type=int, default=1000,
                   help="images per Parquet part file, the unit of resuming (default 1000; fixed by the first run)")  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _run(args: argparse.Namespace) -> int:
    from ..cli import _gen_kwargs
    from ..errors import InputError

    try:
        from . import Task, run_bulk
    except ImportError as e:  # pyarrow missing
        raise InputError(f"blip2 bulk needs pyarrow: pip install 'blip2[bulk]' ({e})") from None
    from ..models.checkpoint import retrieval_checkpoint

    gen = _gen_kwargs(args) if args.verb != "embed" else {}
    task = Task.make(args.verb, getattr(args, "prompt", None), getattr(args, "question", None) or (), **gen)
    # embed loads what `blip2 index` loads for the same --model (a generation checkpoint's retrieval sibling)
    model = retrieval_checkpoint(args.model) if args.verb == "embed" else args.model
    summary = run_bulk(
        task, args.source, args.output, model=model, device=args.device, dtype=args.dtype,
        quantize=args.quantize, exact=args.exact, batch_size=args.batch_size, engine=args.engine,
        address=args.address, workers=args.workers, worker_cpus=args.worker_cpus, decoders=args.decoders,
        part_size=args.part_size, progress=not args.quiet,
    )  # fmt: skip
    rate = summary.images / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"blip2: {summary.output}: {summary.inputs} images ({summary.done_before} done before, "
        f"{summary.images} now at {rate:.1f}/s, {summary.errors} unreadable)",
        file=sys.stderr,
    )
    return 0


def register(subparsers) -> None:
    from ..cli import generation_options, model_options
    from ..retrieval_cli import RETRIEVAL_MODEL

    p = subparsers.add_parser(
        "bulk",
        help="caption, ask or embed every image of a folder, list or shards into Parquet (resumable; local or Ray)",
        description="Run one task over every image of SOURCE into a Parquet dataset DIR: one row per image "
        "(per image and question for ask) with key, text or embedding, and error. Run the same command "
        "again to resume.",
    )
    tasks = p.add_subparsers(dest="verb", metavar="TASK", required=True)
    for verb, help_text in TASKS.items():
        parents = [model_options(), _job_options()] + ([generation_options()] if verb != "embed" else [])
        description = (
            f"{help_text.capitalize()}. Unlike other commands, --device defaults to a GPU when there is one."
        )
        q = tasks.add_parser(verb, parents=parents, help=help_text, description=description)
        q.set_defaults(func=_run, device=None)  # None: a GPU if there is one (on Ray: if the cluster has any)
        if verb == "caption":
            q.add_argument("--prompt", default=None, help='text the caption continues, e.g. "a photo of"')
        elif verb == "ask":
            q.add_argument("--question", action="extend", nargs="+", required=True, metavar="Q",
                           help="question(s), each answered for every image (repeatable)")  # fmt: skip
        else:
            q.set_defaults(model=RETRIEVAL_MODEL)
