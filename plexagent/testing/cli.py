"""
``plexagent simulator`` (also ``python -m plexagent.testing``): the
control-plane simulator as a local control plane for development. It
prints its URL and a bootstrap token (with ``--protocol plexsphere`` also
the project id, the resource handle and the configuration lines to paste),
and runs until Ctrl-C or SIGTERM. Test credentials only: it speaks plain
HTTP.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence


def build_parser(prog: str = "plexagent simulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="plexd", choices=["plexd", "plexsphere"],
                        help="the wire protocol to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8787, help="port to listen on (0: any free port)")
    parser.add_argument("--tokens", type=int, default=1, metavar="N", help="bootstrap tokens to issue (one node each)")
    parser.add_argument("--token-file", metavar="PATH", help="also write the tokens there, one a line (mode 0600)")
    parser.add_argument("--example-node", action="store_true",
                        help="also print the pre-registered example node's id and node secret key")
    parser.add_argument("--script", choices=["interop"],
                        help="interop: on each node's event streams, the sequence plexagent.testing.interop describes")
    parser.add_argument("--publish-every", type=float, metavar="SECONDS",
                        help="change the example state and publish it this often")
    return parser


def banner(sim: Any, args: argparse.Namespace) -> str:
    from plexagent.controlplane.keys import SigningKey

    key = SigningKey.parse(sim.public_key_b64)
    lines = [
        f"plexagent control-plane simulator (protocol {sim.protocol})",
        f"  url:              {sim.url}",
        *(f"  bootstrap token:  {token}" for token in sim.bootstrap_tokens),
        f"  signing key:      {sim.public_key_b64} ({key.fingerprint if key else '?'})",
    ]
    if sim.protocol == "plexsphere":
        lines += [f"  signing key id:   {sim.signing_key_id}",
                  f"  project id:       {sim.project_id}",
                  f"  resource handle:  {sim.resource_handle}"]
    if args.example_node:
        lines += [f"  example node:     {sim.example_node.node_id}",
                  f"  its secret key:   {sim.example_node.nsk_text}"]
    if args.script:
        lines.append(f"  script:           {args.script}")
    lines.append("Put the token in /etc/plexd/bootstrap-token (or PLEXD_BOOTSTRAP_TOKEN) and set control_plane.url.")
    if sim.protocol == "plexsphere":
        lines += ["In the configuration file:", "  [control_plane]", '  protocol = "plexsphere"',
                  f'  url = "{sim.url}"', f'  project_id = "{sim.project_id}"',
                  f'  resource_handle = "{sim.resource_handle}"']
    return "\n".join(lines)


def summary(sim: Any) -> str:
    """What the simulator received, printed when it stops."""
    if sim.protocol == "plexsphere":
        return (f"simulator summary: {len(sim.registrations)} registrations, {len(sim.heartbeats)} heartbeats, "
                f"{len(sim.report_calls)} report calls, {len(sim.key_rotations)} key rotations, "
                f"{len(sim.stream_requests)} event streams (Last-Event-ID: {sim.stream_requests}), "
                f"violations: {sim.violations or 'none'}")
    return (f"simulator summary: {len(sim.registrations)} registrations, {len(sim.heartbeats)} heartbeats, "
            f"{len(sim.report_posts)} report posts, {len(sim.drift_reports)} drift reports, "
            f"{len(sim.stream_requests)} event streams (Last-Event-ID: {sim.stream_requests}), "
            f"{len(sim.deregistrations)} deregistrations, violations: {sim.violations or 'none'}")


def write_tokens(path: str, tokens: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(token + "\n" for token in tokens))


def main(argv: Sequence[str] | None = None, prog: str = "plexagent simulator") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.tokens < 0 or (args.publish_every is not None and args.publish_every <= 0):
        print(f"{prog}: --tokens must not be negative and --publish-every must be greater than 0", file=sys.stderr)
        return 2
    if args.script == "interop" and args.protocol != "plexd":
        print(f"{prog}: --script interop is plexd's interop sequence: use it with --protocol plexd", file=sys.stderr)
        return 2
    from twisted.internet import defer, reactor, task

    from plexagent.testing.simulator import ControlPlaneSimulator

    sim = ControlPlaneSimulator.example(protocol=args.protocol, tokens=args.tokens)
    if args.script == "interop":
        from plexagent.testing.interop import InteropScript

        InteropScript(sim)
    status = [0]

    async def start() -> None:
        try:
            await sim.start(reactor, port=args.port, host=args.host)
        except Exception as e:  # a port in use, an address not here
            print(f"{prog}: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
            status[0] = 1
            reactor.stop()
            return
        if args.token_file:
            write_tokens(args.token_file, sim.bootstrap_tokens)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {args.host} without TLS, with test credentials", file=sys.stderr)
        print(banner(sim, args), flush=True)
        if args.publish_every:
            counter = iter(range(1, 1 << 62))

            def publish() -> None:
                n = next(counter)
                sim.set_data("counter", {"n": n}, n)
                sim.push_state()

            task.LoopingCall(publish).start(args.publish_every, now=False)
        reactor.addSystemEventTrigger("before", "shutdown", lambda: print(summary(sim), flush=True))
        reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(sim.stop()))

    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()))
    reactor.run()
    return status[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
