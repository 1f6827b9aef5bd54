"""Weight-only int8 / int4 linear layers on CUDA (``blip2.load(..., device="cuda", quantize=...)``).

The CPU's int8 / int4 layers live in ``blip2.quantize``; this module holds the GPU packings and
kernels, so that the model files only ever see a ``Linear``-like module. The same layers as on the
CPU are quantized, with the same bits (every linear layer of the vision encoder, the Q-Former and the
language model; under int4 the Q-Former's stay int8, see ``layer_bits``; the projection and the
retrieval heads stay in float), one at a time on the device, so that the float model never sits on the
GPU whole. Layers a placement puts on the CPU get ``blip2.quantize``'s.

Kernels (``kernel=``; the defaults are the ones ``bench/gpu_bench.py`` is to confirm on the GPU
machine, see bench/README.md):

| bits | kernel     | weights                                          | matmul                                   |
|------|------------|--------------------------------------------------|------------------------------------------|
| 8    | ``dequant``| int8 (out, in), one scale per output channel     | the weight cast to the activations' dtype, then the float matmul; under ``compile="inductor"`` the cast fuses into it |
| 8    | ``int8pack``| the same                                        | ``torch._weight_int8pack_mm`` (where the build has a CUDA kernel) |
| 8    | ``bnb``    | bitsandbytes LLM.int8 (``Linear8bitLt``, outlier threshold 6): the model cards' ``load_in_8bit`` | bitsandbytes |
| 4    | ``tinygemm``| 4 bits in groups along the input (128, else 64 or 32), a bfloat16 scale and zero per group | ``torch._weight_int4pack_mm`` (sm80+, bfloat16 activations) |
| 4    | ``dequant``| the same numbers, two per byte                   | unpacked per call, then the float matmul (any device) |
| 4    | ``bnb``    | bitsandbytes NF4 (``Linear4bit``): ``load_in_4bit`` | bitsandbytes |

A layer whose shape the int4 kernel cannot take (input width not a multiple of 32, output width not
a multiple of 8) is quantized to int8 instead. Int4 is asymmetric: ``w ≈ (q - 8) * scale + zero``
with ``q`` in 0..15, the convention of PyTorch's int4 kernels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DependencyError
from ..models.layers import Linear
from . import QUANTIZED_PARTS, quantize_weight
from .model import INT4_PARTS

log = logging.getLogger(__name__)

KERNELS = {8: ("dequant", "int8pack", "bnb"), 4: ("tinygemm", "dequant", "bnb")}
DEFAULT_KERNEL = {8: "dequant", 4: "tinygemm"}
INT4_GROUPS = (128, 64, 32)
BNB_NF4_BLOCK = 64


def bits_of(quantize: str) -> int:
    """``"int8"`` -> 8, ``"int4"`` -> 4."""
    try:
        return {"int8": 8, "int4": 4}[quantize]
    except KeyError:
        raise ValueError(f"quantize must be None, 'int8' or 'int4', not {quantize!r}") from None


def has_cuda_kernel(op: str) -> bool:
    """Whether this build of PyTorch registers a CUDA kernel for ``aten::<op>``."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CUDA")
    except RuntimeError:  # an operator this version does not have
        return False


def check_kernel(bits: int, kernel: str) -> None:
    """A clear error when ``kernel`` cannot run here (unknown, a missing PyTorch kernel or package)."""
    if kernel in ("native", "dequant"):  # the CPU's layers (blip2.quantize), and plain PyTorch
        return
    if kernel not in KERNELS[bits]:
        raise ValueError(f"int{bits} kernel must be one of {KERNELS[bits]}, not {kernel!r}")
    if kernel == "bnb":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise DependencyError(
                "kernel 'bnb' needs bitsandbytes: pip install bitsandbytes (a CUDA build)"
            ) from None
    op = {"int8pack": "_weight_int8pack_mm", "tinygemm": "_weight_int4pack_mm"}.get(kernel)
    if op is not None and not has_cuda_kernel(op):
        raise DependencyError(
            f"int{bits} kernel {kernel!r} needs torch.{op} on CUDA, which this PyTorch "
            f"({torch.__version__}) lacks; use kernel='dequant'"
        )


def int4_group(in_features: int, out_features: int) -> int | None:
    """The int4 group size for a layer (the largest of ``INT4_GROUPS`` the kernel takes), or None."""
    if out_features % 8:
        return None
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


# ---- the layers -------------------------------------------------------------------------------------


class CudaInt8Linear(nn.Module):
    """Weight-only int8: ``x @ (q * scale).T + bias`` with ``q`` int8 (out, in), ``scale`` (out,)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: str):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernel = kernel
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device, kernel: str = "dequant") -> CudaInt8Linear:
        weight = linear.weight.detach().to(device)
        q, scale = quantize_weight(weight)
        dtype = weight.dtype  # the activations' dtype: scale and bias are kept in it
        bias = None if linear.bias is None else linear.bias.detach().to(device, dtype)
        return cls(q, scale.to(dtype), bias, kernel)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed and returned in the float layer's dtype (the scale's), as that layer would: T5's
        # float32 ``wo`` in a float16 model stays float32, where float16 would overflow
        dtype = self.scale.dtype
        if self.kernel == "int8pack":
            x2 = x.reshape(-1, self.in_features).to(dtype)
            out = torch._weight_int8pack_mm(x2, self.qweight, self.scale).view(*x.shape[:-1], -1)
        else:
            out = F.linear(x.to(dtype), self.qweight.to(dtype)) * self.scale
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (q uint8 (out, in) in 0..15, scales and zeros (in/group, out, 2) bfloat16).

    ``w ≈ (q - 8) * scale + zero`` per group of ``group`` inputs; the codes are rounded against the
    bfloat16 scale and zero the kernel will use.
    """
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo).clamp_min(1e-6) / 15).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = ((w - zero.float()[..., None]) / scale.float()[..., None] + 8).round_().clamp_(0, 15)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
    return q.to(torch.uint8).reshape(out_features, in_features), scales_and_zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in/2) uint8, even inputs in the high nibble (PyTorch's layout)."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1)


class CudaInt4Linear(nn.Module):
    """Weight-only int4 in groups (see :func:`quantize_int4`)."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        group: int,
        kernel: str,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, scales_and_zeros.shape[1]
        self.group, self.kernel = group, kernel
        self.compute_dtype = compute_dtype  # the float layer's dtype, as in CudaInt8Linear
        self.register_buffer("packed", packed)  # tinygemm: its int32 tile layout; dequant: (out, in/2) uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, device: torch.device, kernel: str = "tinygemm"
    ) -> CudaInt4Linear | CudaInt8Linear:
        out_features, in_features = linear.weight.shape
        group = int4_group(in_features, out_features)
        if group is None:
            log.debug("int4: a (%d -> %d) layer the kernel cannot take stays int8", in_features, out_features)
            return CudaInt8Linear.from_linear(linear, device)
        weight = linear.weight.detach().to(device)
        q, scales_and_zeros = quantize_int4(weight, group)
        packed = pack_nibbles(q)
        if kernel == "tinygemm":
            inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
            packed = torch._convert_weight_to_int4pack(packed.contiguous(), inner_k_tiles)
        bias = None if linear.bias is None else linear.bias.detach().to(device, weight.dtype)
        return cls(packed, scales_and_zeros, bias, in_features, group, kernel, weight.dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the layer multiplies by (the ``dequant`` kernel's packing)."""
        q = unpack_nibbles(self.packed).to(dtype) - 8
        sz = self.scales_and_zeros.to(dtype).transpose(0, 1)  # (out, G, 2)
        q = q.view(self.out_features, -1, self.group)
        return (q * sz[..., :1] + sz[..., 1:]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        if self.kernel == "tinygemm":  # bfloat16 in and out
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            out = torch._weight_int4pack_mm(x2, self.packed, self.group, self.scales_and_zeros)
            out = out.view(*x.shape[:-1], self.out_features).to(dtype)
        else:
            out = F.linear(x.to(dtype), self.dequantized(dtype))
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
            f"kernel={self.kernel}"
        )


class BnbLinear(nn.Module):
    """bitsandbytes' LLM.int8 (``bits=8``) or NF4 (``bits=4``) layer around a float ``nn.Linear``."""

    def __init__(self, linear: nn.Linear, bits: int, device: torch.device):
        super().__init__()
        import bitsandbytes as bnb

        out_features, in_features = linear.weight.shape
        self.in_features, self.out_features = in_features, out_features
        dtype = linear.weight.dtype
        has_bias = linear.bias is not None
        weight = linear.weight.detach().cpu()  # the bitsandbytes parameters quantize when moved from the CPU
        if bits == 8:
            inner = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0, device="meta"
            )
            inner.weight = bnb.nn.Int8Params(
                weight.to(torch.float16), requires_grad=False, has_fp16_weights=False
            )
        else:
            inner = bnb.nn.Linear4bit(
                in_features, out_features, bias=has_bias, compute_dtype=dtype, quant_type="nf4", device="meta"
            )
            inner.weight = bnb.nn.Params4bit(
                weight, requires_grad=False, quant_type="nf4", blocksize=BNB_NF4_BLOCK, module=inner
            )
        if has_bias:
            inner.bias = nn.Parameter(linear.bias.detach().cpu().to(dtype), requires_grad=False)
        self.inner = inner.to(device)
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.bits == 8:
            x = x.to(torch.float16)  # LLM.int8 runs in float16
        return self.inner(x).to(dtype)


# ---- the model --------------------------------------------------------------------------------------


def quantizable(
    model: nn.Module, parts: tuple[str, ...] = QUANTIZED_PARTS
) -> Iterator[tuple[str, nn.Linear]]:
    """``(path, layer)`` of each float linear layer that quantization replaces."""
    for part in parts:
        root = getattr(model, part, None)
        if root is None:
            continue
        for name, module in root.named_modules():
            if type(module) in (nn.Linear, Linear):
                yield (f"{part}.{name}" if name else part), module


def cuda_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds layers of this module (which ``blip2.quantize.checkpoint`` cannot write)."""
    return any(isinstance(m, CudaInt8Linear | CudaInt4Linear | BnbLinear) for m in model.modules())


def quantized_bytes(
    out_features: int, in_features: int, bias: bool, element_size: int, bits: int, kernel: str | None = None
) -> int:
    """The bytes a float linear layer of this shape takes once quantized, ``element_size`` being its
    float dtype's (scales and bias are kept in it)."""
    kernel = kernel or DEFAULT_KERNEL[bits]
    bias_bytes = out_features * element_size if bias else 0
    if bits == 4:
        if kernel == "bnb":
            return (
                out_features * in_features // 2 + out_features * in_features // BNB_NF4_BLOCK * 4 + bias_bytes
            )
        group = int4_group(in_features, out_features)
        if group is not None:
            return out_features * in_features // 2 + in_features // group * out_features * 4 + bias_bytes
    if kernel == "native":  # blip2.quantize's CPU layers: float32 scales and bias (padding not counted)
        bias_bytes = out_features * 4 if bias else 0
        if bits == 4:
            return out_features * in_features // 2 + -(-in_features // 128) * out_features * 4 + bias_bytes
        return out_features * in_features + out_features * 4 + bias_bytes
    scale = 4 if kernel == "bnb" else element_size
    return out_features * in_features + out_features * scale + bias_bytes


def quantize_layer(
    linear: nn.Linear, bits: int, device: torch.device, kernel: str | None = None
) -> nn.Module:
    """The quantized replacement of one float layer, on ``device`` (CUDA; ``dequant`` kernels run anywhere)."""
    kernel = kernel or DEFAULT_KERNEL[bits]
    if kernel == "bnb":
        return BnbLinear(linear, bits, device)
    if bits == 8:
        return CudaInt8Linear.from_linear(linear, device, kernel)
    return CudaInt4Linear.from_linear(linear, device, kernel)


def layer_kernel(bits: int, device: torch.device, kernel: str | None = None) -> str:
    """The kernel a layer placed on ``device`` runs: the GPU kernel asked for (or the default) on CUDA;
    on the CPU (a placement's last resort), ``"native"``: ``blip2.quantize``'s layers, as
    ``load(quantize=...)`` on the CPU gives."""
    if device.type == "cpu":
        return "native"
    return kernel or DEFAULT_KERNEL[bits]


def layer_bits(path: str, bits: int) -> int:
    """The bits the layer at ``path`` gets when the model is quantized to ``bits``: int4 keeps the
    Q-Former int8, as on the CPU. T5's encoder stays int4 here, unlike on the CPU: on a card, memory is
    what int4 is for (the int4 budget of 0.3x float16 that placement plans for), and the CPU's reason,
    int4 being no faster than int8 where the arithmetic bounds, is a CPU kernel's."""
    return 4 if bits == 4 and path.split(".", 1)[0] in INT4_PARTS else 8


@torch.no_grad()
def quantize_model_(model: nn.Module, bits: int, device_of_layer, kernel: str | None = None) -> int:
    """Replace, in place, every float linear layer that quantization covers by its quantized version,
    made on ``device_of_layer(path)``. Returns how many were replaced."""
    from . import Int4Linear, Int8Linear

    count = 0
    for path, linear in list(quantizable(model)):
        parent_path, _, name = path.rpartition(".")
        device = torch.device(device_of_layer(path))
        bits_here = layer_bits(path, bits)
        # int4 with a kernel of its own (tinygemm): the Q-Former's int8 layers take int8's default
        chosen = layer_kernel(bits_here, device, kernel if kernel in KERNELS[bits_here] else None)
        if chosen == "native":
            layer = (Int4Linear if bits_here == 4 else Int8Linear).from_linear(linear)
        else:
            layer = quantize_layer(linear, bits_here, device, chosen)
        setattr(model.get_submodule(parent_path), name, layer)
        count += 1
    log.info("int%d: replaced %d linear layers", bits, count)
    return count
