"""Shared Redis plumbing for the Redis brokers and Redis-backed services.

* :func:`redis_client` returns the process-wide :class:`redis.Redis` for the ``REDIS_URL`` setting
  (default ``redis://127.0.0.1:6379/0``, environment variable ``FUNBOOST_LIKE_REDIS_URL``). The
  setting is read at call time, never at import; one client (and connection pool) exists per URL and
  per process, so a forked child builds its own instead of sharing its parent's sockets.
* :func:`describe_url` is the URL with its password replaced by ``***``; it is the only form of the
  URL that may reach a log or an exception message.
* :func:`translate_error` turns a redis-py exception into the framework's own
  (:class:`~funboost_like.core.errors.BrokerConnectionError` for an unreachable server, so the
  consume loop retries with backoff; :class:`~funboost_like.core.errors.BrokerError` otherwise).
* :class:`LuaScript` runs a Lua script by its SHA1 and loads it on the first ``NOSCRIPT`` reply
  (after a server restart or ``SCRIPT FLUSH`` too).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from funboost_like.core.config import redact_url, settings
from funboost_like.core.errors import BrokerConnectionError, BrokerError

logger = logging.getLogger("funboost_like.redis")

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}
_clients_pid = os.getpid()


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at fork time; the parent's sockets belong to the parent.
    global _lock, _clients_pid
    _lock = threading.Lock()
    _clients.clear()
    _clients_pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def redis_url() -> str:
    """The configured Redis URL (may contain a password: never log it, use :func:`describe_url`)."""
    return str(settings.get("REDIS_URL"))


def describe_url(url: str | None = None) -> str:
    """The Redis URL (the configured one by default) with any password redacted, for logs."""
    return redact_url(redis_url() if url is None else url)


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
    with _lock:
        if pid != _clients_pid:
            # The parent's sockets belong to the parent: forget them without closing them.
            _clients.clear()
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
        except RedisError:  # pragma: no cover - closing a broken connection
            pass


def translate_error(exc: RedisError, action: str) -> BrokerError:
    """The framework exception for a redis-py error raised while doing ``action`` (raise it ``from exc``)."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return BrokerConnectionError(f"Redis at {describe_url()} is unreachable while {action}: {exc}")
    return BrokerError(f"Redis at {describe_url()} failed while {action}: {exc}")


class LuaScript:
    """A Lua script run with EVALSHA, loaded on demand."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __call__(self, client: redis.Redis, keys: list[Any], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)
