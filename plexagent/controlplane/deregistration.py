"""
``plexagent deregister``: tell the control plane the node is leaving, then
forget the node's identity. Run with the agent stopped: a running agent
would go on using the identity.
"""

from __future__ import annotations

import os
import shutil
import socket
from typing import Any

from plexagent.config import Config, read_key_file
from plexagent.controlplane.identity import IdentityMismatch, IdentityStore
from plexagent.controlplane.keys import KeyRing

#: What --purge also removes: the node's state and report outbox, not the agent API's files.
PURGED = ("state.json", "outbox.json", "outbox-refused.jsonl", "reports")


class DeregisterError(Exception):
    """Deregistration cannot go on; ``status`` is the exit status, the message says what to do."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def agent_running(config: Config) -> bool:
    """Whether an agent answers on the configured socket (a socket systemd makes is not checked)."""
    path = config.node_api.socket
    if path.startswith("systemd:"):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def forget(config: Config, purge: bool) -> list[str]:
    """Remove the node's identity and signing keys (and with ``purge`` its state); returns what was removed."""
    data_dir = config.node.data_dir
    names = [IdentityStore.FILENAME, KeyRing.FILENAME] + (list(PURGED) if purge else [])
    removed = []
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        else:
            continue
        removed.append(name)
    return removed


async def deregister(config: Config, reactor: Any, *, purge: bool = False, without_request: bool = False) -> str:
    """
    Deregister the node of ``config``; the line to print on success.
    DeregisterError otherwise (nothing removed).
    """
    from plexagent.controlplane.client import Transport
    from plexagent.controlplane.protocol import ControlPlaneError, build_protocol

    cp = config.control_plane
    if not cp.url:
        raise DeregisterError("no control plane is configured (control_plane.url): nothing to deregister")
    if agent_running(config):
        raise DeregisterError(f"the agent is running (its socket {config.node_api.socket} answers): stop it first, "
                              "e.g. systemctl stop plexagent", status=2)
    transport = Transport(reactor, cp.url, cp.ca_file, cp.request_timeout, cp.connect_timeout)
    try:
        protocol = build_protocol(config, transport, reactor)
        if cp.token_file:
            identity = protocol.configured_identity(
                config, read_key_file("control_plane.token_file", cp.token_file),
                read_key_file("node.secret_key_file", config.node.secret_key_file))
        else:
            try:
                identity = IdentityStore(config.node.data_dir, protocol).load()
            except IdentityMismatch as e:
                raise DeregisterError(str(e)) from None
        if identity is None:
            raise DeregisterError("not enrolled: nothing to deregister")
        if not without_request:
            try:
                await protocol.enroller().deregister(identity)
            except ControlPlaneError as e:
                raise DeregisterError(f"the control plane did not take the deregistration ({e}); nothing removed; "
                                      "--forget removes the local identity without asking it") from None
        removed = forget(config, purge)
    finally:
        await transport.close()
    how = "forgotten locally" if without_request else "deregistered"
    return f"node {identity.node_id} {how}; removed {', '.join(removed) or 'nothing'} from {config.node.data_dir}"
