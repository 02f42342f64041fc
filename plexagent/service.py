"""
makeService(config): the whole service tree, the one place that wires
things together.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from plexagent import __version__
from plexagent.config import Config, ConfigError, read_key_file, read_key_lines
from plexagent.controlplane.plexd import PERMISSIVE_RULES
from plexagent.controlplane.status import status_document
from plexagent.credentials import CredentialReloader
from plexagent.http import auth, responses
from plexagent.http.listeners import (
    ListenerService,
    StartupError,
    group_id,
    prepare_socket_path,
    server_endpoint,
)
from plexagent.http.operator import PREFIX, OperatorRoutes
from plexagent.http.routing import PrefixRoutes
from plexagent.http.site import PlexSite, RequestLog, chain_observers
from plexagent.node.reports import ReportStore
from plexagent.node.routes import NodeAPI, SecretReader
from plexagent.node.state import StateCache

log = Logger()

class AgentService(service.MultiService):
    """
    The agent's service tree. Starts its children in the order they were
    added; a child that fails to start stops startup, and the listeners
    already bound are released first. Stops in dependency order: every
    listener stops accepting and lets its in-flight requests finish, and
    only then do the services they use stop (control-plane client, Docker
    pool, stores), one after another in the reverse order they were added.
    """

    def startService(self) -> None:
        try:
            super().startService()
        except BaseException:
            for child in self:
                if isinstance(child, ListenerService):
                    child.release()
            raise

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        children = [child for child in self if child.running]
        listeners = [child for child in children if isinstance(child, ListenerService)]
        await defer.gatherResults(
            [defer.maybeDeferred(child.stopService) for child in listeners], consumeErrors=True
        ).addErrback(lambda f: log.failure("stopping the listeners failed", f))
        for child in reversed(children):
            if child in listeners:
                continue
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name or repr(child))


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
            raise StartupError(f"plexagent: node.data_dir: {e.filename}: {e.strerror}") from None

    def stopService(self) -> Any:
        super().stopService()
        # Last to stop: what the services before wrote is on disk first.
        d = defer.gatherResults([self.cache.idle(), self.reports.idle()], consumeErrors=True)
        d.addCallback(lambda _: self.reports.close())
        return d


class Agent:
    """The domain objects of one agent, built once and shared."""

    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.cache = StateCache(config.node.data_dir)
        self.reports = ReportStore(config.node.data_dir, reactor, max_entries=config.node_api.max_report_entries,
                                   max_bytes=config.node_api.max_report_bytes)
        #: the control-plane link (None when standalone)
        self.link: Any = None
        #: domain objects the agent API's route modules use, by name
        self.agent_services: dict[str, Any] = {}
        self.agent_api: Any = None
        #: re-reads key files and the TLS certificate (SIGHUP, POST /plexagent/reload)
        self.reloader = CredentialReloader(reactor)

    def current_session(self) -> Any:
        """The control-plane session, once the node has an identity (else None)."""
        return self.link.session if self.link is not None else None

    @property
    def sync(self) -> Any:
        return self.link.sync if self.link is not None else None

    @property
    def heartbeat(self) -> Any:
        return self.link.heartbeat if self.link is not None else None

    @property
    def outbox(self) -> Any:
        return self.link.outbox if self.link is not None else None


def _warn(message: str) -> None:
    log.warn("{message}", message=message)


class GracefulTermination(service.Service):
    """
    SIGTERM is the agent's ordinary way to stop: the services stop in order
    (the listeners drain first) and the process exits 0.

    The reactor's own SIGTERM handler stops it; twistd would then re-raise
    the signal on itself (exit status -15): the shutdown clears that. A
    SIGTERM during startup, before the reactor runs and installs its
    handler, stops the agent once it runs instead of killing it half-started.
    """

    def __init__(self, reactor: Any) -> None:
        self.setName("graceful-termination")
        self.reactor = reactor

    _installed = False

    def privilegedStartService(self) -> None:
        # twistd calls this on every service before it starts any (binds included).
        super().privilegedStartService()
        self._install()

    def startService(self) -> None:
        super().startService()
        self._install()

    def _install(self) -> None:
        if self._installed:
            return
        self._installed = True
        import signal

        signal.signal(signal.SIGTERM, self._during_startup)
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exit_cleanly)

    def _during_startup(self, signum: int, frame: Any) -> None:
        log.info("received SIGTERM during startup: stopping once started")
        self.reactor.callFromThread(self.reactor.stop)

    def _exit_cleanly(self) -> None:
        import signal

        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None


def build_agent_api(config: Config, reactor: Any, agent: "Agent") -> "ListenerService":
    """The Node Agent API listener with its security layers and route modules."""
    from plexagent.agentapi import AgentAPI, AgentContext

    aapi = config.agent_api
    api_keys = read_key_lines("agent_api.api_key_file", aapi.api_key_file, _warn)
    policy = auth.AgentAPIPolicy(aapi.allowed_ips, api_keys, aapi.require_auth_always,
                                 client_cert_suffices=bool(aapi.tls_client_ca) and not aapi.require_api_key_with_client_cert)
    agent.reloader.add("agent_api.api_key_file",
                       lambda: read_key_lines("agent_api.api_key_file", aapi.api_key_file, _warn), policy.set_api_keys)
    context = AgentContext(config=config, reactor=reactor)
    context.services.update(agent.agent_services)
    api = AgentAPI(context, policy)
    agent.agent_api = api
    if aapi.tls_cert:
        from plexagent.http import tls

        def options() -> Any:
            return tls.server_options(aapi.tls_cert, aapi.tls_key, aapi.tls_client_ca)

        creator = tls.SwappableServerTLS(options())
        agent.reloader.add("agent_api.tls_cert", options, creator.swap)
        endpoint = tls.tls_server_endpoint(reactor, aapi.listen, creator)
    else:
        endpoint = server_endpoint(reactor, "agent_api.listen", aapi.listen)
    return ListenerService("agent_api.listen", endpoint, api.site(), reactor, config.node.shutdown_timeout)


def add_operations(config: Config, reactor: Any, agent: Agent, top: service.MultiService) -> None:
    """Host operations for the agent API: systemd, the firewall, nginx, cron, metrics."""
    from plexagent.host.firewall import Firewall
    from plexagent.host.programs import Programs
    from plexagent.host.services import ServiceControl
    from plexagent.host.systemd import Systemd

    system = config.system
    programs = Programs(reactor, system.path, system.program_timeout)
    systemd = Systemd(programs, system.systemctl)
    agent.agent_services["programs"] = programs
    agent.agent_services["systemd"] = systemd
    agent.agent_services["service_control"] = ServiceControl(
        systemd, config.agent_api.allowed_services, system.agent_service, reactor, system.self_restart_delay
    )
    agent.agent_services["firewall"] = Firewall(programs, system.ufw)

    from plexagent.host.nginx import Nginx

    agent.agent_services["nginx"] = Nginx(config.nginx, programs, systemd, agent.agent_services["dockerpool"])

    from plexagent.host.cron import CronScheduler
    from plexagent.host.docker.cronrunner import DockerCronRunner

    runner = DockerCronRunner(agent.agent_services["dockerpool"], reactor, config.cron.poll_interval,
                              config.cron.run_timeout, agent.agent_services["paths"])
    scheduler = CronScheduler(config.node.data_dir, reactor, runner, config.cron.max_jobs,
                              policy=agent.agent_services["paths"])
    scheduler.setServiceParent(top)
    agent.agent_services["cron"] = scheduler

    add_container_replace(config, reactor, agent, top)
    add_disk_hygiene(config, reactor, agent, top)

    from plexagent.host.docker.stats import sampler_for
    from plexagent.metrics import AgentMetrics

    pool = agent.agent_services["dockerpool"]
    # Always sampling: at 50 containers it costs well under 1% of a core
    # (docs/benchmarks.md), and every GET /metrics answers at once.
    sampler = sampler_for(pool, reactor, config.metrics.stats_interval, agent.agent_services["docker"].container_list)
    sampler.setServiceParent(top)
    agent.agent_services["container_stats"] = sampler
    agent.agent_services["metrics"] = AgentMetrics(agent)


def add_container_replace(config: Config, reactor: Any, agent: Agent, top: service.MultiService) -> None:
    """Container replaces and rollbacks, journaled under the data directory and recovered at start."""
    from plexagent.host.docker.replace import Replacer
    from plexagent.host.docker.replacejournal import ReplaceJournal

    facade = agent.agent_services["docker"]
    replacer = Replacer(agent.agent_services["dockerpool"], ReplaceJournal(config.node.data_dir),
                        agent.agent_services["paths"], reactor, config.docker.replace_stable_time,
                        on_change=facade.container_list.invalidate)
    replacer.setServiceParent(top)
    agent.agent_services["replacer"] = replacer


def add_disk_hygiene(config: Config, reactor: Any, agent: Agent, top: service.MultiService) -> None:
    """Disk usage and image cleanups that keep what cron jobs and rollbacks use; the automatic cleanup when enabled."""
    from plexagent.host.docker.cleanup import CleanupOptions
    from plexagent.host.docker.janitor import AutoCleanup, ImageHygiene

    scheduler = agent.agent_services["cron"]
    hygiene = ImageHygiene(agent.agent_services["dockerpool"], [
        lambda: {job.image: f"used by cron job {job.id}" for job in scheduler.jobs.values()},
        agent.agent_services["replacer"].protected,
    ])
    agent.agent_services["image_hygiene"] = hygiene
    auto = config.docker.cleanup
    if auto.enabled:
        options = CleanupOptions(keep_last=auto.keep_last, include_build_cache=True)
        cleaner = AutoCleanup(hygiene, reactor, auto.threshold_percent, auto.interval, options)
        cleaner.setServiceParent(top)
        agent.agent_services["auto_cleanup"] = cleaner


def observe_listeners(top: service.MultiService, agent: Agent) -> None:
    """Have every listener's requests counted and timed in the agent's metrics, and logged."""
    metrics = agent.agent_services.get("metrics")
    for child in top:
        site = getattr(child, "site", None)
        if isinstance(child, ListenerService) and isinstance(site, PlexSite):
            name = child.name or ""
            site.listener_name = name
            site.observer = chain_observers(
                metrics.observer_for(name) if metrics is not None else None,
                RequestLog(name) if agent.config.node.access_log else None,
            )


#: Descriptors kept for the agent's own files, Docker and control-plane calls,
#: beside what its listeners may hold.
RESERVED_DESCRIPTORS = 1024


def budget_descriptors(top: service.MultiService) -> None:
    """
    Raise the open-file limit to its hard limit, and cap each listener's
    connections so that together they leave ``RESERVED_DESCRIPTORS`` free:
    connections alone can then never stop the agent writing its files.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    sites = [child.site for child in top if isinstance(child, ListenerService) and isinstance(child.site, PlexSite)]
    if not sites or soft == resource.RLIM_INFINITY:
        return
    share = max(64, (soft - RESERVED_DESCRIPTORS) // len(sites))
    for site in sites:
        if site.max_connections > share:
            log.warn("the open-file limit {limit} leaves {share} connections for {listener} "
                     "(max_connections {configured}); raise LimitNOFILE to allow more",
                     limit=soft, share=share, listener=site.listener_name or "a listener",
                     configured=site.max_connections)
            site.max_connections = share


def add_file_services(config: Config, reactor: Any, agent: "Agent", top: service.MultiService) -> None:
    """The path policy, chunked-upload store (with its GC) and git cloner of the agent API."""
    from plexagent.host.files.chunks import ChunkGarbageCollector, ChunkStore
    from plexagent.host.files.staging import StagingJournal
    from plexagent.host.gitclone import GitCloner

    aapi = config.agent_api
    store = ChunkStore(os.path.join(config.node.data_dir, "uploads"), aapi.max_upload_bytes, aapi.chunk_max_age,
                       max_uploads=aapi.max_chunked_uploads)
    agent.agent_services["chunks"] = store
    agent.agent_services["git"] = GitCloner(
        agent.agent_services["paths"], os.path.join(config.node.data_dir, "git-staging"), reactor, aapi.git_timeout
    )
    journal = StagingJournal(os.path.join(config.node.data_dir, "extracting"))
    agent.agent_services["staging_journal"] = journal
    ChunkGarbageCollector(
        store, reactor, recover=lambda: journal.recover(agent.agent_services["paths"])
    ).setServiceParent(top)


def makeService(config: Config, reactor: Any = None) -> service.MultiService:
    """Build the agent's service tree for ``config``; binds nothing until started."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor

    top = AgentService()
    agent = Agent(config, reactor)
    top.agent = agent  # type: ignore[attr-defined]
    _Stores(agent.cache, agent.reports).setServiceParent(top)

    if config.agent_api.enabled:
        # Docker calls run on the agent's own pool, started before the
        # listeners and stopped after them. Without the agent API nothing
        # uses Docker or the host operations: not even their imports are
        # paid for (a node-API-only agent stays small).
        from plexagent.host.docker.binds import BindGuard
        from plexagent.host.docker.facade import DockerFacade
        from plexagent.host.docker.pool import DockerPool
        from plexagent.host.files.paths import PathPolicy

        # One path policy for every route and job that touches host paths.
        paths = agent.agent_services["paths"] = PathPolicy(config.agent_api.allowed_paths)
        pool = DockerPool(reactor, config.docker.host, config.docker.threads)
        pool.setServiceParent(top)
        agent.agent_services["dockerpool"] = pool
        facade = agent.agent_services["docker"] = DockerFacade(pool, paths)
        # Docker's own restarts of the containers the agent made: checked too.
        BindGuard(facade, facade.paths, reactor).setServiceParent(top)
        add_operations(config, reactor, agent, top)

    link = build_control_plane(config, reactor, agent)
    rules = link.protocol.local_rules if link is not None else PERMISSIVE_RULES
    api = NodeAPI(agent.cache, agent.reports, SecretReader(agent.cache, agent.current_session, rules), rules)
    resource = api.resource()
    responses.label_routes(api.app)  # the resource holds this bound app: metrics per route
    napi = config.node_api
    secrets_gid = group_id(napi.secrets_group)
    if secrets_gid is None:
        log.info("secrets group {group} does not exist: only root may read secret values on the socket",
                 group=napi.secrets_group)

    # The agent's own routes (/plexagent/...) are on the socket only, never on TCP.
    operator = OperatorRoutes(agent.reloader.reload, lambda: status_document(config, link, __version__))
    responses.label_routes(operator.app)
    unix_site = PlexSite(
        auth.GuardedResource(auth.PeerCredentialPolicy(secrets_gid),
                             PrefixRoutes([(PREFIX, operator.resource())], resource)),
        napi.max_body_bytes,
        max_connections=napi.max_connections,
    )
    socket_path = napi.socket

    def chgrp_socket() -> None:
        if not os.path.exists(socket_path):  # a reactor that binds nothing (tests)
            return
        gid = group_id(napi.socket_group)
        if gid is not None:
            os.chown(socket_path, -1, gid)
        os.chmod(socket_path, int(napi.socket_mode, 8))

    if socket_path.startswith("systemd:"):
        # Socket activation: systemd made the socket, with its own
        # SocketMode= and SocketGroup=; nothing to prepare or chmod.
        ListenerService(
            "node_api.socket",
            server_endpoint(reactor, "node_api.socket", socket_path),
            unix_site,
            reactor,
            config.node.shutdown_timeout,
        ).setServiceParent(top)
    else:
        ListenerService(
            "node_api.socket",
            endpoints.UNIXServerEndpoint(reactor, socket_path, mode=int(napi.socket_mode, 8)),
            unix_site,
            reactor,
            config.node.shutdown_timeout,
            prepare=lambda: prepare_socket_path(socket_path),
            after_listen=chgrp_socket,
            socket_path=socket_path,
        ).setServiceParent(top)

    if napi.http_enabled:
        http_token = read_key_file("node_api.http_token_file", napi.http_token_file, _warn)
        bearer = auth.BearerTokenPolicy(http_token)
        agent.reloader.add("node_api.http_token_file",
                           lambda: read_key_file("node_api.http_token_file", napi.http_token_file, _warn),
                           bearer.set_token)
        tcp_site = PlexSite(auth.GuardedResource(bearer, resource), napi.max_body_bytes,
                            max_connections=napi.max_connections)
        ListenerService(
            "node_api.http_listen",
            server_endpoint(reactor, "node_api.http_listen", napi.http_listen),
            tcp_site,
            reactor,
            config.node.shutdown_timeout,
        ).setServiceParent(top)

    if config.agent_api.enabled:
        add_file_services(config, reactor, agent, top)
        build_agent_api(config, reactor, agent).setServiceParent(top)

    observe_listeners(top, agent)
    budget_descriptors(top)

    if link is not None:
        # After the listeners: the socket answers from the persisted cache
        # before the control plane has been reached.
        link.setServiceParent(top)
    return top


def build_control_plane(config: Config, reactor: Any, agent: "Agent") -> Any:
    """
    The link to the control plane (None when standalone): the protocol
    ``control_plane.protocol`` names, built once over one transport, and
    the node's identity when it is pre-provisioned (read now, so a bad key
    file stops startup); otherwise the link uses the stored identity or
    enrolls.
    """
    cp = config.control_plane
    if not cp.url:
        return None
    from plexagent.controlplane.client import Transport
    from plexagent.controlplane.link import ControlPlaneLink
    from plexagent.controlplane.protocol import build_protocol

    if cp.ca_file and not os.path.isfile(cp.ca_file):
        raise ConfigError(f"control_plane.ca_file: {cp.ca_file} is not a readable file")
    transport = Transport(reactor, cp.url, cp.ca_file, cp.request_timeout, cp.connect_timeout)
    protocol = build_protocol(config, transport, reactor)
    configured = None
    if cp.token_file:
        bearer = read_key_file("control_plane.token_file", cp.token_file, _warn)
        nsk_text = read_key_file("node.secret_key_file", config.node.secret_key_file, _warn)
        configured = protocol.configured_identity(config, bearer, nsk_text)
    link = ControlPlaneLink(config, protocol, transport, agent.cache, agent.reports, reactor, configured=configured)
    agent.link = link
    return link
