"""
Fixtures for the host-operation parts of the agent API (services, firewall,
nginx, cron, metrics): an agent started with extra configuration, a
recording fake ``systemctl``, a network namespace in which ``ufw`` runs for
real without touching the host's firewall, and a real nginx with a
temporary prefix.

A component the test needs that is missing (ufw, ip, nginx, root) skips the
test on a developer's machine but FAILS when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import uuid
from typing import Any

import attrs
from twisted.internet import reactor as default_reactor
from twisted.trial import unittest

from plexagent.host import processes
from plexagent.testing import docker as docker_fixtures


def missing(testcase: unittest.TestCase, what: str, hint: str = "run scripts/setup-test-env.sh") -> None:
    """Fail under CI, skip elsewhere."""
    message = f"{what} is missing; {hint}"
    if os.environ.get("CI"):
        testcase.fail(message)
    raise unittest.SkipTest(message)


def configure(config: Any, extra: dict[str, dict[str, Any]]) -> Any:
    """``config`` with ``extra``'s sections' keys replaced (lists become tuples)."""
    for section, values in extra.items():
        current = getattr(config, section)
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        config = attrs.evolve(config, **{section: attrs.evolve(current, **converted)})
    return config


def start_agent(
    testcase: unittest.TestCase,
    extra: dict[str, dict[str, Any]] | None = None,
    reactor: Any = None,
    workdir: str | None = None,
    api_key: str | None = None,
    **config_kwargs: Any,
) -> docker_fixtures.RunningAgent:
    """
    The whole agent on loopback with ``extra`` configuration, stopped after
    the test. Passing the ``workdir`` and ``api_key`` of an earlier agent
    starts a second agent on the same data (a restart).
    """
    from plexagent import service

    reactor = reactor or default_reactor
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix="pa-agent-")
        testcase.addCleanup(shutil.rmtree, workdir, True)
    api_key = api_key or docker_fixtures.derive_api_key("provisioning-token-" + uuid.uuid4().hex)
    config_kwargs.setdefault("docker_host_url", docker_fixtures.docker_host())
    config = docker_fixtures.agent_config(workdir, api_key=api_key, **config_kwargs)
    config = configure(config, extra or {})
    top = service.makeService(config, reactor)
    top.startService()
    stopped: list[bool] = []

    def stop() -> Any:
        if not stopped:
            stopped.append(True)
            return top.stopService()
        return None

    testcase.addCleanup(stop)
    agent = docker_fixtures.RunningAgent(top, config, api_key)
    agent.workdir = workdir  # type: ignore[attr-defined]
    agent.stop = stop  # type: ignore[attr-defined]
    return agent


# -- a recording systemctl --------------------------------------------------


class FakeSystemctl:
    """
    A ``systemctl`` script in a directory the test puts on the agent's PATH.
    Every call is appended to ``calls.jsonl``; ``show`` answers from
    ``units.json`` (``{unit: {property: value}}``); ``mode`` "offline" makes
    it answer like systemctl on a host not booted with systemd.
    """

    def __init__(self, testcase: unittest.TestCase, mode: str = "systemd") -> None:
        self.directory = tempfile.mkdtemp(prefix="pa-systemctl-")
        testcase.addCleanup(shutil.rmtree, self.directory, True)
        self.bin = os.path.join(self.directory, "bin")
        os.mkdir(self.bin)
        self.calls_path = os.path.join(self.directory, "calls.jsonl")
        self.units_path = os.path.join(self.directory, "units.json")
        self.units: dict[str, dict[str, str]] = {}
        self.set_mode(mode)
        python = shutil.which("python3") or "/usr/bin/python3"
        script = textwrap.dedent(
            f"""\
            #!{python}
            import json, os, sys
            here = {self.directory!r}
            args = sys.argv[1:]
            with open(os.path.join(here, "calls.jsonl"), "a") as f:
                f.write(json.dumps(args) + "\\n")
            mode = open(os.path.join(here, "mode")).read().strip()
            if mode == "offline":
                if args[:1] == ["is-system-running"]:
                    print("offline")
                    sys.exit(1)
                sys.stderr.write("System has not been booted with systemd as init system (PID 1). Can't operate.\\n")
                sys.stderr.write("Failed to connect to bus: Host is down\\n")
                sys.exit(1)
            units = json.load(open(os.path.join(here, "units.json")))
            positional = [a for a in args if not a.startswith("-")]
            verb = positional[0] if positional else ""
            unit = positional[1] if len(positional) > 1 else ""
            if verb == "is-system-running":
                print("running")
                sys.exit(0)
            if verb == "show":
                props = units.get(unit, {{"LoadState": "not-found", "ActiveState": "inactive"}})
                wanted = None
                for a in args:
                    if a.startswith("--property="):
                        wanted = a.split("=", 1)[1].split(",")
                for key, value in props.items():
                    if wanted is None or key in wanted:
                        print(f"{{key}}={{value}}")
                sys.exit(0)
            if verb in ("restart", "reload", "start", "stop"):
                if unit not in units:
                    sys.stderr.write(f"Failed to {{verb}} {{unit}}.service: Unit {{unit}}.service not found.\\n")
                    sys.exit(5)
                sys.exit(0)
            sys.stderr.write("unknown command\\n")
            sys.exit(1)
            """
        )
        path = os.path.join(self.bin, "systemctl")
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o755)
        self._write_units()

    def set_mode(self, mode: str) -> None:
        with open(os.path.join(self.directory, "mode"), "w") as f:
            f.write(mode)

    def add_unit(self, name: str, **props: str) -> None:
        self.units[name] = {"LoadState": "loaded", **props}
        self._write_units()

    def remove_unit(self, name: str) -> None:
        self.units.pop(name, None)
        self._write_units()

    def _write_units(self) -> None:
        with open(self.units_path, "w") as f:
            json.dump(self.units, f)

    @property
    def path(self) -> str:
        """A PATH with this systemctl first."""
        return self.bin + os.pathsep + processes.DEFAULT_PATH

    def calls(self) -> list[list[str]]:
        try:
            with open(self.calls_path) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


# -- ufw in a network namespace ---------------------------------------------


class FirewallNamespace:
    """
    A network namespace ``pa-test-...`` with its own copy of ufw's
    configuration: ``ip netns exec`` bind-mounts ``/etc/netns/NAME/*`` over
    ``/etc``, so ``ufw`` run through ``command`` changes only the
    namespace's iptables and the copied files, never the host's firewall.
    """

    def __init__(self, testcase: unittest.TestCase) -> None:
        if os.geteuid() != 0:
            missing(testcase, "root (to create a network namespace)")
        for program in ("ip", "ufw", "iptables"):
            if shutil.which(program, path=processes.DEFAULT_PATH) is None:
                missing(testcase, program)
        self.name = f"pa-test-{uuid.uuid4().hex[:8]}"
        self.etc = os.path.join("/etc/netns", self.name)
        result = subprocess.run(["ip", "netns", "add", self.name], capture_output=True)
        if result.returncode != 0:
            missing(testcase, "network namespaces", result.stderr.decode().strip())
        testcase.addCleanup(self.remove)
        os.makedirs(os.path.join(self.etc, "default"))
        shutil.copytree("/etc/ufw", os.path.join(self.etc, "ufw"), symlinks=True)
        shutil.copy2("/etc/default/ufw", os.path.join(self.etc, "default", "ufw"))
        # Start from a clean, disabled firewall without kernel tunables.
        with open(os.path.join(self.etc, "ufw", "ufw.conf"), "w") as f:
            f.write("ENABLED=no\nLOGLEVEL=low\n")
        with open(os.path.join(self.etc, "ufw", "sysctl.conf"), "w") as f:
            f.write("")

    @property
    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.name, "ufw"]

    def ufw(self, *args: str) -> str:
        """Blocking (test setup and checks only)."""
        result = subprocess.run([*self.command, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ufw {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def iptables_rules(self) -> str:
        result = subprocess.run(["ip", "netns", "exec", self.name, "iptables", "-S"], capture_output=True, text=True)
        return result.stdout

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)


# -- a real nginx with a temporary prefix -----------------------------------


VALID_NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "{greeting}\\n"; }}
    }}
}}
"""

BROKEN_NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    server {{
        listen 127.0.0.1:{port};
        this_is_not_a_directive on;
    }}
}}
"""


class Nginx:
    """Debian's nginx under a temporary prefix, listening on a loopback port."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.binary = shutil.which("nginx", path=processes.DEFAULT_PATH)
        if self.binary is None:
            missing(testcase, "nginx (Debian nginx-light)")
        self.prefix = tempfile.mkdtemp(prefix="pa-nginx-")
        os.makedirs(os.path.join(self.prefix, "tmp"))
        testcase.addCleanup(shutil.rmtree, self.prefix, True)
        self.conf = os.path.join(self.prefix, "nginx.conf")
        self.port = docker_fixtures._free_port()
        self.write(VALID_NGINX_CONF, greeting="first")
        testcase.addCleanup(self.stop)

    def write(self, template: str, greeting: str = "hello") -> None:
        with open(self.conf, "w") as f:
            f.write(template.format(prefix=self.prefix, port=self.port, greeting=greeting))

    @property
    def command(self) -> list[str]:
        """nginx with its startup error log in the prefix (the agent's ``nginx.command``)."""
        return [self.binary or "nginx", "-e", os.path.join(self.prefix, "error.log")]

    @property
    def argv(self) -> list[str]:
        return [*self.command, "-p", self.prefix, "-c", self.conf]

    def start(self) -> None:
        """Blocking (test setup only): nginx daemonises once it listens."""
        subprocess.run(self.argv, check=True, capture_output=True)

    def master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.prefix, "nginx.pid")) as f:
                return int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
