"""
The HTTP transport to the control plane (treq, Deferreds), the same for
every wire protocol: what a status means is the protocol's business.

Every call carries ``User-Agent: plexagent/<version>``, ``Accept`` and, when
the protocol wants it, ``Accept-Encoding: gzip`` and gzipped request bodies
over 1024 bytes (as plexd does); it is bounded by the connect timeout and
the request timeout (headers and body together). Network errors, timeouts
and bodies over their cap fail with ``ControlPlaneError`` of kind
``TRANSIENT``; any HTTP answer is returned as a ``Reply``. The event stream
has its own pool and only its response headers are timed. Error messages
never hold the bearer or a body.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from typing import Any
from urllib.parse import quote

import attrs
from OpenSSL import SSL
from twisted.internet import defer, threads
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import TLSVersion, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,  # no public way to quiet the pool's factories
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from plexagent import __version__, errors, strictparse
from plexagent.controlplane.protocol import Call, ControlPlaneError, ErrorKind
from plexagent.fileio import STORED_MAX_DEPTH, STORED_MAX_VALUES

log = Logger()

#: Largest uncompressed answer accepted.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Largest gzipped answer accepted once decompressed (plexd's limit).
MAX_GUNZIPPED_BYTES = 10 * 1024 * 1024
#: Request bodies longer than this are gzipped (plexd: ``len(data) > 1024``).
GZIP_OVER = 1024
#: Bodies this large are compressed or decompressed in a thread, not on the reactor.
THREAD_OVER = 256 * 1024
#: A Retry-After above this is taken as this.
MAX_RETRY_AFTER = 3600.0

__all__ = ["ControlPlaneError", "Reply", "Transport", "json_object", "parse_document", "path_escape",
           "parse_retry_after"]


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """
    An HTTPConnectionPool whose per-connection factories do not log
    "Starting factory" / "Stopping factory" for every connection.
    """

    _factory = _QuietHTTP11ClientFactory


@implementer(IOpenSSLTrustRoot)
class _SystemPlusBundle:
    """Trust the platform's CAs and an extra PEM bundle."""

    def __init__(self, ca_file: str) -> None:
        self._ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self._ca_file)


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """Verified TLS 1.2 or later, trusting the system's CAs (and ``ca_file`` when set)."""

    def __init__(self, ca_file: str = "") -> None:
        self._trust = _SystemPlusBundle(ca_file) if ca_file else platformTrust()

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust,
                                   extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})


def path_escape(segment: str) -> str:
    """A path segment as Go's ``url.PathEscape`` writes it (``/`` becomes ``%2F``)."""
    return quote(segment, safe="$&+:=@")


_ATOI = re.compile(r"[+-]?[0-9]+")


def parse_retry_after(value: bytes | None) -> float | None:
    """
    Seconds from a Retry-After header as Go's ``strconv.Atoi`` reads it
    (``+7`` and ``007`` count; a date, ``1.5``, 0 or less are absent),
    capped at an hour.
    """
    if value is None:
        return None
    try:
        text = value.decode("ascii").strip(" \t")
    except UnicodeDecodeError:
        return None
    if not _ATOI.fullmatch(text):
        return None
    seconds = int(text)
    if seconds <= 0:
        return None
    return min(float(seconds), MAX_RETRY_AFTER)


def parse_document(data: bytes) -> Any:
    """
    A control-plane document, as strictly as client input, within the limits
    of what the agent stores: a state holds many client documents, each
    nested up to the client limit inside it.
    """
    return strictparse.parse_json(data, max_depth=STORED_MAX_DEPTH, max_values=STORED_MAX_VALUES)


def json_object(call: Call, reply: Reply) -> dict[str, Any]:
    """A 2xx answer that must be a JSON object (an empty or undecodable one is a failure, as in plexd)."""
    try:
        doc = parse_document(reply.body)
    except errors.InvalidInput:
        raise ControlPlaneError(call, ErrorKind.TRANSIENT, f"{call.value}: the answer is not JSON",
                                status=reply.status) from None
    if not isinstance(doc, dict):
        raise ControlPlaneError(call, ErrorKind.TRANSIENT, f"{call.value}: the answer is not a JSON object",
                                status=reply.status)
    return doc


@attrs.frozen
class Reply:
    """An HTTP answer: its status, headers and (decompressed) body."""

    status: int
    headers: Headers = attrs.field(repr=False)
    body: bytes = attrs.field(repr=False)

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.header(b"retry-after"))


class Transport:
    """Requests to one control plane: pooled connections, TLS, timeouts, gzip, size caps."""

    def __init__(self, reactor: Any, base_url: str, ca_file: str = "", request_timeout: float = 30.0,
                 connect_timeout: float = 10.0, user_agent: str = f"plexagent/{__version__}",
                 clock: IReactorTime | None = None) -> None:
        self._clock: IReactorTime = clock or reactor
        #: the base URL with any trailing slash trimmed (a path prefix is kept)
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self.user_agent = user_agent.encode("ascii")
        policy = _TLSPolicy(ca_file)
        self.pool = QuietConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        # The plain Agent, not treq's: no transparent (unbounded) gunzip, no
        # redirects carrying the bearer elsewhere, no cookies.
        self._agent = Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=self.pool)
        # The event stream holds its connection for as long as it lives: it
        # gets its own, non-persistent pool and never takes a pooled slot.
        self._stream_pool = QuietConnectionPool(reactor, persistent=False)
        self._stream_agent = Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout,
                                   pool=self._stream_pool)

    def __repr__(self) -> str:
        return f"<Transport {self.base_url}>"

    def url(self, path: str) -> str:
        return self.base_url + path

    def headers(self, bearer: str, *, gzip_ok: bool = True) -> dict[bytes, list[bytes]]:
        headers = {b"User-Agent": [self.user_agent], b"Accept": [b"application/json"]}
        if gzip_ok:
            headers[b"Accept-Encoding"] = [b"gzip"]
        if bearer:
            headers[b"Authorization"] = [b"Bearer " + bearer.encode("utf-8")]
        return headers

    def request(self, call: Call, method: str, path: str, bearer: str = "", body: bytes | None = None, *,
                gzip_over: int | None = GZIP_OVER, headers: dict[bytes, list[bytes]] | None = None,
                max_bytes: int = MAX_RESPONSE_BYTES) -> defer.Deferred[Reply]:
        """
        One request; fires with its ``Reply`` whatever the status, or fails
        with ControlPlaneError(TRANSIENT) on a network error, a timeout or
        an answer over its cap. ``body`` is sent as JSON (gzipped past
        ``gzip_over`` bytes; None never gzips); a POST without one is sent
        with ``Content-Length: 0``.
        """

        async def run() -> Reply:
            sent = self.headers(bearer, gzip_ok=gzip_over is not None)
            sent.update(headers or {})
            data = body
            if body is not None:
                sent[b"Content-Type"] = [b"application/json"]
                if gzip_over is not None and len(body) > gzip_over:
                    data = await self._maybe_in_thread(len(body), gzip.compress, body, 6)
                    sent[b"Content-Encoding"] = [b"gzip"]
            elif method in ("POST", "PUT"):
                data = b""
            producer = FileBodyProducer(io.BytesIO(data)) if data is not None else None
            try:
                response = await self._agent.request(method.encode("ascii"), self.url(path).encode("ascii"),
                                                     Headers(sent), producer)
                raw = await read_limited(response, max_bytes)
            except _TooLarge:
                raise ControlPlaneError(call, ErrorKind.TRANSIENT,
                                        f"{call.value}: control plane response too large (over {max_bytes} bytes)"
                                        ) from None
            except defer.CancelledError:
                raise
            except Exception as e:  # network errors of every kind
                raise ControlPlaneError(call, ErrorKind.TRANSIENT,
                                        f"{call.value}: control plane unreachable: {type(e).__name__}") from None
            encoding = (response.headers.getRawHeaders(b"content-encoding") or [b""])[0]
            if encoding.strip().lower() == b"gzip":
                raw = await self._maybe_in_thread(len(raw), _gunzip, raw, MAX_GUNZIPPED_BYTES, call)
            return Reply(response.code, response.headers, raw)

        d = defer.ensureDeferred(run())
        d.addTimeout(self.request_timeout, self._clock)

        def timed_out(f: Any) -> Any:
            f.trap(defer.TimeoutError)
            raise ControlPlaneError(call, ErrorKind.TRANSIENT, f"{call.value}: control plane request timed out")

        return d.addErrback(timed_out)

    def _maybe_in_thread(self, size: int, f: Any, *args: Any) -> Any:
        if size > THREAD_OVER:
            return threads.deferToThread(f, *args)
        return defer.maybeDeferred(f, *args)

    def open_stream(self, call: Call, path: str, bearer: str,
                    headers: dict[bytes, list[bytes]] | None = None) -> defer.Deferred[Any]:
        """
        Open an event stream: fires with the response once its headers
        arrived (whatever the status: the caller reads or discards the
        body), or fails with ControlPlaneError(TRANSIENT). Only the wait for
        the headers is timed; no Accept-Encoding is sent.
        """
        sent = self.headers(bearer, gzip_ok=False)
        sent[b"Accept"] = [b"text/event-stream"]
        sent[b"Cache-Control"] = [b"no-cache"]
        sent.update(headers or {})
        d = self._stream_agent.request(b"GET", self.url(path).encode("ascii"), Headers(sent))
        d.addTimeout(self.request_timeout, self._clock)

        def failed(f: Any) -> Any:
            if f.check(defer.TimeoutError):
                raise ControlPlaneError(call, ErrorKind.TRANSIENT, f"{call.value}: event stream request timed out")
            if f.check(defer.CancelledError):
                return f
            raise ControlPlaneError(call, ErrorKind.TRANSIENT,
                                    f"{call.value}: control plane unreachable: {type(f.value).__name__}")

        return d.addErrback(failed)

    def close(self) -> defer.Deferred[None]:
        return defer.gatherResults(
            [self.pool.closeCachedConnections(), self._stream_pool.closeCachedConnections()]
        ).addCallback(lambda _: None)


def discard_body(response: Any) -> None:
    """Read nothing of ``response``'s body: its connection is closed."""
    response.deliverBody(_Discard())


class _Discard(Protocol):
    def connectionMade(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class _TooLarge(Exception):
    pass


class _LimitedBody(Protocol):
    """Collects a body, dropping the connection once it passes ``limit`` bytes."""

    def __init__(self, limit: int, finished: defer.Deferred[bytes]) -> None:
        self._limit = limit
        self._finished = finished
        self._chunks: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size > self._limit:
            return
        self._size += len(data)
        if self._size > self._limit:
            # Drop the connection; the caller hears of it once it is gone.
            self._chunks = []
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self._finished.called:
            return
        if self._size > self._limit:
            self._finished.errback(_TooLarge())
        elif reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(reason)


def _gunzip(data: bytes, limit: int, call: Call) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise ControlPlaneError(call, ErrorKind.TRANSIENT, f"{call.value}: the answer is not valid gzip") from None
    if len(out) > limit:
        raise ControlPlaneError(call, ErrorKind.TRANSIENT,
                                f"{call.value}: control plane response too large (over {limit} bytes gunzipped)")
    return out


def read_limited(response: Any, limit: int) -> defer.Deferred[bytes]:
    """The whole body, refusing (``_TooLarge``) to hold more than ``limit`` bytes of it."""
    finished: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_LimitedBody(limit, finished))
    return finished

