"""
The configuration: TOML file plus environment overrides -> one frozen Config.

Every error names the key (``section.key``) or the path that is wrong, in one
line, so that startup can stop with a message an operator can act on.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from typing import Any, Mapping

import attrs


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key or path."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@attrs.frozen
class NodeConfig:
    #: assigned at enrollment; when set, the enrolled id must match it
    id: str = ""
    data_dir: str = "/var/lib/plexagent"
    #: a pre-provisioned node secret key (with control_plane.token_file)
    secret_key_file: str = ""
    shutdown_timeout: float = 5.0
    #: log every request (request id, route, status, duration; never a
    #: credential). Off by default: it costs about 40% of a small read's CPU.
    access_log: bool = False


#: The wire protocols control_plane.protocol may name.
PROTOCOLS = ("plexd", "plexsphere")


@attrs.frozen
class ControlPlaneConfig:
    url: str = ""
    protocol: str = "plexd"
    #: the enrollment credential, read only while no identity is stored
    bootstrap_token_file: str = "/etc/plexd/bootstrap-token"
    #: a pre-provisioned node bearer; "" = enroll
    token_file: str = ""
    #: plexsphere enrollment fields (checked now, used by that protocol)
    project_id: str = ""
    resource_handle: str = ""
    requested_resource_id: str = ""
    ca_file: str = ""
    #: an optional pin of the first signing key
    signing_public_key: str = ""
    events: bool = True
    reconcile_interval: float = 60.0
    heartbeat_interval: float = 30.0
    report_debounce: float = 5.0
    request_timeout: float = 30.0
    connect_timeout: float = 10.0
    # An event stream silent this long (no event, not even a keep-alive
    # comment) is taken as dead and reconnected: 3x a 30 s keep-alive.
    events_idle_timeout: float = 90.0


@attrs.frozen
class NodeAPIConfig:
    socket: str = "/var/run/plexd/api.sock"
    socket_mode: str = "0660"
    socket_group: str = "plexd"
    secrets_group: str = "plexd-secrets"
    http_enabled: bool = False
    http_listen: str = "127.0.0.1:9100"
    http_token_file: str = "/etc/plexd/api-token"
    max_body_bytes: int = 1048576
    #: connections the socket (and, separately, the TCP listener) holds at
    #: once; past it a new one is answered 503 and closed
    max_connections: int = 4096
    #: report entries the node may hold; past it a new key gets 413
    max_report_entries: int = 10000
    #: bytes the report entries may take as stored (their JSON records);
    #: past it a growing write gets 413. The store holds them in memory.
    max_report_bytes: int = 67108864


@attrs.frozen
class AgentAPIConfig:
    enabled: bool = True
    listen: str = "0.0.0.0:9999"
    api_key_file: str = "/etc/node-agent/api-key"
    allowed_ips: tuple[str, ...] = ()
    require_auth_always: bool = True
    allowed_paths: tuple[str, ...] = ("/local/", "/app/", "/etc/nginx/", "/tmp/")
    allowed_services: tuple[str, ...] = ("nginx", "docker", "node-agent")
    max_upload_bytes: int = 10737418240
    tls_cert: str = ""
    tls_key: str = ""
    #: PEM CA certificates; when set, a client must present a certificate one of them signed
    tls_client_ca: str = ""
    #: with tls_client_ca: false lets a client with a verified certificate in without X-API-Key
    require_api_key_with_client_cert: bool = True
    #: connections the listener holds at once; past it a new one is answered 503
    max_connections: int = 4096
    #: /files/read refuses larger files (413)
    max_read_bytes: int = 10485760
    #: /files/write and the legacy JSON form of /upload/tar accept bodies up to
    #: this (other JSON routes: 1 MiB). Such a body is parsed whole: its text,
    #: the decoded content and the file's bytes are each about this size in
    #: memory at once. Larger files go through /upload/tar/stream.
    max_json_bytes: int = 16777216
    #: members (files, directories, links) per extracted archive
    max_archive_members: int = 200000
    #: seconds after its last chunk an unfinished chunked upload is removed
    chunk_max_age: float = 86400.0
    #: chunked uploads held at once (all of them together hold at most max_upload_bytes)
    max_chunked_uploads: int = 16
    #: seconds a git clone may take before it is killed
    git_timeout: float = 600.0


@attrs.frozen
class DockerCleanupConfig:
    """``[docker.cleanup]``: the automatic image cleanup, off by default."""

    enabled: bool = False
    #: percent of the file system holding Docker's data root over which a run starts
    threshold_percent: float = 85.0
    #: newest tagged images kept per repository by an automatic run
    keep_last: int = 3
    #: seconds between checks of the data root's file system
    interval: float = 3600.0


@attrs.frozen
class DockerConfig:
    host: str = ""
    threads: int = 10
    #: seconds a replacement container without a Docker health check must
    #: keep running, without a restart, to count as healthy
    replace_stable_time: float = 10.0
    cleanup: DockerCleanupConfig = DockerCleanupConfig()


@attrs.frozen
class NginxConfig:
    #: argv prefix that runs nginx on the host (``nginx -t``, ``nginx -s reload``)
    command: tuple[str, ...] = ("nginx",)
    prefix: str = ""  # ``-p``; "" = nginx's built-in prefix
    config: str = ""  # ``-c``; "" = nginx's built-in configuration file
    #: a container running nginx; when set, test and reload run in it (Docker exec)
    container: str = ""
    #: the systemd unit reloaded when systemd is available
    service: str = "nginx"
    timeout: float = 30.0


@attrs.frozen
class SystemConfig:
    """How the agent reaches the host's programs (systemctl, ufw)."""

    #: PATH for nginx, systemctl and ufw; "" = the standard sbin and bin directories
    path: str = ""
    systemctl: tuple[str, ...] = ("systemctl",)
    #: argv prefix for ufw, e.g. ["ip", "netns", "exec", "NS", "ufw"]
    ufw: tuple[str, ...] = ("ufw",)
    #: the name (in agent_api.allowed_services) of the agent's own unit
    agent_service: str = "node-agent"
    #: seconds between answering a restart of the agent's own unit and asking for it
    self_restart_delay: float = 1.0
    program_timeout: float = 60.0


@attrs.frozen
class CronConfig:
    max_jobs: int = 100
    #: a run still going after this many seconds is killed and its container removed
    run_timeout: float = 3600.0
    #: seconds between checks whether a run's container has exited
    poll_interval: float = 2.0


@attrs.frozen
class MetricsConfig:
    #: seconds between rounds of container stats samples (GET /metrics answers from the latest)
    stats_interval: float = 10.0


@attrs.frozen
class Config:
    """The whole, immutable configuration of one agent."""

    node: NodeConfig = NodeConfig()
    control_plane: ControlPlaneConfig = ControlPlaneConfig()
    node_api: NodeAPIConfig = NodeAPIConfig()
    agent_api: AgentAPIConfig = AgentAPIConfig()
    docker: DockerConfig = DockerConfig()
    nginx: NginxConfig = NginxConfig()
    system: SystemConfig = SystemConfig()
    cron: CronConfig = CronConfig()
    metrics: MetricsConfig = MetricsConfig()
    #: PLEXD_BOOTSTRAP_TOKEN (trimmed): overrides control_plane.bootstrap_token_file
    bootstrap_token_env: str = attrs.field(default="", repr=False)

    @property
    def standalone(self) -> bool:
        return not self.control_plane.url


_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "control_plane": ControlPlaneConfig,
    "node_api": NodeAPIConfig,
    "agent_api": AgentAPIConfig,
    "docker": DockerConfig,
    "nginx": NginxConfig,
    "system": SystemConfig,
    "cron": CronConfig,
    "metrics": MetricsConfig,
}


def _type_name(t: Any) -> str:
    return {
        str: "a string",
        bool: "true or false",
        int: "an integer",
        float: "a number",
    }.get(t, "a list of strings")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:  # tuple[str, ...]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
    raise ConfigError(f"{key}: must be {_type_name(kind)}, got {value!r}")


def _field_kinds(cls: type) -> dict[str, Any]:
    """key -> its kind: a scalar type, ``tuple`` (list of strings) or a section class (a nested table)."""
    kinds = {}
    for field in attrs.fields(cls):
        default = field.default
        kinds[field.name] = tuple if isinstance(default, tuple) else type(default)
    return kinds


def _parse_table(path: tuple[str, ...], cls: type, table: Any) -> dict[str, Any]:
    """The values of one table for ``cls``; a nested table (``[docker.cleanup]``) becomes its section."""
    if not isinstance(table, dict):
        raise ConfigError(f"{_name(*path)}: must be a table")
    kinds = _field_kinds(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in kinds:
            raise ConfigError(f"{_name(*path, key)}: unknown key")
        kind = kinds[key]
        if attrs.has(kind):
            values[key] = kind(**_parse_table((*path, key), kind, value))
        else:
            values[key] = _coerce(_name(*path, key), value, kind)
    return values


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _name(*parts: str) -> str:
    """A dotted key name for messages; odd names are quoted so a message stays one line."""
    return ".".join(p if _PLAIN_KEY.fullmatch(p) else repr(p) for p in parts)


def parse_bool(key: str, text: str) -> bool:
    """Parse an environment boolean (``1/true/yes`` or ``0/false/no``)."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{key}: must be one of 1/true/yes or 0/false/no, got {text!r}")


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_config(
    document: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Config:
    """Build a Config from a parsed TOML document and the environment."""
    environ = environ or {}
    sections: dict[str, Any] = {}
    for name, table in document.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{_name(name)}: unknown section (known: {', '.join(_SECTIONS)})")
        sections[name] = _parse_table((name,), _SECTIONS[name], table)

    agent = sections.setdefault("agent_api", {})
    if "NODE_AGENT_ALLOWED_IPS" in environ:
        agent["allowed_ips"] = _split_list(environ["NODE_AGENT_ALLOWED_IPS"])
        # Named here, so an error points at the variable, not at the file's key.
        _check_networks("NODE_AGENT_ALLOWED_IPS (overrides agent_api.allowed_ips)", agent["allowed_ips"])
    if "NODE_AGENT_REQUIRE_AUTH_ALWAYS" in environ:
        agent["require_auth_always"] = parse_bool(
            "NODE_AGENT_REQUIRE_AUTH_ALWAYS", environ["NODE_AGENT_REQUIRE_AUTH_ALWAYS"]
        )
    docker = sections.setdefault("docker", {})
    if not docker.get("host") and environ.get("DOCKER_HOST"):
        docker["host"] = environ["DOCKER_HOST"]

    config = Config(**{name: _SECTIONS[name](**vals) for name, vals in sections.items()},
                    bootstrap_token_env=environ.get("PLEXD_BOOTSTRAP_TOKEN", "").strip())
    _validate(config)
    return config


def _check_networks(key: str, entries: tuple[str, ...]) -> None:
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"{key}: {entry!r} is not an IP address or CIDR network") from None


UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _signing_key_length(text: str) -> int | None:
    """The length of the key a standard base64 text decodes to, or None if it is not standard base64."""
    import base64
    import binascii

    if not re.fullmatch(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", text):
        return None
    try:
        return len(base64.b64decode(text, validate=True))
    except binascii.Error:
        return None


def _validate_control_plane(config: Config) -> None:
    cp = config.control_plane
    if cp.protocol not in PROTOCOLS:
        raise ConfigError(f'control_plane.protocol: must be "plexd" or "plexsphere", got {cp.protocol!r}')
    if cp.url and not (cp.url.startswith("http://") or cp.url.startswith("https://")):
        raise ConfigError(f"control_plane.url: must start with http:// or https://, got {cp.url!r}")
    if cp.token_file:
        for key, value in (("node.id", config.node.id), ("node.secret_key_file", config.node.secret_key_file)):
            if not value:
                raise ConfigError(f"{key}: required when control_plane.token_file is set")
    if cp.project_id and not UUID_PATTERN.fullmatch(cp.project_id):
        raise ConfigError(f"control_plane.project_id: must be a UUID such as "
                          f"\"1b4e28ba-2fa1-11d2-883f-0016d3cca427\", got {cp.project_id!r}")
    if cp.protocol == "plexsphere" and cp.url:
        for key in ("project_id", "resource_handle"):
            if not getattr(cp, key):
                raise ConfigError(f'control_plane.{key}: required with protocol "plexsphere"')
    if cp.signing_public_key:
        # plexsphere may also give the 44-byte DER form of an Ed25519 key.
        lengths = (32, 44) if cp.protocol == "plexsphere" else (32,)
        if _signing_key_length(cp.signing_public_key) not in lengths:
            raise ConfigError("control_plane.signing_public_key: must be standard base64 of a raw 32-byte "
                              "Ed25519 public key (44 characters)")


def _validate(config: Config) -> None:
    _validate_control_plane(config)
    cp = config.control_plane
    for key in ("reconcile_interval", "heartbeat_interval", "request_timeout", "connect_timeout",
                "events_idle_timeout"):
        if getattr(cp, key) <= 0:
            raise ConfigError(f"control_plane.{key}: must be greater than 0")
    if cp.report_debounce < 0:
        raise ConfigError("control_plane.report_debounce: must not be negative")
    if config.node.shutdown_timeout < 0:
        raise ConfigError("node.shutdown_timeout: must not be negative")
    if not config.node.data_dir:
        raise ConfigError("node.data_dir: must not be empty")
    mode = config.node_api.socket_mode
    try:
        parsed_mode = int(mode, 8)
    except ValueError:
        parsed_mode = -1
    if not 0 <= parsed_mode <= 0o777:
        raise ConfigError(f"node_api.socket_mode: must be an octal mode such as \"0660\", got {mode!r}")
    if not config.node_api.socket:
        raise ConfigError("node_api.socket: must not be empty")
    for key in ("max_body_bytes", "max_report_entries", "max_report_bytes", "max_connections"):
        if getattr(config.node_api, key) <= 0:
            raise ConfigError(f"node_api.{key}: must be greater than 0")
    _check_networks("agent_api.allowed_ips", config.agent_api.allowed_ips)
    for root in config.agent_api.allowed_paths:
        if not root.startswith("/"):
            raise ConfigError(f"agent_api.allowed_paths: {root!r} must be an absolute path")
    if config.agent_api.max_upload_bytes <= 0:
        raise ConfigError("agent_api.max_upload_bytes: must be greater than 0")
    for key in ("max_read_bytes", "max_json_bytes", "max_archive_members", "chunk_max_age", "git_timeout",
                "max_connections", "max_chunked_uploads"):
        if getattr(config.agent_api, key) <= 0:
            raise ConfigError(f"agent_api.{key}: must be greater than 0")
    if bool(config.agent_api.tls_cert) != bool(config.agent_api.tls_key):
        raise ConfigError("agent_api.tls_cert: tls_cert and tls_key must be set together")
    if config.agent_api.tls_client_ca and not config.agent_api.tls_cert:
        raise ConfigError("agent_api.tls_client_ca: needs agent_api.tls_cert and agent_api.tls_key (mutual TLS is TLS)")
    if config.docker.threads < 1:
        raise ConfigError("docker.threads: must be at least 1")
    if config.docker.replace_stable_time <= 0:
        raise ConfigError("docker.replace_stable_time: must be greater than 0")
    cleanup = config.docker.cleanup
    if not 0 < cleanup.threshold_percent <= 100:
        raise ConfigError("docker.cleanup.threshold_percent: must be greater than 0 and at most 100")
    if cleanup.keep_last < 0:
        raise ConfigError("docker.cleanup.keep_last: must not be negative")
    if cleanup.interval <= 0:
        raise ConfigError("docker.cleanup.interval: must be greater than 0")
    for key, argv in (("nginx.command", config.nginx.command), ("system.systemctl", config.system.systemctl),
                      ("system.ufw", config.system.ufw)):
        if not argv or not all(argv):
            raise ConfigError(f"{key}: must be a non-empty list of non-empty strings")
    for key, value in (("nginx.timeout", config.nginx.timeout), ("system.program_timeout", config.system.program_timeout),
                       ("cron.run_timeout", config.cron.run_timeout),
                       ("cron.poll_interval", config.cron.poll_interval),
                       ("metrics.stats_interval", config.metrics.stats_interval)):
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    if config.system.self_restart_delay < 0:
        raise ConfigError("system.self_restart_delay: must not be negative")
    if config.cron.max_jobs < 1:
        raise ConfigError("cron.max_jobs: must be at least 1")


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file at ``path`` (or none: built-in defaults)."""
    document: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return parse_config(document, environ)


def read_key_file(key: str, path: str, warn: Any = None) -> str:
    """
    Read a secret key file, stripped of surrounding whitespace.

    ``warn`` is called with a message when the file is readable by group or
    others. Errors name the config key and the path, never the content.
    """
    import os
    import stat

    from plexagent.fileio import read_stored

    try:
        st = os.stat(path)
        raw = read_stored(path, 65536, follow_symlinks=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from None
    if warn is not None and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warn(f"{key}: {path} is readable by group or others; chmod 600 it")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{key}: {path} is empty")
    return text


def read_key_lines(key: str, path: str, warn: Any = None) -> tuple[str, ...]:
    """
    Read a key file holding one key or more, one a line: surrounding
    whitespace and blank lines are ignored, and so are lines starting with
    ``#`` (comments: a key cannot start with ``#``). Errors as
    ``read_key_file``'s; a file with no key is one.
    """
    text = read_key_file(key, path, warn)
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ConfigError(f"{key}: {path} holds no key (only comments)")
    return keys
