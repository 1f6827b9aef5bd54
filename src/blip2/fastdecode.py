"""Decode steps of static shapes, captured once per shape as a CUDA graph and replayed.

A decode step of one token per row is bound, on a GPU, by launching its few hundred small kernels
rather than by reading the weights. ``blip2.load(..., compile=True)`` gives the pipeline a
:class:`StaticDecoder`: each generation prefills as usual, then moves its KV cache into buffers held
for its shape (rows, cache length rounded up to :data:`LENGTH_BUCKET`; T5: also the encoder length),
and every step runs ``runner.static_step`` on them: the position is a 0-dim tensor, attention reads
the whole buffer (causality hides what is not written yet), so the step's kernels and their
arguments are the same at every step and in every later generation of that shape. The first step
of a shape is recorded as a CUDA graph; later steps write the new tokens and position into the
graph's inputs and replay it. Reading the new tokens is the only wait for the device per step.

Modes: ``"graphs"`` (``compile=True``): the eager step, captured; ``"inductor"``: the step compiled
by ``torch.compile`` (fusing, e.g., the int8 weight dequantization into the matmul), then captured
by hand; ``"static"``: the static-shape step run eagerly without capture (any device: what the CPU
tests check against the plain decode).

A shape's buffers serve one generation at a time; a generation that finds them in use (a second
stream of the same shape, interleaved) decodes the plain way. At most ``max_shapes`` shapes are kept,
least recently used out first. Only a language model wholly on one CUDA device is captured.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .generate import OPTRunner, T5Runner
from .models.language.t5 import T5DecoderCache
from .models.layers import KVCache

log = logging.getLogger(__name__)

LENGTH_BUCKET = 32  # cache and encoder lengths are rounded up to a multiple of this
MODES = ("graphs", "inductor", "static")


@dataclass
class _Shape:
    """Static buffers of one shape, and its captured step."""

    cache: list[KVCache] | T5DecoderCache
    mask: torch.Tensor | None  # (rows, L) decoder-only models: 1 past the prompt
    tokens: torch.Tensor  # (rows,) the step's input
    pos: torch.Tensor  # () the step's position
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None  # the captured step's output
    busy: bool = False
    steps: int = field(default=0)


class StaticDecoder:
    """Static-shape decode steps for one language model (see the module docstring)."""

    def __init__(self, mode: str = "graphs", max_shapes: int = 4):
        if mode not in MODES:
            raise ValueError(f"compile mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.max_shapes = max_shapes
        self._shapes: OrderedDict[tuple, _Shape] = OrderedDict()
        self._step_fn = None
        self.captures = 0  # graphs recorded (tests and benchmarks read it)

    def wrap(self, runner: OPTRunner | T5Runner) -> StaticRunner | OPTRunner | T5Runner:
        if self.mode != "static" and not _one_cuda_device(runner.lm):
            return runner
        return StaticRunner(runner, self)

    def clear(self) -> None:
        """Drop every shape's buffers and graph (e.g. before freeing the model)."""
        self._shapes.clear()

    # ---- shapes ------------------------------------------------------------------------------------

    def acquire(self, runner: OPTRunner | T5Runner) -> _Shape | None:
        """The buffers for ``runner``'s shape, marked busy; None when they are in use or all shapes are."""
        key = _key(runner)
        shape = self._shapes.get(key)
        if shape is None:
            while len(self._shapes) >= self.max_shapes:
                idle = next((k for k, s in self._shapes.items() if not s.busy), None)
                if idle is None:
                    return None
                del self._shapes[idle]
            shape = self._shapes[key] = _allocate(runner, key)
        elif shape.busy:
            return None
        self._shapes.move_to_end(key)
        shape.busy = True
        return shape

    def step_fn(self):
        """What runs a static step: the runner's own, or it compiled (``inductor``)."""
        if self._step_fn is None:
            if self.mode == "inductor":
                self._step_fn = torch.compile(_static_step, dynamic=False, fullgraph=False)
            else:
                self._step_fn = _static_step
        return self._step_fn


class StaticRunner:
    """A runner whose decode steps run on its shape's static buffers (prefill and the first beam
    expansion run the plain way, then the cache moves into the buffers)."""

    def __init__(self, runner: OPTRunner | T5Runner, decoder: StaticDecoder):
        self.runner, self.decoder = runner, decoder
        self.shape: _Shape | None = None
        self.plain = False  # the buffers were in use: decode the plain way

    @property
    def lm(self):
        return self.runner.lm

    def prefill(self) -> torch.Tensor:
        return self.runner.prefill()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.shape is None and not self.plain:
            self.shape = self.decoder.acquire(self.runner)
            if self.shape is None:
                self.plain = True
            else:
                _adopt(self.runner, self.shape)
        if self.plain:
            return self.runner.step(tokens)
        shape, runner = self.shape, self.runner
        shape.tokens.copy_(tokens)
        shape.pos.fill_(runner.pos)
        step = self.decoder.step_fn()
        if self.decoder.mode == "static":
            logits = step(runner, shape.tokens, shape.pos)
        else:
            if shape.graph is None:
                shape.graph, shape.logits = _capture(lambda: step(runner, shape.tokens, shape.pos))
                self.decoder.captures += 1
            else:
                shape.graph.replay()
            logits = shape.logits.clone()  # the next replay overwrites the graph's output
        shape.steps += 1
        runner.pos += 1
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        if self.shape is None:
            self.runner.reorder(index)  # the beams' first expansion changes the number of rows
        else:
            self.runner.reorder_(index)

    def close(self) -> None:
        if self.shape is not None:
            self.shape.busy = False
            self.shape = None


def _static_step(runner: OPTRunner | T5Runner, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return runner.static_step(tokens, pos)


def _capture(fn) -> tuple[Any, torch.Tensor]:
    """Run ``fn`` once on a side stream (it performs the real step; the lazily made tensors it needs
    come to exist), record it as a CUDA graph, and replay it (recording does not run it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    return graph, out


def _one_cuda_device(lm: torch.nn.Module) -> bool:
    devices = {t.device for t in lm.parameters()} | {t.device for t in lm.buffers()}
    return len(devices) == 1 and next(iter(devices)).type == "cuda"


def _rounded(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def _key(runner: OPTRunner | T5Runner) -> tuple:
    if isinstance(runner, T5Runner):
        first = runner.cache.self_attn[0]
        encoder_len = runner.cache.cross_kv[0][0].shape[2]
        return ("t5", first.k.shape[0], _rounded(first.max_len), _rounded(encoder_len), first.k.dtype)
    first = runner.cache[0]
    return ("decoder", first.k.shape[0], _rounded(first.max_len), 0, first.k.dtype)


def _allocate(runner: OPTRunner | T5Runner, key: tuple) -> _Shape:
    _, rows, length, encoder_len, _ = key
    if isinstance(runner, T5Runner):
        cache = runner.cache
        cross_kv = []
        for k, _ in cache.cross_kv:
            shape = (rows, k.shape[1], encoder_len, k.shape[3])
            cross_kv.append((k.new_zeros(shape), k.new_zeros(shape)))
        bias = cache.cross_bias
        static: list[KVCache] | T5DecoderCache = T5DecoderCache(
            self_attn=[_like(c, rows, length) for c in cache.self_attn],
            cross_kv=cross_kv,
            cross_bias=bias.new_zeros(rows, 1, 1, encoder_len),
        )
        mask = None
        device = bias.device
    else:
        static = [_like(c, rows, length) for c in runner.cache]
        mask = torch.ones(rows, length, dtype=runner.mask.dtype, device=runner.mask.device)
        device = runner.mask.device
    log.debug("static decode buffers for %s", key)
    return _Shape(
        cache=static,
        mask=mask,
        tokens=torch.zeros(rows, dtype=torch.long, device=device),
        pos=torch.zeros((), dtype=torch.long, device=device),
    )


def _like(c: KVCache, rows: int, length: int) -> KVCache:
    """An empty cache of ``rows`` x ``length`` positions, on ``c``'s device and in its dtype."""
    k = c.k
    return KVCache(rows, k.shape[1], length, k.shape[3], k.dtype, k.device)


def _adopt(runner: OPTRunner | T5Runner, shape: _Shape) -> None:
    """Copy the runner's prefilled cache into the shape's buffers and point the runner at them."""
    if isinstance(runner, T5Runner):
        old, new = runner.cache, shape.cache
        _copy_caches(old.self_attn, new.self_attn)
        for (k, v), (k_new, v_new) in zip(old.cross_kv, new.cross_kv, strict=True):
            n = k.shape[2]
            k_new[:, :, :n].copy_(k)
            v_new[:, :, :n].copy_(v)
            k_new[:, :, n:].zero_()
            v_new[:, :, n:].zero_()
        n = old.cross_bias.shape[-1]
        new.cross_bias.fill_(torch.finfo(new.cross_bias.dtype).min)  # padded encoder positions: hidden
        new.cross_bias[..., :n].copy_(old.cross_bias)
        runner.cache = new
        return
    _copy_caches(runner.cache, shape.cache)
    n = runner.mask.shape[1]
    shape.mask.fill_(1)
    shape.mask[:, :n].copy_(runner.mask)
    runner.cache, runner.mask = shape.cache, shape.mask


def _copy_caches(old: list[KVCache], new: list[KVCache]) -> None:
    for c, c_new in zip(old, new, strict=True):
        n = c.max_len
        c_new.k[:, :, :n].copy_(c.k)
        c_new.v[:, :, :n].copy_(c.v)
