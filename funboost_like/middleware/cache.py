"""Cache mode around the consume path (seed 002's ``use_cache``; the cache is :mod:`funboost_like.core.arg_cache`).

Decoding a message takes its cached arguments out of the cache. For a function decorated with
``use_cache=True``, a message that goes back to its queue (``retry_backoff``, ``ExceptionForRequeue``)
gets them cached again under the same key, for its next run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from funboost_like.core import arg_cache
from funboost_like.core.calls import REQUEUED, Call, Middleware

if TYPE_CHECKING:
    from funboost_like.core.consumer import Consumer


class CacheAgain(Middleware):
    def after_call(self, call: Call) -> None:
        reference = call.extra.get(arg_cache.CACHE_KEY)
        if call.outcome == REQUEUED and isinstance(reference, dict):
            arg_cache.put_back(reference, call.kwargs)


def build(consumer: Consumer) -> Middleware | None:
    return CacheAgain() if consumer.params.use_cache else None
