"""``blip2 quantize SRC DST --bits 8|4``: write a quantized copy of a checkpoint, which ``blip2.load`` maps
into memory as it is (no quantizing at each start)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _quantize(args: argparse.Namespace) -> int:
    import blip2

    from ..errors import InputError
    from .int4 import DEFAULT_GROUP_SIZE

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty folder; give a new one")
    method = f"int{args.bits}"
    if args.calibration:
        from .calibrate import DEFAULT_PROMPTS, quantize_calibrated, save_calibrated

        if args.bits != 4:
            raise InputError("--calibration fits int4 codes (GPTQ): use it with --bits 4")
        pipeline = blip2.load(args.source)
        note = quantize_calibrated(
            pipeline,
            args.calibration,
            prompts=args.calibration_prompt or DEFAULT_PROMPTS,
            count=args.calibration_count,
            group_size=args.group_size or DEFAULT_GROUP_SIZE,
        )
        save_calibrated(pipeline, out, note)
    else:
        blip2.load(args.source, quantize=method, group_size=args.group_size).save(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: {method} checkpoint, {size / 1e6:.1f} MB of weights", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write a checkpoint with int8 / int4 weights that loads without quantizing",
        description="Quantize SRC's linear layers (as blip2.load(..., quantize='int8' / 'int4') does) and "
        "write DST, a hub-layout folder whose weights hold the packed layers; blip2.load(DST) maps it.",
    )
    p.add_argument("source", metavar="SRC", help="float checkpoint: hub id, local folder, or demo")
    p.add_argument("output", metavar="DST", help="a new (or empty) folder")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8: int8 everywhere; 4: int4 LM")
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="4 bits: inputs per scale, a multiple of 128 (default 128)",
    )
    p.add_argument(
        "--calibration",
        nargs="+",
        metavar="IMAGES",
        help="4 bits: fit the int4 codes with GPTQ to what the layers meet on these images (files or "
        "folders) instead of rounding each weight; slower to write, closer to float32",
    )
    p.add_argument(
        "--calibration-count",
        type=int,
        metavar="N",
        default=32,
        help="calibration images used, the first in sorted order (default 32)",
    )
    p.add_argument(
        "--calibration-prompt",
        action="append",
        metavar="TEXT",
        help="a prompt the calibration images are given in turn (repeat for more; default: none, "
        "'a photo of', and a question)",
    )
    p.set_defaults(func=_quantize)
