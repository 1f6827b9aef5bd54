"""Stage 2, generative learning (and fine-tuning for captioning / VQA): the image prefix into a frozen LM.

OPT / LLaMA (decoder-only): ``<image>``×Q, then the prompt (with BOS), then the caption and EOS; the loss is on the
caption and EOS only (image, prompt and padding positions are -100). Flan-T5 (prefix LM): ``<image>``×Q and
the prompt go to the encoder, the caption (with EOS) is the decoder's target. The loss is exactly
``Blip2.forward(labels=...)``, the reference's: mean cross-entropy over the target tokens of the batch.
InstructBLIP's Q-Former also reads the prompt (the instruction), in its own vocabulary.
The prompt and caption are tokenized apart and joined, so the boundary between them is exact.

Shapes: ``B`` batch, ``Q`` queries, ``T`` text tokens.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .data import Batch
from .loop import Stage


class Stage2(Stage):
    def __init__(self, model, processor, opts):
        super().__init__(model, processor, opts)
        if model.language_model is None:
            raise InputError(
                "stage 2 trains a generation checkpoint (BLIP-2 or InstructBLIP: OPT, Flan-T5 or LLaMA); "
                "this is a retrieval checkpoint: use --stage 1"
            )

    def trainable(self) -> list[str]:
        return [
            n
            for n, _ in self.model.named_parameters()
            if n.startswith(("queries", "qformer.", "projection."))
        ]

    def tokenize(self, texts: list[str], prompts: list[str | None]) -> dict[str, torch.Tensor]:
        """Captions (and prompts) -> ``input_ids``, ``attention_mask``, ``labels`` (-100 = no loss), right-padded.
        T5 also gets its encoder input in ``input_ids`` and the target in ``labels``."""
        tok = self.processor.tokenizer
        cfg = self.model.cfg
        q = cfg.num_query_tokens if cfg.image_token_index is not None else 0
        image = [cfg.image_token_index] * q
        prompts = [p if p is not None else self.opts.prompt for p in prompts]
        prompt_ids = tok.encode(prompts)  # with the tokenizer's specials (OPT: BOS; T5: EOS)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        n = self.opts.max_text_len
        if cfg.is_encoder_decoder:
            targets = [ids[: n - 1] + ids[-1:] if len(ids) > n else ids for ids in tok.encode(texts)]
            inputs = [image + ids for ids in prompt_ids]
            input_ids, mask = _pad(inputs, pad)
            labels, _ = _pad(targets, -100)
            return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        eos = tok.eos_token_id
        joined = [t if not p or p[-1].isspace() else " " + t for p, t in zip(prompts, texts, strict=True)]
        captions = [ids[: n - 1] + [eos] for ids in tok.encode(joined, add_special_tokens=False)]
        inputs = [image + p + c for p, c in zip(prompt_ids, captions, strict=True)]
        targets = [[-100] * (len(image) + len(p)) + c for p, c in zip(prompt_ids, captions, strict=True)]
        input_ids, mask = _pad(inputs, pad)
        labels, _ = _pad(targets, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        enc = {k: v.to(self.device) for k, v in self.tokenize(batch.texts, batch.prompts).items()}
        vision = self.encode_image(batch.pixels.to(self.device))
        instruction = (None, None)
        if (
            self.model.cfg.instruction_aware
        ):  # InstructBLIP: the Q-Former reads the prompt (instruction tuning)
            prompts = [p if p is not None else self.opts.prompt for p in batch.prompts]
            instruction = tuple(t.to(self.device) for t in self.processor.qformer_ids(prompts))
        prefix = self.model.query_features(vision, *instruction).prefix  # (B, Q, D_lm)
        out = self.model(image_prefix=prefix, **enc)
        return out.loss, {}


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: (B, T) values and (B, T) 0/1 mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
