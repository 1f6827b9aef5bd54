"""int4 with calibration: GPTQ (``gptq``) over a loaded float pipeline, fed by images the user gives.

    pipe = blip2.load("Salesforce/blip2-opt-2.7b")
    info = quantize_calibrated(pipe, ["photos/"], count=32)
    save_calibrated(pipe, "blip2-opt-2.7b-int4", info)     # = blip2 quantize SRC DST --bits 4 --calibration photos/

The inputs each int4 layer is fitted to are what it meets when the model captions and answers: every
calibration image with a prompt (``DEFAULT_PROMPTS`` in turn) and a continuation the float model samples
from its own distribution (temperature 1, as LLM-QAT's self-generated data: greedy text of a weak model
repeats itself), teacher-forced in one forward, so that the language model's layers see the prompt's
positions and those of text it generates. The int8 layers (the Q-Former, T5's encoder) are rounded as
without calibration, first; then the image side's int4 layers are fitted, then the language model's on
the image prefix the quantized image side gives. The result is an ordinary int4 checkpoint: only the
4-bit codes differ.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import InputError
from ..images import load_image, scan_images
from ..models.blip2 import ImageFeatures
from . import kernels, memory
from .checkpoint import method_of, save
from .gptq import DAMP, Hessian, gptq_int4, hessian_passes
from .int4 import DEFAULT_GROUP_SIZE, Int4Linear, check_group_size
from .model import plan, quantize_model_, replace

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("", "a photo of", "Question: what is in the picture? Answer:")
DEFAULT_COUNT = 32
CONTINUATION_TOKENS = 20
BUDGET_BYTES = 2 << 30  # input covariances collected at once (float32)


def image_files(sources: Sequence[str | os.PathLike], count: int) -> list[Path]:
    """The first ``count`` image files of ``sources`` (files, or folders searched recursively as
    ``blip2 index`` does: ``images.scan_images``), in order."""

    def unlistable(folder: Path, message: str) -> None:
        raise InputError(f"{folder}: {message} (calibration images)")

    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found += scan_images(path, on_error=unlistable)[0]
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or folder (calibration images)")
    if not found:
        raise InputError(f"no image files Pillow opens in {', '.join(map(str, sources))}")
    return found[:count]


IMAGE_KEYS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")


def _inputs(pipeline, images: list, prompts: Sequence[str], batch: int, progress: bool | None) -> list[dict]:
    """One model input per image: the prompt and the float model's sampled continuation, teacher-forced
    (a retrieval checkpoint: the pixels alone)."""
    model, processor = pipeline.model, pipeline.processor
    rows = [prompts[i % len(prompts)] for i in range(len(images))]
    if model.language_model is None:
        return [{"pixel_values": processor.image_processor([image])} for image in images]
    continuations: list[list[int]] = []
    starts = tqdm(range(0, len(images), batch), "calibration texts", unit="batch",
                  disable=None if progress is None else not progress)  # fmt: skip
    for start in starts:
        continuations += pipeline.generate_ids(
            images[start : start + batch],
            rows[start : start + batch],
            max_new_tokens=CONTINUATION_TOKENS,
            num_beams=1,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            seed=start,
        )
    inputs = []
    image_token = model.cfg.image_token_index  # a generated one would take the image's place
    for image, prompt, new in zip(images, rows, continuations, strict=True):
        enc = processor(images=[image], text=[prompt])
        new = [token for token in new if token != image_token]
        new_ids = torch.tensor([new or [processor.tokenizer.eos_token_id or 0]])
        if model.cfg.is_decoder_only:
            enc["input_ids"] = torch.cat([enc["input_ids"], new_ids], dim=1)
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        else:
            enc["decoder_input_ids"] = model.shift_right(new_ids)
        inputs.append(enc)
    return inputs


def quantize_calibrated(
    pipeline,
    images: Sequence[Any],
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    count: int = DEFAULT_COUNT,
    group_size: int = DEFAULT_GROUP_SIZE,
    damp: float = DAMP,
    budget_bytes: int = BUDGET_BYTES,
    progress: bool | None = None,
) -> dict:
    """Quantize a float CPU ``pipeline``'s model in place to int4 (as ``quantize="int4"``), its int4 layers
    fitted by GPTQ to calibration inputs: ``images`` (paths, folders, or images; the first ``count``).
    Returns the ``calibration`` note :func:`save_calibrated` writes into ``config.json``. The pipeline
    runs quantized afterwards; saved, it loads in a second.
    """
    check_group_size(group_size)
    if method_of(pipeline.model)[0] is not None:
        raise InputError("this model is already quantized: calibrate its float source")
    if pipeline.device.type != "cpu":
        raise InputError("calibrated int4 is written on the CPU: load the source with device='cpu'")
    if pipeline.decoder is not None:
        raise InputError(
            "calibrate a pipeline loaded without compile= (its static decoder holds the float weights)"
        )
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError("calibration prompts must be a non-empty list of strings")
    if count < 1:
        raise InputError(f"calibration count must be at least 1, not {count}")
    if isinstance(images, str | os.PathLike):
        images = [images]
    paths = [s for s in images if isinstance(s, str | os.PathLike)]
    if paths and len(paths) == len(images):
        images = image_files(paths, count)
    loaded = [load_image(image) for image in list(images)[:count]]
    if not loaded:
        raise InputError("no calibration images given")
    model = pipeline.model
    layers = plan(model, "int4")
    for name in layers:  # before the float model runs on them
        try:
            kernels.require_finite(model.get_submodule(name).weight)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
    with torch.inference_mode():
        inputs = _inputs(pipeline, loaded, prompts, batch=8, progress=progress)
    # int8 layers (the Q-Former, T5's encoder) are rounded first, so that the int4 ones are fitted to
    # what they will meet: the image side first, then the language model on the prefix it gives
    quantize_model_(
        model, "int4", group_size, progress=False, layers={n: b for n, b in layers.items() if b == "int8"}
    )
    int4 = [name for name, bits in layers.items() if bits == "int4"]
    vision = [name for name in int4 if not name.startswith("language_model.")]
    language = [name for name in int4 if name.startswith("language_model.")]
    mappings = memory.file_mappings()

    def quantize(name: str, hessian: Hessian) -> None:
        linear = model.get_submodule(name)
        try:
            codes = gptq_int4(linear.weight, hessian, group_size, damp)
        except ValueError as e:  # a weight that cannot be quantized, or inputs that cannot fit it: say which
            raise ValueError(f"{name}: {e}") from e
        layer = Int4Linear.from_codes(
            codes.q, codes.scales, codes.mins, linear.bias, linear.in_features, group_size
        )
        memory.release(linear.weight, mappings)
        replace(model, name, layer)  # later passes run through the int4 layer, as inference will

    def image_side(enc: dict) -> ImageFeatures:
        return model.image_features(*(enc.get(key) for key in IMAGE_KEYS))

    bar = tqdm(total=len(int4), desc="calibrating int4 (GPTQ)", unit="layer",
               disable=None if progress is None else not progress)  # fmt: skip
    with torch.inference_mode(), bar:
        if vision:
            runs = [lambda enc=enc: image_side(enc) for enc in inputs]
            hessian_passes(model, vision, runs, budget_bytes, quantize, bar.update)
        if language:  # the image prefix computed once, by the quantized image side
            texts = [{k: v for k, v in enc.items() if k not in IMAGE_KEYS} for enc in inputs]
            prefixes = [image_side(enc).prefix for enc in inputs]
            runs = [lambda t=t, p=p: model(**t, image_prefix=p) for t, p in zip(texts, prefixes, strict=True)]
            hessian_passes(model, language, runs, budget_bytes, quantize, bar.update)
    pipeline.clear_caches()  # the float model's image prefixes and prefills
    log.info("GPTQ: %d int4 layers on %d calibration images", len(vision) + len(language), len(loaded))
    return {
        "method": "gptq",
        "images": len(loaded),
        "prompts": list(prompts),
        "damp": damp,
        "act_order": True,
    }


def save_calibrated(pipeline, folder: str | os.PathLike, calibration: dict) -> Path:
    """Write a pipeline quantized by :func:`quantize_calibrated` as a checkpoint, noting the calibration."""
    return save(pipeline.model, pipeline.folder, folder, calibration=calibration)
