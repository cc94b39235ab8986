"""The calls of the seeds' Django message queues (django-mqs, django-task-mq), on the DJANGO_ORM broker.

A topic is a queue; a message is a dict, published as the call's keyword arguments, so a topic can
equally be consumed by a ``@task_deco(topic, broker_kind=BrokerEnum.DJANGO_ORM)`` function taking
those keys as parameters. The consuming function receives the message dict, as in the seeds. The
seeds' leading model argument (``mq_producer(DB_django_task_mq, topic=..., message=...)``) is
accepted and ignored: the app's own table holds every topic.

The consumers block like the seeds' (they are the body of a consumer script) until SIGINT or SIGTERM
stops them gracefully; ``block=False`` returns the running consumers (or the process supervisor)
instead. Around each call this thread's stale database connections are closed, as Django does around
a request, so a long-running consumer survives a database restart and honours ``CONN_MAX_AGE``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import FrameType
from typing import Any

from funboost_like.brokers.registry import get_broker
from funboost_like.concurrency.multiprocess import ProcessSupervisor
from funboost_like.core import runtime
from funboost_like.core.booster import Booster, task_deco
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.message import EXTRA_KEY
from funboost_like.core.params import PriorityConsumingControlConfig
from funboost_like.core.results import AsyncResult

logger = logging.getLogger("funboost_like.django")
MessageFunction = Callable[[dict[str, Any]], Any]
_publishers: dict[str, Booster[..., Any]] = {}
_publishers_lock = threading.Lock()


def _drop_model(args: Sequence[Any]) -> list[Any]:
    """The positional arguments without the seeds' leading model class."""
    return list(args[1:]) if args and isinstance(args[0], type) else list(args)


def _accept_any_message(**message: Any) -> None:
    """The function of the publishing boosters (publishing never calls it)."""


def _publisher(topic: str) -> Booster[..., Any]:
    booster = _publishers.get(topic)
    if booster is None:
        with _publishers_lock:
            booster = _publishers.get(topic)
            if booster is None:
                booster = task_deco(topic, broker_kind=BrokerEnum.DJANGO_ORM)(_accept_any_message)
                _publishers[topic] = booster
    return booster


def mq_producer(*args: Any, topic: str | None = None, message: Mapping[str, Any] | None = None, priority: int = 0,
                **options: Any) -> AsyncResult:
    """Queue ``message`` (a dict with string keys) on ``topic``; higher ``priority`` runs first.

    Forms: ``mq_producer(topic="t", message={...})``, ``mq_producer("t", {...})`` and the seeds'
    ``mq_producer(Model, topic="t", message={...})``. ``options`` are publish-time options of
    :class:`~funboost_like.PriorityConsumingControlConfig` (``countdown``, ``eta``, ...). Returns the
    call's :class:`~funboost_like.AsyncResult` (its ``task_id``).
    """
    rest = _drop_model(args)
    if rest and topic is None:
        topic = rest.pop(0)
    if rest and message is None:
        message = rest.pop(0)
    if rest:
        raise TypeError(f"mq_producer() got {len(rest)} unexpected positional argument(s)")
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"mq_producer() needs a topic (a non-empty string), got {topic!r}")
    message = {} if message is None else message
    if not isinstance(message, Mapping) or not all(isinstance(key, str) for key in message):
        raise TypeError("mq_producer(): message must be a dict with string keys")
    if EXTRA_KEY in message:
        raise ValueError(f"mq_producer(): the key {EXTRA_KEY!r} is reserved for the message's metadata")
    config = PriorityConsumingControlConfig(priority=priority, **options) if priority or options else None
    return _publisher(topic).publish(dict(message), config)


def _message_function(fn: MessageFunction) -> Callable[..., Any]:
    """``fn(message_dict)`` as a consuming function of keyword arguments, inside connection hygiene."""
    from django.db import close_old_connections

    def run(**message: Any) -> Any:
        close_old_connections()
        try:
            return fn(message)
        finally:
            close_old_connections()

    run.__name__ = run.__qualname__ = getattr(fn, "__name__", "message_function")
    run.__module__ = getattr(fn, "__module__", __name__)
    return run


def _consumers(pairs: Iterable[tuple[MessageFunction, str]], threads: int, params: Mapping[str, Any]
               ) -> list[Booster[..., Any]]:
    options: dict[str, Any] = {"concurrent_num": threads, **params, "broker_kind": BrokerEnum.DJANGO_ORM}
    return [task_deco(topic, **options)(_message_function(fn)) for fn, topic in pairs]


def _pairs(fun_topics: Iterable[Mapping[str, Any]]) -> list[tuple[MessageFunction, str]]:
    pairs = []
    for item in fun_topics:
        fn, topic = item.get("fun"), item.get("topic")
        if not callable(fn) or not isinstance(topic, str) or not topic:
            raise ValueError(f"each of fun_topics is {{'fun': function, 'topic': 'name'}}, got {item!r}")
        pairs.append((fn, topic))
    if not pairs:
        raise ValueError("fun_topics is empty")
    return pairs


def _run(boosters: list[Booster[..., Any]], block: bool) -> list[Booster[..., Any]]:
    for booster in boosters:
        booster.consume()
    if block:
        while not all([booster.consumer.join(1.0) for booster in boosters]):
            pass
    return boosters


def mq_consumer(*args: Any, topic: str | None = None, worker: int = 1, block: bool = True,
                **params: Any) -> list[Booster[..., Any]]:
    """Run ``fn(message)`` for each message of ``topic``, ``worker`` at a time; block until stopped.

    Forms: ``mq_consumer(fn, topic="t")`` and the seeds' ``mq_consumer(Model, fn, topic="t")``;
    ``params`` are :func:`~funboost_like.task_deco` parameters (``qps``, ``max_retry_times``, ...).
    """
    rest = _drop_model(args)
    if len(rest) == 2 and topic is None:
        rest, topic = rest[:1], rest[1]
    if len(rest) != 1 or not callable(rest[0]) or not isinstance(topic, str):
        raise TypeError("use mq_consumer(function, topic='name')")
    return _run(_consumers([(rest[0], topic)], worker, params), block)


def mq_consumer_thread(*model: Any, fun_topics: Iterable[Mapping[str, Any]], worker: int = 2, block: bool = True,
                       **params: Any) -> list[Booster[..., Any]]:
    """Consume every ``{"fun": f, "topic": t}`` of ``fun_topics`` in this process, ``worker`` threads per
    topic; block until stopped (the seeds' leading model argument is ignored)."""
    return _run(_consumers(_pairs(fun_topics), worker, params), block)


def mq_consumer_process(*model: Any, fun_topics: Iterable[Mapping[str, Any]], worker: int = 2, threads: int = 1,
                        block: bool = True, start_method: str | None = None,
                        **params: Any) -> ProcessSupervisor | None:
    """Consume every ``{"fun": f, "topic": t}`` of ``fun_topics`` in ``worker`` supervised processes
    (each runs every topic, ``threads`` at a time); block until SIGINT/SIGTERM stops them.

    Call it under ``if __name__ == "__main__":``. With ``block=False`` the running
    :class:`~funboost_like.concurrency.multiprocess.ProcessSupervisor` is returned (``stop()``, ``join()``).
    With the ``spawn`` start method the functions must be importable (defined at a module's top level).
    """
    get_broker(BrokerEnum.DJANGO_ORM).prepare()  # type: ignore[attr-defined]  # set up before forking
    supervisor = ProcessSupervisor(_consume_in_child, (_pairs(fun_topics), threads, dict(params)), worker,
                                   start_method=start_method, name="funboost_like-django-topics", log=logger)
    if block:
        supervisor.run()
        return None
    return supervisor.start()


def _consume_in_child(pairs: list[tuple[MessageFunction, str]], threads: int, params: dict[str, Any]) -> None:
    """A child's work: consume the topics until the supervisor's SIGTERM, then stop gracefully."""
    from funboost_like.contrib.django.conf import forget_inherited_connections

    forget_inherited_connections()
    stop_asked = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop_asked.set()
        for consumer in runtime.running_consumers():
            consumer.stop()

    boosters = _consumers(pairs, threads, params)
    for booster in boosters:
        booster.consume()
    if hasattr(signal, "SIGTERM"):  # consume() installed the process-wide handlers: the supervisor's rule here
        signal.signal(signal.SIGTERM, on_sigterm)
    if hasattr(signal, "SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if stop_asked.is_set():
        on_sigterm(signal.SIGTERM, None)
    _run(boosters, block=True)
    logger.info("process %d stopped consuming topics %s", os.getpid(), [topic for _, topic in pairs])


def mq_init(*args: Any) -> None:
    """The seeds' table set-up, not needed here: the app brings its tables (``manage.py migrate``) and
    never writes your ``models.py`` or ``admin.py``."""
    logger.info("mq_init() is not needed: add 'funboost_like.contrib.django' to INSTALLED_APPS and run "
                "python manage.py migrate")
