"""Quantized checkpoints (`blip2 quantize`, `Pipeline.save`): mapped as saved, nothing re-quantized, outputs
identical to quantizing at load, and a packing that does not match its config refused."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import blip2
import blip2.quantize.int4
import blip2.quantize.int8
from blip2.cli import build_parser, main
from blip2.models.weights import save_checkpoint
from blip2.quantize import Int4Linear, Int8Linear
from factory import make_images


def _logits(m, lm: str) -> torch.Tensor:
    enc = m.processor(images=make_images(2), text=["a photo of", "Question: what is it? Answer:"])
    kwargs = {"decoder_input_ids": torch.tensor([[0, 5, 9], [0, 7, 2]])} if lm == "t5" else {}
    with torch.inference_mode():
        return m.model(**enc, **kwargs).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory, opt_sharded_st_ckpt, t5_ckpt):
    """(lm, method) -> (source checkpoint, quantized copy); the OPT source leaves its tied lm_head out."""
    out = {}
    for lm, src in (("opt", opt_sharded_st_ckpt), ("t5", t5_ckpt)):
        for method in ("int8", "int4"):
            dst = tmp_path_factory.mktemp(f"{lm}-{method}")
            blip2.load(src, quantize=method).save(dst)
            out[lm, method] = (src, dst)
    return out


@pytest.mark.parametrize("lm", ["opt", "t5"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_saved_loads_as_quantized_with_identical_outputs(saved, lm, method, monkeypatch):
    src, dst = saved[lm, method]
    expected = blip2.load(src, quantize=method)

    def refuse(*args, **kwargs):
        raise AssertionError("a saved checkpoint must not be quantized again")

    blip2.quantize.kernels.native_kind()  # its one-time self-check quantizes a small weight

    monkeypatch.setattr(blip2.quantize.int8, "quantize_weight", refuse)
    monkeypatch.setattr(blip2.quantize.int4, "pack_int4", refuse)
    m = blip2.load(dst)
    types = {name: type(mod) for name, mod in m.model.named_modules()}
    assert types == {name: type(mod) for name, mod in expected.model.named_modules()}
    assert torch.equal(_logits(m, lm), _logits(expected, lm))
    config = json.loads((dst / "config.json").read_text())["quantization"]
    assert config["method"] == method and config["format"] == "blip2-lowbit"
    assert config["group_size"] == (128 if method == "int4" else None)
    listed = sum(len(names) for names in config["modules"].values())
    assert listed == sum(isinstance(mod, Int8Linear | Int4Linear) for mod in m.model.modules())


def test_saved_tensors_are_the_memory_mapped_file(saved):
    _, dst = saved["opt", "int4"]
    m = blip2.load(dst)
    mappings = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == str(dst / "model.safetensors"):
                lo, hi = (int(a, 16) for a in parts[0].split("-"))
                mappings.append((lo, hi))
    layer = m.model.language_model.lm_head
    assert isinstance(layer, Int4Linear)
    for t in (layer.qweight, layer.scales, layer.mins):
        assert any(lo <= t.data_ptr() < hi for lo, hi in mappings)
    # the source's tied embedding stays; the head is written packed under its own name
    names = load_file(dst / "model.safetensors").keys()
    assert "language_model.lm_head.qweight" in names and "language_model.lm_head.weight" not in names


def test_generation_from_saved_equals_quantized_at_load(saved):
    src, dst = saved["opt", "int4"]
    images = make_images(2)
    assert blip2.load(dst).caption(images, max_new_tokens=5) == blip2.load(src, quantize="int4").caption(
        images, max_new_tokens=5
    )


def _copy(dst, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    return bad


def _edited(dst, tmp_path, edit):
    """A copy of ``dst`` whose config's quantization entry is replaced by ``edit(entry)``."""
    bad = _copy(dst, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["quantization"] = edit(config["quantization"])
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize(
    "file,entry,message",
    [
        ("int4", lambda saved: {"group_size": 256}, r"is torch.*; config.json says int4 with group size 256"),
        ("int8", lambda saved: _entry(saved["opt", "int4"][1]), r"is no part of what config.json says, int4"),
    ],
)
def test_packing_that_does_not_match_the_config_is_refused(saved, tmp_path, file, entry, message):
    """A group size the file was not packed with; int8 tensors under an int4 entry."""
    changes = entry(saved)
    bad = _edited(saved["opt", file][1], tmp_path, lambda old: {**old, **changes})
    with pytest.raises(blip2.CheckpointError, match=rf"model\.safetensors: tensor '.*' {message}"):
        blip2.load(bad)


def _entry(folder):
    return json.loads((folder / "config.json").read_text())["quantization"]


def test_wrong_dtype_of_a_packed_tensor_is_refused(saved, tmp_path):
    _, dst = saved["opt", "int4"]
    bad = _copy(dst, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    name = next(n for n in tensors if n.endswith(".scales"))
    tensors[name] = tensors[name].float()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(blip2.CheckpointError, match=rf"tensor '{name}' is torch\.float32"):
        blip2.load(bad)


def test_packed_tensors_of_an_unlisted_layer_are_refused(saved, tmp_path):
    _, dst = saved["opt", "int4"]
    bad = _edited(
        dst,
        tmp_path,
        lambda entry: {**entry, "modules": {**entry["modules"], "int4": entry["modules"]["int4"][:-1]}},
    )
    with pytest.raises(blip2.CheckpointError, match="does not list its layer"):
        blip2.load(bad)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"format": "other", "version": 1, "modules": {"int8": ["x"]}}, "not one this blip2 reads"),
        ({"format": "blip2-lowbit", "version": 1, "modules": {"int3": ["x"]}}, "modules must map"),
        ({"format": "blip2-lowbit", "version": 1, "modules": {"int8": ["no.such.layer"]}}, "no linear layer"),
        (
            {"format": "blip2-lowbit", "version": 1, "group_size": 64, "modules": {"int4": ["x"]}},
            "group_size",
        ),
    ],
)
def test_bad_quantization_entries_are_refused(saved, tmp_path, entry, message):
    _, dst = saved["opt", "int8"]
    bad = _edited(dst, tmp_path, lambda _: entry)
    with pytest.raises(blip2.CheckpointError, match=message):
        blip2.load(bad)


def test_saved_checkpoint_refuses_other_settings(saved):
    _, dst = saved["opt", "int4"]
    assert isinstance(blip2.load(dst, quantize="int4").model.language_model.lm_head, Int4Linear)
    with pytest.raises(ValueError, match="already quantized"):
        blip2.load(dst, quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        blip2.load(dst, quantize="int4", group_size=256)
    with pytest.raises(ValueError, match="exact"):
        blip2.load(dst, exact=True)


def test_cli_quantize_writes_a_checkpoint(opt_ckpt, tmp_path, capsys):
    dst = tmp_path / "q4"
    assert main(["quantize", str(opt_ckpt), str(dst), "--bits", "4"]) == 0
    assert "int4 checkpoint" in capsys.readouterr().err
    m = blip2.load(dst)
    assert isinstance(m.model.language_model.lm_head, Int4Linear)
    assert torch.equal(_logits(m, "opt"), _logits(blip2.load(opt_ckpt, quantize="int4"), "opt"))
    assert main(["quantize", str(opt_ckpt), str(dst), "--bits", "8"]) == 1  # not over an existing folder
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask 022", "umask 077"])
def test_written_weights_are_as_readable_as_the_umask_allows(opt_ckpt, tmp_path, umask):
    """safetensors creates its files for their owner only: a checkpoint written for a team (a shared
    models folder) would be unreadable to it, unlike the config beside it."""
    old = os.umask(umask)
    try:
        blip2.load(opt_ckpt, quantize="int8").save(tmp_path / "q8")
        save_checkpoint(blip2.load(opt_ckpt).model, opt_ckpt, tmp_path / "float")
    finally:
        os.umask(old)
    for folder in ("q8", "float"):
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / folder).iterdir()}
        assert modes["model.safetensors"] == 0o666 & ~umask, modes
        assert modes["model.safetensors"] == modes["config.json"]
        assert not list((tmp_path / folder).glob("*.tmp"))


def test_server_and_cli_accept_int4():
    parser = build_parser()
    for command in (["serve"], ["caption", "x.png"]):
        args = parser.parse_args([*command, "--quantize", "int4", "--group-size", "256"])
        assert (args.quantize, args.group_size) == ("int4", 256)
