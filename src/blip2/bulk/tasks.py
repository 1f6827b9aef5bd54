"""The work of a bulk job, shared by both engines: decode one input into pixels, run a batch of pixels.

Decoding (read the bytes, open the image, preprocess it) runs in decode workers, so the process holding
the model receives ready ``(3, S, S)`` float32 pixels, the very arrays ``Pipeline.caption`` would compute
from the same files (the same :class:`~blip2.images.ImageProcessor`). A batch is then one call of the public
API: ``caption`` for captions, ``generate`` with the ``ask`` template for questions (as ``ask`` does with
several questions), ``embed_image_batch`` for embeddings (as the index builder does), so the results are
those of ``blip2 caption`` / ``blip2 ask`` / ``embed_images``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..errors import CheckpointError, InputError
from ..shards import read_member

if TYPE_CHECKING:  # no torch at import: the local engine starts its decode processes before torch loads
    import torch

    from ..api import Pipeline
    from ..images import ImageProcessor

VERBS = ("caption", "ask", "embed")

# One output row: (key, question or None, text / (Q, E) float16 embedding or None, error or None).
Row = tuple[str, str | None, Any, str | None]


@dataclass(frozen=True)
class Task:
    """What to compute for every image: ``caption`` (with ``prompt``), ``ask`` (every one of ``questions``)
    or ``embed``; ``generation``: the generation options given (name, value), the checkpoint's otherwise."""

    verb: str
    prompt: str | None = None
    questions: tuple[str, ...] = ()
    generation: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.verb not in VERBS:
            raise InputError(f"unknown bulk task {self.verb!r}; one of {', '.join(VERBS)}")
        if self.verb == "ask":
            if not self.questions or not all(isinstance(q, str) and q.strip() for q in self.questions):
                raise InputError("ask needs at least one question (--question), none of them empty")
        elif self.questions:
            raise InputError(f"{self.verb} takes no questions")
        if self.verb == "embed" and (self.prompt is not None or self.generation):
            raise InputError("embed takes no prompt and no generation options")

    @classmethod
    def make(cls, verb: str, prompt: str | None = None, questions=(), **generation) -> Task:
        """A task from plain arguments; generation options that are None are left out."""
        gen = tuple(sorted((k, v) for k, v in generation.items() if v is not None))
        return cls(verb, prompt, tuple(questions or ()), gen)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Task:
        return cls.make(
            spec["verb"], spec.get("prompt"), spec.get("questions", ()), **spec.get("generation", {})
        )

    def spec(self) -> dict[str, Any]:
        """JSON form, stored with the output (a resumed job must be the same job)."""
        return {"verb": self.verb, "prompt": self.prompt, "questions": list(self.questions),
                "generation": dict(self.generation)}  # fmt: skip

    @property
    def rows_per_image(self) -> int:
        return len(self.questions) if self.verb == "ask" else 1

    # ---- the per-batch function ------------------------------------------------------------------

    def run(self, pipe: Pipeline, pixels: torch.Tensor) -> list[Any]:
        """(B, 3, S, S) pixels -> B × rows_per_image results, image by image (then question by question)."""
        gen = dict(self.generation)
        if self.verb == "caption":
            return pipe.caption(pixels, prompt=self.prompt, **gen)
        if self.verb == "ask":
            q = len(self.questions)
            template = pipe.question_template
            prompts = [template.format(text) for text in self.questions] * pixels.shape[0]
            return pipe.generate(pixels.repeat_interleave(q, dim=0), prompts, **gen)
        from ..retrieval import embed_image_batch, normalized

        dtype = pipe.model.vision.patch_embed.weight.dtype
        embeds = embed_image_batch(pipe, pixels.to(pipe.device, dtype))
        if not pipe.config.retrieval:
            embeds = normalized(embeds)  # Q-Former features, unit length as the index stores them
        return list(embeds.half().cpu().numpy())

    def rows(self, key: str, results: list[Any] | None, error: str | None) -> list[Row]:
        """The output rows of one image: its results (rows_per_image of them), or its error."""
        questions: tuple[str | None, ...] = self.questions if self.verb == "ask" else (None,)
        if results is None:
            return [(key, q, None, error) for q in questions]
        return [(key, q, r, None) for q, r in zip(questions, results, strict=True)]

    # ---- output tables ---------------------------------------------------------------------------

    def schema(self, embedding_shape: tuple[int, int] | None = None) -> pa.Schema:
        fields = [("key", pa.string())]
        if self.verb == "ask":
            fields.append(("question", pa.string()))
        if self.verb == "embed":
            if embedding_shape is None:
                raise ValueError("an embed table needs the embedding shape")
            q, e = embedding_shape
            fields.append(("embedding", pa.list_(pa.list_(pa.float16(), e), q)))
        else:
            fields.append(("text", pa.string()))
        fields.append(("error", pa.string()))
        return pa.schema(fields)

    def table(self, rows: list[Row], embedding_shape: tuple[int, int] | None = None) -> pa.Table:
        schema = self.schema(embedding_shape)
        keys, questions, values, errors = zip(*rows, strict=True) if rows else ((), (), (), ())
        columns: dict[str, pa.Array] = {"key": pa.array(keys, pa.string())}
        if self.verb == "ask":
            columns["question"] = pa.array(questions, pa.string())
        if self.verb == "embed":
            assert embedding_shape is not None
            columns["embedding"] = _embedding_array(values, embedding_shape)
        else:
            columns["text"] = pa.array(values, pa.string())
        columns["error"] = pa.array(errors, pa.string())
        return pa.table(columns, schema=schema)


def _embedding_array(values, shape: tuple[int, int]) -> pa.Array:
    """(Q, E) float16 arrays (None for an unreadable image) -> a fixed-size list of lists, nulls masked."""
    q, e = shape
    dense = np.zeros((len(values), q, e), np.float16)
    missing = np.array([v is None for v in values], dtype=bool)
    for i, v in enumerate(values):
        if v is not None:
            dense[i] = v
    inner = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), e)
    return pa.FixedSizeListArray.from_arrays(inner, q, mask=pa.array(missing))


# ---- decoding ------------------------------------------------------------------------------------


def decode(path: str, offset: int, size: int, error: str | None,
           processor: ImageProcessor) -> tuple[np.ndarray | None, str | None]:  # fmt: skip
    """One input -> ``((3, S, S) float32 pixels, None)``, or ``(None, why)`` when it cannot be read."""
    from ..images import load_image

    if error is not None:
        return None, error
    try:
        source: Any = path if offset < 0 else read_member(path, offset, size)
        return processor.preprocess(load_image(source)), None
    except Exception as e:  # noqa: BLE001 - any failure of one file is that file's error row, not the job's
        return None, one_line(e)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- what the driver needs to know of the checkpoint (without loading its weights) ----------------


@dataclass(frozen=True)
class ModelInfo:
    image_processor: ImageProcessor
    embedding: dict[str, Any]  # kind ("itc" | "qformer"), num_queries, dim: what `embed` writes


def describe(model: str) -> ModelInfo:
    """Read a checkpoint's config and processor files (the decode workers need the image processor)."""
    from ..models.checkpoint import resolve_checkpoint
    from ..models.config import Blip2Config
    from ..processor import Processor

    folder = resolve_checkpoint(model)
    cfg = Blip2Config.from_file(folder / "config.json")
    try:
        processor = Processor.from_pretrained(folder, cfg)
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder}: tokenizer or processor files missing ({e})") from None
    dim = cfg.image_text_hidden_size if cfg.retrieval else cfg.qformer.hidden_size
    kind = "itc" if cfg.retrieval else "qformer"
    return ModelInfo(
        processor.image_processor, {"kind": kind, "num_queries": cfg.num_query_tokens, "dim": dim}
    )
