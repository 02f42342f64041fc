"""
Checks plexsphere control-plane exchanges against OpenAPI documents.

``ExchangeChecker`` validates one request and its answer, as a simulator or a
test saw them, against the project's own description of the plexsphere node
API (``plexagent/http/openapi/plexsphere-node-api.yaml``) and, when the
environment variable ``PLEXAGENT_PLEXSPHERE_OPENAPI`` names a file, against
that document too: the platform's own, read at run time and never kept in
the repository. The platform's enrolment schema still calls
``resource_handle`` by its older name ``resource_id``; the checker renames
that one member in memory.

Each violation is one line naming the document, the operation and what is
wrong. Besides what the documents say, three rules the schemas cannot state
are checked (and reported under the project's document, which states them in
prose): the bearer's form (``Bearer nsk_<env>_<64 base64url characters>`` on
every call but enrolment, no ``Authorization`` on enrolment), no
``Content-Encoding`` on a request, and a report value of at most 4096 bytes
in UTF-8.

A status a document does not declare is a violation of that document, unless
the checker was built with ``allow_undeclared`` naming the pair
``(operationId, status)``: the way a test allows a fault it injects on
purpose (a 503 answering a heartbeat, say). The answer's body is then not
checked against that document either.

openapi-core is imported only when a checker is built (it is a test
dependency). Loading and validating a document takes seconds for a large
one, so each is loaded once per process.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

#: The environment variable naming the platform's document.
PLATFORM_DOCUMENT_ENV = "PLEXAGENT_PLEXSPHERE_OPENAPI"
#: The node credential on every call but enrolment.
BEARER = re.compile(r"Bearer nsk_[^_]+_[A-Za-z0-9_-]{64}")
#: The largest report value, in UTF-8 bytes.
REPORT_VALUE_BYTES = 4096
ENROLMENT = "PostRegister"
REPORT_WRITE = "PutNodeStateReport"
#: Any host will do: the documents' server is ``/``.
_HOST = "http://control-plane.invalid"
#: Members whose values never appear in a message.
_SECRET_MEMBERS = frozenset({"bootstrap_token", "nsk", "nonce", "authorization", "Authorization"})
_METHODS = ("get", "put", "post", "delete", "patch")


def own_document() -> str:
    """The path of the project's plexsphere document."""
    return str(resources.files("plexagent.http.openapi").joinpath("plexsphere-node-api.yaml"))


class _StringDatesLoader(yaml.SafeLoader):
    """A YAML loader that leaves timestamps as strings (a document's examples stay JSON)."""


_StringDatesLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Operation:
    def __init__(self, method: str, template: str, item: dict[str, Any]) -> None:
        self.method = method.upper()
        self.id = str(item.get("operationId") or f"{self.method} {template}")
        self.pattern = re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)))
        self.statuses = {str(code).upper() for code in item.get("responses", {})}

    def declares(self, status: int) -> bool:
        return bool({str(status), f"{str(status)[0]}XX", "DEFAULT"} & self.statuses)


class _Document:
    """One loaded document: openapi-core's view of it and its operations."""

    def __init__(self, path: str) -> None:
        from openapi_core import Config, OpenAPI

        self.label = os.path.basename(path)
        with open(path, encoding="utf-8") as f:
            spec = yaml.load(f, Loader=_StringDatesLoader)
        self.operations: list[_Operation] = []
        for template, item in spec.get("paths", {}).items():
            for method in _METHODS:
                if method in item:
                    self.operations.append(_Operation(method, template, item[method]))
        _rename_enrolment_member(spec)
        self.spec = spec
        self._validators: dict[str, Any] = {}
        config = Config(extra_media_type_deserializers={
            # openapi-core only decodes application/json by itself: without these a
            # problem body would reach its schema as bytes, and binary or streamed
            # bodies would fail as "not a string". Latin-1 keeps one character per byte.
            "application/problem+json": lambda value, **_: json.loads(value),
            "application/octet-stream": lambda value, **_: value.decode("latin-1"),
            "text/event-stream": lambda value, **_: value.decode("utf-8", "replace"),
        })
        self.api = OpenAPI.from_dict(spec, config=config)

    def validator(self, name: str) -> Any:
        """A JSON Schema validator for the component schema ``name``."""
        if name not in self._validators:
            from openapi_schema_validator import OAS31Validator, oas31_format_checker

            # The components travel along so that the schema's references resolve.
            schema = dict(self.spec["components"]["schemas"][name], components=self.spec["components"])
            self._validators[name] = OAS31Validator(schema, format_checker=oas31_format_checker)
        return self._validators[name]

    def operation(self, method: str, path: str) -> _Operation | None:
        for op in self.operations:
            if op.method == method and op.pattern.fullmatch(path):
                return op
        return None


def _rename_enrolment_member(spec: dict[str, Any]) -> None:
    """Call the enrolment body's ``resource_id`` member ``resource_handle``, as the platform now does."""
    item = spec.get("paths", {}).get("/v1/register", {}).get("post", {})
    schema = item.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    properties = schema.get("properties", {})
    if "resource_id" in properties and "resource_handle" not in properties:
        properties["resource_handle"] = properties.pop("resource_id")
        schema["required"] = ["resource_handle" if r == "resource_id" else r for r in schema.get("required", [])]


_LOADED: dict[str, _Document] = {}
_LOADING = threading.Lock()


def _load(path: str) -> _Document:
    key = os.path.realpath(path)
    with _LOADING:
        if key not in _LOADED:
            _LOADED[key] = _Document(key)
        return _LOADED[key]


def _describe(error: BaseException) -> list[str]:
    """The readable lines of one openapi-core error, its schema errors spelled out."""
    nested = list(getattr(error, "errors", None) or getattr(error, "context", None) or ())
    if nested:  # a group: the parameters or the headers of one message
        return [line for inner in nested for line in _describe(inner)]
    head = type(error).__name__
    name = getattr(error, "name", None)
    if name:
        head += f" {name}"
    schema_errors = list(getattr(error.__cause__, "schema_errors", None) or getattr(error, "schema_errors", None) or ())
    if schema_errors:
        return [f"{head}: {_schema_error(e)}" for e in schema_errors]
    text = str(error).removeprefix(type(error).__name__ + ": ")
    return [text if name and str(name) in text else f"{head}: {text}"]


def _schema_error(error: Any) -> str:
    """One JSON Schema error; a long, binary or secret value is not repeated, only the rule it breaks."""
    path = [str(p) for p in getattr(error, "absolute_path", ())]
    where = "/" + "/".join(path)
    instance = getattr(error, "instance", None)
    unquotable = isinstance(instance, str) and (len(instance) > 64 or not instance.isprintable())
    if (path and path[-1] in _SECRET_MEMBERS) or unquotable:
        size = f" (a string of {len(instance)} characters)" if isinstance(instance, str) else ""
        return f"{where}: fails {error.validator} {error.validator_value!r}{size}"
    message = str(getattr(error, "message", error))
    if len(message) > 200:
        message = message[:200] + "…"
    return f"{where}: {message}"


class ExchangeChecker:
    """
    Validates plexsphere exchanges; see the module's description.

    ``documents`` are paths; without any, the project's document and the one
    ``PLEXAGENT_PLEXSPHERE_OPENAPI`` names (when set). ``allow_undeclared``
    holds ``(operationId, status)`` pairs a test answers on purpose although a
    document does not declare them.
    """

    def __init__(self, *documents: str, allow_undeclared: Iterable[tuple[str, int]] = ()) -> None:
        if not documents:
            documents = (own_document(),)
            platform = os.environ.get(PLATFORM_DOCUMENT_ENV)
            if platform:
                documents += (platform,)
        self.documents = [_load(path) for path in documents]
        self.allow_undeclared = set(allow_undeclared)
        self._own = _load(own_document())

    def __call__(self, endpoint: str, method: str, path_with_query: str, request_headers: dict[str, str],
                 request_body: bytes, status: int, response_headers: dict[str, str],
                 response_body: bytes) -> list[str]:
        """The violations of one exchange (header names in lower case); [] when it conforms."""
        from openapi_core.testing import MockRequest, MockResponse

        method = method.upper()
        parts = urlsplit(path_with_query)
        path = parts.path
        where = f"{method} {path} ({endpoint}) -> {status}"
        response_type = response_headers.get("content-type")
        if status == 200 and (response_type or "").startswith("text/event-stream"):
            # A stream is checked on its status, headers and type; its frames one by one (envelope()).
            response_body = b":\n"
        request = MockRequest(_HOST, method, path, args=dict(parse_qsl(parts.query, keep_blank_values=True)),
                              headers=request_headers, data=request_body or None,
                              content_type=request_headers.get("content-type", ""))
        response = MockResponse(response_body, status_code=status, headers=response_headers,
                                content_type=response_type or "")
        violations = []
        for document in self.documents:
            op = document.operation(method, path)
            if op is None:
                violations.append(f"{document.label}: {where}: no such operation")
                continue
            prefix = f"{document.label} {op.id}: {where}:"
            violations += [f"{prefix} request: {line}"
                           for error in document.api.unmarshal_request(request).errors
                           for line in _describe(error)]
            if not op.declares(status):
                if (op.id, status) not in self.allow_undeclared:
                    violations.append(f"{prefix} status {status} is not declared")
                continue
            violations += [f"{prefix} response: {line}"
                           for error in document.api.unmarshal_response(request, response).errors
                           for line in _describe(error)]
        violations += self._rules(method, path, where, request_headers, request_body)
        return violations

    def _rules(self, method: str, path: str, where: str, headers: dict[str, str], body: bytes) -> list[str]:
        """What the project's document states in prose: the bearer, no compression, the report size."""
        op = self._own.operation(method, path)
        operation = op.id if op is not None else "?"
        prefix = f"{self._own.label} {operation}: {where}: request:"
        found = []
        authorization = headers.get("authorization")
        if operation == ENROLMENT:
            if authorization is not None:
                found.append(f"{prefix} enrolment must not send Authorization")
        elif authorization is None:
            found.append(f"{prefix} Authorization is missing")
        elif not BEARER.fullmatch(authorization):
            found.append(f"{prefix} Authorization is not 'Bearer nsk_<env>_<64 base64url characters>'")
        if "content-encoding" in headers:
            found.append(f"{prefix} Content-Encoding {headers['content-encoding']!r}: bodies are sent uncompressed")
        if operation == REPORT_WRITE:
            try:
                value = json.loads(body).get("value")
            except (ValueError, AttributeError):
                value = None
            if isinstance(value, str) and len(value.encode("utf-8")) > REPORT_VALUE_BYTES:
                found.append(f"{prefix} value is {len(value.encode('utf-8'))} bytes in UTF-8, "
                             f"over {REPORT_VALUE_BYTES}")
        return found

    def envelope(self, data: bytes) -> list[str]:
        """The violations of one event's ``data:`` line (and of a ``signing_key_rotated`` payload)."""
        label = f"{self._own.label} Envelope:"
        try:
            envelope = json.loads(data)
        except ValueError as e:
            return [f"{label} not JSON ({e})"]
        found = [f"{label} {_schema_error(e)}" for e in self._schema_errors("Envelope", envelope)]
        if isinstance(envelope, dict) and envelope.get("type") == "signing_key_rotated":
            found += [f"{self._own.label} SigningKeyRotated: {_schema_error(e)}"
                      for e in self._schema_errors("SigningKeyRotated", envelope.get("payload"))]
        return found

    def _schema_errors(self, name: str, instance: Any) -> list[Any]:
        validator = self._own.validator(name)
        return sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
