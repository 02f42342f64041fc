"""
``GET /metrics`` of the Node Agent API: the seed's JSON (containers and
system), or the agent's own metrics in Prometheus text format with
``Accept: text/plain`` or ``?format=prometheus``.
"""

from __future__ import annotations

from typing import Any

from klein import Klein

from plexagent import errors, metrics
from plexagent.host import metrics as host_metrics
from plexagent.http import responses
from plexagent.http.streaming import arg


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
    pool = context.services["dockerpool"]
    agent_metrics = context.services["metrics"]
    reactor = context.reactor

    @app.route("/metrics", methods=["GET"])
    async def metrics_document(request: Any) -> bytes:
        if wants_prometheus(request):
            body = agent_metrics.prometheus_text()
            request.setHeader(b"content-type", metrics.PROMETHEUS_CONTENT_TYPE.encode("ascii"))
            request.setHeader(b"content-length", b"%d" % len(body))
            return body
        return responses.respond(request, await host_metrics.snapshot(pool, reactor))
