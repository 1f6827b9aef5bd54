"""A decode step of an OPT, T5 or LLaMA decoder in one native call (``blip2.native.decoder_step``,
``t5_decoder_step``, ``llama_decoder_step``).

Each layer of a decode step is ~40 PyTorch operator and module calls around its six matrix products;
with int8 or int4 weights those calls take about a third of the step (~2 ms of ~6 ms at OPT-350m's
shape). Where every linear layer of the decoder can be run from C (``native_linear()``: the low-bit
layers of ``blip2.quantize`` on their native kernel), a float32 CPU decode step with a KV cache runs
all its layers in one call of ``csrc/decoder_step.c`` instead. The products and the attention are the
same kernels the layers call one by one; the layer norms, the ReLU and the residual adds are done in C
(a layer norm's last bits differ from PyTorch's). Each row's result is its own, as in those kernels.

The decoder's description (pointers to every layer's kernel description and norm weights) is made on
first use and checked at the first step of each generation (a new KV cache) against the model's current
layers: where a layer, its weights or a norm's weights were replaced or moved since, it is made again. A description holds every
tensor it points at, so a step can never read freed memory (weights replaced in the middle of a
generation are seen from its next one).
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import native
from .layers import KVCache


@dataclass
class _Described:
    """A decoder described for ``native.decoder_step`` (None: it cannot run natively), what it points at
    kept alive, and the key of the layers it was made from (:func:`_key`)."""

    decoder: native.StepDecoder | None
    key: tuple
    keep: list[object] = field(default_factory=list)  # the blocks array, the tensors it points at
    cache: weakref.ref | None = None  # the first KV cache of the generation it was last checked for


_DESCRIBED: weakref.WeakKeyDictionary[nn.Module, _Described] = weakref.WeakKeyDictionary()


def _parts(model: nn.Module) -> list[tuple[list, list[torch.Tensor | None]]]:
    """Per block of ``model`` (an OPT): its six linear layers' ``native_linear()`` (None where a layer
    has none) and its norms' weight and bias (None where absent), in ``native.BLOCK_LINEARS`` and
    ``native.BLOCK_NORMS`` order."""
    parts = []
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        linears = [
            getattr(m, "native_linear", lambda: None)()
            for m in (attn.q, attn.k, attn.v, attn.out, mlp.fc1, mlp.fc2)
        ]
        norms = [getattr(norm, part) for norm in (block.norm1, block.norm2) for part in ("weight", "bias")]
        parts.append((linears, norms))
    return parts


def _key(attentions: list[nn.Module], parts: list[tuple[list, list[torch.Tensor | None]]]) -> tuple:
    """What a description depends on: the attention kind, every linear layer's description (by identity)
    and every norm tensor's storage."""
    return (
        tuple(attention.fast_kernels for attention in attentions),
        tuple(None if ref is None else ref[1] for linears, _ in parts for ref in linears),
        tuple(None if t is None else (t.data_ptr(), t.dtype) for _, norms in parts for t in norms),
    )


def _describe(
    model: nn.Module, parts: list[tuple[list, list[torch.Tensor | None]]], key: tuple
) -> _Described:
    """``model`` (an OPT) described from its ``parts``, or ``_Described(None, key)`` where a layer cannot
    run natively."""
    cfg = model.cfg
    blocks = list(model.layers)
    eps = {block.norm1.eps for block in blocks} | {block.norm2.eps for block in blocks}
    if cfg.activation != "relu" or not all(block.attn.fast_kernels for block in blocks) or len(eps) != 1:
        return _Described(None, key)
    eps, scale = eps.pop(), blocks[0].attn.scale
    return _describe_blocks(
        parts,
        key,
        native.StepBlock,
        native.BLOCK_LINEARS,
        native.BLOCK_NORMS,
        lambda address, layers: native.StepDecoder(
            address, layers, cfg.hidden_size, cfg.num_heads, cfg.mlp_size, bool(cfg.pre_norm), eps, scale
        ),
    )


def _description(model: nn.Module, first: KVCache, parts_of, attentions_of, describe) -> _Described:
    """``model``'s description, checked at the first step of each generation (a new ``first`` cache) and
    made again if any layer changed since: ``parts_of(model)`` lists its layers' parts,
    ``attentions_of(model)`` its attention modules, ``describe(model, parts, key)`` makes it."""
    described = _DESCRIBED.get(model)
    if described is None or described.cache is None or described.cache() is not first:
        parts = parts_of(model)
        key = _key(attentions_of(model), parts)
        if described is None or described.key != key:
            described = _DESCRIBED[model] = describe(model, parts, key)
        described.cache = weakref.ref(first)
    return described


def _step_applies(x: torch.Tensor, cache, start) -> bool:
    """A float32 CPU decode step of one new position with a cache, no gradient wanted."""
    return (
        cache is not None
        and isinstance(start, int)
        and x.shape[1] == 1
        and not torch.is_grad_enabled()
        and x.dtype == torch.float32
        and x.is_cpu
    )


def run(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, cache: list[KVCache] | None, start) -> bool:
    """Runs every layer of ``model`` (an OPT) over ``x`` (B, 1, D), in place, for a decode step at
    position ``start`` and says True; False where the native step does not apply (the caller then runs
    the layers; nothing was changed).

    ``mask``: the step's boolean (B, 1, 1, start + 1) causal mask.
    """
    if (
        not _step_applies(x, cache, start)
        or not x.is_contiguous()
        or mask.shape != (x.shape[0], 1, 1, start + 1)
        or (kernel := native.decoder_step_kernel()) is None
    ):
        return False
    described = _description(model, cache[0], _parts, lambda m: [b.attn for b in m.layers], _describe)
    if described.decoder is None:
        return False
    rows = x.shape[0]
    try:
        native.decoder_step(
            kernel,
            described.decoder,
            x.view(rows, -1),
            [(c.k, c.v) for c in cache],
            mask.view(rows, -1),
            start,
        )
    except ValueError:  # what it does not take (a full cache, say): the layers say why
        return False
    return True


def _fill(array, parts, linear_names, norm_names, described: _Described) -> bool:
    """Points each entry of a ctypes ``array`` of blocks at its ``parts`` (every linear layer's
    description; its norms' tensors, NULL for an absent one: OPT's norms without an affine part),
    keeping what they point at in ``described``; False where a part cannot run natively."""
    for (linears, tensors), entry in zip(parts, array, strict=True):
        for name, reference in zip(linear_names, linears, strict=True):
            if reference is None:
                return False
            address, layer, packed = reference
            setattr(entry, name, native.StepLinear(address, ctypes.addressof(layer)))
            described.keep.extend((layer, *packed))
        for name, tensor in zip(norm_names, tensors, strict=True):
            if tensor is not None and (
                tensor.dtype != torch.float32 or not tensor.is_contiguous() or not tensor.is_cpu
            ):
                return False
            setattr(entry, name, None if tensor is None else tensor.data_ptr())
            described.keep.append(tensor)
    return True


def _describe_blocks(parts, key: tuple, block_type, linear_names, norm_names, make_decoder) -> _Described:
    """A decoder described for its native step: a ctypes array of ``block_type`` pointed at the
    ``parts``, in the decoder struct ``make_decoder(array address, layers)`` makes;
    ``_Described(None, key)`` where a part is missing."""
    described = _Described(None, key)
    array = (block_type * len(parts))()
    if not _fill(array, parts, linear_names, norm_names, described):
        return _Described(None, key)
    described.decoder = make_decoder(ctypes.addressof(array), len(parts))
    described.keep.append(array)
    return described


def _gated_decoder(cfg, eps: float):
    """``make_decoder`` for :func:`_describe_blocks`: a ``native.GatedStepDecoder`` of a T5's or a LLaMA's
    sizes."""
    return lambda address, layers: native.GatedStepDecoder(
        address,
        layers,
        cfg.hidden_size,
        cfg.num_heads,
        getattr(cfg, "num_kv_heads", cfg.num_heads),  # (T5's keys are not grouped)
        cfg.head_dim,
        cfg.mlp_size,
        eps,
    )


# ---- T5 v1.1 / Flan-T5 decoders (native.t5_decoder_step) ------------------------------------------------

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # layers.ACTIVATIONS' tanh approximations


def _t5_parts(model: nn.Module) -> list[tuple[list, list[torch.Tensor | None]]]:
    """Per decoder block of ``model`` (a T5 with a gated feed-forward): its nine linear layers'
    ``native_linear()`` (in ``native.T5_BLOCK_LINEARS`` order) and its three RMS norms' weights."""
    parts = []
    for block in model.decoder:
        attn, cross, mlp = block.self_attn, block.cross_attn, block.mlp
        modules = (attn.q, attn.k, attn.v, attn.o, cross.q, cross.o, mlp.wi_0, mlp.wi_1, mlp.wo)
        linears = [getattr(m, "native_linear", lambda: None)() for m in modules]
        parts.append((linears, [block.norm1.weight, block.norm_cross.weight, block.norm2.weight]))
    return parts


def _t5_describe(
    model: nn.Module, parts: list[tuple[list, list[torch.Tensor | None]]], key: tuple
) -> _Described:
    """``model`` (a T5) described from its ``parts``, or ``_Described(None, key)`` where it cannot run
    natively."""
    cfg = model.cfg
    blocks = list(model.decoder)
    norms = [norm for block in blocks for norm in (block.norm1, block.norm_cross, block.norm2)]
    eps = {norm.eps for norm in norms}
    fast = all(block.self_attn.fast_kernels and block.cross_attn.fast_kernels for block in blocks)
    if not cfg.gated or cfg.activation not in TANH_GELUS or not fast or len(eps) != 1:
        return _Described(None, key)
    return _describe_blocks(
        parts,
        key,
        native.T5StepBlock,
        native.T5_BLOCK_LINEARS,
        native.T5_BLOCK_NORMS,
        _gated_decoder(cfg, eps.pop()),
    )


def run_t5(model: nn.Module, x: torch.Tensor, bias: torch.Tensor, cache, start) -> torch.Tensor | None:
    """Every decoder layer of ``model`` (a T5) over ``x`` (B, 1, D) for a decode step at position
    ``start``, in one native call: the hidden states before the final norm (a new tensor), or None where
    the native step does not apply (the caller then runs the layers; nothing was changed).

    ``bias``: the step's additive self-attention bias (B or 1, H, 1, start + 1), position bias and mask;
    ``cache``: the generation's ``T5DecoderCache``.
    """
    if (
        not _step_applies(x, cache, start)
        or not model.cfg.gated
        or (kernel := native.t5_decoder_step_kernel()) is None
    ):
        return None
    described = _description(
        model,
        cache.self_attn[0],
        _t5_parts,
        lambda m: [a for block in m.decoder for a in (block.self_attn, block.cross_attn)],
        _t5_describe,
    )
    if described.decoder is None:
        return None
    rows = x.shape[0]
    out = x.reshape(rows, -1).clone()  # the caller's embeddings stay as they were
    try:
        native.t5_decoder_step(
            kernel,
            described.decoder,
            out,
            [(c.k, c.v) for c in cache.self_attn],
            cache.cross_kv,
            bias.contiguous(),  # (the position bias comes permuted)
            cache.cross_bias,
            start,
        )
    except ValueError:  # what it does not take (a full cache, a cache on another device): the layers
        return None
    return out.view(rows, 1, -1)


# ---- LLaMA decoders (native.llama_decoder_step) -----------------------------------------------------------


def _llama_parts(model: nn.Module) -> list[tuple[list, list[torch.Tensor | None]]]:
    """Per block of ``model`` (a LLaMA): its seven linear layers' ``native_linear()`` (in
    ``native.LLAMA_BLOCK_LINEARS`` order) and its two RMS norms' weights."""
    parts = []
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        modules = (attn.q, attn.k, attn.v, attn.out, mlp.wi_0, mlp.wi_1, mlp.wo)
        linears = [getattr(m, "native_linear", lambda: None)() for m in modules]
        parts.append((linears, [block.norm1.weight, block.norm2.weight]))
    return parts


def _llama_describe(
    model: nn.Module, parts: list[tuple[list, list[torch.Tensor | None]]], key: tuple
) -> _Described:
    """``model`` (a LLaMA) described from its ``parts``, or ``_Described(None, key)`` where it cannot run
    natively (another activation than SiLU, exact=True)."""
    cfg = model.cfg
    blocks = list(model.layers)
    eps = {norm.eps for block in blocks for norm in (block.norm1, block.norm2)}
    fast = all(block.attn.fast_kernels for block in blocks)
    if cfg.num_heads % cfg.num_kv_heads or cfg.activation != "silu" or not fast or len(eps) != 1:
        return _Described(None, key)
    return _describe_blocks(
        parts,
        key,
        native.LlamaStepBlock,
        native.LLAMA_BLOCK_LINEARS,
        native.LLAMA_BLOCK_NORMS,
        _gated_decoder(cfg, eps.pop()),
    )


def run_llama(
    model: nn.Module,
    x: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    cache,
    start,
) -> torch.Tensor | None:
    """Every layer of ``model`` (a LLaMA) over ``x`` (B, 1, D) for a decode step at position ``start``, in
    one native call: the hidden states before the final norm (a new tensor), or None where the native
    step does not apply (the caller then runs the layers; nothing was changed).

    ``cos_sin``: each row's rotation (B, 1, 1, Dh); ``mask``: the step's boolean (B, 1, 1, start + 1).
    """
    rows = x.shape[0]
    if (
        not _step_applies(x, cache, start)
        or mask.shape != (rows, 1, 1, start + 1)
        or (kernel := native.llama_decoder_step_kernel()) is None
    ):
        return None
    described = _description(
        model, cache[0], _llama_parts, lambda m: [b.attn for b in m.layers], _llama_describe
    )
    if described.decoder is None:
        return None
    out = x.reshape(rows, -1).clone()  # the caller's embeddings stay as they were
    cos, sin = (t.reshape(rows, -1).contiguous() for t in cos_sin)
    try:
        native.llama_decoder_step(
            kernel, described.decoder, out, [(c.k, c.v) for c in cache], mask.view(rows, -1), cos, sin, start
        )
    except ValueError:  # what it does not take (a full cache, say): the layers say why
        return None
    return out.view(rows, 1, -1)
