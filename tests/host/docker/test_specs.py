"""Request shapes of the Docker routes -> docker-py arguments (no Docker needed)."""

from __future__ import annotations

import os
import tempfile

from twisted.trial import unittest

from plexagent import errors
from plexagent.host.docker.binds import BIND_LABEL
from plexagent.host.docker.specs import (
    MAX_COUNT,
    MAX_DURATION,
    container_name,
    parse_environment,
    parse_health_check,
    parse_int_arg,
    parse_ports,
    parse_restart_policy,
    parse_run,
    parse_volumes,
    split_image,
)
from plexagent.host.files.paths import PathPolicy


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

    def test_durations_that_are_not_finite_or_out_of_bounds_are_refused_naming_the_field(self) -> None:
        # 1e400 parses as infinity; NaN reaches here if a parser lets it.
        for field in ("interval", "timeout", "start_period"):
            for value in (float("nan"), float("inf"), float("-inf"), 1e308, MAX_DURATION + 1, -1, 1e-4):
                e = self.assertRaises(errors.InvalidInput, parse_health_check, {"test": "x", field: value})
                self.assertEqual(e.message, "invalid health_check")
                self.assertIn(f"health_check.{field}", e.details)

    def test_retries_must_be_an_integer_within_dockers_bounds(self) -> None:
        for value in (float("nan"), float("inf"), 2.0, MAX_COUNT + 1, True):
            e = self.assertRaises(errors.InvalidInput, parse_health_check, {"test": "x", "retries": value})
            self.assertIn("health_check.retries", e.details)
        self.assertEqual(parse_health_check({"test": "x", "retries": MAX_COUNT})["retries"], MAX_COUNT)

    def test_start_period_may_be_zero_and_durations_keep_their_fraction(self) -> None:
        check = parse_health_check({"test": "x", "start_period": 0, "interval": 0.25})
        self.assertEqual((check["start_period"], check["interval"]), (0, 250_000_000))


class RestartPolicy(unittest.TestCase):
    def test_names_and_retry_counts(self) -> None:
        self.assertEqual(parse_restart_policy("unless-stopped"), {"Name": "unless-stopped"})
        self.assertEqual(parse_restart_policy("on-failure:5"), {"Name": "on-failure", "MaximumRetryCount": 5})
        self.assertEqual(parse_restart_policy({"Name": "always"}), {"Name": "always"})
        self.assertRaises(errors.InvalidInput, parse_restart_policy, "sometimes")

    def test_retry_counts_that_are_not_bounded_integers_are_refused(self) -> None:
        for value in ("on-failure:" + "9" * 5000, {"Name": "on-failure", "MaximumRetryCount": float("inf")},
                      {"Name": "on-failure", "MaximumRetryCount": float("nan")}, {"Name": ["on-failure"]}):
            e = self.assertRaises(errors.InvalidInput, parse_restart_policy, value)
            self.assertEqual(e.message, "invalid restart_policy")


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

    def test_modes_docker_accepts_are_kept(self) -> None:
        for mode in ("ro", "rw", "ro,z", "Z", "rw,rslave", "ro,cached"):
            self.assertEqual(parse_volumes([f"{self.root}/d:/x:{mode}"], self.policy)[f"{self.root}/d"]["mode"], mode)
        self.assertEqual(parse_volumes(["cache:/x:nocopy"], self.policy)["cache"]["mode"], "nocopy")

    def test_modes_docker_refuses_are_invalid_even_with_a_trailing_newline(self) -> None:
        for mode in ("rw\n", "rw,bogus", "rw,ro", "z,Z", "shared,slave", "", "nocopy", "RW"):
            e = self.assertRaises(errors.InvalidInput, parse_volumes,
                                  {f"{self.root}/d": {"bind": "/x", "mode": mode}}, self.policy)
            self.assertIn("mode", e.details)

    def test_names_with_a_trailing_newline_are_invalid(self) -> None:
        for value in (["cache\n:/x"], [f"{self.root}/d:/x\n:rw"]):
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

    def test_container_names_are_matched_whole(self) -> None:
        self.assertEqual(container_name("web-1.a_b"), "web-1.a_b")
        for name in ("web\n", "web\n\n", "-web", "we b", "web\x00"):
            self.assertRaises(errors.InvalidInput, container_name, name)

    def test_the_bind_label_records_the_checked_host_paths_and_cannot_be_sent(self) -> None:
        root = os.path.realpath(tempfile.mkdtemp())
        self.addCleanup(os.rmdir, root)
        policy = PathPolicy([root + "/"])
        kwargs = parse_run({"image": "app", "volumes": [f"{root}/d:/x", "cache:/c"], "labels": {"team": "a"}}, policy)
        self.assertEqual(kwargs["labels"], {"team": "a", BIND_LABEL: f'["{root}/d"]'})
        e = self.assertRaises(errors.InvalidInput, parse_run, {"image": "app", "labels": {BIND_LABEL: "[]"}}, policy)
        self.assertEqual(e.message, "invalid labels")

    def test_image_is_required(self) -> None:
        e = self.assertRaises(errors.InvalidInput, parse_run, {"name": "x"}, PathPolicy(["/tmp/"]))
        self.assertEqual(e.message, "image is required")


class QueryIntegers(unittest.TestCase):
    def test_only_ascii_digits_within_bounds(self) -> None:
        self.assertEqual(parse_int_arg(b"12", "timeout", 10, maximum=3600), 12)
        for raw in (b" 12 ", b"1_0", "\u0663".encode(), b"1e3", b"12\n3", b"9" * 5000, b"3601", b"-1"):
            e = self.assertRaises(errors.InvalidInput, parse_int_arg, raw, "timeout", 10, 0, 3600)
            self.assertEqual(e.message, "invalid timeout")


class Images(unittest.TestCase):
    def test_split_image_keeps_registry_ports(self) -> None:
        self.assertEqual(split_image("127.0.0.1:5000/app"), ("127.0.0.1:5000/app", None))
        self.assertEqual(split_image("127.0.0.1:5000/app:v1"), ("127.0.0.1:5000/app", "v1"))
        self.assertEqual(split_image("app@sha256:abc"), ("app", "sha256:abc"))


class QueryBooleans(unittest.TestCase):
    def test_only_the_words_themselves_are_booleans(self) -> None:
        from plexagent.host.docker.specs import parse_bool_arg

        self.assertEqual([parse_bool_arg(v, "force") for v in (b"1", b"TRUE", b"yes", b"0", b"false", b"")],
                         [True, True, True, False, False, False])
        for raw in (b" true", b"true\n", b"2", b"maybe"):
            e = self.assertRaises(errors.InvalidInput, parse_bool_arg, raw, "force")
            self.assertEqual(e.message, "invalid force")
