"""
The ``plexagent`` command: operator helpers beside the daemon.

``plexagent version``; ``plexagent check-config --config PATH`` (what
startup would say, without starting: each bind is tried and released);
``plexagent state [metadata|data|
secrets] [KEY]`` and ``plexagent report list|get|put|delete`` through the
Local Node API socket; ``plexagent status`` (the control-plane link, from
the socket's ``/plexagent/status``); ``plexagent deregister`` (the node
leaves its control plane) and ``plexagent simulator`` (a local control
plane for development).

Each helper is a subcommand: add one with a ``_register_*`` function that
adds its parser and sets ``func``.

``plexagent reload [--socket PATH | --pid PID]`` has the agent re-read its
key files and TLS certificate: as root through the socket (``POST
/plexagent/reload``, which answers what was re-read), or by SIGHUP.

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


def _version(args: argparse.Namespace, stdin: Any, stdout: Any, stderr: Any) -> int:
    from plexagent import __version__

    print(f"plexagent {__version__}", file=stdout)
    return 0


def _register_version(commands: Any) -> None:
    commands.add_parser("version", help="print the version").set_defaults(func=_version)


def check_config(path: str | None, environ: Any) -> str:
    """
    Everything startup checks: the file, every key, the key files, and
    the listeners (each bind is tried and released at once). Returns a
    one-line verdict; raises ConfigError with startup's own message, or
    StartupError with the line startup would print.
    """
    from twisted.internet.testing import MemoryReactor

    from plexagent.config import ConfigError, load_config
    from plexagent.http.listeners import check_listeners
    from plexagent.service import makeService

    config = load_config(path, environ)
    memory = MemoryReactor()
    try:
        top = makeService(config, memory)
    except ConfigError as e:
        # Sockets systemd passes exist only in the service itself.
        if "no such socket was passed by systemd" not in str(e):
            raise
        return "configuration OK (socket-activated listeners not checked)"
    check_listeners(top, memory)
    return "configuration OK"


def _check_config(args: argparse.Namespace, stdin: Any, stdout: Any, stderr: Any) -> int:
    import os

    from plexagent.config import ConfigError
    from plexagent.http.listeners import StartupError

    try:
        print(check_config(args.config, os.environ), file=stdout)
    except ConfigError as e:
        print(f"plexagent: configuration error: {e}", file=stderr)
        return 2
    except StartupError as e:
        print(e.code, file=stderr)
        return 2
    return 0


def _register_check_config(commands: Any) -> None:
    parser = commands.add_parser("check-config", help="check a configuration file as startup would, without starting")
    parser.add_argument("--config", metavar="PATH", help="the TOML file (default: built-in defaults)")
    parser.set_defaults(func=_check_config)


def _socket_request(path: str, method: str, url: str, body: bytes | None = None,
                    headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(path)

    conn = UnixConnection("localhost", timeout=60)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _print_response(status: int, body: bytes, stdout: Any, stderr: Any) -> int:
    import json

    if not body:
        return 0 if status < 400 else 1
    from plexagent import errors, strictparse

    try:
        text = json.dumps(strictparse.parse_json(body), indent=2, ensure_ascii=False)
    except errors.InvalidInput:
        text = body.decode("utf-8", "replace")
    print(text, file=stdout if status < 400 else stderr)
    return 0 if status < 400 else 1


def _call_socket(args: argparse.Namespace, stderr: Any, method: str, url: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, bytes] | None:
    try:
        return _socket_request(args.socket, method, url, body, headers)
    except OSError as e:
        print(f"plexagent: cannot reach the agent at {args.socket}: {e.strerror or e}", file=stderr)
        return None


def _quote(key: str) -> str:
    from urllib.parse import quote

    return quote(key, safe="")


def _state(args: argparse.Namespace, stdin: Any, stdout: Any, stderr: Any) -> int:
    url = "/v1/state"
    if args.section:
        url += f"/{args.section}"
        if args.key:
            url += f"/{_quote(args.key)}"
    result = _call_socket(args, stderr, "GET", url)
    return 1 if result is None else _print_response(*result, stdout, stderr)


def _report(args: argparse.Namespace, stdin: Any, stdout: Any, stderr: Any) -> int:
    import json

    if args.action == "list":
        result = _call_socket(args, stderr, "GET", "/v1/state/report")
    else:
        if not args.key:
            print(f"plexagent report {args.action}: a KEY is required", file=stderr)
            return 2
        url = f"/v1/state/report/{_quote(args.key)}"
        headers = {} if args.if_match is None else {"If-Match": str(args.if_match)}
        if args.action == "get":
            result = _call_socket(args, stderr, "GET", url)
        elif args.action == "delete":
            result = _call_socket(args, stderr, "DELETE", url, headers=headers)
        else:
            raw = args.payload if args.payload is not None else stdin.read()
            from plexagent import errors, strictparse

            try:
                payload = strictparse.parse_json(raw)
            except errors.InvalidInput as e:
                print(f"plexagent report put: the payload is not valid JSON: {e.details}", file=stderr)
                return 2
            body = json.dumps({"content_type": args.content_type, "payload": payload}).encode("utf-8")
            headers["Content-Type"] = "application/json"
            result = _call_socket(args, stderr, "PUT", url, body, headers)
    return 1 if result is None else _print_response(*result, stdout, stderr)


def _age(when: str | None, now: float) -> str:
    if not when:
        return "never"
    import datetime

    try:
        seconds = now - datetime.datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return when
    return f"{when} ({max(0, round(seconds))} s ago)"


def format_status(doc: dict[str, Any], now: float) -> str:
    """The status document as aligned lines for a terminal."""
    cp = doc.get("control_plane", {})
    identity = doc.get("identity", {})
    lines = [("agent", f"plexagent {doc.get('agent_version', '?')}")]
    if not cp.get("configured"):
        lines.append(("control plane", "none (standalone)"))
        return "\n".join(f"{name + ':':<15} {value}" for name, value in lines)
    lines.append(("control plane", f"{cp.get('url')} (protocol {cp.get('protocol')})"))
    node = identity.get("node_id") or "-"
    state = identity.get("state")
    lines.append(("node", f"{node} ({state}" + (f", {identity.get('source')}" if identity.get("source") else "") + ")"))
    if identity.get("error"):
        lines.append(("problem", identity["error"]))
    keys = doc.get("signing_keys", {})
    key_line = keys.get("current") or "none yet"
    if keys.get("previous"):
        key_line += f", previous {keys['previous']} until {keys.get('previous_until')}"
    key_line += f" ({keys.get('rotations', 0)} rotations)"
    lines.append(("signing key", key_line))
    state_doc = doc.get("state", {})
    lines.append(("last fetch", f"{_age(state_doc.get('last_fetch'), now)}, {state_doc.get('fetch_failures', 0)} failures"))
    events = doc.get("events", {})
    dropped = ", ".join(f"{reason} {n}" for reason, n in events.get("dropped", {}).items()) or "none"
    lines.append(("events", f"{events.get('stream')}, last {_age(events.get('last_event'), now)}, "
                            f"{events.get('applied', 0)} applied, dropped: {dropped}"))
    heartbeat = doc.get("heartbeat", {})
    lines.append(("heartbeat", f"last success {_age(heartbeat.get('last_success'), now)}, "
                               f"{heartbeat.get('failures', 0)} failures"))
    if doc.get("auth_failures"):
        lines.append(("auth refused", ", ".join(f"{call} {n}" for call, n in doc["auth_failures"].items())))
    reports = doc.get("reports", {})
    pending = reports.get("pending")
    lines.append(("reports", f"{'-' if pending is None else pending} pending, {reports.get('refused', 0)} refused"))
    return "\n".join(f"{name + ':':<15} {value}" for name, value in lines)


def _status(args: argparse.Namespace, stdin: Any, stdout: Any, stderr: Any) -> int:
    import json
    import time

    from plexagent import errors, strictparse

    result = _call_socket(args, stderr, "GET", "/plexagent/status")
    if result is None:
        return 1
    status, body = result
    try:
        doc = strictparse.parse_json(body)
    except errors.InvalidInput:
        doc = None
    if status != 200 or not isinstance(doc, dict):
        print(f"plexagent status: the agent at {args.socket} answered {status}: "
              f"{body.decode('utf-8', 'replace')[:200]}", file=stderr)
        return 1
    print(json.dumps(doc, indent=2) if args.json else format_status(doc, time.time()), file=stdout)
    return 0


def _deregister(args: argparse.Namespace, stdin: Any, stdout: Any, stderr: Any) -> int:
    import os

    from plexagent.config import ConfigError, load_config
    from plexagent.controlplane.deregistration import DeregisterError, deregister

    try:
        config = load_config(args.config, os.environ)
    except ConfigError as e:
        print(f"plexagent: configuration error: {e}", file=stderr)
        return 2
    from twisted.internet import defer, reactor

    outcome: list[Any] = []

    async def run() -> None:
        try:
            outcome.append((0, await deregister(config, reactor, purge=args.purge, without_request=args.forget)))
        except DeregisterError as e:
            outcome.append((e.status, f"plexagent deregister: {e}"))
        except ConfigError as e:
            outcome.append((2, f"plexagent: configuration error: {e}"))
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()))
    reactor.run()
    status, message = outcome[0]
    print(message, file=stdout if status == 0 else stderr)
    return int(status)


def _register_deregister(commands: Any) -> None:
    parser = commands.add_parser(
        "deregister", help="tell the control plane this node leaves, then forget its identity",
        description="With the agent stopped: tell the control plane the node leaves (with the node's own "
        "credentials), then remove identity.json and signing-keys.json from node.data_dir. Nothing is removed "
        "when the control plane does not take it.")
    parser.add_argument("--config", metavar="PATH", help="the agent's TOML file")
    parser.add_argument("--purge", action="store_true",
                        help="also remove the node's cached state and report outbox (state.json, outbox.json, "
                        "outbox-refused.jsonl, reports/)")
    parser.add_argument("--forget", action="store_true",
                        help="remove the local identity without asking the control plane (it already forgot the node)")
    parser.set_defaults(func=_deregister)


def _register_simulator(commands: Any) -> None:
    # Listed for --help; main() hands every argument after the word to plexagent.testing.cli.
    commands.add_parser("simulator", help="run the bundled control-plane simulator as a local control plane "
                        "for development (plexagent simulator --help)")


def _register_status(commands: Any) -> None:
    parser = commands.add_parser(
        "status", help="show the control-plane protocol, node, signing key and sync status",
        description="Ask the running agent, through its Unix socket, which protocol, node id and signing key "
        "it uses and how its control-plane link is doing.")
    parser.add_argument("--socket", default="/var/run/plexd/api.sock", help="the agent's Unix socket")
    parser.add_argument("--json", action="store_true", help="print the status document as JSON")
    parser.set_defaults(func=_status)


def _register_socket_commands(commands: Any) -> None:
    state = commands.add_parser("state", help="read node state through the Local Node API socket")
    state.add_argument("section", nargs="?", choices=["metadata", "data", "secrets", "report"])
    state.add_argument("key", nargs="?")
    state.set_defaults(func=_state)
    report = commands.add_parser("report", help="list, read, write or delete report entries through the socket")
    report.add_argument("action", choices=["list", "get", "put", "delete"])
    report.add_argument("key", nargs="?")
    report.add_argument("--content-type", default="application/json")
    report.add_argument("--payload", help="the payload as JSON (default: read from standard input)")
    report.add_argument("--if-match", type=int, metavar="VERSION")
    report.set_defaults(func=_report)
    for parser in (state, report):
        parser.add_argument("--socket", default="/var/run/plexd/api.sock", help="the agent's Unix socket")


def _reload(args: argparse.Namespace, stdin: Any, stdout: Any, stderr: Any) -> int:
    import os
    import signal

    if args.pid is not None:
        try:
            os.kill(args.pid, signal.SIGHUP)
        except OSError as e:
            print(f"plexagent reload: cannot signal process {args.pid}: {e.strerror}", file=stderr)
            return 1
        print(f"sent SIGHUP to {args.pid}; the agent logs what it re-read", file=stdout)
        return 0
    result = _call_socket(args, stderr, "POST", "/plexagent/reload")
    if result is None:
        return 1
    status, body = result
    code = _print_response(status, body, stdout, stderr)
    if code == 0:
        from plexagent import strictparse

        # Something that could not be re-read (and kept its value in use) is a failure to script on.
        return 1 if strictparse.parse_json(body).get("failed") else 0
    return code


def _register_reload(commands: Any) -> None:
    parser = commands.add_parser(
        "reload", help="have the agent re-read its key files and TLS certificate (as SIGHUP does)",
        description="Through the socket (as root): POST /plexagent/reload, printing what was re-read and what "
        "could not be (which keeps its value in use; exit status 1). With --pid: send SIGHUP to that process.",
    )
    parser.add_argument("--socket", default="/var/run/plexd/api.sock", help="the agent's Unix socket")
    parser.add_argument("--pid", type=int, help="send SIGHUP to this process instead of using the socket")
    parser.set_defaults(func=_reload)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plexagent", description="plexagent operator helpers")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _register_version(commands)
    _register_check_config(commands)
    _register_derive_key(commands)
    _register_socket_commands(commands)
    _register_reload(commands)
    _register_status(commands)
    _register_deregister(commands)
    _register_simulator(commands)
    return parser


def main(argv: Sequence[str] | None = None, stdin: Any = None, stdout: Any = None, stderr: Any = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulator"]:
        # Every option after the word is the simulator's own (--help included).
        from plexagent.testing.cli import main as simulator_main

        return simulator_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args, stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
