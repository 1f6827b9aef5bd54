"""The ``blip2`` command: a thin shell over the Python API.

``blip2 caption IMAGE...``, ``blip2 ask IMAGE QUESTION``, ``blip2 chat IMAGE`` live here. Other
modules add their own subcommands: a module listed in :data:`COMMAND_MODULES` defines
``register(subparsers)``, adds its parser(s) with ``parents=[model_options()]`` when it loads a model,
and sets ``func`` to a handler ``(args) -> exit status``.

Errors a user can cause (:class:`blip2.errors.Blip2Error`, ``OSError``) print one line,
``blip2: error: <message>``, on stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"

# Modules that register more subcommands (``register(subparsers)``), e.g. retrieval, training, serving.
COMMAND_MODULES: tuple[str, ...] = (
    "blip2.train.cli",
    "blip2.serve.cli",
    "blip2.retrieval_cli",
    "blip2.eval.cli",
    "blip2.quantize.cli",
    "blip2.bulk.cli",
)


def model_options() -> argparse.ArgumentParser:
    """Options shared by every subcommand that loads a model."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, help=f"hub id or local folder (default {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu, cuda, cuda:1; auto: split over the GPUs, the CPU last (default cpu)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weights dtype (default float32)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=["int8", "int4"],
        help="int8: weight-only 8-bit vision encoder, Q-Former and language model; int4: the vision encoder "
        "and language model 4-bit, the Q-Former 8-bit (CPU: native kernels, ~4x / ~6x less memory, faster; "
        "CUDA: blip2.quantize.cuda's layers). Not for a checkpoint `blip2 quantize` wrote",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="int4 on the CPU: inputs per scale, a multiple of 128 (default 128)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="CUDA: decode steps on a static cache, captured once as a CUDA graph and replayed",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="float32 CPU matmuls through the reference's kernel: bit-for-bit its logits, slower",
    )
    return p


def generation_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate")
    p.add_argument("--min-new-tokens", type=int, default=None, help="fewest tokens before EOS is allowed")
    p.add_argument("--num-beams", type=int, default=None, help="beam search width (1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=None, help="beam score / length**penalty")
    p.add_argument("--repetition-penalty", type=float, default=None, help=">1 discourages repeated tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    return p


def _gen_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "repetition_penalty": args.repetition_penalty,
        "do_sample": True if args.sample else None,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def _load(args: argparse.Namespace):
    """``blip2.load`` with the model options of ``args``."""
    import blip2

    return blip2.load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        quantize=getattr(args, "quantize", None),
        exact=getattr(args, "exact", False),
        group_size=getattr(args, "group_size", None),
        compile=getattr(args, "compile", False),
    )


def _error(message: str) -> None:
    print(f"blip2: error: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- caption


def _caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.batch_size < 1:
        raise_input(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.heatmap and len(args.images) != 1:
        raise_input(f"--heatmap draws one image's map: give one image, not {len(args.images)}")
    # Read, caption and print one batch at a time: memory holds one batch of decoded images however many
    # paths are given, and the first captions appear at once. Unreadable images are reported as they
    # come; the rest are still captioned. The model loads with the first readable image.
    model, failed = None, 0
    paths = args.images
    with tqdm(total=len(paths), unit="image", file=sys.stderr, disable=len(paths) <= args.batch_size) as bar:

        def report(message: str) -> None:  # above the progress bar, not through it
            bar.write(f"blip2: error: {message}", file=sys.stderr)

        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start : start + args.batch_size]
            read, images = _read_images(chunk, report)
            failed += len(chunk) - len(read)
            if images:
                if model is None:
                    model = _load(args)
                texts = model.caption(images, prompt=args.prompt, **_gen_kwargs(args))
                for path, text in zip(read, texts, strict=True):
                    if args.json:
                        line = json.dumps({"image": path, "text": text}, ensure_ascii=False)
                    elif len(paths) == 1:
                        line = text.strip()
                    else:
                        line = f"{path}\t{text.strip()}"
                    bar.write(line, file=sys.stdout)
                    sys.stdout.flush()
                if args.heatmap:  # (one image)
                    _write_heatmap(model, images[0], texts[0], args)
                del images  # the next batch is read only after this one is let go
            bar.update(len(chunk))
    if failed:
        _error(f"{failed} of {len(paths)} images could not be read")
        return 1
    return 0


def _read_images(paths: Sequence[str], report) -> tuple[list[str], list[Image.Image]]:
    """The readable ``paths`` and their decoded images; each unreadable one passed to ``report(message)``."""
    from .errors import ImageError
    from .images import load_image

    read, images = [], []
    for path in paths:
        try:
            images.append(load_image(path))
            read.append(path)
        except ImageError as e:
            report(str(e))
    return read, images


def _write_heatmap(model, image, caption: str, args: argparse.Namespace) -> None:
    """Where the model looked for ``caption``, drawn over the image (at least 256 px) as ``--heatmap``."""
    from .attention_map import attention_map, overlay

    found = attention_map(model, image, caption, prompt=args.prompt or "", method=args.heatmap_method)
    overlay(image, found.grid, min_side=256).save(args.heatmap)
    print(f"blip2: {args.heatmap}: where it looked ({found.method})", file=sys.stderr)


def raise_input(message: str):
    from .errors import InputError

    raise InputError(message)


# ---------------------------------------------------------------------------- ask / chat


def _ask(args: argparse.Namespace) -> int:
    from .images import load_image

    image = load_image(args.image)
    model = _load(args)
    questions = args.questions
    answers = model.ask(image, questions, **_gen_kwargs(args))  # all together: the image is encoded once
    for question, answer in zip(questions, answers, strict=True):
        if args.json:
            print(json.dumps({"image": args.image, "question": question, "text": answer}, ensure_ascii=False))
        elif len(questions) == 1:
            print(answer.strip())
        else:
            print(f"{question} {answer.strip()}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .images import load_image

    image = load_image(args.image)
    model = _load(args)
    conversation = model.chat(image, **_gen_kwargs(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat about the image; /reset forgets the conversation, /quit or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            conversation.reset()
            continue
        try:
            for piece in conversation.stream(text):
                print(piece, end="", flush=True)
            print(flush=True)
        except InputError as e:  # a bad message ends nothing: say so and go on
            print(flush=True)
            _error(str(e))
    return 0


# ---------------------------------------------------------------------------- parser


def register(subparsers) -> None:
    common, gen = model_options(), generation_options()
    p = subparsers.add_parser("caption", parents=[common, gen], help="caption images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--prompt", default=None, help='text the caption continues, e.g. "a photo of"')
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help='one JSON line per image: {"image": ..., "text": ...}')
    p.set_defaults(func=_caption)

    p.add_argument(
        "--heatmap",
        metavar="PNG",
        default=None,
        help="also draw where the model looked over the image (one image) into this file",
    )
    p.add_argument(
        "--heatmap-method",
        choices=["auto", "attention", "gradcam"],
        default="auto",
        help="Q-Former cross-attention (auto for generation models) or Grad-CAM of the caption",
    )
    p.set_defaults(func=_caption)

    p = subparsers.add_parser("ask", parents=[common, gen], help="answer questions about an image")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("questions", nargs="+", metavar="QUESTION", help="one or more, answered together")
    p.add_argument("--json", action="store_true", help="one JSON object per question")
    p.set_defaults(func=_ask)

    p = subparsers.add_parser("chat", parents=[common, gen], help="talk about an image (interactive)")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=_chat)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2", description="BLIP-2: captions, questions and chat about images."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(subparsers)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import Blip2Error

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="blip2: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (Blip2Error, OSError, ValueError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        _error(message)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if argv is None:  # run as the program (not called with arguments): the process ends next
            # The interpreter's last garbage collections would walk every object torch made (~0.3 s);
            # none of them needs collecting when the process ends.
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
