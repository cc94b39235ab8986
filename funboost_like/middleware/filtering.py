"""Task filtering (``do_task_filtering``, ``task_filtering_expire_seconds``; seed 1.0.1).

A call whose arguments equal those of a call that already succeeded is skipped: acknowledged
without running, counted as skipped, logged. Arguments are compared after binding them to the
function's signature with defaults applied, so ``add(1, 2)``, ``add(b=2, a=1)`` and (when ``c``
defaults to 0) ``add(1, 2, c=0)`` are the same call. The filter key is the sha1 of their canonical
JSON (sorted keys); it is recorded in the queue's key-value store, namespace ``filter``, only when a
call succeeded (a failed call runs again next time), for ``task_filtering_expire_seconds`` (0:
forever). The store is the broker's (memory, a SQLite file beside the queue, Redis), so every
consumer of the queue shares the filter.

Two identical calls running at the same moment both run: a call is filtered only once an identical
one has finished successfully.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from funboost_like.core import codec
from funboost_like.core.calls import SUCCEEDED, Call, Middleware
from funboost_like.core.params import check_non_negative
from funboost_like.core.stores import require_key_value_store

if TYPE_CHECKING:
    from funboost_like.brokers.base import Capabilities
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.params import ConsumerParams
    from funboost_like.core.stores import KeyValueStore

FILTER_NAMESPACE = "filter"
SKIP_REASON = "filtered: an identical call already succeeded"


def filter_key(signature: inspect.Signature | None, kwargs: Mapping[str, Any]) -> str:
    """The filter key of a call: sha1 of the canonical JSON of its arguments bound to ``signature``.

    Without a signature (a function taking the whole message as one dict), the message itself is
    what is compared.
    """
    arguments: Mapping[str, Any] = kwargs
    if signature is not None:
        try:
            bound = signature.bind(**kwargs)
        except TypeError:
            pass  # cannot happen for a decoded message; compare the raw arguments then
        else:
            bound.apply_defaults()
            arguments = bound.arguments
    try:
        text = json.dumps(arguments, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):  # e.g. a default holding a dict with keys of mixed types
        text = repr(sorted(arguments.items()))
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class TaskFilter(Middleware):
    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        expire = consumer.params.task_filtering_expire_seconds
        self.ttl = float(expire) if expire else None
        self.signature = consumer.signature.signature if consumer.signature.multi_params else None
        self._store: KeyValueStore | None = None
        self._keys: dict[int, str] = {}  # id(call) -> its key, from before_call to after_call

    @property
    def store(self) -> KeyValueStore:
        store = self._store
        if store is None:
            store = self._store = self.consumer.broker.key_value_store(self.consumer.queue_name, FILTER_NAMESPACE)
        return store

    def before_call(self, call: Call) -> str | None:
        # Keyed before the call runs, in case the function changes its (mutable) arguments.
        key = self._keys[id(call)] = filter_key(self.signature, call.kwargs)
        if self.store.exists(key):
            del self._keys[id(call)]
            return SKIP_REASON
        return None

    def after_call(self, call: Call) -> None:
        key = self._keys.pop(id(call), None)
        if call.outcome != SUCCEEDED:
            return
        if key is None:
            key = filter_key(self.signature, call.kwargs)
        self.store.put(key, codec.dumps({"task_id": call.task_id, "succeeded_at": time.time()}), self.ttl)


def check_params(params: ConsumerParams, capabilities: Capabilities) -> None:
    check_non_negative(params, "task_filtering_expire_seconds")
    if params.do_task_filtering:
        require_key_value_store(capabilities, params.broker.name, "do_task_filtering=True")


def build(consumer: Consumer) -> Middleware | None:
    if not consumer.params.do_task_filtering:
        return None
    return TaskFilter(consumer)
