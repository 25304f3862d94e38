"""The SDK's one retry policy: which failures are worth another attempt, how long to pause, how often.

Every request the SDK repeats goes through a :class:`Retry`: acquisitions (``concurrency``,
``rate_limit``, v1), renewals and releases. Each caller keeps its own deadline (an acquisition's
``timeout_seconds``, a lease's expiry), which no pause ever passes.

* **Worth another attempt** (*transient*): no answer at all (the connection was refused, reset or
  timed out, as while a server restarts), and the statuses that say "not now" rather than "no":
  408, 429, 502, 503, 504. A server that is shutting down answers 503 with ``Retry-After`` and the
  code ``shutting_down``; a database that is briefly unavailable, 503 ``database_unavailable``.
  A renewal retries any failure (giving up would lose the lease): ``Retry(statuses=None)``.
* **The pause**: the answer's ``Retry-After`` when it has one (at most :data:`MAX_PAUSE_SECONDS`),
  else a jittered exponential backoff (about 0.5, 1, 2, 4 ... s, at most
  :data:`BACKOFF_CAP_SECONDS`).
* **How often**: :data:`ATTEMPTS` failures in a row (about 35 s of pauses: a server restart fits),
  unless the policy is bounded by its caller's deadline alone (``attempts=None``, a renewal). An
  answer that is not a failure (a 423 refusal) ends the run of failures.
"""

from __future__ import annotations

import random

from slotkeeper.errors import ApiError, ServerUnreachable

#: Statuses that say "not now" rather than "no".
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})
#: Failures in a row before giving up (the pauses add up to about 35 s).
ATTEMPTS = 8
#: Cap of the backoff between failed attempts.
BACKOFF_CAP_SECONDS = 10.0
#: Cap of a pause that an answer's ``Retry-After`` asks for.
MAX_PAUSE_SECONDS = 30.0


def backoff(attempt: int) -> float:
    """About 0.5, 1, 2, 4 ... s (capped), jittered into [0.75, 1.25] of that."""
    return float(min(BACKOFF_CAP_SECONDS, 0.25 * 2 ** min(attempt, 16)) * random.uniform(0.75, 1.25))


class Retry:
    """The retries of one operation (see the module's docstring).

    ``attempts``: failures in a row allowed (None: only the caller's deadline bounds them).
    ``statuses``: the error statuses worth another attempt (None: every one).
    """

    __slots__ = ("attempts", "failures", "statuses")

    def __init__(
        self, attempts: int | None = ATTEMPTS, statuses: frozenset[int] | None = TRANSIENT_STATUSES
    ) -> None:
        self.attempts = attempts
        self.statuses = statuses
        #: Failures in a row so far.
        self.failures = 0

    def transient(self, error: Exception) -> bool:
        """Whether ``error`` says "not now" (another attempt may succeed). An error that is no
        answer of the server's (a bug) is only retried by a policy that retries every failure."""
        if isinstance(error, ServerUnreachable):
            return True
        if isinstance(error, ApiError):
            return self.statuses is None or error.status in self.statuses
        return self.statuses is None

    def delay(self, error: Exception) -> float | None:
        """Count one failure; the pause before the next attempt, or None if there is none to
        make (``error`` is not transient, or it was one failure too many)."""
        if not self.transient(error):
            return None
        self.failures += 1
        if self.attempts is not None and self.failures >= self.attempts:
            return None
        hint = error.retry_after if isinstance(error, ApiError) else None
        return min(hint, MAX_PAUSE_SECONDS) if hint is not None else backoff(self.failures)

    def answered(self) -> None:
        """The server gave an answer that is not a failure: the run of failures is over."""
        self.failures = 0
