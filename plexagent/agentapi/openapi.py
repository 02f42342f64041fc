"""``GET /openapi.json`` of the Node Agent API: its published contract."""

from __future__ import annotations

from typing import Any

from klein import Klein

from plexagent.http import responses
from plexagent.http.openapi import document_json


def register(app: Klein, context: Any) -> None:
    @app.route("/openapi.json", methods=["GET"])
    def openapi(request: Any) -> bytes:
        body = document_json("node-agent-api")
        request.setHeader(b"content-type", responses.JSON_CONTENT_TYPE)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body
