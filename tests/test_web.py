"""The web page in a real browser: headless Chromium (Debian's, driven by Playwright) against ``blip2 serve``
running in its own process with the demo model (the search view: test_serve's in-process server over
demo-itm and an index of the examples). What the page shows is held against the Python API:
the caption equals ``blip2 caption``'s, streamed replies equal ``blip2 ask``'s and the chat's, search
results equal ``blip2 search``'s. Needs ``chromium`` (tests/setup.sh installs it) and ``playwright``
(the dev extra); in CI (``CI`` set) their absence is a failure, elsewhere a skip.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blip2
from blip2.serve.errors import QueueFull
from test_serve import running

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "examples" / "scene1.png"
KEY = "page-key"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000
# hands the page a file as a drop on its drop zone or as a paste, the way a browser does
HAND_OVER = """([event, name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/png" }));
  const init = { bubbles: true, cancelable: true };
  if (event === "drop") {
    document.getElementById("drop").dispatchEvent(new DragEvent("drop", { ...init, dataTransfer: data }));
  } else {
    document.dispatchEvent(new ClipboardEvent("paste", { ...init, clipboardData: data }));
  }
}"""


def _missing(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why}: run `bash tests/setup.sh` (CI must run the browser tests)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).exists():
        _missing("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        # a persistent context gives the fresh user-data folder Chromium is asked to use
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1180, "height": 640},
            bypass_csp=True,  # the page's policy forbids eval, which wait_for_function's predicates use
        )
        yield context
        context.close()


@contextmanager
def serving(*args: str):
    """``blip2 serve ARGS`` in its own process on a free port; yields the page's URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "blip2", "serve", *args, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"blip2 serve exited: {proc.stderr.read()}")
            assert time.time() < deadline, "blip2 serve did not start"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def screenshot(page, tmp_path: Path, name: str, readme: bool = False) -> Path:
    """Saved under the test's folder (and, for the README's, to $BLIP2_WEB_SCREENSHOT_DIR when set)."""
    path = tmp_path / name
    page.screenshot(path=str(path))
    with Image.open(path) as shot:
        assert shot.size[0] >= 800 and np.asarray(shot.convert("L")).std() > 5  # a page, not a blank
    if readme and os.environ.get("BLIP2_WEB_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["BLIP2_WEB_SCREENSHOT_DIR"]) / name)
    return path


@pytest.fixture(scope="module")
def demo():
    return blip2.load("demo")


def test_caption_chat_heatmap_and_errors(browser, demo, tmp_path):
    question, follow_up = "what shape is on the left?", "what colour is the shape at the top?"
    image = Image.open(SCENE).convert("RGB")
    big = tmp_path / "big.png"  # noise compresses badly: well over the server's 100 kB image limit
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(big)
    not_image = tmp_path / "notes.png"
    not_image.write_text("these are notes, not a picture\n")

    with serving("--model", "demo", "--api-key", KEY, "--max-image-bytes", "100000") as url:
        page = browser.new_page()
        assert "default-src 'self'" in page.request.get(url).headers["content-security-policy"]
        chats = []
        page.on("request", lambda r: chats.append(r) if r.url.endswith("/v1/chat/completions") else None)
        page.goto(url)
        # the key: a wrong one is refused and asked again; the right one is kept for the tab
        page.locator("#key-dialog").wait_for(state="visible", timeout=WAIT_MS)
        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        page.wait_for_function(
            "document.getElementById('key-note').textContent.includes('refused')", timeout=WAIT_MS
        )
        page.fill("#api-key", KEY)
        page.press("#api-key", "Enter")
        page.wait_for_function(
            "document.getElementById('model-line').textContent.includes('generation')", timeout=WAIT_MS
        )
        assert page.evaluate("sessionStorage.getItem('blip2-api-key')") == KEY

        page.set_input_files("#file", str(SCENE))
        page.locator("#preview").wait_for(state="visible", timeout=WAIT_MS)

        # Caption: the same text as `blip2 caption`, streamed
        page.click("#caption")
        page.locator("#caption-line .look").wait_for(timeout=WAIT_MS)
        assert text_of(page, "#caption-text") == demo.caption(image)[0].strip()
        request = json.loads(chats[-1].post_data)
        assert request["stream"] is True and request["raw_prompt"] is True
        assert chats[-1].response().headers["content-type"].startswith("text/event-stream")

        # a question (Enter sends it), then one more in the same conversation
        page.fill("#message", question)
        page.press("#message", "Enter")
        page.locator("#conversation li.assistant .look").wait_for(timeout=WAIT_MS)
        assert text_of(page, "#conversation li.assistant .text") == demo.ask(image, question).strip()
        assert json.loads(chats[-1].post_data)["stream"] is True
        page.fill("#message", follow_up)
        page.press("#message", "Enter")
        page.locator("#conversation li.assistant >> nth=1").locator(".look").wait_for(timeout=WAIT_MS)
        chat = demo.chat(image)
        expected = [chat.say(question), chat.say(follow_up)]
        replies = page.locator("#conversation li.assistant .text").all_inner_texts()
        assert [r.strip() for r in replies] == [e.strip() for e in expected]

        # where it looked: the overlay comes with the button and goes with the toggle
        page.locator("#conversation li.assistant .look").first.click()
        page.wait_for_function("document.getElementById('heat').naturalWidth > 0", timeout=WAIT_MS)
        assert page.locator("#heat").is_visible() and page.locator("#heat-toggle").is_checked()
        assert "cross-attention" in text_of(page, "#heat-about")
        screenshot(page, tmp_path, "web.png", readme=True)
        page.uncheck("#heat-toggle")
        assert page.locator("#heat").is_hidden()

        # settings: beam search, as `blip2 ask --num-beams 3`
        page.click("#settings summary")
        page.select_option("#decoding", "beams")
        page.fill("#beams", "3")
        page.click("#reset")
        assert page.locator("#conversation li").count() == 0 and text_of(page, "#caption-text") == ""
        page.fill("#message", question)
        page.press("#message", "Enter")
        page.locator("#conversation li.assistant .look").wait_for(timeout=WAIT_MS)
        assert json.loads(chats[-1].post_data)["num_beams"] == 3
        assert (
            text_of(page, "#conversation li.assistant .text")
            == demo.ask(image, question, num_beams=3).strip()
        )
        # sampling at a temperature, and a token budget, reach the request
        page.select_option("#decoding", "sample")
        page.fill("#temperature", "0.9")
        page.fill("#max-tokens", "3")
        page.fill("#message", follow_up)
        page.press("#message", "Enter")
        page.locator("#conversation li.assistant >> nth=1").locator(".look").wait_for(timeout=WAIT_MS)
        sent = json.loads(chats[-1].post_data)
        assert sent["temperature"] == 0.9 and sent["max_tokens"] == 3 and "num_beams" not in sent
        assert len(sent["messages"]) == 3  # the first exchange, then the new question

        # a picture dropped on the page, then one pasted (Ctrl+V)
        for event, path in (
            ("drop", ROOT / "examples" / "scene2.png"),
            ("paste", ROOT / "examples" / "scene3.png"),
        ):
            page.evaluate(HAND_OVER, [event, path.name, base64.b64encode(path.read_bytes()).decode()])
            page.wait_for_function(
                f"document.getElementById('preview-name').textContent.startsWith('{path.name}')",
                timeout=WAIT_MS,
            )
            assert page.locator("#conversation li").count() == 0  # a new picture, a new conversation

        # errors: one line each, the page still there
        page.route(
            "**/v1/chat/completions",
            lambda route: route.fulfill(
                status=503, json=QueueFull(3, 1).body(), headers={"Retry-After": "1"}
            ),
        )
        page.fill("#message", question)
        page.press("#message", "Enter")
        page.locator("#error").wait_for(state="visible", timeout=WAIT_MS)
        assert text_of(page, "#error") == "the server is busy (3 requests waiting); retry in 1 s"
        assert page.locator("#conversation li").count() == 0 and page.input_value("#message") == question
        page.unroute("**/v1/chat/completions")
        page.set_input_files("#file", str(not_image))
        page.locator("#error").wait_for(state="visible", timeout=WAIT_MS)
        assert "notes.png: not an image" in text_of(page, "#error")
        page.set_input_files("#file", str(big))
        page.locator("#preview").wait_for(state="visible", timeout=WAIT_MS)
        assert page.locator("#error").is_hidden()
        page.click("#caption")
        page.wait_for_function("!document.getElementById('error').hidden", timeout=WAIT_MS)
        message = text_of(page, "#error")
        assert "larger than 100000 bytes" in message and "\n" not in message and "Traceback" not in message
        screenshot(page, tmp_path, "web-error.png")
        page.close()


def test_search_view(browser, tmp_path):
    """demo-itm over an index of the examples: text search (and ITM re-rank) as `blip2 search`, a click
    searches for similar images, and a hit shows where the model found the text."""
    from blip2.index import Index
    from blip2.indexing import build_index

    itm = blip2.load("demo-itm")
    index_dir = tmp_path / "idx"
    build_index(itm, ROOT / "examples", index_dir, model="demo-itm", progress=False)
    index = Index.open(index_dir)
    query = "a large green circle in the centre"

    # in this process (torch is imported already): only the first test pays for a server's start-up
    with running(itm, model_name="demo-itm", api_key=None, index=str(index_dir)) as (port, _, _):
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#search").wait_for(state="visible", timeout=WAIT_MS)
        assert page.locator("#talk").is_hidden()  # a retrieval model does not talk

        page.fill("#query", query)
        page.press("#query", "Enter")
        hits = page.locator("#hits li")
        expected = itm.search(query, index, top=12)
        hits.nth(len(expected) - 1).wait_for(timeout=WAIT_MS)
        assert page.locator("#hits .path").all_inner_texts() == [h.path for h in expected]
        scores = page.locator("#hits .score").all_inner_texts()
        assert scores[0].startswith(f"score {expected[0].score:.3f}")
        page.wait_for_function(
            "[...document.querySelectorAll('#hits img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=WAIT_MS,
        )

        # re-ranked by ITM
        page.check("#rerank")
        page.press("#query", "Enter")
        reranked = itm.search(query, index, top=12, rerank=-1)
        page.wait_for_function(
            "document.querySelector('#hits .score').textContent.includes('ITM')", timeout=WAIT_MS
        )
        assert page.locator("#hits .path").all_inner_texts() == [h.path for h in reranked]

        # where it looked, on the best hit
        page.locator("#hits li").first.locator(".look").click()
        page.wait_for_function("document.querySelector('#hits img.heat').naturalWidth > 0", timeout=WAIT_MS)
        assert page.locator("#hits img.heat").first.is_visible()
        screenshot(page, tmp_path, "web-search.png", readme=True)

        # a click on a hit: images like it, itself first
        first = reranked[0].path
        page.locator("#hits button.hit").first.click()
        page.wait_for_function(
            "document.getElementById('search-about').textContent.includes('images like')", timeout=WAIT_MS
        )
        similar = itm.search(Path(index.meta["root"]) / first, index, top=12)
        assert page.locator("#hits .path").all_inner_texts() == [h.path for h in similar]
        assert similar[0].path == first
        page.close()
