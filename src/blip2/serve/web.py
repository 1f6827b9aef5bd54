"""What the web page adds to the server: the page itself, heat maps, and search over an index.

Routes
    ``GET /`` and ``GET /static/{name}``: the page (``serve/static/``: plain HTML, CSS and JavaScript,
    no network, no build step). It needs no key; everything it shows comes from the ``/v1`` API below
    and :mod:`blip2.serve.app`'s, with the key the user types in (kept for the browser tab).
    ``POST /v1/attention``: where the model looked (:mod:`blip2.attention_map`): the map over the patch
    grid and a transparent PNG of it to lay over the picture.
    ``GET /v1/index``: the served index (``blip2 serve --index IDX``); 404 without one.
    ``POST /v1/search``: the index searched by a text, an image, or one of its own images.
    ``GET /v1/index/image?path=P&size=N``: a JPEG thumbnail of an indexed image (indexed paths only).

Heat maps and searches run on the batcher's worker thread, like every other use of the model.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..attention_map import attention_map, heat_layer, question_prompt
from ..errors import Blip2Error, ImageError, InputError
from ..images import load_image
from .batcher import Job
from .errors import APIError
from .protocol import ImageURL, decode_image, image_bytes, parse

if TYPE_CHECKING:
    from ..index import Index
    from .app import Server

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page loads only its own files; pictures are data: and blob: URLs made in the page.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}
HEAT_SIDE = 512  # the longer side of the heat-map PNG
THUMB_SIDES = (64, 512)  # the smallest and largest thumbnail a client may ask for
ROUTES = ("/", "/v1/attention", "/v1/search", "/v1/index", "/v1/index/image")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AttentionRequest(_Body):
    model: str
    image_url: ImageURL | str | None = None  # the picture, as in chat (a data: URI) ...
    index_path: str | None = None  # ... or an image of the served index
    text: str | None = None  # what the map is about: a caption, an answer, a search text
    question: str | None = None  # the question ``text`` answers ("Question: … Answer:" prompt)
    prompt: str | None = None  # or the prompt ``text`` continues, as given
    method: Literal["auto", "attention", "gradcam"] = "auto"


class SearchRequest(_Body):
    model: str
    text: str | None = None
    image_url: ImageURL | str | None = None
    index_path: str | None = None  # "more like this": an image of the index itself
    top: int = Field(12, ge=1, le=100)
    rerank: bool = False  # re-rank the hits by ITM (text queries on retrieval checkpoints)


def register(app: FastAPI, server: Server) -> None:
    """Add the page and its routes to ``app``, and their work kinds to the server's worker."""
    routes = PageRoutes(server)
    app.get("/", include_in_schema=False)(routes.page)
    app.get("/static/{name}", include_in_schema=False)(routes.static)
    app.post("/v1/attention")(routes.attention)
    app.get("/v1/index")(routes.index_info)
    app.post("/v1/search")(routes.search)
    app.get("/v1/index/image")(routes.index_image)
    server.batcher.handlers["attention"] = one_by_one(routes.compute_attention)
    server.batcher.handlers["search"] = one_by_one(routes.compute_search)


def one_by_one(compute):
    """A batcher handler that runs ``compute(payload)`` for each job of a batch in turn."""

    def handle(jobs: list[Job]) -> None:
        for job in jobs:
            if job.cancelled:
                continue
            try:
                job.finish(compute(job.payload))
            except (Blip2Error, APIError) as e:  # the user's to mend: the app answers with its message
                job.fail(e)
            except Exception as e:  # ours: logged, answered as a 500; the other jobs go on
                log.error("a %s request failed", job.kind, exc_info=e)
                job.fail(e)

    return handle


def open_index(folder: str, retrieval: bool) -> Index:
    """The index to serve, checked against the model: its embeddings must be the ones it gives."""
    from ..index import Index

    index = Index.open(folder)
    kind = "itc" if retrieval else "qformer"
    if index.meta["kind"] != kind:
        want = "a retrieval checkpoint (e.g. demo-itm)" if index.meta["kind"] == "itc" else "a generation one"
        raise InputError(
            f"{folder} holds {index.meta['kind']} embeddings (built with {index.meta['model']}); "
            f"serve it with {want}"
        )
    return index


class PageRoutes:
    def __init__(self, server: Server):
        self.server = server
        self.pipe = server.pipe
        self.cfg = server.cfg
        self.index = open_index(self.cfg.index, server.retrieval) if self.cfg.index else None

    # ---- the page -------------------------------------------------------------------------------

    async def page(self):
        return FileResponse(
            STATIC / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS
        )

    async def static(self, name: str):
        if name not in PAGE_FILES:
            raise APIError(404, f"no page file {name!r}", code="not_found")
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    # ---- where it looked -------------------------------------------------------------------------------

    async def attention(self, request: Request):
        req = parse(AttentionRequest, await self.server._json_body(request))
        self.server._check_model(req.model)
        if (req.image_url is None) == (req.index_path is None):
            raise APIError(
                422, "give the picture as image_url or as index_path (one of them)", code="invalid_value"
            )
        if req.question is not None and req.prompt is not None:
            raise APIError(422, "give question or prompt, not both", param="question", code="invalid_value")
        for field in ("text", "question", "prompt"):
            self._check_text(getattr(req, field), field)
        image = await run_in_threadpool(self._picture, req.image_url, req.index_path)
        prompt = (
            question_prompt(self.pipe, req.question)
            if req.question
            else (req.prompt or self.pipe.caption_prompt)
        )
        result = await self.server.run_job("attention", (image, req.text, prompt, req.method), request)
        return Response(status_code=499) if result is None else result

    def compute_attention(self, payload: tuple) -> dict[str, Any]:
        """(worker thread) the map and its PNG."""
        image, text, prompt, method = payload
        amap = attention_map(self.pipe, image, text, prompt=prompt, method=method)
        scale = HEAT_SIDE / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return {
            "object": "attention_map",
            "model": self.cfg.model_name,
            "method": amap.method,
            "grid": amap.grid.round(6).tolist(),
            "heatmap": _png_data_url(heat_layer(amap.grid, size)),
        }

    def _check_text(self, text: str | None, field: str) -> None:
        if text is None:
            return
        tokens = len(self.pipe.processor.tokenizer.encode([text])[0])
        if tokens > self.cfg.max_prompt_tokens:
            raise APIError(
                413,
                f"{field} is {tokens} tokens; this server takes at most {self.cfg.max_prompt_tokens}",
                param=field,
                code="prompt_too_long",
            )

    def _picture(self, url: ImageURL | str | None, index_path: str | None) -> Image.Image:
        """(thread pool) a request's picture: decoded from its data: URI, or read from the index's folder."""
        if index_path is not None:
            try:
                return load_image(self._indexed_file(index_path), max_pixels=self.cfg.max_image_pixels)
            except ImageError as e:
                raise APIError(400, f"index_path: {e}", param="index_path", code="invalid_image") from None
        url = url if isinstance(url, str) else url.url  # type: ignore[union-attr]
        return decode_image(image_bytes(url, self.cfg), self.cfg)

    # ---- search ---------------------------------------------------------------------------------

    def _need_index(self) -> Index:
        if self.index is None:
            raise APIError(
                404, "this server has no index: start it with --index IDX (see blip2 index)", code="no_index"
            )
        return self.index

    def _indexed_file(self, path: str) -> Path:
        """The file of an indexed image; only paths the index holds are served."""
        index = self._need_index()
        if path not in index.records:
            raise APIError(
                404, f"{path!r} is not an image of the index", param="index_path", code="not_found"
            )
        return Path(index.meta["root"]) / path

    async def index_info(self):
        index = self._need_index()
        return {
            "object": "index",
            "images": len(index.records),
            "kind": index.meta["kind"],
            "model": index.meta["model"],
            "text_search": index.meta["kind"] == "itc",
        }

    async def search(self, request: Request):
        req = parse(SearchRequest, await self.server._json_body(request))
        self.server._check_model(req.model)
        self._need_index()
        given = [x is not None for x in (req.text, req.image_url, req.index_path)]
        if sum(given) != 1:
            raise APIError(422, "search by one of text, image_url or index_path", code="invalid_value")
        if req.text is not None:
            if not req.text.strip():
                raise APIError(422, "the search text is empty", param="text", code="invalid_value")
            self._check_text(req.text, "text")
            query: Any = req.text.strip()
        elif req.index_path is not None:
            query = self._indexed_file(req.index_path)
        else:
            query = await run_in_threadpool(self._picture, req.image_url, None)
        if req.rerank and req.text is None:
            raise APIError(422, "re-ranking by ITM needs a text query", param="rerank", code="invalid_value")
        hits = await self.server.run_job("search", (query, req.top, req.rerank), request)
        if hits is None:
            return Response(status_code=499)
        return {"object": "list", "model": self.cfg.model_name, "data": hits}

    def compute_search(self, payload: tuple) -> list[dict[str, Any]]:
        """(worker thread) the index's best images for the query."""
        from ..indexing import search_index

        query, top, rerank = payload
        hits = search_index(self.pipe, self._need_index(), query, top=top, rerank=-1 if rerank else 0)
        return [{"path": h.path, "score": h.score, "itm": h.itm} for h in hits]

    async def index_image(self, path: str, size: int = 256):
        if not THUMB_SIDES[0] <= size <= THUMB_SIDES[1]:
            raise APIError(
                422,
                f"size must lie in [{THUMB_SIDES[0]}, {THUMB_SIDES[1]}]",
                param="size",
                code="invalid_value",
            )
        data = await run_in_threadpool(self._thumbnail, path, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    def _thumbnail(self, path: str, size: int) -> bytes:
        try:
            image = load_image(self._indexed_file(path), max_pixels=self.cfg.max_image_pixels)
        except ImageError as e:
            raise APIError(404, f"{path}: {e}", param="path", code="unreadable_image") from None
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=88)
        return buf.getvalue()


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
