"""int4 weights, group-wise: ``w = q * scale + min`` with ``q`` in [0, 15] and a float16 ``scale`` and
``min`` per output feature and group of ``group_size`` inputs (128 by default; a multiple of 128).

Packing (what a quantized checkpoint stores; ``kernels.block_int4``): ``qweight`` (ceil(out / 16),
padded / 8, 64) uint8, the inputs padded with zeros to whole groups, each 64-byte vector holding 8
inputs of 16 outputs as nibbles; ``scales`` and ``mins`` (ceil(out / 16), padded / group_size, 16)
float16; ``bias`` (out,) float32 or absent.

A decode step reads each weight once: 4.25 bits per weight at group 128 against int8's 8, so the
language model's decode, bound by reading weights, takes about half the time (bench/README.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from . import kernels

log = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 128


def check_group_size(group_size: int) -> int:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % kernels.INT4_CHUNK:
        raise ValueError(
            f"int4 group size must be a positive multiple of {kernels.INT4_CHUNK}, not {group_size!r}"
        )
    return group_size


# Ranges tried for each group: [min, max] shrunk by this fraction of its width at both ends
SHRINK = (0.0, 0.04, 0.08, 0.12)


def _rounded(
    w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q for (rows, groups, size) ``w`` against float16 ``scale`` / ``minimum``, and its squared error."""
    step, low = scale.float()[..., None], minimum.float()[..., None]
    q = (w - low).div_(step.clamp_min(torch.finfo(torch.float32).tiny)).round_().clamp_(0, 15)
    return q, torch.addcmul(low - w, q, step).square_().sum(-1)


def _fit(w: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, scale, minimum for each group of (rows, groups, size) ``w`` (``real``: not padding).

    The group's [min, max] split in 15 steps, then narrower ranges (``SHRINK``: clipping the extremes
    buys finer steps for the rest), then a least-squares refit of scale and minimum to the best one's
    q; whichever gives the smallest squared error. ~15 % less error than plain min-max on Gaussian weights.
    """
    inf = torch.tensor(float("inf"))
    low = torch.where(real, w, inf).amin(-1)
    high = torch.where(real, w, -inf).amax(-1)
    w = torch.where(real, w, low[..., None])  # padding costs nothing: it sits on the minimum
    scale = minimum = err = None
    for shrink in SHRINK:  # only the small per-group tensors are kept across candidates
        cut = (high - low) * shrink
        s, m = ((high - low - 2 * cut) / 15).half(), (low + cut).half()
        _, e = _rounded(w, s, m)
        if err is None:
            scale, minimum, err = s, m, e
            continue
        better = e < err
        scale, minimum, err = (
            torch.where(better, s, scale),
            torch.where(better, m, minimum),
            torch.minimum(e, err),
        )
    q, _ = _rounded(w, scale, minimum)
    q_mean, w_mean = q.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
    centred = q - q_mean
    spread = centred.square().sum(-1)
    slope = (centred * (w - w_mean)).sum(-1) / spread.clamp_min(1e-12)
    fit_scale = torch.where(spread > 0, slope, scale.float()).half()
    fit_minimum = (w_mean.squeeze(-1) - fit_scale.float() * q_mean.squeeze(-1)).half()
    q_fit, fit_err = _rounded(w, fit_scale, fit_minimum)
    better = (fit_err < err) & (fit_scale > 0)
    return (torch.where(better[..., None], q_fit, q), torch.where(better, fit_scale, scale),
            torch.where(better, fit_minimum, minimum))  # fmt: skip


def _native_fit(
    w: torch.Tensor, padded: int, group_size: int, fit
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_fit` of (rows, in_features) float32 ``w`` on the native kernel: q (rows, padded), scale and
    minimum (rows, groups)."""
    w = w.contiguous()
    rows, in_features = w.shape
    q = torch.empty(rows, padded, dtype=torch.uint8)
    scale = torch.empty(rows, padded // group_size, dtype=torch.float16)
    minimum = torch.empty_like(scale)
    status = fit(w.data_ptr(), rows, in_features, padded, group_size, q.data_ptr(), scale.data_ptr(),
                 minimum.data_ptr(), torch.get_num_threads())  # fmt: skip
    if status:
        raise (
            MemoryError("int4 fit: out of memory")
            if status == -2
            else ValueError(f"int4 fit: status {status}")
        )
    return q, scale, minimum


@functools.cache
def native_fit_kernel():
    """The native library's ``blip2_int4_fit`` (csrc/lowbit_linear.c: :func:`_fit`'s steps in C) where it
    is built and agrees with :func:`_fit` on a test matrix, else None (logged).

    The two round alike but sum a group in different orders, so a least-squares refit can land one
    float16 step apart, or two candidates within a rounding of each other swap: the test allows a few
    groups (3 %) to differ, with the same total squared error to 0.1 %."""
    library = native.lowbit_library()
    if library is None:
        return None
    fit = library.blip2_int4_fit
    generator = torch.Generator().manual_seed(0)
    for in_features, group in [(300, 128), (512, 256)]:
        w = torch.randn(64, in_features, generator=generator) * torch.rand(64, 1, generator=generator)
        w[3] = 0.5  # a constant row: scale 0
        padded = kernels.padded_width(in_features, group)
        grouped = F.pad(w, (0, padded - in_features)).view(64, -1, group)
        want = _fit(grouped, (torch.arange(padded) < in_features).view(-1, group))
        got = _native_fit(w, padded, group, fit)
        same = (got[1] == want[1]) & (got[2] == want[2])
        error, wanted_error = (_rounded(grouped, s, m)[1].sum() for s, m in (got[1:], want[1:]))
        if (
            same.float().mean() < 0.97
            or not torch.equal(got[0].view(64, -1, group)[same], want[0][same].to(torch.uint8))
            or error > wanted_error * 1.001
        ):
            log.warning("the native int4 fit disagrees with PyTorch's; quantizing with PyTorch's (slower)")
            return None
    return fit


@torch.no_grad()
def pack_int4(
    weight: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    chunk: int = 512,
    done: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> packed ``qweight``, ``scales``, ``mins`` (see the module docstring).

    Rows are done ``chunk`` at a time (no float32 copy of the whole weight); ``done`` is handed each
    chunk of ``weight`` once it is packed.
    """
    out_features, in_features = weight.shape
    padded = kernels.padded_width(in_features, check_group_size(group_size))
    groups = padded // group_size
    real = (torch.arange(padded) < in_features).view(groups, group_size)
    scales = torch.empty(out_features, groups, dtype=torch.float16)
    mins = torch.empty(out_features, groups, dtype=torch.float16)
    # (the native fit keeps a group's q on the stack: groups up to 8192)
    native_fit = native_fit_kernel() if weight.device.type == "cpu" and group_size <= 8192 else None
    if native_fit is not None:  # each chunk's q goes straight into the blocked layout
        qweight = torch.zeros(kernels.blocks_of(out_features), padded // 8, 64, dtype=torch.uint8)
        block = native.lowbit_library().blip2_int4_block
    else:
        q = torch.empty(out_features, padded, dtype=torch.uint8)
    for i in range(0, out_features, chunk):
        w = weight.detach()[i : i + chunk].float()
        rows = w.shape[0]
        kernels.require_finite(w)
        if native_fit is not None:
            q_rows, scale, minimum = _native_fit(w, padded, group_size, native_fit)
        else:
            w = F.pad(w, (0, padded - in_features))
            q_rows, scale, minimum = _fit(w.view(rows, groups, group_size), real)
        if not (torch.isfinite(scale).all() and torch.isfinite(minimum).all()):
            raise ValueError("weights too large for int4's float16 scales")
        if native_fit is not None:
            block(q_rows.data_ptr(), rows, padded, i, qweight.data_ptr(), torch.get_num_threads())
        else:
            q[i : i + rows] = q_rows.view(rows, padded)
        scales[i : i + rows], mins[i : i + rows] = scale, minimum
        if done is not None:
            done(weight[i : i + rows])
    if native_fit is None:
        qweight = kernels.block_int4(q, padded)
    return qweight, kernels.block_groups(scales), kernels.block_groups(mins)


class Int4Linear(kernels.LowbitLinear):
    """A drop-in ``nn.Linear`` for inference with group-wise int4 weights and float input/output.

    ``kernel``: "native" or "dequant" (the PyTorch arithmetic) to force one (tests); by default the
    native kernel where it runs.
    """

    PACKED = ("qweight", "scales", "mins", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = DEFAULT_GROUP_SIZE,
        kernel: str | None = None,
    ):
        super().__init__()
        if kernel not in (None, "native", "dequant"):
            raise ValueError(f"kernel must be 'native' or 'dequant', not {kernel!r}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.group_size = check_group_size(group_size)
        padded = kernels.padded_width(in_features, group_size)
        blocks, groups = kernels.blocks_of(out_features), padded // group_size
        self.register_buffer("qweight", torch.empty(blocks, padded // 8, 64, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(blocks, groups, kernels.LANES, dtype=torch.float16))
        self.register_buffer("mins", torch.empty(blocks, groups, kernels.LANES, dtype=torch.float16))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = DEFAULT_GROUP_SIZE,
        kernel: str | None = None,
        done: Callable[[torch.Tensor], None] | None = None,
    ) -> Int4Linear:
        """``done``: see :func:`pack_int4`."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, kernel)
        layer.qweight, layer.scales, layer.mins = pack_int4(linear.weight, group_size, done=done)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    @classmethod
    def from_codes(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        group_size: int = DEFAULT_GROUP_SIZE,
        kernel: str | None = None,
    ) -> Int4Linear:
        """A layer of codes fitted elsewhere (``gptq``): ``q`` (out, padded) in [0, 15], ``scales`` and
        ``mins`` (out, groups) float16."""
        out_features, padded = q.shape
        layer = cls(in_features, out_features, bias is not None, group_size, kernel)
        if (
            padded != kernels.padded_width(in_features, group_size)
            or scales.shape != (out_features, padded // group_size)
            or mins.shape != scales.shape
        ):
            raise ValueError(f"codes of shape {tuple(q.shape)} / {tuple(scales.shape)} do not fit {layer}")
        layer.qweight = kernels.block_int4(q, padded)
        layer.scales, layer.mins = kernels.block_groups(scales.half()), kernels.block_groups(mins.half())
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def dequantized(self) -> torch.Tensor:
        """The (out, in) float32 weight the packing stands for."""
        return kernels.int4_weight(self.qweight, self.scales, self.mins, self.out_features)[
            :, : self.in_features
        ]

    def _describe(self, kind: int) -> kernels.NativeLayer:
        return kernels.int4_layer(
            self.qweight,
            self.scales,
            self.mins,
            self.bias,
            self.in_features,
            self.out_features,
            self.group_size,
            kind,
        )

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int4_reference(x, self.qweight, self.scales, self.mins, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, group_size={self.group_size}"
        )
