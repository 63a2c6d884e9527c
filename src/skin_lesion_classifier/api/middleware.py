"""ASGI middleware of the service: request body limits (size and time) and security
headers on every answer."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from skin_lesion_classifier.api.schemas import error_response

#: The Content-Security-Policy of every answer: the page and /docs load only their own
#: scripts and styles; pictures may come from blob: (the preview) and data: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


class BodyError(Exception):
    """Raised while reading a request body that breaks a limit; ``status``, ``error``."""

    status = 400
    error = "bad_request"


class BodyTooLarge(BodyError):
    """The body grew past the size limit."""

    status, error = 413, "payload_too_large"


class BodyTimeout(BodyError):
    """The client did not send the whole body in time."""

    status, error = 408, "request_timeout"


class BodyGuard:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (413) or slower than
    ``timeout_s`` seconds in all (408), as JSON errors.

    A ``Content-Length`` above the limit is refused before the body is read; a body without
    one (chunked) is counted as it arrives and :class:`BodyTooLarge` stops the read, so a
    huge upload is never buffered. Each wait for the next chunk is bounded by the time left,
    so a stalled upload releases its connection. The app's error handler turns these
    errors, raised inside FastAPI's body parsing, into the same JSON.
    """

    def __init__(self, app: Any, limit: int, upload_limit: int, timeout_s: float):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit
        self.timeout_s = timeout_s

    def detail(self, length: int | None = None) -> str:
        size = f"of {length} bytes " if length is not None else ""
        return (
            f"request body {size}exceeds the upload limit of {self.upload_limit} bytes "
            "(SLC_MAX_UPLOAD_BYTES)"
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await error_response(413, "payload_too_large", self.detail(int(length)))(
                scope, receive, send
            )
            return
        received = 0
        started = False
        deadline = time.monotonic() + self.timeout_s

        async def guarded_receive() -> dict:
            nonlocal received
            try:
                message = await asyncio.wait_for(
                    receive(), max(deadline - time.monotonic(), 0.001)
                )
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {self.timeout_s:g} s "
                    "(SLC_BODY_TIMEOUT_S)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.detail())
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except BodyError as exc:  # raised outside FastAPI's body parsing
            if not started:
                await error_response(
                    exc.status, exc.error, str(exc), headers={"Connection": "close"}
                )(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: add :data:`SECURITY_HEADERS` to every HTTP answer."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [h for h in SECURITY_HEADERS if h[0] not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
