"""
A self-contained demo: the bundled control-plane simulator serving the Local
Node API guide's example node, and an agent that enrolls with it using a
bootstrap token, with its socket and data under one directory. No root
needed.

    python -m plexagent.demo [--dir demo-run] [--http-port 9100]
"""

from __future__ import annotations

import argparse
import grp
import os
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from plexagent.http.listeners import StartupError, check_socket_path, probe_tcp
from plexagent.service import GracefulTermination, makeService
from plexagent.testing import ControlPlaneSimulator
from plexagent.testing.fixtures import dump_toml, write_secret_file


def demo_document(directory: str, sim: ControlPlaneSimulator, http_port: int) -> dict:
    group = grp.getgrgid(os.getgid()).gr_name
    return {
        "node": {"data_dir": os.path.join(directory, "data")},
        # The node enrolls with a bootstrap token, as a real one does.
        "control_plane": {"url": sim.url, "bootstrap_token_file": os.path.join(directory, "bootstrap-token")},
        "node_api": {
            "socket": os.path.join(directory, "api.sock"),
            "socket_group": group,
            # So that you, not only root, may read the example secrets.
            "secrets_group": group,
            "http_enabled": True,
            "http_listen": f"127.0.0.1:{http_port}",
            "http_token_file": os.path.join(directory, "api-token"),
        },
        "agent_api": {"enabled": False},
    }


def instructions(directory: str, http_port: int) -> str:
    sock = os.path.join(directory, "api.sock")
    token = os.path.join(directory, "api-token")
    c = f"curl -s --unix-socket {sock}"
    return f"""
plexagent demo is running.
  socket:  {sock}
  TCP:     http://127.0.0.1:{http_port} (bearer token in {token})
  config:  {os.path.join(directory, "plexagent.toml")}

Try the guide's examples:
  {c} http://localhost/v1/state
  {c} http://localhost/v1/state/metadata
  {c} http://localhost/v1/state/metadata/region
  {c} http://localhost/v1/state/data
  {c} http://localhost/v1/state/data/routes.json
  {c} http://localhost/v1/state/secrets
  {c} http://localhost/v1/state/secrets/db%2Fpassword
  {c} -X PUT -H "Content-Type: application/json" http://localhost/v1/state/report/health \\
      -d '{{"content_type": "application/json", "payload": {{"status": "healthy", "uptime_s": 86400}}}}'
  {c} -X PUT -H "Content-Type: application/json" -H "If-Match: 1" http://localhost/v1/state/report/health \\
      -d '{{"content_type": "application/json", "payload": {{"status": "degraded", "uptime_s": 90000}}}}'
  {c} http://localhost/v1/state/report/health
  {c} http://localhost/v1/state/report
  {c} -X DELETE http://localhost/v1/state/report/health
  curl -s -H "Authorization: Bearer $(cat {token})" http://127.0.0.1:{http_port}/v1/state

Stop with Ctrl-C.
"""


def taken(directory: str, http_port: int) -> str | None:
    """
    One line saying which of the demo's socket and port is held by another
    process (another demo?), or None. Changes nothing.
    """
    try:
        check_socket_path(os.path.join(directory, "api.sock"))
        probe_tcp("node_api.http_listen", "127.0.0.1", http_port)
    except StartupError as e:
        return f"{e.code} (another demo running? choose another --dir or --http-port)"
    return None


async def start(directory: str, http_port: int) -> None:
    os.makedirs(directory, exist_ok=True)
    sim = ControlPlaneSimulator.example()
    await sim.start(reactor)
    # The simulator is new at every run: an identity an earlier run enrolled
    # with means nothing to it. The demo owns its directory.
    for name in ("identity.json", "signing-keys.json"):
        try:
            os.unlink(os.path.join(directory, "data", name))
        except FileNotFoundError:
            pass
    write_secret_file(os.path.join(directory, "bootstrap-token"), sim.bootstrap_token)
    token_path = os.path.join(directory, "api-token")
    if not os.path.exists(token_path):
        write_secret_file(token_path, os.urandom(24).hex())
    document = demo_document(directory, sim, http_port)
    config_path = os.path.join(directory, "plexagent.toml")
    with open(config_path, "w") as f:
        f.write(dump_toml(document))
    from plexagent.config import load_config

    top = makeService(load_config(config_path, {}), reactor)
    GracefulTermination(reactor).setServiceParent(top)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    print(instructions(directory, http_port), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the demo until Ctrl-C or SIGTERM; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="demo-run", help="where the socket, config and data go")
    parser.add_argument("--http-port", type=int, default=9100, help="port of the bearer-token TCP listener")
    parser.add_argument("--log", action="store_true", help="print the agent's log")
    args = parser.parse_args(argv)
    directory = os.path.abspath(args.dir)
    # Before writing a byte: a demo already running keeps its config and keys.
    problem = taken(directory, args.http_port)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    if args.log:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    status = [0]

    def failed(f: Any) -> None:
        status[0] = 1
        value = f.value
        print(value.code if isinstance(value, SystemExit) else f"plexagent demo: {value}", file=sys.stderr)
        # start() may fail before the reactor runs (its binds are synchronous).
        reactor.callWhenRunning(reactor.stop)

    d = defer.ensureDeferred(start(directory, args.http_port))
    d.addErrback(failed)
    reactor.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
