"""The whole demo model from nothing: scenes, tokenizers, pre-training, stage 1, stage 2, evaluation.

Phases, each leaving its result in the output folder (a finished phase is skipped when run again):

1. ``data/``: train-split scenes as PNGs, ``stage1.jsonl`` (captions) and ``stage2.jsonl`` (captions with
   an empty prompt, questions with the ``Question: … Answer:`` prompt, some as two-turn chats).
2. ``vision.pt``: the ViT pre-trained on scene attributes (its heads thrown away).
3. ``language.pt``: the OPT pre-trained as a causal LM on the scene text (on a CPU in a second process,
   beside phases 2 and 4).
4. ``init-itm/`` → ``stage1/``: a retrieval checkpoint (frozen ViT, fresh Q-Former with its text branch and
   ITC/ITM heads) trained by ``blip2 train --stage 1`` (ITC + ITM + ITG).
5. ``init-gen/`` → ``stage2/``: a generation checkpoint (the ViT, the stage-1 Q-Former and queries, a fresh
   projection, the frozen OPT) trained by ``blip2 train --stage 2``.
6. ``demo/`` and ``demo-itm/``: the checkpoint files alone, and their score on held-out scenes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..chat import QUESTION_TEMPLATE, chat_prompt
from ..images import ImageProcessor
from ..models.blip2 import Blip2
from ..models.config import Blip2Config, OPTConfig, QFormerConfig, VisionConfig
from ..models.language.opt import OPT
from ..models.vision import VisionTransformer
from . import checkpoint, scenes
from .pretrain import lm_sequences, pretrain_language, pretrain_vision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    qformer_hidden: int = 96
    qformer_layers: int = 2
    qformer_heads: int = 4
    num_queries: int = 20  # one per word of the scene code the language model was pre-trained to read
    cross_attention_every: int = 1
    itc_dim: int = 64
    lm_hidden: int = 128
    lm_layers: int = 3
    lm_heads: int = 4
    lm_positions: int = 128
    scenes: int = 12000
    questions_per_scene: int = 3
    chat_fraction: float = 0.15
    vision_steps: int = 2000
    vision_batch: int = 64
    vision_lr: float = 2e-3
    lm_steps: int = 6000
    lm_batch: int = 64
    lm_lr: float = 3e-3
    lm_context_fraction: float = 0.9
    lm_prompt_weight: float = 0.25
    stage1_steps: int = 600
    stage1_batch: int = 32
    stage1_lr: float = 1e-3
    stage2_steps: int = 5000
    stage2_batch: int = 32
    stage2_lr: float = 1e-3
    eval_count: int = 200
    eval_seed: int = 12345


FULL = Recipe()
TINY = replace(
    FULL,
    vision_hidden=32,
    vision_layers=1,
    qformer_hidden=32,
    qformer_layers=1,
    num_queries=4,
    itc_dim=16,
    lm_hidden=32,
    lm_layers=1,
    scenes=64,
    vision_steps=4,
    vision_batch=16,
    lm_steps=4,
    lm_batch=16,
    stage1_steps=2,
    stage1_batch=8,
    stage2_steps=2,
    stage2_batch=8,
    eval_count=4,
)


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def image_processor(recipe: Recipe) -> ImageProcessor:
    return ImageProcessor.from_dict(
        checkpoint.processor_dict(_retrieval_config(recipe, 1))["image_processor"]
    )


def _vision_config(r: Recipe) -> VisionConfig:
    return VisionConfig(
        hidden_size=r.vision_hidden,
        num_layers=r.vision_layers,
        num_heads=r.vision_heads,
        mlp_size=4 * r.vision_hidden,
        image_size=r.image_size,
        patch_size=r.patch_size,
    )


def _qformer_config(r: Recipe, vocab: int, text: bool, pad: int) -> QFormerConfig:
    return QFormerConfig(
        hidden_size=r.qformer_hidden,
        num_layers=r.qformer_layers,
        num_heads=r.qformer_heads,
        mlp_size=4 * r.qformer_hidden,
        cross_attention_every=r.cross_attention_every,
        encoder_hidden_size=r.vision_hidden,
        has_text_input=text,
        vocab_size=vocab,
        max_position_embeddings=48,
        pad_token_id=pad,
    )


def _opt_config(r: Recipe, vocab: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=vocab,
        hidden_size=r.lm_hidden,
        num_layers=r.lm_layers,
        num_heads=r.lm_heads,
        mlp_size=4 * r.lm_hidden,
        max_position_embeddings=r.lm_positions,
        word_embed_proj_dim=r.lm_hidden,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )


def _retrieval_config(r: Recipe, vocab: int) -> Blip2Config:
    return Blip2Config(
        vision=_vision_config(r),
        qformer=_qformer_config(r, vocab, text=True, pad=0),
        text=None,
        num_query_tokens=r.num_queries,
        image_text_hidden_size=r.itc_dim,
        retrieval=True,
    )


def _generation_config(r: Recipe, vocab: int, image_token: int) -> Blip2Config:
    return Blip2Config(
        vision=_vision_config(r),
        qformer=_qformer_config(r, 30522, text=False, pad=0),
        text=_opt_config(r, vocab),
        num_query_tokens=r.num_queries,
        image_token_index=image_token,
        image_text_hidden_size=r.itc_dim,
    )


# ---- phase 1: data ---------------------------------------------------------------------------------


def text_corpus() -> list[str]:
    """Tokenizer training text: every scene phrase and question, and the chat form."""
    lines = scenes.corpus()
    lines.append(chat_prompt([("how many shapes are there?", "two")], "what shape is on the left?"))
    return lines


def stage2_rows(scene_list: list[scenes.Scene], names: list[str], r: Recipe) -> list[dict]:
    """Captions (empty prompt) and questions (BLIP-2's prompt; some after one earlier exchange, as chat)."""
    rng = np.random.default_rng([r.seed, 2])
    rows = []
    for scene, name in zip(scene_list, names, strict=True):
        rows.append({"image": name, "text": scene.caption, "prompt": ""})
        qa = scene.sample_questions(rng, r.questions_per_scene + 1)
        for i, (q, a) in enumerate(qa[: r.questions_per_scene]):
            if rng.random() < r.chat_fraction:
                prompt = chat_prompt([qa[(i + 1) % len(qa)]], q)
            else:
                prompt = QUESTION_TEMPLATE.format(q)
            rows.append({"image": name, "text": a, "prompt": prompt})
    return rows


def make_data(out: Path, r: Recipe) -> list[scenes.Scene]:
    data = out / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    scene_list = scenes.generate(r.seed, r.scenes, "train")
    names = []
    for i, scene in enumerate(scene_list):
        name = f"images/{i:05d}.png"
        scene.render().save(data / name)
        names.append(name)
    with open(data / "stage1.jsonl", "w") as f:
        for scene, name in zip(scene_list, names, strict=True):
            f.write(json.dumps({"image": name, "text": scene.caption}) + "\n")
    with open(data / "stage2.jsonl", "w") as f:
        for row in stage2_rows(scene_list, names, r):
            f.write(json.dumps(row) + "\n")
    return scene_list


def lm_data(scene_list: list[scenes.Scene], r: Recipe, tokenizer) -> list[tuple[list[int], int, int]]:
    """What the language model reads in pre-training: the stage-2 rows without the images, alone and
    (``lm_context_fraction`` of them) after their scene's code (``Scene.code``, 20 words in a fixed
    layout), which plays the part of the image prefix (20 queries)."""
    rng = np.random.default_rng([r.seed, 3])
    names = [str(i) for i in range(len(scene_list))]
    rows = stage2_rows(scene_list, names, r)
    contexts = [
        scene_list[int(row["image"])].code if rng.random() < r.lm_context_fraction else None for row in rows
    ]
    return lm_sequences([row["prompt"] for row in rows], [row["text"] for row in rows], contexts, tokenizer)


# ---- phases 4-5: checkpoints around the training runs ----------------------------------------------


def retrieval_init(r: Recipe, vision: VisionTransformer, bert_tok) -> Blip2:
    cfg = _retrieval_config(r, bert_tok.get_vocab_size(with_added_tokens=True))
    torch.manual_seed(r.seed + 1)
    model = Blip2(cfg)
    checkpoint.init_fresh(model.qformer)
    for head in (model.vision_proj, model.text_proj, model.itm_head):
        checkpoint.init_fresh(head)
    with torch.no_grad():
        model.queries.normal_(0.0, 1.0)
    model.vision.load_state_dict(vision.state_dict())
    return model.eval()


def generation_init(r: Recipe, stage1: Blip2, lm: OPT, opt_tok) -> Blip2:
    vocab = opt_tok.get_vocab_size(with_added_tokens=True)
    cfg = _generation_config(r, vocab, opt_tok.token_to_id("<image>"))
    torch.manual_seed(r.seed + 2)
    model = Blip2(cfg)
    checkpoint.init_fresh(model.projection)
    model.vision.load_state_dict(stage1.vision.state_dict())
    with torch.no_grad():
        model.queries.copy_(stage1.queries)
    # the query path of the stage-1 Q-Former; its text branch (embeddings, text feed-forward) stays behind
    query_path = {k: v for k, v in stage1.qformer.state_dict().items() if k in model.qformer.state_dict()}
    model.qformer.load_state_dict(query_path, strict=True)
    lm_state = {k: v for k, v in lm.state_dict().items()}
    model.language_model.load_state_dict(lm_state)
    model.language_model.lm_head.weight = model.language_model.embed_tokens.weight
    return model.eval()


def run_stage(stage: int, model: Path, data: Path, output: Path, r: Recipe, device: str | None) -> None:
    from ..train.loop import TrainConfig, train

    steps, batch, lr = (
        (r.stage1_steps, r.stage1_batch, r.stage1_lr)
        if stage == 1
        else (r.stage2_steps, r.stage2_batch, r.stage2_lr)
    )
    opts = TrainConfig(
        stage=stage,
        model=str(model),
        data=str(data),
        output=str(output),
        steps=steps,
        batch_size=batch,
        lr=lr,
        min_lr=lr / 20,
        warmup_steps=max(1, steps // 20),
        weight_decay=0.05,
        max_grad_norm=1.0,
        max_text_len=40,
        augment=False,  # a crop or a flip would change where the shapes are
        dropout=0.0,
        device=device,
        num_workers=0,
        seed=r.seed,
        save_every=10**9,
        log_every=max(1, steps // 10),
        progress=False,
    )
    if opts.device and opts.device.startswith("cuda") and ":" not in opts.device:
        opts.device = "cuda:0"
    result = train(opts)
    logged = (output / "log.jsonl").read_text().splitlines()
    if logged:
        _say(f"stage {stage} last log: {logged[-1]}")
    if result.interrupted:
        raise RuntimeError(f"stage {stage} training was interrupted at step {result.step}")


# ---- the whole -------------------------------------------------------------------------------------


def _train_language(out: Path, r: Recipe, scene_list: list[scenes.Scene], tokenizer, device: str) -> None:
    """Pre-train the language model and write ``language.pt`` (atomically: a half-written file never
    passes for a finished phase)."""
    lm = pretrain_language(
        _opt_config(r, tokenizer.get_vocab_size(with_added_tokens=True)), lm_data(scene_list, r, tokenizer),
        steps=r.lm_steps, batch_size=r.lm_batch, lr=r.lm_lr, seed=r.seed, prompt_weight=r.lm_prompt_weight,
        report=_say, device=device,
    )  # fmt: skip
    tmp = out / "language.pt.tmp"
    torch.save(lm.state_dict(), tmp)
    os.replace(tmp, out / "language.pt")


def _language_job(out: str, recipe: dict) -> None:
    """The language phase in its own process (CPU, one thread): the scenes and tokenizer are rebuilt from
    the recipe, which determines them."""
    torch.set_num_threads(1)
    r = Recipe(**recipe)
    _train_language(
        Path(out),
        r,
        scenes.generate(r.seed, r.scenes, "train"),
        checkpoint.opt_tokenizer(text_corpus()),
        "cpu",
    )


@contextlib.contextmanager
def _one_thread(device: str):
    """The ViT's matrices are small enough that on a CPU one thread does as well as two or better (2000
    steps: ~120 s on one thread of the 2-core machine; two took 280 s and more): synchronising threads
    costs about what it shares, and the other core stays free."""
    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reproduce(out: str | os.PathLike, recipe: Recipe = FULL, device: str | None = None) -> dict:
    """Build the demo checkpoints from nothing under ``out``; returns the evaluation record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or "cpu"
    r = recipe
    (out / "recipe.json").write_text(json.dumps(asdict(r), indent=2) + "\n")
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def phase(name: str):
        times[name] = time.perf_counter()

    def done(name: str):
        times[name] = round(time.perf_counter() - times[name], 1)
        _say(f"{name}: {times[name]} s")

    torch.manual_seed(r.seed)
    phase("data")
    scene_list = make_data(out, r)
    corpus = text_corpus()
    opt_tok, bert_tok = checkpoint.opt_tokenizer(corpus), checkpoint.bert_tokenizer(corpus)
    done("data")

    # The language model needs nothing but the text: on a CPU it trains in a second process on one core
    # while this one pre-trains the ViT and runs stage 1 on the other (these small models run as fast on
    # one thread as on two). On a GPU everything runs in turn.
    job = None
    if device == "cpu" and not (out / "language.pt").is_file():
        job = multiprocessing.get_context("spawn").Process(target=_language_job, args=(str(out), asdict(r)))
        job.start()
    try:
        phase("vision")
        vision_cfg = _vision_config(r)
        if (out / "vision.pt").is_file():
            vision = VisionTransformer(vision_cfg)
            vision.load_state_dict(torch.load(out / "vision.pt", weights_only=True))
        else:
            with _one_thread(device):
                vision = pretrain_vision(
                    vision_cfg, scene_list, image_processor(r), steps=r.vision_steps,
                    batch_size=r.vision_batch, lr=r.vision_lr, seed=r.seed, report=_say, device=device,
                )  # fmt: skip
            torch.save(vision.state_dict(), out / "vision.pt")
        done("vision")

        phase("stage1")
        if not (out / "stage1" / "model.safetensors").is_file():
            checkpoint.write_checkpoint(retrieval_init(r, vision, bert_tok), out / "init-itm", bert_tok)
            with _one_thread(device) if job is not None else contextlib.nullcontext():
                run_stage(1, out / "init-itm", out / "data" / "stage1.jsonl", out / "stage1", r, device)
        done("stage1")

        phase("language")  # what is left of it once vision and stage 1 are done
        if job is not None:
            job.join()
            if job.exitcode != 0:
                raise RuntimeError(f"language model pre-training failed (exit code {job.exitcode})")
        elif not (out / "language.pt").is_file():
            _train_language(out, r, scene_list, opt_tok, device)
        lm = OPT(_opt_config(r, opt_tok.get_vocab_size(with_added_tokens=True)))
        lm.load_state_dict(torch.load(out / "language.pt", weights_only=True))
        lm.lm_head.weight = lm.embed_tokens.weight
        done("language")
    finally:
        if job is not None and job.is_alive():
            job.terminate()

    phase("stage2")
    if not (out / "stage2" / "model.safetensors").is_file():
        from ..api import build_model

        stage1, _ = build_model(out / "stage1")
        checkpoint.write_checkpoint(generation_init(r, stage1, lm, opt_tok), out / "init-gen", opt_tok)
        run_stage(2, out / "init-gen", out / "data" / "stage2.jsonl", out / "stage2", r, device)
    done("stage2")

    checkpoint.copy_checkpoint(out / "stage2", out / "demo")
    checkpoint.copy_checkpoint(out / "stage1", out / "demo-itm")
    times["total"] = round(time.perf_counter() - t_all, 1)

    phase("eval")
    from .evaluate import evaluate

    record = evaluate(out / "demo", seed=r.eval_seed, count=r.eval_count)
    done("eval")
    record["times_s"] = times
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


SHIPPED = Path(__file__).parent / "checkpoints"


def install(out: str | os.PathLike) -> None:
    """Copy a finished build's ``demo`` and ``demo-itm`` over the checkpoints shipped in the package."""
    out = Path(out)
    for name in ("demo", "demo-itm"):
        checkpoint.copy_checkpoint(out / name, SHIPPED / name)
        _say(f"installed {out / name} -> {SHIPPED / name}")
