"""Training data: image-caption pairs from JSON lines or WebDataset tar shards, with augmentation.

Both sources are indexed once at the start into a list of :class:`Sample` (a tar member is found again by
its byte offset), so every epoch is a seeded permutation of plain indices: shuffling, sharding across
ranks and exact resume reduce to "skip the first ``k`` batches of epoch ``e``".

- JSON lines: ``{"image": path, "text": caption}`` with an optional ``"prompt"``; relative paths are
  taken from the file's folder.
- WebDataset tars: members grouped by key (the path up to the first dot of the file name); an image
  (``.jpg``, ``.png``, …) with ``.txt`` / ``.caption`` text or a ``.json`` holding ``text`` / ``caption``
  (and optionally ``prompt``); a ``.prompt`` member is read too.

Bad samples never stop a run: bad lines, empty captions and missing images are left out while indexing,
unreadable images when they are read; each is counted by reason and reported.

Shapes: ``B`` batch, ``S`` image side.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import Blip2Error, InputError
from ..images import load_image
from ..shards import expand_braces, read_member, split_key

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
TEXT_EXTENSIONS = ("txt", "caption", "text")


@dataclass(frozen=True)
class Sample:
    image: str  # a file path, or the tar shard holding the image
    text: str
    prompt: str | None = None
    offset: int = -1  # byte offset of the image inside the tar shard; -1 for a plain file
    size: int = 0
    key: str = ""  # identifies the image: the same image under two captions is never its own negative


@dataclass
class Dataset:
    samples: list[Sample]
    skipped: Counter = field(default_factory=Counter)  # reason -> count, found while indexing


def clean_text(text: Any) -> str:
    return " ".join(str(text).split()) if isinstance(text, str) else ""


# ---- indexing ----------------------------------------------------------------------------------------


def read_jsonl(path: Path, skipped: Counter) -> list[Sample]:
    samples = []
    root = path.parent
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["bad json line"] += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                skipped["no image field"] += 1
                continue
            text = clean_text(row.get("text", row.get("caption")))
            if not text:
                skipped["empty caption"] += 1
                continue
            image = Path(row["image"]).expanduser()
            image = image if image.is_absolute() else root / image
            if not image.is_file():
                skipped["missing image"] += 1
                continue
            prompt = row.get("prompt")
            samples.append(
                Sample(str(image), text, prompt if isinstance(prompt, str) else None, key=str(image))
            )
    return samples


def read_tar(path: Path, skipped: Counter) -> list[Sample]:
    """Index one WebDataset shard: image offsets, and the (small) text members read now."""
    groups: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                group = groups.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS:
                    group["image"] = (member.offset_data, member.size)
                elif ext in (*TEXT_EXTENSIONS, "json", "prompt"):
                    f = tar.extractfile(member)
                    group[ext] = f.read().decode("utf-8", errors="replace") if f else ""
    except (OSError, tarfile.TarError) as e:
        log.warning("%s: unreadable tar shard, skipped (%s)", path, e)
        skipped["unreadable shard"] += 1
        return []
    samples = []
    for key, group in groups.items():
        text, prompt = next((group[e] for e in TEXT_EXTENSIONS if e in group), None), group.get("prompt")
        if "json" in group:
            try:
                meta = json.loads(group["json"])
            except json.JSONDecodeError:
                meta = {}
            if isinstance(meta, dict):
                text = text if text is not None else meta.get("text", meta.get("caption"))
                prompt = prompt if prompt is not None else meta.get("prompt")
        if "image" not in group:
            skipped["missing image"] += 1
            continue
        text = clean_text(text)
        if not text:
            skipped["empty caption"] += 1
            continue
        offset, size = group["image"]
        prompt = prompt.strip() if isinstance(prompt, str) else None
        samples.append(Sample(str(path), text, prompt, offset, size, key=f"{path}:{key}"))
    return samples


def open_dataset(spec: str | os.PathLike) -> Dataset:
    """A ``.jsonl`` file, a ``.tar`` shard, a folder of shards, or a glob / brace pattern of shards."""
    spec = str(spec)
    paths = _expand(spec)
    if not paths:
        raise InputError(
            f"{spec}: no training data found (expected a .jsonl file, .tar shards or a folder of them)"
        )
    skipped: Counter = Counter()
    samples: list[Sample] = []
    for p in paths:
        if p.suffix == ".tar":
            samples += read_tar(p, skipped)
        else:
            samples += read_jsonl(p, skipped)
    if not samples:
        raise InputError(f"{spec}: no usable samples ({_describe(skipped) or 'empty'})")
    if skipped:
        log.warning("%s: %d sample(s) left out: %s", spec, sum(skipped.values()), _describe(skipped))
    return Dataset(samples, skipped)


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(path.glob("*.tar")) or sorted(path.glob("*.jsonl"))
    if path.is_file():
        return [path]
    names = expand_braces(spec)
    if names is not None:
        return [Path(n) for n in names if Path(n).is_file()]
    return [Path(p) for p in sorted(glob.glob(spec))]


def _describe(skipped: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))


# ---- images ------------------------------------------------------------------------------------------


def read_sample_image(sample: Sample) -> Image.Image:
    if sample.offset < 0:
        return load_image(sample.image)
    return load_image(read_member(sample.image, sample.offset, sample.size))


def random_resized_crop(
    image: Image.Image, size: int, rng: random.Random, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """A random crop covering ``scale`` of the area with aspect in ``ratio``, resized (bicubic) to ``size``²;
    the same sampling as torchvision's RandomResizedCrop, which LAVIS uses."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:  # fall back to a centre crop at the nearest allowed aspect
        aspect = width / height
        if aspect < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif aspect > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


@dataclass(frozen=True)
class ImageTransform:
    """Training augmentation (random resized crop, scale 0.5–1, and horizontal flip) or a plain resize,
    then the checkpoint's rescale and normalisation: (3, S, S) float32."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = True
    resample: int = 3

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.augment:
            image = random_resized_crop(image, self.size, rng)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.size, self.size), self.resample)
        x = np.asarray(image, dtype=np.float32) / 255.0  # (S, S, 3)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


# ---- dataset, order and batches ---------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Per-sample augmentation seed: independent of workers and of where a run was resumed."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class ImageTextData(torch.utils.data.Dataset):
    """Items are ``(epoch, index)``; returns a dict, or ``{"bad": reason}`` for an unreadable image."""

    def __init__(self, dataset: Dataset, transform: ImageTransform, seed: int = 0):
        self.samples = dataset.samples
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        epoch, index = item
        sample = self.samples[index]
        if not os.path.isfile(sample.image):  # deleted since indexing
            return {"bad": "missing image", "where": sample.image}
        try:
            image = read_sample_image(sample)
        except (Blip2Error, OSError, ValueError) as e:
            return {"bad": "unreadable image", "where": f"{sample.image} ({e})"}
        pixels = self.transform(image, random.Random(sample_seed(self.seed, epoch, index)))
        return {"pixels": pixels, "text": sample.text, "prompt": sample.prompt, "key": sample.key}


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, S, S)
    texts: list[str]
    prompts: list[str | None]
    keys: list[str]
    skipped: Counter
    bad: list[tuple[str, str]] = field(default_factory=list)  # (reason, which sample)

    def __len__(self) -> int:
        return len(self.texts)


def collate(items: list[dict[str, Any]]) -> Batch:
    good = [it for it in items if "bad" not in it]
    skipped: Counter = Counter(it["bad"] for it in items if "bad" in it)
    pixels = torch.stack([it["pixels"] for it in good]) if good else torch.empty(0)
    return Batch(
        pixels,
        [it["text"] for it in good],
        [it["prompt"] for it in good],
        [it["key"] for it in good],
        skipped,
        [(it["bad"], it["where"]) for it in items if "bad" in it],
    )


class EpochBatches(torch.utils.data.Sampler):
    """Batches of ``(epoch, index)`` for one epoch: a permutation seeded by ``(seed, epoch)``, this rank's
    stride of it, cut into batches, starting at batch ``start`` (for resume)."""

    def __init__(
        self, n: int, batch_size: int, epoch: int, seed: int, start: int = 0, rank: int = 0, world: int = 1
    ):
        self.n, self.batch_size, self.epoch, self.seed = n, batch_size, epoch, seed
        self.start, self.rank, self.world = start, rank, world

    @staticmethod
    def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
        return math.ceil((n // world) / batch_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.n, self.batch_size, self.world) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        per_rank = self.n // self.world  # every rank runs the same number of batches
        mine = order[self.rank :: self.world][:per_rank]
        for b in range(self.start, self.batches_per_epoch(self.n, self.batch_size, self.world)):
            yield [(self.epoch, i) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]]
