"""A real Node Agent API on loopback, in temp roots, called with treq."""

from __future__ import annotations

import json
import os
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from plexagent.agentapi import AgentAPI, AgentContext
from plexagent.config import AgentAPIConfig, Config, NodeConfig
from plexagent.http import auth

API_KEY = "test-api-key-0123456789"
FILE_ROUTE_MODULES = ["plexagent.agentapi.files", "plexagent.agentapi.uploads", "plexagent.agentapi.git"]


class RunningAgentAPI:
    """
    The agent API listening on 127.0.0.1 with ``allowed_paths`` set to one
    temp root (``self.root``); ``self.outside`` is a sibling outside it.
    """

    def __init__(self, testcase: Any, extra_roots: tuple[str, ...] = (), **agent_api: Any) -> None:
        base = os.path.realpath(testcase.mktemp())
        self.base = base
        self.root = os.path.join(base, "root")
        self.outside = os.path.join(base, "outside")
        self.data_dir = os.path.join(base, "data")
        #: more allowed roots, beside ``root``, by name
        self.extra_roots = {name: os.path.join(base, name) for name in extra_roots}
        for d in (self.root, self.outside, self.data_dir, *self.extra_roots.values()):
            os.makedirs(d)
        roots = (self.root + "/", *(d + "/" for d in self.extra_roots.values()))
        settings = {"allowed_paths": roots, "listen": "127.0.0.1:0"}
        settings.update(agent_api)
        self.config = Config(node=NodeConfig(data_dir=self.data_dir), agent_api=AgentAPIConfig(**settings))
        self.context = AgentContext(config=self.config, reactor=reactor)
        # Only the file routes: the other sections need domain objects
        # (Docker pool, cron, ...) that makeService builds.
        self.api = AgentAPI(self.context, auth.AgentAPIPolicy((), (API_KEY,), True), modules=FILE_ROUTE_MODULES)
        self.port = reactor.listenTCP(0, self.api.site(), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        testcase.addCleanup(self.port.stopListening)
        testcase.addCleanup(pool.closeCachedConnections)

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    async def call(self, method: str, path: str, *, key: str | None = API_KEY, **kwargs: Any) -> tuple[int, Any]:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["X-API-Key"] = key
        response = await self.http.request(method, self.url + path, headers=headers, **kwargs)
        body = await response.content()
        try:
            document = json.loads(body)
        except ValueError:
            document = body
        return response.code, document

    async def get(self, route: str, **params: Any) -> tuple[int, Any]:
        return await self.call("GET", route, params=params)

    async def post_json(self, path: str, document: Any, **kwargs: Any) -> tuple[int, Any]:
        return await self.call("POST", path, data=json.dumps(document).encode(),
                               headers={"Content-Type": "application/json"}, **kwargs)


def tree(directory: str) -> dict[str, bytes | str]:
    """{relative path: content (files) or '->target' (symlinks) or 'dir'}."""
    out: dict[str, bytes | str] = {}
    for current, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(current, name)
            rel = os.path.relpath(path, directory)
            if os.path.islink(path):
                out[rel] = "->" + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


class WiringDirectory:
    """
    A temp directory for makeService wiring tests: ``key`` (a private key
    file usable as API key and bearer token), ``data_dir``, ``socket`` and
    ``root`` (allowed for the agent API).
    """

    def __init__(self, testcase: Any) -> None:
        self.base = os.path.realpath(testcase.mktemp())
        os.makedirs(self.base)
        self.key = os.path.join(self.base, "key")
        with open(self.key, "w") as f:
            f.write("k")
        os.chmod(self.key, 0o600)
        self.data_dir = os.path.join(self.base, "data")
        self.socket = os.path.join(self.base, "s")
        self.root = self.base + "/"


class SwapAfterEachCheck:
    """
    Makes ``directory`` a real directory whenever the path policy checks a
    path (``resolve``/``resolve_entry``), and a symlink to ``target`` as soon
    as the check returns: every check passes, and only an operation that
    never follows a symlink after its check can stay out of ``target``.
    """

    def __init__(self, testcase: Any, policy: Any, directory: str, target: str) -> None:
        self.directory = directory
        self.aside = directory + "-aside"
        self.target = target
        self.checks = 0
        for name in ("resolve", "resolve_entry"):
            real = getattr(policy, name)
            setattr(policy, name, self._wrap(real))
            testcase.addCleanup(setattr, policy, name, real)
        testcase.addCleanup(self.restore)

    def _wrap(self, real: Any) -> Any:
        def checked_then_swapped(*args: Any, **kwargs: Any) -> Any:
            self.restore()
            try:
                return real(*args, **kwargs)
            finally:
                self.checks += 1
                self.swap()

        return checked_then_swapped

    def swap(self) -> None:
        if os.path.isdir(self.directory) and not os.path.islink(self.directory):
            os.rename(self.directory, self.aside)
            os.symlink(self.target, self.directory)

    def restore(self) -> None:
        if os.path.islink(self.directory):
            os.unlink(self.directory)
            os.rename(self.aside, self.directory)
