"""In-memory fakes of the control-plane client for task.Clock unit tests."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.client import ResponseDone

from plexagent.controlplane.protocol import Call, ControlPlaneError, ErrorKind


def sync_thread(f: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
    """Run ``f`` at once instead of in a thread (tests only)."""
    return defer.maybeDeferred(f, *args, **kwargs)


class FakeBodyTransport:
    def __init__(self, response: "FakeStreamResponse") -> None:
        self._response = response
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True
        self._response.lose()


class FakeStreamResponse:
    """A streaming response the test writes into."""

    code = 200

    def __init__(self) -> None:
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(FakeBodyTransport(self))

    def write(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(Failure(ResponseDone()))


class FakeClient:
    """Records calls; each answer is a Deferred the test fires."""

    def __init__(self) -> None:
        self.fetches: list[defer.Deferred[Any]] = []
        self.streams: list[tuple[str, defer.Deferred[Any]]] = []
        self.heartbeats: list[tuple[dict[str, Any], defer.Deferred[Any]]] = []
        self.reports: list[tuple[list[Any], list[str], defer.Deferred[Any]]] = []
        self.closed = False

    def fetch_state(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.fetches.append(d)
        return d

    def open_events(self, last_event_id: str = "") -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.streams.append((last_event_id, d))
        return d

    def heartbeat(self, body: dict[str, Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.heartbeats.append((body, d))
        return d

    def send_report(self, entries: list[Any], deleted: list[str]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.reports.append((entries, deleted, d))
        return d

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def unavailable(status: int = 503, retry_after: float | None = None) -> Failure:
    return Failure(ControlPlaneError(Call.STATE, ErrorKind.TRANSIENT, f"control plane answered {status}",
                                     status=status, retry_after=retry_after))


class Recorder(resource.Resource):
    """Records each request (method, path, headers, body) and answers with ``answer(request)``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.answer: Callable[[Any], Any] = lambda request: b"{}"

    def render(self, request: Any) -> Any:
        self.requests.append({
            "method": request.method, "path": request.uri,
            "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": request.content.read(),
        })
        return self.answer(request)
