"""Retrieval API against the reference's Blip2ForImageTextRetrieval on a small random checkpoint."""

from __future__ import annotations

import pytest
import torch

import blip2
from blip2.errors import InputError
from factory import load_reference, make_images

TEXTS = ["a red cube on the table.", "dog", "the zebra sleeps in a room next to a golden ring and a box."]


@pytest.fixture(scope="module")
def pair(itm_ckpt):
    return blip2.load(itm_ckpt), *load_reference(itm_ckpt)


@pytest.fixture(scope="module")
def images():
    return make_images(3, seed=11)


def test_itc_and_embeddings_match_reference(pair, images):
    m, ref, proc = pair
    inputs = proc(images=images, text=TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = ref(**inputs, use_image_text_matching_head=False)
    img, txt = m.embed_images(images, batch_size=2), m.embed_texts(TEXTS, batch_size=2)
    assert img.shape == out.image_embeds.shape and txt.shape == out.text_embeds.shape
    torch.testing.assert_close(img, out.image_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(txt, out.text_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(m.itc(images, TEXTS), out.logits_per_image, atol=1e-4, rtol=0)
    assert img.norm(dim=-1).sub(1).abs().max() < 1e-5
    assert (img[0] - img[1]).abs().max() > 1e-2  # the images matter


def test_itm_matches_reference(pair, images):
    m, ref, proc = pair
    inputs = proc(images=images, text=TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = ref(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
    torch.testing.assert_close(m.itm(images, TEXTS, batch_size=2), want, atol=1e-4, rtol=0)
    # one image against several texts is broadcast
    torch.testing.assert_close(m.itm(images[0], TEXTS)[0], want[0], atol=1e-4, rtol=0)


def test_paths_and_single_images(pair, images, tmp_path):
    m = pair[0]
    path = tmp_path / "a.png"
    images[0].save(path)
    torch.testing.assert_close(m.embed_images(str(path)), m.embed_images([images[0]]), atol=1e-6, rtol=0)
    with pytest.raises(InputError):
        m.itm(images, TEXTS[:2])


def test_rank_and_rerank(pair, images):
    m = pair[0]
    text = TEXTS[2]
    itc = m.itc(images, text)[:, 0]
    ranked = m.rank(text, images, top=None)
    assert [r.index for r in ranked] == torch.argsort(itc, descending=True).tolist()
    reranked = m.rank(text, images, top=3, rerank=2)
    probs = m.itm(images, text)
    head = sorted((r.index for r in ranked[:2]), key=lambda i: -float(probs[i]))
    assert [r.index for r in reranked[:2]] == head and reranked[2].index == ranked[2].index
    assert reranked[0].itm == pytest.approx(float(probs[head[0]]), abs=1e-5)
    pre = m.rank(text, image_embeds=m.embed_images(images), top=3)
    assert [r.index for r in pre] == [r.index for r in ranked]


def test_generation_checkpoint_gives_qformer_features(opt_ckpt, images):
    m = blip2.load(opt_ckpt)
    ref, proc = load_reference(opt_ckpt)
    pixels = proc.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=pixels).qformer_outputs.last_hidden_state
    torch.testing.assert_close(m.embed_images(images), want, atol=1e-4, rtol=0)
    with pytest.raises(InputError):
        m.embed_texts("a cat")
