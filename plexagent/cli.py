"""
The ``plexagent`` command: operator helpers beside the daemon.

Each helper is a subcommand: add one with a ``_register_*`` function that
adds its parser and sets ``func``.

``plexagent derive-key [--token-file PATH]`` prints the Node Agent API key,
``hex(HMAC-SHA256(key=token, msg="node-agent:"))``, for a provisioning
token read from the file or from standard input.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import sys
from typing import Any, Sequence

#: The message the seed's deployer signs to make the agent API key.
API_KEY_MESSAGE = b"node-agent:"


def derive_api_key(token: str) -> str:
    """The agent API key for a provisioning token (surrounding whitespace ignored)."""
    return hmac.new(token.strip().encode("utf-8"), API_KEY_MESSAGE, hashlib.sha256).hexdigest()


def _derive_key(args: argparse.Namespace, stdin: Any, stdout: Any, stderr: Any) -> int:
    if args.token_file and args.token_file != "-":
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read()
        except OSError as e:
            print(f"plexagent derive-key: cannot read {args.token_file}: {e.strerror}", file=stderr)
            return 1
        except UnicodeDecodeError:
            print(f"plexagent derive-key: {args.token_file} is not UTF-8 text", file=stderr)
            return 1
    else:
        token = stdin.read()
    if not token.strip():
        print("plexagent derive-key: the token is empty", file=stderr)
        return 1
    print(derive_api_key(token), file=stdout)
    return 0


def _register_derive_key(commands: Any) -> None:
    parser = commands.add_parser(
        "derive-key",
        help="print the Node Agent API key (X-API-Key) for a provisioning token",
        description="Print hex(HMAC-SHA256(token, \"node-agent:\")), the key the agent API expects "
        "in X-API-Key. The token is read from --token-file or standard input, never from the command line.",
    )
    parser.add_argument("--token-file", metavar="PATH", help="file holding the token (default: standard input)")
    parser.set_defaults(func=_derive_key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plexagent", description="plexagent operator helpers")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _register_derive_key(commands)
    return parser


def main(argv: Sequence[str] | None = None, stdin: Any = None, stdout: Any = None, stderr: Any = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
