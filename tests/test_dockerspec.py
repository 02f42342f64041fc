"""Request shapes of the Docker routes -> docker-py arguments (no Docker needed)."""

from __future__ import annotations

import os
import tempfile

from twisted.trial import unittest

from plexagent import errors
from plexagent.dockerspec import (
    parse_environment,
    parse_health_check,
    parse_ports,
    parse_restart_policy,
    parse_run,
    parse_volumes,
    split_image,
)
from plexagent.paths import PathPolicy


class Ports(unittest.TestCase):
    def test_seed_list_forms(self) -> None:
        self.assertEqual(
            parse_ports(["8080:80", "53:53/udp", "127.0.0.1:8443:443", "[::1]:9000:90", "3000"]),
            {"80/tcp": 8080, "53/udp": 53, "443/tcp": ("127.0.0.1", 8443), "90/tcp": ("::1", 9000), "3000/tcp": None},
        )

    def test_host_to_container_object(self) -> None:
        self.assertEqual(parse_ports({"8080": 80, "5353": "53/udp"}), {"80/tcp": 8080, "53/udp": 5353})

    def test_host_port_zero_means_any_free_port(self) -> None:
        self.assertEqual(parse_ports(["0:80", "127.0.0.1:0:81"]), {"80/tcp": None, "81/tcp": ("127.0.0.1",)})

    def test_out_of_range_or_malformed_ports_name_the_entry(self) -> None:
        for value in (["70000:80"], ["a:b"], ["1:2:3:4"], ["80/icmp"], "80", [None]):
            e = self.assertRaises(errors.InvalidInput, parse_ports, value)
            self.assertEqual(e.message, "invalid ports")


class Environment(unittest.TestCase):
    def test_list_and_object_forms(self) -> None:
        self.assertEqual(parse_environment(["A=1", "B=x=y", "C="]), {"A": "1", "B": "x=y", "C": ""})
        self.assertEqual(parse_environment({"A": 1, "B": True, "C": None}), {"A": "1", "B": "true", "C": ""})

    def test_entries_without_a_name_are_refused(self) -> None:
        for value in (["NOEQUALS"], ["=1"], "A=1", {"": "x"}):
            self.assertRaises(errors.InvalidInput, parse_environment, value)


class HealthCheck(unittest.TestCase):
    def test_shell_string_becomes_cmd_shell_with_nanoseconds(self) -> None:
        self.assertEqual(
            parse_health_check({"test": "curl -f http://localhost/ || exit 1", "interval": 30, "timeout": 10, "retries": 3}),
            {"test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"], "interval": 30_000_000_000,
             "timeout": 10_000_000_000, "retries": 3},
        )

    def test_docker_test_lists_are_kept_and_bare_lists_become_cmd(self) -> None:
        self.assertEqual(parse_health_check({"test": ["CMD", "true"]})["test"], ["CMD", "true"])
        self.assertEqual(parse_health_check({"test": ["true"]})["test"], ["CMD", "true"])

    def test_bad_values_are_refused(self) -> None:
        for value in ({"test": 1}, {"test": "x", "interval": "30s"}, {"test": "x", "retries": -1}, "x"):
            self.assertRaises(errors.InvalidInput, parse_health_check, value)


class RestartPolicy(unittest.TestCase):
    def test_names_and_retry_counts(self) -> None:
        self.assertEqual(parse_restart_policy("unless-stopped"), {"Name": "unless-stopped"})
        self.assertEqual(parse_restart_policy("on-failure:5"), {"Name": "on-failure", "MaximumRetryCount": 5})
        self.assertEqual(parse_restart_policy({"Name": "always"}), {"Name": "always"})
        self.assertRaises(errors.InvalidInput, parse_restart_policy, "sometimes")


class Volumes(unittest.TestCase):
    def setUp(self) -> None:
        self.root = os.path.realpath(tempfile.mkdtemp())
        self.addCleanup(os.rmdir, self.root)
        self.policy = PathPolicy([self.root + "/"])

    def test_host_paths_inside_allowed_paths_and_named_volumes(self) -> None:
        self.assertEqual(
            parse_volumes([f"{self.root}/data:/app/data", "cache:/cache:ro"], self.policy),
            {f"{self.root}/data": {"bind": "/app/data", "mode": "rw"}, "cache": {"bind": "/cache", "mode": "ro"}},
        )

    def test_host_paths_outside_allowed_paths_are_forbidden(self) -> None:
        for source in ("/etc", f"{self.root}/../etc", "./relative"):
            e = self.assertRaises(errors.Forbidden, parse_volumes, [f"{source}:/x"], self.policy)
            self.assertEqual(e.message, "path not allowed")

    def test_malformed_entries_are_invalid(self) -> None:
        for value in (["a"], ["a:b:c:d"], ["vol:relative"], ["bad name!:/x"], "a:/b"):
            self.assertRaises(errors.InvalidInput, parse_volumes, value, self.policy)


class Run(unittest.TestCase):
    def test_the_seed_body_maps_to_create_arguments(self) -> None:
        kwargs = parse_run(
            {"name": "myapp", "image": "nginx:latest", "ports": ["80:80"], "environment": ["DEBUG=1"],
             "network": "app-network", "restart_policy": "unless-stopped", "command": "nginx -g 'daemon off;'"},
            PathPolicy(["/tmp/"]),
        )
        self.assertEqual(kwargs["image"], "nginx:latest")
        self.assertEqual(kwargs["name"], "myapp")
        self.assertEqual(kwargs["ports"], {"80/tcp": 80})
        self.assertEqual(kwargs["environment"], {"DEBUG": "1"})
        self.assertEqual(kwargs["network"], "app-network")
        self.assertEqual(kwargs["command"], "nginx -g 'daemon off;'")

    def test_image_is_required(self) -> None:
        e = self.assertRaises(errors.InvalidInput, parse_run, {"name": "x"}, PathPolicy(["/tmp/"]))
        self.assertEqual(e.message, "image is required")


class Images(unittest.TestCase):
    def test_split_image_keeps_registry_ports(self) -> None:
        self.assertEqual(split_image("127.0.0.1:5000/app"), ("127.0.0.1:5000/app", None))
        self.assertEqual(split_image("127.0.0.1:5000/app:v1"), ("127.0.0.1:5000/app", "v1"))
        self.assertEqual(split_image("app@sha256:abc"), ("app", "sha256:abc"))
