"""The session protocol: the lease requests of one process over one websocket, pipelined.

Both ends import this module (the server's ``api/session.py``, the SDK's ``sdk/_session.py``);
it holds what they must agree on and nothing that does I/O. The design and the measurements
behind it are in ``docs/api.md`` ("Sessions") and ``ARCHITECTURE.md``.

A session is a websocket at ``/api/slotkeeper/session`` with the subprotocol :data:`SUBPROTOCOL`
(basic auth, when the server has an auth string, on the upgrade request as on any HTTP request).
Each binary message carries one or more **records**; a record is a 9-byte header, ``kind`` (one
byte), ``ident`` and ``length`` (unsigned 32-bit, big-endian), then ``length`` bytes of payload:

========  ==========  =====================  =============================================
kind      direction   ident                  payload
========  ==========  =====================  =============================================
REQUEST   to server   the request's number   ``POST /v2/concurrency_limits/...`` LF body
CANCEL    to server   a request's number     empty: withdraw it if it waits for slots
ACK       to server   messages received      empty: the client has read that many messages
ANSWER    to client   the request's number   ``STATUS[ RETRY-AFTER]`` LF body
ACKED     to client   an ``ACK`` it read     empty: the server knows the client has those
========  ==========  =====================  =============================================

A request is one of the lease routes of the HTTP API (:data:`ROUTES`), with its path under
``/api`` and its JSON body exactly as over HTTP; its answer is exactly the HTTP answer (status,
``Retry-After``, JSON body), so both transports share validation, errors and their meaning.
Answers come in any order.

``ACK`` counts the server's messages the client has read, ``ACKED`` tells the client which
``ACK`` the server has read. When a session ends other than by the server's own shutdown (close
code :data:`SERVICE_RESTART`), the server releases every lease granted in a message the client
had not acknowledged (nobody may hold it), and the client treats every lease whose
acknowledgement the server had not confirmed as lost (the server may have released it).
``docs/api.md`` has the whole story.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

#: Where the session is served, under the API's root (``/api``).
PATH = "/slotkeeper/session"
#: The websocket subprotocol, which names the protocol's version.
SUBPROTOCOL = "slotkeeper.session.v1"

REQUEST, CANCEL, ACK = 1, 2, 3
ANSWER, ACKED = 0x81, 0x82

#: The requests a session carries (method, path template under ``/api``). Only lease routes: a
#: grant that never reaches its client can be released by its lease id when the session ends.
ACQUIRE = ("POST", "/v2/concurrency_limits/increment-with-lease")
ROUTES = frozenset(
    {
        ACQUIRE,
        ("POST", "/v2/concurrency_limits/decrement-with-lease"),
        ("POST", "/v2/concurrency_limits/leases/{lease_id}/renew"),
    }
)

_EXACT = frozenset(f"{method} {path}" for method, path in ROUTES if "{" not in path)
_TEMPLATED = re.compile(
    "|".join(
        f"(?:{method} {re.sub(r'{[^}]+}', '[^/]+', path)})" for method, path in sorted(ROUTES) if "{" in path
    )
)


def carries(method: str, path: str) -> bool:
    """Whether a session carries this request (``path`` under ``/api``, concrete). Called for
    every request of the SDK: the fixed routes are a set lookup."""
    line = f"{method} {path}"
    return line in _EXACT or _TEMPLATED.fullmatch(line) is not None


#: Close codes (RFC 6455 and IANA's registry).
NORMAL = 1000
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
POLICY_VIOLATION = 1008
TOO_BIG = 1009
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013

#: Most records in one message (a client sends more in several messages).
MAX_RECORDS = 4096

_HEADER = struct.Struct("!BII")
HEADER_SIZE = _HEADER.size


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the session is closed with 1002."""


def record(kind: int, ident: int, payload: bytes = b"") -> bytes:
    """One record, ready to be joined with others into a message."""
    return _HEADER.pack(kind, ident, len(payload)) + payload


def records(message: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The ``(kind, ident, payload)`` of every record of a message, in order (at most
    :data:`MAX_RECORDS`)."""
    size = len(message)
    pos = 0
    count = 0
    unpack = _HEADER.unpack_from
    while pos < size:
        count += 1
        if count > MAX_RECORDS:
            raise ProtocolError(f"more than {MAX_RECORDS} records in one message")
        if size - pos < HEADER_SIZE:
            raise ProtocolError(f"truncated record header at byte {pos}")
        kind, ident, length = unpack(message, pos)
        pos += HEADER_SIZE
        end = pos + length
        if end > size:
            raise ProtocolError(f"record at byte {pos - HEADER_SIZE} runs past the message")
        yield kind, ident, message[pos:end]
        pos = end


def request_payload(method: str, path: str, body: bytes) -> bytes:
    """A ``REQUEST`` payload: the request line (method, path under ``/api``), LF, the JSON body."""
    return f"{method} {path}\n".encode() + body


def parse_request(payload: bytes) -> tuple[str, str, bytes]:
    """``(method, path, body)`` of a ``REQUEST`` payload."""
    line, newline, body = payload.partition(b"\n")
    method, space, path = line.partition(b" ")
    if not newline or not space:
        raise ProtocolError("a request is 'METHOD PATH' LF body")
    try:
        return method.decode("ascii"), path.decode(), body
    except UnicodeDecodeError:
        raise ProtocolError("a request line must be UTF-8") from None


def answer_payload(status: int, retry_after: str | None, body: bytes) -> bytes:
    """An ``ANSWER`` payload: the status, the ``Retry-After`` value if any, LF, the body."""
    if retry_after is None:
        return b"%d\n" % status + body
    return b"%d %s\n" % (status, retry_after.encode("latin-1")) + body


def parse_answer(payload: bytes) -> tuple[int, str | None, bytes]:
    """``(status, Retry-After or None, body)`` of an ``ANSWER`` payload."""
    line, newline, body = payload.partition(b"\n")
    status, _, retry_after = line.partition(b" ")
    if not newline or not status.isdigit():
        raise ProtocolError("an answer is 'STATUS[ RETRY-AFTER]' LF body")
    return int(status), retry_after.decode("latin-1") if retry_after else None, body
