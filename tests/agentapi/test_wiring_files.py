"""makeService gives the file routes their shared domain objects."""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from plexagent.config import AgentAPIConfig, Config, NodeAPIConfig, NodeConfig
from plexagent.host.files.chunks import ChunkGarbageCollector, ChunkStore
from plexagent.host.files.paths import PathPolicy
from plexagent.host.gitclone import GitCloner
from plexagent.service import makeService
from tests.agentapi.support import WiringDirectory


class WiringTests(unittest.TestCase):
    def setUp(self) -> None:
        d = WiringDirectory(self)
        self.data_dir = d.data_dir
        self.config = Config(
            node=NodeConfig(data_dir=d.data_dir),
            node_api=NodeAPIConfig(socket=d.socket),
            agent_api=AgentAPIConfig(api_key_file=d.key, allowed_paths=(d.root,), chunk_max_age=600.0),
        )
        self.reactor = MemoryReactorClock()
        self.top = makeService(self.config, self.reactor)

    def test_agent_services_hold_policy_chunk_store_and_cloner(self) -> None:
        services = self.top.agent.agent_services
        self.assertIsInstance(services["paths"], PathPolicy)
        self.assertIsInstance(services["chunks"], ChunkStore)
        self.assertEqual(services["chunks"].directory, os.path.join(self.data_dir, "uploads"))
        self.assertIsInstance(services["git"], GitCloner)
        self.assertIs(self.top.agent.agent_api.context.services["chunks"], services["chunks"])

    def test_chunk_garbage_collector_runs_every_quarter_of_max_age(self) -> None:
        gc = self.top.getServiceNamed("upload-chunk-gc")
        self.assertIsInstance(gc, ChunkGarbageCollector)
        self.assertEqual(gc.interval, 150.0)
