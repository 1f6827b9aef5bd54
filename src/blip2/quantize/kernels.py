"""The low-bit layouts and matmuls: the native kernel (``csrc/lowbit_linear.c``) where it runs, else the
same arithmetic in PyTorch (slowly: it unpacks and dequantizes the weight on every call).

Layouts (what a quantized checkpoint stores; the C file's header says the same): outputs in blocks of
16 (padded with zero rows), inputs padded with zeros to whole blocks of 128 (int8) or groups (int4);
each 64-byte vector holds 4 (int8) or 8 (int4) inputs of the block's 16 outputs, 4 bytes per output.

Both matmuls quantize each row of the input per block of inputs (128 for int8 weights, the group for
int4) to int8 with a scale of ``max|x| / 127`` (rounding half to even), and return the product of those
dequantized activations with the dequantized weights, up to float32 rounding. A row's result does not
depend on the other rows (tested: batched = alone).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import native

log = logging.getLogger(__name__)

LANES = 16  # outputs per block
INT8_BLOCK = 128  # int8: inputs per activation scale; inputs are padded to it
INT4_CHUNK = 128  # int4: a group is a multiple of it
KINDS = {"avx2": 1, "avx512": 2}  # the kernel's instruction sets (bits of blip2_lowbit_cpu_kinds)


def require_finite(weight: torch.Tensor) -> None:
    """Refuses a weight (or a chunk of one) holding NaN or infinity: quantized, it would be garbage. A
    meta tensor (a placement being planned) passes."""
    if weight.device.type != "meta" and not torch.isfinite(weight).all():
        raise ValueError("the weight holds NaN or infinite values: it cannot be quantized")


def padded_width(in_features: int, block: int) -> int:
    """``in_features`` rounded up to whole blocks: packed weights are padded with zeros to it."""
    return -(-in_features // block) * block


def blocks_of(out_features: int) -> int:
    return -(-out_features // LANES)


# ---- layouts ------------------------------------------------------------------------------------------


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def block_int8(q: torch.Tensor, padded: int) -> torch.Tensor:
    """(N, K) int8 -> (blocks, padded / 4, 64): vector v of block B holds q[16B + i, 4v + b] at 4i + b."""
    blocks = blocks_of(q.shape[0])
    q = _pad(q, blocks * LANES, padded).view(blocks, LANES, padded // 4, 4)
    return q.permute(0, 2, 1, 3).reshape(blocks, padded // 4, 64).contiguous()


def unblock_int8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``block_int8``: (blocks * 16, padded) int8."""
    blocks, vectors, _ = packed.shape
    return packed.view(blocks, vectors, LANES, 4).permute(0, 2, 1, 3).reshape(blocks * LANES, vectors * 4)


def block_int4(q: torch.Tensor, padded: int) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (blocks, padded / 8, 64) uint8: byte 4i + b of vector v of block B holds
    q[16B + i, 8v + b] in its low nibble and q[16B + i, 8v + 4 + b] in its high one."""
    blocks = blocks_of(q.shape[0])
    q = _pad(q.to(torch.uint8), blocks * LANES, padded).view(blocks, LANES, padded // 8, 2, 4)
    q = q.permute(0, 2, 1, 4, 3)  # (blocks, vectors, 16, 4, 2): low / high nibble last
    return (q[..., 0] | (q[..., 1] << 4)).reshape(blocks, padded // 8, 64).contiguous()


def unblock_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``block_int4``: (blocks * 16, padded) uint8 values in [0, 15]."""
    blocks, vectors, _ = packed.shape
    nibbles = packed.view(blocks, vectors, LANES, 4)
    q = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1)  # (blocks, vectors, 16, 4, 2)
    return q.permute(0, 2, 1, 4, 3).reshape(blocks * LANES, vectors * 8)


def block_groups(t: torch.Tensor) -> torch.Tensor:
    """(N, groups) per-group values -> (blocks, groups, 16), zero for padding outputs."""
    blocks = blocks_of(t.shape[0])
    return _pad(t, blocks * LANES, t.shape[1]).view(blocks, LANES, -1).permute(0, 2, 1).contiguous()


def unblock_groups(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 1).reshape(-1, t.shape[1])


def int8_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dequantized (N, padded) float32 weight."""
    return unblock_int8(qweight)[: scale.shape[0]].float() * scale[:, None]


def int4_weight(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, out_features: int
) -> torch.Tensor:
    """The dequantized (N, padded) float32 weight."""
    scale, low = (unblock_groups(t)[:out_features] for t in (scales, mins))
    return int4_dequantized(unblock_int4(qweight)[:out_features], scale, low)


def int4_dequantized(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Unblocked codes (N, padded) and per-group scales / minimums (N, groups) -> (N, padded) float32."""
    rows, groups = scales.shape
    grouped = q.float().view(rows, groups, -1)
    return (grouped * scales.float()[..., None] + mins.float()[..., None]).view(rows, -1)


# ---- the same arithmetic in PyTorch -------------------------------------------------------------------


def quantize_activations(x: torch.Tensor, block: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, K) float32 -> (R, padded) integer-valued float32 in [-127, 127] and (R, padded / block) scales."""
    rows, width = x.shape
    blocks = F.pad(x.float(), (0, padded - width)).view(rows, padded // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    # a true division, as the C code's (``127.0 / tensor`` would be 127 * reciprocal: another rounding)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse).clamp_(-127, 127)
    return q.view(rows, padded), (amax / 127.0).squeeze(-1)


def _dequantized_activations(x: torch.Tensor, block: int, padded: int) -> torch.Tensor:
    q, scale = quantize_activations(x, block, padded)
    return (q.view(x.shape[0], -1, block) * scale[..., None]).view(x.shape[0], padded)


def int8_reference(x, qweight, scale, bias) -> torch.Tensor:
    padded = qweight.shape[1] * 4
    return F.linear(_dequantized_activations(x, INT8_BLOCK, padded), int8_weight(qweight, scale), bias)


def int4_reference(x, qweight, scales, mins, bias, out_features: int) -> torch.Tensor:
    padded, groups = qweight.shape[1] * 8, scales.shape[1]
    weight = int4_weight(qweight, scales, mins, out_features)
    return F.linear(_dequantized_activations(x, padded // groups, padded), weight, bias)


# ---- the native kernel ------------------------------------------------------------------------------


class NativeLayer(ctypes.Structure):
    """A layer as ``blip2_lowbit_linear`` reads it (``Blip2LowbitLayer`` in the C file): described once,
    so that a call passes five arguments (a decode step makes ~150 calls)."""

    _fields_ = [
        ("kind", ctypes.c_int),
        ("bits", ctypes.c_int),
        ("in_features", ctypes.c_long),
        ("padded", ctypes.c_long),
        ("group", ctypes.c_long),
        ("out_features", ctypes.c_long),
        ("w", ctypes.c_void_p),
        ("wscale", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("mins", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


def _check(tensors: dict[str, tuple[torch.Tensor | None, torch.dtype, tuple]]) -> None:
    """The kernel is handed raw pointers: every tensor must be a contiguous CPU tensor of its shape."""
    for name, (t, dtype, shape) in tensors.items():
        if t is None:
            continue
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(
                f"low-bit kernel: {name} must be a contiguous {dtype} CPU tensor of shape {shape}, "
                f"not {t.dtype} {tuple(t.shape)}"
            )


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def int8_layer(qweight, scale, bias, in_features: int, kind: int) -> NativeLayer:
    """The description of an int8 layer, its tensors checked (the caller keeps them alive)."""
    out_features = scale.shape[0]
    padded = padded_width(in_features, INT8_BLOCK)
    _check({"qweight": (qweight, torch.int8, (blocks_of(out_features), padded // 4, 64)),
            "scale": (scale, torch.float32, (out_features,)),
            "bias": (bias, torch.float32, (out_features,))})  # fmt: skip
    return NativeLayer(kind, 8, in_features, padded, INT8_BLOCK, out_features, qweight.data_ptr(),
                       scale.data_ptr(), None, None, _pointer(bias))  # fmt: skip


def int4_layer(qweight, scales, mins, bias, in_features: int, out_features: int, group: int, kind: int):
    """The description of an int4 layer, its tensors checked (the caller keeps them alive)."""
    padded = padded_width(in_features, group)
    blocks, groups = blocks_of(out_features), padded // group
    _check({"qweight": (qweight, torch.uint8, (blocks, padded // 8, 64)),
            "scales": (scales, torch.float16, (blocks, groups, LANES)),
            "mins": (mins, torch.float16, (blocks, groups, LANES)),
            "bias": (bias, torch.float32, (out_features,))})  # fmt: skip
    return NativeLayer(kind, 4, in_features, padded, group, out_features, qweight.data_ptr(), None,
                       scales.data_ptr(), mins.data_ptr(), _pointer(bias))  # fmt: skip


def run(layer: NativeLayer, x: torch.Tensor) -> torch.Tensor:
    """(R, in_features) float32 contiguous CPU input -> (R, out_features) on the native kernel."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != layer.in_features or not x.is_contiguous():
        raise ValueError(f"low-bit kernels take a contiguous (rows, {layer.in_features}) float32 input")
    return _launch(layer, x, x.shape[0], (x.shape[0], layer.out_features))


def _launch(layer: NativeLayer, x: torch.Tensor, rows: int, out_shape: tuple[int, ...]) -> torch.Tensor:
    """The kernel on ``rows`` rows of contiguous float32 ``x``, unchecked (callers check)."""
    return _launch_bound(_bind(layer), x, rows, out_shape)


def _bind(layer: NativeLayer) -> functools.partial:
    """The kernel's function with ``layer`` as its first argument: (x, rows, y, threads) -> status."""
    return functools.partial(native.lowbit_library().blip2_lowbit_linear, ctypes.byref(layer))


def _launch_bound(
    call: functools.partial, x: torch.Tensor, rows: int, out_shape: tuple[int, ...]
) -> torch.Tensor:
    y = torch.empty(*out_shape)  # (a tuple argument costs ~0.3 us more)
    status = call(x.data_ptr(), rows, y.data_ptr(), torch.get_num_threads())
    if status:
        _raise_on(status)
    return y


def int8_linear(x, qweight, scale, bias, in_features: int, kind: int) -> torch.Tensor:
    """(R, in_features) float32 @ blocked int8 weights -> (R, N) float32, on the native kernel."""
    return run(int8_layer(qweight, scale, bias, in_features, kind), x)


def int4_linear(x, qweight, scales, mins, bias, in_features: int, out_features: int, group: int, kind: int):
    """(R, in_features) float32 @ blocked int4 weights -> (R, N) float32, on the native kernel."""
    return run(int4_layer(qweight, scales, mins, bias, in_features, out_features, group, kind), x)


@functools.cache
def _kernel_address() -> int:
    return ctypes.cast(native.lowbit_library().blip2_lowbit_linear, ctypes.c_void_p).value


def _raise_on(status: int) -> None:
    if status == -2:
        raise MemoryError("low-bit kernel: out of memory for the quantized activations")
    if status != 0:
        raise ValueError("low-bit kernel: sizes the packing does not allow")


def _self_check(kind: int) -> bool:
    """The built kernel against the PyTorch arithmetic, and a row alone against it in a batch."""
    from .int4 import pack_int4
    from .int8 import pack_int8

    generator = torch.Generator().manual_seed(0)
    for rows, in_features, out_features in [(1, 40, 3), (6, 200, 21), (9, 300, 37)]:
        x = torch.randn(rows, in_features, generator=generator)
        weight = torch.randn(out_features, in_features, generator=generator)
        bias = torch.randn(out_features, generator=generator)
        q8, scale = pack_int8(weight)
        q4, scales, mins = pack_int4(weight, INT4_CHUNK)
        cases = [
            (functools.partial(int8_linear, qweight=q8, scale=scale, bias=bias, in_features=in_features, kind=kind),
             int8_reference(x, q8, scale, bias)),
            (functools.partial(int4_linear, qweight=q4, scales=scales, mins=mins, bias=bias,
                               in_features=in_features, out_features=out_features, group=INT4_CHUNK, kind=kind),
             int4_reference(x, q4, scales, mins, bias, out_features)),
        ]  # fmt: skip
        for run, expected in cases:
            got = run(x)
            if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
                return False
            if not torch.equal(run(x[-1:].clone()), got[-1:]):
                return False
    return True


@functools.cache
def native_kind() -> int | None:
    """The kind of native kernel this process uses (``KINDS``), or None: the PyTorch arithmetic.

    The widest the CPU has, or ``BLIP2_NATIVE=avx2`` / ``avx512`` where set; checked once.
    """
    library = native.lowbit_library()
    if library is None:
        return None
    available = library.blip2_lowbit_cpu_kinds()
    wanted = os.environ.get("BLIP2_NATIVE", "").strip().lower()
    order = [KINDS[wanted]] if wanted in KINDS else [KINDS["avx512"], KINDS["avx2"]]
    for kind in order:
        if not available & kind:
            continue
        if _self_check(kind):
            return kind
        log.warning("the native low-bit kernel (%s) gave wrong results; not used", kind)
    log.info("low-bit layers use PyTorch's kernels: no usable native kind (CPU has %d)", available)
    return None


def require_native() -> int:
    kind = native_kind()
    if kind is None:
        raise RuntimeError("no native low-bit kernel on this machine (see blip2.native)")
    return kind


class LowbitLinear(nn.Module):
    """What the int8 and int4 layers share: ``forward`` over the native kernel, with the layer's
    description made once (again whenever a tensor of it is replaced or moved), else the fallback."""

    in_features: int
    out_features: int
    kernel: str | None
    PACKED: tuple[str, ...] = ()  # the tensors the native description points at

    def _describe(self, kind: int) -> NativeLayer:
        raise NotImplementedError

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        """(R, in_features) float32 -> (R, out_features) without the native kernel."""
        raise NotImplementedError

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in self.PACKED:
            self._forget_native()

    def _forget_native(self) -> None:
        self.__dict__["_native"] = self.__dict__["_native_call"] = None

    def _apply(self, fn, recurse: bool = True):
        # packed tensors keep their dtypes (``model.half()`` must not turn int4 scales or the float32
        # bias the kernel reads into something else)
        dtypes = {name: t.dtype for name in self.PACKED if (t := getattr(self, name)) is not None}
        result = super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        self._forget_native()
        return result

    def _native_kernel(self) -> bool:
        return self.kernel == "native" or (self.kernel is None and native_kind() is not None)

    def native_linear(self) -> tuple[int, NativeLayer, tuple[torch.Tensor, ...]] | None:
        """``(address of blip2_lowbit_linear, this layer's description, the tensors it points at)`` for
        native code that runs the layer itself (``blip2.models.decoder_step``; it holds the tensors while
        it keeps the description), or None where the native kernel does not run. The description is
        replaced whenever a packed tensor is: callers compare it before use."""
        if self.__dict__.get("_native") is None and not self._native_kernel():
            return None
        layer = self._description()
        return (
            _kernel_address(),
            layer,
            tuple(t for name in self.PACKED if (t := getattr(self, name)) is not None),
        )

    def _description(self) -> NativeLayer:
        layer = self.__dict__.get("_native")
        if layer is None:
            layer = self.__dict__["_native"] = self._describe(require_native())
            self.__dict__["_native_call"] = _bind(layer)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self.__dict__.get("_native_call")
        if call is not None and x.dtype == torch.float32 and x.is_cpu and x.shape[-1] == self.in_features:
            # the common case, kept short: a decode step makes ~150 of these calls
            x = x.contiguous()
            return _launch_bound(call, x, x.numel() // self.in_features, (*x.shape[:-1], self.out_features))
        dtype, shape = x.dtype, x.shape
        x = x.reshape(-1, self.in_features)
        x = (x if x.dtype == torch.float32 else x.float()).contiguous()
        y = run(self._description(), x) if self._native_kernel() else self._fallback(x)
        return y.view(*shape[:-1], self.out_features).to(dtype)
