"""Training (blip2.train): losses against the reference and by hand, freezing, a short run, exact resume,
bad data, and the output checkpoint loaded by both libraries."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import tarfile
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2.api import _load_processor, build_model
from blip2.errors import CheckpointError
from blip2.train import loop
from blip2.train import stage1 as s1
from blip2.train.data import Batch, open_dataset
from blip2.train.loop import TrainConfig, make_stage, prepare, train
from factory import load_reference, make_images, read_state

CAPTIONS = [
    "a red cube on the table.",
    "the dog runs near a tree.",
    "two cats in the grass.",
    "a blue ball on a beach.",
    "a green cone in a room.",
    "three birds by the river.",
    "a white horse in the kitchen.",
    "a pink star under the bed.",
]


def _stage(ckpt, number, **opts):
    model, cfg = build_model(ckpt)
    processor = _load_processor(ckpt, cfg)
    options = TrainConfig(stage=number, model=str(ckpt), data="", output="", **opts)
    stage = make_stage(number, model, processor, options)
    return stage, processor, options


def _batch(processor, n, prompts=None, seed=0):
    pixels = processor.image_processor(make_images(n, 28, seed=seed))
    return Batch(pixels, CAPTIONS[:n], prompts or [None] * n, [f"img{i}" for i in range(n)], Counter())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "train.jsonl", "w") as f:
        for i, image in enumerate(make_images(8, 28, seed=3)):
            image.save(d / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "text": CAPTIONS[i]}) + "\n")
    return d


def _run(ckpt, data_dir, out, stage, **kw):
    opts = dict(
        stage=stage,
        model=str(ckpt),
        data=str(data_dir / "train.jsonl"),
        output=str(out),
        batch_size=4,
        lr=1e-3,
        warmup_steps=0,
        num_workers=0,
        log_every=1,
        progress=False,
    )
    opts.update(kw)
    return train(TrainConfig(**opts))


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---- stage 2: the reference's loss ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["opt_ckpt", "t5_ckpt"])
def test_stage2_loss_equals_reference(name, request):
    ckpt = request.getfixturevalue(name)
    stage, processor, _ = _stage(ckpt, 2)
    stage.eval()
    prompts = ["a photo of", None, "Question: what is it? Answer:"]
    batch = _batch(processor, 3, prompts)
    with torch.no_grad():
        loss, _ = stage(batch)
    enc = stage.tokenize(batch.texts, batch.prompts)
    ref, _ = load_reference(ckpt)
    with torch.no_grad():
        expected = ref(pixel_values=batch.pixels, **enc).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)

    tok = processor.tokenizer
    labels = enc["labels"]
    if name == "opt_ckpt":
        # the loss covers the caption and EOS only: not the image, the prompt or the padding
        q = stage.model.cfg.num_query_tokens
        assert (labels[:, :q] == -100).all()
        assert (labels[enc["attention_mask"] == 0] == -100).all()
        assert torch.equal(labels[labels != -100], enc["input_ids"][labels != -100])
        first = labels[0][labels[0] != -100].tolist()
        assert first[-1] == tok.eos_token_id
        assert tok.decode(first).strip() == CAPTIONS[0]
        prompt_len = len(tok.encode(["a photo of"])[0])
        assert (labels[0, : q + prompt_len] == -100).all() and labels[0, q + prompt_len] != -100
    else:
        # T5: the target is the caption (with EOS); the prompt goes to the encoder
        first = labels[0][labels[0] != -100].tolist()
        assert first == tok.encode([CAPTIONS[0]])[0]


# ---- stage 1: each loss by hand ----------------------------------------------------------------------------


def _smoothed_ce(logits: list[float], target: int, eps: float = 0.1) -> float:
    m = max(logits)
    lse = m + math.log(sum(math.exp(x - m) for x in logits))
    logp = [x - lse for x in logits]
    return -(1 - eps) * logp[target] - eps / len(logits) * sum(logp)


def test_itc_by_hand():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(2, 3, 4), dim=-1)  # (B, Q, E)
    text = F.normalize(torch.randn(2, 4), dim=-1)
    temp = torch.tensor(0.07)
    i2t, t2i = s1.itc_similarities(image, text, image, text)
    for b in range(2):
        for a in range(2):
            assert i2t[b, a].item() == pytest.approx(
                max(float(image[b, q] @ text[a]) for q in range(3)), abs=1e-6
            )
            assert t2i[b, a].item() == pytest.approx(
                max(float(text[b] @ image[a, q]) for q in range(3)), abs=1e-6
            )
    loss = s1.itc_loss(i2t, t2i, temp)
    rows_i2t = [[float(i2t[b, a]) / 0.07 for a in range(2)] for b in range(2)]
    rows_t2i = [[float(t2i[b, a]) / 0.07 for a in range(2)] for b in range(2)]
    expected = (
        sum(_smoothed_ce(rows_i2t[b], b) for b in range(2)) / 2
        + sum(_smoothed_ce(rows_t2i[b], b) for b in range(2)) / 2
    ) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # with an offset (this rank's rows start at 1 of a gathered batch of 3)
    i2t3, t2i3 = torch.randn(1, 3), torch.randn(1, 3)
    expected = (_smoothed_ce((i2t3[0] / 0.07).tolist(), 1) + _smoothed_ce((t2i3[0] / 0.07).tolist(), 1)) / 2
    assert s1.itc_loss(i2t3, t2i3, temp, offset=1).item() == pytest.approx(expected, rel=1e-5)


def test_hard_negative_weights_by_hand():
    sim = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0], [2.0, 2.0, 2.0]])
    keys = torch.tensor([7, 8, 7])  # samples 0 and 2 show the same image
    same = keys[:, None] == keys[None, :]
    w = s1.negative_weights(sim, same)
    assert w[0].tolist() == pytest.approx([0.0, 1.0, 0.0])  # only sample 1 is another image
    e0, e2 = math.exp(0.5), math.exp(-1.0)
    assert w[1].tolist() == pytest.approx([e0 / (e0 + e2), 0.0, e2 / (e0 + e2)])
    assert w[2].tolist() == pytest.approx([0.0, 1.0, 0.0])
    # every sample the same image: no true negative, uniform fallback (no NaN)
    w = s1.negative_weights(sim, torch.ones(3, 3, dtype=torch.bool))
    assert torch.allclose(w, torch.full((3, 3), 1 / 3))


def test_itg_mask_and_loss_by_hand():
    mask = s1.itg_attention_mask(2, torch.tensor([[1, 1, 0]]))[0, 0]  # Q=2, T=3, last text is padding
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # queries: queries only
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # text: all queries, itself and earlier text
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],  # padding row: sees itself (its output is never used)
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[2, 4, -100]])
    # position 0 predicts label 4 (position 1); position 1 predicts -100: ignored
    expected = _smoothed_ce(logits[0, 0].tolist(), 4)
    assert s1.itg_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def _itg_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> additive (B, 1, Q+T, Q+T), entry by entry: a query sees the queries; a text token sees
    the queries and the real (non-padding) tokens up to itself, padding itself too."""
    b, t = text_mask.shape
    n = num_queries + t
    blocked = torch.full((b, 1, n, n), torch.finfo(torch.float32).min)
    for r in range(b):
        for i in range(n):
            for j in range(n):
                text_ok = j >= num_queries and (j == i or (j < i and text_mask[r, j - num_queries]))
                if j < num_queries or (i >= num_queries and text_ok):
                    blocked[r, 0, i, j] = 0.0
    return blocked


def test_stage1_losses_equal_a_recomputation_from_the_reference(itm_ckpt):
    """ITC, ITM and ITG re-computed plainly from the reference's retrieval model (its vision model,
    query tokens, Q-Former, embeddings, projections and ITM head) on the same batch and weights.

    The hard negatives are drawn as the stage draws them (softmax of the similarities over the
    temperature, the example's own image and text excluded) from the same seed. The reference has no
    ITG head (its retrieval model does not train): the stage's BERT LM head weights are applied here
    by hand to the reference Q-Former's text outputs, with the reference's word embeddings as decoder."""
    from transformers.activations import ACT2FN

    n = 4
    stage, processor, _ = _stage(itm_ckpt, 1)
    stage.eval()  # no dropout: the losses are deterministic but for the negatives' draw
    batch = _batch(processor, n, seed=7)
    torch.manual_seed(11)
    with torch.no_grad():
        loss, parts = stage(batch)
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)

    ref, ref_processor = load_reference(itm_ckpt)
    ids, mask = stage.tokenize(batch.texts)
    enc = ref_processor.tokenizer(batch.texts, padding=True, return_tensors="pt")
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    pixels, temp = batch.pixels, stage.temp.item()
    assert temp == pytest.approx(0.07)

    with torch.no_grad():
        # ITC: the reference's similarities (max over queries of the cosines), smoothed CE both ways
        sims = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image  # (I, T)
        itc = sum(_smoothed_ce((sims[b] / temp).tolist(), b) for b in range(n))
        itc += sum(_smoothed_ce((sims[:, b] / temp).tolist(), b) for b in range(n))
        assert parts["itc"].item() == pytest.approx(itc / (2 * n), rel=1e-5)

        # ITM: one negative image per text and one negative text per image, then the reference's head
        torch.manual_seed(11)
        own = torch.eye(n, dtype=torch.bool)
        neg_image = torch.multinomial(torch.softmax((sims.T / temp).masked_fill(own, -torch.inf), 1), 1)[:, 0]
        neg_text = torch.multinomial(torch.softmax((sims / temp).masked_fill(own, -torch.inf), 1), 1)[:, 0]
        pairs = [(b, b) for b in range(n)]
        pairs += [(int(neg_image[b]), b) for b in range(n)] + [(b, int(neg_text[b])) for b in range(n)]
        image_rows, text_rows = [i for i, _ in pairs], [t for _, t in pairs]
        itm_logits = ref(
            pixel_values=pixels[image_rows],
            input_ids=ids[text_rows],
            attention_mask=mask[text_rows],
            use_image_text_matching_head=True,
        ).logits_per_image  # (3n, 2)
        labels = [1] * n + [0] * (2 * n)
        itm = sum(_smoothed_ce(itm_logits[k].tolist(), labels[k], eps=0.0) for k in range(3 * n)) / (3 * n)
        assert parts["itm"].item() == pytest.approx(itm, rel=1e-5)

        # ITG: [DEC] (or [CLS]) first; queries and causal text through the reference's Q-Former
        tok = ref_processor.tokenizer
        dec_id = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        assert stage.dec_id == dec_id
        dec = ids.clone()
        dec[:, 0] = dec_id
        q = ref.query_tokens.shape[1]
        vision = ref.vision_model(pixel_values=pixels).last_hidden_state
        embeds = ref.embeddings(input_ids=dec, query_embeds=ref.query_tokens.expand(n, -1, -1))
        text_out = ref.qformer(
            query_embeds=embeds,
            query_length=q,
            attention_mask=_itg_mask(q, mask),
            encoder_hidden_states=vision,
        ).last_hidden_state[:, q:]
        h, qcfg = stage.text_head, ref.config.qformer_config
        hidden = ACT2FN[qcfg.hidden_act](F.linear(text_out, h.dense.weight, h.dense.bias))
        hidden = F.layer_norm(hidden, (qcfg.hidden_size,), h.norm.weight, h.norm.bias, qcfg.layer_norm_eps)
        scores = hidden @ ref.embeddings.word_embeddings.weight.T + h.bias  # (n, T, V)
        terms = [
            _smoothed_ce(scores[b, t].tolist(), int(dec[b, t + 1]))
            for b in range(n)
            for t in range(dec.shape[1] - 1)
            if mask[b, t + 1]
        ]
        assert parts["itg"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


# ---- freezing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,number", [("opt_ckpt", 2), ("t5_ckpt", 2), ("itm_ckpt", 1)])
def test_frozen_parameters_get_no_gradient(name, number, request):
    ckpt = request.getfixturevalue(name)
    stage, processor, opts = _stage(ckpt, number)
    trained = prepare(stage, opts)
    stage.train()
    loss, _ = stage(_batch(processor, 3))
    loss.backward()
    for n, p in stage.model.named_parameters():
        if n in trained:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert any(n.startswith("qformer.") for n in trained)
    assert not any(n.startswith(("vision.", "language_model.")) for n in trained)
    if number == 1:
        assert stage.temp.grad is not None and stage.text_head.dense.weight.grad is not None


# ---- runs ---------------------------------------------------------------------------------------------------


def test_short_run_lowers_loss_and_reference_loads_output(opt_ckpt, data_dir, tmp_path):
    out = tmp_path / "out"
    result = _run(opt_ckpt, data_dir, out, 2, steps=30, lr=3e-3, augment=False, dropout=0.0)
    assert not result.interrupted and result.step == 30
    losses = [r["loss"] for r in _log(out)]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])

    def data_loss(ckpt):  # the loss on all eight training pairs at once, no dropout
        stage, processor, _ = _stage(ckpt, 2)
        pixels = processor.image_processor([data_dir / f"{i}.png" for i in range(8)])
        with torch.no_grad():
            return stage.eval()(Batch(pixels, CAPTIONS, [None] * 8, list("abcdefgh"), Counter()))[0].item()

    assert data_loss(out) < 0.95 * data_loss(opt_ckpt)

    # frozen tensors bit-identical to the input, trained ones changed; same names and dtypes
    before, after = read_state(opt_ckpt), read_state(out)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype
        if k.startswith(("qformer.", "query_tokens", "language_projection.")):
            continue
        assert torch.equal(after[k], v), k
    assert not torch.equal(after["query_tokens"], before["query_tokens"])

    # both libraries load the output and agree
    ours = blip2.load(out)
    ref, ref_processor = load_reference(out)
    inputs = ref_processor(images=make_images(2, 28, seed=5), text=["a photo of"] * 2, return_tensors="pt")
    with torch.no_grad():
        expected = ref(**inputs).logits
        got = ours.model(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        ).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_t5_and_stage1_outputs_load_in_the_reference(t5_ckpt, itm_ckpt, data_dir, tmp_path):
    for ckpt, number in ((t5_ckpt, 2), (itm_ckpt, 1)):
        out = tmp_path / f"out{number}"
        result = _run(ckpt, data_dir, out, number, steps=2)
        assert result.step == 2
        record = _log(out)[-1]
        assert {"step", "loss", "lr", "samples_per_s"} <= record.keys()
        if number == 1:
            assert {"itc", "itm", "itg"} <= record.keys()
        ref, processor = load_reference(out)  # strict: every tensor in place, none extra
        ours = blip2.load(out)
        images = make_images(2, 28, seed=6)
        if number == 1:
            inputs = processor(images=images, text=CAPTIONS[:2], return_tensors="pt", padding=True)
            with torch.no_grad():
                expected = ref(**inputs, use_image_text_matching_head=True).logits_per_image
                got = ours.model.itm_logits(
                    ours.model.vision(inputs["pixel_values"]), inputs["input_ids"], inputs["attention_mask"]
                )
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        else:
            inputs = processor(images=images, text=["a photo of"] * 2, return_tensors="pt")
            dec = torch.zeros((2, 1), dtype=torch.long)
            with torch.no_grad():
                expected = ref(**inputs, decoder_input_ids=dec).logits
                got = ours.model(**inputs, decoder_input_ids=dec).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_resume_gives_the_same_weights(itm_ckpt, data_dir, tmp_path):
    # stage 1: dropout, augmentation and negative sampling all draw random numbers
    common = dict(steps=4, save_every=2, grad_accum=2, batch_size=3)
    whole = tmp_path / "whole"
    _run(itm_ckpt, data_dir, whole, 1, **common)
    parts = tmp_path / "parts"
    first = _run(itm_ckpt, data_dir, parts, 1, stop_after=3, **common)
    assert first.interrupted and first.step == 3
    assert not (parts / "model.safetensors").exists()
    second = _run(itm_ckpt, data_dir, parts, 1, resume=True, **common)
    assert second.step == 4 and not second.interrupted
    a, b = read_state(whole), read_state(parts)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(whole / "train_state" / "state.pt", weights_only=True)["trained"]
    sb = torch.load(parts / "train_state" / "state.pt", weights_only=True)["trained"]
    for k in sa:  # the ITG head and temperature too
        assert torch.equal(sa[k], sb[k]), k
    assert [r["step"] for r in _log(parts)] == list(range(1, 5))
    assert [r["loss"] for r in _log(parts)] == [r["loss"] for r in _log(whole)]


@pytest.fixture(scope="module")
def interrupted(opt_ckpt, data_dir, tmp_path_factory):
    """The output folder of a run stopped after its first of three steps (training state saved)."""
    out = tmp_path_factory.mktemp("interrupted")
    assert _run(opt_ckpt, data_dir, out, 2, steps=3, stop_after=1).interrupted
    return out


def _state_copy(interrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    return out, out / "train_state"


class _RunsCode:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("name", ["state.pt", "rng.0.pt"])
def test_resume_refuses_a_pickle_that_runs_code(name, opt_ckpt, data_dir, interrupted, tmp_path):
    out, state = _state_copy(interrupted, tmp_path)
    marker = tmp_path / "ran"
    torch.save({"progress": _RunsCode(marker), "step": 1, "rng": _RunsCode(marker)}, state / name)
    with pytest.raises(CheckpointError, match=f"{name}: refused"):
        _run(opt_ckpt, data_dir, out, 2, steps=3, resume=True)
    assert not marker.exists()
    torch.load(state / name, weights_only=False)  # the file is a real exploit: a plain load runs it
    assert marker.read_text() == "ran"


def _rewrite(path, edit):
    data = torch.load(path, weights_only=True)
    edit(data)
    torch.save(data, path)


STATE_DAMAGE = {
    "rng file missing": (lambda s: (s / "rng.0.pt").unlink(), "rng.0.pt: missing"),
    "rng of another step": (lambda s: _rewrite(s / "rng.0.pt", lambda d: d.update(step=0)), "rng.0.pt: random state of step 0"),
    "rng state gutted": (lambda s: _rewrite(s / "rng.0.pt", lambda d: d["rng"].pop("numpy")), "rng.0.pt: the random state"),
    "state without optimizer": (lambda s: _rewrite(s / "state.pt", lambda d: d.pop("optimizer")), "state.pt: not a complete"),
    "state truncated": (lambda s: (s / "state.pt").write_bytes((s / "state.pt").read_bytes()[:100]), "state.pt: unreadable"),
    "trained tensor reshaped": (
        lambda s: _rewrite(s / "state.pt", lambda d: d["trained"].update({"model.queries": torch.zeros(3)})),
        "state.pt: model.queries has shape",
    ),
}  # fmt: skip


@pytest.mark.parametrize("damage", sorted(STATE_DAMAGE))
def test_resume_fails_clearly_on_damaged_state(damage, opt_ckpt, data_dir, interrupted, tmp_path):
    out, state = _state_copy(interrupted, tmp_path)
    edit, message = STATE_DAMAGE[damage]
    edit(state)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        _run(opt_ckpt, data_dir, out, 2, steps=3, resume=True)


def test_every_rank_checks_every_rng_file(interrupted, tmp_path, monkeypatch):
    """Under DDP a rank whose RNG file is missing must not leave the others waiting: rank 0 refuses too."""
    out, state = _state_copy(interrupted, tmp_path)
    _rewrite(state / "state.pt", lambda d: d["progress"]["setup"].update(world=2))
    shutil.copyfile(state / "rng.0.pt", state / "rng.1.pt")
    setup = torch.load(state / "state.pt", weights_only=True)["progress"]["setup"]
    monkeypatch.setattr(loop, "dist_info", lambda: (0, 2))
    (state / "rng.1.pt").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{state / 'rng.1.pt'}: missing")):
        loop.load_state(out, None, None, setup)  # refused before the model or optimizer is touched


# ---- data -------------------------------------------------------------------------------------------------


def test_bad_data_is_counted_and_skipped(opt_ckpt, data_dir, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "broken.png").write_bytes(b"not an image")
    rows = [json.dumps({"image": str(data_dir / f"{i}.png"), "text": CAPTIONS[i]}) for i in range(4)]
    rows += [
        json.dumps({"image": "missing.png", "text": "a cat"}),
        json.dumps({"image": str(data_dir / "0.png"), "text": "   "}),
        "{not json",
        json.dumps({"image": "broken.png", "text": "a dog"}),
    ]
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    result = _run(opt_ckpt, d, tmp_path / "out", 2, steps=2, batch_size=5)
    assert not result.interrupted and result.step == 2
    assert result.skipped["missing image"] == 1
    assert result.skipped["empty caption"] == 1
    assert result.skipped["bad json line"] == 1
    assert result.skipped["unreadable image"] >= 1


def test_webdataset_tar(data_dir, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(3):
            add(f"s{i}.png", (data_dir / f"{i}.png").read_bytes())
            if i == 1:
                add(f"s{i}.json", json.dumps({"caption": CAPTIONS[i], "prompt": "a photo of"}).encode())
            else:
                add(f"s{i}.txt", CAPTIONS[i].encode())
        add("s3.txt", b"no image here")
        add("s4.png", (data_dir / "4.png").read_bytes())
        add("s4.txt", b"  ")
    ds = open_dataset(tmp_path / "shard-{000..000}.tar")
    assert [s.text for s in ds.samples] == CAPTIONS[:3]
    assert ds.samples[1].prompt == "a photo of"
    assert ds.skipped == Counter({"missing image": 1, "empty caption": 1})
    from blip2.train.data import read_sample_image

    assert read_sample_image(ds.samples[2]).size == (28, 28)


# ---- multi-process ----------------------------------------------------------------------------------------


def test_ddp_two_processes_on_cpu(itm_ckpt, data_dir, tmp_path):
    """`torchrun` with two CPU processes (gloo): ITC features are gathered across ranks, one hub-layout
    output is written, frozen tensors stay bit-identical."""
    import shutil
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--nproc_per_node", "2", "-m", "blip2.cli", "train", "--stage", "1", "--model", str(itm_ckpt),
           "--data", str(data_dir / "train.jsonl"), "--output", str(out), "--steps", "3", "--batch-size", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _log(out)[-1]["step"] == 3
    before, after = read_state(itm_ckpt), read_state(out)
    assert before.keys() == after.keys()
    assert torch.equal(
        before["vision_model.post_layernorm.weight"], after["vision_model.post_layernorm.weight"]
    )
    assert not torch.equal(before["query_tokens"], after["query_tokens"])
    blip2.load(out)
