"""Shared primitives: activations, norms, feed-forwards, attention over SDPA, a static KV cache.

Nothing here knows which model it serves. Shapes: ``B`` batch, ``H`` heads, ``T`` query length,
``S`` key length, ``D`` width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import native


def _onednn_linear_available() -> bool:
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    return op is not None and torch.backends.mkldnn.is_available()


_ONEDNN_LINEAR = _onednn_linear_available()

# Up to this many rows the native kernel beats oneDNN's on this project's 2-core AVX2 machine: 1.7x at
# 4 rows, where a linear layer is bound by reading its weight, on par at 256 (bench/README.md).
# Where oneDNN has AVX-512 its compute-bound kernels are twice as wide: there only the
# bandwidth-bound few rows are kept (not measured on such a machine).
SKINNY_MAX_ROWS = 256 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 16


class Linear(nn.Linear):
    """``nn.Linear`` whose float32 CPU inference runs on faster kernels than ``F.linear``'s.

    MKL's ``sgemm`` (what ``F.linear`` calls) copies the whole weight into its packed layout on every
    call with a few rows, so a decode step over 4 sequences reads and writes each weight three times.
    Up to ``SKINNY_MAX_ROWS`` rows the native kernel of ``blip2.native`` reads each weight once at
    nearly the memory bandwidth; more rows go to oneDNN's matmul (also no repacking; on par with
    ``sgemm`` at a ViT's ~1000 rows). Either is the same arithmetic in another summation order:
    float32 rounding, ~1e-6 relative, the size of a one-ulp change of the input.
    ``fast_kernels = False`` (what ``blip2.load(..., exact=True)`` sets) keeps the reference's
    kernel, for bit-for-bit equal logits. Training (anything needing a gradient), other dtypes and
    devices take ``F.linear``.
    """

    fast_kernels: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            self.fast_kernels
            and x.dtype == torch.float32
            and weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):
            if (
                x.numel() <= SKINNY_MAX_ROWS * self.in_features
                and self.in_features % 8 == 0
                and (kernel := native.skinny_linear_kernel()) is not None
            ):
                try:
                    return native.skinny_linear(x, weight, self.bias, kernel)
                except ValueError:  # a shape or layout it does not take (it checks): the kernels below
                    pass
            if _ONEDNN_LINEAR:
                try:
                    return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
                except RuntimeError:  # a build whose oneDNN cannot run this: the plain kernel from now on
                    _disable_onednn()
        return F.linear(x, weight, self.bias)


def _disable_onednn() -> None:
    global _ONEDNN_LINEAR
    _ONEDNN_LINEAR = False


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
) -> torch.Tensor:
    """Scaled dot-product attention over (B, H, T, Dh) / (B, H, S, Dh).

    ``mask`` is boolean (True = attend) or additive float, broadcastable to (B, H, T, S).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax weights (B, H, T, S) that :func:`attention` applies to the values, written out for
    callers that need them (SDPA keeps none); ``weights @ v`` is then the attention output."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1)


def padding_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """A (B, S) 0/1 key mask -> boolean (B, 1, 1, S) for bidirectional attention."""
    return key_mask.bool()[:, None, None, :]


def causal_mask(key_mask: torch.Tensor, query_start: int, query_len: int) -> torch.Tensor:
    """Causal + padding mask: boolean (B, 1, T, S) where query i sits at absolute position query_start + i.

    A query with no visible key (a padding position) is let attend to itself, so that SDPA never
    produces NaN there; such positions are padding and their outputs are never used.
    """
    s = key_mask.shape[1]
    device = key_mask.device
    q_pos = torch.arange(query_start, query_start + query_len, device=device)[:, None]
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

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, T, Dh) at positions [start, start+T) and return keys/values [0, start+T)."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): row i becomes old row index[i]."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


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
    inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: list | None, start: int
) -> torch.Tensor:
    """A decoder call's (B, start+T) 0/1 mask over every position so far: all ones when not given.
    Positions before ``start`` must be in ``cache``."""
    b, t, _ = inputs_embeds.shape
    if cache is None and start:
        raise ValueError("start > 0 needs a cache holding the earlier positions")
    if attention_mask is None:
        attention_mask = torch.ones(b, start + t, dtype=torch.long, device=inputs_embeds.device)
    return attention_mask


def run_layer(owner: nn.Module, layer: nn.Module, *args) -> torch.Tensor:
    """``layer(*args)``, recomputed in the backward pass when ``owner`` trains with gradient checkpointing."""
    if getattr(owner, "gradient_checkpointing", False) and owner.training:
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)
