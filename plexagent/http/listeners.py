"""
Listeners: endpoint descriptions (``HOST:PORT`` or any Twisted endpoint,
systemd sockets included), a service per listener that binds at start and
drains at stop, the Unix socket's path checks, and the binds
``check-config`` tries without keeping them.
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
from twisted.internet import defer, endpoints, tcp, unix
from twisted.internet.error import AlreadyListened, CannotListenError, ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from plexagent.config import ConfigError
from plexagent.http.site import PlexSite

log = Logger()

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})")


def endpoint_description(listen: str) -> str:
    """
    Turn ``HOST:PORT`` (``[v6]:PORT`` too) into a Twisted endpoint
    description; anything else is taken as a description already.
    """
    m = _HOST_PORT.fullmatch(listen)
    if m is None:
        return listen
    port = int(m.group("port"))
    if m.group("v6") is not None:
        return f"tcp6:{port}:interface={m.group('v6').replace(':', chr(92) + ':')}"
    host = m.group("host")
    return f"tcp:{port}:interface={host}" if host else f"tcp:{port}"


class _SystemdUNIXPort(unix.Port):
    """
    A listening Unix socket systemd made and passed: its file, mode and
    group are systemd's (SocketMode=, SocketGroup=). twisted's Port would
    chmod it to 0666 on adoption and remove the file on stop, leaving
    the socket unit with a socket nobody can reach.
    """

    def startListening(self) -> None:
        if unix._inFilesystemNamespace(self._bindPath):
            # The mode Port.startListening sets: keep systemd's.
            self.mode = stat.S_IMODE(os.stat(self._bindPath).st_mode)
        super().startListening()

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)  # not unix.Port's: the file stays


class SystemdUNIXServerEndpoint(endpoints.AdoptedStreamServerEndpoint):
    """Listens on a Unix socket passed by systemd, leaving its file as systemd made it."""

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        if self._used:
            return defer.fail(AlreadyListened())
        self._used = True
        try:
            self._setNonBlocking(self.fileno)
            port = _SystemdUNIXPort._fromListeningDescriptor(self.reactor, self.fileno, factory)
            port.startListening()
            os.close(self.fileno)  # the port holds its own duplicate
        except BaseException:
            return defer.fail()
        return defer.succeed(port)


def server_endpoint(reactor: Any, key: str, listen: str) -> Any:
    try:
        endpoint = endpoints.serverFromString(reactor, endpoint_description(listen))
        if isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint) and endpoint.addressFamily == socket.AF_UNIX:
            return SystemdUNIXServerEndpoint(reactor, endpoint.fileno, endpoint.addressFamily)
        return endpoint
    except IndexError:
        raise ConfigError(f"{key}: {listen!r}: no such socket was passed by systemd") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{key}: {listen!r} is not HOST:PORT or an endpoint description ({e})") from None


class ListenerService(service.Service):
    """
    One listener: binds in startService (failing startup with a one-line
    message when it cannot), and on stop stops accepting, then lets the
    requests that have begun arriving finish within ``shutdown_timeout``
    and closes every connection.
    """

    def __init__(
        self,
        name: str,
        endpoint: Any,
        site: PlexSite,
        clock: Any,
        shutdown_timeout: float,
        prepare: Callable[[], Any] | None = None,
        after_listen: Callable[[], None] | None = None,
        socket_path: str = "",
    ) -> None:
        self.setName(name)
        #: the Unix socket path startup prepares (``prepare``), if any
        self.socket_path = socket_path
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
            raise StartupError(cannot_listen(self.name or "", outcome.value))
        self._listening(outcome)

    def _listening(self, port: Any) -> None:
        self.port = port
        # Operators (and tests, with port 0) learn the bound address here.
        log.info("{name} listening on {address}", name=self.name, address=str(port.getHost()))
        if self._after_listen is not None:
            self._after_listen()

    def release(self) -> None:
        """
        Close the listening socket at once, without the reactor (startup
        failed and the process is about to exit): a Unix socket's file is
        removed.
        """
        port, self.port = self.port, None
        if port is not None and getattr(port, "connected", False):
            port.stopReading()
            port.connectionLost(Failure(ConnectionDone()))

    async def _stop(self) -> None:
        port, self.port = self.port, None
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        busy = self.site.busy_connections()
        log.info(
            "{name} stopped accepting connections; {busy} requests in progress have up to {timeout}s to finish",
            name=self.name, busy=busy, timeout=self.shutdown_timeout,
        )
        cut = await self.site.shut_down(self.shutdown_timeout, self.clock)
        if cut:
            log.warn(
                "{name}: cut {cut} connections still busy after node.shutdown_timeout ({timeout}s)",
                name=self.name, cut=cut, timeout=self.shutdown_timeout,
            )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())


def cannot_listen(name: str, error: BaseException) -> str:
    """The one line startup (and check-config) print for a listener that cannot bind."""
    return f"plexagent: {name}: cannot listen: {error}"


class StartupError(SystemExit):
    """Startup cannot go on; the message is the one line to print (and exits non-zero)."""


def prepare_socket_path(path: str, check_only: bool = False) -> list[str]:
    """
    Create the socket's directory; remove a stale socket, refuse a live one.

    With ``check_only`` a stale socket is left alone. Returns the
    directories it created, top down (for ``check_only`` callers to remove).
    """
    directory = os.path.dirname(path) or "."
    missing: list[str] = []
    ancestor = os.path.abspath(directory)
    while not os.path.lexists(ancestor):
        missing.insert(0, ancestor)
        ancestor = os.path.dirname(ancestor)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as e:
        _remove_dirs([d for d in missing if os.path.isdir(d)])
        raise StartupError(f"plexagent: node_api.socket: cannot create {directory}: {e.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return missing
    if not stat.S_ISSOCK(st.st_mode):
        _remove_dirs(missing)
        raise StartupError(f"plexagent: node_api.socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            if not check_only:
                os.unlink(path)
            return missing
        raise StartupError(f"plexagent: node_api.socket: {path}: {e.strerror}") from None
    else:
        raise StartupError(f"plexagent: node_api.socket: another process is listening on {path}")
    finally:
        probe.close()


def _remove_dirs(created: list[str]) -> None:
    for directory in reversed(created):
        try:
            os.rmdir(directory)
        except OSError:
            pass


def probe_tcp(name: str, interface: str, port: int) -> None:
    """Bind ``interface:port`` as Twisted would, and release it; StartupError with startup's line if it cannot."""
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            address = socket.getaddrinfo(interface, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4]
        else:
            address = (interface, port)
        probe.bind(address)
    except OSError as e:
        raise StartupError(cannot_listen(name, CannotListenError(interface, port, e))) from None
    finally:
        probe.close()


def probe_unix(name: str, path: str) -> None:
    """Bind a Unix socket at ``path`` and remove it; StartupError with startup's line if it cannot."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.bind(path)
    except OSError as e:
        raise StartupError(cannot_listen(name, CannotListenError(None, path, e))) from None
    else:
        os.unlink(path)
    finally:
        probe.close()


def check_listeners(top: service.MultiService, memory: Any) -> None:
    """
    Try every bind startup would make, and release each at once: ``top``
    was built on ``memory`` (a MemoryReactor), which tells where each
    listener would bind. Raises StartupError with the line startup would
    print; leaves nothing behind (not even a directory it had to create).
    """
    for child in top:
        if not isinstance(child, ListenerService):
            continue
        name = child.name or ""
        seen_tcp, seen_ssl, seen_unix = len(memory.tcpServers), len(memory.sslServers), len(memory.unixServers)
        child.endpoint.listen(child.site)
        for port, _factory, _backlog, interface in memory.tcpServers[seen_tcp:]:
            probe_tcp(name, interface, port)
        for port, _factory, _context, _backlog, interface in memory.sslServers[seen_ssl:]:
            probe_tcp(name, interface, port)
        for address, *_rest in memory.unixServers[seen_unix:]:
            path = os.fsdecode(address)
            if child.socket_path == path:
                check_socket_path(path)
            else:
                probe_unix(name, path)


def check_socket_path(path: str) -> None:
    """
    What startup would say of the Local Node API socket at ``path``
    (directory, file in the way, live socket, bind), without changing
    anything: StartupError with startup's line.
    """
    created = prepare_socket_path(path, check_only=True)
    try:
        if not os.path.lexists(path):  # else a stale socket startup would replace
            probe_unix("node_api.socket", path)
    finally:
        _remove_dirs(created)


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
