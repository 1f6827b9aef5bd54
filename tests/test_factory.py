"""Checks on the test checkpoint factory itself: the reference loads what it writes, and it is not vacuous."""

from __future__ import annotations

import json

import pytest
import torch

from factory import LM_HEAD, build_checkpoint, load_reference, make_images, read_state

GEN_CKPTS = ["opt_ckpt", "t5_ckpt", "t5_asym_ckpt", "opt_sharded_bin_ckpt", "opt_sharded_st_ckpt"]


def _logits(model, processor, images, prompt="a photo of"):
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    kwargs = {}
    if model.config.text_config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = torch.zeros((len(images), 1), dtype=torch.long)
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


@pytest.mark.parametrize("name", GEN_CKPTS)
def test_generation_checkpoint_is_input_sensitive(name, request):
    model, processor = load_reference(request.getfixturevalue(name))
    logits = _logits(model, processor, make_images(2, 28, seed=1))
    assert torch.isfinite(logits).all()
    last = logits[:, -1]
    # different images give clearly different next-token logits
    assert (last[0] - last[1]).abs().max() > 0.1 * last.std()


def test_reference_keeps_file_tensors(opt_ckpt, t5_ckpt):
    for path in (opt_ckpt, t5_ckpt):
        model, _ = load_reference(path)
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, tensor in read_state(path).items():
            assert torch.equal(params[name], tensor), name


def test_t5_lm_head_untied(t5_ckpt):
    model, _ = load_reference(t5_ckpt)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()
    assert json.loads((t5_ckpt / "config.json").read_text())["text_config"]["tie_word_embeddings"] is False


def test_t5_asym_depth(t5_asym_ckpt):
    text = json.loads((t5_asym_ckpt / "config.json").read_text())["text_config"]
    assert (text["num_layers"], text["num_decoder_layers"]) == (2, 3)


def test_itm_checkpoint(itm_ckpt):
    model, processor = load_reference(itm_ckpt)
    assert type(model).__name__ == "Blip2ForImageTextRetrieval"
    inputs = processor(
        images=make_images(2, 28, seed=2), text=["a red cube", "a red cube"], return_tensors="pt"
    )
    with torch.no_grad():
        itm = model(**inputs, use_image_text_matching_head=True).logits_per_image
        itc = model(**inputs, use_image_text_matching_head=False).logits_per_image
    assert (itm[0] - itm[1]).abs().max() > 1e-3
    assert (itc[0] - itc[1]).abs().max() > 1e-3


def test_legacy_twin_has_same_tensors(opt_ckpt, opt_legacy_ckpt):
    a, b = read_state(opt_ckpt), read_state(opt_legacy_ckpt)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((opt_legacy_ckpt / "config.json").read_text())
    assert "image_token_index" not in cfg
    for name in ("processor_config.json", "preprocessor_config.json"):
        assert "num_query_tokens" not in json.loads((opt_legacy_ckpt / name).read_text())
    assert json.loads((opt_ckpt / "config.json").read_text())["image_token_index"] is not None


def test_sharded_layouts(opt_ckpt, opt_sharded_bin_ckpt, opt_sharded_st_ckpt):
    full = read_state(opt_ckpt)
    assert LM_HEAD in full
    for path, stem, ext in (
        (opt_sharded_bin_ckpt, "pytorch_model", "bin"),
        (opt_sharded_st_ckpt, "model", "safetensors"),
    ):
        index = json.loads((path / f"{stem}.{ext}.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) > 1 and all((path / f).exists() for f in files)
        state = read_state(path)
        assert LM_HEAD not in state and LM_HEAD not in index["weight_map"]
        assert set(index["weight_map"]) == set(state)
        assert state.keys() == full.keys() - {LM_HEAD}
        assert all(torch.equal(state[k], full[k]) for k in state)


def test_seeds_differ(tmp_path):
    a = read_state(build_checkpoint(tmp_path / "a", lm="opt", seed=0))
    b = read_state(build_checkpoint(tmp_path / "b", lm="opt", seed=1))
    assert not torch.equal(a["query_tokens"], b["query_tokens"])


def test_tokenizers(opt_ckpt, t5_ckpt, itm_ckpt):
    _, p = load_reference(opt_ckpt)
    tok = p.tokenizer
    ids = tok("what colour is the cube?").input_ids
    assert (
        ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("</s>") and ids.count(tok.bos_token_id) == 1
    )
    assert tok.pad_token == "<pad>" and tok.unk_token == "<unk>"
    image_id = json.loads((opt_ckpt / "config.json").read_text())["image_token_index"]
    assert tok.convert_tokens_to_ids("<image>") == image_id == len(tok) - 1
    assert p(images=make_images(1, 28), text="hi").input_ids[0][:5] == [image_id] * 4 + [tok.bos_token_id]

    _, p = load_reference(t5_ckpt)
    tok = p.tokenizer
    ids = tok("what colour is the cube?").input_ids
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert ids[-1] == 1 and 1 not in ids[:-1]

    _, p = load_reference(itm_ckpt)
    tok = p.tokenizer
    ids = tok("What colour is the cube?").input_ids
    assert tok.pad_token_id == 0
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "what colour is the cube?"


def test_tokenizer_json_alone(opt_ckpt, t5_ckpt, itm_ckpt):
    """Our implementation reads tokenizer.json with `tokenizers`: the special-token rules must live there."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(opt_ckpt / "tokenizer.json"))
    assert tok.encode("a red cube").ids[0] == tok.token_to_id("</s>")
    tok = Tokenizer.from_file(str(t5_ckpt / "tokenizer.json"))
    assert tok.encode("a red cube").ids[-1] == tok.token_to_id("</s>") == 1
    tok = Tokenizer.from_file(str(itm_ckpt / "tokenizer.json"))
    ids = tok.encode("a red cube").ids
    assert (ids[0], ids[-1]) == (tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"))


def test_preprocessor_configs_agree(opt_ckpt):
    pre = json.loads((opt_ckpt / "preprocessor_config.json").read_text())
    proc = json.loads((opt_ckpt / "processor_config.json").read_text())
    for key, value in proc["image_processor"].items():
        assert pre[key] == value, key
    assert pre["size"] == {"height": 28, "width": 28}


def test_make_images_distinct():
    imgs = make_images(4, 28, seed=0)
    assert all(im.mode == "RGB" and im.size == (28, 28) for im in imgs)
    assert len({im.tobytes() for im in imgs}) == 4
    assert make_images(2, 28, seed=0)[0].tobytes() == imgs[0].tobytes()


@pytest.mark.parametrize("kwargs", [{"lm": "opt"}, {"lm": "t5"}, {"retrieval": True}])
def test_builds_are_reproducible(tmp_path, kwargs):
    a = build_checkpoint(tmp_path / "a", **kwargs)
    b = build_checkpoint(tmp_path / "b", **kwargs)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
