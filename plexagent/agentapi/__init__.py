"""
The Node Agent API (docs/openapi/node-agent-api.yaml): one Klein app assembled from
one module per seed section.

Each route module exposes ``register(app, context)``, adding its routes to
the shared app. A route's body is at most ``DEFAULT_BODY_LIMIT`` unless the
module declares another limit with ``context.limit_body(method, path,
limit)``; the limit applies from the request's head, before any byte of
the body is read. A module may claim a body that must stream (uploads,
image loads) with ``context.stream_body(method, path, factory)``; the sink
then bounds the body as it arrives.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import attrs

from plexagent.config import Config
from plexagent.http import auth, responses
from plexagent.http.site import PlexSite, UnreadBody

#: Route modules, in the seed's order. Each has ``register(app, context)``.
ROUTE_MODULES: list[str] = [
    "plexagent.agentapi.containers",
    "plexagent.agentapi.images",
    "plexagent.agentapi.build",
    "plexagent.agentapi.files",
    "plexagent.agentapi.uploads",
    "plexagent.agentapi.git",
    "plexagent.agentapi.networks",
    "plexagent.agentapi.nginx",
    "plexagent.agentapi.cron",
    "plexagent.agentapi.services",
    "plexagent.agentapi.firewall",
    "plexagent.agentapi.metrics",
    "plexagent.agentapi.openapi",
]

#: ``factory(request, length) -> sink``: a file-like object (``write``) that
#: receives the body as it arrives; the route later finds it as
#: ``request.content``.
BodySinkFactory = Callable[[Any, "int | None"], Any]

#: The body limit of a route that declares none (a JSON request).
DEFAULT_BODY_LIMIT = 1 << 20


@attrs.define
class AgentContext:
    """What the agent API's route modules share, built once by service.py."""

    config: Config
    reactor: Any
    #: extra domain objects route modules need, by name (dockerpool, paths, ...)
    services: dict[str, Any] = attrs.field(factory=dict)
    _streaming: dict[tuple[bytes, bytes], BodySinkFactory] = attrs.field(factory=dict)
    _limits: dict[tuple[bytes, bytes], int] = attrs.field(factory=dict)

    def stream_body(self, method: bytes, path: bytes, factory: BodySinkFactory) -> None:
        """Have the body of ``method path`` streamed into ``factory(...)``'s sink."""
        self._streaming[(method, path)] = factory

    def limit_body(self, method: bytes, path: bytes, limit: int) -> None:
        """Accept bodies of up to ``limit`` bytes on ``method path`` (instead of ``DEFAULT_BODY_LIMIT``)."""
        self._limits[(method, path)] = limit

    def body_limit(self, method: bytes, path: bytes) -> int:
        """The body limit of the route ``method path`` (``path`` without its query)."""
        return self._limits.get((method.upper(), path), DEFAULT_BODY_LIMIT)

    def streaming_factory(self, method: bytes, path: bytes) -> BodySinkFactory | None:
        return self._streaming.get((method.upper(), path.split(b"?", 1)[0]))


class AgentAPI:
    """The assembled Klein app and the Site that serves it."""

    def __init__(self, context: AgentContext, policy: auth.AgentAPIPolicy, modules: list[str] | None = None) -> None:
        self.context = context
        self.policy = policy
        self.app = responses.json_app()
        for name in ROUTE_MODULES if modules is None else modules:
            module = importlib.import_module(name)
            module.register(self.app, context)
        responses.label_routes(self.app)

    def content_factory(self, request: Any, method: bytes, path: bytes, length: int | None) -> Any:
        """
        Give streaming routes their body sink, but only for requests that pass
        the listener's policy: an unauthenticated client cannot make the agent
        process a byte of its body.
        """
        # The request line is known but not yet on the request: set it for
        # the policy (requestReceived sets both again later).
        request.path = path.split(b"?", 1)[0]
        request.method = method
        # Streaming routes read their query (extract_path, chunk_id) now.
        request.uri = path
        try:
            self.policy.authenticate(request)
        except Exception:
            # Refused anyway by GuardedResource: answered without reading the body.
            return UnreadBody()
        factory = self.context.streaming_factory(method, path)
        if factory is None:
            return None
        return factory(request, length)

    def site(self) -> PlexSite:
        guarded = auth.GuardedResource(self.policy, self.app.resource())
        return PlexSite(
            guarded,
            DEFAULT_BODY_LIMIT,
            content_factory=self.content_factory,
            body_limits=self.context.body_limit,
            max_connections=self.context.config.agent_api.max_connections,
        )
