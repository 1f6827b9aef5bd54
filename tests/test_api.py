"""The Python API: caption / ask / chat, the image-prefix cache, and bad input."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import blip2
import blip2.images
from factory import load_reference, make_images


@pytest.fixture(scope="module")
def opt(opt_ckpt):
    return blip2.load(opt_ckpt)


@pytest.fixture(scope="module")
def t5(t5_ckpt):
    return blip2.load(t5_ckpt)


def _count_vision(model) -> list[int]:
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += inputs[0].shape[0]

    model.model.vision.register_forward_hook(hook)
    return calls


def test_caption_without_prompt_is_image_plus_bos(opt_ckpt, opt):
    """caption(prompt=None) equals the reference's generate with pixels only (image tokens + BOS)."""
    ref, proc = load_reference(opt_ckpt)
    images = make_images(3, 28, seed=21)
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = ref.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False)
    start = opt.config.num_query_tokens + 1
    want = proc.batch_decode(out[:, start:], skip_special_tokens=True)
    assert opt.caption(images, max_new_tokens=6) == want


def test_caption_with_prompt_and_paths(t5, tmp_path):
    images = make_images(2, 28, seed=22)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    from_paths = t5.caption([str(p) for p in paths], prompt="a photo of", max_new_tokens=6)
    assert from_paths == t5.caption(images, prompt="a photo of", max_new_tokens=6)
    assert all(isinstance(t, str) for t in from_paths)


def test_ask_uses_question_template(t5):
    image = make_images(1, 28, seed=23)[0]
    answer = t5.ask(image, "how many dogs are there?", max_new_tokens=6)
    assert answer == t5.generate(image, "Question: how many dogs are there? Answer:", max_new_tokens=6)[0]


def test_questions_about_one_image_run_vision_once(t5_ckpt):
    model = blip2.load(t5_ckpt)
    calls = _count_vision(model)
    image = make_images(1, 28, seed=24)[0]
    for q in ["what is it?", "what colour is the ball?", "how many cats?", "where is the dog?"]:
        model.ask(image, q, max_new_tokens=4)
    assert calls[0] == 1
    # the same picture another way (array, same pixels) hits the cache too; a new one does not
    model.ask(np.asarray(image), "and now?", max_new_tokens=4)
    assert calls[0] == 1
    model.ask(make_images(1, 28, seed=25)[0], "and now?", max_new_tokens=4)
    assert calls[0] == 2


def test_batch_with_repeated_image_runs_vision_once_per_distinct_image(opt_ckpt):
    model = blip2.load(opt_ckpt)
    calls = _count_vision(model)
    a, b = make_images(2, 28, seed=26)
    model.caption([a, b, a, a], max_new_tokens=3)
    assert calls[0] == 2


def test_chat_keeps_history_and_image_prefix(t5_ckpt):
    model = blip2.load(t5_ckpt)
    calls = _count_vision(model)
    image = make_images(1, 28, seed=27)[0]
    chat = model.chat(image, max_new_tokens=5)
    first = chat.say("what is in the picture?")
    second = chat.say("what colour is it?")
    streamed = "".join(chat.stream("is it big?"))
    assert calls[0] == 1
    assert [q for q, _ in chat.history] == ["what is in the picture?", "what colour is it?", "is it big?"]
    assert chat.history[0][1] == first.strip() and chat.history[2][1] == streamed.strip()
    # the second turn saw the first: the same as asking with the history written out
    prompt = (
        f"Question: what is in the picture? Answer: {first.strip()}. Question: what colour is it? Answer:"
    )
    assert second == model.generate(image, prompt, max_new_tokens=5)[0]
    chat.reset()
    assert chat.history == []


def test_chat_drops_oldest_turns_when_context_is_full(opt_ckpt):
    model = blip2.load(opt_ckpt)  # OPT context: 128 positions
    chat = model.chat(make_images(1, 28, seed=28)[0], max_new_tokens=4)
    long = "where is the green cat and the red dog today"
    for _ in range(8):
        chat.say(long)
    assert len(chat.history) == 8


# ---------------------------------------------------------------------------- bad input


def test_missing_image(opt, tmp_path):
    with pytest.raises(blip2.ImageError, match="no such file"):
        opt.caption([str(tmp_path / "nope.jpg")])


def test_not_an_image(opt, tmp_path):
    path = tmp_path / "text.png"
    path.write_text("hello")
    with pytest.raises(blip2.ImageError, match="not an image"):
        opt.caption(str(path))


def test_truncated_image(opt, tmp_path):
    buf = io.BytesIO()
    make_images(1, 64)[0].save(buf, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(blip2.ImageError, match="truncated"):
        opt.caption(str(path))


def test_decompression_bomb(opt, tmp_path, monkeypatch):
    monkeypatch.setattr(blip2.images, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(blip2.ImageError, match="decompression bomb"):
        opt.caption(str(path))


def test_empty_prompt_list(opt):
    with pytest.raises(blip2.InputError, match="empty"):
        opt.generate(make_images(1)[0], [])


def test_prompt_count_mismatch(opt):
    with pytest.raises(blip2.InputError, match="3 prompts for 2 images"):
        opt.generate(make_images(2), ["a", "b", "c"])


def test_prompt_longer_than_context(opt):
    with pytest.raises(blip2.InputError, match=r"tokens long .* holds 128"):
        opt.generate(make_images(1)[0], "the cat " * 200)


def test_prompt_plus_new_tokens_past_context_clips(opt, caplog):
    prompt = "the cat " * 20
    with caplog.at_level(logging.WARNING, logger="blip2.api"):
        ids = opt.generate_ids(make_images(1)[0], prompt, max_new_tokens=100, min_new_tokens=100)
    assert "clipped" in caplog.text
    n_prompt = len(opt.processor.tokenizer.encode(prompt)[0]) + opt.config.num_query_tokens
    assert len(ids[0]) == 128 - n_prompt


def test_retrieval_checkpoint_cannot_generate(opt):
    # a model without a language model refuses with an InputError (checked on the method, no extra checkpoint)
    lm, opt.model.language_model = opt.model.language_model, None
    try:
        with pytest.raises(blip2.InputError, match="retrieval"):
            opt.caption(make_images(1)[0])
    finally:
        opt.model.language_model = lm


def test_batch_larger_than_the_prefix_cache(opt_ckpt):
    """Rows computed for a batch bigger than the LRU cache are not lost to eviction."""
    from blip2.chat import PrefixCache

    model = blip2.load(opt_ckpt)
    images = make_images(5, 28, seed=31)
    expected = model.generate(images, ["a photo of"] * 5, max_new_tokens=3)
    model.prefix_cache = PrefixCache(2)
    assert model.generate(images, ["a photo of"] * 5, max_new_tokens=3) == expected
    model.prefix_cache = PrefixCache(0)
    assert model.generate(images, ["a photo of"] * 5, max_new_tokens=3) == expected
