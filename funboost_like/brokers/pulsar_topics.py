"""A Pulsar queue's topics and subscriptions (for :mod:`.pulsar_broker`), and the names it accepts.

A queue ``q`` is four topics ``persistent://<PULSAR_NAMESPACE>/...``: ``q`` (subscription ``fl``:
the ready messages), ``q-fl-suspect`` (subscription ``fl-suspect``: messages whose holder went while
they were held, :mod:`.pulsar_intake`), ``q-fl-delayed`` (subscription ``fl-delay``: delayed messages)
and ``q-DLQ`` (subscription ``fl-dlq``: dead letters). A queue name must be a Pulsar topic name
(:func:`check_queue_name`).
"""

from __future__ import annotations

import re

from funboost_like.brokers.pulsar_feed import Mover
from funboost_like.brokers.pulsar_intake import Intake
from funboost_like.core.errors import ConfigurationError

READY_SUBSCRIPTION, SUSPECT_SUBSCRIPTION = "fl", "fl-suspect"
DELAY_SUBSCRIPTION, DLQ_SUBSCRIPTION = "fl-delay", "fl-dlq"
_NAME = re.compile(r"^[A-Za-z0-9_.=:-]+$")


def check_queue_name(queue: str) -> None:
    """Refuse a name that is no Pulsar topic name (run at decoration time and at first use)."""
    if not _NAME.match(queue):
        raise ConfigurationError(f"Pulsar queue names may hold only letters, digits and _ . = : -, not {queue!r}")


class QueueTopics:
    """A queue's topic names, and this process's consumers of it (made when it first fetches)."""

    def __init__(self, queue: str, namespace: str) -> None:
        check_queue_name(queue)
        base = f"persistent://{namespace}/{queue}"
        self.queue, self.ready, self.delayed, self.dlq = queue, base, f"{base}-fl-delayed", f"{base}-DLQ"
        self.suspects = f"{base}-fl-suspect"
        self.intake: Intake | None = None
        self.mover: Mover | None = None
        self.dlq_made = False
