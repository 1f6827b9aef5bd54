"""Quantized checkpoints: the packed tensors in the hub layout, loaded by memory map with no re-quantizing.

A quantized checkpoint is the source checkpoint's folder with ``model.safetensors`` holding, for each
low-bit layer whose weight is ``<layer>.weight`` in the source, the layer's packed tensors instead:
``<layer>.qweight`` and ``<layer>.scale`` (int8), ``<layer>.qweight``, ``<layer>.scales`` and
``<layer>.mins`` (int4; layouts in ``int8`` and ``int4``), and ``<layer>.bias`` in float32. Every
other tensor is the source's, byte for byte. ``config.json`` gets a ``quantization`` entry::

    "quantization": {"format": "blip2-lowbit", "version": 1, "method": "int4", "group_size": 128,
                     "int8_block": 128, "modules": {"int4": ["language_model.model.decoder.layers.0.fc1", ...],
                                                    "int8": ["vision_model.encoder.layers.0.mlp.fc1", ...]}}

(``modules``: the layers' names in the file.) ``blip2.load`` reads it, builds those layers packed on
the meta device and assigns the file's tensors to them; a tensor whose dtype or shape is not what the
entry implies is a ``CheckpointError`` naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.config import Blip2Config
from ..models.weights import PACKED_NAMES, hub_name, our_name, read_tensors, weight_files, write_checkpoint
from .int4 import Int4Linear
from .int8 import Int8Linear
from .kernels import INT4_CHUNK, INT8_BLOCK
from .model import empty_quantized, replace

FORMAT = "blip2-lowbit"
VERSION = 1
BITS = {"int8": Int8Linear, "int4": Int4Linear}


def quantized_layers(model: nn.Module) -> dict[str, Int8Linear | Int4Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear | Int4Linear)}


def describe(layers: dict[str, Int8Linear | Int4Linear], names: dict[str, str]) -> dict:
    """The ``quantization`` entry for ``layers`` (our names), listed under their names in the file."""
    modules: dict[str, list[str]] = {bits: [] for bits in BITS}
    for name, layer in layers.items():
        modules["int4" if isinstance(layer, Int4Linear) else "int8"].append(names[name])
    groups = {layer.group_size for layer in layers.values() if isinstance(layer, Int4Linear)}
    if len(groups) > 1:
        raise ValueError(f"int4 layers with different group sizes ({sorted(groups)}) cannot be saved")
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": "int4" if modules["int4"] else "int8",
        "group_size": groups.pop() if groups else None,
        "int8_block": INT8_BLOCK,
        "modules": {bits: names for bits, names in modules.items() if names},
    }


def method_of(model: nn.Module) -> tuple[str | None, int | None]:
    """How a loaded model is quantized: ("int4", group size), ("int8", None), or (None, None)."""
    layers = quantized_layers(model).values()
    int4 = [layer.group_size for layer in layers if isinstance(layer, Int4Linear)]
    if int4:
        return "int4", int4[0]
    return ("int8" if layers else None), None


# ---- writing ------------------------------------------------------------------------------------------


def save(
    model: nn.Module,
    src_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    calibration: dict | None = None,
) -> Path:
    """Write ``model`` (loaded from ``src_folder``, float or quantized) as a checkpoint in ``out_folder``:
    its low-bit layers' packed tensors, every other tensor from the source's files as they are.
    ``calibration``: how the codes were fitted (``calibrate``), noted in the quantization entry."""
    src = Path(src_folder)
    cfg = Blip2Config.from_file(src / "config.json")
    layers = quantized_layers(model)
    source = read_tensors(weight_files(src))
    state: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}  # our layer name -> its name in the file
    for hub, tensor in source.items():
        try:
            ours = our_name(hub, cfg)
        except KeyError:
            raise CheckpointError(f"unexpected tensor {hub!r} in the source checkpoint") from None
        layer, _, leaf = (ours or "").rpartition(".")
        if layer in layers:
            names[layer] = hub.removesuffix(f".{leaf}")
        else:
            state[hub] = tensor
    for name, layer in layers.items():
        # a tied lm_head the source left out is written under its own hub name
        if name not in names:
            names[name] = hub_name(f"{name}.weight", cfg).removesuffix(".weight")
        prefix = names[name]
        for leaf, tensor in layer.state_dict().items():
            state[f"{prefix}.{leaf}"] = tensor
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization", None)
    if layers:
        config["quantization"] = describe(layers, names)
        if calibration is not None:
            config["quantization"]["calibration"] = calibration
    return write_checkpoint(state, src, out_folder, config)


# ---- reading ------------------------------------------------------------------------------------------


class SavedQuantization:
    """A checkpoint's ``quantization`` entry, checked."""

    def __init__(self, entry: object, where: str):
        def fail(what: str) -> CheckpointError:
            return CheckpointError(f"{where}: quantization entry: {what}")

        if not isinstance(entry, dict):
            raise fail("must be a JSON object")
        if entry.get("format") != FORMAT or entry.get("version") != VERSION:
            raise fail(
                f"format {entry.get('format')!r} version {entry.get('version')!r} is not one this blip2 reads "
                f"({FORMAT!r} version {VERSION})"
            )
        if entry.get("int8_block", INT8_BLOCK) != INT8_BLOCK:
            raise fail(f"int8_block must be {INT8_BLOCK}")
        modules = entry.get("modules")
        if not isinstance(modules, dict) or not modules or not set(modules) <= set(BITS):
            raise fail(f"modules must map {' / '.join(BITS)} to lists of layer names")
        for names in modules.values():
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise fail("modules must map to lists of layer names")
        self.group_size = entry.get("group_size")
        if "int4" in modules and not (
            isinstance(self.group_size, int) and self.group_size > 0 and self.group_size % INT4_CHUNK == 0
        ):
            raise fail(f"group_size must be a positive multiple of {INT4_CHUNK}, not {self.group_size!r}")
        self.method = "int4" if "int4" in modules else "int8"
        self.modules: dict[str, list[str]] = modules
        self.where = where

    def prepare(self, model: nn.Module, cfg: Blip2Config) -> set[str]:
        """Replace the listed layers of a meta-built ``model`` by empty packed ones (inside
        ``weights.empty_modules()``); returns their tensors' names (ours)."""
        packed: set[str] = set()
        for bits, names in self.modules.items():
            for name in names:
                try:
                    ours = our_name(f"{name}.weight", cfg)
                    layer = model.get_submodule(ours.removesuffix(".weight"))
                except (KeyError, AttributeError):
                    layer = None
                if not isinstance(layer, nn.Linear):
                    raise CheckpointError(
                        f"{self.where}: the quantization entry lists {name!r}, which is no linear layer of this model"
                    )
                ours = ours.removesuffix(".weight")
                quantized = empty_quantized(layer, bits, self.group_size)
                replace(model, ours, quantized)
                packed.update(f"{ours}.{leaf}" for leaf in quantized.state_dict())
        return packed

    def check(
        self, model: nn.Module, tensors: dict[str, torch.Tensor], origins: dict[str, Path], cfg: Blip2Config
    ) -> None:
        """Every packed tensor has the dtype and shape the entry implies (before anything is assigned)."""
        expected = {name: t for name, t in model.state_dict().items()}
        for hub, tensor in tensors.items():
            try:
                ours = our_name(hub, cfg)
            except KeyError:
                continue  # reported by load_into
            layer, _, leaf = (ours or "").rpartition(".")
            module = _get(model, layer)
            where = f"{origins.get(hub, self.where)}: tensor {hub!r}"
            if not isinstance(module, Int8Linear | Int4Linear):
                if leaf in PACKED_NAMES:
                    raise CheckpointError(
                        f"{where} is packed, but the quantization entry does not list its layer"
                    )
                continue
            want = expected.get(ours)
            if want is None:
                raise CheckpointError(
                    f"{where} is no part of what config.json says, {_describe_layer(module)} "
                    f"(which stores {', '.join(module.state_dict())})"
                )
            if tensor.dtype != want.dtype or tuple(tensor.shape) != tuple(want.shape):
                raise CheckpointError(
                    f"{where} is {tensor.dtype} {tuple(tensor.shape)}; config.json says "
                    f"{_describe_layer(module)}, which stores {want.dtype} {tuple(want.shape)}"
                )


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _describe_layer(layer: nn.Module) -> str:
    if isinstance(layer, Int4Linear):
        return f"int4 with group size {layer.group_size}"
    return "int8"


def saved_quantization(folder: Path) -> SavedQuantization | None:
    """The checkpoint's quantization entry, or None for a float checkpoint."""
    path = folder / "config.json"
    try:
        entry = json.loads(path.read_text()).get("quantization")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    return None if entry is None else SavedQuantization(entry, str(path))
