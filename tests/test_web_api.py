"""The routes the web page uses, over HTTP without a browser: the page's files, /v1/attention, the
index's /v1/index, /v1/search and thumbnails, and beam search in chat; answers held against the
Python API (blip2.attention_map, Pipeline.search), errors against their statuses."""

from __future__ import annotations

import base64
import http.client
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blip2
from blip2.attention_map import attention_map, question_prompt
from blip2.errors import InputError
from blip2.index import Index
from blip2.indexing import build_index
from blip2.serve import ServeConfig, create_app
from test_serve import KEY, MODEL, assert_error, chat_body, data_url, post_json, raw, running

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def demo():
    return blip2.load("demo")


@pytest.fixture(scope="module")
def demo_port(demo):
    with running(demo, max_prompt_tokens=64) as (port, _, _):
        yield port


@pytest.fixture(scope="module")
def scene():
    return Image.open(EXAMPLES / "scene1.png").convert("RGB")


def decode_png(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_page_files(demo_port):
    status, headers, body = raw(demo_port, "GET", "/", headers={"Authorization": ""})
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    assert '<script src="/static/app.js"' in body and "http" not in body.split("<body>")[1]  # nothing remote
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, body = raw(demo_port, "GET", f"/static/{name}", headers={"Authorization": ""})
        assert status == 200 and headers["content-type"].startswith(kind) and len(body) > 1000
    for path in ("/static/index.py", "/static/..%2Fweb.py", "/static/%2E%2E/web.py"):
        status, _, body = raw(demo_port, "GET", path, headers={"Authorization": ""})
        assert status == 404, path
    status, _, body = raw(demo_port, "GET", "/v1/models", headers={"Authorization": ""})
    assert_error(status, body, 401)  # the page is open; the API still needs the key


def test_attention(demo_port, demo, scene):
    url = data_url(scene)
    status, _, body = post_json(demo_port, "/v1/attention", {"model": MODEL, "image_url": url})
    assert status == 200, body
    assert body["method"] == "attention"
    np.testing.assert_allclose(body["grid"], attention_map(demo, scene).grid, atol=2e-6)
    heat = decode_png(body["heatmap"])
    assert heat.mode == "RGBA" and heat.size == (512, 512)

    question, answer = "what shape is on the left?", "triangle"
    request = {
        "model": MODEL,
        "image_url": {"url": url},
        "text": answer,
        "question": question,
        "method": "gradcam",
    }
    status, _, body = post_json(demo_port, "/v1/attention", request)
    assert status == 200 and body["method"] == "gradcam"
    expected = attention_map(demo, scene, answer, prompt=question_prompt(demo, question), method="gradcam")
    np.testing.assert_allclose(body["grid"], expected.grid, atol=2e-6)


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"image_url": None}, 422, "image_url or as index_path"),
        ({"index_path": "a.png"}, 422, "image_url or as index_path"),
        ({"image_url": None, "index_path": "a.png"}, 404, "no index"),
        ({"question": "what?", "prompt": "p"}, 422, "question or prompt"),
        ({"method": "gradcam"}, 422, "needs the text"),
        ({"method": "saliency"}, 422, "method"),
        ({"image_url": "data:image/png;base64,!!!"}, 400, "not valid base64"),
        ({"image_url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}, 400, "not an image"),
        ({"text": "red " * 200}, 413, "at most 64"),
        ({"model": "other"}, 404, "not served here"),
    ],
)
def test_attention_errors(demo_port, scene, change, status, message):
    request = {"model": MODEL, "image_url": data_url(scene), **change}
    request = {k: v for k, v in request.items() if v is not None}
    got, _, body = post_json(demo_port, "/v1/attention", request)
    assert_error(got, body, status)
    assert message in body["error"]["message"]


def test_beam_search_in_chat(demo_port, demo, scene):
    question = "what colour is the shape at the top?"
    status, _, body = post_json(
        demo_port, "/v1/chat/completions", chat_body(scene, question, num_beams=3, max_tokens=10)
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == demo.ask(
        scene, question, num_beams=3, max_new_tokens=10
    )
    for change, message in (({"num_beams": 9}, "num_beams must lie in [1, 8]"),
                            ({"num_beams": 2, "temperature": 0.5}, "takes temperature 0")):  # fmt: skip
        status, _, body = post_json(demo_port, "/v1/chat/completions", chat_body(scene, question, **change))
        assert_error(status, body, 422)
        assert message in body["error"]["message"]


# ---- search over an index ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def itm_index(tmp_path_factory):
    itm = blip2.load("demo-itm")
    folder = tmp_path_factory.mktemp("itm-index")
    build_index(itm, EXAMPLES, folder, model="demo-itm", progress=False)
    return itm, Index.open(folder)


def test_search(itm_index, scene):
    itm, index = itm_index
    text = "a small red triangle on the left"
    with running(itm, index=str(index.folder)) as (port, _, _):
        status, _, body = raw(port, "GET", "/v1/index")
        assert status == 200 and body["images"] == 5 and body["text_search"] is True

        def paths(request):
            status, _, body = post_json(port, "/v1/search", {"model": MODEL, **request})
            assert status == 200, body
            return [(h["path"], round(h["score"], 5), h["itm"] and round(h["itm"], 5)) for h in body["data"]]

        def expected(hits):
            return [(h.path, round(h.score, 5), h.itm and round(h.itm, 5)) for h in hits]

        assert paths({"text": text, "top": 3}) == expected(itm.search(text, index, top=3))
        assert paths({"text": text, "rerank": True}) == expected(itm.search(text, index, top=12, rerank=-1))
        like = paths({"index_path": "scene2.png"})
        assert (
            like == expected(itm.search(EXAMPLES / "scene2.png", index, top=12))
            and like[0][0] == "scene2.png"
        )
        assert paths({"image_url": data_url(scene)}) == expected(itm.search(scene, index, top=12))

        for request, status, message in [
            ({"text": text, "index_path": "scene2.png"}, 422, "one of text"),
            ({}, 422, "one of text"),
            ({"text": "  "}, 422, "empty"),
            ({"index_path": "scene2.png", "rerank": True}, 422, "needs a text"),
            ({"index_path": "../README.md"}, 404, "not an image of the index"),
            ({"text": text, "top": 0}, 422, "top"),
        ]:
            got, _, body = post_json(port, "/v1/search", {"model": MODEL, **request})
            assert_error(got, body, status)
            assert message in body["error"]["message"], body

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(
            "GET", "/v1/index/image?path=photo.png&size=128", headers={"Authorization": f"Bearer {KEY}"}
        )
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "image/jpeg"
        with Image.open(io.BytesIO(resp.read())) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) == 128
        conn.close()
        for query, status in (
            ("path=../README.md", 404),
            ("path=photo.png&size=10", 422),
            ("path=nope.png", 404),
        ):
            got, _, body = raw(port, "GET", f"/v1/index/image?{query}")
            assert_error(got, body, status)

        status, _, body = post_json(
            port, "/v1/attention", {"model": MODEL, "index_path": "scene1.png", "text": text}
        )
        assert status == 200 and body["method"] == "gradcam"
        np.testing.assert_allclose(
            body["grid"], attention_map(itm, EXAMPLES / "scene1.png", text).grid, atol=2e-6
        )


def test_image_only_index_and_mismatch(demo, itm_index, tmp_path):
    """A generation model's index (Q-Former features) is searched by image only; an index must fit the model."""
    folder = tmp_path / "gen-index"
    build_index(demo, EXAMPLES, folder, model="demo", progress=False)
    with running(demo, index=str(folder)) as (port, _, _):
        status, _, body = raw(port, "GET", "/v1/index")
        assert status == 200 and body["text_search"] is False
        status, _, body = post_json(port, "/v1/search", {"model": MODEL, "index_path": "scene3.png"})
        assert status == 200 and body["data"][0]["path"] == "scene3.png"
        status, _, body = post_json(port, "/v1/search", {"model": MODEL, "text": "a red circle"})
        assert_error(status, body, 422)
        assert "retrieval checkpoint" in body["error"]["message"]
    with pytest.raises(InputError, match="serve it with a retrieval checkpoint"):
        create_app(demo, ServeConfig(model_name=MODEL, api_key=KEY, index=str(itm_index[1].folder)))
    with pytest.raises(InputError, match="not a blip2 index"):
        create_app(demo, ServeConfig(index=str(tmp_path)))


def test_open_flag_opens_the_page_once_the_port_is_up(monkeypatch):
    """``blip2 serve --open``: the browser is pointed at the page only once the server takes connections."""
    import socket
    import threading
    import webbrowser

    from blip2.serve.cli import _open_when_up

    opened = threading.Event()
    urls = []
    monkeypatch.setattr(webbrowser, "open", lambda url: (urls.append(url), opened.set()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        _open_when_up("0.0.0.0", port, wait_s=20)
        assert not opened.wait(0.6)  # nothing listens yet
        s.listen()
        assert opened.wait(10)
    assert urls == [f"http://127.0.0.1:{port}/"]
