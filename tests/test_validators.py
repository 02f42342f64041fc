"""
Every validator of names, ids, modes and ports refuses a value with a
trailing newline (a regex ``$`` matches before one: each uses
``fullmatch``), and every client-supplied integer goes through the one
strict integer parser (``int()`` also takes ``"1_0"``, ``" 7 "`` and
``"١٢"``).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import task
from twisted.trial import unittest

from plexagent import errors
from plexagent.agentapi.files import parse_mode
from plexagent.config import ConfigError, parse_config
from plexagent.host import cron, firewall, gitclone, networks, services
from plexagent.host.docker import specs
from plexagent.host.files import chunks
from plexagent.host.files.paths import PathPolicy
from plexagent.http.listeners import endpoint_description
from plexagent.node.routes import parse_if_match
from plexagent.strictparse import parse_int


class _Header:
    def __init__(self, value: bytes) -> None:
        self.value = value

    def getHeader(self, name: bytes) -> bytes:
        return self.value


def _services() -> services.ServiceControl:
    # "nginx\n" is allowed too, so only the name check can refuse it.
    return services.ServiceControl(None, ("nginx", "nginx\n"), "node-agent", task.Clock())  # type: ignore[arg-type]


_POLICY = PathPolicy(("/tmp/",))
_JOB = {"schedule": "0 2 * * *", "image": "busybox"}


def _config_key(key: str) -> None:
    # An unknown key is an error either way; an odd one is quoted in it, so
    # the message stays one line.
    try:
        parse_config({"node": {key: 1}}, {})
    except ConfigError as e:
        if repr(key) in str(e):
            raise errors.InvalidInput("quoted", str(e)) from None


def _listen(listen: str) -> None:
    if not endpoint_description(listen).startswith("tcp:"):
        raise errors.InvalidInput("not HOST:PORT", listen)


#: (what, check(value) raising errors.PlexError when refused, a valid value)
VALIDATORS: list[tuple[str, Callable[[Any], Any], Any]] = [
    ("container name", specs.container_name, "web"),
    ("volume name", lambda v: specs.parse_volumes({v: "/data"}, _POLICY), "vol"),
    ("volume mode", lambda v: specs.parse_volumes({"vol": {"bind": "/data", "mode": v}}, _POLICY), "rw"),
    ("container port", lambda v: specs.parse_ports([v]), "80"),
    ("host:container port", lambda v: specs.parse_ports([v]), "8080:80"),
    ("port object", lambda v: specs.parse_ports({v: 80}), "8080"),
    ("restart retries", specs.parse_restart_policy, "on-failure:3"),
    ("timeout query param", lambda v: specs.parse_int_arg(v, "timeout", 10), b"5"),
    ("network name", lambda v: networks.parse_create({"name": v}), "backend"),
    ("network driver", lambda v: networks.parse_create({"name": "n", "driver": v}), "bridge"),
    ("cron image", lambda v: cron.parse_job({**_JOB, "image": v}, _POLICY), "busybox"),
    ("cron network", lambda v: cron.parse_job({**_JOB, "networks": [v]}, _POLICY), "backend"),
    ("chunk id", lambda v: chunks.validate_chunk_params(v, "0", "1"), "upload-1"),
    ("chunk index", lambda v: chunks.validate_chunk_params("u", v, "2"), "1"),
    ("total chunks", lambda v: chunks.validate_chunk_params("u", "0", v), "2"),
    ("git branch", lambda v: gitclone.parse_clone_request(
        {"url": "https://example.com/r.git", "target_path": "/tmp/x", "branch": v}), "main"),
    ("service unit", lambda v: _services().check(v), "nginx"),
    ("firewall port", lambda v: firewall.parse_allow({"port": v}), "9000"),
    ("file mode", lambda v: parse_mode(v, 0o644), "0644"),
    ("If-Match", lambda v: parse_if_match(_Header(v)), b"3"),  # type: ignore[arg-type]
    ("config key", _config_key, "bogus"),
    ("listen address", _listen, "127.0.0.1:9999"),
]


class TrailingNewline(unittest.TestCase):
    def test_every_validator_accepts_the_plain_value(self) -> None:
        for what, check, good in VALIDATORS:
            try:
                check(good)
            except errors.PlexError as e:  # pragma: no cover - a failure message
                self.fail(f"{what}: {good!r} refused: {e.message} {e.details}")

    def test_every_validator_refuses_a_trailing_newline(self) -> None:
        for what, check, good in VALIDATORS:
            bad = good + (b"\n" if isinstance(good, bytes) else "\n")
            with self.assertRaises(errors.PlexError, msg=f"{what}: {bad!r} accepted"):
                check(bad)

    def test_every_integer_field_refuses_what_only_int_accepts(self) -> None:
        integer_fields = {"container port", "restart retries", "timeout query param", "chunk index",
                          "total chunks", "firewall port", "If-Match", "port object"}
        for what, check, good in VALIDATORS:
            if what not in integer_fields:
                continue
            for bad in ("1_0", "+1", " 1", "١", "1.0"):
                if what == "If-Match" and bad == " 1":
                    continue  # whitespace around a header's value is not part of it
                value = good[:-1] + (bad.encode() if isinstance(good, bytes) else bad)
                with self.assertRaises(errors.PlexError, msg=f"{what}: {value!r} accepted"):
                    check(value)


class StrictIntegers(unittest.TestCase):
    ACCEPTED = [("0", 0), ("7", 7), ("007", 7), (b"42", 42), (12, 12), ("9223372036854775807", (1 << 63) - 1)]
    REFUSED = ["", " 7", "7 ", "7\n", "\n7", "1_0", "+7", "١٢", "٧", "７", "0x10", "1e3", "1.0", "-1", "--1", "-",
               "9223372036854775808", "1" * 30, b"\xd9\xa1", True, False, None, 1.5, -1, 1 << 63, [1]]

    def test_ascii_digits_are_integers(self) -> None:
        for text, number in self.ACCEPTED:
            self.assertEqual(parse_int(text), number, text)

    def test_everything_else_is_a_value_error(self) -> None:
        for value in self.REFUSED:
            with self.assertRaises(ValueError, msg=repr(value)):
                parse_int(value)

    def test_a_leading_minus_only_where_the_caller_allows_it(self) -> None:
        self.assertEqual(parse_int("-1", signed=True), -1)
        self.assertEqual(parse_int("-9223372036854775808", signed=True), -(1 << 63))
        for value in ("-9223372036854775809", "- 1", "-+1", "1-", "-١"):
            with self.assertRaises(ValueError, msg=value):
                parse_int(value, signed=True)
