"""What a broker can honour (:class:`Capabilities`), declared on its class and read before any use.

Parameter validation and the base read these attributes, never a broker's name: an option the broker
cannot honour is refused when a task is decorated. Re-exported by :mod:`funboost_like.brokers.base`,
where brokers import it from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

Redelivery = Literal["none", "native", "lease", "sweep"]
DelayKind = Literal["none", "native", "emulated"]
RoutingKind = Literal["none", "native", "emulated"]


@dataclass(frozen=True)
class Capabilities:
    """What a broker can honour; the base and parameter validation read these, never the broker's name.

    ``redelivery``: how a dead consumer's messages come back: ``none`` (at-most-once), ``native``
    (the server does it), ``lease`` (a held message's lease runs out unless renewed), ``sweep``
    (live consumers reclaim the messages of one whose heartbeat stopped). ``delay``: whether
    ``publish(not_before=...)`` and ``nack(delay=...)`` hold a message invisible until due.
    ``max_priority``: the highest priority honoured (0: none). ``key_value``: the broker keeps small
    expiring records (RPC results, filters). ``fifo``: equal-priority messages come out in order.
    ``release_front``: a released message comes back before the others (else at the back).
    ``green_threads``: the client works under gevent's or eventlet's monkey patch (GEVENT, EVENTLET).
    ``queue_names``: a check of a queue name, raising ConfigurationError for one the broker cannot
    use (run at decoration time); None when any name works.
    ``queue_options``: the ``broker_exclusive_config`` keys the broker
    reads itself (besides routing's), given to :meth:`Broker.configure_queue` before consuming and
    before publishing; ``check_queue_options`` checks them at decoration time (raising
    ConfigurationError). ``priority_option``: the ``queue_options`` key that gives a queue its
    priorities (up to the value), when priority is per queue and off by default (RabbitMQ's
    ``x-max-priority``); empty when every queue of the broker has them.
    ``counts_delayed``, ``purges_delayed``, ``purge_spares_held``: ``count`` and ``purge`` take in a
    queue's waiting messages, ready and delayed, never those held by consumers (DESIGN §3); False
    where a broker cannot: ``count`` may leave delayed messages out, ``purge`` may leave them (due
    later), ``purge`` deletes held messages too (their acks then do nothing). docs/operations.md has
    the table.
    ``settle_delay``: seconds after ``ack``, ``nack`` or ``dead_letter`` returned within which the
    settlement survives the death of the process (SIGKILL) that keeps consuming; 0 where it does once
    the call returned. A client that sends settlements in groups or with a later fetch says here how
    long that takes at most (docs/guarantees.md): a call that ended less than that before a kill may
    run again.
    """

    redelivery: Redelivery = "none"
    delay: DelayKind = "none"
    max_priority: int = 0
    dead_letters: bool = False
    key_value: bool = False
    routing: RoutingKind = "none"
    persistent: bool = False
    cross_process: bool = False
    cross_host: bool = False
    fifo: bool = True
    release_front: bool = True
    green_threads: bool = True
    queue_names: Callable[[str], object] | None = None
    queue_options: frozenset[str] = frozenset()  # broker_exclusive_config keys read by configure_queue
    check_queue_options: Callable[[dict[str, object]], object] | None = None
    priority_option: str = ""
    counts_delayed: bool = True
    purges_delayed: bool = True
    purge_spares_held: bool = True
    settle_delay: float = 0.0

    def own_options(self, config: Mapping[str, object] | None) -> dict[str, object]:
        """The keys of a ``broker_exclusive_config`` that the broker reads itself (``queue_options``)."""
        return {key: value for key, value in (config or {}).items() if key in self.queue_options}

    @property
    def ack(self) -> bool:
        """At-least-once: a message leaves only when settled, and comes back if its consumer dies."""
        return self.redelivery != "none"

    @property
    def priority(self) -> bool:
        return self.max_priority > 0
