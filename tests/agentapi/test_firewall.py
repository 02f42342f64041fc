"""
Firewall: the real ufw, run by the agent inside a network namespace the
test creates (never the host's firewall), and its status parsing.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from plexagent import errors
from plexagent.host import firewall
from plexagent.testing.docker import AgentClient
from plexagent.testing.ops import FirewallNamespace, start_agent

UFW_STATUS = """\
Status: active

To                         Action      From
--                         ------      ----
80/tcp                     ALLOW       Anywhere
9000:9010/udp              ALLOW       10.0.0.0/8
22                         DENY        192.168.1.5
Nginx Full                 ALLOW       Anywhere                   # web
80/tcp (v6)                ALLOW       Anywhere (v6)
"""


class ParseStatusTests(unittest.TestCase):
    def test_rules_are_parsed_into_action_port_protocol_and_source(self):
        doc = firewall.parse_status(UFW_STATUS)
        self.assertEqual(doc["status"], "active")
        short = [{k: r[k] for k in ("action", "port", "protocol", "from_ip")} for r in doc["rules"]]
        self.assertEqual(short, [
            {"action": "ALLOW", "port": 80, "protocol": "tcp", "from_ip": "0.0.0.0/0"},
            {"action": "ALLOW", "port": "9000:9010", "protocol": "udp", "from_ip": "10.0.0.0/8"},
            {"action": "DENY", "port": 22, "protocol": "both", "from_ip": "192.168.1.5"},
            {"action": "ALLOW", "port": "Nginx Full", "protocol": "both", "from_ip": "0.0.0.0/0"},
            {"action": "ALLOW", "port": 80, "protocol": "tcp", "from_ip": "::/0"},
        ])
        self.assertEqual(doc["rules"][3]["comment"], "web")
        self.assertTrue(doc["rules"][4]["ipv6"])

    def test_inactive_firewall_has_no_rules(self):
        self.assertEqual(firewall.parse_status("Status: inactive\n"), {"status": "inactive", "rules": []})


class ParseAllowTests(unittest.TestCase):
    def assertBad(self, body, field):
        with self.assertRaises(errors.InvalidInput) as caught:
            firewall.parse_allow(body)
        self.assertEqual(caught.exception.message, f"invalid {field}" if "port" in body else "port is required")

    def test_port_protocol_and_source_are_normalised(self):
        rule = firewall.parse_allow({"port": 8080})
        self.assertEqual(rule.argv(), ["allow", "from", "any", "to", "any", "port", "8080"])
        rule = firewall.parse_allow({"port": "9000-9010", "protocol": "UDP", "from_ip": "10.1.2.3/8"})
        self.assertEqual(rule.argv(), ["allow", "from", "10.0.0.0/8", "to", "any", "port", "9000:9010", "proto", "udp"])

    def test_invalid_values_are_400_naming_the_field(self):
        for body, field in (
            ({}, "port"),
            ({"port": 0}, "port"),
            ({"port": 65536}, "port"),
            ({"port": "80; reboot"}, "port"),
            ({"port": True}, "port"),
            ({"port": "90:80", "protocol": "tcp"}, "port"),
            ({"port": 80, "protocol": "icmp"}, "protocol"),
            ({"port": "80:90"}, "protocol"),
            ({"port": 80, "from_ip": "10.0.0.300"}, "from_ip"),
            ({"port": 80, "from_ip": "any; reboot"}, "from_ip"),
        ):
            self.assertBad(body, field)


class FirewallRoutesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.namespace = FirewallNamespace(self)
        self.agent = start_agent(self, extra={"system": {"ufw": self.namespace.command}})
        self.client = AgentClient(self.agent)

    @defer.inlineCallbacks
    def test_inactive_status(self):
        code, body = yield self.client.get("/firewall/status")
        self.assertEqual(code, 200)
        self.assertEqual(body, {"status": "inactive", "rules": []})

    @defer.inlineCallbacks
    def test_allow_adds_a_ufw_rule_that_status_then_lists(self):
        self.namespace.ufw("--force", "enable")
        code, body = yield self.client.post("/firewall/allow", {"port": 8080, "protocol": "tcp", "from_ip": "10.0.0.0/8"})
        self.assertEqual(code, 201, body)
        self.assertEqual(body["rule"], {"action": "ALLOW", "port": 8080, "protocol": "tcp", "from_ip": "10.0.0.0/8"})
        code, _ = yield self.client.post("/firewall/allow", {"port": "9000:9010", "protocol": "udp"})
        self.assertEqual(code, 201)
        code, body = yield self.client.get("/firewall/status")
        self.assertEqual(code, 200)
        self.assertEqual(body["status"], "active")
        rules = [{k: r[k] for k in ("action", "port", "protocol", "from_ip")} for r in body["rules"] if not r["ipv6"]]
        self.assertEqual(rules, [
            {"action": "ALLOW", "port": 8080, "protocol": "tcp", "from_ip": "10.0.0.0/8"},
            {"action": "ALLOW", "port": "9000:9010", "protocol": "udp", "from_ip": "0.0.0.0/0"},
        ])
        # The rule is in the namespace's iptables, as ufw installs it.
        self.assertIn("--dport 8080", self.namespace.iptables_rules())

    @defer.inlineCallbacks
    def test_invalid_rule_is_400_and_ufw_is_not_changed(self):
        code, body = yield self.client.post("/firewall/allow", {"port": 70000})
        self.assertEqual(code, 400)
        self.assertEqual(body["error"], "invalid port")
        self.assertNotIn("70000", self.namespace.ufw("show", "added"))


class MissingUfwTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_missing_ufw_is_503(self):
        agent = start_agent(self, extra={"system": {"ufw": ["no-such-ufw-xyz"]}})
        client = AgentClient(agent)
        for method, path, body in (("GET", "/firewall/status", None), ("POST", "/firewall/allow", {"port": 80})):
            code, answer = yield client.call(method, path, **({"json": body} if body else {}))
            self.assertEqual(code, 503)
            self.assertEqual(answer["error"], "ufw not available")
