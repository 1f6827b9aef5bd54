"""The checkpoints tests/test_gpu.py runs on: wider than the CPU fixtures, so that half-precision kernels
take their real paths (``llama`` and ``instruct_t5`` are InstructBLIP's two kinds), and one ``wide`` OPT whose linear layers dominate its memory (the int8 / int4
memory ratios are measured on it).

``python tests/factory_gpu.py DIR`` builds them all into ``DIR/<name>`` (bench/gpu_prepare.sh does, so
that the GPU machine need not); test_gpu.py reads ``$BLIP2_GPU_CHECKPOINTS`` when set, else builds
what it needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from factory import build_checkpoint
from factory_instruct import build_instruct_checkpoint

SHAPE = dict(
    vision_hidden=128,
    vision_layers=3,
    vision_heads=4,
    qformer_hidden=64,
    qformer_layers=4,
    num_query_tokens=8,
    lm_hidden=128,
    lm_layers=3,
    lm_heads=4,
    image_size=56,
    patch_size=14,
)
WIDE = dict(
    SHAPE, vision_hidden=512, vision_heads=8, qformer_hidden=128, lm_hidden=1024, lm_layers=4, lm_heads=16
)


def _opt(d: Path) -> Path:
    return build_checkpoint(d, lm="opt", **SHAPE)


def _t5(d: Path) -> Path:
    return build_checkpoint(d, lm="t5", **SHAPE)


def _llama(d: Path) -> Path:
    return build_instruct_checkpoint(d, lm="llama", lm_kv_heads=2, **SHAPE)


def _instruct_t5(d: Path) -> Path:
    return build_instruct_checkpoint(d, lm="t5", **SHAPE)


def _itm(d: Path) -> Path:
    shape = {k: v for k, v in SHAPE.items() if not k.startswith("lm_")}
    return build_checkpoint(d, retrieval=True, **shape)


def _wide(d: Path) -> Path:
    return build_checkpoint(d, lm="opt", **WIDE)


BUILDERS = {"opt": _opt, "t5": _t5, "llama": _llama, "instruct_t5": _instruct_t5, "itm": _itm, "wide": _wide}


def build(name: str, out_dir: Path) -> Path:
    return BUILDERS[name](Path(out_dir))


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for name in sys.argv[2:] or BUILDERS:
        build(name, root / name)
        print(f"built {root / name}")
