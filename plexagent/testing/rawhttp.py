"""
Raw HTTP exchanges for tests: send exactly the bytes given (a request no
well-behaved client library would send), then read the answer until the
server closes the connection.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.internet import reactor as default_reactor
from twisted.internet.endpoints import connectProtocol
from twisted.python.failure import Failure


@attrs.frozen
class RawResponse:
    """What the server sent: ``status`` is 0 when it closed without a word."""

    raw: bytes
    status: int
    #: header names lowercased; the last value of each
    headers: dict[bytes, bytes]
    body: bytes

    @classmethod
    def parse(cls, raw: bytes) -> "RawResponse":
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2) if raw else []
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return cls(raw=raw, status=status, headers=headers, body=body)

    @property
    def content_type(self) -> bytes | None:
        return self.headers.get(b"content-type")

    def json(self) -> Any:
        return json.loads(self.body)


class _Exchange(protocol.Protocol):
    transport: Any

    def __init__(self, data: bytes, until_closed: bool) -> None:
        self.data = data
        self.until_closed = until_closed
        self.received = bytearray()
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.until_closed and _complete(bytes(self.received)):
            self.closed.callback(bytes(self.received))
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if not self.closed.called:
            self.closed.callback(bytes(self.received))


def _complete(raw: bytes) -> bool:
    """Whether ``raw`` holds a whole response with a Content-Length."""
    head, separator, body = raw.partition(b"\r\n\r\n")
    if not separator:
        return False
    length = RawResponse.parse(head + separator).headers.get(b"content-length")
    return length is not None and length.isdigit() and len(body) >= int(length)


async def exchange(endpoint: Any, data: bytes, timeout: float = 15.0, reactor: Any = None,
                   until_closed: bool = True) -> RawResponse:
    """
    Connect to ``endpoint``, send ``data`` and return what came back once
    the server closed the connection (send ``Connection: close``, or a
    request the server must close on), or with ``until_closed=False`` as
    soon as a whole response (by its Content-Length) is in, closing the
    connection then as a client does. Fails after ``timeout`` seconds.
    """
    reactor = reactor or default_reactor
    client = _Exchange(data, until_closed)
    await connectProtocol(endpoint, client)

    client.closed.addTimeout(timeout, reactor, onTimeoutCancel=lambda result, seconds: _timed_out(client, seconds))
    return RawResponse.parse(await client.closed)


def _timed_out(client: _Exchange, seconds: float) -> bytes:
    """Give up on a server that did not close: say what it had sent."""
    client.transport.abortConnection()
    raise AssertionError(f"the server did not close the connection in {seconds} s; got {bytes(client.received)!r}")
