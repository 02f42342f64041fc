"""makeService gives the operations routes their domain objects and observes every listener."""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from plexagent.config import AgentAPIConfig, Config, NodeAPIConfig, NodeConfig, SystemConfig
from plexagent.host.cron import CronScheduler
from plexagent.host.firewall import Firewall
from plexagent.host.nginx import Nginx
from plexagent.host.services import ServiceControl
from plexagent.http import site
from plexagent.http.listeners import ListenerService
from plexagent.metrics import AgentMetrics
from plexagent.service import makeService
from tests.agentapi.support import WiringDirectory


class OperationsWiringTests(unittest.TestCase):
    def setUp(self) -> None:
        d = WiringDirectory(self)
        self.data_dir = d.data_dir
        self.config = Config(
            node=NodeConfig(data_dir=d.data_dir),
            node_api=NodeAPIConfig(socket=d.socket, http_enabled=True, http_token_file=d.key),
            agent_api=AgentAPIConfig(api_key_file=d.key, allowed_paths=(d.root,)),
            system=SystemConfig(ufw=("ip", "netns", "exec", "ns", "ufw"), agent_service="plexagent"),
        )
        self.top = makeService(self.config, MemoryReactorClock())
        self.services = self.top.agent.agent_services

    def test_domain_objects_are_built_from_config(self) -> None:
        self.assertIsInstance(self.services["nginx"], Nginx)
        self.assertIsInstance(self.services["metrics"], AgentMetrics)
        self.assertEqual(self.services["firewall"].command, ("ip", "netns", "exec", "ns", "ufw"))
        control = self.services["service_control"]
        self.assertIsInstance(control, ServiceControl)
        self.assertEqual(control.agent_service, "plexagent")
        self.assertIsInstance(self.services["firewall"], Firewall)

    def test_the_cron_scheduler_is_a_service_keeping_jobs_in_data_dir(self) -> None:
        scheduler = self.top.getServiceNamed("cron")
        self.assertIsInstance(scheduler, CronScheduler)
        self.assertIs(self.services["cron"], scheduler)
        self.assertEqual(scheduler.path, os.path.join(self.data_dir, "cron-jobs.json"))
        # Stops before the Docker pool it runs containers on (services stop in reverse).
        names = [s.name for s in self.top]
        self.assertLess(names.index("dockerpool"), names.index("cron"))

    def test_every_listener_is_observed_under_its_config_key(self) -> None:
        listeners = [s for s in self.top if isinstance(s, ListenerService)]
        self.assertEqual(sorted(s.name for s in listeners),
                         ["agent_api.listen", "node_api.http_listen", "node_api.socket"])
        for listener in listeners:
            self.assertIsInstance(listener.site, site.PlexSite)
            self.assertEqual(listener.site.listener_name, listener.name)
            self.assertIsNotNone(listener.site.observer)
