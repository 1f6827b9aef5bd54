"""The one training loop both stages share.

A *stage* (``stage1.Stage1``, ``stage2.Stage2``) is an ``nn.Module`` holding the model and whatever only it
needs (ITC temperature, ITG head); its ``forward(batch)`` returns ``(loss, parts)``. Everything else is
here: freezing, AdamW with warm-up and cosine decay, gradient accumulation, bf16 autocast on GPU,
gradient checkpointing, DDP (torchrun), periodic training state with exact resume (weights, optimizer,
RNG states, data position), ``log.jsonl``, a progress bar, and the hub-layout output.

Resume is exact because the data order is a function of ``(seed, epoch)``, augmentation of
``(seed, epoch, index)``, and the state (including RNG) is taken at optimizer-step boundaries only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..api import _load_processor, build_model
from ..errors import CheckpointError, InputError
from ..models.blip2 import Blip2
from ..models.checkpoint import resolve_checkpoint
from ..models.weights import save_checkpoint
from .data import Batch, EpochBatches, ImageTextData, ImageTransform, collate, open_dataset

log = logging.getLogger(__name__)

STATE_DIR = "train_state"


@dataclass
class TrainConfig:
    stage: int
    model: str
    data: str
    output: str
    steps: int | None = None  # optimizer steps; default: `epochs` worth
    epochs: int = 1
    batch_size: int = 8  # per rank, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float | None = None  # end of the cosine; default lr / 10
    warmup_steps: int | None = None  # default min(1000, 5% of the run)
    weight_decay: float = 0.05  # not on biases, norms and scalars
    max_grad_norm: float | None = None
    max_text_len: int = 32
    prompt: str = ""  # stage 2: prompt for samples without their own
    augment: bool = True
    unfreeze_vision: bool = False
    gradient_checkpointing: bool = False
    dropout: float = 0.1  # Q-Former hidden and attention dropout
    dtype: str | None = None  # frozen parts; trained tensors are always float32
    device: str | None = None
    num_workers: int = 2
    seed: int = 42
    save_every: int = 500
    log_every: int = 10
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None  # stop (as if interrupted) after this many steps: for tests


@dataclass
class TrainResult:
    output: Path
    step: int
    interrupted: bool
    skipped: dict[str, int] = field(default_factory=dict)
    last_loss: float | None = None


# ---- stages ---------------------------------------------------------------------------------------


class Stage(nn.Module):
    """What a stage supplies: which model parameters train, and the loss of a batch."""

    def __init__(self, model: Blip2, processor: Any, opts: TrainConfig):
        super().__init__()
        self.model = model
        self.processor = processor
        self.opts = opts
        self.rank, self.world = dist_info()

    def trainable(self) -> list[str]:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D_vision); without autograd while the vision encoder is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.opts.unfreeze_vision):
            return self.model.vision(pixels)

    def query_outputs(self, vision: torch.Tensor) -> torch.Tensor:
        queries = self.model.queries.expand(vision.shape[0], -1, -1)
        return self.model.qformer(queries=queries, image=vision)  # (B, Q, D)

    @property
    def device(self) -> torch.device:
        return self.model.queries.device

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def make_stage(number: int, model: Blip2, processor: Any, opts: TrainConfig) -> Stage:
    if number == 1:
        from .stage1 import Stage1

        return Stage1(model, processor, opts)
    if number == 2:
        from .stage2 import Stage2

        return Stage2(model, processor, opts)
    raise InputError(f"--stage must be 1 or 2, not {number}")


# ---- distributed --------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int, int]:
    """Join the torchrun process group when launched by it; (rank, world, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    rank, world = dist_info()
    return rank, world, local


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` (B_r, …) over ranks, B_r may differ; gradients flow back to each rank's part.
    Returns (all rows, offset of this rank's rows)."""
    rank, world = dist_info()
    if world == 1:
        return x, 0
    import torch.distributed.nn.functional as dnn

    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded = torch.cat([x, padded[x.shape[0] :]]) if x.shape[0] < max(counts) else x
    parts = dnn.all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]), sum(counts[:rank])


# ---- schedule, optimizer, RNG ---------------------------------------------------------------------


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(".bias")]
    rest = [p for n, p in named if not (p.ndim >= 2 and not n.endswith(".bias"))]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def rng_state() -> dict[str, Any]:
    """Every random generator's state as tensors and plain numbers, so that it loads with ``weights_only``."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- training state ---------------------------------------------------------------------------------

RESUME_MUST_MATCH = ("stage", "batch_size", "grad_accum", "seed", "world")
PROGRESS_KEYS = ("step", "epoch", "batch", "skipped", "setup")


def _save(obj: Any, path: Path) -> None:
    torch.save(obj, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)


def save_state(
    out: Path, stage: Stage, optimizer: torch.optim.Optimizer, progress: dict[str, Any], rng
) -> None:
    """Trained tensors (model and stage-only), optimizer, position and per-rank RNG (with the step it was
    taken at), written atomically. Tensors, containers and plain numbers only: resuming never unpickles
    code (``weights_only=True``)."""
    rank, _ = dist_info()
    folder = out / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    _save({"step": progress["step"], "rng": rng}, folder / f"rng.{rank}.pt")
    if rank == 0:
        trained = {n: p.detach().cpu() for n, p in stage.named_parameters() if p.requires_grad}
        _save(
            {"progress": progress, "trained": trained, "optimizer": optimizer.state_dict()},
            folder / "state.pt",
        )


def _load(path: Path) -> dict[str, Any]:
    """One file of the training state, loaded safely: tensors and plain data only, never code."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the training state is incomplete and cannot resume exactly")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain data, which could run "
            "code when loaded (or it was written by an older blip2); start this run afresh"
        ) from None
    except Exception as e:  # noqa: BLE001 - a corrupt or truncated file: any failure means unusable
        raise CheckpointError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a blip2 training state (holds {type(data).__name__})")
    return data


def _check_state(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The progress record of ``state.pt``, after checking the file has every part."""
    progress, trained = state.get("progress"), state.get("trained")
    if (
        not isinstance(progress, dict)
        or not all(k in progress for k in PROGRESS_KEYS)
        or not isinstance(progress["setup"], dict)
        or not isinstance(trained, dict)
        or not all(isinstance(t, torch.Tensor) for t in trained.values())
        or not isinstance(state.get("optimizer"), dict)
    ):
        raise CheckpointError(
            f"{path}: not a complete blip2 training state (progress {', '.join(PROGRESS_KEYS)}; "
            "trained tensors; optimizer)"
        )
    return progress


def load_state(out: Path, stage: Stage, optimizer: torch.optim.Optimizer, check: dict[str, Any]) -> dict:
    """Put back what :func:`save_state` wrote. Every rank's RNG file must be there and taken at the same
    step as the weights: each rank checks them all, so a broken state stops every rank, not just one."""
    rank, world = dist_info()
    folder = out / STATE_DIR
    state_file = folder / "state.pt"
    if not state_file.is_file():
        raise InputError(f"{out}: nothing to resume (no {STATE_DIR}/state.pt); run without --resume")
    state = _load(state_file)
    progress = _check_state(state_file, state)
    for key in RESUME_MUST_MATCH:
        if progress["setup"].get(key) != check[key]:
            raise InputError(
                f"cannot resume: {key} was {progress['setup'].get(key)!r}, now {check[key]!r} "
                "(the data position depends on it)"
            )
    rngs = {}
    for r in range(world):
        rng_file = folder / f"rng.{r}.pt"
        rngs[r] = _load(rng_file)
        if rngs[r].get("step") != progress["step"] or not isinstance(rngs[r].get("rng"), dict):
            raise CheckpointError(
                f"{rng_file}: random state of step {rngs[r].get('step')!r}, but the weights are of step "
                f"{progress['step']} (a save was cut short); cannot resume exactly"
            )
    params = dict(stage.named_parameters())
    with torch.no_grad():
        for name, value in state["trained"].items():
            if name not in params or not params[name].requires_grad:
                raise InputError(f"cannot resume: {name} was trained before but is not trainable now")
            if value.shape != params[name].shape:
                raise CheckpointError(
                    f"{state_file}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}"
                )
            params[name].copy_(value)
    for what, path, put_back in (
        ("optimizer state", state_file, lambda: optimizer.load_state_dict(state["optimizer"])),
        ("random state", folder / f"rng.{rank}.pt", lambda: set_rng_state(rngs[rank]["rng"])),
    ):
        try:
            put_back()
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise CheckpointError(
                f"{path}: the {what} does not fit this run ({type(e).__name__}: {e})"
            ) from None
    return progress


def _trim_log(path: Path, last_step: int) -> None:
    """After a resume, drop records of steps the resumed run will redo."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(line + "\n" for line in keep))


def prepare(stage: Stage, opts: TrainConfig) -> set[str]:
    """Freeze everything but the stage's parameters (and the image encoder with ``unfreeze_vision``), in
    float32; switch on Q-Former dropout and gradient checkpointing. Returns the trained model names."""
    model = stage.model
    model.requires_grad_(False)
    trained = set(stage.trainable())
    if opts.unfreeze_vision:
        trained |= {f"vision.{n}" for n, _ in model.vision.named_parameters()}
    params = dict(model.named_parameters())
    for name in trained:
        p = params[name]
        p.data = p.data.float()  # optimizer state and updates in float32 whatever the frozen dtype
        p.requires_grad_(True)
    model.qformer.set_dropout(opts.dropout, opts.dropout)
    for part in (model.qformer, model.language_model, model.vision):
        if part is not None:
            part.gradient_checkpointing = opts.gradient_checkpointing
    return trained


# ---- the loop ------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def train(opts: TrainConfig) -> TrainResult:
    """Run a training job; returns where the checkpoint is and how far it got."""
    rank, world, local = init_distributed()
    if opts.device:
        device = torch.device(opts.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(opts.seed + rank)
    np.random.seed((opts.seed + rank) % 2**32)
    torch.manual_seed(opts.seed + rank)
    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)

    # model, frozen and trainable parts
    folder = resolve_checkpoint(opts.model)
    model, cfg = build_model(folder, opts.dtype)
    processor = _load_processor(folder, cfg)
    stage = make_stage(opts.stage, model, processor, opts)
    trained = prepare(stage, opts)
    stage.to(device).train()
    named = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(named, opts.weight_decay), lr=opts.lr, betas=(0.9, 0.999))
    runner: nn.Module = stage
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(
            stage, device_ids=[device.index] if device.type == "cuda" else None
        )

    # data
    dataset = open_dataset(opts.data)
    ip = processor.image_processor
    size = ip.size[0] if ip.size else cfg.vision.image_size
    transform = ImageTransform(size, tuple(ip.image_mean), tuple(ip.image_std), augment=opts.augment)
    data = ImageTextData(dataset, transform, seed=opts.seed)
    per_epoch = EpochBatches.batches_per_epoch(len(data), opts.batch_size, world)
    if per_epoch == 0:
        raise InputError(f"{len(data)} usable samples are fewer than the {world} ranks")
    total = opts.steps or max(1, math.ceil(opts.epochs * per_epoch / opts.grad_accum))
    warmup = opts.warmup_steps if opts.warmup_steps is not None else min(1000, total // 20)
    min_lr = opts.min_lr if opts.min_lr is not None else opts.lr / 10
    setup = {
        "stage": opts.stage,
        "batch_size": opts.batch_size,
        "grad_accum": opts.grad_accum,
        "seed": opts.seed,
        "world": world,
        "samples": len(data),
        "total_steps": total,
    }
    progress = {"step": 0, "epoch": 0, "batch": 0, "skipped": dict(dataset.skipped), "setup": setup}
    log_file = out / "log.jsonl"
    if opts.resume:
        progress = load_state(out, stage, optimizer, setup)
        log.info(
            "resuming at step %d (epoch %d, batch %d)", progress["step"], progress["epoch"], progress["batch"]
        )
        progress["setup"] = setup
        if rank == 0:
            _trim_log(log_file, progress["step"])
    elif rank == 0 and log_file.exists():
        log_file.unlink()
    skipped = Counter(progress["skipped"])

    step = progress["step"]
    boundary = dict(progress)  # position and RNG as of the last optimizer step
    boundary_rng = rng_state()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    loader_gen = torch.Generator().manual_seed(opts.seed)
    bar = _progress_bar(opts, rank, total, step)
    window: dict[str, list[float]] = {}
    window_samples, window_start = 0, time.perf_counter()
    micro = 0
    last_loss = None
    interrupted = False
    reported: set[str] = set()

    def on_sigterm(signum, frame):
        raise _Stop

    previous = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    try:
        epoch, start = progress["epoch"], progress["batch"]
        while step < total:
            sampler = EpochBatches(len(data), opts.batch_size, epoch, opts.seed, start, rank, world)
            loader = torch.utils.data.DataLoader(
                data,
                batch_sampler=sampler,
                collate_fn=collate,
                num_workers=opts.num_workers,
                generator=loader_gen,
                persistent_workers=False,
                pin_memory=device.type == "cuda",
            )
            position = start
            for batch in loader:
                position += 1
                skipped.update(batch.skipped)
                for reason, where in batch.bad:
                    if where not in reported:  # say it once; the count goes on
                        reported.add(where)
                        log.warning("skipping a sample: %s: %s", reason, where)
                if not _all_ranks_have(len(batch) > 0, device):
                    continue  # every sample of this batch was bad (on some rank)
                batch.pixels = batch.pixels.to(device, non_blocking=True)
                micro += 1
                sync = micro % opts.grad_accum == 0
                ctx = runner.no_sync() if (world > 1 and not sync) else _nullcontext()
                with ctx, autocast:
                    loss, parts = runner(batch)
                with ctx:
                    (loss / opts.grad_accum).backward()
                for k, v in {"loss": loss, **parts}.items():
                    window.setdefault(k, []).append(float(v.detach()))
                window_samples += len(batch) * world
                if not sync:
                    continue
                lr = lr_at(step, total, warmup, opts.lr, min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if opts.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for _, p in named], opts.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                boundary = {
                    "step": step,
                    "epoch": epoch,
                    "batch": position,
                    "skipped": dict(skipped),
                    "setup": setup,
                }
                if position >= per_epoch:
                    boundary.update(epoch=epoch + 1, batch=0)
                boundary_rng = rng_state()
                if step % opts.log_every == 0 or step == total:
                    last_loss = _log(
                        log_file, bar, rank, step, lr, epoch, window, window_samples, window_start, skipped
                    )
                    window, window_samples, window_start = {}, 0, time.perf_counter()
                bar.update(1)
                if step % opts.save_every == 0 and step < total:
                    save_state(out, stage, optimizer, boundary, boundary_rng)
                if opts.stop_after is not None and step >= opts.stop_after and step < total:
                    raise _Stop
                if step >= total:
                    break
            epoch, start = epoch + 1, 0
    except (KeyboardInterrupt, _Stop):
        interrupted = True
        optimizer.zero_grad(set_to_none=True)
        log.warning("interrupted: state saved at step %d; run again with --resume to go on", boundary["step"])
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if interrupted:
        # weights are as of the last optimizer step; position and RNG are those of that moment
        save_state(out, stage, optimizer, boundary, boundary_rng)
        return TrainResult(out, boundary["step"], True, dict(skipped), last_loss)
    save_state(out, stage, optimizer, boundary, boundary_rng)
    if rank == 0:
        save_checkpoint(model, folder, out, trained)
        if skipped:
            log.warning(
                "%d bad sample(s) skipped: %s",
                sum(skipped.values()),
                ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())),
            )
    if world > 1:
        dist.barrier()
    return TrainResult(out, step, False, dict(skipped), last_loss)


def _log(path, bar, rank, step, lr, epoch, window, samples, start, skipped) -> float:
    means = {k: sum(v) / len(v) for k, v in window.items() if v}
    elapsed = max(1e-9, time.perf_counter() - start)
    record = {"step": step, **{k: round(v, 6) for k, v in means.items()}, "lr": lr, "epoch": epoch}
    record["samples_per_s"] = round(samples / elapsed, 2)
    record["skipped"] = sum(skipped.values())
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", img_s=f"{samples / elapsed:.1f}")
    return means.get("loss", float("nan"))


def _all_ranks_have(ok: bool, device: torch.device) -> bool:
    _, world = dist_info()
    if world == 1:
        return ok
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _progress_bar(opts: TrainConfig, rank: int, total: int, step: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=step, unit="step", disable=not opts.progress or rank != 0, dynamic_ncols=True
    )


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
