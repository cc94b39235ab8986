"""``task_deco`` / ``boost``, ``get_consumer`` and ``run_consumer_with_multi_process``: the user-facing entry points.

This module wires the layers together: it validates parameters against the broker registry and the
features' own checks, and hands the process supervisor (which knows nothing of boosters) a target
that consumes a booster's queue in each child.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypedDict, TypeVar

from funboost_like.brokers import registry
from funboost_like.concurrency.multiprocess import ProcessSupervisor
from funboost_like.core import runtime
from funboost_like.core.consumer import Consumer
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.log import get_logger
from funboost_like.core.message import FunctionSignature
from funboost_like.core.params import (
    ConsumerParams,
    FunctionResultStatusPersistanceConfig,
    PriorityConsumingControlConfig,
    build_params,
    check_mode_fits_function,
)
from funboost_like.core.publisher import Publisher
from funboost_like.core.reference import booster_reference
from funboost_like.core.results import AsyncResult
from funboost_like.core.status_store import StatusStore, open_status_store
from funboost_like.middleware.base import param_checks

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from funboost_like.brokers.base import Broker

P = ParamSpec("P")
R = TypeVar("R")


class ConsumerOptions(TypedDict, total=False):
    """The keyword parameters of ``task_deco`` and ``get_consumer`` (seed names; see params.py)."""

    function_timeout: float
    concurrent_num: int
    specify_concurrent_pool: Any
    specify_async_loop: Any
    concurrent_mode: int
    max_retry_times: int
    log_level: int | str
    is_print_detail_exception: bool
    msg_schedule_time_intercal: float
    msg_schedule_time_interval: float
    qps: float
    is_using_distributed_frequency_control: bool
    msg_expire_senconds: float
    msg_expire_seconds: float
    is_send_consumer_hearbeat_to_redis: bool
    is_send_consumer_heartbeat_to_redis: bool
    logger_prefix: str
    create_logger_file: bool
    do_task_filtering: bool
    task_filtering_expire_seconds: float
    is_consuming_function_use_multi_params: bool
    is_do_not_run_by_specify_time_effect: bool
    do_not_run_by_specify_time: tuple[str, str]
    schedule_tasks_on_main_thread: bool
    function_result_status_persistance_conf: FunctionResultStatusPersistanceConfig
    function_result_status_persistence_conf: FunctionResultStatusPersistanceConfig
    is_using_rpc_mode: bool
    broker_kind: int
    max_crash_redeliveries: int | None
    retry_backoff: float
    retry_backoff_max: float
    retry_jitter: bool
    broker_exclusive_config: dict[str, Any] | None
    use_cache: bool


class Booster(Generic[P, R]):
    """A consuming function plus its queue. Calling it runs the function directly, here and now."""

    def __init__(self, function: Callable[P, R], params: ConsumerParams) -> None:
        functools.update_wrapper(self, function)
        self.consuming_function = function
        self.params = params
        self.queue_name = params.queue_name
        self.signature = FunctionSignature(function, params.is_consuming_function_use_multi_params)
        self.publisher = Publisher(params, self.signature)
        self.push = self.publisher.push  # type: ignore[method-assign]  # the hot path, without a hop
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Booster {self.consuming_function.__qualname__} on queue {self.queue_name!r}>"

    def __reduce__(self) -> str:
        """Pickle by reference: the module and qualname of the decorated function.

        Unpickling (in a spawned child process, say) imports that module and finds the same booster
        there; no broker connection, lock or thread is ever pickled. A booster that is not reachable
        under its function's name at the top level of its module cannot be pickled.
        """
        return self.consuming_function.__qualname__

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.consuming_function(*args, **kwargs)

    @property
    def consumer(self) -> Consumer:
        if self._consumer is None:
            with self._lock:
                if self._consumer is None:
                    self._consumer = Consumer(self.params, self.signature)
        return self._consumer

    @property
    def broker(self) -> Broker:
        return self.publisher.broker

    @property
    def status(self) -> StatusStore:
        """This queue's call records (function_result_status_persistance_conf); see docs/status.md."""
        return open_status_store(self.queue_name)

    def push(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Publish a call with the function's own arguments; a call that does not fit raises at once."""
        return self.publisher.push(*args, **kwargs)

    def publish(self, msg: Mapping[str, Any] | str,
                priority_control_config: PriorityConsumingControlConfig | None = None, *,
                routing_key: str | None = None) -> AsyncResult:
        """Publish a call given as a dict of keyword arguments, with optional publish-time options;
        ``routing_key``: through the queue's exchange (``broker_exclusive_config``) to every queue it matches."""
        return self.publisher.publish(msg, priority_control_config, routing_key=routing_key)

    pub = publish

    def publish_many(self, msgs: Iterable[Mapping[str, Any] | str]) -> list[str]:
        """Publish many calls (dicts of keyword arguments) in bulk; return their task ids."""
        return self.publisher.publish_many(msgs)

    def consume(self) -> None:
        """Start consuming in the background and return at once (with ``schedule_tasks_on_main_thread=True``:
        block until the consumer stops)."""
        self.consumer.start_consuming_message()

    start_consuming_message = consume

    def multi_process_consume(self, process_num: int = 1, *, start_method: str | None = None) -> ProcessSupervisor:
        """Consume in ``process_num`` supervised child processes; return the supervisor at once.

        Unlike :func:`funboost_like.run_consumer_with_multi_process` this does not block: the
        supervising thread keeps the process up until SIGINT/SIGTERM or ``supervisor.stop()``
        (see funboost_like/concurrency/multiprocess.py).
        """
        return start_consumer_processes(self, process_num, start_method=start_method)

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.stop()

    def clear(self) -> int:
        return self.publisher.clear()

    def get_message_count(self) -> int:
        return self.publisher.get_message_count()


def task_deco(queue_name: str, **params: Unpack[ConsumerOptions]) -> Callable[[Callable[P, R]], Booster[P, R]]:
    """Turn a function into a :class:`Booster` bound to ``queue_name`` (parameters as in the seed)."""

    validated = _build_params(queue_name, None, params)  # a bad parameter raises here, not later

    def decorate(function: Callable[P, R]) -> Booster[P, R]:
        params = dataclasses.replace(validated, consuming_function=function)
        check_mode_fits_function(params)
        return Booster(function, params)

    return decorate


boost = task_deco


def get_consumer(queue_name: str, *, consuming_function: Callable[..., Any],
                 **params: Unpack[ConsumerOptions]) -> Consumer:
    """The seed's manual form: a consumer with ``start_consuming_message()`` and ``publisher_of_same_queue``."""
    return Consumer(_build_params(queue_name, consuming_function, params))


def _build_params(queue_name: str, consuming_function: Callable[..., Any] | None,
                  options: Mapping[str, Any]) -> ConsumerParams:
    """Validate the decorator's parameters against the broker registry and every feature's own checks."""
    return build_params(queue_name, consuming_function, dict(options), brokers=registry, checks=param_checks())


# -- consumer processes: the target the process supervisor runs in each child --------------------


def _consume_in_child(booster: Booster[Any, Any]) -> None:
    """A child's work: consume with the booster's own pool until SIGTERM, then stop gracefully.

    The supervisor runs it as an opaque target: a module-level function (pickled by reference) with
    the booster as its argument (pickled by reference too, see :meth:`Booster.__reduce__`).
    """
    stop_asked = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop_asked.set()
        for consumer in runtime.running_consumers():
            consumer.stop()  # the fetcher hands unstarted messages back and lets running calls finish

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, on_sigterm)
    stale = booster._consumer
    if stale is not None and not stale.is_running:  # a copy forked from a parent that consumed itself
        booster._consumer = None
    booster.consumer.start_consuming_message(wait=False)  # this function waits, below
    # consume() installed the process-wide handlers; in a child only the supervisor's SIGTERM stops it.
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, on_sigterm)
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    consumer = booster.consumer
    if stop_asked.is_set():
        consumer.stop()
    while not consumer.join(1.0):
        pass
    consumer.logger.info("process %d stopped consuming queue %r", os.getpid(), booster.queue_name)


def _supervisor_for(booster: Booster[Any, Any], process_num: int, start_method: str | None) -> ProcessSupervisor:
    if not isinstance(booster, Booster):
        raise TypeError(f"expected a function decorated with task_deco, not {type(booster).__name__}")
    params = booster.params
    supervisor = ProcessSupervisor(_consume_in_child, (booster,), process_num, start_method=start_method,
                                   name=f"funboost_like-{booster.queue_name}",
                                   log=get_logger(params.queue_name, params.log_level, params.logger_prefix))
    if supervisor.start_method != "fork":
        booster_reference(booster)  # a booster the child could not import fails here, with the reason
    if not registry.broker_class(params.broker_kind).capabilities.cross_process:
        raise ConfigurationError(
            f"queue {params.queue_name!r} is on {params.broker.name}, whose queues live in one process: consumer "
            "processes would never see what this process published; use a broker shared by processes, such as "
            "PERSISTQUEUE (the default) or REDIS")
    return supervisor


def run_consumer_with_multi_process(booster: Booster[Any, Any], process_num: int = 1, *,
                                   start_method: str | None = None) -> None:
    """Consume ``booster``'s queue in ``process_num`` supervised processes; block until they are stopped.

    Returns after SIGINT/SIGTERM to this process (or a stop from another thread) has stopped every
    child gracefully. Restarts, signals and start methods: see funboost_like/concurrency/multiprocess.py.
    """
    _supervisor_for(booster, process_num, start_method).run()


def start_consumer_processes(booster: Booster[Any, Any], process_num: int = 1, *,
                             start_method: str | None = None) -> ProcessSupervisor:
    """Like :func:`run_consumer_with_multi_process`, but return the running supervisor at once.

    The supervising thread is not a daemon: the process stays up after the main thread ends, until
    SIGINT/SIGTERM or ``supervisor.stop()``.
    """
    return _supervisor_for(booster, process_num, start_method).start()
