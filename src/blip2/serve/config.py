"""Server settings: every limit has a default here and a ``blip2 serve`` flag of the same name."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    """How the server batches, what it accepts, and for how long it waits."""

    model_name: str = "blip2"  # the id /v1/models lists and requests name
    api_key: str | None = None  # when set, /v1/* needs ``Authorization: Bearer <api_key>``

    # batching and the queue
    max_batch: int = 8  # rows (images x choices) per forward pass; 1 turns batching off
    batch_wait_ms: float = 10.0  # how long the worker waits for a batch to fill once a request is in
    max_queue: int = 64  # requests waiting for the model; past it: 503 with Retry-After
    request_timeout: float = 120.0  # seconds from arrival to the last byte of the answer; then 504
    retry_after: int = 1  # seconds, the Retry-After of a 503

    # sizes
    max_body_bytes: int = 32 * MiB  # a request body, all of it
    max_image_bytes: int = 20 * MiB  # one image, decoded from base64 / fetched / uploaded
    max_image_pixels: int = 40_000_000  # width x height of one image
    max_prompt_tokens: int = 512  # the text of one prompt (history included), image tokens not counted
    max_output_tokens: int = 256  # the largest max_tokens a request may ask for
    max_choices: int = 8  # the largest n
    max_embedding_inputs: int = 256  # texts and images in one /v1/embeddings request
    max_images: int = 16  # images in one /v1/embeddings request

    # the web page's search view: an index folder built by ``blip2 index`` (None: no search)
    index: str | None = None

    # remote images (off unless the operator turns them on)
    allow_remote_images: bool = False
    remote_image_timeout: float = 5.0  # seconds for the whole download

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_prompt_tokens",
            "max_output_tokens",
            "max_choices",
            "max_embedding_inputs",
            "max_images",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("batch_wait_ms", "request_timeout", "remote_image_timeout"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
