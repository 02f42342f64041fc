"""
Docker's errors as the project's error types: one mapping (``translate``,
``engine_error``) for every call, with Docker's own explanation in
``details`` and any credential scrubbed from it.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import docker
import docker.errors
import requests.exceptions
from twisted.logger import Logger

from plexagent import errors

log = Logger()


DOCKER_UNAVAILABLE = "docker unavailable"


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


#: Docker's refusals recognised by their text, whatever status the engine
#: gave them: engines answer many refusals of a container's parameters with
#: a 500 (they carry no error type), and a registry's answer comes back as a
#: 500 too. First match wins; Docker's own explanation goes in ``details``.
_REFUSALS: tuple[tuple[re.Pattern[str], type[errors.PlexError], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), kind, message)
    for pattern, kind, message in (
        (r"port is already allocated|address already in use", errors.Conflict, "a host port is already in use"),
        (r"unable to find (user|group)|no matching entries in (passwd|group) file", errors.InvalidInput,
         "docker refused the user"),
        (r"invalid mode|invalid volume specification|invalid mount config|not a shared (or slave )?mount"
         r"|duplicate mount point|error mounting|trying to mount", errors.InvalidInput, "docker refused the volumes"),
        (r"restart policy|maximum retry count", errors.InvalidInput, "docker refused the restart policy"),
        (r"healthcheck", errors.InvalidInput, "docker refused the health check"),
        (r"invalid port|port specification|invalid ip address|invalid host ?port", errors.InvalidInput,
         "docker refused the ports"),
        (r"working directory", errors.InvalidInput, "docker refused the working directory"),
        (r"invalid reference format", errors.InvalidInput, "invalid image reference"),
        (r"unauthorized|authentication required|no basic auth credentials|incorrect username or password",
         errors.Forbidden, "the registry refused the credentials"),
        (r"pull access denied|manifest unknown|repository does not exist|manifest for \S+ not found",
         errors.NotFound, "image not found"),
        (r"oci runtime (create )?failed|runc create failed|executable file not found", errors.InvalidInput,
         "docker could not start the container's process"),
    )
)


#: What a 404 is about, from Docker's explanation; else the caller's ``what``.
_SUBJECTS = tuple(
    (re.compile(pattern, re.IGNORECASE), subject)
    for pattern, subject in (
        (r"no such container", "container"),
        (r"no such image|pull access denied|manifest unknown|repository does not exist|reference does not exist",
         "image"),
        (r"no such network|network \S+ not found", "network"),
        (r"no such volume|volume \S+ not found", "volume"),
        (r"no such exec", "exec instance"),
    )
)


def translate(exc: BaseException, what: str = "container", secrets: Iterable[str] = ()) -> BaseException:
    """
    The project's error for a docker-py exception (or ``exc`` itself when it
    is not Docker's). ``what`` names the thing a 404 is about when Docker's
    message does not; any string in ``secrets`` is blanked out of the
    details.

    Docker's refusal of the request (a 4xx, or a 500 whose text is a known
    refusal: ``_REFUSALS``) is the client's: 400, 404 or 409 with Docker's
    explanation. Anything else from the engine is a 500; an unreachable
    daemon is a 503.
    """
    secrets = tuple(secrets)
    if isinstance(exc, errors.PlexError):
        return exc
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
        return errors.Unavailable(DOCKER_UNAVAILABLE, scrub(_first_line(exc), secrets))
    if isinstance(exc, docker.errors.APIError):
        status = 404 if isinstance(exc, docker.errors.NotFound) else exc.status_code or 500
        return engine_error(status, scrub(explain(exc), secrets), what)
    if isinstance(exc, docker.errors.DockerException):
        text = str(exc)
        # Creating the client fails this way when the daemon is unreachable.
        if "Error while fetching server API version" in text or "Connection" in text:
            return errors.Unavailable(DOCKER_UNAVAILABLE, scrub(_first_line(exc), secrets))
        return errors.InvalidInput("docker refused the parameters", scrub(text, secrets))
    return exc


def engine_error(status: int, explanation: str, what: str = "container") -> errors.PlexError:
    """The project's error for the Docker engine's answer ``status`` explained by ``explanation``."""
    if status == 404:
        subject = next((s for pattern, s in _SUBJECTS if pattern.search(explanation)), what)
        return errors.NotFound(f"{subject} not found", explanation)
    if status == 409:
        return errors.Conflict("conflict with the container's or image's current state", explanation)
    if 400 <= status < 500 or status == 500:
        for pattern, kind, message in _REFUSALS:
            if pattern.search(explanation):
                return kind(message, explanation)
    if status in (401, 403):
        return errors.Forbidden("docker refused the request", explanation)
    if 400 <= status < 500:
        return errors.InvalidInput("docker refused the parameters", explanation)
    return errors.UpstreamFailed("docker failed", explanation)


def explain(exc: Any) -> str:
    text = getattr(exc, "explanation", None)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text or exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:500]


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, errors.Unavailable)


def stream_error(kind: str, message: str) -> errors.PlexError:
    lowered = message.lower()
    if kind == "build":
        return errors.InvalidInput("the build failed", message)
    if any(word in lowered for word in ("unauthorized", "authentication required", "denied", "no basic auth")):
        return errors.Forbidden("the registry refused the credentials", message)
    if "not found" in lowered or "manifest unknown" in lowered:
        return errors.NotFound("image not found", message)
    return errors.UpstreamFailed("the pull failed", message)
