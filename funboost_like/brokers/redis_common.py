"""Redis connections for the Redis brokers: fast command execution, Lua scripts, blocking waits.

* :func:`direct_connections` returns the process-wide :class:`DirectConnections` for the current
  ``REDIS_URL`` setting: the same connections redis-py makes (same URL options, TLS, auth,
  database), used without its pool's per-command bookkeeping, which costs about three times the
  round trip itself (measured: 9k PING/s through ``redis.Redis`` against 33k/s direct). Commands are
  packed by :func:`pack_command`, several times faster than redis-py's packer;
  :meth:`DirectConnections.send_packets` sends a pipeline packed once and cached by the caller, and
  a :class:`Piggyback` rides ahead of a command in the same write (a consumer's acks ahead of its
  next fetch). A forked child builds its own; the parent's sockets are never used there.
* :class:`LuaScript` runs a Lua script by its SHA1 and loads it on the first ``NOSCRIPT`` reply
  (after a server restart or ``SCRIPT FLUSH`` too).
* :class:`BlockingWaits` runs the idle waits of fetches (``BLMOVE``, ``XREAD BLOCK``) on connections
  of their own, so a blocked wait never delays other threads' commands.

The client, the URL (:func:`describe_url` is the only form that may reach a log) and key naming
(:func:`key_prefix`) come from :mod:`funboost_like.core.redis_connection`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

import redis
from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from funboost_like.brokers.socket_spin import PollChoice, Sharing, spin_until_readable

try:  # redis-py's hiredis parser, for reading many replies at C speed (see _read_replies_from_hiredis)
    from redis._parsers import hiredis as _redis_hiredis

    _HIREDIS_PARSER: type | None = _redis_hiredis._HiredisParser
    _NOT_ENOUGH_DATA: object = getattr(_redis_hiredis, "NOT_ENOUGH_DATA", False)
    if _NOT_ENOUGH_DATA is False:  # an older redis-py: False could also be a RESP3 reply
        _HIREDIS_PARSER = None
except (ImportError, AttributeError):  # pragma: no cover - depends on the redis-py version
    _HIREDIS_PARSER = None
    _NOT_ENOUGH_DATA = False

from funboost_like.core.redis_connection import describe_url, key_prefix, redis_client, redis_url

__all__ = ["BlockingWaits", "DirectConnections", "LuaScript", "Piggyback", "describe_url", "direct_connections",
           "key_prefix", "pack_command", "raise_first_error", "redis_client", "sha1_hex"]

_direct: dict[str, DirectConnections] = {}
if hasattr(os, "register_at_fork"):  # a forked child: the parent's sockets are not ours (never closed there)
    os.register_at_fork(after_in_child=_direct.clear)


def direct_connections() -> DirectConnections:
    """The process-wide :class:`DirectConnections` for the current ``REDIS_URL`` setting."""
    url = redis_url()
    direct = _direct.get(url)
    if direct is None:
        direct = _direct.setdefault(url, DirectConnections(redis_client()))
    return direct


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
        self.sharing = Sharing()  # whether a spin-eligible call is alone on these connections
        self.poll_choice = PollChoice()  # whether polling for its reply pays off now (measured in turns)

    def _new(self) -> AbstractConnection:
        connection: AbstractConnection = self._connection_class(**self._connection_kwargs)
        return connection

    def execute_command(self, *args: Any, before: Piggyback | None = None, spin: bool = False) -> Any:
        """Run one command and return its reply; ``before`` is sent ahead of it in the same write.

        ``spin``: the caller waits for this reply and nothing else (a ``push``), so wait for it by
        polling the socket for a short while (:func:`_spin_until_readable`) before blocking, unless
        these connections were shared with another thread in the last ``socket_spin.SHARED_QUIET_SECONDS``
        (threads that publish together, or a consumer's fetch waiting on the server): a polling
        thread would keep the GIL from them. Whether polling pays off at all right now is measured in
        turns (:class:`~funboost_like.brokers.socket_spin.PollChoice`): on a busy machine it does not.
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
                started = perf_counter()
                _send_with(connection, before, packet)
                if spin and self.sharing.alone(len(busy)):
                    choice = self.poll_choice
                    if choice.polls():
                        _spin_until_readable(connection, SPIN_SECONDS)
                    reply = connection.read_response()
                    choice.took(perf_counter() - started)
                else:
                    reply = connection.read_response()
            except (RedisConnectionError, RedisTimeoutError):
                connection.disconnect()
                _send_with(connection, before, packet)  # ``before`` sent again too (acks are idempotent)
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

    def pipeline(self, commands: list[tuple[Any, ...]], before: Piggyback | None = None) -> list[Any]:
        """Send several commands in one write and read their replies (error replies are returned)."""
        return self.send_packets((b"".join([pack_command(*command) for command in commands]),), len(commands), before)

    def send_packets(self, packets: Iterable[bytes], count: int, before: Piggyback | None = None) -> list[Any]:
        """Send each packet as ``packets`` yields it, then read the ``count`` replies of all of them.

        A packet is one or more commands packed by :func:`pack_command` (and joined); callers may cache
        one they send often. Redis runs the first commands while the next packets are still being packed.
        Error replies are returned, not raised. ``before`` is sent ahead of the first packet in the same write.
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

    def close(self) -> None:
        idle, self._idle = self._idle, []
        _disconnect(idle)


def _disconnect(connections: Iterable[AbstractConnection]) -> None:
    """Close ``connections``, ignoring errors (they are being dropped)."""
    for connection in connections:
        try:
            connection.disconnect()
        except (RedisError, OSError):  # pragma: no cover
            pass


SPIN_SECONDS = 0.0003
"""How long a ``push`` polls for its reply before a blocking read takes over (0: block at once).

Read at each call; ``benchmarks/push_wait.py`` sets it to compare both ways in one process.
"""


def _spin_until_readable(connection: AbstractConnection, budget: float) -> None:
    """Poll ``connection``'s socket until a reply (or the end of the stream) is there, for ``budget``
    seconds at most (:mod:`~funboost_like.brokers.socket_spin` says why and which sockets)."""
    spin_until_readable(getattr(connection, "_sock", None), budget)


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

    :attr:`replies` holds their replies once read (error replies as exception values); it stays None
    when the connection broke first, so they may or may not have run.
    """

    __slots__ = ("packet", "count", "replies")

    def __init__(self, commands: list[tuple[Any, ...]]) -> None:
        self.packet = b"".join([pack_command(*command) for command in commands])
        self.count = len(commands)
        self.replies: list[Any] | None = None


def _send_with(connection: AbstractConnection, before: Piggyback | None, packet: bytes) -> None:
    """Send ``before`` (if any) and ``packet`` in one write and read ``before``'s replies."""
    if before is None:
        connection.send_packed_command([packet])
    else:
        connection.send_packed_command([before.packet + packet])
        before.replies = _read_replies(connection, before.count)


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


def sha1_hex(data: bytes) -> str:
    """The SHA1 of ``data`` in hex, as Lua's ``redis.sha1hex`` gives it (a body's field in an attempts HASH)."""
    return hashlib.sha1(data).hexdigest()


class LuaScript:
    """A Lua script run with EVALSHA, loaded on demand."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = sha1_hex(source.encode("utf-8"))

    def __call__(self, target: redis.Redis | DirectConnections, keys: list[Any], args: list[Any],
                 before: Piggyback | None = None) -> Any:
        """Run on ``target`` (a client or direct connections) with ``keys`` and ``args``; ``before`` (direct
        connections only) is sent ahead in the same write, and not again if the script had to be loaded."""
        try:
            if before is None:
                return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args, before=before)
        except NoScriptError:
            target.execute_command("SCRIPT", "LOAD", self.source)
            return target.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


def raise_first_error(replies: list[Any]) -> list[Any]:
    """The replies of :meth:`DirectConnections.pipeline`, or the first error reply raised."""
    for reply in replies:
        if isinstance(reply, ResponseError):
            raise reply
    return replies


class BlockingWaits:
    """Blocking waits on connections of their own, kept per queue (as many as threads wait at once).

    A wait sends its blocking command (made by the caller, with a server timeout of its choosing)
    and polls the socket until the caller's own timeout. When that comes first, the command stays
    on the server and the next wait on that queue goes on reading its reply rather than sending
    another: a wait ends on the caller's deadline, never on the server's timer tick (Redis ends a
    blocking command's timeout on its cron tick, up to 100 ms late at the default ``hz``).
    """

    def __init__(self) -> None:
        self._idle: dict[str, list[list[Any]]] = {}  # queue -> idle [connection, command pending]

    def wait(self, direct: DirectConnections, queue: str, timeout: float,
             command: Callable[[AbstractConnection], bytes]) -> bool:
        """Wait at most ``timeout`` seconds for the reply of ``command(connection)`` (a packed
        command); True if it came. An error reply is read and ignored (the
        fetch that follows meets the error itself); a connection error is raised."""
        idle = self._idle.setdefault(queue, [])
        try:
            slot = idle.pop()
        except IndexError:
            slot = [direct._new(), False]
        connection = slot[0]
        try:
            if not slot[1]:
                connection.send_packed_command([command(connection)], check_health=False)
                slot[1] = True
            if not connection.can_read(timeout=timeout):
                return False
            slot[1] = False
            connection.read_response()
        except ResponseError:
            pass
        except (RedisConnectionError, RedisTimeoutError):
            slot[1] = False
            connection.disconnect()
            raise
        finally:
            idle.append(slot)
        return True

    def close_queue(self, queue: str) -> None:
        """Close the idle connections of ``queue``'s waits (a wait under way keeps its own)."""
        _disconnect([slot[0] for slot in self._idle.pop(queue, [])])

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        _disconnect([slot[0] for slots in idle.values() for slot in slots])
