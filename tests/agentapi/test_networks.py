"""Networks: created and inspected for real on the test Docker daemon."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from plexagent import errors
from plexagent.host import networks
from plexagent.testing.docker import (
    PREFIX,
    AgentClient,
    base_image,
    start_agent,
    test_client,
    unique_name,
    unique_network_name,
)


class ParseCreateTests(unittest.TestCase):
    def assertBadField(self, body, field):
        with self.assertRaises(errors.InvalidInput) as caught:
            networks.parse_create(body)
        self.assertIn(field, caught.exception.message + " " + str(caught.exception.details))

    def test_defaults_to_a_bridge_without_ipam(self):
        spec = networks.parse_create({"name": "app-network"})
        self.assertEqual((spec.name, spec.driver, spec.subnet, spec.gateway), ("app-network", "bridge", None, None))

    def test_subnet_and_gateway_are_validated_as_network_and_address(self):
        spec = networks.parse_create({"name": "n", "ipam_config": {"subnet": "172.20.0.0/16", "gateway": "172.20.0.1"}})
        self.assertEqual((spec.subnet, spec.gateway), ("172.20.0.0/16", "172.20.0.1"))
        self.assertBadField({"name": "n", "ipam_config": {"subnet": "172.20.0.1/16"}}, "ipam_config.subnet")
        self.assertBadField({"name": "n", "ipam_config": {"subnet": "banana"}}, "ipam_config.subnet")
        self.assertBadField({"name": "n", "ipam_config": {"subnet": "172.20.0.0/16", "gateway": "x"}}, "ipam_config.gateway")
        self.assertBadField({"name": "n", "ipam_config": {"subnet": "172.20.0.0/16", "gateway": "10.0.0.1"}},
                            "ipam_config.gateway")
        self.assertBadField({"name": "n", "ipam_config": {"gateway": "10.0.0.1"}}, "ipam_config.subnet")

    def test_name_and_driver_are_checked(self):
        self.assertBadField({}, "name")
        self.assertBadField({"name": "-bad"}, "name")
        self.assertBadField({"name": "a b"}, "name")
        self.assertBadField({"name": "n", "driver": 3}, "driver")
        self.assertBadField({"name": "n", "driver": "bridge; rm"}, "driver")


class NetworkRoutesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = test_client(self)
        self.agent = start_agent(self)
        self.client = AgentClient(self.agent)

    def network_name(self) -> str:
        return unique_network_name(self, self.docker)

    def free_subnet(self) -> tuple[str, str]:
        # Pick a /24 under 10.213.0.0/16 that no existing network uses.
        used = {c.get("Subnet") for n in self.docker.api.networks() for c in (n.get("IPAM") or {}).get("Config") or []}
        for third in range(1, 255):
            subnet = f"10.213.{third}.0/24"
            if subnet not in used:
                return subnet, f"10.213.{third}.1"
        raise AssertionError("no free subnet")

    @defer.inlineCallbacks
    def test_create_with_ipam_then_inspect_shows_config_and_connected_containers(self):
        name = self.network_name()
        subnet, gateway = self.free_subnet()
        code, body = yield self.client.post(
            "/networks/create", {"name": name, "driver": "bridge", "ipam_config": {"subnet": subnet, "gateway": gateway}}
        )
        self.assertEqual(code, 201, body)
        self.assertEqual((body["name"], body["driver"]), (name, "bridge"))
        self.assertEqual(body["ipam"]["config"][0]["subnet"], subnet)
        self.assertEqual(body["ipam"]["config"][0]["gateway"], gateway)

        container = unique_name(self, self.docker)
        self.docker.containers.run(base_image(), ["sleep", "60"], name=container, network=name, detach=True)
        code, body = yield self.client.get(f"/networks/{name}")
        self.assertEqual(code, 200)
        self.assertEqual([c["name"] for c in body["containers"]], [container])
        self.assertTrue(body["containers"][0]["ipv4_address"].startswith(subnet.rsplit(".", 1)[0]))

    @defer.inlineCallbacks
    def test_duplicate_name_is_409(self):
        name = self.network_name()
        code, _ = yield self.client.post("/networks/create", {"name": name})
        self.assertEqual(code, 201)
        code, body = yield self.client.post("/networks/create", {"name": name})
        self.assertEqual(code, 409)
        self.assertEqual(body["error"], "network already exists")

    @defer.inlineCallbacks
    def test_a_subnet_overlapping_another_network_is_400_with_dockers_reason(self):
        subnet, gateway = self.free_subnet()
        first, second = self.network_name(), self.network_name()
        code, _ = yield self.client.post("/networks/create", {"name": first, "ipam_config": {"subnet": subnet}})
        self.assertEqual(code, 201)
        code, body = yield self.client.post("/networks/create", {"name": second, "ipam_config": {"subnet": subnet}})
        self.assertEqual((code, body["error"]), (400, "docker refused the network"))
        self.assertIn("overlap", body["details"])

    @defer.inlineCallbacks
    def test_missing_network_is_404(self):
        code, body = yield self.client.get(f"/networks/{PREFIX}no-such-net")
        self.assertEqual(code, 404)
        self.assertEqual(body["error"], "network not found")

    @defer.inlineCallbacks
    def test_invalid_gateway_is_400_and_nothing_is_created(self):
        name = self.network_name()
        code, body = yield self.client.post(
            "/networks/create", {"name": name, "ipam_config": {"subnet": "10.214.0.0/24", "gateway": "10.215.0.1"}}
        )
        self.assertEqual(code, 400)
        self.assertIn("ipam_config.gateway", body["details"])
        self.assertEqual(self.docker.api.networks(names=[name]), [])

    @defer.inlineCallbacks
    def test_networks_need_the_api_key(self):
        code, _ = yield self.client.get("/networks/bridge", key=None)
        self.assertEqual(code, 401)
