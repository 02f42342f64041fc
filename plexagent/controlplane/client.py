"""
The control-plane HTTP client (treq, Deferreds).

Every call carries the node token and the agent's User-Agent, is bounded by
the request timeout (headers and body together), and fails with
``ControlPlaneError`` (retryable, with ``retry_after`` when the control plane
asked for it) or ``errors.NotFound``. Error messages never include the token.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import treq
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseFailed,
    _HTTP11ClientFactory,  # no public way to quiet the pool's factories
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from plexagent import __version__, errors

log = Logger()

MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """
    An HTTPConnectionPool whose per-connection factories do not log
    "Starting factory" / "Stopping factory" for every connection.
    """

    _factory = _QuietHTTP11ClientFactory


class ControlPlaneError(Exception):
    """A control-plane call failed in a way worth retrying."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@implementer(IOpenSSLTrustRoot)
class _SystemPlusBundle:
    """Trust the platform's CAs and an extra PEM bundle."""

    def __init__(self, ca_file: str) -> None:
        self._ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self._ca_file)


@implementer(IPolicyForHTTPS)
class _ExtraCAPolicy:
    def __init__(self, ca_file: str) -> None:
        self._trust = _SystemPlusBundle(ca_file)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)


def parse_retry_after(value: bytes | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds only; dates are ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    if seconds < 0 or seconds != seconds:
        return None
    return min(seconds, 3600.0)


class ControlPlaneClient:
    """Deferred-returning calls to the endpoints of control-plane.md."""

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        node_id: str,
        token: str,
        ca_file: str = "",
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._base = base_url.rstrip("/") + "/v1/nodes/" + quote(node_id, safe="")
        self.node_id = node_id
        self._headers = {
            b"Authorization": [b"Bearer " + token.encode("utf-8")],
            b"User-Agent": [f"plexagent/{__version__}".encode("ascii")],
            b"Accept": [b"application/json"],
        }
        self.request_timeout = request_timeout
        policy = _ExtraCAPolicy(ca_file) if ca_file else BrowserLikePolicyForHTTPS()
        self.pool = QuietConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        self.agent = Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=self.pool)
        self._http = treq.client.HTTPClient(self.agent)
        # The event stream holds its connection for as long as it lives: give
        # it its own, non-persistent pool so it never takes a pooled slot
        # from the request/response calls.
        self._stream_pool = QuietConnectionPool(reactor, persistent=False)
        self._stream_agent = Agent(
            reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=self._stream_pool
        )

    def __repr__(self) -> str:
        return f"<ControlPlaneClient {self._base}>"

    def url(self, *segments: str) -> str:
        return self._base + "".join("/" + quote(s, safe="") for s in segments)

    @property
    def headers(self) -> dict[bytes, list[bytes]]:
        return dict(self._headers)

    def _call(self, method: str, url: str, body: Any = None) -> defer.Deferred[tuple[int, Any]]:
        async def call() -> tuple[int, Any]:
            headers: dict[Any, Any] = dict(self._headers)
            data = None
            if body is not None:
                headers[b"Content-Type"] = [b"application/json"]
                data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            try:
                response = await self._http.request(method, url, headers=headers, data=data)
                raw = await _read_limited(response, MAX_RESPONSE_BYTES)
            except defer.CancelledError:
                raise ControlPlaneError("control plane request timed out") from None
            except ControlPlaneError:
                raise
            except (ResponseFailed, Exception) as e:  # network errors of every kind
                raise ControlPlaneError(f"control plane unreachable: {type(e).__name__}") from None
            code = response.code
            if code == 404:
                raise errors.NotFound("not found")
            if code == 429 or code >= 500:
                raise ControlPlaneError(
                    f"control plane answered {code}",
                    status=code,
                    retry_after=parse_retry_after(response.headers.getRawHeaders(b"retry-after", [None])[0]),
                )
            if not 200 <= code < 300:
                raise ControlPlaneError(f"control plane answered {code}", status=code)
            if not raw:
                return code, None
            try:
                return code, json.loads(raw)
            except ValueError:
                raise ControlPlaneError("control plane sent a body that is not JSON", status=code) from None

        d = defer.ensureDeferred(call())
        d.addTimeout(self.request_timeout, self._clock)

        def timed_out(f: Any) -> Any:
            f.trap(defer.TimeoutError)
            raise ControlPlaneError("control plane request timed out")

        d.addErrback(timed_out)
        return d

    def fetch_state(self) -> defer.Deferred[Any]:
        return self._call("GET", self.url("state")).addCallback(lambda r: r[1])

    def fetch_secret(self, key: str) -> defer.Deferred[Any]:
        return self._call("GET", self.url("secrets", key)).addCallback(lambda r: r[1])

    def send_report(self, entries: list[dict[str, Any]], deleted: list[str]) -> defer.Deferred[Any]:
        return self._call("POST", self.url("report"), {"entries": entries, "deleted": deleted})

    def heartbeat(self, body: dict[str, Any]) -> defer.Deferred[Any]:
        return self._call("POST", self.url("heartbeat"), body).addCallback(lambda r: r[1])

    def open_events(self, last_event_id: str = "") -> defer.Deferred[Any]:
        """
        Start the event stream: fires with the streaming response once a 200
        arrived (the caller delivers its body to a protocol), or fails with
        ``ControlPlaneError`` (``retry_after`` set on 429/503). The wait for
        the response headers is bounded by the request timeout.
        """
        headers = {k: list(v) for k, v in self._headers.items()}
        headers[b"Accept"] = [b"text/event-stream"]
        headers[b"Cache-Control"] = [b"no-cache"]
        if last_event_id:
            headers[b"Last-Event-ID"] = [last_event_id.encode("utf-8")]
        d = self._stream_agent.request(b"GET", self.url("events").encode("ascii"), Headers(headers))
        d.addTimeout(self.request_timeout, self._clock)

        def failed(f: Any) -> Any:
            if f.check(defer.TimeoutError, defer.CancelledError):
                raise ControlPlaneError("event stream request timed out")
            raise ControlPlaneError(f"control plane unreachable: {type(f.value).__name__}")

        def answered(response: Any) -> Any:
            if response.code == 200:
                return response
            # Refuse the body (it is not a stream we want) and drop the connection.
            response.deliverBody(_Discard())
            code = response.code
            if code == 404:
                raise ControlPlaneError("control plane has no event stream for this node", status=code)
            raise ControlPlaneError(
                f"control plane answered {code} to the event stream",
                status=code,
                retry_after=parse_retry_after(response.headers.getRawHeaders(b"retry-after", [None])[0])
                if code in (429, 503) else None,
            )

        d.addCallbacks(answered, failed)
        return d

    def close(self) -> defer.Deferred[None]:
        return defer.gatherResults(
            [self.pool.closeCachedConnections(), self._stream_pool.closeCachedConnections()]
        ).addCallback(lambda _: None)


class _Discard(Protocol):
    """Reads nothing of a body it was handed: closes its connection."""

    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


async def _read_limited(response: Any, limit: int) -> bytes:
    """The whole body, refusing to hold more than ``limit`` bytes of it."""
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise ControlPlaneError("control plane response too large")
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)
