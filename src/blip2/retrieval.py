"""Image–text retrieval over a loaded pipeline: ITM, ITC, embeddings, and ranking a gallery.

Shapes: ``I`` images, ``T`` texts, ``Q`` queries, ``E`` embedding width (``image_text_hidden_size``).
Everything here is batched (``batch_size``) so that a large gallery never needs all its images in memory:
images are read, preprocessed and embedded one batch at a time. Results come back as float32 on the CPU.

On retrieval checkpoints (``blip2-itm-vit-g`` layout) image embeddings are the normalised ITC query
embeddings ``(I, Q, E)``. On generation checkpoints, which have no projections, ``embed_images`` returns
the raw Q-Former query outputs ``(I, Q, D_qformer)`` (the reference's ``get_qformer_features``); text
embeddings, ITC and ITM need the retrieval heads and raise :class:`~blip2.errors.InputError` there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError

if TYPE_CHECKING:
    from .api import Pipeline


class Match(NamedTuple):
    """One ranked gallery item: its position in the gallery, ITC score and (when re-ranked) ITM probability."""

    index: int
    itc: float
    itm: float | None = None


# ---- inputs ---------------------------------------------------------------------------------------


def as_image_list(images: Any) -> list[Any]:
    """One image source or many, as a list of sources (nothing is decoded here)."""
    if isinstance(images, Image.Image | str | os.PathLike | bytes | bytearray | memoryview):
        return [images]
    if isinstance(images, np.ndarray | torch.Tensor):
        return [images] if images.ndim <= 3 else list(images)
    if isinstance(images, Sequence) or hasattr(images, "__iter__"):
        out = list(images)
        if not out:
            raise InputError("no images given: the list of images is empty")
        return out
    raise InputError(f"cannot read images from a {type(images).__name__}")


def as_text_list(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence) or not texts:
        raise InputError("texts must be a string or a non-empty list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"texts[{i}] is a {type(t).__name__}, not a string")
    return list(texts)


def _batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _pixels(pipe: Pipeline, images: Sequence[Any]) -> torch.Tensor:
    """(B, 3, S, S) pixels on the pipeline's device, in the vision encoder's dtype."""
    pixels = pipe.processor.image_processor(list(images))
    return pixels.to(pipe.device, pipe.model.vision.patch_embed.weight.dtype)


def _tokens(pipe: Pipeline, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain BERT ``[CLS] … [SEP]`` ids, right padded, cut at the Q-Former's position limit."""
    limit = pipe.config.qformer.max_position_embeddings
    enc = pipe.processor(text=list(texts), padding_side="right", max_length=limit)
    return enc["input_ids"].to(pipe.device), enc["attention_mask"].to(pipe.device)


# ---- embeddings and scores ------------------------------------------------------------------------


@torch.inference_mode()
def embed_image_batch(pipe: Pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) pixels -> (B, Q, E) normalised ITC embeddings, or (B, Q, D) Q-Former features."""
    query_out = pipe.model.image_features(pixels).qformer
    if pipe.config.retrieval:
        return pipe.model.image_embeddings(query_out).float()
    return query_out.float()


def embed_images(pipe: Pipeline, images: Any, batch_size: int = 32) -> torch.Tensor:
    """(I, Q, E) normalised query embeddings (retrieval) or (I, Q, D) Q-Former features (generation)."""
    sources = as_image_list(images)
    out = [embed_image_batch(pipe, _pixels(pipe, batch)).cpu() for batch in _batches(sources, batch_size)]
    return torch.cat(out)


@torch.inference_mode()
def embed_texts(pipe: Pipeline, texts: Any, batch_size: int = 256) -> torch.Tensor:
    """(T, E) normalised ITC embeddings of the texts' [CLS] positions (retrieval checkpoints only)."""
    pipe.model._retrieval()
    texts = as_text_list(texts)
    out = []
    for batch in _batches(texts, batch_size):
        ids, mask = _tokens(pipe, batch)
        out.append(pipe.model.text_embeddings(ids, mask).float().cpu())
    return torch.cat(out)


def similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(I, Q, E) with (T, E) -> (I, T): max over queries of the cosine similarity (no temperature)."""
    return torch.einsum("iqe,te->iqt", image_embeds.float(), text_embeds.float()).amax(dim=1)


def itc(pipe: Pipeline, images: Any, texts: Any, batch_size: int = 32) -> torch.Tensor:
    """(I, T): every image against every text, max over queries of the cosine similarity."""
    pipe.model._retrieval()
    text_embeds = embed_texts(pipe, texts)
    return similarity(embed_images(pipe, images, batch_size), text_embeds)


@torch.inference_mode()
def itm(pipe: Pipeline, images: Any, texts: Any, batch_size: int = 32) -> torch.Tensor:
    """(n,) match probability of each (image_i, text_i) pair: softmax of the ITM head, class 1.

    One image with several texts (or one text with several images) is broadcast.
    """
    pipe.model._retrieval()
    sources, texts = as_image_list(images), as_text_list(texts)
    if len(sources) != len(texts):
        if len(sources) == 1:
            sources = sources * len(texts)
        elif len(texts) == 1:
            texts = texts * len(sources)
        else:
            raise InputError(f"itm scores pairs: got {len(sources)} images and {len(texts)} texts")
    out = []
    for start in range(0, len(texts), max(1, batch_size)):
        batch_images, batch_texts = sources[start : start + batch_size], texts[start : start + batch_size]
        logits = itm_logits(pipe, vision_features(pipe, batch_images), batch_texts)  # (B, 2)
        out.append(logits.softmax(dim=-1)[:, 1])
    return torch.cat(out)


@torch.inference_mode()
def vision_features(pipe: Pipeline, images: Sequence[Any]) -> torch.Tensor:
    """(B, N, D_vision) image-encoder features of a batch of images, on the pipeline's device (what ITM reads)."""
    return pipe.model.image_features(_pixels(pipe, images)).vision


@torch.inference_mode()
def itm_logits(pipe: Pipeline, vision: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """(B, N, D_vision) image features with B texts -> (B, 2) ITM logits (mean over queries), float32 on
    the CPU. The features can be computed once (:func:`vision_features`) and paired with many texts."""
    pipe.model._retrieval()
    ids, mask = _tokens(pipe, as_text_list(list(texts)))
    return pipe.model.itm_logits(vision, ids, mask).float().cpu()


# ---- ranking ----------------------------------------------------------------------------------------


def rank(
    pipe: Pipeline,
    text: str,
    images: Any = None,
    *,
    image_embeds: torch.Tensor | None = None,
    top: int | None = 10,
    rerank: int = 0,
    batch_size: int = 32,
) -> list[Match]:
    """Rank a gallery for one text as BLIP-2 does: by ITC, then re-rank the best ``rerank`` by ITM.

    ``images``: the gallery (needed for re-ranking); ``image_embeds``: its (I, Q, E) embeddings when
    already computed (e.g. by :func:`embed_images`). Returns up to ``top`` matches, best first: the
    re-ranked ones (by ITM probability) ahead of the rest (by ITC score).
    """
    pipe.model._retrieval()
    if not isinstance(text, str):
        raise InputError("rank takes one text query (a string)")
    sources = as_image_list(images) if images is not None else None
    if image_embeds is None:
        if sources is None:
            raise InputError("rank needs the gallery images or their image_embeds")
        image_embeds = embed_images(pipe, sources, batch_size)
    if sources is not None and len(sources) != image_embeds.shape[0]:
        raise InputError(f"{len(sources)} images but {image_embeds.shape[0]} image embeddings")
    scores = similarity(image_embeds, embed_texts(pipe, text))[:, 0]  # (I,)
    order = torch.argsort(scores, descending=True).tolist()
    matches = [Match(i, float(scores[i])) for i in order]
    if rerank > 0:
        if sources is None:
            raise InputError("re-ranking by ITM needs the gallery images, not only their embeddings")
        head = matches[:rerank]
        probs = itm(pipe, [sources[m.index] for m in head], text, batch_size).tolist()
        head = sorted((m._replace(itm=p) for m, p in zip(head, probs, strict=True)), key=lambda m: -m.itm)
        matches = head + matches[rerank:]
    return matches if top is None else matches[:top]


def normalized(embeds: torch.Tensor) -> torch.Tensor:
    """Unit-length rows along the last axis (Q-Former features of generation checkpoints, for search)."""
    return F.normalize(embeds.float(), dim=-1)
