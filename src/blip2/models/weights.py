"""Checkpoint files: find them, read them by memory map, and map the hub's tensor names onto ours.

This is the only module that knows the hub's tensor names. Loading builds the model on the meta
device and assigns memory-mapped tensors into it (``assign=True``), so the weights are never held
twice. It is strict: a tensor the model lacks, a tensor the file lacks, a wrong shape, a corrupt file
-- each is a ``CheckpointError`` naming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Collection, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointError
from ..json_fields import JsonFields, is_integer
from .config import Blip2Config

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---- finding the files ------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: sharded (from the index) or single; safetensors preferred."""
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            shards = shard_names(index)
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            return [folder / s for s in shards]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    found = sorted(p.name for p in folder.glob("*.safetensors")) or sorted(
        p.name for p in folder.glob("*.bin")
    )
    if found:
        return [folder / n for n in found]
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, a sharded index, or pytorch_model.bin)"
    )


def shard_names(index: Path) -> list[str]:
    """The shard files a ``*.index.json`` lists, checked: a ``weight_map`` of tensor name -> file name,
    every file inside the checkpoint folder (no absolute paths, no ``..``, either path syntax)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
    weight_map = JsonFields(data, str(index)).section("weight_map")
    for tensor, shard in weight_map.data.items():
        if not isinstance(shard, str) or not shard:
            raise weight_map.fail(tensor, "a shard file name")
    shards = sorted(set(weight_map.data.values()))
    for shard in shards:
        paths = (PurePosixPath(shard), PureWindowsPath(shard))
        if any(p.is_absolute() or p.anchor or ".." in p.parts for p in paths):
            raise CheckpointError(f"{index}: shard {shard!r} lies outside the checkpoint folder")
    if not shards:
        raise CheckpointError(f"{index}: the weight_map names no shard files")
    return shards


# ---- reading tensors ----------------------------------------------------------------------------


class TensorSpan(NamedTuple):
    """Where one tensor of a safetensors file lies: ``begin``/``end`` count from the end of the header."""

    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


def safetensors_spans(path: Path, header: object, data_size: int) -> dict[str, TensorSpan]:
    """Check a safetensors header once, before any tensor is made: a JSON object whose entries each have a
    known dtype, a shape of non-negative integers and two integer offsets inside the ``data_size`` bytes
    after the header that span exactly the shape's bytes; no two tensors share a byte."""
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (must be a JSON object, not {type(header).__name__})"
        )
    if not isinstance(header.get("__metadata__") or {}, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must be a JSON object)")
    spans = {
        name: _span(f"{path}: corrupt safetensors header: tensor {name!r}", info, data_size)
        for name, info in header.items()
        if name != "__metadata__"
    }
    placed = sorted((s.begin, s.end, name) for name, s in spans.items() if s.end > s.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(placed, placed[1:], strict=False):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {a!r} and {b!r} overlap")
    return spans


def _span(where: str, info: object, data_size: int) -> TensorSpan:
    """One header entry, checked; ``where`` opens every message."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} is described by {type(info).__name__}, not a JSON object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{where} has dtype {dtype_name!r}; blip2 reads {', '.join(SAFETENSORS_DTYPES)}"
        )
    if not isinstance(shape, list) or not all(is_integer(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where} has shape {shape!r}; a shape is a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_integer(o) for o in offsets)):
        raise CheckpointError(f"{where} has data_offsets {offsets!r}; they are two integers [begin, end]")
    begin, end = offsets
    if 0 <= begin <= end and end > data_size:
        raise CheckpointError(
            f"{where} runs past the end of the file (data_offsets end {end} > {data_size}; truncated download?)"
        )
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{where} has data_offsets [{begin}, {end}] outside the file's {data_size} data bytes"
        )
    dtype = SAFETENSORS_DTYPES[dtype_name]
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where} spans {end - begin} bytes, but shape {shape} of {dtype_name} is {nbytes} bytes"
        )
    return TensorSpan(dtype, shape, begin, end)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file as views into a private (copy-on-write) memory map."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100_000_000:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (length {header_len}, file {size} bytes)"
                )
            header = json.loads(f.read(header_len))
            data_start = 8 + header_len
            spans = safetensors_spans(path, header, size - data_start)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    for name, span in spans.items():
        numel = math.prod(span.shape)
        if numel == 0:
            tensors[name] = torch.empty(span.shape, dtype=span.dtype)
            continue
        t = torch.frombuffer(mm, dtype=span.dtype, count=numel, offset=data_start + span.begin)
        tensors[name] = t.view(span.shape)
    return tensors


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch pickle checkpoint, loaded safely (tensors only), memory-mapped when possible."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(f"{path}: cannot load PyTorch weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return sd


def read_tensors(files: list[Path], origins: dict[str, Path] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's files; ``origins``, if given, gets each tensor's file."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        part = read_safetensors(f) if f.suffix == ".safetensors" else read_bin(f)
        dup = tensors.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: tensor {sorted(dup)[0]!r} also appears in another shard")
        tensors.update(part)
        if origins is not None:
            origins.update(dict.fromkeys(part, f))
    return tensors


# ---- hub names -> our names -------------------------------------------------------------------

Rule = tuple[str, str | Callable[[re.Match, Blip2Config], str] | None]

_QF_BLOCKS = {
    "attention.attention.query": "self_attn.q",
    "attention.attention.key": "self_attn.k",
    "attention.attention.value": "self_attn.v",
    "attention.output.dense": "self_attn.proj",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.attention.query": "cross_attn.q",
    "crossattention.attention.key": "cross_attn.k",
    "crossattention.attention.value": "cross_attn.v",
    "crossattention.output.dense": "cross_attn.proj",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate_query.dense": "query_ffn.mlp.fc1",
    "output_query.dense": "query_ffn.mlp.fc2",
    "output_query.LayerNorm": "query_ffn.norm",
    "intermediate.dense": "text_ffn.mlp.fc1",
    "output.dense": "text_ffn.mlp.fc2",
    "output.LayerNorm": "text_ffn.norm",
}

_OPT_BLOCKS = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "norm1",
    "final_layer_norm": "norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


_LLAMA_BLOCKS = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.out",
    "input_layernorm": "norm1",
    "post_attention_layernorm": "norm2",
    "mlp.gate_proj": "mlp.wi_0",
    "mlp.up_proj": "mlp.wi_1",
    "mlp.down_proj": "mlp.wo",
}


def _llama_block(m: re.Match, cfg: Blip2Config) -> str:
    return f"language_model.layers.{m['i']}.{_LLAMA_BLOCKS[m['part']]}.{m['p']}"


def _t5_block(m: re.Match, cfg: Blip2Config) -> str:
    stack, n, sub, rest = m["stack"], m["n"], int(m["sub"]), m["rest"]
    gated = cfg.text.gated
    is_dec = stack == "decoder"
    if rest.startswith("SelfAttention.relative_attention_bias"):
        if n != "0":
            raise KeyError("relative_attention_bias outside block 0")
        return f"language_model.{stack}_bias.embed.weight"
    ff_sub = 2 if is_dec else 1
    prefix = f"language_model.{stack}.{n}."
    if sub == 0:
        if rest.startswith("layer_norm."):
            return prefix + "norm1." + rest.split(".", 1)[1]
        if rest.startswith("SelfAttention."):
            return prefix + "self_attn." + rest.split(".", 1)[1]
    elif sub == 1 and is_dec:
        if rest.startswith("layer_norm."):
            return prefix + "norm_cross." + rest.split(".", 1)[1]
        if rest.startswith("EncDecAttention."):
            return prefix + "cross_attn." + rest.split(".", 1)[1]
    elif sub == ff_sub:
        if rest.startswith("layer_norm."):
            return prefix + "norm2." + rest.split(".", 1)[1]
        if rest.startswith("DenseReluDense."):
            part = rest.split(".", 1)[1]
            if not gated:
                part = part.replace("wi.", "fc1.").replace("wo.", "fc2.")
            return prefix + "mlp." + part
    raise KeyError(rest)


# Plain renames, read both ways (loading: hub -> ours; writing a checkpoint: ours -> hub). A ``{slot}``
# matches what _SLOTS says; a slot with a table also renames its value (hub key -> our value).
_SLOTS: dict[str, tuple[str, dict[str, str] | None]] = {
    "i": (r"\d+", None),
    "p": (r"weight|bias", None),
    "n": (r"[12]", None),
    "fc": (r"fc[12]", None),
    "proj": (r"project_in|project_out", None),
    "what": (r"tokens|positions", None),
    "qf": ("", _QF_BLOCKS),
    "opt": ("", _OPT_BLOCKS),
}
_RENAMES: list[tuple[str, str]] = [
    # vision
    ("vision_model.embeddings.class_embedding", "vision.class_token"),
    ("vision_model.embeddings.position_embedding", "vision.pos_embed"),
    ("vision_model.embeddings.patch_embedding.{p}", "vision.patch_embed.{p}"),
    ("vision_model.encoder.layers.{i}.self_attn.qkv.{p}", "vision.blocks.{i}.attn.qkv.{p}"),
    ("vision_model.encoder.layers.{i}.self_attn.projection.{p}", "vision.blocks.{i}.attn.proj.{p}"),
    ("vision_model.encoder.layers.{i}.layer_norm{n}.{p}", "vision.blocks.{i}.norm{n}.{p}"),
    ("vision_model.encoder.layers.{i}.mlp.{fc}.{p}", "vision.blocks.{i}.mlp.{fc}.{p}"),
    ("vision_model.post_layernorm.{p}", "vision.norm.{p}"),
    # Q-Former
    ("query_tokens", "queries"),
    ("qformer.layernorm.{p}", "qformer.norm.{p}"),
    ("qformer.encoder.layer.{i}.{qf}.{p}", "qformer.layers.{i}.{qf}.{p}"),
    ("embeddings.word_embeddings.weight", "qformer.word_embed.weight"),
    ("embeddings.position_embeddings.weight", "qformer.pos_embed.weight"),
    # heads
    ("language_projection.{p}", "projection.{p}"),
    ("vision_projection.{p}", "vision_proj.{p}"),
    ("text_projection.{p}", "text_proj.{p}"),
    ("itm_head.{p}", "itm_head.{p}"),
    # OPT
    ("language_model.model.decoder.embed_{what}.weight", "language_model.embed_{what}.weight"),
    ("language_model.model.decoder.{proj}.weight", "language_model.{proj}.weight"),
    ("language_model.model.decoder.final_layer_norm.{p}", "language_model.norm.{p}"),
    ("language_model.model.decoder.layers.{i}.{opt}.{p}", "language_model.layers.{i}.{opt}.{p}"),
    ("language_model.lm_head.weight", "language_model.lm_head.weight"),  # T5's untied head too
]


def _template_regex(template: str, side: int) -> str:
    """``side`` 0 reads hub names, 1 ours."""
    parts = re.split(r"\{(\w+)\}", template)
    out = []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            out.append(re.escape(part))
            continue
        pattern, table = _SLOTS[part]
        if table is not None:
            names = table if side == 0 else table.values()
            pattern = "|".join(re.escape(n) for n in names)
        out.append(f"(?P<{part}>{pattern})")
    return "".join(out)


def _renamer(template: str, side: int) -> Callable[..., str]:
    """Fill ``template`` from a match made on the other ``side``, renaming table slots on the way."""

    tables = {
        slot: table if side == 1 else {v: k for k, v in table.items()}
        for slot, (_, table) in _SLOTS.items()
        if table is not None
    }

    def fill(m: re.Match, *_: object) -> str:
        values = {slot: tables[slot][v] if slot in tables else v for slot, v in m.groupdict().items()}
        return template.format(**values)

    return fill


RULES: list[Rule] = [
    *((_template_regex(hub, 0), _renamer(ours, 1)) for hub, ours in _RENAMES),
    # read only: other spellings of the Q-Former embeddings (InstructBLIP's holds the norm too), T5 and
    # LLaMA (blip2 writes no T5 or LLaMA checkpoint from scratch)
    (r"qformer\.embeddings\.layernorm\.(weight|bias)", r"qformer.norm.\1"),
    (r"qformer\.embeddings\.word_embeddings\.weight", "qformer.word_embed.weight"),
    (r"qformer\.embeddings\.position_embeddings\.weight", "qformer.pos_embed.weight"),
    (r"(?:qformer\.)?embeddings\.position_ids", None),
    (r"language_model\.shared\.weight", "language_model.embed_tokens.weight"),
    (r"language_model\.(encoder|decoder)\.embed_tokens\.weight", "language_model.embed_tokens.weight"),
    (
        r"language_model\.(?P<stack>encoder|decoder)\.block\.(?P<n>\d+)\.layer\.(?P<sub>\d)\.(?P<rest>.+)",
        _t5_block,
    ),
    (r"language_model\.encoder\.final_layer_norm\.weight", "language_model.encoder_norm.weight"),
    (r"language_model\.decoder\.final_layer_norm\.weight", "language_model.decoder_norm.weight"),
    (r"language_model\.model\.embed_tokens\.weight", "language_model.embed_tokens.weight"),
    (r"language_model\.model\.norm\.weight", "language_model.norm.weight"),
    (
        r"language_model\.model\.layers\.(?P<i>\d+)\.(?P<part>[\w.]+)\.(?P<p>weight|bias)",
        _llama_block,
    ),
    (r"language_model\.model\.rotary_emb\.inv_freq", None),  # derived, never loaded
]
_COMPILED = [(re.compile(p), r) for p, r in RULES]

# Names several hub tensors may map to (tied copies); the first one present wins.
ALIASED = {"language_model.embed_tokens.weight"}


# Tensors of a low-bit layer (blip2.quantize) in a quantized checkpoint: named as the layer's ``weight``
# with this last part instead.
PACKED_NAMES = ("qweight", "scale", "scales", "mins")


def our_name(hub_name: str, cfg: Blip2Config) -> str | None:
    """Map one hub tensor name to ours; None for tensors we deliberately skip. KeyError if unknown."""
    layer, _, last = hub_name.rpartition(".")
    if last in PACKED_NAMES:
        weight = _our_name(f"{layer}.weight", cfg)
        if weight is None or not weight.endswith(".weight"):
            raise KeyError(hub_name)
        return weight.removesuffix("weight") + last
    return _our_name(hub_name, cfg)


def _our_name(hub_name: str, cfg: Blip2Config) -> str | None:
    for pattern, repl in _COMPILED:
        m = pattern.fullmatch(hub_name)
        if m is None:
            continue
        if repl is None:
            return None
        try:
            return repl(m, cfg) if callable(repl) else m.expand(repl)
        except KeyError:
            break
    raise KeyError(hub_name)


def map_state_dict(tensors: dict[str, torch.Tensor], cfg: Blip2Config) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, t in tensors.items():
        try:
            ours = our_name(name, cfg)
        except KeyError:
            unknown.append(name)
            continue
        if ours is None:
            continue
        if ours in out:
            if ours in ALIASED:
                continue
            raise CheckpointError(f"two checkpoint tensors map to {ours!r} (one is {name!r})")
        out[ours] = t
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise CheckpointError(
            f"unexpected tensor(s) in the checkpoint: {', '.join(sorted(unknown)[:5])}{more}"
        )
    return out


# ---- putting them into the model --------------------------------------------------------------


class _SkipInit(TorchFunctionMode):
    """Turns ``torch.nn.init`` calls into no-ops while a model is built to be filled from a checkpoint.

    Random initialisation is work thrown away, and on the meta device ``normal_`` (``nn.Embedding``'s
    init) goes through PyTorch's Python reference kernels, whose first use imports ``torch._dynamo``
    (~1 s). A function mode is scoped to this thread and this ``with`` block: no global is patched.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def empty_modules() -> Iterator[None]:
    """Build modules on the meta device without initialising them: shapes only, filled by ``load_into``."""
    with torch.device("meta"), _SkipInit():
        yield


FLOAT32_PREFIXES = ("qformer.", "queries")  # kept in float32 whatever the model's dtype


# T5's feed-forward output projection overflows in float16; like the reference, keep it float32 then.
_T5_WO = re.compile(r"language_model\.(encoder|decoder)\.\d+\.mlp\.(wo|fc2)\.weight")


def target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    if name.startswith(FLOAT32_PREFIXES):
        return torch.float32
    if dtype == torch.float16 and _T5_WO.fullmatch(name):
        return torch.float32
    return dtype


def load_into(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    cfg: Blip2Config,
    dtype: torch.dtype,
    packed: Collection[str] = (),
) -> None:
    """Fill a meta-device ``model`` from hub-named ``tensors`` (strict; no second copy when dtypes agree).

    ``packed`` (our names: low-bit layers' tensors) keep the model's dtype exactly: never converted.
    """
    mapped = map_state_dict(tensors, cfg)
    expected = model.state_dict()
    lm_head = "language_model.lm_head.weight"
    if (
        lm_head in expected
        and lm_head not in mapped
        and cfg.text is not None
        and cfg.text.tie_word_embeddings
    ):
        embed = mapped.get("language_model.embed_tokens.weight")
        if embed is not None:
            mapped[lm_head] = embed  # tied: share the embedding's storage
    missing = sorted(expected.keys() - mapped.keys())
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"checkpoint is missing tensor(s) for: {', '.join(missing[:5])}{more} "
            "(is this the right checkpoint for this config?)"
        )
    extra = sorted(mapped.keys() - expected.keys())
    if extra:
        raise CheckpointError(
            f"checkpoint has tensor(s) this model does not use: {', '.join(extra[:5])} "
            "(config.json and the weights disagree)"
        )
    converted: dict[int, torch.Tensor] = {}  # one conversion per source tensor, so tied weights stay shared
    final: dict[str, torch.Tensor] = {}
    for name, ref in expected.items():
        t = mapped[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)} in the checkpoint, the config implies {tuple(ref.shape)}"
            )
        want = ref.dtype if name in packed else target_dtype(name, dtype)
        if name in packed and t.dtype != want:
            raise CheckpointError(f"tensor {name!r} is {t.dtype} in the checkpoint, its packing is {want}")
        if t.dtype != want:
            key = id(t)
            if key not in converted:
                converted[key] = t.to(want)
            t = converted[key]
        final[name] = t
    model.load_state_dict(final, strict=True, assign=True)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype}")
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}") from None


# ---- saving: our names -> the source checkpoint's hub names -----------------------------------

# Files of a checkpoint folder that are not weights and travel unchanged with saved weights (also in
# InstructBLIP's qformer_tokenizer/ folder).
CHECKPOINT_SIDE_FILES = ("*.json", "*.txt", "*.model")
CHECKPOINT_SIDE_FOLDERS = ("qformer_tokenizer",)


def hub_state_dict(
    model: nn.Module, source: dict[str, torch.Tensor], cfg: Blip2Config, trained: set[str]
) -> dict[str, torch.Tensor]:
    """Hub-named tensors to save: the ``source`` checkpoint's tensors under their own names, with those
    that map to a ``trained`` parameter (our names) replaced by the model's current value.

    Everything not trained is the source's own tensor (same bytes, same dtype), so frozen weights stay
    bit-identical; tied copies (an ``lm_head`` present or absent, T5's ``shared``) stay as the source had them.
    """
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for hub, t in source.items():
        try:
            name = our_name(hub, cfg)
        except KeyError:
            raise CheckpointError(f"unexpected tensor {hub!r} in the source checkpoint") from None
        if name is not None and name in trained:
            t = ours[name].detach()
            covered.add(name)
        out[hub] = t
    missing = sorted(trained - covered)
    if missing:
        raise CheckpointError(
            f"trained tensor(s) with no place in the checkpoint layout: {', '.join(missing[:5])}"
        )
    return out


def save_checkpoint(
    model: nn.Module,
    src_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    trained: set[str] | None = None,
) -> Path:
    """Write ``model`` as a hub-layout checkpoint in ``out_folder``, laid out as ``src_folder`` (the one it
    was loaded from): ``model.safetensors`` with every tensor under its hub name, and the config, tokenizer,
    processor and generation-config files copied. ``trained`` (our names; default: parameters that require
    grad) are taken from the model, everything else from the source files, byte for byte."""
    src = Path(src_folder)
    cfg = Blip2Config.from_file(src / "config.json")
    if trained is None:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
    state = hub_state_dict(model, read_tensors(weight_files(src)), cfg, trained)
    return write_checkpoint(state, src, out_folder)


def _umask() -> int:
    """This process's file-creation mask (read without changing it where Linux tells it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as the safetensors file ``path``, written whole before it replaces any file there, and
    readable as the process's umask allows (as ``config.json`` beside it is): safetensors itself creates
    its files readable by their owner only, which would keep a checkpoint written for a team from it."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def write_checkpoint(
    state: dict[str, torch.Tensor],
    src_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    config: dict | None = None,
) -> Path:
    """Write hub-named ``state`` as ``out_folder/model.safetensors`` with the side files of ``src_folder``
    (config, tokenizer, processor, generation config) copied; ``config``, if given, is written as
    ``config.json`` instead of the source's."""
    import shutil

    src, out = Path(src_folder), Path(out_folder)
    if src.resolve() == out.resolve():
        raise CheckpointError(f"{out}: write the new checkpoint to a new folder, not over its source")
    # safetensors wants contiguous CPU tensors that share no memory
    seen: set[int] = set()
    flat: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.data_ptr())
        flat[name] = t
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("pytorch_model*.bin"), *out.glob("*.index.json")]:
        stale.unlink()
    save_safetensors(flat, out / "model.safetensors")
    for pattern in CHECKPOINT_SIDE_FILES:
        for f in src.glob(pattern):
            if f.is_file() and not f.name.endswith(".index.json"):
                shutil.copyfile(f, out / f.name)
    for name in CHECKPOINT_SIDE_FOLDERS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, dirs_exist_ok=True)
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ---- our names -> hub names, for checkpoints built from scratch (blip2.demo) -------------------

_INVERSE = [(re.compile(_template_regex(ours, 1)), _renamer(hub, 0)) for hub, ours in _RENAMES]


def hub_name(ours: str, cfg: Blip2Config) -> str:
    """The hub name of one of our tensors (vision, Q-Former, heads, OPT; not T5), checked by mapping it back."""
    for pattern, repl in _INVERSE:
        m = pattern.fullmatch(ours)
        if m is None:
            continue
        try:
            hub = repl(m)
            if our_name(hub, cfg) == ours:
                return hub
        except KeyError:
            pass
        break
    raise CheckpointError(f"{ours!r} has no hub name blip2 can write (T5 checkpoints are not written)")


def hub_tensors(model: nn.Module, cfg: Blip2Config) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` under its hub name, contiguous on the CPU; a tied ``lm_head`` is left out
    (loading ties it back), as the released OPT checkpoints may do."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    lm_head, embed = "language_model.lm_head.weight", "language_model.embed_tokens.weight"
    for name, t in state.items():
        if name == lm_head and embed in state and t.data_ptr() == state[embed].data_ptr():
            continue
        out[hub_name(name, cfg)] = t.detach().to("cpu").contiguous().clone()
    return out
