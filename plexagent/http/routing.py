"""Serving more than one route tree on one listener, chosen by path prefix."""

from __future__ import annotations

from typing import Any

from twisted.web import resource
from twisted.web.iweb import IRequest


class PrefixRoutes(resource.Resource):
    """
    Hands a request to the first resource whose path prefix it has, else to
    ``default``. Each tree sees the whole path, as if it served alone.
    """

    isLeaf = True

    def __init__(self, routes: list[tuple[bytes, Any]], default: Any) -> None:
        super().__init__()
        self._routes = routes
        self._default = default

    def render(self, request: IRequest) -> Any:
        path = request.path or b""
        for prefix, tree in self._routes:
            if path.startswith(prefix):
                return tree.render(request)
        return self._default.render(request)
