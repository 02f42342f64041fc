"""
The agent API's security layers on a real listener: the IP allowlist
(the TCP peer address; IPv4, IPv6, CIDR) answers 403 before the API key
is looked at; the key answers 401; /ping is public.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from plexagent.testing import docker as td


class SecurityLayers(unittest.TestCase):
    def setUp(self) -> None:
        self.docker = td.test_client(self)

    def agent(self, **kwargs: Any) -> td.AgentClient:
        return td.AgentClient(td.start_agent(self, **kwargs))

    async def _key(self) -> None:
        api = self.agent()
        status, err = await api.get("/containers", key=None)
        self.assertEqual((status, err), (401, {"error": "unauthorized"}))
        key = api.agent.api_key
        wrong = key[:-1] + ("0" if key[-1] != "0" else "1")
        status, err = await api.get("/containers", key=wrong)
        self.assertEqual((status, err), (401, {"error": "unauthorized"}))
        status, _ = await api.get("/containers")
        self.assertEqual(status, 200)
        status, doc = await api.get("/ping", key=None)
        self.assertEqual((status, doc["status"]), (200, "ok"))

    def test_every_route_but_ping_needs_the_api_key(self) -> Any:
        return defer.ensureDeferred(self._key())

    async def _all_routes_401(self) -> None:
        api = self.agent()
        for method, path in [
            ("GET", "/containers"), ("POST", "/containers/run"), ("POST", "/containers/x/start"),
            ("POST", "/containers/x/stop"), ("POST", "/containers/x/restart"), ("POST", "/containers/x/remove"),
            ("GET", "/containers/x/status"), ("GET", "/containers/x/health"), ("GET", "/containers/all/health"),
            ("GET", "/containers/x/logs"), ("GET", "/containers/x/inspect"), ("POST", "/containers/x/exec"),
            ("GET", "/images/list"), ("POST", "/images/pull"), ("POST", "/images/tag"), ("POST", "/images/load"),
            ("POST", "/images/cleanup"), ("POST", "/docker/build"), ("POST", "/docker/dockerfile"),
            ("POST", "/docker/login"), ("POST", "/docker/load"), ("POST", "/docker/load/stream"),
        ]:
            status, err = await api.call(method, path, key=None)
            self.assertEqual((status, err), (401, {"error": "unauthorized"}), path)

    def test_each_docker_route_refuses_a_request_without_the_key(self) -> Any:
        return defer.ensureDeferred(self._all_routes_401())

    async def _allow(self, listen: str, allowed: tuple[str, ...], expected: int) -> None:
        api = self.agent(listen=listen, allowed_ips=allowed)
        status, _ = await api.get("/ping", key=None)
        self.assertEqual(status, expected)
        status, doc = await api.get("/containers")
        self.assertEqual(status, expected)
        if expected == 403:
            self.assertEqual(doc, {"error": "IP not in allowlist"})
            # The allowlist comes first: even without a key it is 403.
            status, doc = await api.get("/containers", key=None)
            self.assertEqual((status, doc), (403, {"error": "IP not in allowlist"}))

    def test_ipv4_peer_in_the_allowlist_passes(self) -> Any:
        return defer.ensureDeferred(self._allow("127.0.0.1:0", ("10.120.0.5", "127.0.0.1"), 200))

    def test_ipv4_peer_in_an_allowed_cidr_passes(self) -> Any:
        return defer.ensureDeferred(self._allow("127.0.0.1:0", ("127.0.0.0/8",), 200))

    def test_ipv4_peer_outside_the_allowlist_is_403_even_for_ping(self) -> Any:
        return defer.ensureDeferred(self._allow("127.0.0.1:0", ("10.0.0.0/8", "::1"), 403))

    def test_ipv6_peer_in_the_allowlist_passes(self) -> Any:
        return defer.ensureDeferred(self._allow("[::1]:0", ("::1",), 200))

    def test_ipv6_peer_in_an_allowed_cidr_passes(self) -> Any:
        return defer.ensureDeferred(self._allow("[::1]:0", ("::/64", "fd00::/8", "::1/128"), 200))

    def test_ipv6_peer_outside_the_allowlist_is_403(self) -> Any:
        return defer.ensureDeferred(self._allow("[::1]:0", ("127.0.0.1", "fd00::/8"), 403))

    async def _forwarded(self) -> None:
        api = self.agent(allowed_ips=("10.120.0.5",))
        status, doc = await api.get(
            "/containers", headers={"X-Forwarded-For": "10.120.0.5", "X-Real-IP": "10.120.0.5"}
        )
        self.assertEqual((status, doc), (403, {"error": "IP not in allowlist"}))

    def test_forwarding_headers_do_not_bypass_the_allowlist(self) -> Any:
        return defer.ensureDeferred(self._forwarded())


def self_signed(directory: str) -> tuple[str, str, bytes]:
    """(cert path, key path, cert PEM) for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(pem)
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path, pem


class TransportSecurity(unittest.TestCase):
    async def _tls(self) -> None:
        td.test_client(self)
        directory = tempfile.mkdtemp(prefix="pa-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key, pem = self_signed(directory)
        agent = td.start_agent(self, tls_cert=cert, tls_key=key)
        self.assertTrue(agent.base.startswith("https://"))
        api = td.AgentClient(agent, trust_pem=pem)
        status, doc = await api.get("/ping", key=None)
        self.assertEqual((status, doc["status"]), (200, "ok"))
        status, _ = await api.get("/containers")
        self.assertEqual(status, 200)
        # Plain HTTP gets no answer from a TLS listener.
        plain = td.AgentClient(agent).http
        with self.assertRaises(Exception):  # noqa: B017 - any failure: there is no HTTP answer to read
            await plain.get(agent.base.replace("https://", "http://") + "/ping")

    def test_the_listener_speaks_tls_when_tls_cert_and_tls_key_are_set(self) -> Any:
        return defer.ensureDeferred(self._tls())


class _PeerRequest:
    """Just what the policy reads of a request: method, path, peer, headers."""

    def __init__(self, host: str, path: bytes = b"/containers", key: bytes | None = None) -> None:
        from twisted.internet.address import IPv4Address, IPv6Address

        self.method = b"GET"
        self.path = path
        self._peer = IPv6Address("TCP", host, 4242) if ":" in host else IPv4Address("TCP", host, 4242)
        self._key = key

    def getClientAddress(self) -> Any:
        return self._peer

    def getHeader(self, name: bytes) -> bytes | None:
        return self._key if name.lower() == b"x-api-key" else None


class VPCBypass(unittest.TestCase):
    """``require_auth_always = false`` lets RFC 1918 peers in without the key (the seed's VPC bypass)."""

    def policy(self, always: bool, allowed: tuple[str, ...] = ()) -> Any:
        from plexagent.http.auth import AgentAPIPolicy

        return AgentAPIPolicy(allowed, ("the-key",), require_auth_always=always)

    def test_off_by_default_private_peers_need_the_key(self) -> None:
        from plexagent import errors

        self.assertRaises(errors.Unauthorized, self.policy(True).authenticate, _PeerRequest("10.120.0.5"))

    def test_when_disabled_rfc1918_peers_skip_the_key(self) -> None:
        policy = self.policy(False)
        for host in ("10.120.0.5", "172.16.3.4", "192.168.1.1", "::ffff:10.0.0.1"):
            policy.authenticate(_PeerRequest(host))

    def test_when_disabled_public_peers_still_need_the_key(self) -> None:
        from plexagent import errors

        policy = self.policy(False)
        for host in ("8.8.8.8", "172.32.0.1", "2001:db8::1"):
            self.assertRaises(errors.Unauthorized, policy.authenticate, _PeerRequest(host))
        policy.authenticate(_PeerRequest("8.8.8.8", key=b"the-key"))

    def test_the_allowlist_still_comes_first(self) -> None:
        from plexagent import errors

        policy = self.policy(False, allowed=("10.120.0.5",))
        e = self.assertRaises(errors.Forbidden, policy.authenticate, _PeerRequest("10.120.0.6"))
        self.assertEqual(e.message, "IP not in allowlist")
