"""Errors the server answers with, in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

# status -> the OpenAI error ``type``
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    500: "server_error",
    503: "server_busy",
    504: "timeout",
}


class APIError(Exception):
    """An answer other than 200: raised where the cause is known, turned into JSON by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class QueueFull(APIError):
    def __init__(self, depth: int, retry_after: int):
        super().__init__(
            503,
            f"the server is busy ({depth} requests waiting); retry in {retry_after} s",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )
