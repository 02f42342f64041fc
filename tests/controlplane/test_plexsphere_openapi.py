"""
The project's description of the plexsphere node API
(plexagent/http/openapi/plexsphere-node-api.yaml) is a sound OpenAPI 3.1
document, and ``plexagent.testing.openapi_check`` holds exchanges to it: the
exchanges the agent and the simulator are meant to make pass, and each
typical mistake is reported, naming the document and the operation.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from typing import Any
from unittest import mock

import yaml
from openapi_spec_validator import validate
from twisted.trial import unittest

from plexagent.http.openapi import document
from plexagent.testing.openapi_check import PLATFORM_DOCUMENT_ENV, ExchangeChecker, own_document

NODE = "0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0a3"
#: The bearer of node NODE with an NSK of 32 × 0x2a.
BEARER = "Bearer nsk_plexd_AZCouKDAegqKCqCgoKCgoyoqKioqKioqKioqKioqKioqKioqKioqKioqKioqKioq"
KEY = base64.b64encode(bytes(range(1, 33))).decode()
WHEN = "2026-06-26T10:00:00Z"
JSON = "application/json"
PROBLEM = "application/problem+json"
#: The worked example's event line (signed with RFC 8032's first test key).
EVENT = (b'{"id":"0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0f1","type":"node_state_updated",'
         b'"scope":"node:0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0a3","key_id":"did:web:plexsphere.com#key-2026-04",'
         b'"issued_at":"2026-05-27T10:00:00Z","payload":{"revision":42,"node_id":"0190a8b8-a0c0-7a0a-8a0a-a0a0a0a0a0a3"},'
         b'"signature":"Bmmn5mT07F5IIuXmy6vxi9ykQ3+/aUmBT5aluof/L4ciaIgJ17s0h98MWuDLOjRfq++BrIrHgkAGCjmXVgfsCQ=="}')

ENROLMENT = {"project_id": "7d0c3f7e-52b4-4f7e-9a49-2b7a3c8d9e10", "resource_handle": "edge-router-01",
             "bootstrap_token": "psb_test_token", "nonce": "f3f8c0b8-7a0a-4a0a-a0a0-a0a0a0a0a0a0",
             "public_key": KEY}
HEARTBEAT = {"client_now": WHEN, "binary_checksum": base64.b64encode(bytes(32)).decode(),
             "binary_version": "plexagent/1.2.3", "nat_summary": {}}
ENTRIES = {"metadata": [{"key": "region", "value": "eu"}], "data": [{"key": "cfg/app", "value": '{"a":1}'}],
           "reports": []}
SNAPSHOT = {"peers": [{"node_id": NODE, "mesh_ip": "100.64.0.2", "public_key": KEY}],
            "reachability": {"state": "healthy", "changed_at": WHEN}, "policy": None, "bridge": None,
            "state": ENTRIES, "reports": ENTRIES}
SECRET_HEADERS = {"content-type": "application/octet-stream", "x-plexsphere-secret-version": "3",
                  "x-plexsphere-secret-kid": "nsk-1", "cache-control": "no-store"}
STREAM_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache",
                  "x-plexsphere-api-version": "v1"}
STATE = f"/v1/nodes/{NODE}/state"
HEARTBEAT_PATH = f"/v1/nodes/{NODE}/heartbeat"
SECRET = f"/v1/nodes/{NODE}/secrets/db-password"
REPORT = f"/v1/nodes/{NODE}/state/reports/status.mesh"
EVENTS = f"/v1/nodes/{NODE}/events"


def problem(status: int, code: str, **extra: Any) -> dict[str, Any]:
    return {"type": f"https://errors.invalid/{code}", "title": code, "status": status, "detail": "test",
            "instance": "/", "code": code, **extra}


def exchange(endpoint: str, method: str, path: str, body: Any = None, status: int = 200, answer: Any = None,
             *, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None,
             bearer: str | None = BEARER) -> dict[str, Any]:
    """The arguments of one checker call; JSON bodies given as values, others as bytes."""
    request_headers = {"user-agent": "plexagent/1.2.3"}
    if bearer is not None:
        request_headers["authorization"] = bearer
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        request_headers["content-type"] = JSON
    request_headers.update(headers or {})
    answer_headers = {}
    if answer is not None and not isinstance(answer, bytes):
        answer_headers["content-type"] = PROBLEM if status >= 400 else JSON
        answer = json.dumps(answer).encode("utf-8")
    answer_headers.update(response_headers or {})
    return {"endpoint": endpoint, "method": method, "path_with_query": path, "request_headers": request_headers,
            "request_body": body or b"", "status": status, "response_headers": answer_headers,
            "response_body": answer or b""}


def valid_exchanges() -> dict[str, dict[str, Any]]:
    """One or more well-formed exchanges for each operation."""
    return {
        "PostRegister 200": exchange(
            "register", "POST", "/v1/register", ENROLMENT, 200,
            {"node_id": NODE, "mesh_ip": "100.64.0.1", "signing_public_key": KEY, "signing_key_id": "key-1",
             "nsk": KEY, "peer_snapshot": [], "domain_mesh_cidr": "100.64.0.0/10"}, bearer=None),
        "PostRegister 403": exchange("register", "POST", "/v1/register", ENROLMENT, 403,
                                     problem(403, "token_consumed"), bearer=None),
        "PostRegister 503": exchange("register", "POST", "/v1/register", ENROLMENT, 503,
                                     problem(503, "pool_exhausted"), bearer=None),
        "GetNodeState 200": exchange("state", "GET", STATE, None, 200, SNAPSHOT),
        "GetNodeState 200 state null": exchange("state", "GET", STATE, None, 200,
                                                dict(SNAPSHOT, state=None, reports=None)),
        "GetNodeState 200 unknown members": exchange("state", "GET", STATE, None, 200,
                                                     dict(SNAPSHOT, executions=[], sessions=[])),
        "GetNodeState 501": exchange("state", "GET", STATE, None, 501,
                                     problem(501, "signed_event_bus_not_provisioned")),
        "PostNodeHeartbeat 200": exchange("heartbeat", "POST", HEARTBEAT_PATH, HEARTBEAT, 200,
                                          {"accepted_at": WHEN, "reconcile": True, "rotate_keys": False}),
        "PostNodeHeartbeat 400": exchange("heartbeat", "POST", HEARTBEAT_PATH, HEARTBEAT, 400,
                                          problem(400, "clock_skew")),
        "PostNodeHeartbeat 403": exchange("heartbeat", "POST", HEARTBEAT_PATH, HEARTBEAT, 403,
                                          problem(403, "node_id_mismatch", reason="insufficient_relation",
                                                  correlation_id="c-1")),
        "FetchNodeSecret 200": exchange("secret", "GET", SECRET + "?version=3", None, 200,
                                        os.urandom(12 + 10 + 16), response_headers=SECRET_HEADERS),
        "FetchNodeSecret 429": exchange("secret", "GET", SECRET, None, 429, problem(429, "per_node_rate_limited"),
                                        response_headers={"retry-after": "5"}),
        "FetchNodeSecret 404": exchange("secret", "GET", SECRET, None, 404, problem(404, "secret_not_found")),
        "PutNodeStateReport 200": exchange("report", "PUT", REPORT, {"value": '{"ok":true}'}, 200,
                                           {"accepted_at": WHEN, "key": "status.mesh"}),
        "PutNodeStateReport 400": exchange("report", "PUT", REPORT, {"value": "1"}, 400,
                                           problem(400, "invalid_report")),
        "DeleteNodeStateReport 204": exchange("report", "DELETE", REPORT, None, 204),
        "DeleteNodeStateReport 404": exchange("report", "DELETE", REPORT, None, 404,
                                              problem(404, "report_not_found")),
        "PostKeysRotate 200": exchange("keys", "POST", "/v1/keys/rotate", {"new_public_key": KEY}, 200,
                                       {"rotation_id": NODE, "kid": "psk-1", "wrap_key_version": 2}),
        "PostKeysRotate 409": exchange("keys", "POST", "/v1/keys/rotate", {"new_public_key": KEY}, 409,
                                       problem(409, "keys_rotate_no_pending_rotation")),
        "GetNodeEvents 200": exchange("events", "GET", EVENTS, None, 200, b"id: 7\nevent: node_state_updated\n",
                                      headers={"accept": "text/event-stream", "cache-control": "no-cache",
                                               "last-event-id": "41"},
                                      response_headers=STREAM_HEADERS),
        "GetNodeEvents 501": exchange("events", "GET", EVENTS, None, 501,
                                      problem(501, "signed_event_bus_not_provisioned"),
                                      headers={"accept": "text/event-stream"}),
    }


def changed(name: str, **changes: Any) -> dict[str, Any]:
    """The valid exchange ``name`` with some arguments replaced."""
    return dict(valid_exchanges()[name], **changes)


class DocumentTests(unittest.TestCase):
    def test_document_is_valid_openapi_3_1(self) -> None:
        doc = document("plexsphere-node-api")
        self.assertEqual(doc["openapi"], "3.1.0")
        validate(doc)

    def test_it_describes_the_eight_node_calls(self) -> None:
        ids = {op["operationId"] for item in document("plexsphere-node-api")["paths"].values()
               for method, op in item.items() if method != "parameters"}
        self.assertEqual(ids, {"PostRegister", "GetNodeState", "PostNodeHeartbeat", "FetchNodeSecret",
                               "PutNodeStateReport", "DeleteNodeStateReport", "PostKeysRotate", "GetNodeEvents"})

    def test_only_enrolment_goes_without_the_node_bearer(self) -> None:
        doc = document("plexsphere-node-api")
        self.assertEqual(doc["security"], [{"nodeKey": []}])
        unauthenticated = [op["operationId"] for item in doc["paths"].values()
                           for method, op in item.items() if method != "parameters" and "security" in op]
        self.assertEqual(unauthenticated, ["PostRegister"])
        self.assertEqual(doc["paths"]["/v1/register"]["post"]["security"], [])

    def test_enrolment_member_is_resource_handle_and_no_member_is_resource_id(self) -> None:
        names: set[str] = set()

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                names.update(node.get("properties", {}))
                names.update(node.get("required", []) if isinstance(node.get("required"), list) else [])
                for value in node.values():
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(document("plexsphere-node-api"))
        self.assertIn("resource_handle", names)
        self.assertNotIn("resource_id", names)

    def test_licence_is_the_projects_own(self) -> None:
        licence = document("plexsphere-node-api")["info"]["license"]
        self.assertIn("plexagent", licence["name"])
        self.assertNotIn("BUSL", json.dumps(licence))


class ExchangeCheckerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.check = ExchangeChecker(own_document())

    def violations(self, call: dict[str, Any]) -> list[str]:
        return self.check(**call)

    def assertViolation(self, call: dict[str, Any], operation: str, *fragments: str) -> None:
        found = self.violations(call)
        matching = [v for v in found if all(f in v for f in fragments)]
        self.assertTrue(matching, f"no violation containing {fragments!r} among {found!r}")
        for line in matching:
            self.assertIn("plexsphere-node-api.yaml", line)
            self.assertIn(operation, line)

    def test_valid_exchange_of_every_operation_passes(self) -> None:
        failures = {name: found for name, call in valid_exchanges().items() if (found := self.violations(call))}
        self.assertEqual(failures, {})
        covered = {name.split()[0] for name in valid_exchanges()}
        self.assertEqual(len(covered), 8)

    def test_heartbeat_with_an_extra_member_is_reported(self) -> None:
        call = changed("PostNodeHeartbeat 200", request_body=json.dumps(dict(HEARTBEAT, extra=1)).encode())
        self.assertViolation(call, "PostNodeHeartbeat", "'extra' was unexpected")

    def test_heartbeat_missing_a_member_is_reported(self) -> None:
        body = {k: v for k, v in HEARTBEAT.items() if k != "nat_summary"}
        call = changed("PostNodeHeartbeat 200", request_body=json.dumps(body).encode())
        self.assertViolation(call, "PostNodeHeartbeat", "'nat_summary' is a required property")

    def test_heartbeat_null_nat_summary_is_reported(self) -> None:
        call = changed("PostNodeHeartbeat 200", request_body=json.dumps(dict(HEARTBEAT, nat_summary=None)).encode())
        self.assertViolation(call, "PostNodeHeartbeat", "/nat_summary")

    def test_heartbeat_answer_missing_a_member_is_reported(self) -> None:
        call = changed("PostNodeHeartbeat 200", response_body=b'{"accepted_at":"2026-06-26T10:00:00Z","reconcile":true}')
        self.assertViolation(call, "PostNodeHeartbeat", "response", "'rotate_keys' is a required property")

    def test_bearer_of_the_wrong_form_is_reported(self) -> None:
        call = exchange("heartbeat", "POST", HEARTBEAT_PATH, HEARTBEAT, 200,
                        {"accepted_at": WHEN, "reconcile": False, "rotate_keys": False}, bearer="Bearer nsk_plexd_short")
        self.assertViolation(call, "PostNodeHeartbeat", "Authorization is not")

    def test_raw_nsk_as_bearer_is_reported(self) -> None:
        call = exchange("secret", "GET", SECRET, None, 401, problem(401, "unauthorized"), bearer="Bearer " + KEY)
        self.assertViolation(call, "FetchNodeSecret", "Authorization is not")

    def test_violation_never_repeats_the_bearer(self) -> None:
        call = exchange("secret", "GET", SECRET, None, 401, problem(401, "unauthorized"), bearer="Bearer " + KEY)
        self.assertNotIn(KEY, "\n".join(self.violations(call)))

    def test_call_without_bearer_is_reported(self) -> None:
        call = exchange("state", "GET", STATE, None, 200, SNAPSHOT, bearer=None)
        self.assertViolation(call, "GetNodeState", "Authorization is missing")

    def test_enrolment_with_authorization_is_reported(self) -> None:
        call = changed("PostRegister 200", request_headers={"content-type": JSON, "authorization": BEARER})
        self.assertViolation(call, "PostRegister", "must not send Authorization")

    def test_enrolment_with_the_older_member_name_is_reported(self) -> None:
        body = {("resource_id" if k == "resource_handle" else k): v for k, v in ENROLMENT.items()}
        call = changed("PostRegister 200", request_body=json.dumps(body).encode())
        self.assertViolation(call, "PostRegister", "'resource_handle' is a required property")

    def test_enrolment_with_null_requested_resource_id_is_reported(self) -> None:
        call = changed("PostRegister 200",
                       request_body=json.dumps(dict(ENROLMENT, requested_resource_id=None)).encode())
        self.assertViolation(call, "PostRegister", "/requested_resource_id")

    def test_enrolment_error_never_repeats_the_bootstrap_token(self) -> None:
        token = "psb_" + "x" * 600
        call = changed("PostRegister 200", request_body=json.dumps(dict(ENROLMENT, bootstrap_token=token)).encode())
        found = self.violations(call)
        self.assertTrue(any("/bootstrap_token" in v for v in found), found)
        self.assertNotIn(token, "\n".join(found))

    def test_compressed_request_is_reported(self) -> None:
        call = changed("PutNodeStateReport 200",
                       request_headers={"content-type": JSON, "authorization": BEARER, "content-encoding": "gzip"})
        self.assertViolation(call, "PutNodeStateReport", "Content-Encoding 'gzip'")

    def test_report_value_of_4096_bytes_passes(self) -> None:
        for value in ("x" * 4096, "\u00e9" * 2048):
            call = changed("PutNodeStateReport 200", request_body=json.dumps({"value": value}).encode())
            self.assertEqual(self.violations(call), [])

    def test_report_value_of_4097_bytes_is_reported(self) -> None:
        call = changed("PutNodeStateReport 200", request_body=json.dumps({"value": "x" * 4097}).encode())
        self.assertViolation(call, "PutNodeStateReport", "4097 bytes in UTF-8, over 4096")

    def test_report_value_under_4096_characters_but_over_4096_bytes_is_reported(self) -> None:
        value = "\u00e9" * 2049  # 2049 characters, 4098 bytes
        call = changed("PutNodeStateReport 200", request_body=json.dumps({"value": value}).encode())
        self.assertViolation(call, "PutNodeStateReport", "4098 bytes in UTF-8, over 4096")

    def test_report_with_workload_tag_is_reported(self) -> None:
        call = changed("PutNodeStateReport 200", request_body=b'{"value":"1","workload_tag":"w"}')
        self.assertViolation(call, "PutNodeStateReport", "'workload_tag' was unexpected")

    def test_report_key_outside_the_grammar_is_reported(self) -> None:
        call = changed("PutNodeStateReport 200", path_with_query=f"/v1/nodes/{NODE}/state/reports/Status")
        self.assertViolation(call, "PutNodeStateReport", "InvalidParameter key", "'Status' does not match")

    def test_bad_secret_name_is_reported(self) -> None:
        call = changed("FetchNodeSecret 200", path_with_query=f"/v1/nodes/{NODE}/secrets/Db.password")
        self.assertViolation(call, "FetchNodeSecret", "name", "does not match")

    def test_secret_version_zero_is_reported(self) -> None:
        call = changed("FetchNodeSecret 200", path_with_query=SECRET + "?version=0")
        self.assertViolation(call, "FetchNodeSecret", "version", "minimum")

    def test_secret_answer_without_the_version_header_is_reported(self) -> None:
        headers = {k: v for k, v in SECRET_HEADERS.items() if k != "x-plexsphere-secret-version"}
        call = changed("FetchNodeSecret 200", response_headers=headers)
        self.assertViolation(call, "FetchNodeSecret", "X-Plexsphere-Secret-Version")

    def test_secret_answer_that_may_be_cached_is_reported(self) -> None:
        call = changed("FetchNodeSecret 200", response_headers=dict(SECRET_HEADERS, **{"cache-control": "max-age=60"}))
        self.assertViolation(call, "FetchNodeSecret", "InvalidHeader Cache-Control", "'no-store' was expected")

    def test_secret_answer_shorter_than_nonce_and_tag_is_reported(self) -> None:
        call = changed("FetchNodeSecret 200", response_body=bytes(27))
        self.assertViolation(call, "FetchNodeSecret", "response", "fails minLength 28")

    def test_rate_limit_without_retry_after_is_reported(self) -> None:
        call = changed("FetchNodeSecret 429", response_headers={"content-type": PROBLEM})
        self.assertViolation(call, "FetchNodeSecret", "Retry-After")

    def test_problem_without_status_is_reported(self) -> None:
        body = {k: v for k, v in problem(400, "clock_skew").items() if k != "status"}
        call = changed("PostNodeHeartbeat 400", response_body=json.dumps(body).encode())
        self.assertViolation(call, "PostNodeHeartbeat", "'status' is a required property")

    def test_problem_without_code_passes(self) -> None:
        body = {k: v for k, v in problem(400, "clock_skew").items() if k != "code"}
        self.assertEqual(self.violations(changed("PostNodeHeartbeat 400", response_body=json.dumps(body).encode())), [])

    def test_problem_served_as_plain_json_is_reported(self) -> None:
        call = changed("GetNodeEvents 501", response_headers={"content-type": JSON})
        self.assertViolation(call, "GetNodeEvents", "response", "mimetype not found: application/json")

    def test_stream_without_its_version_header_is_reported(self) -> None:
        headers = {k: v for k, v in STREAM_HEADERS.items() if k != "x-plexsphere-api-version"}
        self.assertViolation(changed("GetNodeEvents 200", response_headers=headers), "GetNodeEvents",
                             "X-Plexsphere-API-Version")

    def test_stream_resumed_after_a_non_numeric_id_is_reported(self) -> None:
        call = changed("GetNodeEvents 200", request_headers={"authorization": BEARER, "last-event-id": "abc"})
        self.assertViolation(call, "GetNodeEvents", "Last-Event-ID")

    def test_undeclared_status_is_reported(self) -> None:
        call = changed("PostNodeHeartbeat 400", status=429)
        self.assertViolation(call, "PostNodeHeartbeat", "status 429 is not declared")

    def test_undeclared_status_allowed_on_purpose_passes(self) -> None:
        check = ExchangeChecker(own_document(), allow_undeclared={("PostNodeHeartbeat", 429)})
        self.assertEqual(check(**changed("PostNodeHeartbeat 400", status=429)), [])

    def test_unknown_path_is_reported(self) -> None:
        call = changed("GetNodeState 200", path_with_query=f"/v1/nodes/{NODE}/capabilities")
        self.assertTrue(any("no such operation" in v for v in self.violations(call)))


class EnvelopeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.check = ExchangeChecker(own_document())

    def test_worked_example_passes(self) -> None:
        self.assertEqual(self.check.envelope(EVENT), [])

    def test_envelope_without_key_id_is_reported(self) -> None:
        envelope = json.loads(EVENT)
        del envelope["key_id"]
        found = self.check.envelope(json.dumps(envelope).encode())
        self.assertEqual(found, ["plexsphere-node-api.yaml Envelope: /: 'key_id' is a required property"])

    def test_envelope_with_a_short_signature_is_reported(self) -> None:
        envelope = dict(json.loads(EVENT), signature=base64.b64encode(bytes(63)).decode())
        self.assertTrue(any("/signature" in v for v in self.check.envelope(json.dumps(envelope).encode())))

    def test_line_that_is_not_json_is_reported(self) -> None:
        self.assertTrue(self.check.envelope(b"{not json")[0].startswith("plexsphere-node-api.yaml Envelope: not JSON"))

    def test_signing_key_rotation_payload_is_checked(self) -> None:
        payload = {"key_id": "key-2", "public_key": KEY, "previous_key_id": "key-1", "transition_expires": WHEN}
        good = dict(json.loads(EVENT), type="signing_key_rotated", payload=payload)
        self.assertEqual(self.check.envelope(json.dumps(good).encode()), [])
        bad = dict(good, payload=dict(payload, public_key="short"))
        self.assertTrue(any("SigningKeyRotated: /public_key" in v for v in self.check.envelope(json.dumps(bad).encode())))


class DocumentSelectionTests(unittest.TestCase):
    def platform_like(self) -> str:
        """A copy of the project's document that still calls resource_handle resource_id."""
        text = open(own_document(), encoding="utf-8").read().replace("resource_handle", "resource_id")
        path = self.mktemp() + ".yaml"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_default_is_the_projects_document(self) -> None:
        with mock.patch.dict(os.environ, {PLATFORM_DOCUMENT_ENV: ""}):
            labels = [d.label for d in ExchangeChecker().documents]
        self.assertEqual(labels, ["plexsphere-node-api.yaml"])

    def test_environment_adds_the_platform_document_with_the_member_renamed(self) -> None:
        path = self.platform_like()
        with mock.patch.dict(os.environ, {PLATFORM_DOCUMENT_ENV: path}):
            check = ExchangeChecker()
        self.assertEqual([d.label for d in check.documents], ["plexsphere-node-api.yaml", os.path.basename(path)])
        self.assertEqual(check(**valid_exchanges()["PostRegister 200"]), [])

    def test_documents_are_loaded_once_per_process(self) -> None:
        self.assertIs(ExchangeChecker().documents[0], ExchangeChecker(own_document()).documents[0])

    def test_module_imports_without_openapi_core(self) -> None:
        code = ("import sys; sys.modules['openapi_core'] = None; "
                "import plexagent.testing.openapi_check as m; print(m.PLATFORM_DOCUMENT_ENV)")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), PLATFORM_DOCUMENT_ENV)

    def test_shipped_document_is_the_one_checked(self) -> None:
        with open(own_document(), encoding="utf-8") as f:
            self.assertEqual(yaml.safe_load(f), document("plexsphere-node-api"))
