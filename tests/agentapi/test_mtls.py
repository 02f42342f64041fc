"""
The agent API's TLS on loopback with certificates made here: mutual TLS
(``agent_api.tls_client_ca``), the key on top of the certificate or not,
and a reload that swaps the server's certificate for new connections
while an open one keeps working. The client is the standard library's
(``ssl`` + ``http.client``), run on a thread.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import shutil
import ssl
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import threads
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.trial import unittest

from plexagent.config import ConfigError
from plexagent.service import makeService
from plexagent.testing import docker as td
from plexagent.testing.ops import configure, start_agent


class Authority:
    """A CA that signs server and client certificates into ``directory``."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        self.subject = subject
        self.cert = self._build(subject, self.key.public_key(), ca=True)
        self.path = self._write(f"{name}-ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def _build(self, subject: x509.Name, public_key: Any, ca: bool = False, ip: str | None = None) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
        )
        if ip is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                            False)
        return builder.sign(self.key, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
        return path

    def issue(self, name: str, ip: str | None = None) -> tuple[str, str, bytes]:
        """(cert path, key path, certificate DER) signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), ip=ip)
        cert_path = self._write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        key_path = self._write(f"{name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return cert_path, key_path, cert.public_bytes(serialization.Encoding.DER)


class Client:
    """An HTTPS client trusting ``ca``, presenting ``cert`` if given; one connection, kept alive."""

    def __init__(self, port: int, ca: str, cert: tuple[str, str] | None = None) -> None:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(*cert)
        self.connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)

    def _request(self, path: str, key: str | None) -> tuple[int, bytes, bytes]:
        self.connection.request("GET", path, headers={"X-API-Key": key} if key else {})
        # Before the answer: a refused request's answer closes the connection.
        sock: Any = self.connection.sock
        server_cert = sock.getpeercert(binary_form=True)
        response = self.connection.getresponse()
        return response.status, response.read(), server_cert

    def get(self, path: str, key: str | None = None) -> Any:
        """Deferred (status, body, the server's certificate DER), on a thread."""
        return threads.deferToThread(self._request, path, key)

    def close(self) -> None:
        self.connection.close()


class MutualTLS(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pa-mtls-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ca = Authority(self.directory, "fleet")
        self.other = Authority(self.directory, "other")
        self.server_cert, self.server_key, self.server_der = self.ca.issue("server", ip="127.0.0.1")
        self.client_cert = self.ca.issue("client")[:2]

    def start(self, **agent_api: Any) -> td.RunningAgent:
        td.test_client(self)
        # The agent's own copy of the CA, which a test may replace.
        self.client_ca = os.path.join(self.directory, "client-ca.pem")
        shutil.copy(self.ca.path, self.client_ca)
        extra = {"agent_api": {"tls_client_ca": self.client_ca, **agent_api}}
        return start_agent(self, extra=extra, tls_cert=self.server_cert, tls_key=self.server_key)

    def client(self, agent: td.RunningAgent, cert: tuple[str, str] | None) -> Client:
        client = Client(agent.port, self.ca.path, cert)
        self.addCleanup(client.close)
        return client

    async def test_a_client_without_a_certificate_is_refused_in_the_handshake(self) -> None:
        agent = self.start()
        with self.assertRaises(OSError):
            await self.client(agent, None).get("/ping")

    async def test_a_certificate_from_another_ca_is_refused(self) -> None:
        agent = self.start()
        with self.assertRaises(OSError):
            await self.client(agent, self.other.issue("stranger")[:2]).get("/ping")

    async def test_a_good_certificate_without_the_key_is_401(self) -> None:
        agent = self.start()
        status, body, _ = await self.client(agent, self.client_cert).get("/cron/jobs")
        self.assertEqual((status, body), (401, b'{"error":"unauthorized"}'))

    async def test_a_good_certificate_with_the_key_is_served(self) -> None:
        agent = self.start()
        status, _, _ = await self.client(agent, self.client_cert).get("/cron/jobs", key=agent.api_key)
        self.assertEqual(status, 200)

    async def test_ping_needs_the_certificate_but_no_key(self) -> None:
        agent = self.start()
        status, _, _ = await self.client(agent, self.client_cert).get("/ping")
        self.assertEqual(status, 200)

    async def test_without_require_api_key_with_client_cert_the_certificate_is_enough(self) -> None:
        agent = self.start(require_api_key_with_client_cert=False)
        status, _, _ = await self.client(agent, self.client_cert).get("/cron/jobs")
        self.assertEqual(status, 200)
        # A wrong key is not a reason to refuse a client the certificate let in.
        status, _, _ = await self.client(agent, self.client_cert).get("/cron/jobs", key="wrong")
        self.assertEqual(status, 200)

    async def test_the_allowlist_still_applies_to_a_certificate_that_suffices(self) -> None:
        agent = self.start(require_api_key_with_client_cert=False, allowed_ips=["10.9.9.9/32"])
        status, body, _ = await self.client(agent, self.client_cert).get("/cron/jobs")
        self.assertEqual((status, body), (403, b'{"error":"IP not in allowlist"}'))

    async def test_reload_serves_the_new_certificate_to_new_connections_while_an_old_one_keeps_working(self) -> None:
        agent = self.start()
        old = self.client(agent, self.client_cert)
        status, _, seen = await old.get("/ping")
        self.assertEqual((status, seen), (200, self.server_der))
        renewed_cert, renewed_key, renewed_der = self.ca.issue("server-renewed", ip="127.0.0.1")
        shutil.copy(renewed_cert, self.server_cert)
        shutil.copy(renewed_key, self.server_key)
        outcome = await agent.top.agent.reloader.reload()
        self.assertEqual(outcome["failed"], {})
        self.assertIn("agent_api.tls_cert", outcome["reloaded"])
        status, _, seen = await old.get("/cron/jobs", key=agent.api_key)
        self.assertEqual((status, seen), (200, self.server_der))  # the same connection, still open
        status, _, seen = await self.client(agent, self.client_cert).get("/ping")
        self.assertEqual((status, seen), (200, renewed_der))

    async def test_a_new_certificate_that_does_not_match_its_key_keeps_the_pair_in_use(self) -> None:
        agent = self.start()
        shutil.copy(self.ca.issue("mismatched", ip="127.0.0.1")[0], self.server_cert)
        outcome = await agent.top.agent.reloader.reload()
        self.assertEqual(outcome["failed"], {
            "agent_api.tls_cert": f"agent_api.tls_key: {self.server_key} is not the private key of the certificate "
                                  f"in {self.server_cert}"})
        status, _, seen = await self.client(agent, self.client_cert).get("/ping")
        self.assertEqual((status, seen), (200, self.server_der))

    async def test_a_reloaded_client_ca_applies_to_new_connections(self) -> None:
        agent = self.start()
        shutil.copy(self.other.path, self.client_ca)
        await agent.top.agent.reloader.reload()
        with self.assertRaises(OSError):
            await self.client(agent, self.client_cert).get("/ping")
        status, _, _ = await self.client(agent, self.other.issue("newcomer")[:2]).get("/ping")
        self.assertEqual(status, 200)


class TLSStartup(unittest.TestCase):
    """What startup (and check-config) say of TLS files, before anything binds."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pa-tls-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ca = Authority(self.directory, "fleet")
        self.cert, self.key, _ = self.ca.issue("server", ip="127.0.0.1")

    def make(self, **agent_api: Any) -> Any:
        config = td.agent_config(self.directory, "unix:///nonexistent.sock", "k" * 64, tls_cert=self.cert,
                                 tls_key=self.key)
        return makeService(configure(config, {"agent_api": agent_api}), MemoryReactor())

    def test_a_key_that_is_not_the_certificate_s_stops_startup_naming_both(self) -> None:
        other_key = self.ca.issue("other")[1]
        e = self.assertRaises(ConfigError, self.make, tls_key=other_key)
        self.assertEqual(str(e), f"agent_api.tls_key: {other_key} is not the private key of the certificate in "
                                 f"{self.cert}")

    def test_an_unreadable_client_ca_stops_startup_naming_it(self) -> None:
        e = self.assertRaises(ConfigError, self.make, tls_client_ca=self.directory + "/missing.pem")
        self.assertEqual(str(e), f"agent_api.tls_client_ca: cannot read {self.directory}/missing.pem: "
                                 "No such file or directory")

    def test_a_file_without_a_certificate_stops_startup(self) -> None:
        e = self.assertRaises(ConfigError, self.make, tls_cert=self.key)
        self.assertEqual(str(e), f"agent_api.tls_cert: {self.key} holds no PEM certificate")

    def test_a_private_key_never_appears_in_an_error(self) -> None:
        with open(self.key) as f:
            key_text = f.read()
        e = self.assertRaises(ConfigError, self.make, tls_key=self.cert)
        self.assertNotIn(key_text.splitlines()[1], str(e))
        self.assertEqual(str(e), f"agent_api.tls_key: {self.cert} holds no PEM private key that can be read")

    def test_the_listener_is_tls_on_the_configured_address(self) -> None:
        memory = MemoryReactorClock()
        config = td.agent_config(self.directory, "unix:///nonexistent.sock", "k" * 64, listen="[::1]:9443",
                                 tls_cert=self.cert, tls_key=self.key)
        makeService(config, memory).getServiceNamed("agent_api.listen").startService()
        self.assertEqual([(port, interface) for port, _, _, _, interface in memory.sslServers], [(9443, "::1")])
