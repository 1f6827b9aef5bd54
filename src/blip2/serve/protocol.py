"""The OpenAI wire format: request bodies, chat messages -> a BLIP-2 prompt, images, stop strings.

Chat messages map to the prompt :class:`blip2.Pipeline.chat` builds, so a conversation sent over HTTP
gets the text the Python API gives: earlier user / assistant turns become
``Question: {user} Answer: {assistant}.`` exchanges, the last user message ``Question: {text} Answer:``
(:func:`blip2.chat.chat_prompt`). A system (or developer) message, which the Python chat has no place
for, is put in front of the prompt. ``"raw_prompt": true`` sends the last user text as the prompt
itself (empty: a caption), as :meth:`blip2.Pipeline.generate` would.

The image: exactly one per conversation (BLIP-2 sees one), in any user message, as an ``image_url``
part holding a ``data:image/...;base64,`` URI, or an http(s) URL when the operator allows them.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..chat import QUESTION_TEMPLATE, chat_prompt
from ..errors import ImageError
from ..images import load_image
from .config import ServeConfig
from .errors import APIError

# ---- request bodies ---------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, store, ...)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | str


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None  # null means 1, as in the OpenAI API
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    # BLIP-2 extras (``extra_body`` in the openai client)
    top_k: int | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None  # beam search (greedy decoding only); streamed at the end
    raw_prompt: bool = False


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str | ImagePart] | ImagePart
    encoding_format: Literal["float", "base64"] = "float"
    image_embedding: Literal["mean", "queries"] = "mean"  # BLIP-2 extra: one vector, or Q of them


def parse(model: type[BaseModel], data: Any) -> Any:
    """A validated request body; a field of the wrong type or shape is a 422 naming it."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise APIError(422, f"{where}: {first['msg']}", param=where or None, code="invalid_field") from None


MAX_BEAMS = 8  # the widest beam search a request may ask for (``num_beams``)

# ---- generation options -----------------------------------------------------------------------------


def generation_options(req: ChatRequest, cfg: ServeConfig, default_max: int) -> tuple[dict[str, Any], int]:
    """``(options for Pipeline.generate, max_tokens)``.

    Sampling happens when ``temperature`` > 0, or ``top_p`` < 1 is given alone; ``temperature`` 0 or
    absent (with no ``top_p``) is greedy, as the checkpoint's generation defaults are.
    """
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = min(default_max, cfg.max_output_tokens)
    if not 1 <= max_tokens <= cfg.max_output_tokens:
        raise APIError(
            422,
            f"max_tokens must lie in [1, {cfg.max_output_tokens}], not {max_tokens}",
            param="max_tokens",
            code="invalid_value",
        )
    if req.n is None:
        req.n = 1
    if not 1 <= req.n <= cfg.max_choices:
        raise APIError(
            422, f"n must lie in [1, {cfg.max_choices}], not {req.n}", param="n", code="invalid_value"
        )
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise APIError(
            422,
            f"temperature must lie in [0, 2], not {req.temperature}",
            param="temperature",
            code="invalid_value",
        )
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise APIError(422, f"top_p must lie in (0, 1], not {req.top_p}", param="top_p", code="invalid_value")
    if req.top_k is not None and req.top_k < 0:
        raise APIError(
            422, f"top_k must be 0 (off) or more, not {req.top_k}", param="top_k", code="invalid_value"
        )
    if req.repetition_penalty is not None and not req.repetition_penalty > 0:
        raise APIError(
            422, "repetition_penalty must be > 0", param="repetition_penalty", code="invalid_value"
        )
    if req.logprobs:
        raise APIError(422, "logprobs are not supported", param="logprobs", code="unsupported")
    sample = bool(req.temperature) or (req.temperature is None and req.top_p is not None and req.top_p < 1)
    beams = 1 if req.num_beams is None else req.num_beams
    if not 1 <= beams <= MAX_BEAMS:
        raise APIError(
            422,
            f"num_beams must lie in [1, {MAX_BEAMS}], not {beams}",
            param="num_beams",
            code="invalid_value",
        )
    if beams > 1 and sample:
        raise APIError(
            422,
            "num_beams > 1 is beam search: it takes temperature 0",
            param="num_beams",
            code="invalid_value",
        )
    gen: dict[str, Any] = {"do_sample": sample, "num_beams": beams}
    if sample:
        gen.update(temperature=req.temperature or 1.0, top_p=req.top_p or 1.0, seed=req.seed)
        if req.top_k is not None:
            gen["top_k"] = req.top_k
    if req.repetition_penalty is not None:
        gen["repetition_penalty"] = req.repetition_penalty
    return gen, max_tokens


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise APIError(422, f"at most 4 stop sequences, got {len(stops)}", param="stop", code="invalid_value")
    if any(not s for s in stops):
        raise APIError(422, "stop sequences must not be empty", param="stop", code="invalid_value")
    return stops


class StopScanner:
    """Cuts a growing text at the first stop string; :meth:`feed` returns what is safe to send now
    (text that could still turn into a stop string is held back)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = ""
        self.stopped = False

    def cut(self, text: str) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    def feed(self, text: str, final: bool = False) -> str:
        """``text``: everything produced so far. Returns the new piece to send."""
        if self.stopped:
            return ""
        text, self.stopped = self.cut(text)
        if not text.startswith(self.sent) and not (final or self.stopped):
            return ""  # decoding more tokens changed earlier text: wait for it to settle
        end = len(text) if (self.stopped or final) else max(len(self.sent), len(text) - self.hold)
        piece = text[len(self.sent) : end] if text.startswith(self.sent) else ""
        self.sent = text[:end]
        return piece


# ---- messages -> prompt --------------------------------------------------------------------------------


def _text_of(message: Message) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return " ".join(p.text for p in message.content if isinstance(p, TextPart))


def _urls_of(message: Message) -> list[str]:
    if not isinstance(message.content, list):
        return []
    return [
        p.image_url if isinstance(p.image_url, str) else p.image_url.url
        for p in message.content
        if isinstance(p, ImagePart)
    ]


@dataclass
class ChatPrompt:
    """A chat request's image and its turns; :meth:`text` is the prompt, the oldest ``skip`` past
    exchanges left out (as :class:`blip2.chat.Conversation` does when the context is full)."""

    url: str
    question: str
    history: list[tuple[str, str]]
    system: str = ""
    raw: bool = False

    def text(self, skip: int = 0, template: str = QUESTION_TEMPLATE) -> str:
        """``template`` words the question (the pipeline's ``question_template``)."""
        prompt = self.question if self.raw else chat_prompt(self.history[skip:], self.question, template)
        return f"{self.system} {prompt}" if self.system else prompt


def chat_to_prompt(req: ChatRequest) -> ChatPrompt:
    """The image URL and turns of a chat request, in :class:`blip2.chat.Conversation`'s format."""
    system = " ".join(_text_of(m).strip() for m in req.messages if m.role in ("system", "developer")).strip()
    turns = [m for m in req.messages if m.role in ("user", "assistant")]
    urls = list(dict.fromkeys(u for m in turns if m.role == "user" for u in _urls_of(m)))
    if any(_urls_of(m) for m in req.messages if m.role != "user"):
        raise APIError(422, "images belong in user messages", param="messages", code="invalid_value")
    if not urls:
        raise APIError(
            422, "no image: put an image_url part in a user message", param="messages", code="missing_image"
        )
    if len(urls) > 1:
        raise APIError(
            422,
            f"BLIP-2 sees one image per conversation, got {len(urls)}",
            param="messages",
            code="invalid_value",
        )
    if not turns or turns[-1].role != "user":
        raise APIError(
            422, "the last message must come from the user", param="messages", code="invalid_value"
        )
    if req.raw_prompt:
        if len(turns) > 1:
            raise APIError(
                422, "raw_prompt takes one user message, no history", param="messages", code="invalid_value"
            )
        return ChatPrompt(urls[0], _text_of(turns[-1]), [], system, raw=True)
    question = _text_of(turns[-1]).strip()
    if not question:
        raise APIError(
            422,
            "the last user message has no text (use raw_prompt for a caption)",
            param="messages",
            code="invalid_value",
        )
    history: list[tuple[str, str]] = []
    pending: str | None = None
    for m in turns[:-1]:
        if m.role == "user":
            pending = (pending + " " if pending else "") + _text_of(m).strip()
        else:
            history.append(((pending or "").strip(), _text_of(m).strip()))
            pending = None
    if pending:  # two user messages in a row: they form one question
        question = f"{pending} {question}"
    return ChatPrompt(urls[0], question, history, system)


# ---- images -----------------------------------------------------------------------------------------------

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,", re.I)


def image_bytes(url: str, cfg: ServeConfig) -> bytes:
    """The bytes of an ``image_url``: a base64 ``data:`` URI, or (when allowed) an http(s) download."""
    if url.startswith("data:"):
        m = _DATA_URI.match(url)
        if not m or not m.group("b64"):
            raise APIError(
                400,
                "image_url: a data URI must be base64 (data:image/png;base64,...)",
                param="image_url",
                code="invalid_image",
            )
        encoded = url[m.end() :]
        if len(encoded) * 3 // 4 > cfg.max_image_bytes + 3:
            raise _image_too_large(cfg)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(
                400, "image_url: the data URI is not valid base64", param="image_url", code="invalid_image"
            ) from None
        if len(data) > cfg.max_image_bytes:
            raise _image_too_large(cfg)
        return data
    if url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise APIError(
                422,
                "image_url: remote URLs are off on this server; send a base64 data: URI",
                param="image_url",
                code="remote_images_disabled",
            )
        return _download(url, cfg)
    raise APIError(
        400,
        "image_url must be a data: URI (or an http(s) URL where allowed)",
        param="image_url",
        code="invalid_image",
    )


def _image_too_large(cfg: ServeConfig) -> APIError:
    return APIError(
        413,
        f"the image is larger than {cfg.max_image_bytes} bytes",
        param="image_url",
        code="image_too_large",
    )


def _download(url: str, cfg: ServeConfig) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "blip2-serve"})
    try:
        with urllib.request.urlopen(request, timeout=cfg.remote_image_timeout) as response:
            size = response.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > cfg.max_image_bytes:
                raise _image_too_large(cfg)
            data = response.read(cfg.max_image_bytes + 1)
    except APIError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(
            400, f"image_url: cannot download {url} ({e})", param="image_url", code="image_download_failed"
        ) from None
    if len(data) > cfg.max_image_bytes:
        raise _image_too_large(cfg)
    return data


def decode_image(data: bytes, cfg: ServeConfig, what: str = "image") -> Image.Image:
    """Bytes -> an RGB image; too many pixels is a 413, anything unreadable a 400."""
    if len(data) > cfg.max_image_bytes:
        raise _image_too_large(cfg)
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header only: the size before any decoding
            width, height = probe.size
    except Image.DecompressionBombError:
        raise APIError(413, f"{what}: too many pixels", code="image_too_large") from None
    except Exception:
        raise APIError(400, f"{what}: not an image file Pillow can read", code="invalid_image") from None
    if width * height > cfg.max_image_pixels:
        raise APIError(
            413,
            f"{what}: {width}x{height} is more than {cfg.max_image_pixels} pixels",
            code="image_too_large",
        )
    try:
        return load_image(data, max_pixels=cfg.max_image_pixels)
    except ImageError as e:
        raise APIError(400, f"{what}: {e}", code="invalid_image") from None
