"""The published OpenAPI documents of both APIs, shipped with the package."""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

import yaml

_CONVERTER = re.compile(r"<(?:[a-z]+:)?([a-zA-Z_]+)>")
_IGNORED_METHODS = {"HEAD", "OPTIONS"}


@functools.lru_cache(maxsize=None)
def document(name: str) -> dict[str, Any]:
    """The parsed document ``name`` (``local-node-api`` or ``node-agent-api``)."""
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text("utf-8")
    return yaml.safe_load(text)


@functools.lru_cache(maxsize=None)
def document_json(name: str) -> bytes:
    return json.dumps(document(name), separators=(",", ":")).encode("utf-8")


def documented_routes(name: str) -> set[tuple[str, str]]:
    """(method, path template) for every operation the document lists."""
    routes = set()
    for path, item in document(name)["paths"].items():
        for method in item:
            if method in ("get", "put", "post", "delete", "patch"):
                routes.add((method.upper(), path))
    return routes


def served_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path template) for every route a Klein app serves."""
    routes = set()
    for rule in app.url_map.iter_rules():
        template = _CONVERTER.sub(r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in _IGNORED_METHODS:
                routes.add((method, template))
    return routes
