"""Publishing calls to a queue: argument checks, encoding, and the broker's publish."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from funboost_like.brokers import registry
from funboost_like.brokers.registry import get_broker
from funboost_like.brokers.routing import RoutingConfig, routing_config
from funboost_like.core import arg_cache, codec
from funboost_like.core.errors import ConfigurationError, PublishError
from funboost_like.core.message import EXTRA_KEY, FunctionSignature, batch_encoder, encode
from funboost_like.core.params import ConsumerParams, PriorityConsumingControlConfig
from funboost_like.core.results import RESULTS_NAMESPACE, AsyncResult
from funboost_like.middleware.base import build_callback_hooks, build_publish_hooks, queue_used
from funboost_like.observability.metrics import publish_counter
from funboost_like.observability.tracing import PublishSpan, publish_tracing

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker
    from funboost_like.core.stores import KeyValueStore

logger = logging.getLogger("funboost_like.publisher")


class Publisher:
    """Publishes messages for one queue. Also reachable as ``consumer.publisher_of_same_queue``."""

    def __init__(self, params: ConsumerParams, signature: FunctionSignature | None) -> None:
        self.params = params
        self.queue_name = params.queue_name
        self.signature = signature
        self._broker: Broker | None = None
        self._broker_generation = -1
        multi = signature is not None and signature.multi_params
        self._bind = signature.bind if signature is not None and multi else _bind_one_dict
        self._hooks = build_publish_hooks(self)
        self._callback_hooks = build_callback_hooks(self)
        self._counter = publish_counter(self)  # METRICS: None while off
        self._tracing = publish_tracing(self)  # OpenTelemetry: None while off or not installed
        self._results: KeyValueStore | None = None
        self._results_broker: Broker | None = None
        # the class's capabilities: creating the broker here would register the queue before any publish
        own_options = registry.broker_class(params.broker_kind).capabilities.queue_options
        self.routing: RoutingConfig | None = routing_config(params.broker_exclusive_config, params.queue_name,
                                                            own_options)
        self._bound_to: Broker | None = None  # the broker this queue's binding was declared on
        self._unindexed: Broker | None = None  # a broker resolved, not yet told to the operations registry
        if self.routing is not None and params.use_cache:
            raise ConfigurationError(_CACHE_AND_ROUTING)

    @property
    def broker(self) -> Broker:
        broker = self._broker
        if broker is None or self._broker_generation != registry.generation:
            broker = self._broker = get_broker(self.params.broker_kind)
            self._broker_generation = registry.generation
            # e.g. RabbitMQ's x-max-priority: a publisher declares the queue too, so it must know
            options = broker.capabilities.own_options(self.params.broker_exclusive_config)
            if options:
                broker.configure_queue(self.queue_name, options)
            self._unindexed = broker  # the operations registry learns the queue at its first publish
        return broker

    def _sent(self, task_id: str | None, span: PublishSpan | None) -> None:
        """One message reached the broker: end its publish span, count it, index the queue once."""
        if self._unindexed is not None:
            self._index()
        if span is not None:
            span.end(task_id)
        if self._counter is not None:
            self._counter.add_published(1)

    def _index(self) -> None:
        """After the first publish that reached the broker (not before: a publish to an unreachable server
        then waits out one timeout, not two), the operations registry learns the queue; once per broker."""
        broker, self._unindexed = self._unindexed, None
        if broker is not None:
            queue_used(self.queue_name, broker)

    def push(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Publish ``fn(*args, **kwargs)``; a call that does not fit the signature raises at once."""
        message = self._bind(args, kwargs)  # a new dict, which encode owns and completes with ``extra``
        extra = self._cache(message) if self.params.use_cache else None
        span = self._tracing.start(extra) if self._tracing is not None else None
        task_id = None
        try:
            task_id, body = encode(message, extra if span is None else span.extra)
            if self.routing is None:
                self.broker.publish(self.queue_name, body)
            else:
                self._publish_routed(None, (body,))
        except BaseException as exc:
            if span is not None:
                span.end(task_id, exc)
            raise
        if self._unindexed is not None:  # inline, like the rest: push is the hottest publish path
            self._index()
        if span is not None:
            span.end(task_id)
        if self._counter is not None:
            self._counter.add_published(1)
        if self._hooks:
            self._after_publish(task_id, message)
        if self.params.is_using_rpc_mode:
            return self._rpc_result(task_id)
        return AsyncResult(task_id)

    def publish(self, msg: Mapping[str, Any] | str,
                priority_control_config: PriorityConsumingControlConfig | None = None, *,
                routing_key: str | None = None) -> AsyncResult:
        """Publish one call given as a dict (or JSON text) of keyword arguments, with optional options.

        ``routing_key`` (or the option's ``routing_key``) publishes through the queue's exchange to
        every queue bound with a matching key; without one, the exchange gets ``routing_key_for_publish``.
        """
        kwargs, extra = self._split(msg)
        priority = 0
        not_before = None
        if priority_control_config is not None:
            now = time.time()
            extra.update(priority_control_config.to_extra(now))
            priority = priority_control_config.priority
            not_before = priority_control_config.not_before(now)
            self._check_capabilities(priority, not_before)
            if routing_key is None:
                routing_key = priority_control_config.routing_key
            use_cache = priority_control_config.use_cache
        else:
            use_cache = None
        if self.params.use_cache if use_cache is None else use_cache:
            if self.routing is not None:
                raise ConfigurationError(_CACHE_AND_ROUTING)
            extra.update(self._cache(kwargs) or {})
        if routing_key is not None and not isinstance(routing_key, str):
            raise ConfigurationError(f"routing_key must be a string, got {routing_key!r}")
        if routing_key is not None and self.routing is None:
            raise ConfigurationError(f"routing_key={routing_key!r} needs an exchange: queue {self.queue_name!r} has no "
                                     "exchange_name in broker_exclusive_config")
        span = self._tracing.start(extra) if self._tracing is not None else None
        task_id = None
        try:
            task_id, body = encode(kwargs, extra if span is None else span.extra)
            if self.routing is not None:
                self._publish_routed(routing_key, (body,), priority=priority, not_before=not_before)
            else:
                self.broker.publish(self.queue_name, body, priority=priority, not_before=not_before)
        except BaseException as exc:
            if span is not None:
                span.end(task_id, exc)
            raise
        self._sent(task_id, span)
        if self._hooks:
            self._after_publish(task_id, kwargs)
        rpc = extra.get("is_using_rpc_mode")  # a per-message choice; None: the decorator's
        if self.params.is_using_rpc_mode if rpc is None else rpc:
            return self._rpc_result(task_id)
        return AsyncResult(task_id)

    pub = publish

    def publish_many(self, msgs: Iterable[Mapping[str, Any] | str]) -> list[str]:
        """Publish many calls in one broker round trip (or transaction); return their task ids.

        Without publish hooks, a plain dict without ``extra`` (the usual message) is checked and
        encoded without being copied, by a :func:`batch_encoder` whose calls share one publish time.
        """
        task_ids: list[str] = []
        bodies: list[bytes] = []
        messages: list[dict[str, Any]] = []
        hooks = self._hooks
        signature = self.signature if self.signature is not None and self.signature.multi_params else None
        tracing = self._tracing
        spans: list[PublishSpan] | None = [] if tracing is not None and tracing.active() else None
        encode_plain = None if hooks or self.params.use_cache or spans is not None else batch_encoder()
        for msg in msgs:
            if encode_plain is not None and type(msg) is dict and EXTRA_KEY not in msg:
                if signature is not None:
                    signature.check_keys(msg)
                task_id, body = encode_plain(msg)
            else:
                kwargs, extra = self._split(msg)
                if self.params.use_cache:
                    extra.update(self._cache(kwargs) or {})
                if spans is not None and tracing is not None:
                    spans.append(tracing.started(extra))
                    extra = spans[-1].extra
                task_id, body = encode(kwargs, extra)
                if hooks:
                    messages.append(kwargs)
            task_ids.append(task_id)
            bodies.append(body)
        if bodies:
            self._send_many(bodies, task_ids, spans)
            if hooks:
                for task_id, message in zip(task_ids, messages, strict=True):
                    self._after_publish(task_id, message)
        return task_ids

    def _send_many(self, bodies: list[bytes], task_ids: list[str], spans: list[PublishSpan] | None) -> None:
        """Publish a batch, ending its publish spans and counting it."""
        try:
            if self.routing is None:
                self.broker.publish_many(self.queue_name, bodies)
            else:
                self._publish_routed(None, bodies)
        except BaseException as exc:
            for span, task_id in zip(spans or (), task_ids, strict=False):
                span.end(task_id, exc)
            raise
        if self._unindexed is not None:
            self._index()
        for span, task_id in zip(spans or (), task_ids, strict=False):
            span.end(task_id)
        if self._counter is not None:
            self._counter.add_published(len(bodies))

    @staticmethod
    def _cache(kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Cache mode: keep the arguments JSON cannot carry in this process; the ``extra`` that names them."""
        reference = arg_cache.stash(kwargs)
        return None if reference is None else {arg_cache.CACHE_KEY: reference}

    def _publish_routed(self, routing_key: str | None, bodies: tuple[bytes, ...] | list[bytes], *, priority: int = 0,
                        not_before: float | None = None) -> None:
        """Publish through the queue's exchange, after binding the queue itself once per broker (so its
        own messages reach it before any consumer started)."""
        routing = self.routing
        assert routing is not None
        broker = self.broker
        if self._bound_to is not broker:
            broker.bind(self.queue_name, routing.exchange, routing.exchange_type, routing.bind_keys)
            self._bound_to = broker
        key = routing.publish_key if routing_key is None else routing_key
        broker.publish_routed(routing.exchange, key, bodies, priority=priority, not_before=not_before)

    def results_store(self) -> KeyValueStore | None:
        """The queue's RPC result store (namespace ``results``), or None when the broker keeps no records."""
        broker = self.broker
        if self._results_broker is not broker:
            self._results = (broker.key_value_store(self.queue_name, RESULTS_NAMESPACE)
                             if broker.capabilities.key_value else None)
            self._results_broker = broker
        return self._results

    def _rpc_result(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, self.results_store(), rpc=True, queue_name=self.queue_name,
                           on_callback=self._after_callback if self._callback_hooks else None)

    def _after_callback(self, task_id: str) -> None:
        """Run the hooks of a returned result callback (e.g. recording 'callbacked'); a failing hook is logged only."""
        for hook in self._callback_hooks:
            try:
                hook(task_id)
            except Exception:
                logger.exception("result-callback hook %r failed for task %s", hook, task_id)

    def _after_publish(self, task_id: str, message: dict[str, Any]) -> None:
        """Run the publish-side hooks (e.g. recording 'not started'); a failing hook is logged only."""
        for hook in self._hooks:
            try:
                hook(task_id, message)
            except Exception:
                logger.exception("publish hook %r failed for task %s", hook, task_id)

    def _split(self, msg: Mapping[str, Any] | str) -> tuple[dict[str, Any], dict[str, Any]]:
        if isinstance(msg, (str, bytes)):
            try:
                msg = codec.loads(msg)
            except codec.DecodeFailure as exc:
                raise PublishError(f"message text is not valid JSON: {exc}") from exc
        if not isinstance(msg, Mapping):
            raise PublishError(f"a message must be a dict of keyword arguments, got {type(msg).__name__}")
        kwargs = dict(msg)
        extra = kwargs.pop(EXTRA_KEY, None) or {}
        if not isinstance(extra, dict):
            raise PublishError(f"the reserved key {EXTRA_KEY!r} must hold a dict")
        if self.signature is not None and self.signature.multi_params:
            self.signature.check_keys(kwargs)
        return kwargs, dict(extra)

    def _check_capabilities(self, priority: int, not_before: float | None) -> None:
        caps = self.broker.capabilities
        if priority and not caps.priority:
            raise ConfigurationError(f"broker {self.params.broker.name} does not support message priority")
        if priority and not 0 <= priority <= caps.max_priority:
            raise ConfigurationError(
                f"priority must be between 0 and {caps.max_priority} on this broker, got {priority}"
            )
        if not_before is not None and caps.delay == "none":
            raise ConfigurationError(f"broker {self.params.broker.name} does not support delayed messages")

    def clear(self) -> int:
        """Delete every waiting message of the queue; return how many."""
        return self.broker.purge(self.queue_name)

    def get_message_count(self) -> int:
        return self.broker.count(self.queue_name)


_CACHE_AND_ROUTING = ("use_cache passes a call's arguments by reference to the one run that takes them; a message "
                      "through an exchange may reach several queues, so the two cannot go together")


def _bind_one_dict(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``push`` for a function that takes the whole message as one dict."""
    if len(args) != 1 or kwargs or not isinstance(args[0], Mapping):
        raise PublishError("with is_consuming_function_use_multi_params=False, push takes exactly one dict")
    return dict(args[0])
