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
  :class:`DeferredSettlements` keeps the acks that failed that way and sends them again with the
  broker's next fetch (or its close), so a message acked during an outage does not stay in flight forever.
* :func:`direct_connections` returns the process-wide :class:`DirectConnections` for the current
  URL: the same connections redis-py makes (same URL options, TLS, auth, database), used without
  its pool's per-command bookkeeping, which costs about three times the round trip itself
  (measured: 9k PING/s through ``redis.Redis`` against 33k/s direct). Brokers use it on hot paths.
  Commands are packed by :func:`pack_command`, several times faster than redis-py's packer (a
  fetch-and-ack loop of 50-message batches on RedisBrpopLpush went from 55k to 87k messages/s);
  :meth:`DirectConnections.send_packed` sends a pipeline packed once and cached by the caller.
* :class:`LuaScript` runs a Lua script by its SHA1 and loads it on the first ``NOSCRIPT`` reply
  (after a server restart or ``SCRIPT FLUSH`` too), on a client or on direct connections.

Shared by the Redis brokers (whose common base class is in :mod:`funboost_like.brokers.redis_base`):

* key naming: every key of a queue other than the queue's own key starts with
  :func:`key_prefix` ``fl:{<queue>}:`` (the braces are literal: a Redis Cluster hash tag);
* publishing to a list in chunks of at most so many bodies per ``LPUSH``: :func:`lpush_many`;
* consumer identity and liveness: :func:`new_consumer_id`, :func:`consumer_timing` (the
  ``REDIS_HEARTBEAT_SECONDS`` / ``REDIS_DEAD_AFTER_SECONDS`` settings) and :class:`HeartbeatThread`,
  the daemon thread that heartbeats (or renews claims) for a broker instance;
* delayed messages of the list brokers: a ZSET ``fl:{<queue>}:delayed`` scored by due time (server
  clock), member ``<unique id>:<priority>:<deliveries so far>:<body>`` (:func:`delayed_member`,
  :data:`SCHEDULE`, the Lua functions :data:`LUA_MOVE_DUE`, moving due members to their list, and
  :data:`LUA_NEXT_DUE`);
* dead letters: a LIST ``fl:{<queue>}:dead`` of JSON envelopes ``{"body", "reason", "failed_at",
  "attempts"}``, newest first, trimmed to :data:`DEAD_LETTER_LIMIT` (:func:`dead_letter_envelope`,
  :func:`read_dead_letters`, :data:`PURGE_LIST`);
* idle waits: Redis ends a blocking command's timeout on its cron tick (up to 100 ms late), so
  :func:`blocking_budget` says how long a fetch may block and :class:`IdlePoller` polls the rest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # redis-py's hiredis parser, for reading many replies at C speed (see _read_replies_from_hiredis)
    from redis._parsers import hiredis as _redis_hiredis

    _HIREDIS_PARSER: type | None = _redis_hiredis._HiredisParser
    _NOT_ENOUGH_DATA: object = getattr(_redis_hiredis, "NOT_ENOUGH_DATA", False)
    if _NOT_ENOUGH_DATA is False:  # an older redis-py: False could also be a RESP3 reply
        _HIREDIS_PARSER = None
except (ImportError, AttributeError):  # pragma: no cover - depends on the redis-py version
    _HIREDIS_PARSER = None
    _NOT_ENOUGH_DATA = False

from funboost_like.brokers.base import DeadLetter
from funboost_like.core import codec
from funboost_like.core.config import redact_url, settings
from funboost_like.core.errors import BrokerConnectionError, BrokerError, ConfigurationError

logger = logging.getLogger("funboost_like.redis")

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}
_direct: dict[str, DirectConnections] = {}
_clients_pid = os.getpid()


def _after_fork_in_child() -> None:
    # Another thread may have held the lock at fork time; the parent's sockets belong to the parent.
    global _lock, _clients_pid
    _lock = threading.Lock()
    _clients.clear()
    _direct.clear()
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
            _direct.clear()
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


def direct_connections() -> DirectConnections:
    """The process-wide :class:`DirectConnections` for the current ``REDIS_URL`` setting."""
    url = redis_url()
    if os.getpid() == _clients_pid:
        direct = _direct.get(url)
        if direct is not None:
            return direct
    client = redis_client()  # also resets the caches in a forked child
    with _lock:
        direct = _direct.get(url)
        if direct is None:
            direct = _direct[url] = DirectConnections(client)
        return direct


def close_clients() -> None:
    """Disconnect every client this process created (tests, shutdown); later calls reconnect."""
    with _lock:
        mine = os.getpid() == _clients_pid
        clients = list(_clients.values()) if mine else []
        directs = list(_direct.values()) if mine else []
        _clients.clear()
        _direct.clear()
    for direct in directs:
        direct.close()
    for client in clients:
        try:
            client.close()
        except RedisError:  # pragma: no cover - closing a broken connection
            pass


class DirectConnections:
    """Thread-safe command execution on a small stack of idle redis-py connections.

    A thread takes an idle connection (or makes one), sends, reads the reply and puts it back; the
    stack never holds more connections than threads ever used it at once. A connection that failed
    is disconnected and reconnects on its next use; a command that failed on a connection error is
    sent once more on a fresh connection (a restarted server, a dropped idle socket), so like
    redis-py's own retries, a write may in rare cases run twice.
    """

    def __init__(self, client: redis.Redis) -> None:
        pool = client.connection_pool
        self._connection_class = pool.connection_class
        self._connection_kwargs = dict(pool.connection_kwargs)
        self._idle: list[AbstractConnection] = []
        self._busy: set[AbstractConnection] = set()  # taken by a thread right now (set.add is atomic)
        self._shared_at = -SHARED_QUIET_SECONDS  # when a spin-eligible call last found another thread here

    def _new(self) -> AbstractConnection:
        connection: AbstractConnection = self._connection_class(**self._connection_kwargs)
        return connection

    def execute_command(self, *args: Any, before: Piggyback | None = None, spin: bool = False) -> Any:
        """Run one command and return its reply; ``before`` is sent ahead of it in the same write.

        ``spin``: the caller waits for this reply and nothing else (a ``push``), so wait for it by
        polling the socket for a short while (:func:`_spin_until_readable`) before blocking, unless
        these connections were shared with another thread in the last :data:`SHARED_QUIET_SECONDS`
        (threads that publish together, or a consumer's fetch waiting on the server): a polling
        thread would keep the GIL from them.
        """
        idle = self._idle
        try:
            connection = idle.pop()
        except IndexError:
            connection = self._new()
        busy = self._busy
        busy.add(connection)
        clean = False
        packet = pack_command(*args)
        try:
            try:
                if before is None:
                    connection.send_packed_command([packet])
                else:
                    _send_with(connection, before, packet)
                if spin and self._alone(len(busy)):
                    _spin_until_readable(connection, SPIN_SECONDS)
                reply = connection.read_response()
            except (RedisConnectionError, RedisTimeoutError):
                connection.disconnect()
                connection.send_packed_command([packet])
                reply = connection.read_response()
            clean = True
            return reply
        except ResponseError:
            clean = True  # an error reply was read in full: the connection is in step
            raise
        finally:
            if not clean:
                connection.disconnect()
            busy.discard(connection)
            idle.append(connection)

    def _alone(self, in_use: int) -> bool:
        now = time.monotonic()
        if in_use > 1:
            self._shared_at = now
            return False
        return now - self._shared_at > SHARED_QUIET_SECONDS

    def pipeline(self, commands: list[tuple[Any, ...]], before: Piggyback | None = None) -> list[Any]:
        """Send several commands in one write and read their replies (error replies are returned)."""
        return self.send_packed(b"".join([pack_command(*command) for command in commands]), len(commands), before)

    def send_packets(self, packets: Iterable[bytes], count: int, before: Piggyback | None = None) -> list[Any]:
        """Send each packet as ``packets`` yields it, then read the ``count`` replies of all of them.

        Redis runs the first commands while the next packets are still being packed. Error replies
        are returned, not raised. ``before`` is sent ahead of the first packet in the same write.
        """
        idle = self._idle
        try:
            connection = _fresh(idle.pop())
        except IndexError:
            connection = self._new()
        busy = self._busy
        busy.add(connection)
        clean = False
        try:
            for packet in packets:
                if before is None:
                    connection.send_packed_command([packet])
                else:
                    _send_with(connection, before, packet)
                    before = None
            replies = _read_replies(connection, count)
            clean = True
            return replies
        finally:
            if not clean:
                connection.disconnect()
            busy.discard(connection)
            idle.append(connection)

    def send_packed(self, packet: bytes, count: int, before: Piggyback | None = None) -> list[Any]:
        """Send ``count`` commands packed by :func:`pack_command` (and joined) in one write; read their replies.

        Error replies are returned, not raised. Callers may cache a packet they send often. ``before``
        is sent ahead of them in the same write.
        """
        return self.send_packets((packet,), count, before)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            try:
                connection.disconnect()
            except (RedisError, OSError):  # pragma: no cover
                pass


SPIN_SECONDS = 0.0003
"""How long a ``push`` polls for its reply before a blocking read takes over (0: block at once).

Read at each call; ``benchmarks/push_wait.py`` sets it to compare both ways in one process.
"""
SHARED_QUIET_SECONDS = 0.05
"""A ``push`` polls only if its connections had no other user for this long (see ``execute_command``)."""


def _spin_until_readable(connection: AbstractConnection, budget: float) -> None:
    """Poll ``connection``'s socket until a reply (or the end of the stream) is there, for ``budget`` seconds at most.

    A loopback round trip is a few tens of microseconds of work, but a thread that blocks for it
    gives its CPU back, and waking a halted virtual CPU again costs a VM exit: on the 2-core VM of
    docs/performance.md, blocking reads alone held one-by-one ``push`` to 4-8k/s while the same
    PING loop polled ran 30-40k/s. The budget bounds the CPU this burns when the server is slow;
    the read that follows blocks as before. Only the standard library's plain sockets are polled
    (their class comes from module ``socket``): under gevent or eventlet, whose sockets are their
    own classes even after monkey-patching, polling would hold up the other greenlets, and a TLS
    socket may hold a reply in its buffer while nothing is readable, so those wait as before.
    """
    sock = getattr(connection, "_sock", None)
    if not isinstance(sock, socket.socket) or type(sock).__module__ != "socket" or not hasattr(select, "poll"):
        return
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    ready = poller.poll
    deadline = time.perf_counter() + budget
    while not ready(0) and time.perf_counter() < deadline:
        pass


def _fresh(connection: AbstractConnection) -> AbstractConnection:
    """``connection``, disconnected first if the server closed it while it sat idle (a restart).

    Single commands are sent once more on a fresh connection after a connection error; pipelines are
    not (some of their commands may have run), so before one is sent on an idle connection, a look
    without waiting tells whether the server already hung up (the end of the stream is readable).
    """
    try:
        if getattr(connection, "_sock", None) is not None and connection.can_read(timeout=0):
            connection.disconnect()  # readable while idle: closed by the server, or out of step
    except (RedisConnectionError, RedisTimeoutError, OSError):
        connection.disconnect()  # it reconnects on its next send
    return connection


class Piggyback:
    """Commands sent in the same write ahead of another command: a consumer's acks ahead of its next fetch.

    Once their replies are read, ``settle`` gets them (error replies as exception values). If the
    connection breaks before that, ``on_lost`` runs instead (they may or may not have run; it must
    arrange to send them again). :attr:`done` tells whether either happened, so a caller whose
    command was never sent can send them another way.
    """

    __slots__ = ("packet", "count", "settle", "on_lost", "done")

    def __init__(self, commands: list[tuple[Any, ...]], settle: Callable[[list[Any]], object],
                 on_lost: Callable[[], object]) -> None:
        self.packet = b"".join([pack_command(*command) for command in commands])
        self.count = len(commands)
        self.settle = settle
        self.on_lost = on_lost
        self.done = False


def _send_with(connection: AbstractConnection, before: Piggyback, packet: bytes) -> None:
    """Send ``before`` and ``packet`` in one write, read and settle ``before``'s replies (see :class:`Piggyback`)."""
    try:
        connection.send_packed_command([before.packet + packet])
        replies = _read_replies(connection, before.count)
    except (RedisConnectionError, RedisTimeoutError):
        before.done = True
        before.on_lost()
        raise
    before.done = True
    before.settle(replies)


def _read_replies(connection: AbstractConnection, count: int) -> list[Any]:
    """Read ``count`` replies; error replies are returned as exceptions, not raised."""
    parser = getattr(connection, "_parser", None)
    if type(parser) is _HIREDIS_PARSER and getattr(parser, "_reader", None) is not None:
        return _read_replies_from_hiredis(parser, count)
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(connection.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


def _read_replies_from_hiredis(parser: Any, count: int) -> list[Any]:
    """:func:`_read_replies` straight from redis-py's hiredis reader, for the replies of a large pipeline.

    ``read_response`` costs about a microsecond of Python per reply, as much as Redis spends on an
    ``XADD``; taking the parsed replies from the C reader in a loop costs a fifth of that. This
    relies on redis-py's ``_HiredisParser`` (its reader, its socket refill and its push handling),
    so it is used only for that exact class of a redis-py whose reader has a sentinel of its own for
    "not enough data" (``tests/test_redis_connections.py`` checks both still hold). Error replies
    are exception values, as hiredis gives them; a connection error is raised.
    """
    reader = parser._reader
    gets = reader.gets
    refill = parser.read_from_socket
    push_type = getattr(parser, "_hiredis_PushNotificationType", None)
    replies: list[Any] = []
    append = replies.append
    while len(replies) < count:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            refill()
        elif push_type is not None and type(reply) is push_type:
            parser.handle_push_response(reply)  # a server notice (RESP3), not a reply to us
        elif isinstance(reply, RedisConnectionError):
            raise reply
        else:
            append(reply)
    return replies


def pack_command(*args: Any) -> bytes:
    """One command in the Redis protocol (RESP), like redis-py's packer at a fraction of its cost.

    Arguments are bytes (sent as they are), str (UTF-8), int or float.
    """
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        if not isinstance(arg, bytes):
            if isinstance(arg, str):
                arg = arg.encode("utf-8")
            elif isinstance(arg, int) and not isinstance(arg, bool):
                arg = b"%d" % arg
            elif isinstance(arg, float):
                arg = repr(arg).encode("ascii")
            elif isinstance(arg, (bytearray, memoryview)):
                arg = bytes(arg)
            else:
                raise DataError(f"cannot send a {type(arg).__name__} to Redis; use bytes, str, int or float")
        append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def translate_error(exc: RedisError, action: str) -> BrokerError:
    """The framework exception for a redis-py error raised while doing ``action`` (raise it ``from exc``)."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return BrokerConnectionError(f"Redis at {describe_url()} is unreachable while {action}: {exc}")
    return BrokerError(f"Redis at {describe_url()} failed while {action}: {exc}")


def is_connection_error(exc: BaseException) -> bool:
    """True for the redis-py errors of an unreachable server (refused, reset, timed out, still loading)."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError))


class DeferredSettlements:
    """Acks and hand-backs that failed on a connection error, sent again by the broker's next fetch.

    Without this, a message whose ack was lost while Redis was down would stay in the in-flight record
    of a consumer that is alive and heartbeating, so it would neither leave nor come back until that
    process ended. Every deferred send must be safe to run twice (it checks that the message is still
    in flight), since the first attempt may have reached the server before the connection broke.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sends: list[Callable[[], object]] = []

    def __bool__(self) -> bool:
        return bool(self._sends)

    def add(self, send: Callable[[], object]) -> None:
        with self._lock:
            self._sends.append(send)

    def flush(self) -> int:
        """Run the deferred sends in order. On a connection error keep the unsent ones and re-raise; a
        send that Redis refuses otherwise is logged and dropped (so it cannot block every later fetch).
        Returns how many were sent."""
        with self._lock:
            sends, self._sends = self._sends, []
        done = 0
        try:
            for send in sends:
                try:
                    send()
                except RedisError as exc:
                    if is_connection_error(exc):
                        raise
                    logger.error("Redis at %s refused an ack or hand-back sent again after an outage (%s); its "
                                 "message stays in flight until this process ends, then runs again",
                                 describe_url(), exc)
                done += 1
        finally:
            if done < len(sends):
                with self._lock:
                    self._sends[:0] = sends[done:]
            if done:
                logger.info("sent %d acknowledgement(s) or hand-back(s) again that had failed while Redis at %s "
                            "was unreachable", done, describe_url())
        return done

    def flush_before_fetch(self, queue: str) -> None:
        """:meth:`flush` at the start of a fetch of ``queue``; a failure is raised as that fetch's error."""
        try:
            self.flush()
        except RedisError as exc:
            raise translate_error(exc, f"fetching from queue {queue!r}") from exc

    def flush_on_close(self) -> None:
        """:meth:`flush` (if anything is deferred) when the broker closes; a failure is only logged, as
        another consumer's sweep recovers those messages later."""
        if not self._sends:
            return
        try:
            self.flush()
        except RedisError as exc:
            logger.warning("could not resend the acks and hand-backs that failed while Redis at %s was "
                           "unreachable (%s): those messages run again after another consumer's sweep",
                           describe_url(), exc)


class LuaScript:
    """A Lua script run with EVALSHA, loaded on demand."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __call__(self, target: redis.Redis | DirectConnections, keys: list[Any], args: list[Any]) -> Any:
        """Run on ``target`` (a client or direct connections) with ``keys`` and ``args``."""
        try:
            return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            target.execute_command("SCRIPT", "LOAD", self.source)
            return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    def after(self, before: Piggyback, target: DirectConnections, keys: list[Any], args: list[Any]) -> Any:
        """Like calling it, with ``before`` sent ahead in the same write (and not again if the script
        had to be loaded first)."""
        try:
            return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args, before=before)
        except NoScriptError:
            target.execute_command("SCRIPT", "LOAD", self.source)
            return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


# -- shared by the Redis brokers -------------------------------------------------------------------

DEAD_LETTER_LIMIT = 10_000  # dead letters kept per queue (the newest)

# Lua prologue: the server's clock as a float, in ``now``.
LUA_NOW = "local _t = redis.call('TIME') local now = tonumber(_t[1]) + tonumber(_t[2]) / 1000000\n"

# Lua function: move the due members of a delayed ZSET (see :func:`delayed_member`) to the tail
# end of their ready list (``ready`` for priority 0, ``prio_prefix .. n`` otherwise), recording
# deliveries so far in the ``attempts`` HASH (sha1(body) -> count). Returns the number moved.
LUA_MOVE_DUE = """
local function move_due(delayed, ready, prio_prefix, attempts, now)
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
  if #due == 0 then return 0 end
  for i = 1, #due do
    local member = due[i]
    local _, stop, level, seen = string.find(member, '^[^:]*:(%d):(%d+):')
    local body = member
    if stop then body = string.sub(member, stop + 1) else level = '0' seen = '0' end
    local key = ready
    if level ~= '0' then key = prio_prefix .. level end
    redis.call('LPUSH', key, body)
    if seen ~= '0' then redis.call('HSET', attempts, redis.sha1hex(body), seen) end
  end
  redis.call('ZREM', delayed, unpack(due))
  return #due
end
"""

# Lua function: milliseconds until the first member of a delayed ZSET is due (at least 1), or -1
# when it is empty.
LUA_NEXT_DUE = """
local function next_due_ms(delayed, now)
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if #first == 0 then return -1 end
  local ms = math.ceil((tonumber(first[2]) - now) * 1000)
  if ms < 1 then ms = 1 end
  return ms
end
"""

# KEYS: delayed ZSET; ARGV: delay in seconds (from now, server clock), member.
SCHEDULE = LuaScript(LUA_NOW + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return 1
""")

# KEYS: a list; returns its length and deletes it.
PURGE_LIST = LuaScript("""
local n = redis.call('LLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
""")


def key_prefix(queue: str) -> str:
    """``fl:{<queue>}:``, the prefix of every key of ``queue`` other than the queue's own key."""
    return f"fl:{{{queue}}}:"


def new_consumer_id() -> str:
    """A consumer id unique across hosts and processes: ``<host>-<pid>-<random>`` (no ``:{}``)."""
    host = socket.gethostname().replace(":", "_").replace("{", "_").replace("}", "_") or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def consumer_timing(heartbeat_interval: float | None, dead_after: float | None) -> tuple[float, float]:
    """Heartbeat interval and death threshold: the given values, else the ``REDIS_HEARTBEAT_SECONDS``
    and ``REDIS_DEAD_AFTER_SECONDS`` settings; raises ConfigurationError unless 0 < interval < dead_after."""
    interval = float(settings.get("REDIS_HEARTBEAT_SECONDS") if heartbeat_interval is None else heartbeat_interval)
    dead = float(settings.get("REDIS_DEAD_AFTER_SECONDS") if dead_after is None else dead_after)
    if not 0 < interval < dead:
        raise ConfigurationError(f"need 0 < heartbeat interval < dead-after time, got {interval} and {dead} seconds")
    return interval, dead


def raise_first_error(replies: list[Any]) -> list[Any]:
    """The replies of :meth:`DirectConnections.pipeline`, or the first error reply raised."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies


def lpush_many(conn: DirectConnections, key: str, bodies: Sequence[bytes], chunk: int) -> None:
    """``LPUSH`` ``bodies`` to the list ``key``: one command, or one pipeline of commands of ``chunk``
    bodies each (raises redis-py errors; callers translate them)."""
    if len(bodies) <= chunk:
        conn.execute_command("LPUSH", key, *bodies)
    else:
        raise_first_error(conn.pipeline(
            [("LPUSH", key, *bodies[start:start + chunk]) for start in range(0, len(bodies), chunk)]))


def as_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else bytes(body)


def delayed_member(priority: int, deliveries: int, body: bytes) -> bytes:
    """The member of a delayed ZSET for ``body``: unique, and carrying its priority and deliveries so far."""
    return b"%s:%d:%d:" % (uuid.uuid4().hex.encode(), priority, deliveries) + as_bytes(body)


def dead_letter_envelope(body: bytes, reason: str, attempts: int) -> bytes:
    """The JSON text kept in ``fl:{<queue>}:dead`` for a message given up on."""
    return codec.dumps({"body": body.decode("utf-8", "replace"), "reason": reason, "failed_at": time.time(),
                        "attempts": attempts})


def read_dead_letters(target: redis.Redis | DirectConnections, queue: str, limit: int) -> list[DeadLetter]:
    """The newest ``limit`` dead letters of ``queue`` (raises redis-py errors; callers translate them)."""
    if limit <= 0:
        return []
    letters = []
    for item in target.execute_command("LRANGE", key_prefix(queue) + "dead", 0, limit - 1):
        try:
            envelope = codec.loads(item)
            letters.append(DeadLetter(queue, str(envelope["body"]).encode("utf-8"), str(envelope.get("reason", "")),
                                      float(envelope.get("failed_at", 0.0)), int(envelope.get("attempts", 0))))
        except (KeyError, TypeError, AttributeError, ValueError, UnicodeDecodeError):
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            letters.append(DeadLetter(queue, raw, "unreadable dead-letter envelope", 0.0, 0))
    return letters


class HeartbeatThread:
    """A daemon thread calling ``beat()`` at once and then every ``interval`` seconds until :meth:`stop`.

    :meth:`ensure_running` starts it (again, after a stop or in a forked child's new instance). A
    failing beat is logged once as a warning and its recovery once; the thread keeps beating.
    """

    def __init__(self, beat: Callable[[], object], interval: float, name: str) -> None:
        self._beat = beat
        self.interval = interval
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def ensure_running(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                self._stop = stop = threading.Event()
                self._thread = thread = threading.Thread(target=self._run, args=(stop,), name=self.name, daemon=True)
                thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, stop: threading.Event) -> None:
        failing = False
        while True:
            try:
                self._beat()
                if failing:
                    logger.info("%s: beats to Redis at %s work again", self.name, describe_url())
                    failing = False
            except Exception as exc:  # keep beating: the next attempt may succeed
                if not failing:
                    logger.warning("%s: beat to Redis at %s failed: %s; retrying every %.1fs", self.name,
                                   describe_url(), exc, self.interval)
                    failing = True
            if stop.wait(self.interval):
                return


# A blocking command (BRPOP, BLMOVE, XREADGROUP BLOCK) returns at once when data arrives, but its
# timeout fires on the server's cron tick: up to 1/hz late (100 ms at the default hz 10; measured on
# Redis 7.0: a 20 ms BRPOP on an empty list returns after 100 ms). So the brokers block only for the
# part of a wait that ends a tick before the deadline, and poll (:class:`IdlePoller`) for the rest.
BLOCK_LATENESS = 0.1
MAX_BLOCK = 2.0  # well below the client's socket timeout (redis-py's default is 5 s): longer waits loop
_POLL_FIRST = 0.002
_POLL_MAX = 0.05


def blocking_budget(remaining: float, due_in: float | None = None) -> float:
    """Seconds a blocking command may wait so that it returns before ``remaining`` (and before a
    delayed message becomes due in ``due_in`` seconds); 0 when the caller should poll instead."""
    wait = min(remaining - BLOCK_LATENESS, MAX_BLOCK)
    if due_in is not None and due_in - BLOCK_LATENESS < wait:
        wait = due_in - BLOCK_LATENESS
    return wait if wait >= 0.05 else 0.0


class IdlePoller:
    """Sleeps between polls of an empty queue: 2 ms doubling up to 50 ms, never past the deadline."""

    __slots__ = ("deadline", "_pause")

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self._pause = _POLL_FIRST

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def sleep(self, remaining: float) -> None:
        pause = self._pause
        time.sleep(pause if pause < remaining else remaining)
        self._pause = min(pause * 2, _POLL_MAX)
