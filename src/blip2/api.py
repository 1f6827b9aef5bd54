"""The everyday handle: ``blip2.load()`` and what it returns."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from .config import Blip2Config
from .errors import CheckpointError
from .model import Blip2
from .weights import load_into, read_tensors, resolve_checkpoint, resolve_dtype, weight_files

log = logging.getLogger(__name__)


def build_model(folder: Path, dtype: torch.dtype | str | None = None) -> tuple[Blip2, Blip2Config]:
    """Read ``config.json`` and the weights of a checkpoint folder into a ready ``Blip2`` (on CPU, eval)."""
    cfg = Blip2Config.from_file(folder / "config.json")
    dtype = resolve_dtype(dtype)
    files = weight_files(folder)
    with torch.device("meta"):
        model = Blip2(cfg)
    tensors = read_tensors(files)
    load_into(model, tensors, cfg, dtype)
    return model.eval(), cfg


class Pipeline:
    """A loaded BLIP-2: the ``model`` (an ``nn.Module``), its ``processor``, and the everyday methods."""

    def __init__(self, model: Blip2, processor, folder: Path, device: torch.device):
        self.model = model
        self.processor = processor
        self.folder = folder
        self.device = device

    @property
    def config(self) -> Blip2Config:
        return self.model.cfg

    def __repr__(self) -> str:
        kind = "retrieval" if self.config.retrieval else (self.config.text.kind if self.config.text else "?")
        dtype = self.model.vision.patch_embed.weight.dtype
        return f"Pipeline({str(self.folder)!r}, {kind}, device={self.device}, dtype={dtype})"


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> Pipeline:
    """Load a BLIP-2 checkpoint from a local folder or a hub id (``Salesforce/blip2-opt-2.7b``).

    ``dtype``: float32 (default), bfloat16 or float16 for the vision encoder and the language model;
    the Q-Former and its queries stay float32, as in the reference.
    """
    t0 = time.perf_counter()
    folder = resolve_checkpoint(name_or_path)
    model, cfg = build_model(folder, dtype)
    device = torch.device(device)
    if device.type != "cpu":
        model.to(device)
    processor = _load_processor(folder, cfg)
    log.info("loaded %s in %.1f s", folder, time.perf_counter() - t0)
    return Pipeline(model, processor, folder, device)


def _load_processor(folder: Path, cfg: Blip2Config):
    from .processor import Processor

    num_query_tokens = (
        cfg.num_query_tokens if (cfg.image_token_index is not None and not cfg.retrieval) else None
    )
    try:
        return Processor.from_pretrained(
            folder, cfg, num_query_tokens=num_query_tokens, image_token_id=cfg.image_token_index
        )
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: tokenizer or processor files missing ({e})") from None
