"""Loading builds nothing it throws away and imports nothing it does not use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from blip2.models.weights import empty_modules

IMAGE = Path(__file__).resolve().parent.parent / "examples" / "scene1.png"

# every way to load, then a caption; what is imported is printed at the end
PROBE = """
import json, sys
import blip2
for quantize in (None, "int8"):
    blip2.load("demo", quantize=quantize).caption([{image!r}], max_new_tokens=2)
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in ("transformers", "sympy")
                        or name.startswith(("torch._dynamo", "torch._inductor")))))
"""


def test_load_and_caption_import_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(image=str(IMAGE))], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_empty_modules_are_meta_and_uninitialised():
    with empty_modules():
        embed = nn.Embedding(10, 4, padding_idx=0)
        norm = nn.LayerNorm(4)
        kept = torch.full((3,), 7.0, device="cpu")
        nn.init.normal_(kept)  # a no-op here, even on a real tensor
    assert embed.weight.device.type == "meta" and norm.weight.device.type == "meta"
    assert torch.equal(kept, torch.full((3,), 7.0))
    # outside the block initialisation is back
    real = nn.LayerNorm(4)
    assert torch.equal(real.weight, torch.ones(4))
