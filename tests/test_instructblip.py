"""InstructBLIP (Flan-T5 and LLaMA/Vicuna kinds) against the reference on small random checkpoints."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

import blip2
from blip2.errors import CheckpointError, InputError
from factory import make_images, make_sentences
from factory_instruct import build_instruct_checkpoint, load_instruct_reference

PROMPTS = ["what colour is the cube?", "a photo of", "Where is the red dog? Describe it.", ""]


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory):
    return build_instruct_checkpoint(tmp_path_factory.mktemp("ib_llama"), lm="llama")


@pytest.fixture(scope="session")
def llama_gqa_ckpt(tmp_path_factory):
    """A LLaMA with grouped-query attention (8 query heads share 2 key/value heads), 3 layers, wider."""
    return build_instruct_checkpoint(
        tmp_path_factory.mktemp("ib_llama_gqa"), lm="llama", seed=3, lm_hidden=64, lm_layers=3, lm_heads=8,
        lm_kv_heads=2, num_query_tokens=6, qformer_layers=3,
    )  # fmt: skip


@pytest.fixture(scope="session")
def t5_instruct_ckpt(tmp_path_factory):
    return build_instruct_checkpoint(tmp_path_factory.mktemp("ib_t5"), lm="t5", seed=2)


KINDS = ["llama_ckpt", "llama_gqa_ckpt", "t5_instruct_ckpt"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request):
    path = request.getfixturevalue(request.param)
    ref, proc = load_instruct_reference(path)
    return blip2.load(path), ref, proc, request.param


def _reference_text(ref, proc, image, prompt: str, **gen) -> str:
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, **gen)
    if ref.config.use_decoder_only_language_model:  # LLaMA returns prompt + new tokens
        out = out[:, inputs["input_ids"].shape[1] :]
    return proc.batch_decode(out, skip_special_tokens=True)[0]


def test_config_and_layout(llama_gqa_ckpt, t5_instruct_ckpt):
    llama = blip2.load(llama_gqa_ckpt)
    assert llama.config.instruction_aware and llama.config.text.kind == "llama"
    assert (llama.config.text.num_heads, llama.config.text.num_kv_heads) == (8, 2)
    assert llama.model.qformer.cfg.has_text_input
    t5 = blip2.load(t5_instruct_ckpt)
    assert t5.config.instruction_aware and t5.config.text.kind == "t5"


def test_processor_equals_reference(pair):
    m, _, proc, _ = pair
    images = make_images(3)
    for texts in (["a photo of"], PROMPTS[:3]):
        ref = proc(images=images[: len(texts)], text=texts, return_tensors="pt", padding=True)
        ours = m.processor(images=images[: len(texts)], text=texts)
        assert set(ours) == set(ref.keys())
        for k in ref:
            assert torch.equal(ours[k], ref[k]), k


def test_llama_tokenizer_equals_reference(llama_ckpt):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(llama_ckpt))
    ours = blip2.load(llama_ckpt).processor.tokenizer
    texts = [
        *make_sentences(60, seed=5),
        " leading space",
        "two  spaces",
        "ünïcödé 😀 bytes",
        "tab\tnew\nline",
        "",
    ]
    for text in texts:
        ids = ref(text).input_ids
        assert ours.encode([text])[0] == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_logits_equal_reference(pair):
    m, ref, proc, kind = pair
    images = make_images(2, seed=4)
    for image, prompt in zip(images, PROMPTS[:2], strict=True):
        inputs = proc(images=image, text=prompt, return_tensors="pt")
        ours = m.processor(images=[image], text=[prompt])
        extra = {}
        if kind.startswith("t5"):
            extra["decoder_input_ids"] = torch.tensor([[0, 5, 9, 3]])
        with torch.no_grad():
            expected = ref(**inputs, **extra).logits
            got = m.model(**ours, **extra).logits
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "options", [{"num_beams": 1}, {"num_beams": 3}, {"num_beams": 2, "repetition_penalty": 1.5}]
)
def test_texts_equal_reference(pair, options):
    m, ref, proc, _ = pair
    images = make_images(3, seed=7)
    for image, prompt in zip(images, PROMPTS, strict=False):
        expected = _reference_text(ref, proc, image, prompt, max_new_tokens=10, **options)
        assert m.generate(image, prompt, max_new_tokens=10, **options)[0] == expected


def test_outputs_depend_on_image_and_instruction(pair):
    m, *_ = pair
    images = make_images(4, seed=11)
    texts = m.generate(images, "a photo of", max_new_tokens=8)
    assert len(set(texts)) >= 3, texts
    # the same image and language-model prompt, another Q-Former instruction: another prefix
    pixels = m.processor.image_processor(images[:1])
    assert not torch.equal(m.image_prefix(pixels, ["a photo of"]), m.image_prefix(pixels, ["what is it?"]))


def test_batch_equals_alone(pair):
    m, *_ = pair
    images = make_images(3, seed=2)
    prompts = PROMPTS[:3]
    for options in ({"num_beams": 1}, {"num_beams": 3}):
        batch = m.generate(images, prompts, max_new_tokens=9, **options)
        m.prefix_cache.clear()
        alone = [
            m.generate(i, p, max_new_tokens=9, **options)[0] for i, p in zip(images, prompts, strict=True)
        ]
        assert batch == alone


def test_sampling_reproducible(pair):
    m, *_ = pair
    image = make_images(1, seed=3)[0]
    a = m.generate(image, "a photo of", do_sample=True, top_k=20, temperature=1.3, seed=42, max_new_tokens=10)
    b = m.generate(image, "a photo of", do_sample=True, top_k=20, temperature=1.3, seed=42, max_new_tokens=10)
    c = m.generate(image, "a photo of", do_sample=True, top_k=20, temperature=1.3, seed=43, max_new_tokens=10)
    assert a == b and a != c


def test_caption_ask_chat_stream(llama_ckpt):
    m = blip2.load(llama_ckpt)
    ref, proc = load_instruct_reference(llama_ckpt)
    image = make_images(1, seed=9)[0]
    # caption: InstructBLIP's captioning instruction; ask: the question is the instruction
    assert m.caption(image, max_new_tokens=8) == m.generate(
        image, "A short image description:", max_new_tokens=8
    )
    assert m.caption(image, max_new_tokens=8)[0] == _reference_text(
        ref, proc, image, "A short image description:", max_new_tokens=8
    )
    question = "what colour is the cube?"
    assert m.ask(image, question, max_new_tokens=8) == _reference_text(
        ref, proc, image, question, max_new_tokens=8
    )
    many = m.ask(image, [question, "how many cats are there?"], max_new_tokens=8)
    assert many == [m.ask(image, q, max_new_tokens=8) for q in (question, "how many cats are there?")]
    assert "".join(m.stream(image, question, max_new_tokens=8)) == m.ask(image, question, max_new_tokens=8)
    chat = m.chat(image, max_new_tokens=6)
    first = chat.say(question)
    assert first == m.ask(image, question, max_new_tokens=6)
    chat.say("and the ball?")
    assert len(chat.history) == 2


def test_vision_encoded_once_per_image(llama_ckpt, monkeypatch):
    m = blip2.load(llama_ckpt)
    calls = []
    forward = m.model.vision.forward
    monkeypatch.setattr(m.model.vision, "forward", lambda x: calls.append(x.shape[0]) or forward(x))
    image = make_images(1, seed=5)[0]
    m.ask(image, ["what is it?", "where is it?", "how many?"], max_new_tokens=3)
    m.ask(image, "is it red?", max_new_tokens=3)
    assert calls == [1]


def test_cli_caption(llama_ckpt, tmp_path, capsys):
    from blip2.cli import main

    image = make_images(1, seed=9)[0]
    path = tmp_path / "a.png"
    image.save(path)
    assert main(["caption", str(path), "--model", str(llama_ckpt), "--max-new-tokens", "6", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["text"] == blip2.load(llama_ckpt).caption(path, max_new_tokens=6)[0]


@pytest.mark.parametrize("name", ["llama_ckpt", "t5_instruct_ckpt"])
def test_bulk_caption_and_ask(name, request, tmp_path):
    """`blip2 bulk` rows equal caption / ask (the instruction-worded prompts) image by image."""
    from blip2.bulk import Task, read_output, run_bulk

    ckpt = request.getfixturevalue(name)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, image in enumerate(make_images(3, seed=21)):
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    m = blip2.load(ckpt)
    questions = ["what colour is the cube?", "Where is the red dog? Describe it."]

    run_bulk(Task.make("caption", max_new_tokens=6), str(folder), tmp_path / "cap", model=str(ckpt),
             batch_size=2, progress=False)  # fmt: skip
    rows = read_output(tmp_path / "cap").to_pylist()
    assert [r["key"] for r in rows] == [str(p) for p in paths]
    assert [r["text"] for r in rows] == [m.caption(p, max_new_tokens=6)[0] for p in paths]

    run_bulk(Task.make("ask", questions=questions, max_new_tokens=6), str(folder), tmp_path / "ask",
             model=str(ckpt), batch_size=2, progress=False)  # fmt: skip
    rows = read_output(tmp_path / "ask").to_pylist()
    want = [(str(p), q, m.ask(p, q, max_new_tokens=6)) for p in paths for q in questions]
    assert [(r["key"], r["question"], r["text"]) for r in rows] == want
    assert len({t for _, _, t in want}) > 1


@pytest.mark.parametrize("method,bound", [("int8", 0.99), ("int4", 0.98)])
def test_low_bit(llama_ckpt, method, bound):
    m = blip2.load(llama_ckpt)
    q = blip2.load(llama_ckpt, quantize=method)
    image = make_images(1, seed=6)[0]
    inputs = m.processor(images=[image], text=["a photo of"])
    with torch.no_grad():
        a, b = m.model(**inputs).logits, q.model(**inputs).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > bound
    assert q.ask(image, ["what is it?", "where is it?"], max_new_tokens=4) == [
        q.ask(image, "what is it?", max_new_tokens=4),
        q.ask(image, "where is it?", max_new_tokens=4),
    ]


def test_bad_checkpoints(llama_ckpt, tmp_path):
    no_qformer_tok = tmp_path / "no_qtok"
    shutil.copytree(llama_ckpt, no_qformer_tok)
    shutil.rmtree(no_qformer_tok / "qformer_tokenizer")
    with pytest.raises(CheckpointError, match="qformer_tokenizer"):
        blip2.load(no_qformer_tok)
    rope = tmp_path / "rope"
    shutil.copytree(llama_ckpt, rope)
    cfg = json.loads((rope / "config.json").read_text())
    cfg["text_config"]["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (rope / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope"):
        blip2.load(rope)


def test_long_instruction_is_an_input_error(llama_ckpt):
    m = blip2.load(llama_ckpt)
    with pytest.raises(InputError, match="Q-Former"):
        m.generate(make_images(1)[0], "red " * 200, max_new_tokens=2)


@pytest.mark.parametrize("name", ["llama_ckpt", "t5_instruct_ckpt"])
def test_stage2_instruction_tuning(name, request, tmp_path):
    """Stage 2 on InstructBLIP: the Q-Former reads the instruction; the loss is the reference's, and a short
    run's output loads in the reference with equal logits."""
    from collections import Counter

    from blip2.api import _load_processor, build_model
    from blip2.train.data import Batch
    from blip2.train.loop import TrainConfig, make_stage, train

    ckpt = request.getfixturevalue(name)
    model, cfg = build_model(ckpt)
    processor = _load_processor(ckpt, cfg)
    stage = make_stage(2, model, processor, TrainConfig(stage=2, model=str(ckpt), data="", output=""))
    stage.eval()
    images = make_images(3, seed=8)
    captions = ["a red cube on the table.", "two cats in the grass.", "a blue ball on a beach."]
    prompts = ["what is on the table?", "Describe the image.", "where is the ball?"]
    batch = Batch(processor.image_processor(images), captions, prompts, ["a", "b", "c"], Counter())
    with torch.no_grad():
        loss, _ = stage(batch)
    enc = stage.tokenize(batch.texts, batch.prompts)
    qformer_ids, qformer_mask = processor.qformer_ids(prompts)
    ref, _ = load_instruct_reference(ckpt)
    with torch.no_grad():
        expected = ref(
            pixel_values=batch.pixels,
            qformer_input_ids=qformer_ids,
            qformer_attention_mask=qformer_mask,
            **enc,
        ).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for i, (image, caption, prompt) in enumerate(zip(images, captions, prompts, strict=True)):
            image.save(data / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "text": caption, "prompt": prompt}) + "\n")
    out = tmp_path / "out"
    options = TrainConfig(
        stage=2, model=str(ckpt), data=str(data / "train.jsonl"), output=str(out), steps=2, batch_size=3,
        lr=1e-3, warmup_steps=0, num_workers=0, progress=False,
    )  # fmt: skip
    assert train(options).step == 2
    ref, proc = load_instruct_reference(out)
    ours = blip2.load(out)
    inputs = proc(images=images[:1], text=["what is it?"], return_tensors="pt")
    extra = {"decoder_input_ids": torch.zeros((1, 1), dtype=torch.long)} if name.startswith("t5") else {}
    with torch.no_grad():
        torch.testing.assert_close(
            ours.model(**inputs, **extra).logits, ref(**inputs, **extra).logits, rtol=1e-4, atol=1e-4
        )
    assert ours.ask(images[0], "what is it?", max_new_tokens=6) == _reference_text(
        ref, proc, images[0], "what is it?", max_new_tokens=6
    )


def test_attention_map(llama_ckpt):
    """Where it looked: the Q-Former's cross-attention, read with the instruction (it changes the map)."""
    from blip2.attention_map import attention_map

    m = blip2.load(llama_ckpt)
    image = make_images(1, seed=4)[0]
    a = attention_map(m, image, prompt="what colour is the cube?")
    b = attention_map(m, image, prompt="Describe the image.")
    assert a.grid.shape == b.grid.shape == (4, 4)
    assert abs(float(a.grid.sum()) - 1) < 1e-5 and not torch.allclose(
        torch.as_tensor(a.grid), torch.as_tensor(b.grid)
    )
    c = attention_map(m, image, "a red cube", prompt="what is it?", method="gradcam")
    assert c.method == "gradcam" and c.grid.shape == (4, 4)


def test_server(llama_ckpt):
    """The OpenAI-style server on an InstructBLIP model: chat, stream and caption equal the Python API."""
    pytest.importorskip("openai")
    from test_serve import KEY, MODEL, client, raw, running, user

    m = blip2.load(llama_ckpt)
    images = make_images(2, seed=12)
    with running(m) as (port, _, _):
        c = client(port)
        for image in images:
            r = c.chat.completions.create(
                model=MODEL, messages=[user(image, "what colour is it?")], temperature=0, max_tokens=6
            )
            assert r.choices[0].message.content == m.ask(image, "what colour is it?", max_new_tokens=6)
            stream = c.chat.completions.create(
                model=MODEL,
                messages=[user(image, "what colour is it?")],
                temperature=0,
                max_tokens=6,
                stream=True,
            )
            pieces = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
            assert pieces == r.choices[0].message.content
        buf = io.BytesIO()
        images[0].save(buf, "PNG")
        status, _, body = raw(port, "POST", "/v1/caption", buf.getvalue(), {"Content-Type": "image/png"})
        assert status == 200 and body["text"] == m.caption(images[0])[0]
    assert KEY


def test_decode_settled_waits_for_byte_runs(llama_ckpt):
    """Streaming with byte fallback: a run of byte tokens decodes together, so its text waits for the run's end."""
    tok = blip2.load(llama_ckpt).processor.tokenizer
    c3, a9, word = (
        tok.token_to_id("<0xC3>"),
        tok.token_to_id("<0xA9>"),
        tok.encode(["red"], add_special_tokens=False)[0],
    )
    assert tok.decode_settled([c3]) is None and tok.decode_settled([c3, a9]) is None
    assert tok.decode_settled([c3, a9, *word]) == tok.decode([c3, a9, *word]) == "é red"
    assert tok.decode_settled(word) == "red"
