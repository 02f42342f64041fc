"""The configuration contract (docs/configuration.md)."""

from __future__ import annotations

import os

from twisted.trial import unittest

from plexagent.config import Config, ConfigError, load_config, parse_config, read_key_file


class DefaultsTests(unittest.TestCase):
    def test_defaults_are_the_contract(self) -> None:
        c = parse_config({})
        self.assertEqual(c.node.data_dir, "/var/lib/plexagent")
        self.assertEqual(c.node.secret_key_file, "")
        self.assertEqual(c.node.shutdown_timeout, 5.0)
        self.assertFalse(c.node.access_log)
        self.assertEqual(c.control_plane.url, "")
        self.assertTrue(c.standalone)
        self.assertEqual((c.control_plane.protocol, c.control_plane.token_file, c.control_plane.bootstrap_token_file),
                         ("plexd", "", "/etc/plexd/bootstrap-token"))
        self.assertEqual((c.control_plane.project_id, c.control_plane.resource_handle,
                          c.control_plane.requested_resource_id, c.control_plane.signing_public_key), ("", "", "", ""))
        self.assertEqual(
            (c.control_plane.reconcile_interval, c.control_plane.heartbeat_interval,
             c.control_plane.report_debounce, c.control_plane.request_timeout),
            (60.0, 30.0, 5.0, 30.0),
        )
        self.assertEqual(c.node_api.socket, "/var/run/plexd/api.sock")
        self.assertEqual((c.node_api.socket_mode, c.node_api.socket_group, c.node_api.secrets_group),
                         ("0660", "plexd", "plexd-secrets"))
        self.assertEqual((c.node_api.http_enabled, c.node_api.http_listen), (False, "127.0.0.1:9100"))
        self.assertEqual(c.node_api.http_token_file, "/etc/plexd/api-token")
        self.assertEqual((c.agent_api.enabled, c.agent_api.listen), (True, "0.0.0.0:9999"))
        self.assertEqual(c.agent_api.api_key_file, "/etc/node-agent/api-key")
        self.assertEqual(c.agent_api.allowed_ips, ())
        self.assertTrue(c.agent_api.require_auth_always)
        self.assertEqual(c.agent_api.allowed_paths, ("/local/", "/app/", "/etc/nginx/", "/tmp/"))
        self.assertEqual(c.agent_api.allowed_services, ("nginx", "docker", "node-agent"))
        self.assertEqual(c.agent_api.max_upload_bytes, 10737418240)
        # /files/write bodies are parsed whole in memory: 64 MiB, not 256.
        self.assertEqual(c.agent_api.max_json_bytes, 16 << 20)
        self.assertEqual((c.docker.host, c.docker.threads), ("", 10))

    def test_no_config_file_means_defaults(self) -> None:
        self.assertEqual(load_config(None, {}), Config())

    def test_config_is_immutable(self) -> None:
        c = parse_config({})
        with self.assertRaises(Exception):  # noqa: B017 - attrs raises its own FrozenInstanceError
            c.node.data_dir = "/x"  # type: ignore[misc]


class ErrorTests(unittest.TestCase):
    def assertConfigError(self, doc: dict, message: str, environ: dict | None = None) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config(doc, environ or {})
        self.assertEqual(str(caught.exception), message)

    def test_unknown_section(self) -> None:
        self.assertConfigError(
            {"nodes": {}},
            "nodes: unknown section (known: node, control_plane, node_api, agent_api, docker, nginx, system, cron, "
            "metrics)",
        )

    def test_unknown_key(self) -> None:
        self.assertConfigError({"node": {"idd": "x"}}, "node.idd: unknown key")

    def test_wrong_types_name_the_key(self) -> None:
        self.assertConfigError({"node": {"shutdown_timeout": "5"}}, "node.shutdown_timeout: must be a number, got '5'")
        self.assertConfigError({"control_plane": {"events": 1}}, "control_plane.events: must be true or false, got 1")
        self.assertConfigError({"docker": {"threads": 2.5}}, "docker.threads: must be an integer, got 2.5")
        self.assertConfigError({"agent_api": {"allowed_ips": "10.0.0.1"}},
                               "agent_api.allowed_ips: must be a list of strings, got '10.0.0.1'")

    def test_a_control_plane_url_alone_is_enough_the_node_enrolls(self) -> None:
        self.assertEqual(parse_config({"control_plane": {"url": "https://cp"}}).node.id, "")

    def test_node_id_and_secret_key_file_required_with_token_file(self) -> None:
        self.assertConfigError({"control_plane": {"url": "https://cp", "token_file": "/t"}},
                               "node.id: required when control_plane.token_file is set")
        self.assertConfigError({"node": {"id": "n"}, "control_plane": {"url": "https://cp", "token_file": "/t"}},
                               "node.secret_key_file: required when control_plane.token_file is set")

    def test_protocol_is_plexd_or_plexsphere(self) -> None:
        self.assertConfigError({"control_plane": {"protocol": "grpc"}},
                               'control_plane.protocol: must be "plexd" or "plexsphere", got \'grpc\'')

    def test_plexsphere_needs_its_enrollment_fields(self) -> None:
        cp = {"url": "https://cp", "protocol": "plexsphere"}
        self.assertConfigError({"control_plane": cp}, 'control_plane.project_id: required with protocol "plexsphere"')
        cp["project_id"] = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
        self.assertConfigError({"control_plane": cp},
                               'control_plane.resource_handle: required with protocol "plexsphere"')
        cp["resource_handle"] = "edge-1"
        self.assertEqual(parse_config({"control_plane": cp}).control_plane.resource_handle, "edge-1")

    def test_project_id_must_be_a_uuid(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config({"control_plane": {"project_id": "project-1"}})
        self.assertTrue(str(caught.exception).startswith("control_plane.project_id: must be a UUID"))

    def test_the_signing_key_pin_is_base64_of_32_bytes(self) -> None:
        import base64

        key = base64.b64encode(bytes(32)).decode()
        self.assertEqual(parse_config({"control_plane": {"signing_public_key": key}}).control_plane.signing_public_key,
                         key)
        der = base64.b64encode(bytes(44)).decode()
        for bad in ("c2hvcnQ=", der, key.rstrip("="), "not base64"):
            with self.assertRaises(ConfigError) as caught:
                parse_config({"control_plane": {"signing_public_key": bad}})
            self.assertTrue(str(caught.exception).startswith("control_plane.signing_public_key: must be standard "
                                                             "base64 of a raw 32-byte Ed25519 public key"), bad)
        # plexsphere also names its keys in the 44-byte DER form.
        self.assertEqual(parse_config({"control_plane": {"protocol": "plexsphere", "signing_public_key": der}})
                         .control_plane.signing_public_key, der)

    def test_url_scheme(self) -> None:
        self.assertConfigError({"node": {"id": "n"}, "control_plane": {"url": "ftp://cp"}},
                               "control_plane.url: must start with http:// or https://, got 'ftp://cp'")

    def test_bad_allowed_ip(self) -> None:
        self.assertConfigError({"agent_api": {"allowed_ips": ["10.0.0.0/33"]}},
                               "agent_api.allowed_ips: '10.0.0.0/33' is not an IP address or CIDR network")

    def test_bad_socket_mode(self) -> None:
        self.assertConfigError({"node_api": {"socket_mode": "rw"}},
                               'node_api.socket_mode: must be an octal mode such as "0660", got \'rw\'')

    def test_a_client_ca_needs_tls(self) -> None:
        self.assertConfigError({"agent_api": {"tls_client_ca": "/ca.pem"}},
                               "agent_api.tls_client_ca: needs agent_api.tls_cert and agent_api.tls_key "
                               "(mutual TLS is TLS)")

    def test_tls_needs_both_files(self) -> None:
        self.assertConfigError({"agent_api": {"tls_cert": "/c.pem"}},
                               "agent_api.tls_cert: tls_cert and tls_key must be set together")

    def test_invalid_toml_names_the_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[node\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path, {})
        self.assertTrue(str(caught.exception).startswith(f"{path}: invalid TOML"))


class EnvironmentTests(unittest.TestCase):
    def test_allowed_ips_from_environment(self) -> None:
        c = parse_config({}, {"NODE_AGENT_ALLOWED_IPS": "10.120.0.5, 192.168.1.0/24,"})
        self.assertEqual(c.agent_api.allowed_ips, ("10.120.0.5", "192.168.1.0/24"))

    def test_bad_allowed_ip_in_environment_names_the_variable(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config({}, {"NODE_AGENT_ALLOWED_IPS": "10.0.0.1, 10.0.0.0/33"})
        self.assertEqual(
            str(caught.exception),
            "NODE_AGENT_ALLOWED_IPS (overrides agent_api.allowed_ips): '10.0.0.0/33' is not an IP address or CIDR network",
        )

    def test_require_auth_always_from_environment(self) -> None:
        for text, value in (("1", True), ("yes", True), ("false", False), ("0", False), ("No", False)):
            c = parse_config({}, {"NODE_AGENT_REQUIRE_AUTH_ALWAYS": text})
            self.assertEqual(c.agent_api.require_auth_always, value, text)

    def test_bad_boolean_in_environment(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config({}, {"NODE_AGENT_REQUIRE_AUTH_ALWAYS": "maybe"})
        self.assertIn("NODE_AGENT_REQUIRE_AUTH_ALWAYS", str(caught.exception))

    def test_the_bootstrap_token_from_the_environment_is_trimmed_and_never_shown(self) -> None:
        c = parse_config({}, {"PLEXD_BOOTSTRAP_TOKEN": "  boot-secret\n"})
        self.assertEqual(c.bootstrap_token_env, "boot-secret")
        self.assertNotIn("boot-secret", repr(c))
        self.assertEqual(parse_config({}, {}).bootstrap_token_env, "")

    def test_docker_host_fills_an_empty_key_only(self) -> None:
        self.assertEqual(parse_config({}, {"DOCKER_HOST": "unix:///d.sock"}).docker.host, "unix:///d.sock")
        self.assertEqual(
            parse_config({"docker": {"host": "tcp://x:2375"}}, {"DOCKER_HOST": "unix:///d.sock"}).docker.host,
            "tcp://x:2375",
        )


class KeyFileTests(unittest.TestCase):
    def write(self, content: str, mode: int = 0o600) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def test_surrounding_whitespace_is_ignored(self) -> None:
        self.assertEqual(read_key_file("k", self.write("  token \n")), "token")

    def test_group_readable_file_warns(self) -> None:
        warnings: list[str] = []
        read_key_file("node_api.http_token_file", self.write("t", 0o640), warnings.append)
        self.assertEqual(len(warnings), 1)
        self.assertIn("node_api.http_token_file", warnings[0])
        self.assertNotIn("t\n", warnings[0])

    def test_private_file_does_not_warn(self) -> None:
        warnings: list[str] = []
        read_key_file("k", self.write("t", 0o600), warnings.append)
        self.assertEqual(warnings, [])

    def test_errors_never_contain_the_content(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            read_key_file("k", self.write("   \n"))
        self.assertEqual(str(caught.exception).split(": ")[0], "k")


class OperationsConfigTests(unittest.TestCase):
    """The additive [nginx], [system] and [cron] sections."""

    def test_defaults(self):
        c = parse_config({})
        self.assertEqual((c.nginx.command, c.nginx.container, c.nginx.service), (("nginx",), "", "nginx"))
        self.assertEqual((c.system.systemctl, c.system.ufw, c.system.agent_service),
                         (("systemctl",), ("ufw",), "node-agent"))
        self.assertEqual((c.cron.max_jobs, c.cron.run_timeout, c.cron.poll_interval), (100, 3600.0, 2.0))

    def test_argv_prefixes_are_lists_of_strings(self):
        c = parse_config({"system": {"ufw": ["ip", "netns", "exec", "ns1", "ufw"]}})
        self.assertEqual(c.system.ufw, ("ip", "netns", "exec", "ns1", "ufw"))
        for doc, key in (({"system": {"ufw": []}}, "system.ufw"), ({"nginx": {"command": [""]}}, "nginx.command"),
                         ({"system": {"systemctl": "systemctl"}}, "system.systemctl")):
            with self.assertRaises(ConfigError) as caught:
                parse_config(doc)
            self.assertTrue(str(caught.exception).startswith(key + ":"), str(caught.exception))

    def test_limits_must_be_positive(self):
        for doc, key in (({"cron": {"max_jobs": 0}}, "cron.max_jobs"), ({"cron": {"poll_interval": 0}}, "cron.poll_interval"),
                         ({"nginx": {"timeout": -1}}, "nginx.timeout")):
            with self.assertRaises(ConfigError) as caught:
                parse_config(doc)
            self.assertTrue(str(caught.exception).startswith(key + ":"), str(caught.exception))


class DockerConfigTests(unittest.TestCase):
    """``[docker]`` with its nested ``[docker.cleanup]`` table."""

    def test_cleanup_defaults_are_off_at_85_percent_keeping_3_hourly(self) -> None:
        cleanup = parse_config({}).docker.cleanup
        self.assertEqual((cleanup.enabled, cleanup.threshold_percent, cleanup.keep_last, cleanup.interval),
                         (False, 85.0, 3, 3600.0))

    def test_replace_stable_time_defaults_to_10_seconds(self) -> None:
        self.assertEqual(parse_config({}).docker.replace_stable_time, 10.0)

    def test_a_nested_table_is_read_beside_its_parent_keys(self) -> None:
        c = parse_config({"docker": {"threads": 3, "cleanup": {"enabled": True, "threshold_percent": 92.5}}})
        self.assertEqual((c.docker.threads, c.docker.cleanup.enabled, c.docker.cleanup.threshold_percent),
                         (3, True, 92.5))
        self.assertEqual(c.docker.cleanup.keep_last, 3)

    def test_an_unknown_key_of_a_nested_table_is_named_with_its_path(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config({"docker": {"cleanup": {"keep": 2}}})
        self.assertEqual(str(caught.exception), "docker.cleanup.keep: unknown key")

    def test_a_nested_table_given_a_value_is_refused(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config({"docker": {"cleanup": True}})
        self.assertEqual(str(caught.exception), "docker.cleanup: must be a table")

    def test_a_wrong_type_in_a_nested_table_names_the_key(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config({"docker": {"cleanup": {"enabled": "yes"}}})
        self.assertEqual(str(caught.exception), "docker.cleanup.enabled: must be true or false, got 'yes'")

    def test_the_test_fixtures_write_a_nested_table_as_its_own_toml_table(self) -> None:
        import tomllib

        from plexagent.testing.fixtures import dump_toml

        document = {"docker": {"threads": 2, "cleanup": {"enabled": True, "interval": 60.0}}}
        self.assertEqual(tomllib.loads(dump_toml(document)), document)

    def test_out_of_range_values_are_refused_naming_the_key(self) -> None:
        for table, key in (({"cleanup": {"threshold_percent": 0}}, "docker.cleanup.threshold_percent"),
                           ({"cleanup": {"threshold_percent": 100.5}}, "docker.cleanup.threshold_percent"),
                           ({"cleanup": {"keep_last": -1}}, "docker.cleanup.keep_last"),
                           ({"cleanup": {"interval": 0}}, "docker.cleanup.interval"),
                           ({"replace_stable_time": 0}, "docker.replace_stable_time")):
            with self.assertRaises(ConfigError) as caught:
                parse_config({"docker": table})
            self.assertTrue(str(caught.exception).startswith(key + ":"), str(caught.exception))


class MetricsConfigTests(unittest.TestCase):
    def test_stats_interval_defaults_to_ten_seconds(self) -> None:
        self.assertEqual(parse_config({}).metrics.stats_interval, 10.0)

    def test_stats_interval_must_be_positive(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_config({"metrics": {"stats_interval": 0}})
        self.assertEqual(str(caught.exception), "metrics.stats_interval: must be greater than 0")


class ReportQuotaConfigTests(unittest.TestCase):
    def test_defaults(self) -> None:
        c = parse_config({})
        self.assertEqual((c.node_api.max_report_entries, c.node_api.max_report_bytes), (10000, 64 * 1024 * 1024))

    def test_limits_must_be_positive(self) -> None:
        for key in ("max_report_entries", "max_report_bytes"):
            with self.assertRaises(ConfigError) as caught:
                parse_config({"node_api": {key: 0}})
            self.assertEqual(str(caught.exception), f"node_api.{key}: must be greater than 0")


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accepted_keys() -> list[tuple[str, str, object]]:
    """
    (section, key, default) of every key the configuration accepts; a
    nested table's keys have its dotted name as section (``docker.cleanup``).
    """
    import attrs

    from plexagent.config import _SECTIONS

    found: list[tuple[str, str, object]] = []

    def walk(section: str, cls: type) -> None:
        for field in attrs.fields(cls):
            if attrs.has(type(field.default)):
                walk(f"{section}.{field.name}", type(field.default))
            else:
                found.append((section, field.name, field.default))

    for section, cls in _SECTIONS.items():
        walk(section, cls)
    return found


def at(value: object, dotted: str) -> object:
    """``value``'s part named by ``dotted`` (``docker.cleanup``), item or attribute, or None."""
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


class ExampleConfigTests(unittest.TestCase):
    """etc/plexagent.toml lists every key, each at exactly its default."""

    def setUp(self) -> None:
        import tomllib

        with open(os.path.join(REPOSITORY, "etc", "plexagent.toml"), "rb") as f:
            self.document = tomllib.load(f)

    def test_every_key_is_listed(self) -> None:
        missing = [f"{s}.{k}" for s, k, _ in accepted_keys() if k not in (at(self.document, s) or {})]
        self.assertEqual(missing, [])

    def test_every_key_is_at_its_default(self) -> None:
        parsed = parse_config(self.document, {})  # also: no unknown section or key
        wrong = [
            f"{s}.{k} = {getattr(at(parsed, s), k)!r}, the default is {default!r}"
            for s, k, default in accepted_keys()
            if getattr(at(parsed, s), k) != default or type(getattr(at(parsed, s), k)) is not type(default)
        ]
        self.assertEqual(wrong, [])
        self.assertEqual(parsed, Config())
