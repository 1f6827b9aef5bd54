"""The HTTP app: OpenAI-compatible routes over one loaded :class:`blip2.Pipeline`.

Routes: ``POST /v1/chat/completions`` (streaming as server-sent events), ``GET /v1/models``,
``POST /v1/caption`` (an uploaded image), ``POST /v1/embeddings`` (retrieval checkpoints),
``GET /health``, ``GET /metrics`` (Prometheus); the web page's routes come from :mod:`blip2.serve.web`.

Handlers only parse, check and decode (images are decoded in the thread pool, off the event loop);
the model runs on the batcher's one worker thread. Every error is OpenAI-format JSON with its status.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import ImageError, InputError
from . import web
from .batcher import Batcher, Job
from .config import ServeConfig
from .engine import Engine, GenerationWork, RowResult, generation_key
from .errors import APIError, error_body
from .protocol import (
    ChatPrompt,
    ChatRequest,
    EmbeddingRequest,
    ImagePart,
    StopScanner,
    chat_to_prompt,
    decode_image,
    generation_options,
    image_bytes,
    parse,
    stop_strings,
)

log = logging.getLogger(__name__)

ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/caption",
    "/v1/embeddings",
    "/v1/models",
    "/health",
    "/metrics",
    *web.ROUTES,
)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ---- metrics -------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps may live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "blip2_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "blip2_request_seconds",
            "time from arrival to the last byte",
            ["endpoint"],
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.batch = Histogram(
            "blip2_batch_rows",
            "rows per forward pass",
            ["kind"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.queue = Gauge("blip2_queue_depth", "requests waiting for the model", registry=r)
        self.tokens = Counter("blip2_generated_tokens", "tokens generated", registry=r)


# ---- the guard: body size, auth, metrics ----------------------------------------------------------------


class Guard:
    """ASGI middleware in front of every route: refuses bodies over the limit (413) and requests
    without the API key (401), and counts every answer in the metrics."""

    def __init__(self, app, cfg: ServeConfig, metrics: Metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        start = time.perf_counter()
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                body, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await _json(refusal.status, refusal.body(), refusal.headers)(scope, receive, send_counted)
                return
            await self.app(scope, _replay(body, receive), send_counted)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def _refusal(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.cfg.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.cfg.api_key):
                return APIError(
                    401,
                    "invalid or missing API key (Authorization: Bearer <key>)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.cfg.max_body_bytes:
            return _body_too_large(self.cfg)
        return None

    async def _read_body(self, scope, receive) -> tuple[bytes, APIError | None]:
        if scope["method"] in ("GET", "HEAD"):
            return b"", None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cfg.max_body_bytes:
                return b"", _body_too_large(self.cfg)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


def _body_too_large(cfg: ServeConfig) -> APIError:
    return APIError(413, f"the request body is larger than {cfg.max_body_bytes} bytes", code="body_too_large")


def _replay(body: bytes, receive):
    """A ``receive`` that hands out the already-read body, then the client's own messages
    (``http.disconnect`` once it leaves)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


# ---- the app ----------------------------------------------------------------------------------------------


def create_app(pipe, cfg: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``pipe``. The batcher's worker starts with the app (lifespan) and
    finishes the queued work when it stops."""
    cfg = cfg or ServeConfig()
    server = Server(pipe, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.batcher.start()
        try:
            yield
        finally:
            server.closing = True
            await run_in_threadpool(server.batcher.stop, cfg.request_timeout)

    app = FastAPI(title="blip2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return _json(e.status, e.body(), e.headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException):
        return _json(e.status_code, error_body(e.status_code, str(e.detail)), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception):
        log.error("unexpected error on %s", request.url.path, exc_info=e)
        return _json(500, error_body(500, "internal server error", code="internal_error"))

    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics_page)
    app.get("/v1/models")(server.models)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/caption")(server.caption)
    app.post("/v1/embeddings")(server.embeddings)
    web.register(app, server)  # the page, heat maps, search
    app.add_middleware(Guard, cfg=cfg, metrics=server.metrics)
    return app


class Server:
    """The routes' state: pipeline, settings, batcher, metrics."""

    def __init__(self, pipe, cfg: ServeConfig):
        self.pipe, self.cfg = pipe, cfg
        self.metrics = Metrics()
        self.engine = Engine(pipe)
        model_cfg = pipe.config
        self.retrieval = bool(model_cfg.retrieval)
        text = model_cfg.text
        self.context_limit = text.max_position_embeddings if self.pipe.config.is_decoder_only else None
        self.batcher = Batcher(
            dict(self.engine.handlers),  # routes may add their own kinds of work (blip2.serve.web)
            max_batch=cfg.max_batch,
            max_queue=cfg.max_queue,
            wait_s=cfg.batch_wait_ms / 1000,
            retry_after=cfg.retry_after,
            context_limit=self.context_limit,
            on_queue=self.metrics.queue.set,
            on_batch=lambda kind, rows: self.metrics.batch.labels(kind).observe(rows),
        )
        self.created = int(time.time())
        self.closing = False

    # ---- small routes -----------------------------------------------------------------------------

    async def health(self):
        status = 503 if self.closing else 200
        body = {
            "status": "shutting_down" if self.closing else "ok",
            "model": self.cfg.model_name,
            "queue_depth": self.batcher.depth,
            "busy": self.batcher.busy,
        }
        return _json(status, body)

    async def metrics_page(self):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self):
        kind = "retrieval" if self.retrieval else "generation"
        return {
            "object": "list",
            "data": [
                {
                    "id": self.cfg.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "blip2",
                    "kind": kind,
                }
            ],
        }

    # ---- shared steps -------------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise APIError(
                404,
                f"model {name!r} is not served here; this server has {self.cfg.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _need(self, retrieval: bool) -> None:
        if retrieval and not self.retrieval:
            raise APIError(
                404,
                "this model is a generation checkpoint: it has no embeddings (use a "
                "blip2-itm retrieval checkpoint)",
                code="unsupported_endpoint",
            )
        if not retrieval and self.retrieval:
            raise APIError(
                404,
                "this model is a retrieval checkpoint: it does not generate text; use /v1/embeddings",
                code="unsupported_endpoint",
            )

    @staticmethod
    async def _json_body(request: Request) -> Any:
        body = await request.body()
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None

    def _pixels_and_prompt(self, image: Any, chat: ChatPrompt) -> tuple[torch.Tensor, str, int]:
        """(thread pool) image -> pixels (3, S, S); the prompt, fitted to the context, and its
        length in positions (image tokens included)."""
        if isinstance(image, bytes):
            image = decode_image(image, self.cfg)
        pixels = self.pipe.processor.image_processor(image)[0]
        q = self.pipe.config.num_query_tokens
        for skip in range(len(chat.history) + 1):
            prompt = chat.text(skip, self.pipe.question_template) or self.pipe.caption_prompt
            tokens = len(self.pipe.processor.tokenizer.encode([prompt])[0])
            length = q + tokens
            if self.context_limit is None or length < self.context_limit:
                break
        else:
            raise APIError(
                413,
                f"the prompt takes {length} of the model's {self.context_limit} positions: "
                "no room to generate",
                param="messages",
                code="context_length_exceeded",
            )
        if tokens > self.cfg.max_prompt_tokens:
            raise APIError(
                413,
                f"the prompt is {tokens} tokens; this server takes at most {self.cfg.max_prompt_tokens}",
                param="messages",
                code="prompt_too_long",
            )
        return pixels, prompt, length

    async def _next(self, job: Job, request: Request, deadline: float, watch: bool = True) -> tuple[str, Any]:
        """The job's next event; the job is cancelled (slot freed) when the client leaves or time runs out."""
        getter = asyncio.ensure_future(job.events.get())
        waits = {getter}
        watcher = asyncio.ensure_future(_disconnected(request)) if watch else None
        if watcher is not None:
            waits.add(watcher)
        try:
            done, _ = await asyncio.wait(
                waits, timeout=max(0.0, deadline - time.perf_counter()), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in waits:
                if not task.done():
                    task.cancel()
        if getter in done:
            return getter.result()
        self.batcher.cancel(job)
        if watcher is not None and watcher in done:
            raise ClientGone
        raise APIError(504, f"no answer within {self.cfg.request_timeout:g} s", code="timeout")

    def _submit_generation(
        self, pixels, prompt: str, length: int, gen: dict, max_tokens: int, n: int, stream: bool
    ) -> Job:
        copies = n if not gen["do_sample"] else 1  # greedy choices are all the same: compute one
        job = Job(
            "generate",
            generation_key(gen),
            GenerationWork(pixels, prompt, gen, copies),
            asyncio.get_running_loop(),
            rows=n // copies,
            length=length,
            max_new=max_tokens,
            stream=stream,
        )
        self.batcher.submit(job)
        return job

    async def run_job(self, kind: str, payload: Any, request: Request) -> Any:
        """One job for the worker's ``kind`` handler; its result, or None when the client has left."""
        deadline = time.perf_counter() + self.cfg.request_timeout
        job = Job(kind, kind, payload, asyncio.get_running_loop())
        self.batcher.submit(job)
        return await self._result(job, request, deadline)

    async def _result(self, job: Job, request: Request, deadline: float) -> Any:
        try:
            kind, value = await self._next(job, request, deadline)
        except ClientGone:
            return None
        if kind == "error":
            raise _as_api_error(value)
        return value

    # ---- /v1/chat/completions -----------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        arrival = time.perf_counter()
        deadline = arrival + self.cfg.request_timeout
        req = parse(ChatRequest, await self._json_body(request))
        self._check_model(req.model)
        self._need(retrieval=False)
        gen, max_tokens = generation_options(req, self.cfg, self.pipe.generation_config.max_new_tokens)
        stops = stop_strings(req.stop)
        chat = chat_to_prompt(req)
        data = await run_in_threadpool(image_bytes, chat.url, self.cfg)
        pixels, prompt, length = await run_in_threadpool(self._pixels_and_prompt, data, chat)
        job = self._submit_generation(pixels, prompt, length, gen, max_tokens, req.n, bool(req.stream))
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            try:
                first = await self._next(job, request, deadline)
            except ClientGone:
                return Response(status_code=499)
            if first[0] == "error":
                raise _as_api_error(first[1])
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._chat_stream(
                job, request, deadline, first, ident, req.n, stops, length, include_usage
            )
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        rows: list[RowResult] | None = await self._result(job, request, deadline)
        if rows is None:
            return Response(status_code=499)
        choices, completion = [], 0
        for i, row in enumerate(rows):
            text, hit = StopScanner(stops).cut(self.pipe.processor.decode(row.ids))
            completion += len(row.ids)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop" if hit else row.finish_reason,
                    "logprobs": None,
                }
            )
        self.metrics.tokens.inc(completion)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.cfg.model_name,
            "choices": choices,
            "usage": _usage(length, completion),
        }

    async def _chat_stream(
        self,
        job: Job,
        request: Request,
        deadline: float,
        first: tuple[str, Any],
        ident: str,
        n: int,
        stops: list[str],
        length: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        decode = self.pipe.processor.decode

        def chunk(index: int | None, delta: dict | None = None, finish: str | None = None, usage=None) -> str:
            body: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.cfg.model_name,
                "choices": [],
            }
            if index is not None:
                body["choices"] = [
                    {"index": index, "delta": delta or {}, "finish_reason": finish, "logprobs": None}
                ]
            if include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        tokens: list[list[int]] = [[] for _ in range(n)]
        scanners = [StopScanner(stops) for _ in range(n)]
        open_rows = set(range(n))
        event: tuple[str, Any] | None = first
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            while open_rows:
                if event is None:
                    event = await self._next(job, request, deadline, watch=False)
                kind, value = event
                event = None
                if kind == "error":
                    e = _as_api_error(value)
                    yield f"data: {json.dumps(e.body())}\n\n"
                    return
                if kind == "tokens":
                    for i, token in enumerate(value):
                        if token is None or i not in open_rows:
                            continue
                        tokens[i].append(token)
                        text = self.pipe.processor.decode_settled(tokens[i])
                        if text is None:
                            continue  # an incomplete character: wait for its other bytes
                        piece = scanners[i].feed(text)
                        if piece:
                            yield chunk(i, {"content": piece})
                        if scanners[i].stopped:
                            open_rows.discard(i)
                            yield chunk(i, {}, "stop")
                    if not open_rows:
                        self.batcher.cancel(job)  # every choice hit a stop string: free the slot
                elif kind == "done":
                    for i, row in enumerate(value):
                        if i not in open_rows:
                            continue
                        tokens[i] = list(row.ids)
                        piece = scanners[i].feed(decode(row.ids), final=True)
                        if piece:
                            yield chunk(i, {"content": piece})
                        yield chunk(i, {}, "stop" if scanners[i].stopped else row.finish_reason)
                    open_rows.clear()
            completion = sum(len(t) for t in tokens)
            self.metrics.tokens.inc(completion)
            if include_usage:
                yield chunk(None, usage=_usage(length, completion))
            yield "data: [DONE]\n\n"
        except APIError as e:  # timed out mid-stream
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            if not job.finished:
                self.batcher.cancel(job)

    # ---- /v1/caption --------------------------------------------------------------------------------------

    async def caption(self, request: Request):
        """An image upload (multipart field ``file``, or a raw ``image/*`` body); optional form fields
        ``prompt`` (text the caption continues) and ``max_tokens``. Greedy, as ``Pipeline.caption``."""
        deadline = time.perf_counter() + self.cfg.request_timeout
        self._need(retrieval=False)
        content_type = request.headers.get("content-type", "")
        prompt, max_tokens = "", None
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=1, max_fields=16)
            except Exception as e:
                raise APIError(400, f"cannot read the form: {e}", code="invalid_form") from None
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise APIError(
                    422,
                    "the form needs an image file in the field 'file'",
                    param="file",
                    code="missing_image",
                )
            data = await upload.read(self.cfg.max_image_bytes + 1)
            prompt = str(form.get("prompt") or "")
            if form.get("max_tokens") is not None:
                try:
                    max_tokens = int(str(form.get("max_tokens")))
                except ValueError:
                    raise APIError(
                        422, "max_tokens must be an integer", param="max_tokens", code="invalid_value"
                    ) from None
        elif content_type.startswith("image/"):
            data = await request.body()
        else:
            raise APIError(
                400,
                "send the image as multipart/form-data (field 'file') or as an image/* body",
                code="invalid_content_type",
            )
        if not data:
            raise APIError(400, "the image is empty", param="file", code="invalid_image")
        req = ChatRequest(
            model=self.cfg.model_name, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
        )
        gen, max_tokens = generation_options(req, self.cfg, self.pipe.generation_config.max_new_tokens)
        chat = ChatPrompt(url="", question=prompt, history=[], raw=True)
        image = await run_in_threadpool(decode_image, data, self.cfg, "file")
        pixels, prompt, length = await run_in_threadpool(self._pixels_and_prompt, image, chat)
        job = self._submit_generation(pixels, prompt, length, gen, max_tokens, 1, False)
        rows = await self._result(job, request, deadline)
        if rows is None:
            return Response(status_code=499)
        ids = rows[0].ids
        self.metrics.tokens.inc(len(ids))
        return {
            "id": f"caption-{uuid.uuid4().hex}",
            "object": "caption",
            "created": int(time.time()),
            "model": self.cfg.model_name,
            "text": self.pipe.processor.decode(ids),
            "finish_reason": rows[0].finish_reason,
            "usage": _usage(length, len(ids)),
        }

    # ---- /v1/embeddings ------------------------------------------------------------------------------

    async def embeddings(self, request: Request):
        """Texts (strings) and images (``image_url`` parts) -> vectors. A text: its ITC embedding (E,);
        an image: the normalised mean of its Q query embeddings (E,), or with ``"image_embedding":
        "queries"`` all of them flattened (Q*E,), whose max dot product with a text is the ITC score."""
        deadline = time.perf_counter() + self.cfg.request_timeout
        req = parse(EmbeddingRequest, await self._json_body(request))
        self._check_model(req.model)
        self._need(retrieval=True)
        inputs = req.input if isinstance(req.input, list) else [req.input]
        if not inputs:
            raise APIError(422, "input is empty", param="input", code="invalid_value")
        if len(inputs) > self.cfg.max_embedding_inputs:
            raise APIError(
                413,
                f"{len(inputs)} inputs; at most {self.cfg.max_embedding_inputs} per request",
                param="input",
                code="too_many_inputs",
            )
        if sum(isinstance(x, ImagePart) for x in inputs) > self.cfg.max_images:
            raise APIError(
                413,
                f"at most {self.cfg.max_images} images per request",
                param="input",
                code="too_many_images",
            )
        items = await run_in_threadpool(self._embedding_items, inputs)
        job = Job("embed", "embed", items, asyncio.get_running_loop(), rows=len(items))
        self.batcher.submit(job)
        vectors = await self._result(job, request, deadline)
        if vectors is None:
            return Response(status_code=499)
        data, tokens = [], 0
        q = self.pipe.config.num_query_tokens
        for i, ((kind, value), vec) in enumerate(zip(items, vectors, strict=True)):
            if kind == "image":
                tokens += q
                vec = vec.flatten() if req.image_embedding == "queries" else _unit(vec.mean(0))
            else:
                tokens += len(self.pipe.processor.tokenizer.encode([value])[0])
            data.append(
                {"object": "embedding", "index": i, "embedding": _encode_vector(vec, req.encoding_format)}
            )
        return {
            "object": "list",
            "data": data,
            "model": self.cfg.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _embedding_items(self, inputs: list) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = []
        for x in inputs:
            if isinstance(x, ImagePart):
                url = x.image_url if isinstance(x.image_url, str) else x.image_url.url
                items.append(("image", decode_image(image_bytes(url, self.cfg), self.cfg)))
            else:
                items.append(("text", x))
        return items


# ---- helpers ----------------------------------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (its connection's ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ImageError):
        return APIError(400, str(e), code="invalid_image")
    if isinstance(e, InputError):
        return APIError(422, str(e), code="invalid_value")
    return APIError(500, "internal server error", code="internal_error")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def _encode_vector(v: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode("ascii")
    return np.asarray(v.float().numpy(), dtype=np.float64).tolist()
