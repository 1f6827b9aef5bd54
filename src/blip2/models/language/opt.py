"""OPT decoder-only language model.

Shapes: ``B`` batch, ``T`` new positions, ``S`` all positions so far (cache + new), ``D`` width,
``H`` heads. Learned positions with OPT's offset of 2, taken from the attention mask's cumulative
sum so that left padding does not shift them; pre-LN blocks (post-LN for the 350m shape), ReLU,
``lm_head`` tied to the token embedding unless the checkpoint carries its own.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import decoder_step
from ..config import OPTConfig
from ..layers import (
    MLP,
    KVCache,
    Linear,
    cached_attention,
    causal_mask,
    decoder_mask,
    layer_caches,
    merge_heads,
    run_layer,
    split_heads,
    window,
)

POSITION_OFFSET = 2  # OPT reserves the first two rows of its position table


class OPTAttention(nn.Module):
    fast_kernels: bool = True  # False (exact=True): decode steps keep PyTorch's fused attention kernel

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.scale = (d // cfg.num_heads) ** -0.5
        self.q = Linear(d, d, bias=cfg.bias)
        self.k = Linear(d, d, bias=cfg.bias)
        self.v = Linear(d, d, bias=cfg.bias)
        self.out = Linear(d, d, bias=cfg.bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, start: int | torch.Tensor
    ) -> torch.Tensor:
        q = split_heads(self.q(x), self.num_heads)  # (B, H, T, D/H)
        k = split_heads(self.k(x), self.num_heads)
        v = split_heads(self.v(x), self.num_heads)
        # keys and values go into the cache, if any, and q attends to all so far: (B, H, S, D/H). OPT
        # scales the query before the product (q_scale); kept in that order for identical rounding.
        attended = cached_attention(
            q, k, v, cache, start, mask, scale=1.0, row_invariant=self.fast_kernels, q_scale=self.scale
        )
        return self.out(merge_heads(attended))


class OPTBlock(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.norm_affine)
        self.attn = OPTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.norm_affine)
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_size, cfg.activation, bias=cfg.bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: KVCache | None, start: int | torch.Tensor
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), mask, cache, start)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, mask, cache, start))
        return self.norm2(x + self.mlp(x))


class OPT(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, e, padding_idx=cfg.pad_token_id)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, d)
        self.project_in = Linear(e, d, bias=False) if e != d else None
        self.project_out = Linear(d, e, bias=False) if e != d else None
        self.layers = nn.ModuleList(OPTBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d, elementwise_affine=cfg.norm_affine) if cfg.final_norm else None
        self.lm_head = Linear(e, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    @property
    def hidden_size(self) -> int:
        return self.cfg.word_embed_proj_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def new_cache(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None
    ) -> list[KVCache]:
        """Per-layer caches (``layers.layer_caches``)."""
        h = self.cfg.num_heads
        dtype = dtype or self.embed_positions.weight.dtype
        return layer_caches(self.layers, batch, h, max_len, self.cfg.hidden_size // h, dtype, device)

    @staticmethod
    def positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) 0/1 mask -> (B, S) position ids counting real tokens only (padding gets -1)."""
        return (attention_mask.long().cumsum(1) * attention_mask.long() - 1).clamp_min(-1)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Hidden states (B, T, E) for new positions [start, start+T).

        attention_mask: (B, start+T) 0/1 over every position so far (cache included).
        cache: per-layer KV caches from ``new_cache``, or None to run without one.
        start: an int, or a 0-dim tensor for a decode step of static shapes (``attention_mask`` then
        covers every position the cache holds; see ``layers.window``).
        """
        t = inputs_embeds.shape[1]
        attention_mask = decoder_mask(inputs_embeds, attention_mask, cache, start)
        positions = window(self.positions(attention_mask), start, t)
        x = inputs_embeds
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET).to(x.dtype)
        mask = causal_mask(attention_mask, start, t)  # (B, 1, T, S)
        # a decode step runs every layer in one native call where it can (in place), else layer by layer
        if not decoder_step.run(self, x, mask, cache, start):
            for i, layer in enumerate(self.layers):
                layer_cache = cache[i] if cache is not None else None
                x = run_layer(self, layer, x, mask, layer_cache, start)
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
