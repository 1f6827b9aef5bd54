"""GPTQ: int4 weights fitted to what a layer's inputs look like, not only to the weights themselves.

Rounding each weight to its nearest 4-bit level (``int4.pack_int4``) minimises the weights' error. GPTQ
(Frantar et al., 2022, arXiv:2210.17323) minimises the error of the layer's *outputs* on calibration
inputs X: columns are quantized one at a time, and each one's rounding error is spread over the columns
not yet quantized, weighted by the inverse of H = XᵀX, so that later columns make up for it where the
inputs are correlated. Columns go in order of decreasing input energy (``act_order``); each group's
scale and minimum are fitted to the original weights first ("static groups"), so the result is the
ordinary int4 packing (same kernels, same checkpoint format) and only the 4-bit codes differ.

``hessian_passes`` collects H for many layers with forward hooks, a memory budget at a time: layers
fed the same tensor (an attention's q, k and v) share one H, a forward stops once every layer of the
pass has been seen, and each pass's layers are quantized before the next pass runs, so later layers
see the error of the earlier ones (as GPTQ's layer-by-layer order does).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .int4 import pack_int4

log = logging.getLogger(__name__)

DAMP = 0.01  # fraction of H's mean diagonal added to it: keeps H⁻¹ well conditioned
BLOCK = 32  # columns per lazy batch of updates (32: ~25 % faster than 128 here)


@dataclass
class Int4Codes:
    """A layer's int4 quantization, unblocked: ``q`` (out, padded) in [0, 15], ``scales`` and ``mins``
    (out, groups) float16; the weight is ``q * scale + minimum`` per group."""

    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    def dequantized(self, in_features: int) -> torch.Tensor:
        return kernels.int4_dequantized(self.q, self.scales, self.mins)[:, :in_features]


def static_groups(weight: torch.Tensor, group_size: int) -> Int4Codes:
    """Round-to-nearest int4 codes of (out, in) ``weight``: ``pack_int4``'s own (its range search and
    least-squares refit), unblocked."""
    out = weight.shape[0]
    qweight, scales, mins = pack_int4(weight, group_size)
    return Int4Codes(
        kernels.unblock_int4(qweight)[:out].contiguous(),
        kernels.unblock_groups(scales)[:out].contiguous(),
        kernels.unblock_groups(mins)[:out].contiguous(),
    )


class Hessian:
    """H = XᵀX (in, in) of a layer's inputs, with what GPTQ derives from it (the column order and the
    upper Cholesky factor of the damped H⁻¹) computed once: an attention's q, k and v share one."""

    def __init__(self, xtx: torch.Tensor):
        if xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1]:
            raise ValueError(f"hessian must be a square matrix, not {tuple(xtx.shape)}")
        if not torch.isfinite(xtx).all():
            raise ValueError("the calibration inputs hold NaN or infinity")
        self.xtx = xtx.detach().float()
        self._prepared: dict[tuple[float, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def size(self) -> int:
        return self.xtx.shape[0]

    def prepared(self, damp: float, act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(column order, upper Cholesky factor of the damped H⁻¹ in that order)."""
        key = (damp, act_order)
        if key not in self._prepared:
            h = self.xtx.clone()
            dead = h.diagonal() == 0  # inputs always zero: any weight does
            h[dead, dead] = 1.0
            order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(self.size)
            self._prepared[key] = order, _inverse_cholesky(h[order][:, order], damp)
        return self._prepared[key]


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of H⁻¹ (H damped; H⁻¹ = UᵀU), damping more if H is not positive
    definite.

    With J the order-reversing permutation and L the lower Cholesky factor of JHJ, U = J L⁻¹ J: one
    factorization and one triangular inverse, instead of a factorization, H⁻¹ and a second one
    (1.4x faster at 10240 inputs)."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    mean = hessian.diagonal().mean().clamp_min(1e-12)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex((hessian + damp * mean * eye).flip(0, 1))
        if info == 0:
            upper = _lower_inverse(lower).flip(0, 1)
            if torch.isfinite(upper).all():
                return upper
        damp *= 10
    raise ValueError("the calibration inputs' covariance is not positive definite, even damped")


def _lower_inverse(lower: torch.Tensor, base: int = 256) -> torch.Tensor:
    """L⁻¹ of a lower-triangular L, by halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [-C⁻¹BA⁻¹, C⁻¹]] (the work
    in matrix products)."""
    n = lower.shape[0]
    if n <= base:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    h = n // 2
    a, c = _lower_inverse(lower[:h, :h], base), _lower_inverse(lower[h:, h:], base)
    out = torch.zeros_like(lower)
    out[:h, :h], out[h:, h:] = a, c
    out[h:, :h] = -(c @ (lower[h:, :h] @ a))
    return out


@torch.no_grad()
def gptq_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor | Hessian,
    group_size: int,
    damp: float = DAMP,
    act_order: bool = True,
) -> Int4Codes:
    """int4 codes of (out, in) ``weight`` minimising ‖X Wᵀ - X Ŵᵀ‖² for inputs X with ``hessian`` = XᵀX
    (in, in). Scales and minimums are :func:`static_groups`'s; only the codes change."""
    out, in_features = weight.shape
    if not isinstance(hessian, Hessian):
        hessian = Hessian(hessian)
    if hessian.size != in_features:
        raise ValueError(f"hessian is {hessian.size} x {hessian.size}, the weight has {in_features} inputs")
    codes = static_groups(weight, group_size)
    order, h_inv = hessian.prepared(damp, act_order)
    w = weight.detach().float()[:, order].clone()
    group_of = order // group_size
    step = codes.scales.float()[:, group_of]  # (out, in): each column's scale and minimum, in order
    low = codes.mins.float()[:, group_of]
    tiny = torch.finfo(torch.float32).tiny
    q = torch.empty(out, in_features, dtype=torch.uint8)
    for start in range(0, in_features, BLOCK):
        end = min(start + BLOCK, in_features)
        block = w[:, start:end]  # a view: updated in place
        errors = torch.empty_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            col, s, m = block[:, i], step[:, start + i], low[:, start + i]
            code = (col - m).div_(s.clamp_min(tiny)).round_().clamp_(0, 15)
            q[:, start + i] = code
            err = errors[:, i]
            torch.addcmul(col - m, code, s, value=-1, out=err).div_(h_block[i, i])
            block[:, i:].addr_(err, h_block[i, i:], alpha=-1)
        w[:, end:].addmm_(errors, h_inv[start:end, end:], alpha=-1)
    codes.q[:, order] = q
    return codes


# ---- collecting H over a model ------------------------------------------------------------------------


class _PassDone(Exception):
    """Raised from a hook once every layer of a pass has seen this batch: the rest of the forward is
    not needed."""


@contextlib.contextmanager
def _watching(
    model: nn.Module, names: Iterable[str], see: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """``see(name, input)`` before each named layer runs, while inside (``see`` returns None: a value
    returned from a pre-hook would replace the input)."""
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda _, args, name=name: see(name, args[0]))
        for name in names
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def probe(
    model: nn.Module, names: Iterable[str], run: Callable[[], None]
) -> tuple[list[str], dict[str, str]]:
    """One forward (``run``) watched: ``names`` in the order it calls them (those it never calls last),
    and layer -> the first of them fed the very same input tensor (an attention's q, k and v)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        seen.setdefault(name, x)

    wanted = set(names)
    with _watching(model, wanted, record):
        run()
    order = list(seen) + sorted(wanted - set(seen))
    owner: dict[str, str] = {}
    for name in order:
        x = seen.get(name)
        owner[name] = next((o for o in owner.values() if x is not None and seen.get(o) is x), name)
    return order, owner


def hessian_passes(
    model: nn.Module,
    names: Iterable[str],
    batches: list[Callable[[], None]],
    budget_bytes: int,
    quantize: Callable[[str, Hessian], None],
    progress: Callable[[int], None] | None = None,
) -> None:
    """For every layer in ``names``, in the order the forward runs them: H = Σ XᵀX over ``batches``
    (each a forward of ``model``), then ``quantize(name, H)``. Layers are taken a pass at a time, their
    H's together at most ``budget_bytes`` (float32; one layer at least); a pass's layers are quantized
    before the next pass's forwards run."""
    order, owner = probe(model, names, batches[0])
    passes: list[list[str]] = [[]]
    used = 0
    for name in order:
        size = model.get_submodule(name).in_features ** 2 * 4 if owner[name] == name else 0
        if passes[-1] and used + size > budget_bytes:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    for layers in passes:
        hessians = _collect(model, {owner[name] for name in layers}, batches)
        prepared = {name: Hessian(hessians.pop(name)) for name in list(hessians)}
        last_user = {owner[name]: name for name in layers}
        for name in layers:
            hessian = prepared.get(owner[name])
            if hessian is None:
                raise ValueError(f"{name}: the calibration inputs never reach this layer")
            quantize(name, hessian)
            if last_user[owner[name]] == name:
                del prepared[owner[name]]
            if progress is not None:
                progress(1)
        del prepared


def _collect(model: nn.Module, names: set[str], batches: list[Callable[[], None]]) -> dict[str, torch.Tensor]:
    """Σ XᵀX of each named layer's inputs over ``batches``, each forward stopped once all were seen."""
    hessians: dict[str, torch.Tensor] = {}
    seen: set[str] = set()

    def collect(name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if name in hessians:
            hessians[name].addmm_(x.T, x)
        else:
            hessians[name] = x.T @ x
        seen.add(name)
        if seen == names:
            raise _PassDone

    with _watching(model, names, collect):
        for run in batches:
            seen.clear()
            with contextlib.suppress(_PassDone):
                run()
    return hessians
