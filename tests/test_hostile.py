"""Hostile input (issue 11): each case here once hurt the server (a 500, a poisoned limit, a
frozen loop, a flooded log). Each test sends what broke it and asserts the 4xx with its code, or
the harmless outcome, on both backends."""

from __future__ import annotations

import httpx
import pytest

V2 = "/v2/concurrency_limits"
V1 = "/concurrency_limits"

#: The 7 hot POST routes, each with a body that would be valid as JSON.
HOT_POSTS = [
    (f"{V2}/increment", {"names": ["p"], "slots": 1}),
    (f"{V2}/increment-with-lease", {"names": ["p"], "slots": 1}),
    (f"{V2}/decrement", {"names": ["p"], "slots": 1}),
    (f"{V2}/decrement-with-lease", {"lease_id": "0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6e"}),
    (f"{V2}/leases/0c4c1a8e-7a6b-4b8e-9a51-2f7c3c4b5d6e/renew", {"lease_duration": 60}),
    (f"{V1}/increment", {"names": ["p"], "slots": 1, "mode": "concurrency"}),
    (f"{V1}/decrement", {"names": ["p"], "slots": 1}),
]


# --- defect 7: a body that is not UTF-8 ----------------------------------------------------------


@pytest.mark.parametrize(("path", "body"), HOT_POSTS)
async def test_a_body_that_is_not_utf8_gets_a_422(client: httpx.AsyncClient, path: str, body: object) -> None:
    response = await client.post(path, content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["code"] == "invalid_request"
    assert answer["request_body"] == "\ufffd\ufffd{"


# --- defect 6: cross-site request forgery through a form or text/plain body -------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
@pytest.mark.parametrize(("path", "body"), HOT_POSTS)
async def test_a_body_not_declared_json_is_refused(
    client: httpx.AsyncClient, path: str, body: object, content_type: str | None
) -> None:
    """A web page can post a form or text/plain to any server without asking (no CORS
    preflight); only a JSON Content-Type is read as JSON, as on every other route."""
    await client.post(f"{V2}/", json={"name": "p", "limit": 5})
    headers = {} if content_type is None else {"content-type": content_type}
    content = httpx.Request("POST", "http://x", json=body).content
    response = await client.post(path, content=content, headers=headers)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["code"] == "invalid_request"
    assert answer["exception_detail"][0]["type"] == "model_attributes_type"
    # Nothing was taken.
    limit = (await client.get(f"{V2}/p")).json()
    assert limit["active_slots"] == 0


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/merge-patch+json"])
async def test_json_content_types_with_parameters_or_suffixes_are_read(
    client: httpx.AsyncClient, content_type: str
) -> None:
    await client.post(f"{V2}/", json={"name": "p", "limit": 5})
    content = httpx.Request("POST", "http://x", json={"names": ["p"], "slots": 2}).content
    response = await client.post(f"{V2}/increment", content=content, headers={"content-type": content_type})
    assert response.status_code == 200, response.text
    assert (await client.get(f"{V2}/p")).json()["active_slots"] == 2
