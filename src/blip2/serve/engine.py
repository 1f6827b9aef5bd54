"""The model side of the server: what the batcher's worker thread runs for a batch of jobs.

Shapes: ``B`` rows of a batch, ``S`` image side.

Generation runs every batch through :meth:`blip2.Pipeline.generate_steps`, streaming or not: each
step's tokens go to the streaming jobs as they come, and a job is answered as soon as all its rows are
done (EOS or its own ``max_tokens``), without waiting for the rest of the batch. Batched rows equal
rows run alone (the pipeline's design), and a greedy row cut at ``max_tokens`` equals a run with that
budget, so jobs with different ``max_tokens`` share a batch at the budget of the largest.

Never twice: a job keeps the tokens it has been given (``GenerationWork.tokens``). When a batch fails
partway, the batcher runs its unfinished jobs again one at a time, and such a run *resumes*: the
pipeline takes the job's tokens as forced (``generate_steps(forced=...)``), the engine does not send
them again, and generation goes on from them. A streaming client therefore reads what it was sent
followed by the rest, which for greedy decoding is exactly the text of a run that never failed (and for
sampling, a continuation of what it has); if the run alone fails too, the stream ends with an error
event after the text already sent. Text is never sent twice, and a stream never restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .batcher import Job


@dataclass
class GenerationWork:
    """One chat / caption request: one image's pixels ``(3, S, S)``, one prompt, ``rows`` copies."""

    pixels: torch.Tensor
    prompt: str
    gen: dict[str, Any]  # generation options shared by the batch (the job key)
    copies: int = 1  # identical answers to hand out (greedy n > 1 computes one row)
    tokens: list[list[int]] | None = None  # per row, the tokens produced (and streamed) so far


@dataclass
class RowResult:
    ids: list[int]
    finish_reason: str  # "stop" (EOS) or "length"


def generation_key(gen: dict[str, Any]) -> tuple:
    """Jobs with equal keys may share a batch. Seeded sampling never shares: its random stream must
    not depend on who else is in the batch."""
    items = tuple(sorted((k, v) for k, v in gen.items() if k != "max_new_tokens"))
    if gen.get("do_sample") and gen.get("seed") is not None:
        return ("alone", object())
    return items


class Engine:
    """Holds the pipeline; its ``handlers`` are given to the :class:`~blip2.serve.batcher.Batcher`."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.eos = set(pipe.generation_config.eos_token_id)
        self.handlers = {"generate": self.generate, "embed": self.embed}

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, jobs: list[Job]) -> None:
        pixels = torch.cat([j.payload.pixels[None].expand(j.rows, -1, -1, -1) for j in jobs])  # (B, 3, S, S)
        prompts = [j.payload.prompt for j in jobs for _ in range(j.rows)]
        gen = dict(jobs[0].payload.gen, max_new_tokens=max(j.max_new for j in jobs))
        starts, offset = [], 0
        for j in jobs:
            starts.append(offset)
            offset += j.rows
        for j in jobs:
            if j.payload.tokens is None:
                j.payload.tokens = [[] for _ in range(j.rows)]
        tokens = [j.payload.tokens for j in jobs]  # kept on the jobs: a re-run resumes from them
        done = [[self._row_done(ids, j.max_new) for ids in t] for j, t in zip(jobs, tokens, strict=True)]
        forced = [list(ids) for t in tokens for ids in t]
        # the forced tokens come back as the first steps: counted down per row, not sent again
        replay = [[len(ids) for ids in t] for t in tokens]

        steps = self.pipe.generate_steps(pixels, prompts, forced=forced if any(forced) else None, **gen)
        try:
            for step in steps:
                for n, job in enumerate(jobs):
                    if job.finished or job.cancelled:
                        continue
                    new: list[int | None] = []
                    for r in range(job.rows):
                        token = step[starts[n] + r]
                        if replay[n][r]:
                            replay[n][r] -= 1
                            new.append(None)
                            continue
                        if done[n][r] or token is None:
                            done[n][r] = True
                            new.append(None)
                            continue
                        tokens[n][r].append(token)
                        new.append(token)
                        if token in self.eos or len(tokens[n][r]) >= job.max_new:
                            done[n][r] = True
                    if job.stream and any(t is not None for t in new):
                        job.send("tokens", self._copies(new, job.payload.copies))
                    if all(done[n]):
                        job.finish(self._result(tokens[n], job))
                if all(j.finished or j.cancelled for j in jobs):
                    break
        finally:
            steps.close()
        for n, job in enumerate(jobs):
            if not job.finished:
                job.finish(self._result(tokens[n], job))

    def _row_done(self, ids: list[int], max_new: int) -> bool:
        return bool(ids) and (ids[-1] in self.eos or len(ids) >= max_new)

    @staticmethod
    def _copies(rows: list, copies: int) -> list:
        return [row for row in rows for _ in range(copies)] if copies > 1 else rows

    def _result(self, rows: list[list[int]], job: Job) -> list[RowResult]:
        out = [RowResult(ids, "stop" if ids and ids[-1] in self.eos else "length") for ids in rows]
        return self._copies(out, job.payload.copies)

    # ---- embeddings ---------------------------------------------------------------------------

    def embed(self, jobs: list[Job]) -> None:
        """Jobs' payloads: lists of ``("text", str)`` / ``("image", PIL image)``; the texts of the
        whole batch go through one text pass, the images through one image pass."""
        items = [item for j in jobs for item in j.payload]
        texts = [value for kind, value in items if kind == "text"]
        images = [value for kind, value in items if kind == "image"]
        text_vecs = list(self.pipe.embed_texts(texts)) if texts else []  # (T, E)
        image_vecs = list(self.pipe.embed_images(images)) if images else []  # (I, Q, E)
        for job in jobs:
            out = []
            for kind, _ in job.payload:
                out.append(text_vecs.pop(0) if kind == "text" else image_vecs.pop(0))
            job.finish(out)
