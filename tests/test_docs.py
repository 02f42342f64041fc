"""
The project's documents stand alone: every configuration key is described
in docs/configuration.md, and no document links a file the repository
does not have.
"""

from __future__ import annotations

import glob
import os
import re

from twisted.trial import unittest

from tests.test_config import REPOSITORY, accepted_keys

#: a markdown link or image: [text](target) / ![alt](target)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def documents() -> list[str]:
    return [os.path.join(REPOSITORY, "README.md"), *sorted(glob.glob(os.path.join(REPOSITORY, "docs", "*.md")))]


class ConfigurationDocumentTests(unittest.TestCase):
    def test_every_key_is_described(self) -> None:
        with open(os.path.join(REPOSITORY, "docs", "configuration.md"), encoding="utf-8") as f:
            text = f.read()
        missing = [f"{s}.{k}" for s, k, _ in accepted_keys() if f"`{s}.{k}`" not in text]
        self.assertEqual(missing, [])

    def test_every_environment_override_is_described(self) -> None:
        with open(os.path.join(REPOSITORY, "docs", "configuration.md"), encoding="utf-8") as f:
            text = f.read()
        for variable in ("NODE_AGENT_ALLOWED_IPS", "NODE_AGENT_REQUIRE_AUTH_ALWAYS", "DOCKER_HOST", "PLEXD_BOOTSTRAP_TOKEN"):
            self.assertIn(f"`{variable}`", text)


class LinkTests(unittest.TestCase):
    def test_relative_links_name_files_in_the_repository(self) -> None:
        broken = []
        for path in documents():
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for target in LINK.findall(text):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue  # a URL or an anchor in the same document
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#", 1)[0]))
                inside = resolved == REPOSITORY or resolved.startswith(REPOSITORY + os.sep)
                if not inside or not os.path.exists(resolved):
                    broken.append(f"{os.path.relpath(path, REPOSITORY)}: {target}")
        self.assertEqual(broken, [])

    def test_no_document_cites_texts_outside_the_repository(self) -> None:
        outside = re.compile(r"\bspec/[\w-]+\.md|\.\./shared\b|\bshared/design\.md")
        cited = []
        for path in documents() + [os.path.join(REPOSITORY, "etc", "plexagent.toml")]:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if outside.search(line):
                        cited.append(f"{os.path.relpath(path, REPOSITORY)}:{number}: {line.strip()}")
        self.assertEqual(cited, [])
