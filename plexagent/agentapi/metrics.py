"""
``GET /metrics`` of the Node Agent API: the seed's JSON (containers and
system, from the container stats sampled in the background), or the agent's own metrics in Prometheus text format with
``Accept: text/plain`` or ``?format=prometheus``.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from plexagent import errors, metrics
from plexagent.host import metrics as host_metrics
from plexagent.http import responses
from plexagent.http.streaming import arg

#: seconds a request waits for Docker's first container listing after the agent starts
FIRST_LISTING_WAIT = 2.0


def wants_prometheus(request: Any) -> bool:
    fmt = arg(request, "format")
    if fmt is not None:
        value = fmt.decode("ascii", "replace").lower()
        if value in ("prometheus", "text"):
            return True
        if value == "json":
            return False
        raise errors.InvalidInput("invalid format", "format must be json or prometheus")
    accept = (request.getHeader(b"accept") or b"").decode("ascii", "replace").lower()
    return "text/plain" in accept or "openmetrics" in accept


def register(app: Klein, context: Any) -> None:
    sampler = context.services["container_stats"]
    agent_metrics = context.services["metrics"]
    reactor = context.reactor

    @app.route("/metrics", methods=["GET"])
    async def metrics_document(request: Any) -> bytes:
        if wants_prometheus(request):
            body = agent_metrics.prometheus_text()
            request.setHeader(b"content-type", metrics.PROMETHEUS_CONTENT_TYPE.encode("ascii"))
            request.setHeader(b"content-length", b"%d" % len(body))
            return body
        # From the sampler's latest samples: no Docker call while the client
        # waits. Only a request in the agent's first moments waits (briefly)
        # for Docker's first listing, so that it can say which containers run.
        await sampler.first_listing(FIRST_LISTING_WAIT)
        return responses.respond(request, host_metrics.snapshot(sampler, reactor))
