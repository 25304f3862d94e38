"""An async client of slotkeeper's HTTP API, over aiohttp, for the CLI and for scripts.

    async with SlotkeeperClient("http://127.0.0.1:4200/api") as client:
        await client.create_limit("db", 10)
        print(await client.read_limit("db"))

Errors are translated where they cross this module, and nowhere else:

* the server could not be reached (refused, reset, timed out) → :class:`ServerUnreachable`;
* the server answered with a status of 400 or more → :class:`ApiError`, read by
  :func:`slotkeeper.error_answers.api_error` (its ``code``, and its ``detail`` as a person reads it).

aiohttp rather than httpx: a request costs a fraction of the CPU. The SDK does not use this
module: it has its own small client (:mod:`slotkeeper.sdk._wire`, see ``docs/sdk.md``) and takes
only the URL and auth of a client it is given. Proxies are taken from the environment
(``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``), as other Python clients do.
"""

from __future__ import annotations

import base64
import json
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

import aiohttp
import orjson
from yarl import URL

from slotkeeper.error_answers import api_error
from slotkeeper.errors import ApiError, ServerUnreachable

__all__ = ["DEFAULT_API_URL", "SlotkeeperClient", "limit_path"]

#: Where ``slotkeeper server start`` listens unless told otherwise.
DEFAULT_API_URL = "http://127.0.0.1:4200/api"

_LIMITS = "/v2/concurrency_limits"
_TAG_LIMITS = "/concurrency_limits"
_JSON_BODY = {"Content-Type": "application/json"}


class SlotkeeperClient:
    """A connection pool to one slotkeeper (or Prefect) API; use it as an async context manager.

    ``base_url`` includes the ``/api`` prefix. With ``auth_string`` (``"user:password"``, the
    server's ``SLOTKEEPER_API_AUTH_STRING``), every request carries HTTP basic auth. ``timeout``
    bounds each whole request, in seconds. Without ``async with``, the session opens on the first
    request and :meth:`close` must be awaited.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_API_URL,
        auth_string: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"Not an API URL: {base_url!r} (expected http://HOST:PORT/api)")
        self.base_url = str(URL(base_url.rstrip("/")))
        self._headers = {"Accept": "application/json"}
        if auth_string:
            token = base64.b64encode(auth_string.encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env: HTTP(S)_PROXY and NO_PROXY from the environment, as other clients.
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, trust_env=True
            )
        return self._session

    async def close(self) -> None:
        """Close every pooled connection. The client may be used again: it then reopens."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request to ``base_url + path`` and return the decoded JSON (None if empty).

        ``path`` must already be percent-encoded (see :func:`limit_path`). ``body``, when not
        None, is sent as JSON. Raises :class:`ServerUnreachable` or :class:`ApiError`.
        """
        session = self._open()
        url = URL(self.base_url + path, encoded=True)
        data = None if body is None else json_body(body)
        try:
            async with session.request(
                method, url, data=data, headers=_JSON_BODY if data is not None else None
            ) as response:
                payload = await response.read()
                status = response.status
                reason = response.reason or ""
                headers = {k.lower(): v for k, v in response.headers.items()}
        except TimeoutError as exc:
            total = self._timeout.total
            raise ServerUnreachable(f"No answer from {self.base_url} within {total} s") from exc
        except aiohttp.ClientError as exc:
            raise ServerUnreachable(
                f"Could not reach {self.base_url}: {str(exc) or type(exc).__name__}"
            ) from exc
        if status >= 400:
            raise api_error(status, reason, headers, payload)
        if not payload:
            return None
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ApiError(status, f"the answer is not JSON: {payload[:200]!r}") from exc

    # --- limits ---------------------------------------------------------------------------------

    async def create_limit(
        self,
        name: str,
        limit: int,
        *,
        active: bool = True,
        active_slots: int = 0,
        slot_decay_per_second: float = 0.0,
    ) -> dict[str, Any]:
        """Create a limit; return it as the server stored it (409 if the name is taken)."""
        body = {
            "name": name,
            "limit": limit,
            "active": active,
            "active_slots": active_slots,
            "slot_decay_per_second": slot_decay_per_second,
        }
        created: dict[str, Any] = await self.request("POST", f"{_LIMITS}/", body)
        return created

    async def read_limit(self, id_or_name: str) -> dict[str, Any]:
        """The limit with this id or name, with its current ``active_slots`` (404 if none)."""
        found: dict[str, Any] = await self.request("GET", limit_path(id_or_name))
        return found

    async def list_limits(self, limit: int | None = 200, offset: int = 0) -> list[dict[str, Any]]:
        """One page of limits ordered by name. ``limit=None`` asks for the server's page size."""
        body: dict[str, Any] = {"offset": offset}
        if limit is not None:
            body["limit"] = limit
        page: list[dict[str, Any]] = await self.request("POST", f"{_LIMITS}/filter", body)
        return page

    async def update_limit(self, id_or_name: str, **fields: Any) -> None:
        """Change only the given fields (``limit``, ``active``, ``active_slots``, ...)."""
        await self.request("PATCH", limit_path(id_or_name), fields)

    async def delete_limit(self, id_or_name: str) -> None:
        """Delete a limit; the slots its leases hold on it are freed with it."""
        await self.request("DELETE", limit_path(id_or_name))

    async def list_leases(self, id_or_name: str) -> list[dict[str, Any]]:
        """The live leases on a limit, oldest first (a slotkeeper extension of the API)."""
        leases: list[dict[str, Any]] = await self.request("GET", limit_path(id_or_name) + "/leases")
        return leases

    # --- tag-based (v1) limits: /concurrency_limits, as Prefect's v1 client calls them -----------

    async def upsert_tag_limit(self, tag: str, concurrency_limit: int) -> dict[str, Any]:
        """Create the limit of ``tag``, or set its size (Prefect's v1 upsert); return it."""
        body = {"tag": tag, "concurrency_limit": concurrency_limit}
        found: dict[str, Any] = await self.request("POST", f"{_TAG_LIMITS}/", body)
        return found

    async def read_tag_limit(self, tag: str) -> dict[str, Any]:
        """The limit of ``tag`` with the task runs holding it (``active_slots``); 404 if none."""
        found: dict[str, Any] = await self.request("GET", _tag_path(tag))
        return found

    async def list_tag_limits(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """One page of tag limits ordered by tag. ``limit=None`` asks for the server's page size."""
        body: dict[str, Any] = {"offset": offset}
        if limit is not None:
            body["limit"] = limit
        page: list[dict[str, Any]] = await self.request("POST", f"{_TAG_LIMITS}/filter", body)
        return page

    async def reset_tag_limit(self, tag: str, slot_override: list[str] | None = None) -> None:
        """Free every slot of ``tag``; with ``slot_override``, those task runs hold it after."""
        await self.request("POST", _tag_path(tag) + "/reset", {"slot_override": slot_override})

    async def delete_tag_limit(self, tag: str) -> None:
        """Delete the limit of ``tag``; the holds on it end."""
        await self.request("DELETE", _tag_path(tag))

    async def increment_tags(self, tags: list[str], task_run_id: str) -> list[dict[str, Any]]:
        """Take one slot on each tag for ``task_run_id`` (423 :class:`ApiError` when one is full)."""
        body = {"names": tags, "task_run_id": task_run_id}
        held: list[dict[str, Any]] = await self.request("POST", f"{_TAG_LIMITS}/increment", body)
        return held

    async def decrement_tags(self, tags: list[str], task_run_id: str) -> list[dict[str, Any]]:
        """Release what ``task_run_id`` holds on these tags."""
        body = {"names": tags, "task_run_id": task_run_id}
        found: list[dict[str, Any]] = await self.request("POST", f"{_TAG_LIMITS}/decrement", body)
        return found

    async def health(self) -> bool:
        """True when the server answers its health check; False when it is down or unwell."""
        try:
            return bool(await self.request("GET", "/health") is True)
        except (ServerUnreachable, ApiError):
            return False

    def authorization(self) -> str | None:
        """The ``Authorization`` header every request carries, if any (the SDK sends the same)."""
        return self._headers.get("Authorization")


def json_body(body: Any) -> bytes:
    """``body`` as JSON. Integers of any size go as they are (the server says what is wrong with
    one too large); a float that is not finite cannot be written in JSON: ValueError (orjson
    would silently write null)."""
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        raise ValueError(f"Cannot send {body!r}: JSON has no NaN or infinity") from None


def _segment(value: str, what: str) -> str:
    """``value`` as one percent-encoded path segment."""
    if not value:
        raise ValueError(f"A {what} must not be empty")
    try:
        segment = quote(value, safe="")
    except UnicodeEncodeError:
        raise ValueError(f"Not a valid {what}: {value!r} (it is not valid Unicode)") from None
    if segment in (".", ".."):
        # A bare dot segment would be resolved away by URL normalisation; %2E is kept as is.
        segment = segment.replace(".", "%2E")
    return segment


def limit_path(id_or_name: str) -> str:
    """The percent-encoded path of one limit. Names may hold spaces, ``?``, ``#``, non-ASCII."""
    return f"{_LIMITS}/{_segment(id_or_name, 'limit id or name')}"


def _tag_path(tag: str) -> str:
    """The percent-encoded path of one tag limit."""
    return f"{_TAG_LIMITS}/tag/{_segment(tag, 'tag')}"
