"""A client library's own log records, kept out of the user's log unless asked for.

pika, amqpstorm and kafka-python log every failed connection attempt at ERROR, most with a traceback
(pika nine records an attempt), and their normal work at INFO or WARNING (pika: each channel made, each
404 of a record looked up and not found). A consumer retrying through an outage then wrote hundreds
of lines a second. What these records report reaches the framework as an exception, which the broker
translates and the consumer reports once per outage (:mod:`funboost_like.core.outage`).

So a broker calls :func:`quiet` with its client's package name when it connects (never on import). The
records of that package are dropped unless its top logger is set to DEBUG by the user:
``logging.getLogger("pika").setLevel(logging.DEBUG)`` shows them all again.
"""

from __future__ import annotations

import logging


class _UnlessDebug(logging.Filter):
    def __init__(self, package: str) -> None:
        super().__init__()
        self.top = logging.getLogger(package)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.top.level == logging.DEBUG


_FILTERS: dict[str, _UnlessDebug] = {}


def quiet(package: str) -> None:
    """Puts the filter on every logger of ``package`` made so far (a logger's filter sees only the
    records of that logger, not of its children): call it at each connection, which is rare."""
    chosen = _FILTERS.get(package) or _FILTERS.setdefault(package, _UnlessDebug(package))
    prefix = package + "."
    for name in list(logging.Logger.manager.loggerDict):
        if name == package or name.startswith(prefix):
            logging.getLogger(name).addFilter(chosen)  # adds it once
