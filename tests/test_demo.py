"""The demo: scene generator, the shipped small model (offline), and the reproduce command at toy size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import blip2
from blip2.demo import scenes
from blip2.demo.evaluate import evaluate

# ---- the scene generator ------------------------------------------------------------------------------


def test_generator_is_deterministic():
    a, b = scenes.generate(11, 25), scenes.generate(11, 25)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(
        np.array_equal(np.asarray(x.render()), np.asarray(y.render())) for x, y in zip(a, b, strict=True)
    )
    assert [s.questions() for s in a] == [s.questions() for s in b]
    assert [s.caption for s in scenes.generate(12, 25)] != [s.caption for s in a]


def test_splits_are_disjoint_by_construction():
    train = scenes.generate(3, 400, "train")
    held = scenes.generate(3, 400, "heldout") + scenes.generate(4, 400, "heldout")
    assert {s.split for s in train} == {"train"} and {s.split for s in held} == {"heldout"}
    assert not {s.caption for s in train} & {s.caption for s in held}
    # the split is a property of the scene, not of the seed that drew it
    assert all(scenes.split_of(s.caption) == "heldout" for s in held)
    with pytest.raises(ValueError):
        scenes.generate(0, 1, "test")


def test_captions_and_answers_describe_the_scene():
    for s in scenes.generate(5, 50):
        qa = dict(s.questions())
        assert qa["how many shapes are there?"] == scenes.NUMBERS[len(s.objects)]
        for o in s.objects:
            assert o.phrase in s.caption
            assert qa[f"what shape is {scenes.PLACE_PHRASES[o.place]}?"] == o.shape
        words = s.code.split()
        assert len(words) == 4 * len(scenes.PLACES)
        assert words[::4] == list(scenes.PLACES)
        for o in s.objects:
            k = list(scenes.PLACES).index(o.place)
            assert words[4 * k + 1 : 4 * k + 4] == [o.size, o.colour, o.shape]
        assert words.count("none") == 3 * (len(scenes.PLACES) - len(s.objects))
        order = [list(scenes.PLACES).index(o.place) for o in s.objects]
        assert order == sorted(order)  # canonical order: one caption per scene
        assert len(s.render().size) == 2 and s.render().size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)


# ---- the shipped model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(monkeypatch_module):
    return blip2.load("demo")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield mp


def test_shipped_model_beats_the_bar_offline(demo):
    record = evaluate(pipeline=demo, seed=90210, count=48)
    assert record["caption_exact_match"] >= 0.8, record
    assert record["vqa_accuracy"] >= 0.8, record


def test_shipped_model_captions_answers_and_chats(demo):
    scene = scenes.generate(777, 1, "heldout")[0]
    image = scene.render()
    # quality is test_shipped_model_beats_the_bar_offline's business; here: every entry point runs offline
    assert demo.caption(image)[0].strip()
    assert demo.ask(image, "how many shapes are there?").strip()
    chat = demo.chat(image)
    chat.say("how many shapes are there?")
    chat.say("what shape is on the left?")
    assert len(chat.history) == 2


def test_shipped_retrieval_model_matches_captions(monkeypatch_module):
    m = blip2.load("demo-itm")
    held = scenes.generate(4242, 16, "heldout")
    sims = m.itc([s.render() for s in held], [s.caption for s in held])  # (I, T)
    assert (sims.argmax(1) == torch.arange(len(held))).float().mean() >= 0.75
    right = m.itm([s.render() for s in held[:8]], [s.caption for s in held[:8]])
    wrong = m.itm([s.render() for s in held[:8]], [s.caption for s in held[8:16]])
    assert float(right.mean()) > 0.5 > float(wrong.mean())


def test_cli_captions_an_example(capsys):
    from pathlib import Path

    from blip2.cli import main

    examples = sorted((Path(__file__).parents[1] / "examples").glob("scene*.png"))
    assert examples, "examples/scene*.png are missing"
    assert main(["caption", str(examples[0]), "--model", "demo"]) == 0
    assert capsys.readouterr().out.strip()


# ---- the reproduce command, at toy size -------------------------------------------------------------------


def test_reproduce_tiny_runs_end_to_end(tmp_path):
    from blip2.demo.reproduce import TINY, reproduce

    record = reproduce(tmp_path, TINY)
    assert set(record) >= {"caption_exact_match", "vqa_accuracy", "times_s"}
    assert json.loads((tmp_path / "result.json").read_text())["count"] == TINY.eval_count
    gen, itm = blip2.load(tmp_path / "demo"), blip2.load(tmp_path / "demo-itm")
    assert not gen.config.retrieval and itm.config.retrieval
    image = scenes.generate(0, 1, "heldout")[0].render()
    assert isinstance(gen.caption(image, max_new_tokens=3)[0], str)
    assert itm.itm(image, "a small red circle on the left").shape == (1,)


def test_lm_sequences_put_the_loss_where_stage_two_does():
    """The context and a prompt's opening token get no loss (so BOS is only ever followed by a caption);
    the text starts where stage 2's labels start: after BOS + prompt."""
    from blip2.demo import checkpoint
    from blip2.demo.pretrain import lm_sequences
    from blip2.demo.reproduce import text_corpus

    tok = checkpoint.opt_tokenizer(text_corpus())
    scene = scenes.generate(2, 1)[0]
    prompt = "Question: how many shapes are there? Answer:"
    (ids, p0, t0), (cap, c0, c1) = lm_sequences([prompt, ""], ["two", scene.caption], [scene.code, None], tok)
    ctx = len(tok.encode(scene.code, add_special_tokens=False).ids)
    head = tok.encode(prompt).ids
    assert (
        ids[:ctx] == tok.encode(scene.code, add_special_tokens=False).ids
        and ids[ctx : ctx + len(head)] == head
    )
    assert (p0, t0) == (ctx + 2, ctx + len(head))
    assert tok.decode(ids[t0:-1]).strip() == "two" and ids[-1] == tok.token_to_id("</s>")
    assert (c0, c1) == (1, 1) and tok.decode(cap[c1:-1]) == scene.caption
