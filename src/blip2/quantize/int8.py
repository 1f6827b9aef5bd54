"""int8 weights: one symmetric float32 scale per output feature (``w = q * scale``, ``q`` in [-127, 127]).

Stored blocked (``kernels.block_int8``: ``qweight`` (ceil(out / 16), in padded to 128 / 4, 64) int8),
with ``scale`` (out,) float32 and ``bias`` (out,) float32 or absent: what a quantized checkpoint holds.

Kernels, in order of preference: the native kernel (``kernels.int8_linear``: reads the stored weight
as it lies, memory-mapped or not, and quantizes each input row per block of 128); fbgemm's dynamic
int8 linear (where there is no native kernel: it needs its own packed copy of the weight, made on
first use, and quantizes the whole input with one scale); the PyTorch arithmetic of the native kernel.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .. import native
from . import kernels

log = logging.getLogger(__name__)

INT8_KERNELS = ("native", "fbgemm", "dequant")


def quantize_weight(
    weight: torch.Tensor,
    padded: int | None = None,
    chunk: int = 2048,
    done: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (int8 (out, padded), float32 (out,)) per-output-channel symmetric scales.

    Columns past ``in`` (up to ``padded``, default ``in``) are zero. Rows are done ``chunk`` at a time so
    that no float32 temporary of the whole weight is made; ``done`` is handed each chunk once quantized.
    """
    out_features, in_features = weight.shape
    padded = padded or in_features
    q = torch.zeros(out_features, padded, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    for i in range(0, out_features, chunk):
        w = weight.detach()[i : i + chunk].float()
        kernels.require_finite(w)
        s = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_()).clamp_min_(1e-12) / 127.0
        q[i : i + chunk, :in_features] = (w / s[:, None]).round_().clamp_(-127, 127)
        scale[i : i + chunk] = s
        if done is not None:
            done(weight[i : i + chunk])
    return q, scale


def _native_pack(
    weight: torch.Tensor, quantize, chunk: int = 2048, done: Callable[[torch.Tensor], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_int8` on the native library (``blip2_int8_quantize``): the same bits, written straight
    into the blocked layout, a chunk of rows at a time."""
    out_features, in_features = weight.shape
    padded = kernels.padded_width(in_features, kernels.INT8_BLOCK)
    qweight = torch.zeros(kernels.blocks_of(out_features), padded // 4, 64, dtype=torch.int8)
    scale = torch.empty(out_features, dtype=torch.float32)
    for i in range(0, out_features, chunk):
        w = weight.detach()[i : i + chunk].float().contiguous()
        kernels.require_finite(w)
        quantize(w.data_ptr(), w.shape[0], in_features, padded, i, qweight.data_ptr(), scale.data_ptr(),
                 torch.get_num_threads())  # fmt: skip
        if done is not None:
            done(weight[i : i + chunk])
    return qweight, scale


@functools.cache
def native_pack_kernel():
    """The native library's ``blip2_int8_quantize`` where it is built and gives :func:`quantize_weight`'s
    bits on a test matrix, else None."""
    library = native.lowbit_library()
    if library is None:
        return None
    quantize = library.blip2_int8_quantize
    w = torch.randn(37, 300, generator=torch.Generator().manual_seed(0))
    w[5] = 0.0  # a zero row: the smallest scale
    q, scale = quantize_weight(w, 384)
    got = _native_pack(w, quantize, chunk=16)
    if torch.equal(got[0], kernels.block_int8(q, 384)) and torch.equal(got[1], scale):
        return quantize
    log.warning("the native int8 packing disagrees with PyTorch's; packing with PyTorch's (slower)")
    return None


@torch.no_grad()
def pack_int8(
    weight: torch.Tensor, done: Callable[[torch.Tensor], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> blocked ``qweight`` and ``scale`` (see the module docstring)."""
    if weight.device.type == "cpu" and (quantize := native_pack_kernel()) is not None:
        return _native_pack(weight, quantize, done=done)
    padded = kernels.padded_width(weight.shape[1], kernels.INT8_BLOCK)
    q, scale = quantize_weight(weight, padded, done=done)
    return kernels.block_int8(q, padded), scale


def fbgemm_available() -> bool:
    try:
        return hasattr(torch.ops.quantized, "linear_dynamic") and any(
            e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm")
        )
    except Exception:  # noqa: BLE001 - a build without quantized ops
        return False


class Int8Linear(kernels.LowbitLinear):
    """A drop-in ``nn.Linear`` for inference with int8 weights and float input/output.

    ``kernel`` forces one of ``INT8_KERNELS`` (tests); by default the first that runs here.
    """

    PACKED = ("qweight", "scale", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str | None = None):
        super().__init__()
        if kernel is not None and kernel not in INT8_KERNELS:
            raise ValueError(f"kernel must be one of {INT8_KERNELS}, not {kernel!r}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        padded = kernels.padded_width(in_features, kernels.INT8_BLOCK)
        blocks = kernels.blocks_of(out_features)
        self.register_buffer("qweight", torch.empty(blocks, padded // 4, 64, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32) if bias else None)
        self._fbgemm = None  # fbgemm's packed copy, made on first use

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, kernel: str | None = None, done: Callable[[torch.Tensor], None] | None = None
    ) -> Int8Linear:
        """``done``: see :func:`quantize_weight`."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        layer.qweight, layer.scale = pack_int8(linear.weight, done)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def int8_weight(self) -> torch.Tensor:
        """The (out, in) int8 weight."""
        return kernels.unblock_int8(self.qweight)[: self.out_features, : self.in_features]

    def dequantized(self) -> torch.Tensor:
        return kernels.int8_weight(self.qweight, self.scale)[:, : self.in_features]

    def _native_kernel(self) -> bool:
        if self.kernel is None:
            return kernels.native_kind() is not None
        return self.kernel == "native"

    def _describe(self, kind: int) -> kernels.NativeLayer:
        return kernels.int8_layer(self.qweight, self.scale, self.bias, self.in_features, kind)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm" or (self.kernel is None and fbgemm_available()):
            return torch.ops.quantized.linear_dynamic(x, self._fbgemm_packed(), True)
        return kernels.int8_reference(x, self.qweight, self.scale, self.bias)

    def _fbgemm_packed(self):
        if self._fbgemm is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized tensor constructors are marked deprecated
                qw = torch._make_per_channel_quantized_tensor(
                    self.int8_weight().contiguous(),
                    self.scale.double(),
                    torch.zeros_like(self.scale, dtype=torch.long),
                    0,
                )
                self._fbgemm = torch.ops.quantized.linear_prepack(qw, self.bias)
        return self._fbgemm

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )
