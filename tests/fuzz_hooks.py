"""
schemathesis hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

The fuzzed agent shares its Docker engine with other tests. Docker takes an
ID prefix wherever it takes a name, so a fuzzed container name such as
``a`` could stop or remove another test's container whose ID starts with
``a``. Every Docker object name the fuzzer sends is therefore prefixed with
``pa-fuzz-`` (never hex, so never an ID prefix), and image references with
``pa-fuzz/`` (an image that does not exist: nothing real is run, tagged or
scheduled). The rest of each value stays as hostile as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis

NAME_PREFIX = "pa-fuzz-"
IMAGE_PREFIX = "pa-fuzz/"

#: Operations whose ``{n}`` names a Docker object.
_DOCKER_NAMED = ("/containers/{n}/", "/networks/{n}")

#: (path, body fields holding Docker image references).
_IMAGE_FIELDS = {
    "/containers/run": ("image",),
    "/cron/run-docker": ("image",),
    "/images/tag": ("source_image", "target_image", "source", "target"),
}


def _path(ctx: Any) -> str:
    operation = getattr(ctx, "operation", None)
    return getattr(operation, "path", "") or ""


@schemathesis.hook
def map_path_parameters(ctx: Any, path_parameters: Any) -> Any:
    path = _path(ctx)
    if isinstance(path_parameters, dict) and any(path.startswith(p) for p in _DOCKER_NAMED):
        n = path_parameters.get("n")
        if isinstance(n, str):
            path_parameters["n"] = NAME_PREFIX + n
    return path_parameters


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    fields = _IMAGE_FIELDS.get(_path(ctx), ())
    if isinstance(body, dict):
        for field in fields:
            if isinstance(body.get(field), str):
                body[field] = IMAGE_PREFIX + body[field]
        if _path(ctx) == "/containers/run" and isinstance(body.get("name"), str):
            body["name"] = NAME_PREFIX + body["name"]
    return body
