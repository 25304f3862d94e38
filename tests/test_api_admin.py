"""What Prefect's client calls besides the limits: health, readiness, version, CSRF, OpenAPI."""

from __future__ import annotations

import re
from typing import Any

import httpx

V2 = "/api/v2/concurrency_limits"

#: Every v2 route and its methods (``reference/prefect-api.md`` §2, plus the leases listing).
V2_OPERATIONS = {
    f"{V2}/": {"post"},
    f"{V2}/{{id_or_name}}": {"get", "patch", "delete"},
    f"{V2}/{{id_or_name}}/leases": {"get"},
    f"{V2}/filter": {"post"},
    f"{V2}/increment": {"post"},
    f"{V2}/increment-with-lease": {"post"},
    f"{V2}/decrement": {"post"},
    f"{V2}/decrement-with-lease": {"post"},
    f"{V2}/leases/{{lease_id}}/renew": {"post"},
}


async def test_health_is_true(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() is True


async def test_ready_is_ok(client: httpx.AsyncClient) -> None:
    r = await client.get("/ready")
    assert r.status_code == 200
    assert r.json() == {"message": "OK"}


async def test_version_is_a_prefect_3_version_string(client: httpx.AsyncClient) -> None:
    # Prefect's client refuses a server of another major version.
    r = await client.get("/admin/version")
    assert r.status_code == 200
    version = r.json()
    assert isinstance(version, str)
    assert re.fullmatch(r"3\.\d+\.\d+", version)


async def test_csrf_token_says_protection_is_disabled(client: httpx.AsyncClient) -> None:
    r = await client.get("/csrf-token", params={"client": "x"})
    assert r.status_code == 422
    assert r.json() == {"detail": "CSRF protection is disabled.", "code": "csrf_disabled"}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


async def test_openapi_is_a_valid_document_listing_every_v2_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert re.fullmatch(r"3\.\d+\.\d+", doc["openapi"])
    assert doc["info"]["title"] == "slotkeeper"
    assert isinstance(doc["info"]["version"], str)
    paths = doc["paths"]
    for path, methods in V2_OPERATIONS.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    operation_ids = []
    for path, item in paths.items():
        assert path.startswith("/api/")
        for method, operation in item.items():
            assert method in {"get", "post", "patch", "delete", "put", "head", "options"}
            assert operation["responses"], (path, method)
            operation_ids.append(operation["operationId"])
            for param in operation.get("parameters", []):
                assert param["in"] in {"path", "query", "header", "cookie"}
                if param["in"] == "path":
                    assert param["required"] is True
                    assert "{" + param["name"] + "}" in path
    assert len(operation_ids) == len(set(operation_ids))
    # Every reference resolves inside the document.
    for ref in _refs(doc):
        assert ref.startswith("#/")
        target: Any = doc
        for part in ref[2:].split("/"):
            assert part in target, ref
            target = target[part]


async def test_docs_page_is_served(client: httpx.AsyncClient) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200
    assert "text/html" in r.headers["content-type"]


async def test_an_unknown_path_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v3/nothing")
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found", "code": "route_not_found"}
