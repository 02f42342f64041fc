"""
Secret reads on the Unix socket, decided by the real peer credentials of
real processes running as users and groups this test creates.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from plexagent.http.peercred import process_groups
from plexagent.service import makeService
from plexagent.testing import ControlPlaneSimulator
from plexagent.testing.fixtures import AgentSandbox

SOCKET_GROUP = "pa-test-sock"
SECRETS_GROUP = "pa-test-secrets"
OTHER_GROUP = "pa-test-other"
USERS = {
    # user: (primary group, supplementary groups)
    "pa-test-plain": (SOCKET_GROUP, []),
    "pa-test-reader": (OTHER_GROUP, [SOCKET_GROUP, SECRETS_GROUP]),
    "pa-test-outsider": (OTHER_GROUP, []),
}

CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-ERROR", e.errno); sys.exit(0)
s.sendall(("GET " + sys.argv[2] + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print(head.split(b" ")[1].decode(), body.decode())
"""


# The test's own interpreter may live where other users cannot run it.
CLIENT_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", name], check=True)
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, primary: str, extra: list[str]) -> int:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "-g", primary, name], check=True)
    subprocess.run(["usermod", "-g", primary, "-G", ",".join(extra), name], check=True)
    return pwd.getpwnam(name).pw_uid


class PeerCredentialTests(unittest.TestCase):
    async def setUp(self) -> None:
        if os.geteuid() != 0:
            self.fail("peer-credential tests create users and groups: run them as root")
        for group in (SOCKET_GROUP, SECRETS_GROUP, OTHER_GROUP):
            ensure_group(group)
        for user, (primary, extra) in USERS.items():
            ensure_user(user, primary, extra)
        self.sim = ControlPlaneSimulator.example()
        await self.sim.start(reactor)
        self.addCleanup(lambda: defer.ensureDeferred(self.sim.stop()))
        self.sandbox = AgentSandbox(control_plane=self.sim)
        self.addCleanup(self.sandbox.cleanup)
        self.sandbox.document["node_api"].update({"socket_group": SOCKET_GROUP, "secrets_group": SECRETS_GROUP})
        self.service = makeService(self.sandbox.config(), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        while "db/password" not in self.service.agent.cache.current.secret_refs:
            from twisted.internet import task

            await task.deferLater(reactor, 0.01, lambda: None)

    def request_as(self, user: str, path: str) -> defer.Deferred[str]:
        entry = pwd.getpwnam(user)
        groups = [grp.getgrnam(g).gr_gid for g in USERS[user][1]]

        def run() -> str:
            result = subprocess.run(
                [CLIENT_PYTHON, "-c", CLIENT, self.sandbox.socket, path],
                user=entry.pw_uid,
                group=entry.pw_gid,
                extra_groups=groups,
                capture_output=True,
                timeout=30,
                env={"PATH": "/usr/bin:/bin"},
            )
            return result.stdout.decode().strip() + result.stderr.decode().strip()

        return threads.deferToThread(run)

    def test_socket_is_group_owned_by_the_socket_group(self) -> None:
        self.assertEqual(os.stat(self.sandbox.socket).st_gid, grp.getgrnam(SOCKET_GROUP).gr_gid)

    async def test_socket_group_member_reads_state(self) -> None:
        out = await self.request_as("pa-test-plain", "/v1/state/metadata/role")
        self.assertEqual(out, '200 {"key":"role","value":"gateway"}')

    async def test_socket_group_member_without_secrets_group_is_403(self) -> None:
        out = await self.request_as("pa-test-plain", "/v1/state/secrets/db%2Fpassword")
        self.assertEqual(out, '403 {"error":"forbidden: insufficient privileges for secret access"}')
        self.assertNotIn("s3cret", out)

    async def test_supplementary_secrets_group_member_reads_secret(self) -> None:
        # The reader's primary group is neither the socket's nor the
        # secrets group: only its supplementary groups grant access.
        out = await self.request_as("pa-test-reader", "/v1/state/secrets/db%2Fpassword")
        self.assertEqual(out, '200 {"key":"db/password","value":"s3cret-p@ssw0rd","version":2}')

    async def test_user_outside_the_socket_group_cannot_connect(self) -> None:
        out = await self.request_as("pa-test-outsider", "/v1/state")
        self.assertTrue(out.startswith("CONNECT-ERROR 13"), out)

    async def test_secret_index_needs_no_secrets_group(self) -> None:
        out = await self.request_as("pa-test-plain", "/v1/state/secrets")
        self.assertTrue(out.startswith("200 ["), out)


class ProcessGroupsTests(unittest.TestCase):
    def write_status(self, text: str) -> str:
        root = self.mktemp()
        os.makedirs(os.path.join(root, "42"))
        with open(os.path.join(root, "42", "status"), "w") as f:
            f.write(text)
        return root

    def test_reads_real_effective_and_supplementary_groups(self) -> None:
        root = self.write_status("Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t101\t101\t101\nGroups:\t5 6 7 \n")
        self.assertEqual(process_groups(42, 1000, root), frozenset({100, 101, 5, 6, 7}))

    def test_a_reused_pid_with_another_uid_is_denied(self) -> None:
        root = self.write_status("Uid:\t2000\t2000\t2000\t2000\nGid:\t100\t100\t100\t100\nGroups:\t5\n")
        self.assertIsNone(process_groups(42, 1000, root))

    def test_a_vanished_process_is_denied(self) -> None:
        self.assertIsNone(process_groups(42, 1000, self.mktemp()))
