"""The error tree's codes (:mod:`slotkeeper.errors`) and how clients read error answers
(:mod:`slotkeeper.error_answers`)."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from slotkeeper import errors
from slotkeeper.error_answers import api_error, error_detail, retry_after
from slotkeeper.errors import CODES, HTTP_STATUS, ApiError

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "slotkeeper"
#: Codes of errors that never travel in an answer of the server (raised by clients, or roots).
CLIENT_SIDE = {"error", "client_error", "server_unreachable", "api_error"}


def _codes_written_in_the_source() -> set[str]:
    found: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        found.update(re.findall(r'\bcode="([a-z_]+)"', text))
        found.update(re.findall(r'"code": "([a-z_]+)"', text))
        found.update(re.findall(r'^\s+code = "([a-z_]+)"$', text, re.MULTILINE))
        found.update(re.findall(r'^\s+\d{3}: "([a-z_]+)",$', text, re.MULTILINE))  # HTTP_CODES
        found.update(re.findall(r'\bcode = .* else "([a-z_]+)"$', text, re.MULTILINE))
        found.update(re.findall(r'\bcode = HTTP_CODES\.get\(.*, "([a-z_]+)"\)$', text, re.MULTILINE))
    return found


def test_every_code_the_server_writes_is_listed_once() -> None:
    written = _codes_written_in_the_source() - CLIENT_SIDE
    assert written - CODES.keys() == set(), "codes written but not in errors.CODES"
    assert CODES.keys() - written == set(), "codes listed but never written"
    for code in CODES:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code), code


def test_each_domain_error_class_has_the_code_of_its_status() -> None:
    for cls, status in HTTP_STATUS.items():
        assert CODES[cls.code][0] == status, cls
    assert CODES[errors.StorageClosed.code][0] == 503


def test_the_table_in_the_docs_is_the_list() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| (.+) \|$", text, re.MULTILINE)
    assert [(code, int(status), meaning) for code, status, meaning in rows] == [
        (code, status, meaning) for code, (status, meaning) in CODES.items()
    ]


def test_an_instance_may_name_its_own_code() -> None:
    assert errors.InvalidRequest("x").code == "invalid_request"
    assert errors.InvalidRequest("x", code="cannot_wait").code == "cannot_wait"
    assert errors.InvalidRequest("x").code == "invalid_request"  # the class keeps its own
    locked = errors.SlotsUnavailable(None, "zero", code="limit_is_zero")
    assert (locked.code, locked.detail, locked.retry_after) == ("limit_is_zero", "zero", None)


# --- reading answers --------------------------------------------------------------------------------


def test_an_answer_with_a_code() -> None:
    body = orjson.dumps({"detail": "Concurrency Limit not found", "code": "limit_not_found"})
    error = api_error(404, "Not Found", {}, body)
    assert (error.status, error.code, error.detail, error.errors) == (
        404,
        "limit_not_found",
        "Concurrency Limit not found",
        (),
    )
    assert str(error) == "404: Concurrency Limit not found"


def test_a_prefect_422_has_no_code_but_its_validation_errors() -> None:
    wait = {
        "type": "extra_forbidden",
        "loc": ["body", "wait_seconds"],
        "msg": "Extra inputs are not permitted",
    }
    body = {"exception_message": "Invalid request received.", "exception_detail": [wait], "request_body": {}}
    error = api_error(422, "Unprocessable Entity", {}, orjson.dumps(body))
    assert error.code == "api_error"
    assert error.detail == "wait_seconds: Extra inputs are not permitted"
    assert error.field_error("wait_seconds") == wait
    assert error.field_error("priority") is None


def test_retry_after_is_read_from_the_headers() -> None:
    error = api_error(503, "Service Unavailable", {"retry-after": "2.5"}, b'{"code": "shutting_down"}')
    assert (error.code, error.retry_after) == ("shutting_down", 2.5)
    assert retry_after({"retry-after": "-1"}) == 0.0
    for value in ["soon", "nan", ""]:
        assert retry_after({"retry-after": value}) is None
    assert retry_after({}) is None


@pytest.mark.parametrize("body", [b"", b"not json", b"[1]", b'{"code": 7}', b'{"code": ""}'])
def test_odd_bodies_have_no_code(body: bytes) -> None:
    error = api_error(502, "Bad Gateway", {}, body)
    assert isinstance(error, ApiError)
    assert error.code == "api_error"
    assert error.errors == ()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"detail": "Concurrency Limit not found"}', "Concurrency Limit not found"),
        (
            b'{"exception_message": "Invalid request received.", "exception_detail": ['
            b'{"loc": ["body", "slots"], "msg": "Input should be greater than 0"},'
            b'{"loc": ["body", "holder", "id"], "msg": "Input should be a valid UUID"},'
            b'{"loc": ["body"], "msg": "Field required"}], "request_body": {}}',
            "slots: Input should be greater than 0; holder.id: Input should be a valid UUID; Field required",
        ),
        (b'{"detail": [{"loc": ["path", "lease_id"], "msg": "bad"}]}', "path.lease_id: bad"),
        (b'{"exception_message": "Internal Server Error"}', "Internal Server Error"),
        (b"", "Bad Gateway"),
        (b"{}", "Bad Gateway"),
        (b"[1]", "[1]"),
        (b"upstream down\n", "upstream down"),
    ],
)
def test_error_detail(body: bytes, expected: str) -> None:
    assert error_detail(body, "Bad Gateway") == expected
