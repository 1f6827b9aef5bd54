"""Pre-training the two frozen parts, in miniature: a small ViT on scene attributes, a small OPT on scene text.

- Vision: our ``VisionTransformer`` with two throw-away heads. From the class token, one classifier per
  place says what stands there (nothing, or colour × shape × size); from every patch token, a classifier
  says which object covers it (place × colour × shape × size). The first makes the encoder see the whole
  scene, the second keeps the patch tokens (which the Q-Former reads) local and informative, each knowing
  where its object stands, so that a query can find an object by what its patches say.
- Language: our ``OPT`` as a causal language model on the scene text exactly as stage 2 will feed it:
  ``</s>`` + caption + ``</s>``, and ``</s>`` + "Question: … Answer:" + answer + ``</s>`` (one or two
  turns), the loss on what stage 2 puts it on (caption, answer, EOS).

Shapes: ``B`` batch, ``N`` image tokens, ``G`` patches per side, ``T`` text tokens, ``D`` width.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..images import ImageProcessor
from ..models.config import OPTConfig, VisionConfig
from ..models.language.opt import OPT
from ..models.layers import normal_init_
from ..models.vision import VisionTransformer
from .scenes import PATCH_CLASSES, PLACES, SLOT_CLASSES, Scene

log = logging.getLogger(__name__)


def cosine_lr(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def fit(
    model: nn.Module,
    count: int,
    batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: str | torch.device,
    report: Callable[[str], None],
    name: str,
) -> None:
    """The pre-training loop both parts share: ``steps`` AdamW steps (warm-up, cosine decay, gradients
    clipped to norm 1) on batches of ``batch_size`` indices into ``count`` examples drawn from ``seed``;
    ``batch_loss(indices)`` gives the loss and figures to report beside it (ten reports in all)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(count, (batch_size,), generator=gen).to(device)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, max(1, steps // 20))
        loss, stats = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            extra = "".join(f", {k} {v.item():.2f}" for k, v in stats.items())
            report(
                f"{name} step {step + 1}/{steps}: loss {loss.item():.4f}{extra} ({time.perf_counter() - t0:.0f} s)"
            )


def pixels(scenes: list[Scene], processor: ImageProcessor) -> torch.Tensor:
    """(B, 3, S, S) model pixels of the rendered scenes, through the checkpoint's own preprocessing."""
    return processor([s.render() for s in scenes])


def patch_labels(scene: Scene, patch: int) -> np.ndarray:
    """(G*G,) the colour × shape covering most of each patch (0: background only)."""
    lab = scene.label_map()
    g = lab.shape[0] // patch
    cells = lab[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    counts = (cells[..., None] == np.arange(1, PATCH_CLASSES)).sum(1)  # (G*G, C-1)
    return np.where(counts.max(1) > 0, counts.argmax(1) + 1, 0)


class VisionPretrainer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision = VisionTransformer(cfg)
        self.slots = nn.Linear(cfg.hidden_size, len(PLACES) * SLOT_CLASSES)
        self.patches = nn.Linear(cfg.hidden_size, PATCH_CLASSES)

    def forward(self, x: torch.Tensor, slots: torch.Tensor, patches: torch.Tensor):
        h = self.vision(x)  # (B, N, D)
        slot_logits = self.slots(h[:, 0]).view(-1, len(PLACES), SLOT_CLASSES)
        patch_logits = self.patches(h[:, 1:])  # (B, G*G, C)
        loss_slots = F.cross_entropy(slot_logits.reshape(-1, SLOT_CLASSES), slots.reshape(-1))
        loss_patches = F.cross_entropy(patch_logits.reshape(-1, PATCH_CLASSES), patches.reshape(-1))
        slot_acc = (slot_logits.argmax(-1) == slots).all(-1).float().mean()
        return loss_slots + loss_patches, slot_acc


@torch.no_grad()
def init_vision(model: VisionTransformer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.class_token.copy_(torch.randn(model.class_token.shape, generator=gen) * 0.02)
    model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=gen) * 0.02)


def pretrain_vision(
    cfg: VisionConfig,
    scenes: list[Scene],
    processor: ImageProcessor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    report: Callable[[str], None] = log.info,
    device: str | torch.device = "cpu",
) -> VisionTransformer:
    """Train a fresh ViT on the scenes' per-place and per-patch labels; returns the encoder alone."""
    torch.manual_seed(seed)
    model = VisionPretrainer(cfg)
    init_vision(model.vision, seed)
    x = pixels(scenes, processor)
    slots = torch.tensor([s.slot_labels() for s in scenes])
    patches = torch.from_numpy(np.stack([patch_labels(s, cfg.patch_size) for s in scenes])).long()
    model.to(device)
    x, slots, patches = x.to(device), slots.to(device), patches.to(device)

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, acc = model(x[idx], slots[idx], patches[idx])
        return loss, {"scenes all right": acc}

    fit(model, len(scenes), batch_loss, steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.05,
        seed=seed, device=device, report=report, name="vision")  # fmt: skip
    return model.vision.cpu().eval()


def lm_sequences(
    prompts: list[str], texts: list[str], contexts: list[str | None], tokenizer
) -> list[tuple[list[int], int, int]]:
    """``[context] </s> prompt text </s>`` as (ids, prompt start, text start), tokenized as stage 2 does
    (prompt with BOS, then the text apart, then EOS). The context (a scene code) is what the image prefix
    will stand in for: with it the model learns to read what comes before BOS, which a frozen LM needs in
    order to use a prefix. The text (caption or answer, and EOS) is stage 2's target. The prompt, from its
    second token on, gets a lighter loss (see ``pretrain_language``); the context and the prompt's first
    token get none: learning what opens a prompt would teach the LM that "Question" follows BOS, and a
    caption (empty prompt) would open with a question."""
    eos = tokenizer.token_to_id("</s>")
    out = []
    for prompt, text, context in zip(prompts, texts, contexts, strict=True):
        ctx = tokenizer.encode(context, add_special_tokens=False).ids if context else []
        head = tokenizer.encode(prompt).ids  # BOS + prompt
        joined = text if not prompt or prompt[-1].isspace() else " " + text
        body = tokenizer.encode(joined, add_special_tokens=False).ids + [eos]
        out.append((ctx + head + body, len(ctx) + min(len(head), 2), len(ctx) + len(head)))
    return out


def pretrain_language(
    cfg: OPTConfig,
    seqs: list[tuple[list[int], int, int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    prompt_weight: float = 0.25,
    report: Callable[[str], None] = log.info,
    device: str | torch.device = "cpu",
) -> OPT:
    """Train a fresh OPT (tied embeddings) as a causal LM on ``seqs`` (ids, prompt start, text start);
    returns it in eval mode. The loss is the mean over the text tokens plus ``prompt_weight`` × the mean over
    the prompt's: modelling the questions helps the model learn to answer them, but one answer token
    among ten question tokens would otherwise carry a tenth of the signal."""
    torch.manual_seed(seed)
    model = OPT(cfg)
    with torch.no_grad():
        normal_init_(model, std=0.02)
    model.lm_head.weight = model.embed_tokens.weight  # tied, as OPT
    pad = cfg.pad_token_id
    width = max(len(s) for s, _, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    role = torch.zeros((len(seqs), width), dtype=torch.long)  # 0 no loss, 1 prompt, 2 text
    for i, (s, prompt_start, text_start) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        role[i, prompt_start:text_start] = 1
        role[i, text_start : len(s)] = 2
    model.to(device)
    ids, mask, role = ids.to(device), mask.to(device), role.to(device)

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = mask[idx]
        t = int(m.sum(1).max())
        x, m, r = ids[idx, :t], m[:, :t], role[idx, :t]
        logits = model.logits(model(model.embed(x), m))  # (B, T, V)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # (B, T-1)
        target = r[:, 1:]
        loss = ce[target == 2].mean()
        if prompt_weight and bool((target == 1).any()):
            loss = loss + prompt_weight * ce[target == 1].mean()
        return loss, {}

    fit(model, len(seqs), batch_loss, steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.01,
        seed=seed, device=device, report=report, name="language")  # fmt: skip
    return model.cpu().eval()
