"""Prompt templates, the image-prefix cache and the chat conversation used by :class:`blip2.Pipeline`.

Several questions about one image, or a chat, compute the image prefix once: the cache is keyed by
a hash of the preprocessed pixels (with the model's dtype and device), so the same picture given as
a path, a PIL image or an array hits the same entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .errors import InputError
from .generate import LRUCache, content_key

if TYPE_CHECKING:
    from .api import Pipeline

QUESTION_TEMPLATE = "Question: {} Answer:"
TURN_TEMPLATE = "Question: {} Answer: {}."  # one past exchange in a chat prompt (BLIP-2's own format)
# InstructBLIP: the instruction is the question itself (its model cards); captions follow its paper's prompt.
INSTRUCT_QUESTION_TEMPLATE = "{}"
INSTRUCT_CAPTION_PROMPT = "A short image description:"


class PrefixCache(LRUCache):
    """Pixel-content key -> (Q, D_lm) image prefix."""

    @staticmethod
    def key(pixels: torch.Tensor, dtype: torch.dtype, device: torch.device) -> str:
        """(3, S, S) pixels -> a key naming their content, shape, and where the prefix lives."""
        return content_key(pixels, dtype, device)

    def put(self, key: str, prefix: torch.Tensor) -> None:
        super().put(key, prefix.clone())  # not a view into a batch that would stay alive with it


def chat_prompt(history: list[tuple[str, str]], text: str, template: str = QUESTION_TEMPLATE) -> str:
    """BLIP-2's conversation format: past exchanges, then the new question worded by ``template``."""
    turns = [TURN_TEMPLATE.format(q, a) for q, a in history]
    return " ".join([*turns, template.format(text)])


class Conversation:
    """A chat about one image. ``say`` returns the reply; ``stream`` yields it piece by piece.

    The image is preprocessed once and its prefix comes from the pipeline's cache. When the history
    no longer fits the model's context, the oldest exchanges are left out of the prompt.
    """

    def __init__(self, pipeline: Pipeline, image: Any, gen: dict[str, Any] | None = None):
        self.pipeline = pipeline
        self.pixels = pipeline._pixels(image)
        if self.pixels.shape[0] != 1:
            raise InputError(f"a conversation is about one image, got {self.pixels.shape[0]}")
        self.gen = dict(gen or {})
        self.history: list[tuple[str, str]] = []
        if not pipeline.config.instruction_aware:  # (InstructBLIP's prefix depends on the prompt too)
            pipeline.image_prefix(self.pixels)  # compute (and cache) the prefix now

    @staticmethod
    def _check(text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise InputError("say something: the message is empty")
        return text.strip()

    def say(self, text: str, **gen) -> str:
        return "".join(self.stream(text, **gen))

    def stream(self, text: str, **gen) -> Iterator[str]:
        """Yield the reply as it is produced; it joins the history once complete."""
        options = {**self.gen, **gen}
        text = self._check(text)
        start = 0
        while True:
            prompt = chat_prompt(self.history[start:], text, self.pipeline.question_template)
            try:
                pieces = self.pipeline.stream(self.pixels, prompt, **options)
                first = next(pieces, None)
                break
            except InputError as e:
                if "context" not in str(e) or start >= len(self.history):
                    raise
                start += 1  # leave the oldest exchange out
        reply = ""
        if first is not None:
            reply += first
            yield first
        for piece in pieces:
            reply += piece
            yield piece
        self.history.append((text, reply.strip()))

    def reset(self) -> None:
        self.history.clear()
