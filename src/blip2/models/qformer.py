"""The Q-Former: a post-LN BERT whose learned queries cross-attend to the image.

Shapes: ``B`` batch, ``Q`` queries, ``T`` text tokens, ``N`` image tokens, ``D`` width, ``H`` heads.
The sequence is ``queries ⊕ text``; the first ``Q`` positions are queries. Cross-attention to the
image happens on every ``cross_attention_every``-th layer (0, k, 2k, …) and for query positions
only; queries and text have separate feed-forwards. It runs in float32 whatever the rest runs in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import QFormerConfig
from .layers import MLP, Linear, attention, attention_weights, merge_heads, padding_mask, split_heads


class QFormerAttention(nn.Module):
    """Multi-head attention followed by BERT's output block: ``norm(x + proj(attn))``."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q = Linear(d, d)
        self.k = Linear(kv_dim, d)
        self.v = Linear(kv_dim, d)
        self.proj = Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = 0.0  # on the attention weights (training only; see QFormer.set_dropout)
        self.hidden_dropout = 0.0  # on the output projection, before the residual
        self.kept: list[torch.Tensor] | None = None  # weights go here (QFormer.keep_cross_attention)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = split_heads(self.q(x), self.num_heads)  # (B, H, T, D/H)
        k = split_heads(self.k(context), self.num_heads)
        v = split_heads(self.v(context), self.num_heads)
        dropout = self.dropout if self.training else 0.0
        if self.kept is None:
            out = merge_heads(attention(q, k, v, mask, dropout=dropout))
        else:
            weights = attention_weights(q, k, mask)  # (B, H, T, S)
            if torch.is_grad_enabled() and not weights.requires_grad:
                weights.requires_grad_()  # frozen weights upstream: still let callers differentiate here
            self.kept.append(weights)
            out = merge_heads(F.dropout(weights, dropout, self.training) @ v)
        out = F.dropout(self.proj(out), self.hidden_dropout, self.training)
        return self.norm(x + out)


class FeedForward(nn.Module):
    """BERT feed-forward with its residual and post-norm."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.mlp = MLP(cfg.hidden_size, cfg.mlp_size, cfg.activation)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.hidden_dropout = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + F.dropout(self.mlp(x), self.hidden_dropout, self.training))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attn = QFormerAttention(cfg, cfg.hidden_size)
        self.cross_attn = QFormerAttention(cfg, cfg.encoder_hidden_size) if has_cross_attention else None
        self.query_ffn = FeedForward(cfg)
        self.text_ffn = FeedForward(cfg) if cfg.has_text_input else None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        image: torch.Tensor | None,
        num_queries: int,
    ) -> torch.Tensor:
        x = self.self_attn(x, x, mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries > 0:
            if self.cross_attn is not None:
                if image is None:
                    raise ValueError("the Q-Former's queries need image features for cross-attention")
                queries = self.cross_attn(queries, image, None)
            parts.append(self.query_ffn(queries))
        if text.shape[1] > 0:
            if self.text_ffn is None:
                raise ValueError("this Q-Former has no text branch (the checkpoint was trained without one)")
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        if cfg.has_text_input:
            self.word_embed = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
            self.pos_embed = nn.Embedding(cfg.max_position_embeddings, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, has_cross_attention=(i % cfg.cross_attention_every == 0))
            for i in range(cfg.num_layers)
        )
        self.gradient_checkpointing = False
        self.hidden_dropout = 0.0

    def set_dropout(self, hidden: float = 0.1, attention: float = 0.1) -> None:
        """BERT's dropout for training (0 at load; it only ever acts in ``train()`` mode): ``hidden`` after
        the embedding norm and on each attention / feed-forward output, ``attention`` on attention weights."""
        self.hidden_dropout = hidden
        for m in self.modules():
            if isinstance(m, QFormerAttention):
                m.dropout, m.hidden_dropout = attention, hidden
            elif isinstance(m, FeedForward):
                m.hidden_dropout = hidden

    @contextmanager
    def keep_cross_attention(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, every forward appends each cross-attention layer's weights over the image
        tokens, (B, H, Q, N), in layer order, to the list it yields. They are computed explicitly (SDPA
        keeps none) and, when grad is enabled, are part of the graph: a score computed from the output
        can be differentiated with respect to them (Grad-CAM). Outside the block nothing is kept."""
        kept: list[torch.Tensor] = []
        modules = [layer.cross_attn for layer in self.layers if layer.cross_attn is not None]
        for m in modules:
            m.kept = kept
        try:
            yield kept
        finally:
            for m in modules:
                m.kept = None

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) word + absolute position embeddings."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embed(input_ids) + self.pos_embed(positions)[None]

    def forward(
        self,
        queries: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``queries ⊕ text`` through the layers.

        queries: (B, Q, D) learned query embeddings, or None for text alone.
        image: (B, N, D_vision) image features (needed when there are queries).
        input_ids / attention_mask: (B, T) text and its 0/1 padding mask.
        self_attn_mask: an explicit boolean (B, 1, Q+T, Q+T) mask (e.g. the generation-loss mask);
            by default every position sees every non-padding position.
        Returns (B, Q+T, D).
        """
        dtype = self.norm.weight.dtype
        parts = []
        num_queries = 0
        if queries is not None:
            parts.append(queries.to(dtype))
            num_queries = queries.shape[1]
        if input_ids is not None:
            parts.append(self.embed_text(input_ids).to(dtype))
        if not parts:
            raise ValueError("the Q-Former needs queries, text, or both")
        x = self.norm(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        x = F.dropout(x, self.hidden_dropout, self.training)
        if image is not None:
            image = image.to(dtype)

        mask = self_attn_mask
        if mask is None and attention_mask is not None:
            b = x.shape[0]
            full = attention_mask
            if num_queries:
                ones = torch.ones(b, num_queries, dtype=attention_mask.dtype, device=attention_mask.device)
                full = torch.cat([ones, attention_mask], dim=1)
            mask = padding_mask(full)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, image, num_queries, use_reentrant=False)
            else:
                x = layer(x, mask, image, num_queries)
        return x
