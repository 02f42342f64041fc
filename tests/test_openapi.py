"""The published OpenAPI documents match what the daemon serves."""

from __future__ import annotations

from openapi_spec_validator import validate
from twisted.trial import unittest

from plexagent.nodeapi import NodeAPI
from plexagent.openapi import document, documented_routes, served_routes


class LocalNodeAPIDocumentTests(unittest.TestCase):
    def test_document_is_valid_openapi_3_1(self) -> None:
        doc = document("local-node-api")
        self.assertEqual(doc["openapi"], "3.1.0")
        validate(doc)

    def test_served_and_documented_routes_are_the_same_set(self) -> None:
        self.assertEqual(served_routes(NodeAPI.app), documented_routes("local-node-api"))
