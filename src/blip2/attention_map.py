"""Where the model looked: a heat map over the image's patches, read from the Q-Former's cross-attention.

Shapes: ``L`` cross-attention layers, ``B`` batch, ``H`` heads, ``Q`` queries, ``N`` image tokens (the
class token, then ``gh × gw`` patches in row order).

Two maps, both ``(gh, gw)``, non-negative and summing to 1 (the class token is left out):

- ``"attention"``: the Q-Former's cross-attention weights over the patches, averaged over layers, heads
  and queries: what its queries read of the image. It depends on the image only; a generation model's
  queries never see the prompt, so its caption and its answers share this map.
- ``"gradcam"``: Grad-CAM on the cross-attention, as LAVIS's BLIP demo draws its image–text relevance:
  each layer's weights times the positive part of the gradient of a score with respect to them, averaged
  the same way. The score is the ITM match logit of the image and a text (retrieval checkpoints), or
  the log-likelihood of a text after a prompt (generation checkpoints: the caption or answer they gave).

``method="auto"`` takes Grad-CAM for a retrieval checkpoint given a text (unless the model cannot be
differentiated, as with int8 layers), the attention map otherwise.
:func:`overlay` and :func:`heat_layer` draw a map over the picture with Pillow.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .errors import InputError

if TYPE_CHECKING:
    from .api import Pipeline

METHODS = ("auto", "attention", "gradcam")


class AttentionMap(NamedTuple):
    grid: np.ndarray  # (gh, gw) float32, non-negative, sums to 1
    method: str  # "attention" or "gradcam"


def attention_map(
    pipe: Pipeline,
    image: Any,
    text: str | None = None,
    *,
    prompt: str = "",
    method: str = "auto",
) -> AttentionMap:
    """The heat map of one image (a path, PIL image, bytes, …; see :func:`blip2.images.load_image`).

    ``text``: what the Grad-CAM score is about: the text matched against the image (retrieval) or the
    generated text (generation), which continues ``prompt`` (empty for a caption; :func:`question_prompt`
    for an answer).
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    retrieval = pipe.config.retrieval
    auto = method == "auto"  # Grad-CAM where it applies, falling back to attention (e.g. int8 layers)
    if auto:
        method = "gradcam" if (retrieval and text) else "attention"
    if method == "gradcam" and not (text and text.strip()):
        raise InputError("a Grad-CAM map needs the text it is about (the caption, answer or query)")
    model = pipe.model
    pixels = pipe.processor.image_processor([image])  # (1, 3, S, S)
    pixels = pixels.to(pipe.device, model.vision.patch_embed.weight.dtype)
    grid = (
        pixels.shape[2] // pipe.config.vision.patch_size,
        pixels.shape[3] // pipe.config.vision.patch_size,
    )
    with torch.no_grad():
        vision = model.vision(pixels)  # (1, N, D_vision)
    if method == "gradcam":
        try:
            return AttentionMap(_to_grid(_gradcam(pipe, vision, text or "", prompt), grid), "gradcam")
        except _NoGradient as e:
            if not auto:
                raise InputError(
                    f"Grad-CAM needs gradients this model cannot give ({e}); use method='attention'"
                ) from None
    with torch.no_grad(), model.qformer.keep_cross_attention() as kept:
        model.query_features(vision, *_instruction(pipe, prompt))
    return AttentionMap(_to_grid(torch.stack(kept), grid), "attention")  # (L, 1, H, Q, N) -> grid


def _instruction(pipe: Pipeline, prompt: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """InstructBLIP's Q-Former reads the prompt too: its ids and mask (nothing for BLIP-2)."""
    if not pipe.config.instruction_aware:
        return None, None
    ids, mask = pipe.processor.qformer_ids([prompt])
    return ids.to(pipe.device), mask.to(pipe.device)


class _NoGradient(Exception):
    """The score cannot be differentiated with respect to the attention weights (e.g. int8 layers)."""


def question_prompt(pipe: Pipeline, question: str) -> str:
    """The prompt an answer to ``question`` continues (as :meth:`blip2.Pipeline.ask` builds it)."""
    return pipe.question_template.format(question.strip())


def _gradcam(pipe: Pipeline, vision: torch.Tensor, text: str, prompt: str) -> torch.Tensor:
    """(L, 1, H, Q, N): each cross-attention layer's weights times relu(d score / d weights)."""
    model = pipe.model
    with torch.enable_grad(), model.qformer.keep_cross_attention() as kept:
        score = (
            _itm_score(pipe, vision, text)
            if pipe.config.retrieval
            else _text_score(pipe, vision, text, prompt)
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns before it fails on layers with no backward
                grads = torch.autograd.grad(score, kept)
        except RuntimeError as e:  # e.g. int8 layers, which have no backward
            raise _NoGradient(str(e).split(". ")[0]) from None
    return torch.stack([w.detach() * g.clamp(min=0) for w, g in zip(kept, grads, strict=True)])


def _itm_score(pipe: Pipeline, vision: torch.Tensor, text: str) -> torch.Tensor:
    """The ITM head's match logit of the image and ``text`` (as LAVIS's demo takes it, before softmax)."""
    limit = pipe.config.qformer.max_position_embeddings
    enc = pipe.processor(text=[text], padding_side="right", max_length=limit)
    ids, mask = enc["input_ids"].to(pipe.device), enc["attention_mask"].to(pipe.device)
    return pipe.model.itm_logits(vision, ids, mask)[0, 1]


def _text_score(pipe: Pipeline, vision: torch.Tensor, text: str, prompt: str) -> torch.Tensor:
    """The mean log-likelihood of ``text``'s tokens continuing ``prompt`` for this image."""
    model = pipe.model
    tokenizer = pipe.processor.tokenizer
    prefix = model.query_features(vision, *_instruction(pipe, prompt)).prefix  # (1, Q, D_lm); the prompt
    # carries no <image> slots, so the model puts the prefix in front, where the slots would hold it
    if pipe.config.is_decoder_only:
        head = len(tokenizer.encode([prompt])[0])  # BOS and the prompt
        ids = torch.tensor(tokenizer.encode([prompt + text]), device=pipe.device)  # (1, T)
        labels = ids.masked_fill(torch.arange(ids.shape[1], device=pipe.device) < head, -100)
        out = model(input_ids=ids, labels=labels, image_prefix=prefix)
    else:  # T5: the prompt goes to the encoder, the text is the decoder's target
        ids = torch.tensor(tokenizer.encode([prompt]), device=pipe.device)
        labels = torch.tensor(tokenizer.encode([text]), device=pipe.device)
        out = model(input_ids=ids, labels=labels, image_prefix=prefix)
    if not bool((labels != -100).any()):
        raise InputError("the text has no tokens to explain")
    return -out.loss


def _to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """(L, 1, H, Q, N) -> (gh, gw): mean over layers, heads and queries, class token dropped, sum 1."""
    patches = maps[..., 1:].float().mean(dim=(0, 2, 3))[0]  # (N - 1,)
    if patches.numel() != grid[0] * grid[1]:
        raise InputError(f"{patches.numel()} image patches do not form a {grid[0]}x{grid[1]} grid")
    total = patches.sum()
    patches = patches / total if total > 0 else torch.full_like(patches, 1 / patches.numel())
    return patches.reshape(grid).cpu().numpy().astype(np.float32)


# ---- drawing ---------------------------------------------------------------------------------------

# A perceptually ordered ramp (dark blue -> teal -> yellow -> red), interpolated linearly.
_RAMP = np.array(
    [(0.0, 20, 30, 110), (0.35, 30, 150, 160), (0.65, 250, 220, 50), (1.0, 220, 30, 30)], dtype=np.float32
)


def _colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 colours of the ramp."""
    stops = _RAMP[:, 0]
    rgb = [np.interp(values, stops, _RAMP[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def _upsampled(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(gh, gw) -> (height, width) in [0, 1]: stretched from its minimum to its maximum (what stands
    out is where it looked more than elsewhere), smoothly resized."""
    low, high = float(grid.min()), float(grid.max())
    scaled = ((grid - low) / (high - low) if high > low else np.zeros_like(grid)).astype(np.float32)
    resized = Image.fromarray(scaled, mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def heat_layer(grid: np.ndarray, size: tuple[int, int], opacity: float = 0.65) -> Image.Image:
    """An RGBA image of ``size`` (width, height): the map's colours, clear where it is lowest and
    ``opacity`` opaque where it is highest."""
    values = _upsampled(grid, size)
    alpha = (255 * opacity * values).round().astype(np.uint8)
    return Image.fromarray(np.dstack([_colours(values), alpha]), mode="RGBA")


def overlay(image: Any, grid: np.ndarray, opacity: float = 0.65, min_side: int = 0) -> Image.Image:
    """The image (RGB) with the heat map drawn over it, at its own size, or enlarged until its longer
    side is ``min_side`` (a 64-pixel picture is hard to read)."""
    from .images import load_image

    base = load_image(image)
    if max(base.size) < min_side:
        scale = min_side / max(base.size)
        base = base.resize((round(base.width * scale), round(base.height * scale)), Image.Resampling.BICUBIC)
    base = base.convert("RGBA")
    return Image.alpha_composite(base, heat_layer(grid, base.size, opacity)).convert("RGB")
