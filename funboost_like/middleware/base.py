"""The feature table: which modules implement the hooks around the consume and publish paths.

The hook contract itself (:class:`~funboost_like.core.calls.Middleware`, :class:`~funboost_like.core.calls.Call`,
the outcome codes and statuses) is the consumer's vocabulary and lives in :mod:`funboost_like.core.calls`.

Each module of ``FEATURES`` provides:

* ``build(consumer)``: a middleware for that consumer, or None when its parameters do not need one;
* optionally ``check_params(params, capabilities)``: validate the feature's own decorator parameters
  against the chosen broker's capabilities, raising ``ConfigurationError`` (a ``ValueError``) at
  decoration time. :func:`param_checks` collects them for :func:`funboost_like.core.params.build_params`.

``OPS_FEATURE`` (one of ``FEATURES``) also provides ``queue_used(queue, broker)``, which a publisher
calls once per broker it resolves (:func:`queue_used`), so the operations registry knows a queue from
its first publish.

Each module of ``PUBLISH_FEATURES`` provides ``build_publish_hook(publisher)`` (a hook
``hook(task_id, message)`` run after each publish; message: the keyword arguments plus ``extra``)
and ``build_callback_hook(publisher)`` (a hook ``hook(task_id)`` run after a result callback of that
task returned); either may return None.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from funboost_like.core.calls import Middleware

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.params import ParamsCheck
    from funboost_like.core.publisher import Publisher

FEATURES = [
    "funboost_like.middleware.expiry",
    "funboost_like.middleware.filtering",
    "funboost_like.middleware.rpc",
    "funboost_like.middleware.time_window",
    "funboost_like.middleware.status",
    "funboost_like.middleware.routing",
    "funboost_like.middleware.cache",
    "funboost_like.middleware.run_log",
    "funboost_like.ops.agent",
    "funboost_like.middleware.heartbeat",
    "funboost_like.observability.metrics",
    "funboost_like.observability.tracing",  # last: its span starts just before the call
]

PUBLISH_FEATURES = [
    "funboost_like.middleware.status",
]

OPS_FEATURE = "funboost_like.ops.agent"

PublishHook = Callable[[str, dict[str, Any]], None]
CallbackHook = Callable[[str], None]


def _modules(table: list[str]) -> list[ModuleType]:
    return [importlib.import_module(name) for name in table]


def build_middlewares(consumer: Consumer) -> list[Middleware]:
    """The middlewares this consumer needs, in ``FEATURES`` order."""
    chain: list[Middleware] = []
    for module in _modules(FEATURES):
        middleware = module.build(consumer)
        if middleware is not None:
            chain.append(middleware)
    return chain


def overriding(chain: list[Middleware], hook: str) -> list[Middleware]:
    """The middlewares of ``chain`` that override ``hook``."""
    base = getattr(Middleware, hook)
    return [m for m in chain if getattr(type(m), hook) is not base]


@cache
def param_checks() -> tuple[ParamsCheck, ...]:
    """The ``check_params`` functions of the features, in ``FEATURES`` order."""
    return tuple(module.check_params for module in _modules(FEATURES) if hasattr(module, "check_params"))


def build_publish_hooks(publisher: Publisher) -> list[PublishHook]:
    """The publish-side hooks this publisher needs, in ``PUBLISH_FEATURES`` order."""
    hooks = (module.build_publish_hook(publisher) for module in _modules(PUBLISH_FEATURES))
    return [hook for hook in hooks if hook is not None]


def build_callback_hooks(publisher: Publisher) -> list[CallbackHook]:
    """The hooks to run after a result callback of one of this publisher's tasks returned."""
    hooks = (module.build_callback_hook(publisher) for module in _modules(PUBLISH_FEATURES))
    return [hook for hook in hooks if hook is not None]


def queue_used(queue: str, broker: Broker) -> None:
    """A publisher of ``queue`` resolved ``broker`` (once per broker): tell the operations registry."""
    importlib.import_module(OPS_FEATURE).queue_used(queue, broker)
