"""uvicorn's HTTP/1.1 protocols with a deadline on the request head.

uvicorn times out an idle kept-alive connection (``timeout_keep_alive``), but not a client
that connects and then sends its request line and headers slowly, or sends part of them and
stops: such a connection is held for ever, and a few hundred of them hold the server's
sockets (a "slowloris"). The body has its own deadline (``SLC_BODY_TIMEOUT_S``, in
:class:`~skin_lesion_classifier.api.middleware.BodyGuard`), but the app only sees a request
once its head is complete.

:class:`HeaderTimeoutProtocol` gives each request head ``SLC_HEADER_TIMEOUT_S`` seconds
(:attr:`ServiceSettings.header_timeout_s`), counted from the connection (or the first byte
of a kept-alive connection's next request) however slowly the bytes trickle in; when it
runs out the client gets ``408 Request Timeout`` and the connection is closed. Run the
service with it: ``uvicorn --http skin_lesion_classifier.api.protocol:HeaderTimeoutProtocol
...`` (the ``serve`` command and :class:`~skin_lesion_classifier.api.server.LocalServer` do).
Behind a reverse proxy, its own limit does the same (nginx ``client_header_timeout``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from skin_lesion_classifier.api.middleware import SECURITY_HEADERS
from skin_lesion_classifier.api.settings import env_header_timeout_s

logger = logging.getLogger(__name__)


def request_timeout(timeout_s: float) -> bytes:
    """The answer to a client whose request head ran out of time (the service's JSON error
    shape, ``{"error", "detail"}``, and the security headers); the connection then closes."""
    body = json.dumps(
        {
            "error": "request_timeout",
            "detail": f"request line and headers not received within {timeout_s:g} s "
            "(SLC_HEADER_TIMEOUT_S)",
        }
    ).encode()
    head = [b"HTTP/1.1 408 Request Timeout", b"content-type: application/json",
            b"connection: close", b"content-length: %d" % len(body)]  # fmt: skip
    head += [name + b": " + value for name, value in SECURITY_HEADERS]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _HeadDeadline:
    """The deadline, mixed in before a uvicorn protocol class (``self.loop``,
    ``self.transport``): armed when a connection is made, disarmed when it is lost; each
    protocol arms it at a request's first byte and disarms it once the head is complete."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_deadline()

    def _init_deadline(self) -> None:
        self.header_timeout_s = env_header_timeout_s()
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.header_timeout_s, self._head_timed_out
            )

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        logger.warning(
            "closed a connection from %s: no complete request head within %g s",
            self.transport.get_extra_info("peername"),
            self.header_timeout_s,
        )
        self.transport.write(request_timeout(self.header_timeout_s))
        self.transport.close()


class HeaderTimeoutH11Protocol(_HeadDeadline, H11Protocol):
    """uvicorn's h11 protocol with the request-head deadline."""

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a request head is (being) sent
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete
            self._disarm()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional: uvicorn then speaks h11
    HeaderTimeoutProtocol: type = HeaderTimeoutH11Protocol
else:

    class HeaderTimeoutHttpToolsProtocol(_HeadDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol with the request-head deadline."""

        def on_message_begin(self) -> None:  # the first byte of a request
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

    HeaderTimeoutProtocol = HeaderTimeoutHttpToolsProtocol
