"""
nginx (seed "Nginx"): ``nginx -t`` and a reload that refuses an invalid
configuration.

Where nginx lives decides how it is reached, in this order:

1. ``nginx.container`` set: that container, via Docker exec on the pool;
2. systemd present and it knows ``nginx.service``: ``systemctl reload``;
3. otherwise the host's nginx: ``nginx -s reload``.

``nginx -t`` always runs where nginx lives (in the container, or on the
host with the configured ``-p``/``-c``). External programs run through
``programs`` (the process API), never a shell.
"""

from __future__ import annotations

from typing import Any

from plexagent import errors
from plexagent.config import NginxConfig
from plexagent.host import processes
from plexagent.host.programs import Programs
from plexagent.host.systemd import Systemd

NGINX_UNAVAILABLE = "nginx not available"
INVALID_CONFIGURATION = "nginx configuration is invalid"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()


class Nginx:
    """Test and reload nginx, on the host or in its container."""

    def __init__(self, config: NginxConfig, programs: Programs, systemd: Systemd, pool: Any) -> None:
        self.config = config
        self.programs = programs
        self.systemd = systemd
        self.pool = pool

    def host_argv(self, *args: str) -> list[str]:
        argv = list(self.config.command)
        if self.config.prefix:
            argv += ["-p", self.config.prefix]
        if self.config.config:
            argv += ["-c", self.config.config]
        return argv + list(args)

    async def _host(self, *args: str) -> tuple[int, str]:
        try:
            result = await self.programs.run(self.host_argv(*args), timeout=self.config.timeout)
        except processes.ProcessTimedOut as e:
            raise errors.Unavailable(NGINX_UNAVAILABLE, f"nginx did not answer: {e.details}") from None
        except errors.Unavailable:
            raise errors.Unavailable(
                NGINX_UNAVAILABLE, f"{self.config.command[0]} is not installed or not on the agent's PATH"
            ) from None
        # nginx -t reports on stderr.
        return result.exit_code, "\n".join(t for t in (_text(result.stderr), _text(result.stdout)) if t)

    async def _in_container(self, *args: str) -> tuple[int, str]:
        return await self.pool.call(_exec_nginx, self.config.container, ["nginx", *args])

    async def _nginx(self, *args: str) -> tuple[int, str]:
        if self.config.container:
            return await self._in_container(*args)
        return await self._host(*args)

    async def test(self) -> dict[str, Any]:
        """``{valid, output}`` of ``nginx -t``."""
        code, output = await self._nginx("-t")
        return {"valid": code == 0, "output": output}

    async def reload(self) -> dict[str, Any]:
        """Validate, then reload; ``Conflict`` with nginx's message when invalid."""
        checked = await self.test()
        if not checked["valid"]:
            raise errors.Conflict(INVALID_CONFIGURATION, checked["output"])
        if self.config.container:
            method = "docker"
            code, output = await self._in_container("-s", "reload")
        elif await self.systemd.available() and await self.systemd.has_unit(self.config.service):
            method = "systemd"
            await self.systemd.reload(self.config.service)
            code, output = 0, ""
        else:
            method = "signal"
            code, output = await self._host("-s", "reload")
        if code != 0:
            raise errors.UpstreamFailed("nginx reload failed", output or f"exit code {code}")
        return {"success": True, "method": method, "output": output, "test_output": checked["output"]}


def _exec_nginx(client: Any, container: str, argv: list[str]) -> tuple[int, str]:
    """In a pool thread: run ``argv`` in ``container``; (exit code, output)."""
    import docker.errors

    try:
        info = client.api.inspect_container(container)
    except docker.errors.NotFound:
        raise errors.Unavailable(NGINX_UNAVAILABLE, f"the nginx container {container} does not exist") from None
    if not (info.get("State") or {}).get("Running"):
        raise errors.Unavailable(NGINX_UNAVAILABLE, f"the nginx container {container} is not running")
    exec_id = client.api.exec_create(container, argv, stdout=True, stderr=True)["Id"]
    output = _text(client.api.exec_start(exec_id) or b"")
    code = client.api.exec_inspect(exec_id).get("ExitCode")
    if code in (126, 127) and ("not found" in output or "no such file" in output.lower()):
        raise errors.Unavailable(NGINX_UNAVAILABLE, f"there is no nginx in the container {container}")
    return int(code if code is not None else -1), output
