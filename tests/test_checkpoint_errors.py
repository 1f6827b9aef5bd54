"""Malformed checkpoints: a corpus of broken files, each made from a valid tiny checkpoint by one edit.

Every case must end in a ``CheckpointError`` whose message names the broken file and the problem (and
through the CLI in one line on stderr, exit status 1): never a raw ``TypeError`` / ``ValueError`` /
``AttributeError``, a tensor read from outside its place, or a file read from outside the folder.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import blip2
from blip2.cli import main
from blip2.errors import CheckpointError
from factory import make_images

Corrupt = Callable[[Path], None]

# ---- ways to break a checkpoint folder ------------------------------------------------------------------


def _edit_json(name: str, edit: Callable[[dict], object]) -> Corrupt:
    def corrupt(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))

    return corrupt


def _config(edit: Callable[[dict], object]) -> Corrupt:
    return _edit_json("config.json", edit)


def _set(section: str | None, key: str, value) -> Corrupt:
    """config.json with ``key`` (of ``section``, or at the top) set to ``value``."""
    return _config(lambda d: (d[section] if section else d).__setitem__(key, value))


def _write(name: str, text: str) -> Corrupt:
    def corrupt(folder: Path) -> None:
        (folder / name).write_text(text)

    return corrupt


def _split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _header_bytes(make: Callable[[dict], bytes]) -> Corrupt:
    """model.safetensors with its header replaced by ``make(header)`` (the tensor bytes kept)."""

    def corrupt(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, data = _split_safetensors(path)
        new = make(header)
        path.write_bytes(struct.pack("<Q", len(new)) + new + data)

    return corrupt


def _header(edit: Callable[[dict], object]) -> Corrupt:
    def make(header: dict) -> bytes:
        edit(header)
        return json.dumps(header).encode()

    return _header_bytes(make)


def _tensor(header: dict, ndim: int, skip: int = 0) -> dict:
    """The header entry of a tensor with ``ndim`` dimensions (the ``skip``-th in name order)."""
    names = sorted(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == ndim)
    return header[names[skip]]


def _entry(ndim: int, **changes) -> Corrupt:
    return _header(lambda h: _tensor(h, ndim).update(changes))


def _negate_shape(header: dict) -> None:
    # two negative dimensions: their product is the true element count, so no size check notices
    t = _tensor(header, 2)
    t["shape"] = [-s for s in t["shape"]]


def _shift_offsets(header: dict, by: int) -> None:
    t = _tensor(header, 1)
    t["data_offsets"] = [o + by for o in t["data_offsets"]]


def _place(header: dict, begin: int) -> None:
    t = _tensor(header, 1)
    _shift_offsets(header, begin - t["data_offsets"][0])


def _overlap(header: dict) -> None:
    # the second of two same-sized tensors pointed at half of the first's bytes and half of its own
    sized: dict[int, list[dict]] = {}
    for k, v in sorted(header.items()):
        if k != "__metadata__":
            sized.setdefault(v["data_offsets"][1] - v["data_offsets"][0], []).append(v)
    a, b = next(v for n, v in sized.items() if len(v) >= 2 and n >= 8)[:2]
    n = a["data_offsets"][1] - a["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0] + n // 2, a["data_offsets"][0] + n // 2 + n]


def _index(weight_map) -> Corrupt:
    """A shard index (which wins over model.safetensors) holding ``weight_map``."""
    return _write("model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))


def _index_to(shard: str, outside: bool = False) -> Corrupt:
    """An index sending every tensor to ``shard``; ``outside``: a valid copy of the weights lies there."""

    def corrupt(folder: Path) -> None:
        header, _ = _split_safetensors(folder / "model.safetensors")
        if outside:
            target = folder / shard
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / "model.safetensors", target)
        names = [k for k in header if k != "__metadata__"]
        _index(dict.fromkeys(names, shard))(folder)

    return corrupt


# (how to break it, the file the message must name, a fragment of the problem it must state)
ST, CFG, INDEX, GEN = (
    "model.safetensors",
    "config.json",
    "model.safetensors.index.json",
    "generation_config.json",
)
CASES = {
    # safetensors headers
    "header is a list": (_header_bytes(lambda h: b"[1, 2, 3]"), ST, "JSON object"),
    "header not utf-8": (_header_bytes(lambda h: b'{"\xff\xfe": 1}'), ST, "unreadable"),
    "metadata not an object": (_header(lambda h: h.update(__metadata__=[1])), ST, "__metadata__"),
    "entry not an object": (_header(lambda h: h.update(extra=5)), ST, "'extra'"),
    "unknown dtype": (_entry(1, dtype="F7"), ST, "dtype"),
    "dtype a list": (_entry(1, dtype=["F32"]), ST, "dtype"),
    "shape a string": (_entry(1, shape="32"), ST, "shape"),
    "shape of strings": (_entry(1, shape=["32"]), ST, "shape"),
    "shape of floats": (_entry(1, shape=[32.0]), ST, "shape"),
    "shape of booleans": (_entry(1, shape=[True]), ST, "shape"),
    "negative dimensions": (_header(_negate_shape), ST, "non-negative"),
    "offsets missing": (_header(lambda h: _tensor(h, 1).pop("data_offsets")), ST, "data_offsets"),
    "offsets of one": (_entry(1, data_offsets=[0]), ST, "data_offsets"),
    "offsets of strings": (_entry(1, data_offsets=["0", "128"]), ST, "data_offsets"),
    "negative offsets": (_header(lambda h: _shift_offsets(h, -(10**6))), ST, "outside"),
    "offsets into the header": (_header(lambda h: _place(h, -4)), ST, "outside"),
    "offsets reversed": (_header(lambda h: _tensor(h, 1).update(data_offsets=_tensor(h, 1)["data_offsets"][::-1])), ST, "data_offsets"),
    "offsets past the end": (_header(lambda h: _shift_offsets(h, 10**9)), ST, "past the end"),
    "size disagrees with shape": (_header(lambda h: _tensor(h, 2).update(shape=[1, 1])), ST, "bytes"),
    "overlapping tensors": (_header(_overlap), ST, "overlap"),
    # config.json: wrong types and impossible values
    "hidden_size a string": (_set("vision_config", "hidden_size", "64"), CFG, "vision_config.hidden_size"),
    "vision_config a number": (_set(None, "vision_config", 5), CFG, "vision_config must be a JSON object"),
    "text_config a list": (_set(None, "text_config", [1]), CFG, "text_config must be a JSON object"),
    "qformer_config a string": (_set(None, "qformer_config", "x"), CFG, "qformer_config"),
    "zero attention heads": (_set("qformer_config", "num_attention_heads", 0), CFG, "num_attention_heads"),
    "heads do not divide width": (_set("vision_config", "num_attention_heads", 5), CFG, "divisible"),
    "layers a float": (_set("text_config", "num_hidden_layers", 2.5), CFG, "text_config.num_hidden_layers"),
    "layers a boolean": (_set("qformer_config", "num_hidden_layers", True), CFG, "num_hidden_layers"),
    "negative width": (_set("text_config", "ffn_dim", -4), CFG, "text_config.ffn_dim"),
    "query tokens zero": (_set(None, "num_query_tokens", 0), CFG, "num_query_tokens"),
    "eps a string": (_set("vision_config", "layer_norm_eps", "1e-6"), CFG, "layer_norm_eps"),
    "eps negative": (_set("qformer_config", "layer_norm_eps", -1.0), CFG, "layer_norm_eps"),
    "flag a string": (_set("vision_config", "qkv_bias", "yes"), CFG, "qkv_bias"),
    "unknown activation": (_set("vision_config", "hidden_act", "swishy"), CFG, "hidden_act"),
    "activation a number": (_set("text_config", "activation_function", 3), CFG, "activation_function"),
    "image size empty list": (_set("vision_config", "image_size", []), CFG, "image_size"),
    "patch larger than image": (_set("vision_config", "patch_size", 1000), CFG, "patch_size"),
    "cross-attention every 0": (_set("qformer_config", "cross_attention_frequency", 0), CFG, "cross_attention_frequency"),
    "token id a string": (_set("text_config", "eos_token_id", "2"), CFG, "text_config.eos_token_id"),
    "token id negative": (_set("text_config", "pad_token_id", -1), CFG, "pad_token_id"),
    "image token a list": (_set(None, "image_token_index", [5]), CFG, "image_token_index"),
    "architectures a string": (_set(None, "architectures", "Blip2ForConditionalGeneration"), CFG, "architectures"),
    "model_type a number": (_set(None, "model_type", 5), CFG, "model_type"),
    "text model_type a list": (_set("text_config", "model_type", ["opt"]), CFG, "model_type"),
    "t5 feed_forward_proj a number": (
        _set(None, "text_config", {"model_type": "t5", "feed_forward_proj": 5}),
        CFG,
        "text_config.feed_forward_proj",
    ),
    "config a list": (_write("config.json", "[1]"), CFG, "JSON object"),
    "config not json": (_write("config.json", "{"), CFG, "JSON"),
    # shard indexes
    "index a list": (_write(INDEX, "[1]"), INDEX, "JSON object"),
    "weight_map a list": (_index(["model.safetensors"]), INDEX, "weight_map must be a JSON object"),
    "weight_map to numbers": (_index({"query_tokens": 3}), INDEX, "weight_map.query_tokens must be a shard"),
    "weight_map to null": (_index({"query_tokens": None}), INDEX, "weight_map.query_tokens must be a shard file name"),
    "weight_map to empty name": (_index({"query_tokens": ""}), INDEX, "weight_map.query_tokens"),
    "weight_map to a list": (_index({"query_tokens": ["a"]}), INDEX, "weight_map.query_tokens"),
    "weight_map empty": (_index({}), INDEX, "no shard"),
    "shard up and out": (_index_to("../x.safetensors", outside=True), INDEX, "outside the checkpoint folder"),
    "shard absolute": (_index_to("/etc/passwd"), INDEX, "outside the checkpoint folder"),
    "shard windows-style up": (_index_to("..\\x.safetensors"), INDEX, "outside the checkpoint folder"),
    "index not json": (_write(INDEX, "{"), INDEX, "unreadable"),
    # generation_config.json
    "max_new_tokens a string": (_edit_json(GEN, lambda d: d.update(max_new_tokens="30")), GEN, "max_new_tokens"),
    "eos a string": (_edit_json(GEN, lambda d: d.update(eos_token_id="2")), GEN, "eos_token_id"),
    "eos list of strings": (_edit_json(GEN, lambda d: d.update(eos_token_id=["2"])), GEN, "eos_token_id"),
    "do_sample a string": (_edit_json(GEN, lambda d: d.update(do_sample="yes")), GEN, "do_sample"),
    "temperature a string": (_edit_json(GEN, lambda d: d.update(temperature="hot")), GEN, "temperature"),
    "top_p out of range": (_edit_json(GEN, lambda d: d.update(top_p=1.5)), GEN, "top_p"),
    "num_beams zero": (_edit_json(GEN, lambda d: d.update(num_beams=0)), GEN, "num_beams"),
    "early_stopping unknown": (_edit_json(GEN, lambda d: d.update(early_stopping="sometimes")), GEN, "early_stopping"),
    "generation config a list": (_write(GEN, "[]"), GEN, "JSON object"),
    "generation config not json": (_write(GEN, "{"), GEN, "JSON"),
}  # fmt: skip


def _broken(opt_ckpt: Path, tmp_path: Path, name: str) -> tuple[Path, str, str]:
    corrupt, file, fragment = CASES[name]
    folder = tmp_path / "ckpt"
    shutil.copytree(opt_ckpt, folder)
    corrupt(folder)
    return folder, str(folder / file), fragment


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_checkpoint_is_a_checkpoint_error(name, opt_ckpt, tmp_path):
    folder, file, fragment = _broken(opt_ckpt, tmp_path, name)
    with pytest.raises(CheckpointError) as e:
        blip2.load(folder)
    message = str(e.value)
    assert file in message and fragment in message, message
    assert len(message.splitlines()) == 1, message


def test_valid_edits_still_load(opt_ckpt, tmp_path):
    """What the checks must keep accepting: a list image size, a null token id, unknown keys, null
    safetensors metadata, an index with shards in a sub-folder, an eos list."""
    folder = tmp_path / "ckpt"
    shutil.copytree(opt_ckpt, folder)
    _set("vision_config", "image_size", [28, 28])(folder)
    _set("text_config", "bos_token_id", None)(folder)
    _set(None, "some_future_key", {"x": [1]})(folder)
    _header(lambda h: h.update(__metadata__=None))(folder)
    _index_to("shards/model.safetensors")(folder)
    (folder / "shards").mkdir()
    (folder / "model.safetensors").rename(folder / "shards" / "model.safetensors")
    _edit_json(GEN, lambda d: d.update(eos_token_id=[2, 3], max_length=None, early_stopping="never"))(folder)
    m = blip2.load(folder)
    assert m.config.vision.image_size == 28 and m.config.text.bos_token_id is None
    assert m.generation_config.eos_token_id == (2, 3) and m.generation_config.early_stopping == "never"
    assert m.caption(make_images(1)[0], max_new_tokens=2)


@pytest.mark.parametrize("name", ["header is a list", "hidden_size a string", "shard up and out"])
def test_cli_says_one_line(name, opt_ckpt, tmp_path, capsys):
    folder, file, fragment = _broken(opt_ckpt, tmp_path, name)
    image = tmp_path / "x.png"
    make_images(1)[0].save(image)
    assert main(["caption", str(image), "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("blip2: error:") and file in err and fragment in err
    assert len(err.strip().splitlines()) == 1


def test_cli_process_prints_no_traceback(opt_ckpt, tmp_path):
    folder, file, fragment = _broken(opt_ckpt, tmp_path, "negative dimensions")
    image = tmp_path / "x.png"
    make_images(1)[0].save(image)
    cmd = [sys.executable, "-m", "blip2", "caption", "--model", str(folder), str(image)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and file in done.stderr and fragment in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
