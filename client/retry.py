"""The one retry policy of every network path: which failures are temporary, how many tries,
backoff with jitter, and a total time bound per call.

``RetryPolicy.call(fn)`` runs ``fn`` until it succeeds, fails for good, runs out of tries or
reaches the policy's deadline (``ARTIFACTFS_REQUEST_TIMEOUT`` seconds, default 30).  Each
attempt is given the time that is left (:func:`attempt_timeout`), so a stopped endpoint
(SIGSTOP, a network partition) makes a call fail within the deadline, never later.

Nesting: a call made while an outer ``call`` runs (in the same context, e.g. the mount's read
path calling ``HttpStore.read_blob``) shares the outer deadline and makes a single attempt: the
outermost loop owns the retries, so loops never multiply.  Whoever hops threads passes the
context along (``contextvars.copy_context().run``).

Which failures are temporary is decided here too, in two layers: :func:`is_transport_failure`
(the network or the server hiccupped: what the HTTP store retries) and :func:`is_temp_failure`
(a store call that failed for any reason but the request's own fault: what the mount's read
path retries, over whichever store).  A transport marks its own "try again" answers (a 503, a
body cut short) by raising a :class:`TemporaryFailure`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import sys
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Callable, TypeVar

import urllib3.exceptions

from .errors import ArtifactFSError, AuthenticationError, InvalidNameError, PermissionDeniedError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: default total bound of one call, seconds (ARTIFACTFS_REQUEST_TIMEOUT overrides)
DEFAULT_DEADLINE = 30.0

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("artifactfs_retry_deadline", default=None)


def request_timeout() -> float:
    """ARTIFACTFS_REQUEST_TIMEOUT: the most one call may wait for an endpoint, in seconds."""
    text = os.environ.get("ARTIFACTFS_REQUEST_TIMEOUT")
    if not text:
        return DEFAULT_DEADLINE
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"ARTIFACTFS_REQUEST_TIMEOUT={text!r}: use a number of seconds") from None
    if not 0 < value <= 86400:
        raise ValueError(f"ARTIFACTFS_REQUEST_TIMEOUT={text!r}: must be in (0, 86400] seconds")
    return value


class DeadlineExceeded(TimeoutError):
    """The call's total time bound was reached before an attempt could start or finish."""


class TemporaryFailure(Exception):
    """Raised by a transport for an answer that says "try again" (see client.store.http)."""


#: the request's own fault: another attempt cannot succeed
_PERMANENT = (InvalidNameError, AuthenticationError, PermissionDeniedError)
#: urllib3's failures (the HTTP store's JSON calls, blob GETs and uploads use urllib3 directly):
#: connection refused, reset or cut short, timeouts (connect and read), proxies, bad encodings,
#: a TLS record broken mid-body (a certificate the client refuses never gets here: the store
#: raises it as StoreUnavailableError, which says what to set)
_TRANSPORT = (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError, urllib3.exceptions.ProxyError,
              urllib3.exceptions.DecodeError, urllib3.exceptions.SSLError)


def _requests_failures() -> tuple[type[BaseException], ...]:
    """The same failures as requests raises them (http(s) references use it).  Not imported
    here: it costs a CLI process 16-24 ms of start-up (issue 17), and none of its exceptions
    can exist in a process that never imported it."""
    requests = sys.modules.get("requests")
    if requests is None:
        return ()
    return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError)


def is_transport_failure(exc: BaseException) -> bool:
    """Whether another attempt may succeed: the network or the server hiccupped, not the request."""
    return isinstance(exc, (TemporaryFailure, DeadlineExceeded, *_TRANSPORT, *_requests_failures()))


def is_temp_failure(exc: BaseException) -> bool:
    """Whether a failed store call is worth another attempt: anything but the request's fault
    (bad name, no or wrong key), so also a store that gave up, a short read, a local I/O error."""
    if isinstance(exc, _PERMANENT):
        return False
    return is_transport_failure(exc) or isinstance(exc, (ArtifactFSError, OSError, TimeoutError, FutureTimeout))


@dataclass(frozen=True)
class RetryPolicy:
    tries: int = 6
    backoff: float = 0.1  #: first delay; doubled per try, with jitter (x0.5 .. x1.5)
    max_backoff: float = 5.0
    #: total bound of one call in seconds; None: ARTIFACTFS_REQUEST_TIMEOUT at call time
    deadline: float | None = None
    #: most one attempt may wait for an answer (socket read/connect), within the deadline
    attempt_timeout: float = 10.0

    def total(self) -> float:
        return request_timeout() if self.deadline is None else self.deadline

    def call(self, fn: Callable[[], T], *, is_temp: Callable[[BaseException], bool],
             give_up: Callable[[BaseException, int], BaseException], what: str = "request",
             logger: logging.Logger | None = None) -> T:
        """Run ``fn`` under the policy.  ``give_up(last_error, attempts)`` makes the final error;
        retries are logged (INFO) to ``logger`` (the caller's, default this module's)."""
        outer = _deadline.get()
        own = time.monotonic() + self.total()
        deadline = own if outer is None else min(own, outer)
        tries = self.tries if outer is None else 1
        token = _deadline.set(deadline)
        try:
            delay = self.backoff
            attempt = 0
            while True:
                attempt += 1
                try:
                    return fn()
                except BaseException as exc:  # noqa: BLE001 - classified right below
                    if not is_temp(exc):
                        raise
                    left = deadline - time.monotonic()
                    pause = min(delay * (0.5 + random.random()), self.max_backoff)
                    if attempt >= tries or left <= pause:
                        raise give_up(exc, attempt) from exc
                    (logger or log).info("%s failed (%s); attempt %d/%d in %.2fs (%.1fs left)", what, exc,
                                         attempt + 1, tries, pause, left)
                    time.sleep(pause)
                    delay = min(delay * 2, self.max_backoff)
        finally:
            _deadline.reset(token)


#: a stream that gives up after moving at least this far since its last give-up earns a fresh
#: retry budget; less is a "thin" round
RESUME_MIN_PROGRESS = 4 << 20
#: thin rounds in a row after which a stream is given up on (a link that breaks every few KiB)
THIN_ROUNDS = 3


def resume_while_progressing(call: Callable[[], None], position: Callable[[], int],
                             gave_up: type[BaseException], *, min_progress: int = RESUME_MIN_PROGRESS,
                             thin_rounds: int = THIN_ROUNDS) -> None:
    """Run ``call`` (one stream, retried under a policy, that moves ``position()`` on as bytes
    arrive) again each time it gives up (``gave_up``) having made progress.

    A round that moved at least ``min_progress`` bytes earns a fresh retry budget; a round that
    moved less is thin, and after ``thin_rounds`` thin rounds in a row (or one round with no
    progress at all) the last failure is raised.  So the rounds are bounded by the stream's
    length / ``min_progress`` plus ``thin_rounds``, each bounded by the policy: a link that
    breaks every few KiB fails in a few policy rounds instead of crawling through a large file
    for hours."""
    thin = 0
    while True:
        begun = position()
        try:
            call()
            return
        except gave_up:
            moved = position() - begun
            if moved <= 0:
                raise
            thin = 0 if moved >= min_progress else thin + 1
            if thin >= thin_rounds:
                raise


def remaining() -> float | None:
    """Seconds left of the running call's deadline (None outside any call)."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def attempt_timeout(cap: float) -> float:
    """The time one attempt may wait: ``cap``, or less when the call's deadline is nearer.

    Raises DeadlineExceeded when nothing is left (so no attempt starts after the bound).
    """
    left = remaining()
    if left is None:
        return cap
    if left <= 0:
        raise DeadlineExceeded("the call's time bound (ARTIFACTFS_REQUEST_TIMEOUT) was reached")
    return max(0.05, min(cap, left))
