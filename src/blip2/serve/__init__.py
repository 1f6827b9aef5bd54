"""An OpenAI-compatible HTTP server over :class:`blip2.Pipeline`, with dynamic batching.

``blip2 serve --model M [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N]``, or::

    import uvicorn, blip2
    from blip2.serve import ServeConfig, create_app
    uvicorn.run(create_app(blip2.load(M), ServeConfig(max_batch=8)), port=8000)

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart, prometheus-client).

Endpoints
    ``POST /v1/chat/completions`` (OpenAI format; ``stream: true`` as server-sent events),
    ``GET /v1/models``, ``POST /v1/caption`` (multipart ``file`` or an ``image/*`` body),
    ``POST /v1/embeddings`` (retrieval checkpoints: texts, and ``image_url`` parts for images),
    ``GET /health``, ``GET /metrics`` (Prometheus). ``/health`` and ``/metrics`` need no key.
    The web page (``GET /``, no key) and its routes ``POST /v1/attention`` (heat maps),
    ``GET /v1/index``, ``POST /v1/search`` (with ``--index IDX``): :mod:`blip2.serve.web`.

Chat
    One image per conversation (a base64 ``data:`` URI; http(s) URLs only with
    ``--allow-remote-images``, capped at ``--max-image-bytes`` and ``--remote-image-timeout``).
    Messages become :class:`blip2.chat.Conversation`'s prompt (``Question: … Answer: ….`` turns),
    so the reply equals ``Pipeline.chat(image).say(...)``; a system message goes in front.
    ``extra_body={"raw_prompt": true}``: the user text is the prompt itself (empty: a caption).
    ``temperature`` 0 or absent: greedy (the checkpoint's defaults); > 0: sampling (``top_p``,
    ``seed``; extras ``top_k``, ``repetition_penalty``). ``stop`` cuts the text (held back while
    streaming). Extra ``num_beams``: beam search (greedy only; streamed when done).
    ``logprobs`` and tools are not supported (422).

Batching (:mod:`blip2.serve.batcher`, :mod:`blip2.serve.engine`)
    One worker thread owns the model. Requests wait in a bounded queue (``--max-queue``; past it:
    503 with ``Retry-After``). The worker takes the oldest request plus those arriving within
    ``--batch-wait-ms`` that have the same generation settings (``max_tokens`` may differ: the batch
    runs to the largest and each row stops at its own), up to ``--max-batch`` rows, and runs one
    batched generation; streaming and non-streaming requests share batches (tokens are handed out
    step by step). Seeded sampling runs alone, so its result does not depend on its neighbours.
    A client that disconnects, or whose ``--request-timeout`` passes (504), leaves the queue at once;
    a running batch stops when all its requests are gone. A failing batch is re-run one request at a
    time, so one bad request fails alone.

Errors
    OpenAI-format JSON: 400 malformed (not JSON, bad base64, not an image), 401 bad key, 404 unknown
    model or endpoint, 413 too large (body, image bytes or pixels, prompt tokens, context), 422 bad
    fields, 503 busy, 504 timeout; never a traceback.

Shutdown
    SIGTERM: no new connections, requests in flight finish (up to ``--request-timeout``), exit 0.
"""

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(pipe, cfg: ServeConfig | None = None):
    from .app import create_app as _create_app

    return _create_app(pipe, cfg)
