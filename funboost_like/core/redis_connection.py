"""The process-wide Redis client of the ``REDIS_URL`` setting, for the framework's Redis-backed services.

Distributed QPS control (:mod:`funboost_like.core.distributed_ratelimit`) uses Redis whatever the
queue's broker, so its connection does not come from a broker module. The setting is read at call
time, never at import (default ``redis://127.0.0.1:6379/0``, environment variable
``FUNBOOST_LIKE_REDIS_URL``); one client (and connection pool) exists per URL and per process, so a
forked child builds its own instead of sharing its parent's sockets. redis-py (the ``redis`` extra)
is imported on first use.

Key naming shared with the Redis brokers: every key of a queue other than the queue's own key
starts with :func:`key_prefix`, ``fl:{<queue>}:`` (the braces are literal: a Redis Cluster hash tag).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from funboost_like.core.config import redact_url, settings
from funboost_like.core.errors import BrokerError

if TYPE_CHECKING:
    import redis

logger = logging.getLogger("funboost_like.redis")

_clients: dict[str, redis.Redis] = {}
_clients_pid = os.getpid()
_lock = threading.Lock()


def redis_url() -> str:
    """The configured Redis URL (may contain a password: never log it, use :func:`describe_url`)."""
    return str(settings.get("REDIS_URL"))


def describe_url(url: str | None = None) -> str:
    """The Redis URL (the configured one by default) with any password redacted, for logs."""
    return redact_url(redis_url() if url is None else url)


def key_prefix(queue: str) -> str:
    """``fl:{<queue>}:``, the prefix of every key of ``queue`` other than the queue's own key."""
    return f"fl:{{{queue}}}:"


def redis_client() -> redis.Redis:
    """The process-wide client for the current ``REDIS_URL`` setting (thread-safe, fork-aware).

    Clients connect lazily and reconnect by themselves; a forked child gets fresh clients.
    """
    global _clients_pid
    url = redis_url()
    pid = os.getpid()
    if pid == _clients_pid:
        client = _clients.get(url)
        if client is not None:
            return client
    import redis

    with _lock:
        if pid != _clients_pid:
            _clients.clear()  # the parent's sockets belong to the parent: forget them without closing them
            _clients_pid = pid
        client = _clients.get(url)
        if client is None:
            try:
                client = redis.Redis.from_url(url, socket_keepalive=True, health_check_interval=30)
            except ValueError:  # malformed URL; redis-py's message may quote it, so it is not chained
                raise BrokerError(f"REDIS_URL {describe_url(url)} is not a valid Redis URL") from None
            _clients[url] = client
            logger.debug("created a Redis client for %s in process %d", describe_url(url), pid)
        return client


def close_clients() -> None:
    """Disconnect every client this process created (tests, shutdown); later calls reconnect."""
    with _lock:
        clients = list(_clients.values()) if os.getpid() == _clients_pid else []
        _clients.clear()
    for client in clients:
        try:
            client.close()
        except Exception as exc:  # closing a broken connection
            logger.debug("closing a Redis client failed: %s", exc)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
