"""The HTTP server on loopback, called with the official ``openai`` client (and raw HTTP for the edges).

Each server runs uvicorn in a thread on a free port over a pipeline loaded once per module; the
answers are compared with a second pipeline of the same checkpoint, called through the Python API.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from PIL import Image  # noqa: E402

import blip2  # noqa: E402
from blip2.serve import ServeConfig, create_app  # noqa: E402
from factory import make_images  # noqa: E402

KEY = "test-key"
MODEL = "tiny-opt"
N = 8  # max_tokens in most cases: short, and past the point where the tiny model's texts differ


# ---- harness -------------------------------------------------------------------------------------------


@contextmanager
def running(pipe, **settings):
    """A live server on 127.0.0.1: yields its port; stops gracefully (as on SIGTERM) on exit."""
    cfg = ServeConfig(**{"model_name": MODEL, "api_key": KEY, **settings})
    app = create_app(pipe, cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=10)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield port, server, app
    finally:
        server.should_exit = True
        thread.join(15)


def client(port, key=KEY, **kw):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, **kw)


def raw(port, method, path, body=b"", headers=None, timeout=30):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode("utf-8", "replace")
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed


def post_json(port, path, obj, **kw):
    return raw(port, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"}, **kw)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(image, text):
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": text},
        ],
    }


def chat_body(image, text="what is it?", **kw):
    return {"model": MODEL, "messages": [user(image, text)], "temperature": 0, "max_tokens": N, **kw}


def assert_error(status, body, expected):
    assert status == expected, body
    assert set(body["error"]) >= {"message", "type", "code"} and body["error"]["message"]
    assert "Traceback" not in json.dumps(body)


class Gate:
    """The pipeline with its generation held at a gate: the worker blocks until ``open()``."""

    def __init__(self, pipe):
        self._pipe, self._event, self.entered = pipe, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate_steps(self, *args, **kw):
        self.entered.set()
        self._event.wait(30)
        yield from self._pipe.generate_steps(*args, **kw)

    def open(self):
        self._event.set()


def wait_for(predicate, timeout=10):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.01)


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(opt_ckpt):
    return blip2.load(opt_ckpt)


@pytest.fixture(scope="module")
def ref(opt_ckpt):
    return blip2.load(opt_ckpt)


@pytest.fixture(scope="module")
def images():
    return make_images(4, size=64, seed=1)


@pytest.fixture(scope="module")
def live(pipe):
    with running(
        pipe,
        max_batch=4,
        max_body_bytes=300_000,
        max_image_pixels=200 * 200,
        max_output_tokens=64,
        max_prompt_tokens=64,
    ) as (port, _, _):
        yield port


# ---- answers equal the Python API -----------------------------------------------------------------------


def test_chat_equals_python_api(live, ref, images):
    c = client(live)
    for image in images[:2]:
        r = c.chat.completions.create(
            model=MODEL, messages=[user(image, "how many dogs are there?")], temperature=0, max_tokens=N
        )
        assert r.choices[0].message.content == ref.ask(image, "how many dogs are there?", max_new_tokens=N)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens == len(
            ref.generate_ids(image, "Question: how many dogs are there? Answer:", max_new_tokens=N)[0]
        )
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        # raw_prompt: the text is continued as is, as Pipeline.generate does
        r = c.chat.completions.create(
            model=MODEL,
            messages=[user(image, "the red")],
            temperature=0,
            max_tokens=N,
            extra_body={"raw_prompt": True},
        )
        assert r.choices[0].message.content == ref.generate(image, "the red", max_new_tokens=N)[0]


def test_chat_history_equals_conversation(live, ref, images):
    conversation = ref.chat(images[0], max_new_tokens=N)
    first = conversation.say("what is it?")
    second = conversation.say("and the colour?")
    messages = [
        user(images[0], "what is it?"),
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and the colour?"},
    ]
    r = client(live).chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=N)
    assert r.choices[0].message.content == second


def test_stream_reassembles(live, ref, images):
    c = client(live)
    for image, prompt in [(images[0], "the red"), (images[1], "the red")]:
        stream = c.chat.completions.create(
            model=MODEL,
            messages=[user(image, prompt)],
            temperature=0,
            max_tokens=N,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"raw_prompt": True},
        )
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == ref.generate(image, prompt, max_new_tokens=N)[0]
        assert finish in ("stop", "length") and usage.completion_tokens >= 1


def test_concurrent_requests_share_batches_and_equal_alone(live, ref, images):
    prompts = ["the red", "a photo of", "the", "the red cube"]
    jobs = [(images[i % 4], prompts[i % 4], N - i % 3) for i in range(8)]

    def call(job):
        image, prompt, n = job
        r = client(live).chat.completions.create(
            model=MODEL,
            messages=[user(image, prompt)],
            temperature=0,
            max_tokens=n,
            extra_body={"raw_prompt": True},
        )
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, jobs))
    assert got == [ref.generate(img, p, max_new_tokens=n)[0] for img, p, n in jobs]
    status, _, text = raw(live, "GET", "/metrics")
    assert status == 200
    count = _metric(text, 'blip2_batch_rows_count{kind="generate"}')
    total = _metric(text, 'blip2_batch_rows_sum{kind="generate"}')
    assert total > count  # some forward pass held more than one request


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _has_word_char(text: str) -> bool:
    return any(i > 0 and ch.isascii() and ch.isalnum() for i, ch in enumerate(text))


def test_choices_stop_and_seed(live, ref, images):
    c = client(live)
    # a prompt whose text has a letter past its start, to cut at (the random model's texts are often bytes)
    full, prompt = next(
        (text, p)
        for p in ("the red", "a", "the", "There are two green cubes and a")
        for text in ref.generate(images[0], p, max_new_tokens=N)
        if _has_word_char(text)
    )
    r = c.chat.completions.create(
        model=MODEL,
        messages=[user(images[0], prompt)],
        temperature=0,
        max_tokens=N,
        n=2,
        extra_body={"raw_prompt": True},
    )
    assert [ch.message.content for ch in r.choices] == [full, full] and [ch.index for ch in r.choices] == [
        0,
        1,
    ]
    k = next(i for i, ch in enumerate(full) if i > 0 and ch.isascii() and ch.isalnum())
    stop = full[k : k + 2]  # held back in the stream until it is clear it is one
    r = c.chat.completions.create(
        model=MODEL,
        messages=[user(images[0], prompt)],
        temperature=0,
        max_tokens=N,
        stop=[stop],
        extra_body={"raw_prompt": True},
    )
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[user(images[0], prompt)],
        temperature=0,
        max_tokens=N,
        stop=stop,
        stream=True,
        extra_body={"raw_prompt": True},
    )
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == full[: full.index(stop)]
    )
    sampled = [
        c.chat.completions.create(
            model=MODEL,
            messages=[user(images[1], "the red")],
            temperature=1.0,
            seed=7,
            max_tokens=N,
            n=2,
            extra_body={"raw_prompt": True},
        )
        for _ in range(2)
    ]
    assert [ch.message.content for ch in sampled[0].choices] == [
        ch.message.content for ch in sampled[1].choices
    ]


def test_caption_upload(live, ref, images):
    buf = io.BytesIO()
    images[2].save(buf, "PNG")
    boundary = "blip2boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="max_tokens"\r\n\r\n{N}\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nthe red\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + buf.getvalue()
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    status, _, body = raw(
        live,
        "POST",
        "/v1/caption",
        b"".join(parts),
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200, body
    assert body["text"] == ref.caption(images[2], prompt="the red", max_new_tokens=N)[0]
    status, _, body = raw(live, "POST", "/v1/caption", buf.getvalue(), {"Content-Type": "image/png"})
    assert status == 200 and body["text"] == ref.caption(images[2], max_new_tokens=min(30, 64))[0]


def test_models_health_metrics(live):
    assert [m.id for m in client(live).models.list().data] == [MODEL]
    status, _, body = raw(live, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and body["status"] == "ok" and body["queue_depth"] == 0
    status, _, text = raw(live, "GET", "/metrics", headers={"Authorization": ""})
    assert status == 200
    for name in (
        "blip2_requests_total",
        "blip2_request_seconds_bucket",
        "blip2_batch_rows",
        "blip2_queue_depth",
    ):
        assert name in text


# ---- errors -------------------------------------------------------------------------------------------------


def test_auth(live, images):
    with pytest.raises(openai.AuthenticationError):
        client(live, key="wrong").chat.completions.create(**chat_body(images[0]))
    status, headers, body = raw(live, "GET", "/v1/models", headers={"Authorization": ""})
    assert_error(status, body, 401)
    status, _, body = raw(live, "GET", "/v1/models", headers={"Authorization": "Basic " + KEY})
    assert_error(status, body, 401)


def test_error_statuses(live, images):
    c = client(live)
    # 400: not JSON, not an object, an image that is not one
    status, _, body = raw(
        live, "POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"}
    )
    assert_error(status, body, 400)
    assert_error(*post_json(live, "/v1/chat/completions", [1, 2])[::2], 400)
    bad = chat_body(images[0])
    bad["messages"][0]["content"][0]["image_url"]["url"] = (
        "data:image/png;base64," + base64.b64encode(b"nope").decode()
    )
    assert_error(*post_json(live, "/v1/chat/completions", bad)[::2], 400)
    bad["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,@@@"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(**bad)
    # 422: bad fields
    for fields in (
        {"temperature": 5},
        {"n": 100},
        {"max_tokens": 10_000},
        {"top_p": 0},
        {"stop": ["a"] * 5},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "no image here"}]},
    ):
        status, _, body = post_json(live, "/v1/chat/completions", {**chat_body(images[0]), **fields})
        assert_error(status, body, 422)
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(**chat_body(images[0], temperature=-1))
    remote = chat_body(images[0])
    remote["messages"][0]["content"][0]["image_url"]["url"] = "http://127.0.0.1:9/x.png"
    assert_error(*post_json(live, "/v1/chat/completions", remote)[::2], 422)  # remote URLs are off
    # 413: the body, the image's pixels, the prompt
    status, _, body = post_json(live, "/v1/chat/completions", chat_body(images[0], "x" * 400_000))
    assert_error(status, body, 413)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(**chat_body(Image.new("RGB", (300, 300))))
    assert e.value.status_code == 413
    assert_error(*post_json(live, "/v1/chat/completions", chat_body(images[0], "dog " * 100))[::2], 413)
    # 404: another model, an endpoint this checkpoint lacks
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(**{**chat_body(images[0]), "model": "gpt-4o"})
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model=MODEL, input="a dog")
    # after all that, the server still answers
    assert c.chat.completions.create(**chat_body(images[0])).choices[0].message.content is not None


def test_busy_queue_503_disconnect_and_graceful_stop(pipe, images):
    gate = Gate(pipe)
    with running(gate, max_batch=1, max_queue=1, batch_wait_ms=0) as (port, server, app):
        body = chat_body(images[0])
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(post_json, port, "/v1/chat/completions", body)  # runs, held at the gate
            wait_for(gate.entered.is_set)
            # a client that gives up while queued frees its place
            with pytest.raises(OSError):
                post_json(port, "/v1/chat/completions", body, timeout=0.5)
            wait_for(lambda: raw(port, "GET", "/health")[2]["queue_depth"] == 0)
            second = pool.submit(post_json, port, "/v1/chat/completions", body)  # queued
            wait_for(lambda: raw(port, "GET", "/health")[2]["queue_depth"] == 1)
            status, headers, err = post_json(port, "/v1/chat/completions", body)
            assert_error(status, err, 503)
            assert int(headers["retry-after"]) >= 1
            with pytest.raises(openai.InternalServerError):
                client(port).chat.completions.create(**body)
            server.should_exit = True  # what SIGTERM does: in-flight requests still finish
            time.sleep(0.2)
            gate.open()
            assert first.result(20)[0] == 200 and second.result(20)[0] == 200


def test_timeout_504(pipe, images):
    gate = Gate(pipe)
    with running(gate, request_timeout=0.5) as (port, _, _):
        status, _, body = post_json(port, "/v1/chat/completions", chat_body(images[0]))
        gate.open()
        assert_error(status, body, 504)
        wait_for(lambda: raw(port, "GET", "/health")[2]["busy"] is False)
        assert post_json(port, "/v1/chat/completions", chat_body(images[0]))[0] == 200


class Faulty:
    """The pipeline, failing any batch that holds the prompt "boom"."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate_steps(self, images, prompts, **kw):
        if any("boom" in p for p in prompts):
            raise blip2.InputError("boom")
        return self._pipe.generate_steps(images, prompts, **kw)


def test_bad_request_in_a_batch_fails_alone(pipe, ref, images):
    with running(Faulty(pipe), batch_wait_ms=300) as (port, _, _):
        bodies = [chat_body(images[i], p, raw_prompt=True) for i, p in enumerate(["the red", "boom", "the"])]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda b: post_json(port, "/v1/chat/completions", b), bodies))
        assert [a[0] for a in answers] == [200, 422, 200]
        assert (
            answers[0][2]["choices"][0]["message"]["content"]
            == ref.generate(images[0], "the red", max_new_tokens=N)[0]
        )
        assert (
            answers[2][2]["choices"][0]["message"]["content"]
            == ref.generate(images[2], "the", max_new_tokens=N)[0]
        )
        _, _, text = raw(port, "GET", "/metrics")
        assert _metric(text, 'blip2_batch_rows_sum{kind="generate"}') >= 3


class FailsAfterFirstStep:
    """The pipeline, whose generation raises after yielding its first step: once for the first batch
    of more than one row, and every time for a batch holding a prompt with "boom". Records the
    batches' sizes and the tokens each run was given as forced."""

    def __init__(self, pipe):
        self._pipe, self.batches, self.faults, self.forced = pipe, [], 0, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate_steps(self, images, prompts, forced=None, **kw):
        steps = self._pipe.generate_steps(images, prompts, forced=forced, **kw)
        self.batches.append(len(prompts))
        self.forced.append(forced)
        if any("boom" in p for p in prompts) or (len(prompts) > 1 and not self.faults):
            self.faults += 1
            return self._fail_after_first(steps)
        return steps

    @staticmethod
    def _fail_after_first(steps):
        yield next(steps)
        steps.close()
        raise RuntimeError("injected fault after the first step")


def stream_events(port, body) -> list:
    """The data events of one raw streaming request, parsed (``[DONE]`` kept as the string)."""
    status, _, text = post_json(port, "/v1/chat/completions", dict(body, stream=True))
    assert status == 200, text
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def streamed_text(events) -> str:
    return "".join(
        ch["delta"].get("content") or "" for e in events if isinstance(e, dict) for ch in e.get("choices", [])
    )


def _first_piece_shows(pipe, image, prompt) -> bool:
    """The first token is text of its own, which a re-sent first step would visibly repeat."""
    ids = pipe.generate_ids(image, prompt, max_new_tokens=N)[0]
    first, text = pipe.processor.decode(ids[:1]), pipe.processor.decode(ids)
    return bool(first.strip()) and "\ufffd" not in first and not text.startswith(first * 2)


def test_failed_batch_resumes_streams_never_twice(pipe, ref, images):
    """A batch fails after its first step (already streamed): each request runs again alone from the
    tokens it was sent, and every client's text is the text of a run that never failed."""
    prompts = ["a", "Question: what is it? Answer:", "the red cube", "There are two green cubes and a", "the"]
    cases = [(im, p) for p in prompts for im in images if _first_piece_shows(ref, im, p)][:4]
    assert len(cases) == 4
    wrapped = FailsAfterFirstStep(pipe)
    with running(wrapped, max_batch=4, batch_wait_ms=1000) as (port, _, _):
        bodies = [chat_body(im, p, raw_prompt=True) for im, p in cases]
        with ThreadPoolExecutor(4) as pool:
            answer = pool.submit(post_json, port, "/v1/chat/completions", bodies[3])
            streams = list(pool.map(lambda b: stream_events(port, b), bodies[:3]))
        for events, (image, prompt) in zip(streams, cases[:3], strict=True):
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            assert streamed_text(events) == ref.generate(image, prompt, max_new_tokens=N)[0]
        status, _, body = answer.result()
        assert status == 200
        image, prompt = cases[3]
        assert body["choices"][0]["message"]["content"] == ref.generate(image, prompt, max_new_tokens=N)[0]
    assert wrapped.faults == 1 and wrapped.batches[0] == 4  # the fault hit the batch of all four
    # each request ran again alone, from its one token of the failed batch
    assert wrapped.batches[1:] == [1] * 4 and all(len(f) == 1 and len(f[0]) == 1 for f in wrapped.forced[1:])


def test_stream_that_fails_again_ends_in_an_error_after_its_text(pipe, ref, images):
    """A request whose run alone fails too: its stream is what was sent, then an error event; the
    other request of the batch is unharmed."""
    image, bad_prompt = next(
        (im, p) for p in ["the boom", "boom a", "a boom"] for im in images if _first_piece_shows(ref, im, p)
    )
    wrapped = FailsAfterFirstStep(pipe)
    with running(wrapped, max_batch=2, batch_wait_ms=1000) as (port, _, _):
        bodies = [chat_body(image, "the red", raw_prompt=True), chat_body(image, bad_prompt, raw_prompt=True)]
        with ThreadPoolExecutor(2) as pool:
            good, bad = pool.map(lambda b: stream_events(port, b), bodies)
    assert wrapped.batches[0] == 2 and wrapped.faults == 2  # the batch, then the "boom" request alone
    assert good[-1] == "[DONE]" and streamed_text(good) == ref.generate(image, "the red", max_new_tokens=N)[0]
    first = ref.generate_ids(image, bad_prompt, max_new_tokens=N)[0][:1]
    assert streamed_text(bad) == ref.processor.decode(first)  # the first step, once
    assert "error" in bad[-1] and "[DONE]" not in bad


def test_remote_images_when_allowed(pipe, ref, images, tmp_path):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    images[3].save(tmp_path / "small.png")
    Image.new("RGB", (400, 400), (200, 10, 10)).save(tmp_path / "big.bmp")  # 480 kB
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        with running(pipe, allow_remote_images=True, max_image_bytes=100_000) as (port, _, _):
            body = chat_body(images[3], "the red", raw_prompt=True)
            body["messages"][0]["content"][0]["image_url"]["url"] = f"{base}/small.png"
            status, _, answer = post_json(port, "/v1/chat/completions", body)
            assert status == 200, answer
            assert (
                answer["choices"][0]["message"]["content"]
                == ref.generate(images[3], "the red", max_new_tokens=N)[0]
            )
            body["messages"][0]["content"][0]["image_url"]["url"] = f"{base}/big.bmp"
            assert_error(*post_json(port, "/v1/chat/completions", body)[::2], 413)
            body["messages"][0]["content"][0]["image_url"]["url"] = f"{base}/missing.png"
            assert_error(*post_json(port, "/v1/chat/completions", body)[::2], 400)
    finally:
        files.shutdown()


# ---- embeddings ---------------------------------------------------------------------------------------------


def test_embeddings(itm_ckpt, images):
    import torch

    itm = blip2.load(itm_ckpt)
    ref = blip2.load(itm_ckpt)
    texts = ["a red cube", "two dogs by the river"]
    with running(itm) as (port, _, _):
        r = client(port).embeddings.create(model=MODEL, input=texts)  # the client asks for base64
        got = torch.tensor([d.embedding for d in r.data])
        assert torch.allclose(got, ref.embed_texts(texts), atol=1e-5)
        parts = [{"type": "image_url", "image_url": {"url": data_url(images[0])}}, "a red cube"]
        status, _, body = post_json(
            port, "/v1/embeddings", {"model": MODEL, "input": parts, "image_embedding": "queries"}
        )
        assert status == 200, body
        queries = ref.embed_images([images[0]])[0]  # (Q, E)
        assert torch.allclose(torch.tensor(body["data"][0]["embedding"]), queries.flatten(), atol=1e-5)
        assert body["usage"]["prompt_tokens"] > 0
        with pytest.raises(openai.NotFoundError):  # a retrieval checkpoint does not chat
            client(port).chat.completions.create(**chat_body(images[0]))


# ---- the command ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_serve_sigterm_finishes_in_flight(opt_ckpt, images):
    """``blip2 serve`` in its own process: a stream in flight when SIGTERM comes still ends with [DONE],
    and the process exits 0."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "blip2", "serve", "--model", str(opt_ckpt), "--port", str(port),
           "--api-key", KEY, "--served-model-name", MODEL, "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            try:
                if raw(port, "GET", "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = chat_body(images[0], "the red", stream=True, max_tokens=64, raw_prompt=True)
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.read1(65536)  # the first chunk(s): the stream is under way
        proc.send_signal(signal.SIGTERM)
        rest = resp.read()
        assert first.startswith(b"data: ") and rest.rstrip().endswith(b"data: [DONE]")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
