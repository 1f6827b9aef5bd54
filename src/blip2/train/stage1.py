"""Stage 1, representation learning on a retrieval checkpoint: ITC + ITM + ITG, summed (as LAVIS's BLIP-2).

- ITC: image–text similarity = max over queries of the cosine of the projected query and [CLS] features,
  divided by a learnable temperature (init 0.07, clamped to 0.001..0.5); cross-entropy both ways with
  label smoothing 0.1. Features are gathered across ranks (with gradient) under DDP.
- ITM: for every example one hard negative image for its text and one hard negative text for its
  image, each drawn from softmax(similarity) with the positive and every other caption of the same image
  excluded; 2-way head averaged over queries; labels [1]*B + [0]*2B.
- ITG: the Q-Former generates the caption from the queries: queries attend to queries only, text to all
  queries and causally to earlier text; the first text token is the tokenizer's BOS ([DEC]) when it has
  one, else its [CLS]. A BERT LM head (dense, activation, LayerNorm, decoder tied to the Q-Former's word
  embeddings, with its own bias) scores the next token; cross-entropy with label smoothing 0.1 as LAVIS.
  The head and the temperature are not part of the hub layout: they live in the training state.

Shapes: ``B`` local batch, ``A`` batch over all ranks, ``Q`` queries, ``T`` text tokens, ``E`` ITC width.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models.config import QFormerConfig
from ..models.layers import activation
from .data import Batch
from .loop import Stage, gather

LABEL_SMOOTHING = 0.1


# ---- the losses, as functions of tensors ---------------------------------------------------------------


def itc_similarities(
    image_feats: torch.Tensor, text_feats: torch.Tensor, image_all: torch.Tensor, text_all: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (B, Q, E) / (B, E) features against all ranks' (A, Q, E) / (A, E): max over queries.
    Returns (image→text (B, A), text→image (B, A)) cosine similarities (features are normalised)."""
    i2t = torch.einsum("bqe,ae->baq", image_feats, text_all).amax(-1)
    t2i = torch.einsum("be,aqe->baq", text_feats, image_all).amax(-1)
    return i2t, t2i


def itc_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, temp: torch.Tensor, offset: int = 0
) -> torch.Tensor:
    """Mean of the two directions' smoothed cross-entropy; example b's positive is column ``offset + b``."""
    targets = torch.arange(sim_i2t.shape[0], device=sim_i2t.device) + offset
    return (
        F.cross_entropy(sim_i2t / temp, targets, label_smoothing=LABEL_SMOOTHING)
        + F.cross_entropy(sim_t2i / temp, targets, label_smoothing=LABEL_SMOOTHING)
    ) / 2


def negative_weights(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """(B, A) similarities (already over the temperature) and (B, A) same-image mask -> sampling
    weights for hard negatives: softmax with the excluded entries at zero. A row with nothing left
    (the whole batch is one image) falls back to uniform: there is no true negative to find."""
    weights = torch.softmax(sim.float().masked_fill(same, float("-inf")), dim=1)
    empty = same.all(dim=1)
    if empty.any():
        weights[empty] = 1.0 / sim.shape[1]
    return weights


def itg_attention_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) text padding mask -> boolean (B, 1, Q+T, Q+T): queries see queries; text sees every query
    and itself and the earlier (non-padding) text."""
    b, t = text_mask.shape
    q = num_queries
    device = text_mask.device
    allowed = torch.zeros(b, q + t, q + t, dtype=torch.bool, device=device)
    allowed[:, :q, :q] = True
    allowed[:, q:, :q] = True
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    allowed[:, q:, q:] = causal[None] & text_mask.bool()[:, None, :]
    allowed[:, q:, q:] |= torch.eye(t, dtype=torch.bool, device=device)[None]  # padding rows see themselves
    return allowed[:, None]


def itg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits at text positions and (B, T) labels (-100 = none): next-token cross-entropy."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(
        shifted, labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=LABEL_SMOOTHING
    )


class TextHead(nn.Module):
    """BERT's LM head for ITG: transform (dense, activation, LayerNorm) then the tied word embeddings."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.activation)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor, word_embed: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.act(self.dense(hidden))), word_embed, self.bias)


def key_ids(keys: list[str], device) -> torch.Tensor:
    """Image identities as int64 (for the same-image mask across ranks)."""
    ids = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=7).digest(), "little") for k in keys]
    return torch.tensor(ids, dtype=torch.long, device=device)


# ---- the stage ---------------------------------------------------------------------------------------------


class Stage1(Stage):
    def __init__(self, model, processor, opts):
        super().__init__(model, processor, opts)
        if not model.cfg.retrieval or not model.cfg.qformer.has_text_input:
            raise InputError(
                "stage 1 trains a retrieval checkpoint (Blip2ForImageTextRetrieval, with the Q-Former's text "
                "branch, e.g. Salesforce/blip2-itm-vit-g); this one is a generation checkpoint: use --stage 2"
            )
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.text_head = TextHead(model.cfg.qformer)
        tok = processor.tokenizer
        dec = tok.bos_token_id if tok.bos_token_id is not None else tok.token_to_id("[DEC]")
        cls = tok.token_to_id(tok.special_tokens.get("cls_token"))
        self.dec_id = dec if dec is not None else cls
        if self.dec_id is None:
            raise InputError("the Q-Former tokenizer has neither a BOS/[DEC] nor a [CLS] token for ITG")

    def trainable(self) -> list[str]:
        prefixes = ("queries", "qformer.", "vision_proj.", "text_proj.", "itm_head.")
        return [n for n, _ in self.model.named_parameters() if n.startswith(prefixes)]

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.processor.tokenizer
        ids = tok.encode(texts, max_length=self.opts.max_text_len)
        # equal widths on every rank so that ids can be gathered
        return tok.pad(ids, padding_side="right", length=self.opts.max_text_len if self.world > 1 else None)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.model
        device = self.device
        ids, mask = (t.to(device) for t in self.tokenize(batch.texts))
        b, q = ids.shape[0], m.cfg.num_query_tokens
        vision = self.encode_image(batch.pixels.to(device))  # (B, N, Dv)
        query_out = self.query_outputs(vision)  # (B, Q, D)

        # ITC
        image_feats = m.image_embeddings(query_out)  # (B, Q, E)
        text_feats = m.text_embeddings(ids, mask)  # (B, E)
        image_all, offset = gather(image_feats)
        text_all, _ = gather(text_feats)
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        sim_i2t, sim_t2i = itc_similarities(
            image_feats.float(), text_feats.float(), image_all.float(), text_all.float()
        )
        loss_itc = itc_loss(sim_i2t, sim_t2i, self.temp, offset)

        # ITM with hard negatives mined from the similarities
        keys = key_ids(batch.keys, device)
        keys_all, _ = gather(keys)
        ids_all, _ = gather(ids)
        mask_all, _ = gather(mask)
        vision_all, _ = gather(vision)
        with torch.no_grad():
            same = keys[:, None] == keys_all[None, :]  # (B, A)
            neg_image = torch.multinomial(negative_weights(sim_t2i / self.temp, same), 1).squeeze(1)
            neg_text = torch.multinomial(negative_weights(sim_i2t / self.temp, same), 1).squeeze(1)
        itm_ids = torch.cat([ids, ids, ids_all[neg_text]])
        itm_mask = torch.cat([mask, mask, mask_all[neg_text]])
        itm_vision = torch.cat([vision, vision_all[neg_image], vision])
        itm_logits = m.itm_logits(itm_vision, itm_ids, itm_mask)  # (3B, 2)
        itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(device)
        loss_itm = F.cross_entropy(itm_logits.float(), itm_labels)

        # ITG: the caption from the queries, [DEC] first
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_id
        labels = dec_ids.masked_fill(mask == 0, -100)
        queries = m.queries.expand(b, -1, -1)
        out = m.qformer(
            queries=queries, image=vision, input_ids=dec_ids, self_attn_mask=itg_attention_mask(q, mask)
        )
        logits = self.text_head(out[:, q:], m.qformer.word_embed.weight)  # (B, T, V)
        loss_itg = itg_loss(logits, labels)

        loss = loss_itc + loss_itm + loss_itg
        return loss, {"itc": loss_itc.detach(), "itm": loss_itm.detach(), "itg": loss_itg.detach()}
