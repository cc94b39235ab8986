"""RPC results (``is_using_rpc_mode``, seed 2.7): the consumer keeps each call's outcome for the publisher.

RPC mode is on for a message when its ``extra`` says ``"is_using_rpc_mode": true`` (publish-time
``PriorityConsumingControlConfig(is_using_rpc_mode=True)``), or when ``extra`` does not say and the
consumer's decorator has ``is_using_rpc_mode=True``. For such a message, once it reached its final
outcome, one JSON record goes under its task id into the queue's key-value store, namespace
``results``, for ``RPC_RESULT_EXPIRE_SECONDS`` (the layout is in :mod:`funboost_like.core.results`).
A requeued message stores nothing: it will run again. A result JSON cannot hold is stored as its
``repr`` with ``"result_is_repr": true`` and a warning. For a message without RPC mode the hook
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

from funboost_like.core import codec
from funboost_like.core.calls import STATUS_OF_OUTCOME, Call, Middleware, Status
from funboost_like.core.config import settings
from funboost_like.core.results import RESULTS_NAMESPACE
from funboost_like.core.stores import require_key_value_store

if TYPE_CHECKING:
    from funboost_like.brokers.base import Capabilities
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.params import ConsumerParams
    from funboost_like.core.stores import KeyValueStore

_HOST = socket.gethostname()


class RpcResults(Middleware):
    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.default = bool(consumer.params.is_using_rpc_mode)
        self._store: KeyValueStore | None = None

    @property
    def store(self) -> KeyValueStore:
        store = self._store
        if store is None:
            store = self._store = self.consumer.broker.key_value_store(self.consumer.queue_name, RESULTS_NAMESPACE)
        return store

    def after_call(self, call: Call) -> None:
        rpc = call.message.extra.get("is_using_rpc_mode", self.default)
        if not rpc:
            return
        status = STATUS_OF_OUTCOME.get(call.outcome)
        task_id = call.task_id
        if status is None or status not in Status.RESULTS or task_id is None:
            return  # requeued (it runs again), or a body without a task id
        self.store.put(task_id, self._encode(call, task_id, status), float(settings.get("RPC_RESULT_EXPIRE_SECONDS")))

    def _encode(self, call: Call, task_id: str, status: str) -> bytes:
        exc = call.exc
        record: dict[str, Any] = {
            "task_id": task_id,
            "status": status,
            "result": call.result if status == Status.FINISHED else None,
            "result_is_repr": False,
            "exception": {"type": type(exc).__name__, "message": str(exc)} if exc is not None else None,
            "skip_reason": call.skip_reason or None,
            "attempts": call.runs,
            "duration": round(call.duration, 6),
            "host": _HOST,
            "pid": os.getpid(),
            "finished_at": time.time(),
        }
        try:
            return codec.dumps(record)
        except (TypeError, ValueError) as exc_json:
            self.consumer.logger.warning("task %s: its result %s cannot be stored as JSON (%s); storing its repr",
                                         task_id, type(call.result).__name__, exc_json)
            record["result"] = repr(call.result)
            record["result_is_repr"] = True
            return codec.dumps(record)


def check_params(params: ConsumerParams, capabilities: Capabilities) -> None:
    if params.is_using_rpc_mode:
        require_key_value_store(capabilities, params.broker.name, "is_using_rpc_mode=True")


def build(consumer: Consumer) -> Middleware:
    # Always built: any message may ask for RPC mode at publish time.
    return RpcResults(consumer)
