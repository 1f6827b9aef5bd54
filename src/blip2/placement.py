"""Where each part of a model goes: a plan from weight sizes and device memory, and hooks that carry
activations across the devices (``blip2.load(..., device="auto" | {...})``).

Units, in the order activations flow through them:

| unit | holds |
|---|---|
| ``vision`` | the image encoder |
| ``qformer`` | the queries, the Q-Former, the projection (or the retrieval heads) |
| ``language_model.embed`` | what runs before the language model's first layer: token (and OPT's position) embeddings, OPT's ``project_in``, T5's relative-position tables; a head tied to the token embedding |
| ``language_model.layers.<i>`` | one layer (OPT, LLaMA); the final norm and the head go with the last one |
| ``language_model.encoder.<i>`` / ``.decoder.<i>`` | T5: one layer; each stack's final norm with its last layer, the head with the decoder's |

``device="auto"`` (:func:`plan_auto`) puts the first three units on the first device with room and the
language model's layers in order after them, filling each device before the next: the GPUs, then
the CPU as the last resort. A plan that cannot fit names what is needed and what each device gives.
An explicit map (:func:`plan_from_map`) names module paths (our names, e.g. ``vision``,
``language_model.layers.0-15``; ``""`` for everything not named otherwise) with devices.

Applying a plan (:func:`place`) quantizes the linear layers on their own devices, moves each unit,
and, when the plan spans several devices, hooks each unit's modules: their tensor arguments are
moved to the module's device on the way in (a tensor given to several layers, such as a mask, is
moved once per device and reused while unchanged), and the image prefix, the logits and the
retrieval outputs return to the *main* device, that of ``language_model.embed`` (of ``qformer`` for
retrieval checkpoints), where the pipeline keeps ids, masks and generation state. KV caches are made
on their layer's device. The model files know nothing of this beyond making caches per layer.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError
from .models.config import Blip2Config, T5Config
from .models.layers import device_of
from .models.weights import target_dtype
from .quantize.cuda import KERNELS, layer_bits, quantizable, quantized_bytes

log = logging.getLogger(__name__)

GiB = 1 << 30
RESERVE_BYTES = GiB  # kept free on each GPU for activations and KV caches (or RESERVE_FRACTION, if more)
RESERVE_FRACTION = 0.05

# what runs before a language model's first layer, its stacks of layers, and what follows each stack
_LM_FRONT = {
    "opt": ("embed_tokens", "embed_positions", "project_in"),
    "llama": ("embed_tokens",),
    "t5": ("embed_tokens", "encoder_bias", "decoder_bias"),
}
_LM_STACKS = {
    "opt": (("layers", ("norm", "project_out", "lm_head")),),
    "llama": (("layers", ("norm", "lm_head")),),
    "t5": (("encoder", ("encoder_norm",)), ("decoder", ("decoder_norm", "lm_head"))),
}
FRONT_UNITS = ("vision", "qformer", "language_model.embed")
# modules whose output goes back to the main device
_EXITS = ("projection", "vision_proj", "text_proj", "itm_head", "language_model.lm_head")


class PlacementError(InputError):
    """A placement that cannot be made: the model does not fit, or a device map is wrong."""


@dataclass(frozen=True)
class Unit:
    name: str
    modules: tuple[str, ...]  # module (or parameter) paths in the model
    bytes: int = 0


@dataclass
class Plan:
    units: list[Unit]
    devices: dict[str, torch.device]  # unit name -> device

    @property
    def main(self) -> torch.device:
        key = "language_model.embed" if "language_model.embed" in self.devices else "qformer"
        return self.devices[key]

    def device_of(self, path: str) -> torch.device:
        """The device of the unit holding module ``path`` (or something inside it)."""
        for unit in self.units:
            if any(path == m or path.startswith(m + ".") for m in unit.modules):
                return self.devices[unit.name]
        raise KeyError(f"{path!r} is in no unit of the plan")

    def bytes_per_device(self) -> dict[torch.device, int]:
        out: dict[torch.device, int] = {}
        for unit in self.units:
            d = self.devices[unit.name]
            out[d] = out.get(d, 0) + unit.bytes
        return out

    @property
    def spans_devices(self) -> bool:
        return len(set(self.devices.values())) > 1

    def summary(self) -> str:
        """One line per device: its units (layer ranges folded) and their bytes."""
        lines = []
        for device, total in self.bytes_per_device().items():
            names = [u.name for u in self.units if self.devices[u.name] == device]
            lines.append(f"{device}: {_fold(names)} ({human(total)})")
        return "\n".join(lines)


# ---- units and their sizes ------------------------------------------------------------------------


def model_units(
    model: nn.Module, dtype: torch.dtype | None = None, bits: int | None = None, kernel: str | None = None
) -> list[Unit]:
    """The model's units in flow order, with the bytes their weights take.

    ``dtype``: the dtype the weights will be loaded in (what ``blip2.load`` does to them, e.g. the
    Q-Former stays float32); None: as they are. ``bits``: 8 or 4 when the linear layers will be quantized.
    A tensor shared by two modules (a tied head) counts once, in the first unit holding it.
    """
    layout = _layout(model)
    quantized = {path: layer for path, layer in quantizable(model)} if bits else {}
    seen: set[int] = set()
    units = []
    for name, modules in layout:
        total = 0
        for path in modules:
            total += _bytes(model, path, dtype, bits, kernel, quantized, seen)
        units.append(Unit(name, tuple(modules), total))
    covered = {p for _, modules in layout for p in modules}
    stray = [
        n for n, _ in model.named_parameters() if not any(n == c or n.startswith(c + ".") for c in covered)
    ]
    if stray:
        raise PlacementError(f"parameters in no unit: {stray[:5]} (placement.py does not know this model)")
    return units


def _layout(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(unit name, module paths) in flow order."""
    qformer = ["queries", "qformer"]
    qformer += [n for n in ("projection", "vision_proj", "text_proj", "itm_head") if hasattr(model, n)]
    layout = [("vision", ["vision"]), ("qformer", qformer)]
    lm = getattr(model, "language_model", None)
    if lm is None:
        return layout
    kind = lm.cfg.kind
    front = [f"language_model.{n}" for n in _LM_FRONT[kind] if getattr(lm, n, None) is not None]
    tied = _tied_head(lm)
    if tied:
        front.append("language_model.lm_head")
    layout.append(("language_model.embed", front))
    for stack, tail in _LM_STACKS[kind]:
        layers = getattr(lm, stack)
        for i in range(len(layers)):
            modules = [f"language_model.{stack}.{i}"]
            if i == len(layers) - 1:
                modules += [
                    f"language_model.{n}"
                    for n in tail
                    if getattr(lm, n, None) is not None and not (n == "lm_head" and tied)
                ]
            layout.append((f"language_model.{stack}.{i}", modules))
    return layout


def _tied_head(lm: nn.Module) -> bool:
    head, embed = getattr(lm, "lm_head", None), getattr(lm, "embed_tokens", None)
    return isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding) and head.weight is embed.weight


def _bytes(model, path, dtype, bits, kernel, quantized, seen: set[int]) -> int:
    """Bytes of the tensors under ``path`` not counted yet."""
    target = _get(model, path)
    if isinstance(target, nn.Parameter):
        named = [(path, target)]
    else:
        named = [(f"{path}.{n}", t) for n, t in target.named_parameters()]
        named += [(f"{path}.{n}", t) for n, t in target.named_buffers()]
    layers = {p: layer for p, layer in quantized.items() if p == path or p.startswith(path + ".")}
    total = 0
    for p, layer in layers.items():
        w = layer.weight
        if id(w) in seen:
            continue
        seen.add(id(w))
        if layer.bias is not None:
            seen.add(id(layer.bias))
        elem = torch.empty((), dtype=target_dtype(f"{p}.weight", dtype) if dtype else w.dtype).element_size()
        b = layer_bits(p, bits)
        k = kernel if kernel in KERNELS[b] else None
        total += quantized_bytes(w.shape[0], w.shape[1], layer.bias is not None, elem, b, k)
    for name, t in named:
        if id(t) in seen:
            continue
        seen.add(id(t))
        want = target_dtype(name, dtype) if dtype is not None and t.is_floating_point() else t.dtype
        total += t.numel() * torch.empty((), dtype=want).element_size()
    return total


def meta_model(cfg: Blip2Config) -> nn.Module:
    """A model of ``cfg`` on the meta device (sizes, no memory), its head tied as loading ties it."""
    from .models.blip2 import Blip2

    with torch.device("meta"):
        model = Blip2(cfg)
    lm = model.language_model
    if (
        lm is not None
        and getattr(cfg.text, "tie_word_embeddings", False)
        and not isinstance(cfg.text, T5Config)
    ):
        lm.lm_head.weight = lm.embed_tokens.weight
    return model


# ---- device memory ------------------------------------------------------------------------------------


def parse_bytes(value: int | float | str) -> int:
    """``12_000_000_000``, ``"12GB"``, ``"11.5GiB"``, ``"800MiB"`` -> bytes."""
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", str(value), re.IGNORECASE)
    if not m:
        raise PlacementError(f"not a memory size: {value!r} (e.g. 12GiB, 800MB or a number of bytes)")
    number, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30,
             "TI": 1 << 40}[unit]  # fmt: skip
    return int(number * scale)


def parse_device(value: int | str | torch.device) -> torch.device:
    """``0`` -> cuda:0; ``"cuda"`` -> cuda:0; ``"cpu"``; any ``torch.device``."""
    if isinstance(value, int):
        return torch.device("cuda", value)
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise PlacementError(f"not a device: {value!r} (e.g. 'cuda:0', 0 or 'cpu')") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return device


def device_budgets(max_memory: Mapping | None = None) -> list[tuple[torch.device, int]]:
    """Bytes each device may take for weights, in placement order: the GPUs by index, then the CPU.

    ``max_memory`` (device -> bytes or a size such as ``"20GiB"``): exactly those devices with those
    budgets. Otherwise each GPU's free memory less a reserve for activations and caches
    (``RESERVE_BYTES`` or ``RESERVE_FRACTION`` of it, whichever is more), and the CPU's available memory.
    """
    if max_memory is not None:
        budgets = [(parse_device(d), parse_bytes(b)) for d, b in max_memory.items()]
    else:
        budgets = []
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            free, total = torch.cuda.mem_get_info(i)
            reserve = max(RESERVE_BYTES, int(RESERVE_FRACTION * total))
            budgets.append((torch.device("cuda", i), max(0, free - reserve)))
        budgets.append((torch.device("cpu"), available_ram()))
    return sorted(budgets, key=lambda b: (b[0].type == "cpu", b[0].type, b[0].index or 0))


def available_ram() -> int:
    """MemAvailable of /proc/meminfo (the system's own estimate), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---- plans ----------------------------------------------------------------------------------------------


def plan_auto(units: list[Unit], budgets: list[tuple[torch.device, int]]) -> Plan:
    """The front units on the first device that holds them all, then each later unit on the current
    device while it has room, else on the next one (never back)."""
    if not budgets:
        raise PlacementError("no device to place the model on")
    left = [b for _, b in budgets]
    front = [u for u in units if u.name in FRONT_UNITS]
    rest = [u for u in units if u.name not in FRONT_UNITS]
    need = sum(u.bytes for u in front)
    d = next((i for i, b in enumerate(left) if b >= need), None)
    if d is None:
        raise PlacementError(
            f"the image encoder, Q-Former and embeddings need {human(need)} on one device; "
            f"the most any device gives is {human(max(left))} ({_offer(budgets)})"
        )
    devices = {u.name: budgets[d][0] for u in front}
    left[d] -= need
    for unit in rest:
        while d < len(left) and unit.bytes > left[d]:
            d += 1
        if d == len(left):
            total = sum(u.bytes for u in units)
            raise PlacementError(
                f"the model's weights take {human(total)} and do not fit: {_offer(budgets)} "
                f"({unit.name} found no room)"
            )
        devices[unit.name] = budgets[d][0]
        left[d] -= unit.bytes
    return Plan(units, devices)


def plan_from_map(units: list[Unit], device_map: Mapping) -> Plan:
    """A plan from ``{module path or range: device}``; ranges like ``language_model.layers.0-15``;
    ``""`` for everything not named otherwise. Every unit must get one device."""
    keys: dict[str, torch.device] = {}
    for key, value in device_map.items():
        for path in _expand(str(key)):
            keys[path] = parse_device(value)
    used: set[str] = set()
    devices: dict[str, torch.device] = {}
    missing = []
    for unit in units:
        found: dict[str, torch.device] = {}
        for module in unit.modules:
            # the most specific key naming the module or the unit (``language_model.layers.31`` takes
            # the final norm and head along)
            key = _most_specific([module, unit.name], keys)
            if key is not None:
                found[module] = keys[key]
                used.add(key)
        if len(found) < len(unit.modules):
            if found:
                raise PlacementError(
                    f"the device map places part of unit {unit.name} only; name all of "
                    f"{', '.join(unit.modules)} (a unit stays on one device)"
                )
            missing.append(unit.name)
            continue
        if len(set(found.values())) > 1:
            raise PlacementError(
                f"the device map splits unit {unit.name} ({', '.join(f'{m}: {d}' for m, d in found.items())}); "
                "a unit stays on one device"
            )
        devices[unit.name] = next(iter(found.values()))
    if missing:
        raise PlacementError(
            f'the device map places no device for {_fold(missing)}; name them, or give "" a device for the rest'
        )
    unknown = sorted(k for k in keys if k not in used and k != "")
    if unknown:
        raise PlacementError(
            f"the device map names {unknown[:5]}, which match no part of this model; its units: "
            f"{_fold([u.name for u in units])}"
        )
    return Plan(units, devices)


def _expand(key: str) -> list[str]:
    """``a.b.3-5`` -> ``a.b.3``, ``a.b.4``, ``a.b.5``."""
    m = re.fullmatch(r"(.*\.)(\d+)-(\d+)", key)
    if not m:
        return [key]
    lo, hi = int(m.group(2)), int(m.group(3))
    if hi < lo:
        raise PlacementError(f"empty range in the device map: {key!r}")
    return [f"{m.group(1)}{i}" for i in range(lo, hi + 1)]


def _most_specific(paths: list[str], keys: Mapping[str, torch.device]) -> str | None:
    """The longest key that is ``""``, one of ``paths`` or a prefix (up to a dot) of one."""
    matching = [k for k in keys for p in paths if k == "" or p == k or p.startswith(k + ".")]
    return max(matching, key=len, default=None)


def _offer(budgets: list[tuple[torch.device, int]]) -> str:
    return ", ".join(f"{d} gives {human(b)}" for d, b in budgets)


def human(n: int) -> str:
    """Bytes as ``14.63 GiB`` / ``2.10 MiB`` / ``900 B``."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _fold(names: list[str]) -> str:
    """``x.0, x.1, x.2, y`` -> ``x.0-2, y``."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None
    for name in names + [""]:
        m = re.fullmatch(r"(.*\.)(\d+)", name)
        if m and run and run[0] == m.group(1) and run[2] + 1 == int(m.group(2)):
            run = (run[0], run[1], int(m.group(2)))
            continue
        if run:
            out.append(f"{run[0]}{run[1]}" + (f"-{run[2]}" if run[2] > run[1] else ""))
            run = None
        if m:
            run = (m.group(1), int(m.group(2)), int(m.group(2)))
        elif name:
            out.append(name)
    return ", ".join(out)


# ---- applying a plan --------------------------------------------------------------------------------


@dataclass
class Placement:
    plan: Plan
    main: torch.device
    hooks: list = field(default_factory=list)

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def place(
    model: nn.Module,
    plan: Plan,
    bits: int | None = None,
    kernel: str | None = None,
    hooks: bool | None = None,
    main: torch.device | str | None = None,
) -> Placement:
    """Quantize (``bits``), move each unit to its device, and hook the units when the plan spans
    several devices (``hooks=True``: whatever it spans). ``main``: where outputs return (default:
    :attr:`Plan.main`)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in set(plan.devices.values()):
        if device.type == "cuda" and device.index >= count:
            raise PlacementError(f"the plan names {device}; this machine has {count} CUDA device(s)")
    if bits:
        from .quantize.cuda import check_kernel, layer_kernel, quantize_model_

        for device in set(plan.devices.values()):
            check_kernel(bits, layer_kernel(bits, device, kernel))
        quantize_model_(model, bits, plan.device_of, kernel)
    for unit in plan.units:
        device = plan.devices[unit.name]
        for path in unit.modules:
            _move(model, path, device)
    main = torch.device(main) if main is not None else plan.main
    placement = Placement(plan, main)
    if hooks or (hooks is None and plan.spans_devices):
        mover = _Mover()
        for unit in plan.units:
            for path in unit.modules:
                target = _get(model, path)
                if isinstance(target, nn.Module):
                    first = re.fullmatch(r"language_model\.\w+\.0", path) is not None
                    hook = mover.pass_hook if first else mover.inputs_hook
                    placement.hooks.append(target.register_forward_pre_hook(hook, with_kwargs=True))
                    if path in _EXITS:
                        placement.hooks.append(target.register_forward_hook(mover.output_hook(main)))
        log.info("placement:\n%s", plan.summary())
    return placement


def _get(model: nn.Module, path: str) -> nn.Module | nn.Parameter:
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    return getattr(owner, name)


def _move(model: nn.Module, path: str, device: torch.device) -> None:
    target = _get(model, path)
    if isinstance(target, nn.Parameter):
        if target.device != device:
            target.data = target.data.to(device)
    else:
        target.to(device)


class _Mover:
    """Moves a module's tensor arguments to its device. Within one pass of the language model a tensor
    crossing to a device is moved once (a mask read by every layer); the first layer of each stack
    starts a pass (nothing a pass hands its layers is changed in place during it)."""

    def __init__(self):
        self._copies: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if t.device == device:
            return t
        key = (id(t), device)
        hit = self._copies.get(key)
        if hit is not None and hit[0] is t:  # the tensor is held here: its id is not reused meanwhile
            return hit[1]
        moved = t.to(device)
        self._copies[key] = (t, moved)
        return moved

    def tree(self, x, device: torch.device):
        if isinstance(x, torch.Tensor):
            return self.to(x, device)
        if isinstance(x, tuple | list):
            return type(x)(self.tree(v, device) for v in x)
        return x

    def inputs_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        device = device_of(module)
        return self.tree(args, device), {k: self.tree(v, device) for k, v in kwargs.items()}

    def pass_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self._copies.clear()
        return self.inputs_hook(module, args, kwargs)

    def output_hook(self, main: torch.device):
        def hook(module: nn.Module, args: tuple, output):
            return self.tree(output, main)

        return hook
