"""
The agent API's TLS: server options loaded from PEM files (certificate
with its chain, private key, and optionally a CA whose certificates
clients must present), and a connection creator whose options can be
swapped while the listener runs, so that a reload serves the new
certificate to new connections while those already open keep theirs.
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import endpoints, ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from plexagent.config import ConfigError

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})")


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def _certificates(key: str, path: str, pem: bytes) -> list[Any]:
    blocks = _PEM_CERTIFICATE.findall(pem)
    if not blocks:
        raise ConfigError(f"{key}: {path} holds no PEM certificate")
    try:
        return [ssl.Certificate.loadPEM(block).original for block in blocks]
    except Exception:  # noqa: BLE001 - pyOpenSSL's errors say little; the key and path say where
        raise ConfigError(f"{key}: {path} holds a certificate that cannot be parsed") from None


def server_options(cert: str, key: str, client_ca: str = "") -> ssl.CertificateOptions:
    """
    TLS server options from PEM files: ``cert`` holds the certificate,
    then any intermediate certificates of its chain; ``key`` its private
    key; ``client_ca`` (optional) the CA certificates a client's
    certificate must be signed by (without one the handshake fails).

    Reads the files (blocking: small files). Raises ConfigError naming the
    key and path, never a file's content.
    """
    chain = _certificates("agent_api.tls_cert", cert, _read("agent_api.tls_cert", cert))
    key_pem = _read("agent_api.tls_key", key)
    try:
        private_key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except Exception:  # noqa: BLE001 - never repeat the key's text
        raise ConfigError(f"agent_api.tls_key: {key} holds no PEM private key that can be read") from None
    kwargs: dict[str, Any] = {}
    if client_ca:
        authorities = _certificates("agent_api.tls_client_ca", client_ca, _read("agent_api.tls_client_ca", client_ca))
        kwargs["trustRoot"] = ssl.trustRootFromCertificates([ssl.Certificate(c) for c in authorities])
    options = ssl.CertificateOptions(privateKey=private_key, certificate=chain[0], extraCertChain=chain[1:], **kwargs)
    try:
        options.getContext()  # builds it now: a key that does not match the certificate fails here
    except SSL.Error:
        raise ConfigError(f"agent_api.tls_key: {key} is not the private key of the certificate in {cert}") from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class SwappableServerTLS:
    """
    Makes each new TLS connection from the current options; ``swap``
    replaces them for connections accepted afterwards (connections already
    open keep theirs: nothing is dropped).
    """

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def swap(self, options: ssl.CertificateOptions) -> None:
        self.options = options

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return self.options.serverConnectionForTLS(protocol)


def tls_server_endpoint(reactor: Any, listen: str, creator: SwappableServerTLS) -> Any:
    """A TLS listener on ``listen`` (``HOST:PORT`` or ``[v6]:PORT``) making connections with ``creator``."""
    m = _HOST_PORT.fullmatch(listen)
    if m is None:
        raise ConfigError("agent_api.listen: with tls_cert and tls_key, listen must be HOST:PORT")
    interface = m.group("v6") if m.group("v6") is not None else m.group("host")
    return endpoints.SSL4ServerEndpoint(reactor, int(m.group("port")), creator, interface=interface or "")
