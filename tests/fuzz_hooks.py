"""
schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

The fuzzed agent shares its Docker engine with other tests. Docker takes an
ID prefix wherever it takes a name, so a fuzzed container name such as
``a`` could stop or remove another test's container whose ID starts with
``a``. Every Docker object name the fuzzer sends is therefore prefixed with
``pa-fuzz-`` (never hex, so never an ID prefix), and image references with
``<test registry>/pa-fuzz/`` (an image that does not exist, in a registry
that refuses anonymous pulls: nothing real is pulled, run, tagged or
scheduled, and a missing image's pull is a quick 403, not a wait on the
internet). The rest of each value stays as hostile as generated.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

NAME_PREFIX = "pa-fuzz-"
IMAGE_PREFIX = "pa-fuzz/"

# So that the fuzz reaches past "not found" and "path not allowed", about
# half of the generated names and paths are made real: container names
# become the test's running container (``PLEXAGENT_FUZZ_TARGET``), service names
# the allowed services, and paths are put under the sandboxed allowed root
# (still hostile: ``..``, ``//``, control characters, long names). Which
# half depends on the value only, so that shrinking stays deterministic.
TARGET = "target"
SERVICES = ("nginx", "docker", "node-agent")
PATH_FIELDS = ("path", "target_path", "context_path", "extract_path")


def _real(value: str) -> bool:
    return len(value) % 2 == 0


def _inside(value: str) -> str:
    root = os.environ.get("PLEXAGENT_FUZZ_ROOT")
    return f"{root}/{value}" if root and _real(value) else value

#: Operations whose ``{n}`` names a Docker object.
_DOCKER_NAMED = ("/containers/{n}/", "/networks/{n}")

#: (path, body fields holding Docker image references).
_IMAGE_FIELDS = {
    "/containers/run": ("image",),
    "/cron/run-docker": ("image",),
    "/images/tag": ("source_image", "target_image", "source", "target"),
    "/images/pull": ("image",),
    "/containers/{n}/replace": ("image",),
}

#: Operations that talk to a registry: always the test's own
#: (``PLEXAGENT_FUZZ_REGISTRY``, on loopback, with a password nobody
#: generates), never one on the internet.
_REGISTRY_PATHS = ("/images/pull", "/docker/login")


def _bound_path_parameters(path: str, path_parameters: Any) -> None:
    n = path_parameters.get("n") if isinstance(path_parameters, dict) else None
    if not isinstance(n, str):
        return
    if any(path.startswith(p) for p in _DOCKER_NAMED):
        target = os.environ.get("PLEXAGENT_FUZZ_TARGET", NAME_PREFIX + TARGET)
        path_parameters["n"] = target if _real(n) else NAME_PREFIX + n
    elif path.startswith("/services/{n}/") and _real(n):
        path_parameters["n"] = SERVICES[len(n) % len(SERVICES)]


def _bound_query(query: Any) -> None:
    if isinstance(query, dict):
        for field in PATH_FIELDS:
            if isinstance(query.get(field), str):
                query[field] = _inside(query[field])


def _bound_body(path: str, body: Any) -> None:
    if not isinstance(body, dict):
        return
    for field in PATH_FIELDS:
        if isinstance(body.get(field), str):
            body[field] = _inside(body[field])
    registry = os.environ.get("PLEXAGENT_FUZZ_REGISTRY", "")
    prefix = f"{registry}/{IMAGE_PREFIX}" if registry else IMAGE_PREFIX
    for field in _IMAGE_FIELDS.get(path, ()):
        if isinstance(body.get(field), str):
            body[field] = prefix + body[field]
    if path in _REGISTRY_PATHS and registry:
        body["registry"] = registry
    if path == "/containers/run" and isinstance(body.get("name"), str):
        body["name"] = NAME_PREFIX + body["name"]


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: Any) -> None:
    # Here rather than in map_* hooks: every phase's cases (coverage
    # included) pass through before_call.
    path = case.operation.path
    _bound_path_parameters(path, case.path_parameters)
    _bound_query(case.query)
    _bound_body(path, case.body)
