"""blip2 on a CUDA device against the reference in the same dtype on the same device (skipped without one).

Run on the GPU machine with ``bash bench/gpu_check.sh`` (bench/README.md), or
``python -m pytest tests/test_gpu.py``. ``BLIP2_TEST_DEVICE=cpu`` runs the same checks on the CPU: a
dry run of the test logic (the CUDA-only checks skip there). Checkpoints come from
``$BLIP2_GPU_CHECKPOINTS/<name>`` when present (tests/factory_gpu.py), else are built. What the checks
find beyond pass / fail (cosines, near-ties with both logits, memory ratios, sync counts) is appended
as JSON lines to ``$BLIP2_GPU_REPORT`` when set.

Where a text differs from the one it is compared with, the check looks for the reason: at the first
differing token, the two candidates' logits under blip2 (greedy), or the two sequences' scores (beam
search), must be within a near-tie (``TIE``); the report shows both.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import blip2
from factory import make_images
from factory_gpu import build

DEVICE = torch.device(os.environ.get("BLIP2_TEST_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA only")

PROMPTS = ["a red cube on a table", "question: what colour is the ball? answer:", ""]
SIZE = 56  # tests/factory_gpu.py's image size
HALF = [torch.float16, torch.bfloat16]
COSINE = {torch.float16: 0.999, torch.bfloat16: 0.99}
TIE = {torch.float32: 1e-3, torch.float16: 0.02, torch.bfloat16: 0.1}  # relative to the logit (>= 1)
# beam search can part at a tie on the edge of the beam, which the finished sequences do not show:
# theirs is let differ more (mean log-probability per token)
BEAM_TIE = {torch.float32: 1e-3, torch.float16: 0.05, torch.bfloat16: 0.1}
KINDS = ["opt", "t5", "llama", "instruct_t5"]  # llama, instruct_t5: InstructBLIP (tests/factory_gpu.py)


def _is_t5(kind: str) -> bool:
    return kind.endswith("t5")


# ---- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = os.environ.get("BLIP2_GPU_CHECKPOINTS")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            ready = Path(root) / name if root else None
            made[name] = (
                ready
                if ready and (ready / "config.json").is_file()
                else build(name, tmp_path_factory.mktemp(name))
            )
        return made[name]

    return get


def report(check: str, **values) -> None:
    path = os.environ.get("BLIP2_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"check": check, **values}, default=str) + "\n")


def _reference(path: Path, dtype: torch.dtype):
    from transformers import (
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    model_cls, proc_cls = {
        "Blip2ForConditionalGeneration": (Blip2ForConditionalGeneration, Blip2Processor),
        "InstructBlipForConditionalGeneration": (InstructBlipForConditionalGeneration, InstructBlipProcessor),
        "Blip2ForImageTextRetrieval": (Blip2ForImageTextRetrieval, Blip2Processor),
    }[arch]
    model = model_cls.from_pretrained(str(path), dtype=dtype).eval().to(DEVICE)
    return model, proc_cls.from_pretrained(str(path))


def _on_device(inputs: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in inputs.items()}


def _ours_inputs(m, images, prompts, kind):
    inputs = m.processor(images=images, text=prompts)
    if _is_t5(kind):
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 6, 7, 8]] * len(prompts))
    return _on_device(inputs)


def _valid(inputs, kind, logits):
    if _is_t5(kind):
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    return inputs["attention_mask"].bool()


def _continuation_logits(m, image, prompt: str, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) blip2's logits for each token of a continuation, teacher-forced."""
    inputs = m.processor(images=[image], text=[prompt])
    if m.config.is_encoder_decoder:
        start = m.config.text.decoder_start_token_id
        inputs["decoder_input_ids"] = torch.tensor([[start, *tokens[:-1]]])
        with torch.inference_mode():
            return m.model(**_on_device(inputs)).logits[0].float()
    n = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.inference_mode():
        return m.model(**_on_device(inputs)).logits[0, n - 1 : n - 1 + len(tokens)].float()


def _same_or_near_tie(
    m, image, prompt, ours: list[int], theirs: list[int], dtype, check: str, beams: int = 1
):
    """Equal token lists, or a divergence explained by a near-tie (reported either way): at the first
    differing token, the two candidates' logits under blip2; for beam search also the two finished
    sequences' scores (mean log-probability, the length penalty of 1), either of which may tie."""
    if ours == theirs:
        return True
    n = min(len(ours), len(theirs))
    k = next((i for i in range(n) if ours[i] != theirs[i]), n)
    found: dict = {"prompt": prompt, "step": k, "ours": ours, "theirs": theirs}
    tie = False
    if k < n:
        logits = _continuation_logits(m, image, prompt, ours[: k + 1])[k]
        a, b = float(logits[ours[k]]), float(logits[theirs[k]])
        found.update(logit_ours=a, logit_theirs=b, logit_gap=abs(a - b))
        tie = abs(a - b) <= TIE[dtype] * max(1.0, abs(a))
    if beams > 1 or k == n:  # a finished sequence against a longer one, or beams: their scores
        scores = []
        for seq in (ours, theirs):
            logp = F.log_softmax(_continuation_logits(m, image, prompt, seq), dim=-1)
            scores.append(float(logp.gather(1, torch.tensor(seq, device=logp.device)[:, None]).mean()))
        found.update(score_ours=scores[0], score_theirs=scores[1], score_gap=abs(scores[0] - scores[1]))
        tie = tie or abs(scores[0] - scores[1]) <= BEAM_TIE[dtype]
    report(check, near_tie=tie, **found)
    return tie


def _ref_generate(ref, proc, image, prompt, kind, dtype, **gen) -> list[int]:
    inputs = _on_device(dict(proc(images=image, text=prompt, return_tensors="pt")))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        out = ref.generate(**inputs, do_sample=False, **gen)
    # decoder-only: the prompt comes back in front; T5: the decoder start token
    ids = out[0][inputs["input_ids"].shape[1] :] if not _is_t5(kind) else out[0][1:]
    pad = proc.tokenizer.pad_token_id
    eos = ref.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    tokens: list[int] = []
    for t in ids.tolist():
        if t in eos:
            tokens.append(t)
            break
        if t == pad and _is_t5(kind):
            break
        tokens.append(t)
    return tokens


@pytest.fixture(scope="module", params=KINDS)
def kind_path(request, checkpoints):
    return request.param, checkpoints(request.param)


# ---- parity with the reference ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
def test_logits_match_reference(kind_path, dtype):
    kind, path = kind_path
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False  # the patch embedding's convolution
    ref, _ = _reference(path, dtype)
    m = blip2.load(path, device=DEVICE, dtype=dtype)
    images = make_images(3, SIZE, seed=3)
    # the reference's LLaMA takes positions from the padding side, ours from the mask: rows one by one
    rows = [[0], [1], [2]] if kind == "llama" else [[0, 1, 2]]
    got, expected = [], []
    for r in rows:
        inputs = _ours_inputs(m, [images[i] for i in r], [PROMPTS[i] for i in r], kind)
        with torch.inference_mode():
            a, b = m.model(**inputs).logits.float(), ref(**inputs).logits.float()
        valid = _valid(inputs, kind, a)
        got.append(a[valid])
        expected.append(b[valid])
    got, expected = torch.cat(got), torch.cat(expected)
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        diff = float((got - expected).abs().max())
        report("logits", kind=kind, dtype=dtype, max_abs_diff=diff)
        assert diff < 1e-3
    else:
        cos = float(F.cosine_similarity(got, expected, dim=-1).min())
        report("logits", kind=kind, dtype=dtype, min_cosine=cos)
        assert cos >= COSINE[dtype]


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_greedy_and_beam_texts_match_reference(kind_path, dtype, beams):
    kind, path = kind_path
    ref, proc = _reference(path, dtype)
    m = blip2.load(path, device=DEVICE, dtype=dtype)
    images = make_images(3, SIZE, seed=4)
    agree, explained = 0, 0
    for image, prompt in zip(images, PROMPTS, strict=True):
        gen = dict(max_new_tokens=12, num_beams=beams)
        theirs = _ref_generate(ref, proc, image, prompt, kind, dtype, **gen)
        ours = m.generate_ids([image], [prompt], **gen)[0]
        agree += ours == theirs
        explained += _same_or_near_tie(m, image, prompt, ours, theirs, dtype, "texts", beams)
    report("texts", kind=kind, dtype=dtype, beams=beams, identical=agree, of=len(images))
    assert explained == len(images)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_batch_equals_rows_alone(kind_path, dtype):
    kind, path = kind_path
    m = blip2.load(path, device=DEVICE, dtype=dtype)
    images = make_images(3, SIZE, seed=5)
    for gen in (dict(max_new_tokens=10), dict(max_new_tokens=8, num_beams=3)):
        batch = m.generate_ids(images, PROMPTS, **gen)
        for image, prompt, row in zip(images, PROMPTS, batch, strict=True):
            alone = m.generate_ids([image], [prompt], **gen)[0]
            assert _same_or_near_tie(m, image, prompt, row, alone, dtype, "batch", gen.get("num_beams", 1))


# ---- every public path ------------------------------------------------------------------------------------


def test_caption_ask_chat_stream(checkpoints):
    m = blip2.load(checkpoints("opt"), device=DEVICE, dtype=torch.float16)
    images = make_images(2, SIZE, seed=6)
    n = dict(max_new_tokens=8)
    assert m.caption(images, **n) == m.generate(images, None, **n)
    question = "what colour is the ball?"
    answer = m.ask(images[0], question, **n)
    assert answer == m.generate(images[0], f"Question: {question} Answer:", **n)[0]
    assert m.ask(images[0], [question, "where is it?"], **n)[0] == answer
    chat = m.chat(images[0], **n)
    assert chat.say(question) == answer
    assert "".join(m.stream(images[1], "a photo of", **n)) == m.generate(images[1], "a photo of", **n)[0]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_itm_itc_embeddings_match_reference(checkpoints, dtype):
    path = checkpoints("itm")
    ref, proc = _reference(path, dtype)
    m = blip2.load(path, device=DEVICE, dtype=dtype)
    images = make_images(3, SIZE, seed=7)
    texts = ["a red cube on the table.", "dog", "the zebra sleeps next to a golden ring."]
    inputs = _on_device(dict(proc(images=images, text=texts, return_tensors="pt", padding=True)))
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.inference_mode():
        itm = ref(**inputs, use_image_text_matching_head=True).logits_per_image.float().softmax(-1)[:, 1]
        itc = ref(**inputs, use_image_text_matching_head=False)
    got_itm = m.itm(images, texts).float().to(DEVICE)
    got_itc = m.itc(images, texts).float().to(DEVICE)
    d_itm = float((got_itm - itm).abs().max())
    d_itc = float((got_itc - itc.logits_per_image.float()).abs().max())
    cos = float(
        F.cosine_similarity(m.embed_texts(texts).float().to(DEVICE), itc.text_embeds.float(), dim=-1).min()
    )
    report("retrieval", dtype=dtype, itm_max_diff=d_itm, itc_max_diff=d_itc, text_embed_min_cosine=cos)
    tol = 0.02 if dtype == torch.float16 else 0.05
    assert d_itm < tol and d_itc < tol and cos > COSINE[dtype]


def test_training_steps_with_bf16_autocast(checkpoints, tmp_path):
    from test_train import CAPTIONS, _run  # the CPU tests' short run, here on the device

    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as f:
        for i, image in enumerate(make_images(8, SIZE, seed=8)):
            image.save(data / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "text": CAPTIONS[i]}) + "\n")
    out = tmp_path / "out"
    result = _run(checkpoints("opt"), data, out, 2, steps=4, device=str(DEVICE), dtype="bfloat16")
    losses = [
        json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line
    ]
    report("train", losses=losses)
    assert result.step == 4 and losses and all(torch.isfinite(torch.tensor(losses)))
    trained = blip2.load(out, device=DEVICE, dtype=torch.bfloat16)
    assert trained.caption(make_images(1, SIZE, seed=9), max_new_tokens=4)


def test_server_answers_as_the_pipeline(checkpoints):
    testclient = pytest.importorskip("starlette.testclient")
    pytest.importorskip("fastapi")
    import base64
    import io

    from blip2.serve import ServeConfig, create_app

    m = blip2.load(checkpoints("opt"), device=DEVICE, dtype=torch.float16)
    image = make_images(1, SIZE, seed=10)[0]
    buf = io.BytesIO()
    image.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {
        "model": "blip2",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "what is it?"},
                ],
            }
        ],  # fmt: skip
        "temperature": 0,
        "max_tokens": 8,
    }
    with testclient.TestClient(create_app(m, ServeConfig())) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == m.ask(image, "what is it?", max_new_tokens=8)
        r = client.post("/v1/caption", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["text"] == m.caption(image, max_new_tokens=30)[0]


# ---- int8 / int4 on CUDA --------------------------------------------------------------------------------


def _kernels():
    from blip2.quantize.cuda import has_cuda_kernel

    out = [("int8", "dequant"), ("int4", "tinygemm"), ("int4", "dequant")]
    if has_cuda_kernel("_weight_int8pack_mm"):
        out.append(("int8", "int8pack"))
    try:
        import bitsandbytes  # noqa: F401

        out += [("int8", "bnb"), ("int4", "bnb")]
    except Exception as e:  # noqa: BLE001 - absent, or its CUDA library does not load: not measured
        report("bitsandbytes", error=f"{type(e).__name__}: {e}")
    return out


def _weights_bytes(load) -> tuple[object, int]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    pipe = load()
    torch.cuda.synchronize()
    return pipe, torch.cuda.memory_allocated() - before


@needs_cuda
@pytest.mark.parametrize(("quantize", "kernel"), _kernels() if CUDA and torch.cuda.is_available() else [])
def test_quantized_memory_and_logits(checkpoints, quantize, kernel):
    path = checkpoints("wide")
    base, base_bytes = _weights_bytes(lambda: blip2.load(path, device="cuda", dtype=torch.float16))
    images = make_images(2, SIZE, seed=11)
    inputs = _ours_inputs(base, images, PROMPTS[:2], "opt")
    with torch.inference_mode():
        expected = base.model(**inputs).logits.float()
    del base
    pipe, q_bytes = _weights_bytes(
        lambda: blip2.load(path, device="cuda", dtype=torch.float16, quantize=f"{quantize}:{kernel}")
    )
    with torch.inference_mode():
        got = pipe.model(**inputs).logits.float()
    valid = inputs["attention_mask"].bool()
    cos = float(F.cosine_similarity(got[valid], expected[valid], dim=-1).min())
    ratio = q_bytes / base_bytes
    report("quantized", quantize=quantize, kernel=kernel, memory_ratio=ratio, min_cosine=cos)
    assert cos > (0.99 if quantize == "int8" else 0.9)
    if kernel != "bnb":  # bitsandbytes keeps its own layout (recorded, not held to ours)
        assert ratio <= (0.55 if quantize == "int8" else 0.30)
    assert pipe.generate(images, "a photo of", max_new_tokens=6)


# ---- placement over devices -----------------------------------------------------------------------------


@needs_cuda
def test_auto_split_over_gpu_and_cpu_equals_one_device(kind_path):
    from blip2.placement import FRONT_UNITS, meta_model, model_units

    kind, path = kind_path
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    one = blip2.load(path, device="cuda", dtype=torch.float32)
    units = model_units(meta_model(one.config), torch.float32)
    front = sum(u.bytes for u in units if u.name in FRONT_UNITS)
    first_layer = next(u for u in units if u.name not in FRONT_UNITS).bytes
    split = blip2.load(path, device="auto", dtype=torch.float32,
                       max_memory={"cuda:0": front + first_layer + 1024, "cpu": "16GiB"})  # fmt: skip
    devices = {p.device.type for p in split.model.language_model.parameters()}
    assert devices == {"cuda", "cpu"} and split.device.type == "cuda"
    images = make_images(3, SIZE, seed=12)
    inputs = _ours_inputs(one, images, PROMPTS, kind)
    with torch.inference_mode():
        a, b = one.model(**inputs).logits, split.model(**inputs).logits
    diff = float((a - b).abs().max())
    report("split", kind=kind, max_abs_diff=diff)
    assert diff < 1e-3
    for gen in (dict(max_new_tokens=10), dict(max_new_tokens=8, num_beams=3)):
        assert split.generate_ids(images, PROMPTS, **gen) == one.generate_ids(images, PROMPTS, **gen)
    # an explicit map, half precision: the same API
    mapped = blip2.load(path, device={"": 0, "language_model": "cpu", "language_model.embed": 0},
                        dtype=torch.bfloat16)  # fmt: skip
    assert mapped.generate(images, PROMPTS, max_new_tokens=4)


# ---- the captured decode --------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_captured_decode_equals_plain(kind_path, dtype):
    kind, path = kind_path
    plain = blip2.load(path, device="cuda", dtype=dtype)
    graphs = blip2.load(path, device="cuda", dtype=dtype, compile=True)
    images = make_images(3, SIZE, seed=13)
    for gen in (dict(max_new_tokens=12), dict(max_new_tokens=8, num_beams=3), dict(max_new_tokens=10)):
        ours = graphs.generate_ids(images, PROMPTS, **gen)
        for image, prompt, a, b in zip(
            images, PROMPTS, ours, plain.generate_ids(images, PROMPTS, **gen), strict=True
        ):
            assert _same_or_near_tie(plain, image, prompt, a, b, dtype, "graphs", gen.get("num_beams", 1))
    decoder = graphs.decoder
    assert decoder.captures >= 2  # greedy and beam shapes; the third call replays the first
    report("graphs", kind=kind, dtype=dtype, captures=decoder.captures,
           steps={str(k): s.steps for k, s in decoder._shapes.items()})  # fmt: skip


@needs_cuda
def test_captured_decode_waits_for_the_device_once_per_token(checkpoints):
    pipe = blip2.load(checkpoints("opt"), device="cuda", dtype=torch.float16, compile=True)
    images = make_images(2, SIZE, seed=14)
    pipe.generate_ids(images, PROMPTS[:2], max_new_tokens=4)  # capture outside the count
    n = 16
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pipe.generate_ids(images, PROMPTS[:2], max_new_tokens=n, min_new_tokens=n)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    report("syncs", tokens=n, syncs=syncs, first=[str(w.message)[:120] for w in caught[:3]])
    assert all(len(row) == n for row in out)
    assert syncs <= n + 12  # one read per token, plus the prompt's preparation
