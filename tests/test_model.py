"""The core model against the reference: logits, features, checkpoint forms, dtypes and loading errors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

import blip2
from blip2.errors import CheckpointError
from blip2.models.layers import Linear
from factory import build_checkpoint, load_reference, make_images

TOL = 1e-4
PROMPTS = ["a red cube on a table", "question: what colour is the ball? answer:"]


def _inputs(proc, lm: str, image_size: int = 28, seed: int = 1):
    images = make_images(len(PROMPTS), image_size, seed=seed)
    inputs = dict(proc(images=images, text=PROMPTS, return_tensors="pt", padding=True))
    if lm == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 11, 12]])
    return inputs


def _valid(inputs, lm: str, logits: torch.Tensor) -> torch.Tensor:
    """Positions whose logits mean something (padding rows are undefined in both libraries)."""
    if lm == "opt":
        return inputs["attention_mask"].bool()
    return torch.ones(logits.shape[:2], dtype=torch.bool)


def _compare(path: Path, lm: str, image_size: int = 28, exact: bool = False) -> float:
    ref, proc = load_reference(path)
    ours = blip2.load(path, exact=exact)
    inputs = _inputs(proc, lm, image_size)
    with torch.no_grad():
        expected = ref(**inputs).logits
        got = ours.model(**inputs).logits
    assert got.shape == expected.shape
    valid = _valid(inputs, lm, expected)
    return (got - expected)[valid].abs().max().item()


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_logits_match_reference(lm, opt_ckpt, t5_ckpt):
    path = opt_ckpt if lm == "opt" else t5_ckpt
    assert _compare(path, lm) < TOL


def test_exact_logits_equal_reference_bit_for_bit(opt_ckpt):
    """``exact=True`` keeps the reference's matmul kernel: OPT's logits equal its own bit for bit.

    (T5 still differs by ~1e-6: the reference runs its attention with the position bias eagerly, we
    through SDPA.)
    """
    assert _compare(opt_ckpt, "opt", exact=True) == 0.0
    flags = {
        m.fast_kernels for m in blip2.load(opt_ckpt, exact=True).model.modules() if isinstance(m, Linear)
    }
    assert flags == {False}
    assert {m.fast_kernels for m in blip2.load(opt_ckpt).model.modules() if isinstance(m, Linear)} == {True}


SIZES = [
    # several shapes: wider, deeper, more queries, cross-attention every layer / every 3rd, bigger images
    dict(
        vision_hidden=64,
        vision_layers=3,
        vision_heads=8,
        qformer_layers=3,
        cross_attention_frequency=1,
        num_query_tokens=6,
        lm_hidden=48,
        lm_layers=3,
        lm_heads=6,
        seed=3,
    ),
    dict(
        image_size=42,
        patch_size=6,
        qformer_layers=4,
        cross_attention_frequency=3,
        num_query_tokens=3,
        lm_hidden=40,
        lm_layers=1,
        lm_heads=2,
        seed=7,
    ),
]


@pytest.mark.parametrize("lm", ["opt", "t5"])
@pytest.mark.parametrize("size", range(len(SIZES)))
def test_logits_match_reference_other_sizes(tmp_path, lm, size):
    kwargs = SIZES[size]
    path = build_checkpoint(tmp_path / "ckpt", lm=lm, **kwargs)
    assert _compare(path, lm, kwargs.get("image_size", 28)) < TOL


def test_asymmetric_t5_depth(t5_asym_ckpt):
    assert _compare(t5_asym_ckpt, "t5") < TOL


def test_outputs_depend_on_the_image(opt_ckpt):
    """Guard against vacuous parity: different images must give clearly different logits."""
    m = blip2.load(opt_ckpt)
    a, b = make_images(2, 28, seed=5)
    inputs = m.processor(images=[a, b], text=["a photo of", "a photo of"])
    with torch.no_grad():
        logits = m.model(**inputs).logits
    assert (logits[0, -1] - logits[1, -1]).abs().max() > 0.1


@pytest.mark.parametrize("fixture", ["opt_sharded_st_ckpt", "opt_sharded_bin_ckpt"])
def test_sharded_and_bin_forms_give_the_same_model(request, opt_ckpt, fixture):
    path = request.getfixturevalue(fixture)
    index = "model.safetensors.index.json" if "st" in fixture else "pytorch_model.bin.index.json"
    assert (path / index).is_file()
    assert len(json.loads((path / index).read_text())["weight_map"]) > 0
    a, b = blip2.load(opt_ckpt), blip2.load(path)
    inputs = a.processor(images=make_images(2, 28, seed=2), text=PROMPTS)
    with torch.no_grad():
        assert torch.equal(a.model(**inputs).logits, b.model(**inputs).logits)
    # lm_head absent from the files: tied to the embedding, sharing its storage
    lm = b.model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr()


def test_legacy_config_prepends_the_prefix(opt_ckpt, opt_legacy_ckpt):
    """Older configs have no image_token_index: the prefix goes in front of the prompt. The reference
    (which needs <image> slots) run on the twin checkpoint with slots is the oracle."""
    ref, proc = load_reference(opt_ckpt)
    legacy = blip2.load(opt_legacy_ckpt)
    assert legacy.config.image_token_index is None
    images = make_images(2, 28, seed=4)
    with_slots = proc(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    q = legacy.config.num_query_tokens
    text_only = legacy.processor(text=PROMPTS)
    assert torch.equal(text_only["input_ids"], with_slots["input_ids"][:, q:])
    with torch.no_grad():
        expected = ref(**with_slots).logits
        got = legacy.model(pixel_values=with_slots["pixel_values"], **text_only).logits
    valid = with_slots["attention_mask"].bool()
    assert got.shape == expected.shape
    assert (got - expected)[valid].abs().max() < TOL


def test_features_match_reference(opt_ckpt):
    ref, proc = load_reference(opt_ckpt)
    m = blip2.load(opt_ckpt)
    pixels = proc(images=make_images(2, 28, seed=6), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = ref.get_image_features(pixels)
        got = m.model.image_features(pixels)
    assert (got.vision - expected.last_hidden_state).abs().max() < TOL
    assert (got.qformer - expected.qformer_outputs.last_hidden_state).abs().max() < TOL
    assert (got.prefix - expected.pooler_output).abs().max() < TOL
    assert got.prefix.shape == (2, m.config.num_query_tokens, m.model.language_model.hidden_size)


def test_other_image_sizes_interpolate_positions(opt_ckpt):
    """Bicubic position interpolation for inputs larger than the trained size, as the reference does
    with interpolate_pos_encoding=True."""
    ref, proc = load_reference(opt_ckpt)
    m = blip2.load(opt_ckpt)
    pixels = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        expected = ref.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
        got = m.model.vision(pixels)
    assert got.shape == expected.shape == (1, 1 + 6 * 6, m.config.vision.hidden_size)
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_half_precision(opt_ckpt, t5_ckpt, lm, dtype):
    """Q-Former and queries stay float32 (for bfloat16 too, where the current reference lets them
    drop to bfloat16); T5's `wo` stays float32 in float16 as in the reference. Logits agree with the
    reference run in the same dtype."""
    from transformers import Blip2ForConditionalGeneration

    path = opt_ckpt if lm == "opt" else t5_ckpt
    m = blip2.load(path, dtype=dtype)
    for name, p in m.model.named_parameters():
        keep32 = name.startswith(("qformer.", "queries")) or (dtype == torch.float16 and ".mlp.wo." in name)
        assert p.dtype == (torch.float32 if keep32 else dtype), name
    ref = Blip2ForConditionalGeneration.from_pretrained(str(path), dtype=dtype).eval()
    if dtype == torch.float16:
        assert ref.qformer.layernorm.weight.dtype == torch.float32
    inputs = _inputs(m.processor and load_reference(path)[1], lm, seed=9)
    with torch.no_grad():
        expected = ref(**inputs).logits.float()
        got = m.model(**inputs).logits.float()
    valid = _valid(inputs, lm, expected)
    cos = torch.nn.functional.cosine_similarity(got[valid], expected[valid], dim=-1)
    # bfloat16 differs by design (our Q-Former stays float32), so a looser bound there
    assert cos.min() > (0.999 if dtype == torch.float16 else 0.99)


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_float32_weights_are_memory_mapped_not_copied(opt_ckpt):
    m = blip2.load(opt_ckpt)
    ranges = _mapped_ranges((opt_ckpt / "model.safetensors").resolve())
    assert ranges, "the weight file is not memory-mapped"
    for name, p in m.model.named_parameters():
        ptr = p.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in ranges), f"{name} was copied out of the memory map"


# ---- errors ---------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_error_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        blip2.load(tmp_path / "nope")


def test_error_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        blip2.load(tmp_path)


def test_error_unknown_architecture(tmp_path, opt_ckpt):
    path = _copy(opt_ckpt, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llava", ["LlavaForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a BLIP-2 or InstructBLIP checkpoint"):
        blip2.load(path)


def test_error_unknown_language_model(tmp_path, opt_ckpt):
    path = _copy(opt_ckpt, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["model_type"] = "gptj"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'gptj' is not supported"):
        blip2.load(path)


def test_error_missing_tensor(tmp_path, opt_ckpt):
    path = _copy(opt_ckpt, tmp_path / "c")
    _rewrite_safetensors(path / "model.safetensors", lambda t: t.pop("qformer.layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*qformer\.norm\.weight"):
        blip2.load(path)


def test_error_unexpected_tensor(tmp_path, opt_ckpt):
    path = _copy(opt_ckpt, tmp_path / "c")
    _rewrite_safetensors(
        path / "model.safetensors", lambda t: t.update({"vision_model.extra.weight": torch.ones(2)})
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*vision_model\.extra\.weight"):
        blip2.load(path)


def test_error_wrong_shape(tmp_path, opt_ckpt):
    path = _copy(opt_ckpt, tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["intermediate_size"] += 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape .* the config implies"):
        blip2.load(path)


def test_error_truncated_safetensors(tmp_path, opt_ckpt):
    path = _copy(opt_ckpt, tmp_path / "c")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        blip2.load(path)


def test_error_garbage_safetensors(tmp_path, opt_ckpt):
    path = _copy(opt_ckpt, tmp_path / "c")
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json at all" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        blip2.load(path)


def test_error_corrupt_bin(tmp_path, opt_sharded_bin_ckpt):
    path = _copy(opt_sharded_bin_ckpt, tmp_path / "c")
    shard = sorted(path.glob("pytorch_model-*.bin"))[0]
    shard.write_bytes(b"\x80\x04garbage" * 50)
    with pytest.raises(CheckpointError, match=shard.name):
        blip2.load(path)


def test_error_missing_shard(tmp_path, opt_sharded_st_ckpt):
    path = _copy(opt_sharded_st_ckpt, tmp_path / "c")
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="shard file"):
        blip2.load(path)


def test_error_no_weights(tmp_path, opt_ckpt):
    path = _copy(opt_ckpt, tmp_path / "c")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        blip2.load(path)


def test_error_hub_id_offline_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        blip2.load("Salesforce/blip2-opt-2.7b")


def test_hub_id_from_cache(tmp_path, monkeypatch, opt_ckpt):
    """A hub id found in the local cache loads without the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo = cache / "models--someone--tiny-blip2"
    commit = "0" * 40
    shutil.copytree(opt_ckpt, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    m = blip2.load("someone/tiny-blip2")
    assert m.config.num_query_tokens == 4


@pytest.mark.parametrize("fixture", ["opt_ckpt", "t5_ckpt", "t5_asym_ckpt", "itm_ckpt"])
def test_config_written_back_reads_the_same(request, fixture):
    """``Blip2Config.to_dict`` writes the hub's keys: read back it is the same config, and each key it
    writes has the value the reference wrote in the original ``config.json``."""
    from blip2.models.config import Blip2Config

    path = request.getfixturevalue(fixture) / "config.json"
    cfg = Blip2Config.from_file(path)
    written = cfg.to_dict()
    assert Blip2Config.from_dict(json.loads(json.dumps(written))) == cfg
    original = json.loads(path.read_text())
    ignored = {"dropout", "attention_dropout", "dropout_rate", "hidden_dropout_prob", "scale_decoder_outputs"}
    ignored |= {"attention_probs_dropout_prob"}
    for part in ("vision_config", "qformer_config", "text_config"):
        for key, value in written.get(part, {}).items():
            if key not in ignored and key in original[part]:
                assert original[part][key] == value, (part, key)
    for key in ("num_query_tokens", "image_token_index", "image_text_hidden_size"):
        if key in written and key in original:
            assert original[key] == written[key], key
