"""Which layers of a BLIP-2 model get which packing, and replacing them in place."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from ..models.layers import Linear
from . import memory
from .int4 import DEFAULT_GROUP_SIZE, Int4Linear
from .int8 import Int8Linear

log = logging.getLogger(__name__)

METHODS = ("int8", "int4")
QUANTIZED_PARTS = ("vision", "qformer", "language_model")
# int4 where it pays (bench/README.md): the language model, whose decode steps are bound by reading its
# weights (half the bytes), and the image encoder (half the memory -- 0.5 GB less for ViT-g -- for 5-10 %
# more time than int8: both kernels are bound by vpdpbusd there, and int4's also unpacks nibbles; the demo
# model scores alike). The Q-Former stays int8: small, and int4 there costs the most in logits. So does
# T5's encoder, which no decode step reads (it runs once per prompt, bound by arithmetic, where int4 is
# no faster): int4 there was half of int4's logit error on the T5 test checkpoints (bench/README.md).
# (On CUDA, where int4 is for fitting a card, T5's encoder stays int4: ``cuda.layer_bits``.)
INT4_PARTS = ("vision", "language_model")
INT8_UNDER_INT4 = ("language_model.encoder.",)


def int4_layer(name: str) -> bool:
    """Whether the linear layer ``name`` (from the model's root) is int4 when the model is int4."""
    return name.split(".", 1)[0] in INT4_PARTS and not name.startswith(INT8_UNDER_INT4)


QuantizedLinear = Int8Linear | Int4Linear


def check_method(method: str | None) -> str | None:
    if method not in (None, *METHODS):
        raise ValueError(f"quantize must be None, 'int8' or 'int4', not {method!r}")
    return method


def plan(model: nn.Module, method: str) -> dict[str, str]:
    """Module name -> "int8" / "int4" for every float linear layer ``method`` quantizes (heads outside
    ``QUANTIZED_PARTS`` -- the projection, ITM/ITC -- stay float)."""
    check_method(method)
    out: dict[str, str] = {}
    for part in QUANTIZED_PARTS:
        root = getattr(model, part, None)
        if root is None:
            continue
        for name, module in root.named_modules():
            if type(module) in (nn.Linear, Linear):
                path = f"{part}.{name}"
                out[path] = "int4" if method == "int4" and int4_layer(path) else "int8"
    return out


def empty_quantized(linear: nn.Linear, bits: str, group_size: int) -> QuantizedLinear:
    """A quantized layer of ``linear``'s shape with uninitialised tensors (to be filled from a file)."""
    bias = linear.bias is not None
    if bits == "int4":
        return Int4Linear(linear.in_features, linear.out_features, bias, group_size)
    return Int8Linear(linear.in_features, linear.out_features, bias)


def replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, layer)


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    method: str = "int8",
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: bool | None = None,
    layers: dict[str, str] | None = None,
) -> int:
    """Replace, in place, the linear layers of a BLIP-2 model by int8 / int4 ones (see :func:`plan`).

    Returns the number of layers replaced. Meant to run right after loading, on CPU; the float weights'
    file pages are given back as they are packed. ``progress``: a bar on stderr (None:
    when stderr is a terminal). ``layers``: only these (name -> bits, a part of the plan).
    """
    layers = plan(model, method) if layers is None else layers
    mappings = memory.file_mappings()

    def done(chunk: torch.Tensor) -> None:
        # each chunk's file pages are given back as soon as it is packed (a tied head reads the whole
        # token embedding; lookups later touch only a few rows)
        memory.release(chunk, mappings)

    bar = tqdm(
        layers.items(),
        f"quantizing ({method})",
        unit="layer",
        disable=None if progress is None else not progress,
    )
    for name, bits in bar:
        linear = model.get_submodule(name)
        if linear.weight.device.type != "cpu":
            raise ValueError("low-bit quantization is for CPU inference; load with device='cpu'")
        try:
            if bits == "int4":
                layer = Int4Linear.from_linear(linear, group_size, done=done)
            else:
                layer = Int8Linear.from_linear(linear, done=done)
        except ValueError as e:  # a weight that cannot be quantized: say which
            raise ValueError(f"{name}: {e}") from e
        replace(model, name, layer)
        memory.trim_heap()  # freed temporaries would otherwise pile up in the heap, layer after layer
    memory.trim_heap()
    log.info("%s: replaced %d linear layers", method, len(layers))
    return len(layers)
