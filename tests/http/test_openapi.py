"""The published OpenAPI documents match what the daemon serves."""

from __future__ import annotations

import collections
import json
from unittest import mock

from openapi_spec_validator import validate
from twisted.internet import reactor
from twisted.trial import unittest

from plexagent.agentapi import AgentAPI, AgentContext
from plexagent.config import AgentAPIConfig, Config, NodeConfig
from plexagent.http import auth
from plexagent.http.openapi import document, documented_routes, served_routes
from plexagent.node.routes import NodeAPI
from tests.agentapi.support import API_KEY


def agent_api(testcase: unittest.TestCase) -> AgentAPI:
    """The agent API with every route module; the domain objects are inert stand-ins."""
    base = testcase.mktemp()
    config = Config(node=NodeConfig(data_dir=base), agent_api=AgentAPIConfig(allowed_paths=(base + "/",)))
    # Registering routes only looks the domain objects up; none is called here.
    services: dict = collections.defaultdict(mock.Mock)
    context = AgentContext(config=config, reactor=reactor, services=services)
    return AgentAPI(context, auth.AgentAPIPolicy((), (API_KEY,), True))


class LocalNodeAPIDocumentTests(unittest.TestCase):
    def test_document_is_valid_openapi_3_1(self) -> None:
        doc = document("local-node-api")
        self.assertEqual(doc["openapi"], "3.1.0")
        validate(doc)

    def test_served_and_documented_routes_are_the_same_set(self) -> None:
        self.assertEqual(served_routes(NodeAPI.app), documented_routes("local-node-api"))


class NodeAgentAPIDocumentTests(unittest.TestCase):
    def test_document_is_valid_openapi_3_1(self) -> None:
        doc = document("node-agent-api")
        self.assertEqual(doc["openapi"], "3.1.0")
        validate(doc)

    def test_served_and_documented_routes_are_the_same_set(self) -> None:
        served = served_routes(agent_api(self).app)
        documented = documented_routes("node-agent-api")
        self.assertEqual(
            (sorted(served - documented), sorted(documented - served)),
            ([], []),
            "(served but not documented, documented but not served)",
        )

    def test_every_keyed_operation_documents_401_and_ping_is_public(self) -> None:
        doc = document("node-agent-api")
        self.assertEqual(doc["security"], [{"apiKey": []}, {"clientCertificate": [], "apiKey": []},
                                           {"clientCertificate": []}])
        for path, item in doc["paths"].items():
            for method, operation in item.items():
                if method not in ("get", "post", "put", "delete", "patch"):
                    continue
                if (method, path) == ("get", "/ping"):
                    # No key; the client certificate when mutual TLS is on (the handshake asks for it).
                    self.assertEqual(operation["security"], [{}, {"clientCertificate": []}])
                    continue
                self.assertNotIn("security", operation, f"{method} {path}")
                self.assertIn("401", operation["responses"], f"{method} {path}")

    def test_every_error_response_is_the_error_shape(self) -> None:
        doc = document("node-agent-api")
        error = {"$ref": "#/components/schemas/Error"}
        shared = doc["components"]["responses"]
        for path, item in doc["paths"].items():
            for method, operation in item.items():
                if method not in ("get", "post", "put", "delete", "patch"):
                    continue
                for status, response in operation["responses"].items():
                    if int(status) < 400:
                        continue
                    if "$ref" in response:
                        response = shared[response["$ref"].rsplit("/", 1)[1]]
                    self.assertEqual(response["content"], {"application/json": {"schema": error}},
                                     f"{method} {path} {status}")

    def test_streaming_responses_name_the_content_types_the_routes_send(self) -> None:
        paths = document("node-agent-api")["paths"]
        logs = paths["/containers/{n}/logs"]["get"]["responses"]["200"]["content"]
        self.assertIn("text/plain", logs)
        for path in ("/images/pull", "/docker/build"):
            self.assertIn("application/x-ndjson", paths[path]["post"]["responses"]["200"]["content"], path)


class ServedDocumentTests(unittest.TestCase):
    async def test_agent_api_serves_its_document_behind_the_key(self) -> None:
        from treq.testing import StubTreq

        api = agent_api(self)
        client = StubTreq(api.site().resource)
        refused = await client.get("http://127.0.0.1/openapi.json")
        self.assertEqual(refused.code, 401)
        response = await client.get("http://127.0.0.1/openapi.json", headers={"X-API-Key": API_KEY})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(json.loads(await response.content()), document("node-agent-api"))
