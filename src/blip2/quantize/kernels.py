"""The low-bit matmuls: the native kernel (``csrc/lowbit_linear.c``) where it runs, else the same
arithmetic in PyTorch (slowly: it dequantizes the weight on every call).

Both quantize each row of the input per block of inputs (``INT8_BLOCK`` for int8 weights, the group
for int4) to int8 with a scale of ``max|x| / 127`` (rounding half to even), and return the product of
those dequantized activations with the dequantized weights, up to float32 rounding. A row's result
does not depend on the other rows (tested: batched = alone).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from .. import native

log = logging.getLogger(__name__)

INT8_BLOCK = 128  # int8 weights are padded to it; their activation blocks are multiples of it
INT4_CHUNK = 128  # inputs per 64 packed bytes; an int4 group is a multiple of it
KINDS = {"avx2": 1, "avx512": 2}  # the kernel's instruction sets (bits of blip2_lowbit_cpu_kinds)


def padded_width(in_features: int, block: int) -> int:
    """``in_features`` rounded up to whole blocks: packed weights are padded with zeros to it."""
    return -(-in_features // block) * block


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


def int8_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scale[:, None]


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(N, padded / 2) packed bytes -> (N, padded) values in [0, 15] (uint8)."""
    n = qweight.shape[0]
    chunks = qweight.view(n, -1, INT4_CHUNK // 2)
    return torch.stack([chunks & 0x0F, chunks >> 4], dim=2).view(n, -1)


def int4_weight(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The dequantized (N, padded) float32 weight."""
    n, groups = scales.shape
    q = unpack_int4(qweight).view(n, groups, -1).float()
    return (q * scales.float()[..., None] + mins.float()[..., None]).view(n, -1)


def int8_reference(x, qweight, scale, bias, block: int | None = INT8_BLOCK) -> torch.Tensor:
    padded = qweight.shape[1]
    return F.linear(_dequantized_activations(x, block or padded, padded), int8_weight(qweight, scale), bias)


def int4_reference(x, qweight, scales, mins, bias, group: int) -> torch.Tensor:
    padded = qweight.shape[1] * 2
    return F.linear(_dequantized_activations(x, group, padded), int4_weight(qweight, scales, mins), bias)


# ---- the native kernel ------------------------------------------------------------------------------


def _check(x: torch.Tensor, tensors: dict[str, tuple[torch.Tensor | None, torch.dtype, tuple]]) -> None:
    """The kernel is handed raw pointers: every tensor must be a contiguous CPU tensor of its shape."""
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or not x.is_cpu:
        raise ValueError("low-bit kernels take a contiguous 2-D float32 CPU input")
    for name, (t, dtype, shape) in tensors.items():
        if t is None:
            continue
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(
                f"low-bit kernel: {name} must be a contiguous {dtype} CPU tensor of shape {shape}, "
                f"not {t.dtype} {tuple(t.shape)}"
            )


def int8_linear(x, qweight, scale, bias, in_features: int, block: int | None, kind: int) -> torch.Tensor:
    """(R, in_features) float32 @ int8 (N, padded) weights -> (R, N) float32, on the native kernel;
    ``block`` inputs per activation scale (None: one per row)."""
    out_features, padded = qweight.shape
    _check(x, {"qweight": (qweight, torch.int8, (out_features, padded)),
               "scale": (scale, torch.float32, (out_features,)),
               "bias": (bias, torch.float32, (out_features,))})  # fmt: skip
    if x.shape[1] != in_features:
        raise ValueError(f"input has {x.shape[1]} features, the layer takes {in_features}")
    y = torch.empty(x.shape[0], out_features)
    status = native.lowbit_library().blip2_int8_linear(
        kind, x.data_ptr(), x.shape[0], in_features, padded, block or padded, qweight.data_ptr(), scale.data_ptr(),
        None if bias is None else bias.data_ptr(), out_features, y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _raise_on(status)
    return y


def int4_linear(x, qweight, scales, mins, bias, in_features: int, group: int, kind: int) -> torch.Tensor:
    """(R, in_features) float32 @ int4 (N, padded / 2) packed weights -> (R, N) float32, native kernel."""
    out_features, half = qweight.shape
    groups = half * 2 // group
    _check(x, {"qweight": (qweight, torch.uint8, (out_features, half)),
               "scales": (scales, torch.float16, (out_features, groups)),
               "mins": (mins, torch.float16, (out_features, groups)),
               "bias": (bias, torch.float32, (out_features,))})  # fmt: skip
    if x.shape[1] != in_features:
        raise ValueError(f"input has {x.shape[1]} features, the layer takes {in_features}")
    y = torch.empty(x.shape[0], out_features)
    status = native.lowbit_library().blip2_int4_linear(
        kind, x.data_ptr(), x.shape[0], in_features, half * 2, group, qweight.data_ptr(), scales.data_ptr(),
        mins.data_ptr(), None if bias is None else bias.data_ptr(), out_features, y.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    _raise_on(status)
    return y


def _raise_on(status: int) -> None:
    if status == -2:
        raise MemoryError("low-bit kernel: out of memory for the quantized activations")
    if status != 0:
        raise ValueError("low-bit kernel: sizes the packing does not allow")


def _self_check(kind: int) -> bool:
    """The built kernel against the PyTorch arithmetic, and a row alone against it in a batch."""
    from .int4 import pack_int4
    from .int8 import quantize_weight

    generator = torch.Generator().manual_seed(0)
    for rows, in_features, out_features in [(1, 40, 3), (6, 200, 5), (9, 300, 4)]:
        x = torch.randn(rows, in_features, generator=generator)
        weight = torch.randn(out_features, in_features, generator=generator)
        bias = torch.randn(out_features, generator=generator)
        q8, scale = quantize_weight(weight, padded_width(in_features, INT8_BLOCK))
        q4, scales, mins = pack_int4(weight, INT4_CHUNK)
        cases = [
            (functools.partial(int8_linear, qweight=q8, scale=scale, bias=bias, in_features=in_features,
                               block=INT8_BLOCK, kind=kind),
             int8_reference(x, q8, scale, bias)),
            (functools.partial(int8_linear, qweight=q8, scale=scale, bias=bias, in_features=in_features,
                               block=None, kind=kind),
             int8_reference(x, q8, scale, bias, None)),
            (functools.partial(int4_linear, qweight=q4, scales=scales, mins=mins, bias=bias,
                               in_features=in_features, group=INT4_CHUNK, kind=kind),
             int4_reference(x, q4, scales, mins, bias, INT4_CHUNK)),
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
