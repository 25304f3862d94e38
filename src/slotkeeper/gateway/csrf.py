"""``GET /api/csrf-token`` in gateway mode: the upstream's answer while it is reachable.

Prefect's client asks for a CSRF token before its first POST, PUT, PATCH or DELETE, including
the POSTs of ``concurrency()``, which slotkeeper answers itself: so the gateway must answer this
one even when the upstream is down, or concurrency would stop with the upstream.

- The upstream reachable: its answer is relayed, and its setting remembered. A token it issues is
  the upstream's own, valid for the forwarded requests (slotkeeper's own routes do not check CSRF
  tokens, as a default Prefect server). CSRF protection off upstream (Prefect's default, a 422
  "CSRF protection is disabled."): the answer is the same 422 with the code ``csrf_disabled``, and
  the gateway gives it without asking again for :data:`DISABLED_KEPT_SECONDS`.
- The upstream unreachable (or slower than :data:`ASK_SECONDS`): protection known to be off, the
  same 422; otherwise a token made here, valid for :data:`LOCAL_TOKEN_SECONDS`. Prefect's client
  sends it along; slotkeeper's routes accept any, and when the upstream is back and refuses it
  (403 "Invalid CSRF token"), Prefect's client asks for a new token, which is then the upstream's.
  A token made here is never worse than answering "disabled", which would switch the client's CSRF
  support off for good. After a failure the upstream is not asked again for
  :data:`RETRY_AFTER_FAILURE_SECONDS`, so a slow upstream delays at most one request per period.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import Enum

import aiohttp
import orjson
from multidict import CIMultiDict
from starlette.responses import Response

from slotkeeper.gateway.proxy import Upstream, answer_headers

log = logging.getLogger("slotkeeper.gateway")

#: Longest wait for the upstream's answer to a token request before the gateway answers itself.
ASK_SECONDS = 5.0
#: How long the upstream's "CSRF protection is disabled" is given without asking it again.
DISABLED_KEPT_SECONDS = 60.0
#: Lifetime of a token made by the gateway while the upstream cannot be asked.
LOCAL_TOKEN_SECONDS = 60.0
#: After a failed ask, how long the gateway answers on its own without asking again.
RETRY_AFTER_FAILURE_SECONDS = 30.0
#: What Prefect's server and client say when protection is off (the client looks for it).
DISABLED_DETAIL = "CSRF protection is disabled."


class Setting(Enum):
    """The upstream's CSRF protection, as last seen."""

    UNKNOWN = "unknown"
    ENABLED = "enabled"
    DISABLED = "disabled"


def disabled_answer() -> Response:
    """Prefect's answer when protection is off (its client then stops asking for tokens)."""
    return Response(
        orjson.dumps({"detail": DISABLED_DETAIL, "code": "csrf_disabled"}),
        status_code=422,
        media_type="application/json",
    )


def local_token(client: str, now: datetime) -> Response:
    """A token made by the gateway: Prefect's ``CsrfToken`` shape, valid for LOCAL_TOKEN_SECONDS."""
    stamp = now.isoformat().replace("+00:00", "Z")
    expiration = (now + timedelta(seconds=LOCAL_TOKEN_SECONDS)).isoformat().replace("+00:00", "Z")
    body = {
        "id": str(uuid.uuid4()),
        "created": stamp,
        "updated": stamp,
        "token": secrets.token_hex(32),
        "client": client,
        "expiration": expiration,
    }
    return Response(orjson.dumps(body), status_code=200, media_type="application/json")


class CsrfMirror:
    """Answers ``GET /api/csrf-token`` from the upstream's setting (see the module's doc)."""

    def __init__(
        self,
        upstream: Upstream,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.upstream = upstream
        self.clock = clock
        self.wall = wall
        self.setting = Setting.UNKNOWN
        self.seen_at = -float("inf")
        self.failed_at = -float("inf")

    async def answer(self, client: str | None, headers: CIMultiDict[str], query: bytes) -> Response:
        """The answer to a token request with ``client`` (its query) and the client's headers."""
        now = self.clock()
        if self.setting is Setting.DISABLED and now - self.seen_at < DISABLED_KEPT_SECONDS:
            return disabled_answer()
        if now - self.failed_at >= RETRY_AFTER_FAILURE_SECONDS:
            answer = await self._ask(headers, query)
            if answer is not None:
                return answer
        if self.setting is Setting.DISABLED:
            return disabled_answer()
        if not client:  # what the upstream would say (its `client` query parameter is required)
            return Response(
                orjson.dumps(
                    {"detail": "The query parameter `client` is required.", "code": "invalid_request"}
                ),
                status_code=422,
                media_type="application/json",
            )
        return local_token(client, self.wall())

    async def _ask(self, headers: CIMultiDict[str], query: bytes) -> Response | None:
        """The upstream's answer, relayed (its setting noted), or None if it could not be had."""
        url = self.upstream.url_of(self.upstream.base_path + "/csrf-token", query)
        try:
            async with self.upstream.session.get(
                url,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=min(
                        ASK_SECONDS, self.upstream.timeout_seconds + self.upstream.connect_timeout_seconds
                    )
                ),
            ) as response:
                body = await response.read()
                status = response.status
                kept = answer_headers(response.raw_headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.failed_at = self.clock()
            log.warning(
                "the upstream did not answer GET /api/csrf-token (%s): answering from the gateway "
                "(CSRF protection %s)",
                type(exc).__name__,
                self.setting.value,
            )
            return None
        if status == 200:
            self.setting, self.seen_at = Setting.ENABLED, self.clock()
        elif status == 422 and DISABLED_DETAIL.encode() in body:
            self.setting, self.seen_at = Setting.DISABLED, self.clock()
            return disabled_answer()
        answer = Response(body, status_code=status)
        answer.raw_headers = [(name, value) for name, value in kept if name not in (b"content-length",)] + [
            (b"content-length", str(len(body)).encode())
        ]
        return answer
