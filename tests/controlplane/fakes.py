"""In-memory fakes of the control-plane session for task.Clock unit tests, and a recording HTTP server."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.client import ResponseDone

from plexagent.controlplane.protocol import Call, FetchedState
from plexagent.node.reports import Changes
from plexagent.node.state import NodeState


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


class FakeSession:
    """A NodeSession whose answers are Deferreds the test fires; records every call."""

    node_id = "node-1"

    def __init__(self) -> None:
        self.fetches: list[defer.Deferred[Any]] = []
        self.applied: list[FetchedState] = []
        self.streams: list[tuple[str, defer.Deferred[Any]]] = []
        self.heartbeats: list[defer.Deferred[Any]] = []
        #: (entries, deleted, Deferred) of every batch delivered
        self.reports: list[tuple[list[Any], list[str], defer.Deferred[Any]]] = []
        self.set_asides: list[Any] = []
        self.closed = False

    def fetch_state(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.fetches.append(d)
        return d

    def state_applied(self, fetched: FetchedState) -> None:
        self.applied.append(fetched)

    def open_events(self, last_event_id: str = "") -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.streams.append((last_event_id, d))
        return d

    def heartbeat(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.heartbeats.append(d)
        return d

    def deliver_reports(self, changes: Changes, set_aside: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.reports.append((changes.entries, changes.deleted, d))
        self.set_asides.append(set_aside)
        return d

    def rotate_node_key(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def fetched(doc: dict[str, Any], keys: Any = None) -> FetchedState:
    """A state fetch answering ``doc`` (a state document)."""
    return FetchedState(NodeState.from_document(doc), keys)


def unavailable(status: int = 503, retry_after: float | None = None, call: Call = Call.STATE) -> Failure:
    """A failed call as plexd's protocol classifies ``status``."""
    from twisted.web.http_headers import Headers

    from plexagent.controlplane.client import Reply
    from plexagent.controlplane.plexd import classify

    error = classify(call, Reply(status, Headers(), b""))
    error.retry_after = retry_after
    return Failure(error)


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
