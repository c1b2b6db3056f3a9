"""What one client may cost the model server: read deadlines, a connection cap, the largest body it reads.

uvicorn closes an idle kept-alive connection, but not one that trickles its request: a client that sends a
header byte every few seconds would hold its connection (and a slot) forever. ``guarded_protocol`` gives
uvicorn's HTTP/1.1 protocol two deadlines of its own: the request head must arrive whole within
``header_timeout_s`` of its first byte (or of the connection), and the body within ``body_timeout_s`` of
the head; past either the server closes the connection itself (one debug line). The body limit is checked
against ``Content-Length`` before a byte of the body is read, and counted while a chunked body streams in.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tasks.serving.protocol import MAX_BATCH, max_body_bytes

logger = logging.getLogger("train_mnist.serving")

HEADER_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 512


@dataclass(frozen=True)
class Limits:
    """The server's limits (``train-mnist serve --help`` names each option)."""

    max_batch: int = MAX_BATCH
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS

    @property
    def max_body_bytes(self) -> int:
        return max_body_bytes(self.max_batch)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on the request head and one on the body."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: str | None = None
        self._arm("head", self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.IDLE and data:
            self._arm("head", self.header_timeout_s)  # a request begun on a kept-alive connection
        elif state is h11.SEND_BODY:
            self._arm("body", self.body_timeout_s)
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # idle now: uvicorn's keep-alive timeout takes over
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, what: str, seconds: float) -> None:
        if self._waiting_for == what:
            return  # the deadline runs from the first byte of the head (or the end of it), not the last
        self._disarm()
        self._waiting_for = what
        self._deadline = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
        self._deadline, self._waiting_for = None, None

    def _expired(self, what: str, seconds: float) -> None:
        self._deadline, self._waiting_for = None, None
        if not self.transport.is_closing():
            client = "{}:{}".format(*self.client) if self.client else "a client"
            logger.debug("closed the connection of %s: its request %s did not arrive within %g s", client, what,
                         seconds)
            self.transport.close()


def guarded_protocol(limits: Limits) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn builds per connection, with ``limits``' deadlines."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": limits.header_timeout_s, "body_timeout_s": limits.body_timeout_s})
