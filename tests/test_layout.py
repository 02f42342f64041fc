"""
The house rules the folder tree stands for, checked on the code itself:

- domain packages (``node``, ``controlplane``, ``host``) import nothing
  from ``http`` or ``agentapi``; the only exception is the Local Node API's
  route module, ``node.routes``, which is a route module like those of
  ``agentapi``;
- ``http`` imports no domain package and nothing of ``agentapi``;
- no module grows far past about 500 lines;
- ruff (pyflakes, pycodestyle, import order, bugbear; ``ruff.toml``) finds
  nothing in the package, its tests, the benchmarks and the plugin.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "plexagent")

DOMAIN = ("plexagent.node", "plexagent.controlplane", "plexagent.host")
HTTP = ("plexagent.http",)
ROUTES = ("plexagent.agentapi",)
#: Modules inside a domain package that are routes (may use http).
ROUTE_MODULES = {"plexagent.node.routes"}
#: A module past this many lines has grown a second responsibility.
MAX_LINES = 600


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def imported_modules(source: str, module: str) -> set[str]:
    """Every plexagent module ``source`` imports, anywhere in it (functions too)."""
    found: set[str] = set()
    package = module if module.endswith("__init__") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            # ``from plexagent.http import site`` imports plexagent.http.site.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("plexagent")}


def violations(module: str, source: str) -> list[str]:
    """The imports of ``module`` that cross the house's lines the wrong way."""
    wrong = []
    for name in sorted(imported_modules(source, module)):
        if _within(module, DOMAIN) and module not in ROUTE_MODULES and _within(name, HTTP + ROUTES):
            wrong.append(f"{module} (domain) imports {name}")
        if _within(module, HTTP) and _within(name, DOMAIN + ROUTES):
            wrong.append(f"{module} (http) imports {name}")
    return wrong


def package_modules() -> dict[str, str]:
    """module name -> path, for every module of the package."""
    modules = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__") if name == "__init__.py" else dotted] = path
    return modules


class ImportDirectionTests(unittest.TestCase):
    def test_no_module_imports_across_the_lines_the_wrong_way(self) -> None:
        wrong = []
        for module, path in sorted(package_modules().items()):
            with open(path, encoding="utf-8") as f:
                wrong += violations(module, f.read())
        self.assertEqual(wrong, [])

    def test_a_domain_module_importing_http_is_caught(self) -> None:
        self.assertEqual(
            violations("plexagent.host.cron", "from plexagent.http import responses\n"),
            ["plexagent.host.cron (domain) imports plexagent.http",
             "plexagent.host.cron (domain) imports plexagent.http.responses"],
        )

    def test_an_import_inside_a_function_is_caught(self) -> None:
        source = "def f():\n    from plexagent.agentapi import files\n"
        self.assertIn("plexagent.node.state (domain) imports plexagent.agentapi.files",
                      violations("plexagent.node.state", source))

    def test_http_importing_a_domain_module_is_caught(self) -> None:
        self.assertEqual(violations("plexagent.http.site", "import plexagent.node.reports\n"),
                         ["plexagent.http.site (http) imports plexagent.node.reports"])

    def test_a_relative_import_is_resolved(self) -> None:
        self.assertEqual(violations("plexagent.controlplane.sync", "from ..http import site\n"),
                         ["plexagent.controlplane.sync (domain) imports plexagent.http",
                          "plexagent.controlplane.sync (domain) imports plexagent.http.site"])

    def test_the_node_routes_may_use_http(self) -> None:
        self.assertEqual(violations("plexagent.node.routes", "from plexagent.http import responses\n"), [])


class ModuleSizeTests(unittest.TestCase):
    def test_no_module_is_far_past_500_lines(self) -> None:
        long = []
        for module, path in sorted(package_modules().items()):
            with open(path, encoding="utf-8") as f:
                lines = sum(1 for _ in f)
            if lines > MAX_LINES:
                long.append(f"{module}: {lines} lines")
        self.assertEqual(long, [])


class LintTests(unittest.TestCase):
    timeout = 300

    async def test_ruff_finds_nothing(self) -> None:
        result = await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-m", "ruff", "check", "--no-cache", "plexagent", "tests", "bench", "twisted"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
