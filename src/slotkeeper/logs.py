"""The server's logs: text or JSON lines, each with the id of the request it belongs to.

``SLOTKEEPER_LOG_FORMAT=text`` (default) prints uvicorn's coloured lines; ``json`` prints one JSON
object per line (``time``, ``level``, ``logger``, ``message``, ``request_id`` when the line
belongs to a request, the record's extra fields, ``exc_info``), for log shippers.

The request id lives in a context variable set by :class:`slotkeeper.api.access.RequestLog` for
the whole handling of one request, so every line logged meanwhile (by any module) carries it.
"""

from __future__ import annotations

import copy
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from uvicorn.logging import DefaultFormatter

#: The id of the request being handled (None outside requests: start-up, the reaper).
REQUEST_ID: ContextVar[str | None] = ContextVar("slotkeeper_request_id", default=None)

#: Attributes every LogRecord has: what is not among them was passed as ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's coloured copy of the message
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(DefaultFormatter):
    """uvicorn's text lines, with ``[request id]`` after the message of a request's lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = REQUEST_ID.get()
        return text if request_id is None else f"{text} [{request_id}]"


def log_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of a server: uvicorn's loggers and slotkeeper's, in
    ``fmt`` (``text`` or ``json``), at ``level`` (uvicorn's names; ``trace`` is debug here)."""
    import uvicorn.config

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    numeric = "DEBUG" if level == "trace" else level.upper()
    if fmt == "json":
        for name in ("default", "access"):
            config["formatters"][name] = {"()": JsonFormatter}
    else:
        config["formatters"]["default"]["()"] = TextFormatter
    config["loggers"]["slotkeeper"] = {"handlers": ["default"], "level": numeric, "propagate": False}
    # The access log (when on) is slotkeeper's own, at INFO whatever the level of the rest.
    config["loggers"]["slotkeeper.access"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config
