"""Loading builds nothing it throws away and imports nothing it does not use; ``import blip2`` and the
command's parser import no torch, and ``blip2 bulk`` starts its decode processes before torch is imported."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import blip2
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


def _run(code: str, *args: str) -> str:
    """The last line ``code`` prints, run in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


HEAVY = "[n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers', 'tokenizers')]"


def test_import_blip2_and_the_parser_import_no_torch():
    code = f"import sys, blip2; a = {HEAVY}; from blip2.cli import build_parser; build_parser(); print(a, {HEAVY})"
    assert _run(code) == "[] []"


@pytest.mark.parametrize("package", ["blip2", "blip2.eval", "blip2.quantize"])
def test_lazy_names_are_all_there(package):
    """Every name of ``__all__`` resolves (loading its module), ``dir()`` lists them, and an unknown name
    is an AttributeError."""
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(module._EXPORTS)
    assert set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(importlib.import_module(module._EXPORTS[name], package), name) is value
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
    assert blip2.load.__module__ == "blip2.api" and blip2.InputError.__module__ == "blip2.errors"


def test_activation_names_match_the_functions():
    from blip2.models import config, layers

    assert set(config.ACTIVATIONS) == set(layers.ACTIVATIONS)


# `blip2 bulk caption`, each decode process noting whether torch was imported when it was forked
BULK_PROBE = """
import sys
import blip2.bulk.local as local
start = local._init_worker
def probe(processor):
    print("torch" in sys.modules, file=open(sys.argv[3], "a"))
    start(processor)
local._init_worker = probe
from blip2.cli import main
code = main(["bulk", "caption", sys.argv[1], "-o", sys.argv[2], "-m", "demo", "--decoders", "2", "-q",
             "--max-new-tokens", "3"])
print(code, "torch" in sys.modules)
"""


def test_bulk_forks_its_decoders_before_torch_is_imported(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.png").write_bytes(IMAGE.read_bytes())
    seen = tmp_path / "seen"
    assert _run(BULK_PROBE, str(photos), str(tmp_path / "out"), str(seen)) == "0 True"  # the model ran
    assert seen.read_text().split() == ["False", "False"]  # both forks: no torch in them
    texts = pq.read_table(tmp_path / "out" / "part-00000.parquet").column("text").to_pylist()
    assert len(texts) == 3 and len(set(texts)) == 1 and texts[0]


def test_the_program_freezes_the_heap_before_exiting(monkeypatch, capsys):
    """Run as the program (no argv given), ``main`` leaves the interpreter's last garbage collections
    nothing to walk; called with arguments (as here, in-process), it does not."""
    import gc

    from blip2.cli import main

    missing = str(IMAGE.with_name("no-such-image.png"))
    try:
        assert main(["caption", missing]) == 1 and gc.get_freeze_count() == 0
        monkeypatch.setattr(sys, "argv", ["blip2", "caption", missing])
        assert main() == 1 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert "no-such-image.png" in capsys.readouterr().err
