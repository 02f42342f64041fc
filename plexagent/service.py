"""
makeService(config): the whole service tree, the one place that wires
things together.
"""

from __future__ import annotations

import errno
import grp
import os
import re
import socket
import stat
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent import auth, web
from plexagent.config import Config, ConfigError, read_key_file
from plexagent.nodeapi import NodeAPI, SecretReader
from plexagent.reports import ReportStore
from plexagent.secrets import SecretBox, parse_node_secret_key
from plexagent.state import StateCache

log = Logger()

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})$")


def endpoint_description(listen: str) -> str:
    """
    Turn ``HOST:PORT`` (``[v6]:PORT`` too) into a Twisted endpoint
    description; anything else is taken as a description already.
    """
    m = _HOST_PORT.match(listen)
    if m is None:
        return listen
    port = int(m.group("port"))
    if m.group("v6") is not None:
        return f"tcp6:{port}:interface={m.group('v6').replace(':', chr(92) + ':')}"
    host = m.group("host")
    return f"tcp:{port}:interface={host}" if host else f"tcp:{port}"


def server_endpoint(reactor: Any, key: str, listen: str) -> Any:
    try:
        return endpoints.serverFromString(reactor, endpoint_description(listen))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{key}: {listen!r} is not HOST:PORT or an endpoint description ({e})") from None


class ListenerService(service.Service):
    """
    One listener: binds in startService (failing startup with a one-line
    message when it cannot), and on stop stops accepting, then lets
    in-flight requests finish within ``shutdown_timeout``.
    """

    def __init__(
        self,
        name: str,
        endpoint: Any,
        site: web.PlexSite,
        clock: Any,
        shutdown_timeout: float,
        prepare: Callable[[], None] | None = None,
        after_listen: Callable[[], None] | None = None,
    ) -> None:
        self.setName(name)
        self.endpoint = endpoint
        self.site = site
        self.clock = clock
        self.shutdown_timeout = shutdown_timeout
        self._prepare = prepare
        self._after_listen = after_listen
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        if self._prepare is not None:
            self._prepare()
        result: list[Any] = []
        d = self.endpoint.listen(self.site)
        d.addBoth(result.append)
        if not result:
            # An endpoint that binds asynchronously: report failure when it comes.
            d.addCallback(self._listening)
            return
        outcome = result[0]
        if isinstance(outcome, Failure):
            reason = outcome.getErrorMessage()
            raise SystemExit(f"plexagent: {self.name}: cannot listen: {reason}")
        self._listening(outcome)

    def _listening(self, port: Any) -> None:
        self.port = port
        if self._after_listen is not None:
            self._after_listen()

    async def _stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()
        await self.site.drain(self.shutdown_timeout, self.clock)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory; remove a stale socket, refuse a live one."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"plexagent: node_api.socket: cannot create {directory}: {e.strerror}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"plexagent: node_api.socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise SystemExit(f"plexagent: node_api.socket: {path}: {e.strerror}")
    else:
        raise SystemExit(f"plexagent: node_api.socket: another process is listening on {path}")
    finally:
        probe.close()


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class _Stores(service.Service):
    """Loads the persisted state and reports before any listener starts."""

    def __init__(self, cache: StateCache, reports: ReportStore) -> None:
        self.setName("stores")
        self.cache = cache
        self.reports = reports

    def startService(self) -> None:
        super().startService()
        try:
            self.cache.load()
            self.reports.load()
        except OSError as e:
            raise SystemExit(f"plexagent: node.data_dir: {e.filename}: {e.strerror}")

    def stopService(self) -> Any:
        super().stopService()
        d = self.reports.idle()
        d.addCallback(lambda _: self.reports.close())
        return d


class Agent:
    """The domain objects of one agent, built once and shared."""

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.cache = StateCache(config.node.data_dir)
        self.reports = ReportStore(config.node.data_dir, reactor)
        self.client: Any = None
        self.box: SecretBox | None = None


def _warn(message: str) -> None:
    log.warn("{message}", message=message)


def makeService(config: Config, reactor: Any = None) -> service.MultiService:
    """Build the agent's service tree for ``config``; binds nothing until started."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor

    top = service.MultiService()
    agent = Agent(config, reactor)
    top.agent = agent  # type: ignore[attr-defined]
    _Stores(agent.cache, agent.reports).setServiceParent(top)

    cp = config.control_plane
    cp_services: list[service.Service] = []
    if cp.url:
        from plexagent.controlplane.client import ControlPlaneClient

        token = read_key_file("control_plane.token_file", cp.token_file, _warn)
        nsk_text = read_key_file("node.secret_key_file", config.node.secret_key_file, _warn)
        agent.box = SecretBox(parse_node_secret_key(nsk_text))
        if cp.ca_file and not os.path.isfile(cp.ca_file):
            raise ConfigError(f"control_plane.ca_file: {cp.ca_file} is not a readable file")
        agent.client = ControlPlaneClient(
            reactor,
            cp.url,
            config.node.id,
            token,
            ca_file=cp.ca_file,
            request_timeout=cp.request_timeout,
            connect_timeout=cp.connect_timeout,
        )
        cp_services = _control_plane_services(cp, config.node, agent, reactor)

    api = NodeAPI(agent.cache, agent.reports, SecretReader(agent.cache, agent.client, agent.box))
    resource = api.resource()
    napi = config.node_api
    secrets_gid = group_id(napi.secrets_group)
    if secrets_gid is None:
        log.info("secrets group {group} does not exist: only root may read secret values on the socket",
                 group=napi.secrets_group)

    unix_site = web.PlexSite(
        auth.GuardedResource(auth.PeerCredentialPolicy(secrets_gid), resource), napi.max_body_bytes
    )
    socket_path = napi.socket

    def chgrp_socket() -> None:
        gid = group_id(napi.socket_group)
        if gid is not None:
            os.chown(socket_path, -1, gid)
        os.chmod(socket_path, int(napi.socket_mode, 8))

    ListenerService(
        "node_api.socket",
        endpoints.UNIXServerEndpoint(reactor, socket_path, mode=int(napi.socket_mode, 8)),
        unix_site,
        reactor,
        config.node.shutdown_timeout,
        prepare=lambda: prepare_socket_path(socket_path),
        after_listen=chgrp_socket,
    ).setServiceParent(top)

    if napi.http_enabled:
        http_token = read_key_file("node_api.http_token_file", napi.http_token_file, _warn)
        tcp_site = web.PlexSite(
            auth.GuardedResource(auth.BearerTokenPolicy(http_token), resource), napi.max_body_bytes
        )
        ListenerService(
            "node_api.http_listen",
            server_endpoint(reactor, "node_api.http_listen", napi.http_listen),
            tcp_site,
            reactor,
            config.node.shutdown_timeout,
        ).setServiceParent(top)

    if cp_services:
        # After the listeners: the socket answers from the persisted cache
        # before the control plane has been reached.
        for part in cp_services:
            part.setServiceParent(top)
    return top


def _control_plane_services(cp: Any, node: Any, agent: Agent, reactor: Any) -> list[service.Service]:
    """
    State sync (fetch, event stream, reconcile), heartbeat and report outbox
    for a configured control plane; ``agent.sync``, ``agent.outbox`` and
    ``agent.heartbeat`` name them for metrics and tests.
    """
    from plexagent.controlplane.events import EnvelopeVerifier, parse_public_key
    from plexagent.controlplane.outbox import ReportOutbox
    from plexagent.controlplane.sync import EventStream, Heartbeat, StateSync

    public_key = None
    if cp.signing_public_key:
        try:
            public_key = parse_public_key(cp.signing_public_key)
        except ValueError as e:
            raise ConfigError(
                f"control_plane.signing_public_key: must be standard base64 of a raw 32-byte Ed25519 key ({e})"
            ) from None
    else:
        log.warn("control_plane.signing_public_key is not set: events are applied without verification")
    sync = StateSync(agent.client, agent.cache, reactor, reconcile_interval=cp.reconcile_interval)
    sync.setName("state-sync")
    if cp.events:
        sync.stream = EventStream(
            agent.client,
            reactor,
            EnvelopeVerifier(public_key, reactor),
            sync.apply,
            on_reconnect=sync.stream_reconnected,
            idle_timeout=cp.events_idle_timeout,
        )
    heartbeat = Heartbeat(agent.client, reactor, node.id, cp.heartbeat_interval, sync.fetch_now)
    heartbeat.setName("heartbeat")
    outbox = ReportOutbox(agent.reports, agent.client, reactor, node.data_dir, cp.report_debounce)
    outbox.setName("report-outbox")
    agent.sync, agent.heartbeat, agent.outbox = sync, heartbeat, outbox  # type: ignore[attr-defined]
    return [sync, heartbeat, outbox]
