"""BLIP-2 composed: vision → Q-Former → projection → language model, plus the retrieval heads.

Shapes: ``B`` batch, ``N`` image tokens, ``Q`` queries, ``T`` text tokens, ``D`` width.
``image_features`` is the one place the image pipeline is written; generation, retrieval,
features and training all call it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .config import Blip2Config
from .language.llama import Llama
from .language.opt import OPT
from .language.t5 import T5
from .layers import Linear
from .qformer import QFormer
from .vision import VisionTransformer

_LANGUAGE_MODELS = {"opt": OPT, "t5": T5, "llama": Llama}


class ImageFeatures(NamedTuple):
    vision: torch.Tensor  # (B, N, D_vision) post-layernorm features of every image token
    qformer: torch.Tensor  # (B, Q, D_qformer) query outputs, float32
    prefix: torch.Tensor | None  # (B, Q, D_lm) projected image prefix; None for retrieval models


class Blip2Output(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class Blip2(nn.Module):
    def __init__(self, cfg: Blip2Config):
        super().__init__()
        self.cfg = cfg
        q = cfg.qformer
        self.vision = VisionTransformer(cfg.vision)
        self.queries = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, q.hidden_size))
        self.qformer = QFormer(q)
        self.language_model: OPT | T5 | Llama | None = None
        if cfg.retrieval:
            self.vision_proj = Linear(q.hidden_size, cfg.image_text_hidden_size)
            self.text_proj = Linear(q.hidden_size, cfg.image_text_hidden_size)
            self.itm_head = Linear(q.hidden_size, 2)
        else:
            lm = _LANGUAGE_MODELS[cfg.text.kind](cfg.text)
            self.projection = Linear(q.hidden_size, lm.hidden_size)
            self.language_model = lm

    # ---- image side -------------------------------------------------------------------------

    def image_features(
        self,
        pixel_values: torch.Tensor,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> ImageFeatures:
        """(B, 3, S, S) pixels -> vision output, Q-Former output and (for generation models) the prefix.

        InstructBLIP: ``instruction_ids`` / ``instruction_mask`` (B, T), the prompt in the Q-Former's own
        vocabulary, are read by the Q-Former beside its queries (self-attention over both; only the
        queries cross-attend to the image and come out).
        """
        return self.query_features(self.vision(pixel_values), instruction_ids, instruction_mask)

    def query_features(
        self,
        vision: torch.Tensor,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> ImageFeatures:
        """The rest of :meth:`image_features` from the vision output (B, N, D_vision): the Q-Former's
        queries read it (with the instruction, InstructBLIP), and (generation models) their projection
        is the prefix."""
        queries = self.queries.expand(vision.shape[0], -1, -1)
        if self.cfg.instruction_aware:
            if instruction_ids is None:
                raise InputError(
                    "an InstructBLIP model needs the instruction's Q-Former tokens (qformer_input_ids)"
                )
            limit = self.cfg.qformer.max_position_embeddings
            if instruction_ids.shape[1] > limit:
                raise InputError(
                    f"the instruction is {instruction_ids.shape[1]} Q-Former tokens long; "
                    f"the Q-Former's context holds {limit}"
                )
            if instruction_mask is None:
                instruction_mask = torch.ones_like(instruction_ids)
            out = self.qformer(
                queries=queries, image=vision, input_ids=instruction_ids, attention_mask=instruction_mask
            )
            query_out = out[:, : queries.shape[1]]  # float32
        else:
            query_out = self.qformer(queries=queries, image=vision)  # float32
        prefix = None
        if self.language_model is not None:
            prefix = self.projection(query_out.to(self.projection.weight.dtype))
        return ImageFeatures(vision, query_out, prefix)

    def image_prefix(
        self,
        pixel_values: torch.Tensor,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 3, S, S) -> (B, Q, D_lm): what the language model sees of the image (and instruction)."""
        prefix = self.image_features(pixel_values, instruction_ids, instruction_mask).prefix
        if prefix is None:
            raise InputError(
                "this is a retrieval checkpoint: it has no language model to feed an image prefix"
            )
        return prefix

    # ---- language side ----------------------------------------------------------------------

    def _lm(self) -> OPT | T5 | Llama:
        if self.language_model is None:
            raise InputError("this is a retrieval checkpoint: it has no language model")
        return self.language_model

    def merge_prefix(
        self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed ``input_ids`` and put the image prefix in: into its ``<image>`` slots when the prompt has
        them, else in front (older configs and plain prompts). Returns (embeds, attention_mask)."""
        lm = self._lm()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_token = self.cfg.image_token_index
        slots = (input_ids == image_token) if image_token is not None else None
        if slots is not None and slots.any():
            counts = slots.sum(1)
            q = prefix.shape[1]
            if not bool((counts == q).all()):
                raise InputError(
                    f"each prompt must hold exactly {q} <image> tokens (one per query), got {counts.tolist()}"
                )
            embeds = lm.embed(input_ids.masked_fill(slots, 0))
            embeds = embeds.masked_scatter(slots[..., None], prefix.to(embeds.dtype))
            return embeds, attention_mask
        embeds = lm.embed(input_ids)
        embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return embeds, torch.cat([ones, attention_mask], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_prefix: torch.Tensor | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> Blip2Output:
        """Logits of the language model for a prompt conditioned on the image.

        OPT: logits over every input position (the prefix positions too when it is prepended).
        T5: logits over ``decoder_input_ids`` (shifted ``labels`` when only labels are given).
        ``labels`` (-100 = ignored) give the mean cross-entropy of the next token (OPT) / target (T5).
        ``qformer_input_ids`` / ``qformer_attention_mask``: InstructBLIP's instruction for the Q-Former.
        """
        lm = self._lm()
        if input_ids is None:
            raise InputError("forward needs input_ids (the tokenized prompt)")
        if image_prefix is None:
            if pixel_values is None:
                raise InputError("forward needs pixel_values or a precomputed image_prefix")
            image_prefix = self.image_prefix(pixel_values, qformer_input_ids, qformer_attention_mask)
        embeds, mask = self.merge_prefix(image_prefix, input_ids, attention_mask)
        if not isinstance(lm, T5):  # decoder-only
            logits = lm.logits(lm(embeds, mask))
            loss = None
            if labels is not None:
                shifted = logits[:, -labels.shape[1] :][:, :-1]
                loss = F.cross_entropy(
                    shifted.reshape(-1, shifted.shape[-1]).float(),
                    labels[:, 1:].reshape(-1),
                    ignore_index=-100,
                )
            return Blip2Output(logits, loss)
        if decoder_input_ids is None:
            if labels is None:
                raise InputError("a T5 model needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        enc = lm.encode(embeds, mask)
        hidden = lm.decode(lm.embed(decoder_input_ids), enc, mask, decoder_attention_mask)
        logits = lm.logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
            )
        return Blip2Output(logits, loss)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """T5 teacher forcing: decoder input = [start] + labels[:-1], with ignored (-100) positions as pad."""
        cfg = self.cfg.text
        start = torch.full_like(labels[:, :1], cfg.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, cfg.pad_token_id or 0)

    # ---- retrieval (Blip2ForImageTextRetrieval layout) -------------------------------------------

    def _retrieval(self) -> None:
        if not self.cfg.retrieval:
            raise InputError(
                "ITM/ITC need a retrieval checkpoint (Blip2ForImageTextRetrieval, e.g. blip2-itm-vit-g)"
            )

    def image_embeddings(self, query_out: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) Q-Former query outputs -> (B, Q, E) normalised ITC embeddings."""
        self._retrieval()
        return F.normalize(self.vision_proj(query_out.to(self.vision_proj.weight.dtype)), dim=-1)

    def text_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) text ids -> (B, E) normalised ITC embedding of the [CLS] position."""
        self._retrieval()
        out = self.qformer(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_proj(out[:, 0].to(self.text_proj.weight.dtype)), dim=-1)

    def itm_logits(
        self, vision: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, D_vision) image features with (B, T) paired texts -> (B, 2) match logits (mean over queries)."""
        self._retrieval()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        queries = self.queries.expand(vision.shape[0], -1, -1)
        out = self.qformer(queries=queries, image=vision, input_ids=input_ids, attention_mask=attention_mask)
        q = queries.shape[1]
        return self.itm_head(out[:, :q].to(self.itm_head.weight.dtype)).mean(dim=1)
