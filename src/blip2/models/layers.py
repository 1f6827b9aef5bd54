"""Shared primitives: activations, norms, feed-forwards, attention over SDPA, a static KV cache.

Nothing here knows which model it serves. Shapes: ``B`` batch, ``H`` heads, ``T`` query length,
``S`` key length, ``D`` width.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..errors import InputError

log = logging.getLogger(__name__)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_unusable() -> str | None:
    """Why oneDNN's matmul cannot run in this build, or None if it can (tried once on a small case)."""
    if (
        getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None
        or not torch.backends.mkldnn.is_available()
    ):
        return "not in this PyTorch build"
    x, weight, bias = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    try:
        ok = torch.allclose(_onednn_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    except RuntimeError as e:
        return f"it failed: {e}"
    return None if ok else "it gave wrong results"


@functools.cache
def float32_kernel() -> tuple[str, object]:
    """The kernel of float32 CPU inference, chosen once per process and logged: ``("native", kernel)``,
    else ``("onednn", None)``, else ``("F.linear", None)``."""
    kernel = native.skinny_linear_kernel()
    if kernel is not None:
        log.info("float32 linear layers run on the native %s kernel", native.kernel_kind())
        return "native", kernel
    reason = _onednn_unusable()
    if reason is None:
        log.info(
            "float32 linear layers run on oneDNN (no native kernel: see above); "
            "a row's last bits can then depend on the rows computed with it"
        )
        return "onednn", None
    log.warning("float32 linear layers run on F.linear: oneDNN's matmul is unusable here, %s", reason)
    return "F.linear", None


class Linear(nn.Linear):
    """``nn.Linear`` whose float32 CPU inference runs on a faster kernel than ``F.linear``'s, the same
    for every row count.

    MKL's ``sgemm`` (what ``F.linear`` calls) copies the whole weight into its packed layout on every
    call with a few rows, so a decode step over 4 sequences reads and writes each weight three times.
    The native kernel of ``blip2.native`` reads each weight once at nearly the memory bandwidth for a
    few rows and is on par with oneDNN's for many (an image encoder). It computes each output element
    the same way whatever else is in the call, so a row's result is the same bits alone or in any
    batch; BLAS kernels (``sgemm``, oneDNN) block by the shape of the call and round a row
    differently in different batches. Without the native kernel, oneDNN's (no repacking) runs
    instead. Either rounds differently from ``sgemm`` (~1e-6 relative, the size of a one-ulp change
    of the input). ``fast_kernels = False`` (what ``blip2.load(..., exact=True)`` sets) keeps the
    reference's kernel, for bit-for-bit equal logits. Training (anything needing a gradient), other
    dtypes and devices take ``F.linear``. An input of the wrong width is an ``InputError``.
    """

    fast_kernels: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise InputError(
                f"a linear layer of input width {self.in_features} was given an input of shape {tuple(x.shape)}"
            )
        weight = self.weight
        if (
            self.fast_kernels
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):
            name, kernel = float32_kernel()
            if name == "native":
                try:
                    return native.skinny_linear(x, weight, self.bias, kernel)
                except ValueError:  # a weight or bias it does not take (strided, another dtype): F.linear
                    pass
            elif name == "onednn":
                return _onednn_linear(x, weight, self.bias)
        return F.linear(x, weight, self.bias)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Two linear layers with an activation between: ``fc2(act(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=bias)
        self.fc2 = Linear(hidden, out_dim or dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """Gated feed-forward (T5 v1.1, LLaMA's SwiGLU): ``wo(act(wi_0 x) * wi_1 x)``, no biases by default."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False):
        super().__init__()
        self.wi_0 = Linear(dim, hidden, bias=bias)
        self.wi_1 = Linear(dim, hidden, bias=bias)
        self.wo = Linear(hidden, dim, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x)
        # Flan-T5 checkpoints are often run with `wo` kept in float32 while the rest is half.
        weight = getattr(self.wo, "weight", None)  # absent on int8 layers, which take any float input
        if weight is not None and weight.is_floating_point() and h.dtype != weight.dtype:
            h = h.to(weight.dtype)
        return self.wo(h)


class RMSNorm(nn.Module):
    """T5's norm: scale only, no mean subtraction; the variance is accumulated in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H*Dh) -> (B, H, T, Dh)"""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, T, H*Dh)"""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    row_invariant: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, Dh) / (B, H, S, Dh).

    ``mask`` is boolean (True = attend) or additive float, broadcastable to (B, H, T, S).
    A float32 CPU decode step (T = 1) goes through ``_one_query_attention`` unless ``row_invariant``
    is False: PyTorch's fused CPU kernel rounds a single query differently by which thread takes
    it, so a row's result would depend on the batch it is in (its other shapes do not).
    """
    if (
        row_invariant
        and q.shape[-2] == 1
        and q.dtype == torch.float32
        and q.device.type == "cpu"
        and dropout == 0.0
    ):
        return _one_query_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache | None,
    start: int | torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    row_invariant: bool = True,
    q_scale: float | None = None,
) -> torch.Tensor:
    """:func:`attention` of ``q`` (times ``q_scale`` if given) over the keys and values so far: ``k``,
    ``v`` (B, H, T, Dh) are first written into ``cache`` at ``start`` (when there is one). A float32
    CPU decode step does it all in one native call (``blip2.native.decode_attention``) where it can;
    otherwise ``cache.write``, then :func:`attention`."""
    if (
        cache is not None
        and row_invariant
        and isinstance(start, int)
        and q.shape[-2] == 1
        and q.dtype == torch.float32
        and q.device.type == "cpu"
        and (kernel := _decode_attention_kernel(q, k, v)) is not None
    ):
        try:
            new = (k, v, start)
            return native.decode_attention(q, cache.k, cache.v, mask, scale, kernel, new=new, q_scale=q_scale)
        except ValueError:  # what the kernel does not take (or a full cache): the general path says why
            pass
    if q_scale is not None:
        q = q * q_scale
    if cache is not None:
        k, v = cache.write(k, v, start)
    return attention(q, k, v, mask, scale, row_invariant=row_invariant)


def positions_from(start: int | torch.Tensor, length: int, device=None) -> torch.Tensor:
    """(length,) absolute positions start, start+1, ...; ``start`` an int or a 0-dim tensor."""
    device = start.device if isinstance(start, torch.Tensor) else device
    return torch.arange(length, device=device) + start


def window(x: torch.Tensor, start: int | torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """Positions [start, start+length) of ``x`` along ``dim``.

    ``start`` is an int, or a 0-dim tensor on ``x``'s device: a decode step whose shapes and Python
    values do not change from step to step, so that it can be captured once and replayed (CUDA graphs).
    """
    if isinstance(start, torch.Tensor):
        return x.index_select(dim, positions_from(start, length))
    return x.narrow(dim, start, length)


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (where a placement put it)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    raise ValueError(f"{type(module).__name__} holds no tensors: it has no device")


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax weights (B, H, T, S) that :func:`attention` applies to the values, written out for
    callers that need them (SDPA keeps none); ``weights @ v`` is then the attention output."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1)


def _one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with each (row, head) its own product: the native kernel
    (one call for all of them, ``blip2.native.decode_attention``) where it is built and takes the
    inputs, else plain batched matmuls."""
    kernel = _decode_attention_kernel(q, k, v)
    if kernel is not None:
        try:
            return native.decode_attention(q, k, v, mask, scale, kernel)
        except ValueError:  # shapes, dtypes or masks it does not take: the matmuls
            pass
    return native.reference_attention(q, k, v, mask, scale)


def encoder_self_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor | None:
    """Unmasked self-attention from a fused q/k/v projection's output (B, N, 3 * heads * Dh), the heads
    merged (B, N, heads * Dh), on the native kernel (``blip2.native.encoder_attention``): None where it
    does not run (not float32 on the CPU, a gradient wanted, no kernel built); callers then take
    :func:`attention`."""
    if qkv.dtype != torch.float32 or qkv.device.type != "cpu" or _gradient_wanted(qkv):
        return None
    kernel = native.encoder_attention_kernel()
    if kernel is None:
        return None
    try:
        return native.encoder_attention(qkv, heads, None, kernel)
    except ValueError:  # shapes it does not take: the general path
        return None


def _gradient_wanted(*tensors: torch.Tensor) -> bool:
    """Whether autograd records these tensors' use (the native kernels compute no gradient)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _decode_attention_kernel(*tensors: torch.Tensor):
    """The native decode-attention kernel where it is built and no gradient is wanted, else None."""
    return None if _gradient_wanted(*tensors) else native.decode_attention_kernel()


def padding_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """A (B, S) 0/1 key mask -> boolean (B, 1, 1, S) for bidirectional attention."""
    return key_mask.bool()[:, None, None, :]


def causal_mask(key_mask: torch.Tensor, query_start: int | torch.Tensor, query_len: int) -> torch.Tensor:
    """Causal + padding mask: boolean (B, 1, T, S) where query i sits at absolute position query_start + i
    (``query_start`` may be a 0-dim tensor: see :func:`window`).

    A query with no visible key (a padding position) is let attend to itself, so that SDPA never
    produces NaN there; such positions are padding and their outputs are never used.
    """
    s = key_mask.shape[1]
    device = key_mask.device
    q_pos = (torch.arange(query_len, device=device) + query_start)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None] & key_mask.bool()[:, None, :]  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


class KVCache:
    """Static per-layer key/value storage, written by position: (B, H, S_max, Dh)."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        self.k = torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(
        self, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, Dh) at positions [start, start+T) and return keys/values [0, start+T).

        A 0-dim tensor ``start`` (a decode step of static shapes, see :func:`window`) returns every
        position the cache holds: the causal mask hides those not written yet.
        """
        if isinstance(start, torch.Tensor):
            index = positions_from(start.to(self.k.device), k.shape[2])
            self.k.index_copy_(2, index, k)
            self.v.index_copy_(2, index, v)
            return self.k, self.v
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i]."""
        index = index.to(self.k.device)
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)

    def reorder_(self, index: torch.Tensor) -> None:
        """As :meth:`reorder`, in place: the storage stays where it is (a captured decode step reads it)."""
        index = index.to(self.k.device)
        self.k.copy_(self.k.index_select(0, index))
        self.v.copy_(self.v.index_select(0, index))


def layer_caches(
    layers: nn.ModuleList,
    batch: int,
    heads: int,
    max_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device=None,
) -> list[KVCache]:
    """One cache per layer, each on its layer's device (a placement may split the layers) unless
    ``device`` is given."""
    return [KVCache(batch, heads, max_len, head_dim, dtype, device or device_of(layer)) for layer in layers]


def normal_init_(module: nn.Module, std: float = 0.02) -> None:
    """Plain initialisation for modules built outside a checkpoint (training from scratch)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def decoder_mask(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: list | None,
    start: int | torch.Tensor,
) -> torch.Tensor:
    """A decoder call's (B, start+T) 0/1 mask over every position so far: all ones when not given.
    Positions before ``start`` must be in ``cache``. A tensor ``start`` (a static-shape decode step,
    see :func:`window`) comes with its mask."""
    b, t, _ = inputs_embeds.shape
    if cache is None and not isinstance(start, torch.Tensor) and start:
        raise ValueError("start > 0 needs a cache holding the earlier positions")
    if attention_mask is None:
        attention_mask = torch.ones(b, start + t, dtype=torch.long, device=inputs_embeds.device)
    return attention_mask


def run_layer(owner: nn.Module, layer: nn.Module, *args) -> torch.Tensor:
    """``layer(*args)``, recomputed in the backward pass when ``owner`` trains with gradient checkpointing."""
    if getattr(owner, "gradient_checkpointing", False) and owner.training:
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)
