"""The middleware contract: features around the consume path, never branches inside the loop.

A middleware overrides only the hooks it needs; the consumer calls a hook only on the middlewares
that override it, so an unused hook costs nothing. A hook that raises is logged and does not take
the consumer down.

- ``pause_for()`` (fetcher thread, before each fetch): seconds to wait before fetching; 0 to go on.
- ``before_call(call)`` (worker): return a reason string to skip the call; the message is then
  acknowledged without running, counted as skipped and the reason logged.
- ``on_start(call)`` (worker): the call is about to run (first attempt).
- ``after_call(call)`` (worker): the message reached its final outcome (``call.outcome``), once.
- ``close()``: the consumer stopped.

Features are listed in ``FEATURES`` as ``"module:factory"``; a factory takes the consumer and
returns a middleware, or None when the consumer's parameters do not need it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from funboost_like.brokers.base import Delivery
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.message import DecodedMessage
    from funboost_like.core.publisher import Publisher

# Outcome codes of a message.
SUCCEEDED, FAILED, REQUEUED, DEAD_LETTERED, SKIPPED, RELEASED = range(6)
OUTCOME_NAMES = ("succeeded", "failed", "requeued", "dead_lettered", "skipped", "released")


class Call:
    """One message's run through the consumer, as the hooks see it."""

    __slots__ = ("consumer", "delivery", "message", "attempts", "started_at", "duration", "result", "exc",
                 "outcome", "skip_reason")

    def __init__(self, consumer: Consumer, delivery: Delivery, message: DecodedMessage) -> None:
        self.consumer = consumer
        self.delivery = delivery
        self.message = message
        self.attempts = 0  # runs of the function so far
        self.started_at = 0.0  # time.time() of the first run
        self.duration = 0.0  # seconds, all runs together
        self.result: Any = None
        self.exc: BaseException | None = None
        self.outcome = -1
        self.skip_reason = ""

    @property
    def task_id(self) -> str | None:
        return self.message.task_id

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.message.kwargs

    @property
    def extra(self) -> dict[str, Any]:
        return self.message.extra

    @property
    def queue_name(self) -> str:
        return self.consumer.queue_name


class Middleware:
    def pause_for(self) -> float:
        return 0.0

    def before_call(self, call: Call) -> str | None:
        return None

    def on_start(self, call: Call) -> None:
        return None

    def after_call(self, call: Call) -> None:
        return None

    def close(self) -> None:
        return None


FEATURES = [
    "funboost_like.middleware.expiry:build",
    "funboost_like.middleware.filtering:build",
    "funboost_like.middleware.rpc:build",
    "funboost_like.middleware.time_window:build",
    "funboost_like.middleware.status:build",
]

# Publish-side features: a factory takes the publisher and returns a hook
# ``hook(task_id, message)`` (message: the keyword arguments plus ``extra``), or None.
PUBLISH_FEATURES: list[str] = [
    "funboost_like.middleware.status:build_publish_hook",
]


def build_middlewares(consumer: Consumer) -> list[Middleware]:
    """The middlewares this consumer needs, in ``FEATURES`` order."""
    chain: list[Middleware] = []
    for path in FEATURES:
        module_name, _, factory_name = path.partition(":")
        factory = getattr(importlib.import_module(module_name), factory_name)
        middleware = factory(consumer)
        if middleware is not None:
            chain.append(middleware)
    return chain


def overriding(chain: list[Middleware], hook: str) -> list[Middleware]:
    """The middlewares of ``chain`` that override ``hook``."""
    base = getattr(Middleware, hook)
    return [m for m in chain if getattr(type(m), hook) is not base]


def build_publish_hooks(publisher: Publisher) -> list[Callable[[str, dict[str, Any]], None]]:
    """The publish-side hooks this publisher needs, in ``PUBLISH_FEATURES`` order."""
    hooks: list[Callable[[str, dict[str, Any]], None]] = []
    for path in PUBLISH_FEATURES:
        module_name, _, factory_name = path.partition(":")
        hook = getattr(importlib.import_module(module_name), factory_name)(publisher)
        if hook is not None:
            hooks.append(hook)
    return hooks
