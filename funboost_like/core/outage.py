"""Logging a failure that repeats while a server is down: once when it starts, a reminder now and then,
and once when it ends.

A loop that retries an operation (a consumer's fetch, a maintenance round, a heartbeat) would otherwise
log the same traceback at every try, dozens of lines each, for as long as the outage lasts. A broker's
error is told in one line (a :class:`~funboost_like.core.errors.BrokerError` says which server, what
failed and why); where asked, any other error keeps its traceback the first time, since that one may be
a defect to report.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from funboost_like.core.errors import BrokerError

REMIND_SECONDS = 60.0  # while an outage lasts, one line this often
RETRY_FIRST, RETRY_MAX = 0.5, 5.0  # the backoff of a retrying loop: 0.5 s doubling to 5 s


def retry_delay(failures: int) -> float:
    """Seconds to wait before the next try after ``failures`` failures in a row: doubling from 0.5 s up to
    5 s, with jitter so that consumers that met the same outage do not all come back at the same instant.
    Capped low on purpose: a consumer resumes within about 5 s of its server's return, however long it was
    away (a try against a server that is down costs one refused connection)."""
    return min(RETRY_MAX, RETRY_FIRST * 2.0 ** min(max(failures - 1, 0), 8)) * random.uniform(0.8, 1.0)


class Outage:
    """The log of one retried operation: ``what`` is its name in the lines ("fetching from queue 'q'")."""

    __slots__ = ("logger", "what", "level", "traceback", "since", "failures", "reminded")

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[Any], what: str, level: int = logging.WARNING, *,
                 traceback: bool = False) -> None:
        self.logger, self.what, self.level = logger, what, level
        self.traceback = traceback  # the first failure's traceback, unless a BrokerError's
        self.since: float | None = None  # monotonic time of the first failure of this outage
        self.failures = 0
        self.reminded = 0.0

    def failed(self, exc: BaseException, retry_in: float | None = None) -> None:
        """One more failure: logged if it starts an outage or a reminder is due, else at DEBUG."""
        now = time.monotonic()
        self.failures += 1
        then = f"; trying again in {retry_in:.1f} s" if retry_in is not None else "; trying again"
        if self.since is None:
            self.since = self.reminded = now
            traceback = self.traceback and not isinstance(exc, BrokerError)
            self.logger.log(self.level, "%s failed: %s%s", self.what, _text(exc), then, exc_info=traceback)
        elif now - self.reminded >= REMIND_SECONDS:
            self.reminded = now
            self.logger.log(self.level, "%s still fails after %d tries over %.0f s: %s%s", self.what, self.failures,
                            now - self.since, _text(exc), then)
        else:
            self.logger.debug("%s failed again (%d in a row): %s", self.what, self.failures, _text(exc))

    def ended(self) -> None:
        """The operation succeeded: if an outage was going on, say that it is over."""
        if self.since is not None:
            self.logger.info("%s works again, after %d failed tries over %.1f s", self.what, self.failures,
                             time.monotonic() - self.since)
            self.since, self.failures = None, 0

    def report(self, exc: BaseException | None, retry_in: float | None = None) -> None:
        """:meth:`failed` with ``exc``, or :meth:`ended` when it is None (the round went well)."""
        if exc is not None:
            self.failed(exc, retry_in)
        elif self.since is not None:
            self.ended()


def _text(exc: BaseException) -> str:
    text = (str(exc) or repr(exc)).rstrip(". ")
    return text if isinstance(exc, BrokerError) else f"{type(exc).__name__}: {text}"
