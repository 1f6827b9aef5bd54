"""``blip2 train``: Q-Former pre-training (stages 1 and 2) and fine-tuning, a thin shell over ``loop.train``.

Multi-GPU: ``torchrun --nproc-per-node N -m blip2 train …`` (each rank reads its share of every batch).
"""

from __future__ import annotations

import argparse
import logging


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the Q-Former: --stage 1 (retrieval checkpoint) or --stage 2 (OPT / Flan-T5 checkpoint)",
        description="Train the Q-Former (and projection) between the frozen image encoder and language model. "
        'DATA: a .jsonl file of {"image": path, "text": caption[, "prompt": ...]}, or WebDataset .tar '
        "shards (a file, a folder, a glob or shards-{000..009}.tar). The output folder is a hub-layout "
        "checkpoint; its train_state/ lets an interrupted run go on with --resume.",
    )
    p.add_argument(
        "--stage", type=int, choices=[1, 2], required=True, help="1: ITC+ITM+ITG; 2: language modelling"
    )
    p.add_argument("--model", "-m", required=True, help="checkpoint to start from (hub id or folder)")
    p.add_argument("--data", required=True, help="training data (.jsonl or .tar shards)")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data when --steps is not given")
    p.add_argument("--batch-size", type=int, default=8, help="images per micro-batch per GPU (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument(
        "--min-lr", type=float, default=None, help="learning rate at the end of the cosine (default lr/10)"
    )
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warm-up (default min(1000, 5%% of steps))"
    )
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip gradients to this norm")
    p.add_argument("--max-text-len", type=int, default=32, help="caption tokens kept (default 32)")
    p.add_argument("--prompt", default="", help='stage 2: prompt for samples without one, e.g. "a photo of"')
    p.add_argument("--no-augment", action="store_true", help="plain resize instead of random crop + flip")
    p.add_argument("--unfreeze-vision", action="store_true", help="train the image encoder too")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations to save memory"
    )
    p.add_argument("--dropout", type=float, default=0.1, help="Q-Former dropout (default 0.1)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="frozen weights (default float32)",
    )
    p.add_argument("--device", default=None, help="default: the rank's GPU, else cpu")
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes (default 2)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-every", type=int, default=500, help="steps between training-state saves")
    p.add_argument("--log-every", type=int, default=10, help="steps between log.jsonl records")
    p.add_argument("--resume", action="store_true", help="go on from OUTPUT/train_state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .loop import TrainConfig, train

    opts = TrainConfig(
        stage=args.stage,
        model=args.model,
        data=args.data,
        output=args.output,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_text_len=args.max_text_len,
        prompt=args.prompt,
        augment=not args.no_augment,
        unfreeze_vision=args.unfreeze_vision,
        gradient_checkpointing=args.gradient_checkpointing,
        dropout=args.dropout,
        dtype=args.dtype,
        device=args.device,
        num_workers=args.num_workers,
        seed=args.seed,
        save_every=args.save_every,
        log_every=args.log_every,
        resume=args.resume,
        progress=not args.no_progress,
    )
    result = train(opts)
    log = logging.getLogger("blip2.train")
    if result.skipped:
        log.warning("skipped samples: %s", ", ".join(f"{n} {r}" for r, n in sorted(result.skipped.items())))
    if result.interrupted:
        log.warning("stopped at step %d; continue with the same command and --resume", result.step)
        return 130
    print(f"{result.output} (step {result.step})")  # noqa: T201 - the command's result
    return 0
