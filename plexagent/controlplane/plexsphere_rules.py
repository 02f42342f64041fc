"""
What the Local Node API accepts under the plexsphere protocol
(docs/control-plane-plexsphere.md, "The Local Node API"): what the
platform cannot carry is refused at the socket, before anything is stored
or sent, with the same answers plexd gives.

- Report keys must match ``^[a-z][a-z0-9._-]{0,127}$`` (400 ``invalid
  report key``); a report's value, the payload as compact JSON, is at most
  4096 bytes (400 ``payload exceeds the 4096-byte limit``).
- Secrets are read by name (``^[a-z][a-z0-9_-]{0,62}$``, 400 ``invalid
  secret key``), optionally at ``?version=N`` (400 ``invalid version``);
  there is no index to consult first. After the platform answers 429 with
  ``Retry-After: N``, no secret is fetched for N seconds: local reads get
  429 ``rate limited`` with the seconds left.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from twisted.internet.interfaces import IReactorTime

from plexagent import errors
from plexagent.controlplane.protocol import ControlPlaneError, ErrorKind, SecretQuery, SecretValue

REPORT_KEY = re.compile(r"[a-z][a-z0-9._-]{0,127}")
SECRET_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
#: The largest report value the platform takes, in bytes.
MAX_REPORT_VALUE = 4096
#: A version or count as plexsphere writes it: a positive integer in decimal.
POSITIVE_INTEGER = re.compile(r"[1-9][0-9]{0,17}")


def compact_value(payload: Any) -> str:
    """A report's payload as the value sent: compact JSON, non-ASCII kept."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class PlexsphereLocalRules:
    """The socket's rules under plexsphere; holds the secret rate-limit pause."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: no secret fetch before this time (clock seconds)
        self.secrets_paused_until = 0.0

    def check_report_key(self, key: str) -> None:
        if not REPORT_KEY.fullmatch(key):
            raise errors.InvalidInput("invalid report key")

    def check_report_put(self, key: str, payload: Any) -> None:
        try:
            size = len(compact_value(payload).encode("utf-8"))
        except (ValueError, UnicodeEncodeError):
            return  # not JSON the store takes either: it answers for it
        if size > MAX_REPORT_VALUE:
            raise errors.InvalidInput(f"payload exceeds the {MAX_REPORT_VALUE}-byte limit")

    def report_key_syncable(self, key: str) -> bool:
        return REPORT_KEY.fullmatch(key) is not None

    def secret_query(self, key: str, version: bytes | None, index: Mapping[str, int]) -> SecretQuery:
        number = None
        if version is not None:
            text = version.decode("ascii", "replace")
            if not POSITIVE_INTEGER.fullmatch(text):
                raise errors.InvalidInput("invalid version")
            number = int(text)
        if not SECRET_KEY.fullmatch(key):
            raise errors.InvalidInput("invalid secret key")
        left = self.secrets_paused_until - self.clock.seconds()
        if left > 0:
            raise errors.RateLimited("rate limited", retry_after=math.ceil(left))
        return SecretQuery(key, number)

    def secret_error(self, error: ControlPlaneError) -> errors.PlexError:
        if error.kind is ErrorKind.NOT_FOUND:
            return errors.NotFound("not found")
        if error.status == 403:
            return errors.Forbidden("forbidden")
        if error.kind is ErrorKind.RATE_LIMITED:
            seconds = math.ceil(error.retry_after) if error.retry_after else None
            if seconds:
                self.secrets_paused_until = max(self.secrets_paused_until, self.clock.seconds() + seconds)
            return errors.RateLimited("rate limited", retry_after=seconds)
        return errors.Unavailable("control plane unavailable")

    def secret_document(self, value: SecretValue, index: Mapping[str, int]) -> dict[str, Any]:
        return {"key": value.key, "value": value.plaintext.decode("utf-8", "replace"), "version": value.version}
