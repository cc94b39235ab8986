"""Exchanges and routing keys (seed 003, DESIGN §9): the vocabulary every broker shares.

A queue is bound to an exchange of one of three types, with binding keys:

* ``fanout``: every bound queue gets every message; keys are ignored;
* ``direct``: a queue gets a message whose routing key equals one of its binding keys;
* ``topic``: keys are words separated by dots; in a binding key ``*`` stands for exactly one word
  and ``#`` for zero or more words (``lazy.#`` matches ``lazy``, ``lazy.pink.rabbit``).

Brokers with native exchanges (RabbitMQ, kombu) hand these to the server. Brokers that emulate
routing keep :class:`Binding` rows themselves and choose the queues of a routed publish with
:func:`matching_queues`, then write to all of them at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from funboost_like.brokers.base import Capabilities

from funboost_like.core.errors import BrokerError, ConfigurationError, UnroutableError

logger = logging.getLogger("funboost_like.routing")

ExchangeType = Literal["fanout", "direct", "topic"]
EXCHANGE_TYPES: tuple[str, ...] = ("fanout", "direct", "topic")


@dataclass(frozen=True)
class Binding:
    """``queue`` receives what is published to ``exchange`` with a routing key matching ``key``."""

    exchange: str
    exchange_type: str
    queue: str
    key: str


ROUTING_OPTIONS = ("exchange_name", "exchange_type", "routing_key_for_bind", "routing_key_for_publish")


@dataclass(frozen=True)
class RoutingConfig:
    """A queue's exchange, read from ``broker_exclusive_config`` (funboost's option names)."""

    exchange: str
    exchange_type: str
    bind_keys: tuple[str, ...]
    publish_key: str  # the routing key of a publish that names none


def routing_config(options: Mapping[str, object] | None, queue: str,
                   broker_options: frozenset[str] = frozenset()) -> RoutingConfig | None:
    """The :class:`RoutingConfig` of ``broker_exclusive_config`` (None without ``exchange_name``).

    ``exchange_type`` defaults to ``direct``; ``routing_key_for_bind`` (a key or a list of keys) to
    the queue's name; ``routing_key_for_publish`` to the queue's name. Raises ConfigurationError for
    an unknown option or a malformed value."""
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ConfigurationError(f"broker_exclusive_config must be a dict, got {type(options).__name__}")
    known = [*ROUTING_OPTIONS, *sorted(broker_options)]  # the broker's own keys are its to check
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigurationError(f"unknown broker_exclusive_config option(s) {unknown}; known: {known}")
    options = {key: value for key, value in options.items() if key in ROUTING_OPTIONS}
    if "exchange_name" not in options:
        if options:
            raise ConfigurationError(f"broker_exclusive_config {dict(options)!r} needs an exchange_name")
        return None
    exchange, exchange_type = options["exchange_name"], options.get("exchange_type", "direct")
    check_exchange(exchange, exchange_type)  # type: ignore[arg-type]
    publish_key = options.get("routing_key_for_publish", "" if exchange_type == "fanout" else queue)
    if not isinstance(publish_key, str):
        raise ConfigurationError(f"routing_key_for_publish must be a string, got {publish_key!r}")
    keys = binding_keys(exchange_type, options.get("routing_key_for_bind"), queue)  # type: ignore[arg-type]
    return RoutingConfig(exchange, exchange_type, keys, publish_key)  # type: ignore[arg-type]


def check_exchange(exchange: str, exchange_type: str) -> None:
    """Raise ConfigurationError for an empty exchange name or an unknown exchange type."""
    if not isinstance(exchange, str) or not exchange:
        raise ConfigurationError(f"exchange_name must be a non-empty string, got {exchange!r}")
    if exchange_type not in EXCHANGE_TYPES:
        raise ConfigurationError(f"exchange_type must be one of {', '.join(EXCHANGE_TYPES)}; got {exchange_type!r}")


def binding_keys(exchange_type: str, keys: str | Sequence[str] | None, queue: str) -> tuple[str, ...]:
    """The binding keys of ``queue``: ``keys`` as a tuple; the queue's name when none are given (fanout: ``("",)``)."""
    if exchange_type == "fanout":
        return ("",)
    if keys is None or keys == []:
        return (queue,)
    if not isinstance(keys, (str, list, tuple)):
        raise ConfigurationError(f"routing_key_for_bind must be a string or a list of strings, got {keys!r}")
    items = (keys,) if isinstance(keys, str) else tuple(keys)
    for key in items:
        if not isinstance(key, str):
            raise ConfigurationError(f"routing_key_for_bind must be a string or a list of strings, got {key!r}")
    return items


@functools.lru_cache(maxsize=4096)
def _words(key: str) -> tuple[str, ...]:
    return tuple(key.split(".")) if key else ()  # "": no word at all, as on RabbitMQ


def topic_matches(binding_key: str, routing_key: str) -> bool:
    """Whether ``routing_key`` matches the topic ``binding_key`` (RabbitMQ's semantics): word by word,
    ``*`` one word, ``#`` zero or more words."""
    pattern, words = _words(binding_key), routing_key.split(".") if routing_key else []  # "": no word at all
    # reachable[j]: the pattern read so far can consume exactly the first j words.
    reachable = [True] + [False] * len(words)
    for part in pattern:
        if part == "#":
            for j in range(1, len(words) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            for j in range(len(words), 0, -1):
                reachable[j] = reachable[j - 1] and (part == "*" or part == words[j - 1])
            reachable[0] = False
    return reachable[-1]


def matches(exchange_type: str, binding_key: str, routing_key: str) -> bool:
    if exchange_type == "fanout":
        return True
    if exchange_type == "direct":
        return binding_key == routing_key
    return topic_matches(binding_key, routing_key)


def matching_queues(bindings: Iterable[Binding], routing_key: str) -> list[str]:
    """The queues whose bindings match ``routing_key``, each once, in the order first bound."""
    queues: dict[str, None] = {}
    for binding in bindings:
        if binding.queue not in queues and matches(binding.exchange_type, binding.key, routing_key):
            queues[binding.queue] = None
    return list(queues)


def added_bindings(existing: Sequence[Binding], new: Sequence[Binding]) -> list[Binding]:
    """The rows of ``new`` not in ``existing``, for a broker that keeps binding rows.

    An exchange keeps the type it was first declared with: bindings asking for another type are
    taken with the existing type, and a warning says so (RabbitMQ's kinds do the same with an
    exchange that already exists)."""
    declared = existing[0].exchange_type if existing else None
    rows = []
    for binding in new:
        if declared is not None and binding.exchange_type != declared:
            logger.warning("exchange %r exists as %s; binding queue %r with key %r to it as it is, not as %s",
                           binding.exchange, declared, binding.queue, binding.key, binding.exchange_type)
            binding = Binding(binding.exchange, declared, binding.queue, binding.key)
        if binding not in existing and binding not in rows:
            rows.append(binding)
    return rows


class Routing:
    """The routing part of the broker contract, mixed into :class:`~funboost_like.brokers.base.Broker`:
    the public :meth:`bind` and :meth:`publish_routed`, and the primitives a routing broker implements."""

    capabilities: ClassVar[Capabilities]
    _client_errors: tuple[type[BaseException], ...]

    if TYPE_CHECKING:  # the base's

        def _translated(self, exc: BaseException, action: str) -> BrokerError: ...

        def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None: ...

    def bind(self, queue: str, exchange: str, exchange_type: str, keys: str | Sequence[str] | None = None) -> None:
        """Bind ``queue`` to ``exchange`` (``fanout``, ``direct`` or ``topic``) with the binding ``keys``
        (the queue's name when none are given), declaring both. Idempotent."""
        if self.capabilities.routing == "none":
            raise BrokerError(f"{type(self).__name__} has no exchanges or routing keys")
        check_exchange(exchange, exchange_type)
        bindings = [Binding(exchange, exchange_type, queue, key) for key in binding_keys(exchange_type, keys, queue)]
        try:
            self._bind(bindings)
        except self._client_errors as exc:
            raise self._translated(exc, f"binding queue {queue!r} to exchange {exchange!r}") from exc

    def publish_routed(self, exchange: str, routing_key: str, bodies: Sequence[bytes], *, priority: int = 0,
                       not_before: float | None = None) -> int:
        """Publish ``bodies`` through ``exchange`` to every queue whose binding matches ``routing_key``.

        Returns how many queues got them (-1: at least one, the broker does not say how many). Raises
        :class:`~funboost_like.core.errors.UnroutableError` when no queue matches: a message is never
        dropped in silence.
        """
        try:
            reached = self._put_routed(exchange, routing_key, bodies, priority=priority, not_before=not_before)
        except self._client_errors as exc:
            raise self._translated(exc, f"publishing to exchange {exchange!r}") from exc
        if reached == 0:
            raise UnroutableError(f"no queue bound to exchange {exchange!r} matches routing key {routing_key!r}; "
                                  f"{len(bodies)} message(s) not published")
        return reached


    # -- primitives ----------------------------------------------------------------------------
    def _bind(self, bindings: Sequence[Binding]) -> None:
        """Routing brokers: declare the exchange and queue of ``bindings`` (one exchange, one queue) and
        bind them. Emulating brokers keep the rows, for :meth:`_bindings`."""
        raise NotImplementedError

    def _bindings(self, exchange: str) -> list[Binding]:
        """Emulating brokers: the bindings of ``exchange``."""
        raise NotImplementedError

    def _put_routed(self, exchange: str, routing_key: str, bodies: Sequence[bytes], *, priority: int,
                    not_before: float | None) -> int:
        """Routing brokers: publish ``bodies`` to every queue bound to ``exchange`` whose binding matches
        ``routing_key``; return how many queues got them (0: none matched; -1: some, count unknown).

        The default (emulated routing) picks the queues from :meth:`_bindings` and writes to all of them
        with :meth:`_put_many`."""
        queues = matching_queues(self._bindings(exchange), routing_key)
        if queues:
            self._put_many(queues, bodies, priority=priority, not_before=not_before)
        return len(queues)

    def _put_many(self, queues: Sequence[str], bodies: Sequence[bytes], *, priority: int,
                  not_before: float | None) -> None:
        """Emulated routing: :meth:`_put` ``bodies`` to each of ``queues``, all or none (override to make
        it atomic; this default is not)."""
        for queue in queues:
            self._put(queue, bodies, priority=priority, not_before=not_before)

