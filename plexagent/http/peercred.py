"""
Peer credentials of Unix-socket clients (SO_PEERCRED) and their groups.

Group membership is read from ``/proc/<pid>/status`` so that a process's
real supplementary groups count, not only its primary gid.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import attrs

_UCRED = struct.Struct("3i")


@attrs.frozen
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def process_groups(pid: int, uid: int, proc_root: str = "/proc") -> frozenset[int] | None:
    """
    The real and effective gids and supplementary groups of process ``pid``.

    None when the process is gone or its uid no longer matches ``uid`` (the
    pid was reused): the caller must then deny.
    """
    try:
        with open(f"{proc_root}/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return None
    groups: set[int] = set()
    uid_ok = False
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            uid_ok = int(line.split()[1]) == uid
        elif line.startswith(b"Gid:"):
            groups.update(int(g) for g in line.split()[1:3])
        elif line.startswith(b"Groups:"):
            groups.update(int(g) for g in line.split()[1:])
    return frozenset(groups) if uid_ok else None


def credentials_of(transport: Any) -> PeerCredentials | None:
    """SO_PEERCRED of a Twisted UNIX transport, cached on the transport."""
    cached = getattr(transport, "_plexagent_peer", None)
    if cached is not None:
        return cached
    sock = getattr(transport, "socket", None)
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = peer_credentials(sock)
    try:
        transport._plexagent_peer = creds
    except AttributeError:
        pass
    return creds
