"""Consumer heartbeats in Redis (the seed's ``is_send_consumer_hearbeat_to_redis``), on any broker.

With ``is_send_consumer_hearbeat_to_redis=True``, every consumer of the function writes a heartbeat
to the Redis of the ``REDIS_URL`` setting every ``CONSUMER_HEARTBEAT_SECONDS`` (5) while it
consumes, whatever its broker; a consumer silent for three of its heartbeats is dead (each judged by
the interval it beats at, which its record names, not the reader's setting). Anyone reaching that
Redis can list the live consumers of a queue, or of a host, with :func:`active_consumers` (the seed:
"some features need to count the active consumers, because some brokers are not real message
queues"). A graceful stop removes the consumer's record at once.

The beats run on one daemon thread per process, never on the consume path: the middleware's only
hook is ``pause_for`` (before a fetch, not per message), which returns 0 after the first call.
Redis unreachable: a warning (once per outage), a retry at the next beat; consuming goes on.

Layout in Redis (beat times are the Redis server's clock, so hosts' clocks need not agree):

* ``fl:{<queue>}:heartbeat``: ZSET consumer id -> time of its last beat;
* ``fl:{<queue>}:heartbeat:info``: HASH consumer id -> JSON ``{"id", "queue", "host", "pid",
  "broker", "script", "started_at", "interval"}``;
* ``fl:host:{<host>}:heartbeat`` and ``fl:host:{<host>}:heartbeat:info``: the same, by host.

Each key expires after six heartbeats without a beat; a reader drops the records of dead consumers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

from funboost_like.core.calls import Middleware
from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.member_thread import MemberThread
from funboost_like.core.redis_connection import describe_url, key_prefix, redis_client

if TYPE_CHECKING:
    from funboost_like.brokers.base import Capabilities
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.params import ConsumerParams

logger = logging.getLogger("funboost_like.heartbeat")

DEAD_AFTER_BEATS = 3
HOST = socket.gethostname()

# KEYS: beats, info; ARGV: id, record, ttl ms (never shortened: a consumer beating slower shares the keys)
_BEAT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < tonumber(ARGV[3]) then redis.call('PEXPIRE', key, ARGV[3]) end
end
"""
# KEYS: beats, info; ARGV: beats a consumer may miss, the interval of a record that names none
# Drops the dead (each judged by the interval in its own record), returns {id, last beat, record, ...} of the live.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  local id = all[i]
  local info = redis.call('HGET', KEYS[2], id)
  local every = tonumber(ARGV[2])
  if info then
    local ok, record = pcall(cjson.decode, info)
    if ok and type(record) == 'table' and tonumber(record['interval']) then every = tonumber(record['interval']) end
  end
  if tonumber(all[i + 1]) < now - tonumber(ARGV[1]) * every then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    out[#out + 1] = id
    out[#out + 1] = all[i + 1]
    out[#out + 1] = info or '{}'
  end
end
return out
"""


def queue_keys(queue: str) -> list[str]:
    beats = key_prefix(queue) + "heartbeat"
    return [beats, beats + ":info"]


def host_keys(host: str) -> list[str]:
    beats = f"fl:host:{{{host}}}:heartbeat"
    return [beats, beats + ":info"]


def interval() -> float:
    seconds = float(settings.get("CONSUMER_HEARTBEAT_SECONDS"))
    if not seconds > 0:
        raise ConfigurationError(f"CONSUMER_HEARTBEAT_SECONDS must be > 0, got {seconds!r}")
    return seconds


def check_params(params: ConsumerParams, capabilities: Capabilities) -> None:
    if params.is_send_consumer_hearbeat_to_redis:
        interval()
        try:
            import redis  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError("is_send_consumer_hearbeat_to_redis needs redis-py: "
                                     "pip install 'funboost_like[redis]'") from exc


def build(consumer: Consumer) -> HeartbeatMiddleware | None:
    return HeartbeatMiddleware(consumer) if consumer.params.is_send_consumer_hearbeat_to_redis else None


def active_consumers(queue_name: str | None = None, *, host: str | None = None) -> list[dict[str, Any]]:
    """The live consumers of ``queue_name``, or of ``host``, that send heartbeats to Redis.

    Each is its record (``id``, ``queue``, ``host``, ``pid``, ``broker``, ``script``, ``started_at``,
    ``interval``) plus ``beat_at``, the Redis server time of its last beat; oldest consumer first.
    """
    if (queue_name is None) == (host is None):
        raise ValueError("give either queue_name or host")
    keys = queue_keys(queue_name) if queue_name is not None else host_keys(str(host))
    client = redis_client()
    reply = client.register_script(_READ)(keys, [DEAD_AFTER_BEATS, interval()])
    consumers = []
    for i in range(0, len(reply), 3):
        record = json.loads(reply[i + 2])
        record["beat_at"] = float(reply[i + 1])
        consumers.append(record)
    return sorted(consumers, key=lambda record: record.get("started_at", 0))


class HeartbeatMiddleware(Middleware):
    """One consumer's heartbeat record; the process's :class:`Beater` writes it."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.active = False
        self.record: dict[str, Any] = {}

    def pause_for(self) -> float:
        if not self.active:
            self.active = True
            params = self.consumer.params
            self.record = {
                "id": f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}", "queue": self.consumer.queue_name,
                "host": HOST, "pid": os.getpid(), "broker": params.broker.name,
                "script": sys.argv[0] if sys.argv else "", "started_at": time.time(), "interval": interval(),
            }
            beater.add(self)
        return 0.0

    def close(self) -> None:
        if self.active:
            self.active = False
            beater.remove(self)


class Beater(MemberThread[HeartbeatMiddleware]):
    """The process's heartbeat thread (started with the first consumer, ends with the last)."""

    thread_name = "funboost_like-heartbeat"
    logger = logger
    service = "sending consumer heartbeats to Redis"

    def remove(self, member: HeartbeatMiddleware) -> None:
        self._discard(member)
        try:
            with self._io:
                pipe = redis_client().pipeline(transaction=False)
                for keys in (queue_keys(member.record["queue"]), host_keys(HOST)):
                    pipe.zrem(keys[0], member.record["id"])
                    pipe.hdel(keys[1], member.record["id"])
                pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the record then expires with its beats
            logger.debug("could not remove the heartbeat of queue %r: %s", member.record["queue"], exc)

    def _run(self) -> None:
        while True:
            members = self._members_or_end()
            if not members:
                return
            active = [m for m in members if m.active]
            seconds = min([m.record["interval"] for m in active] or [interval()])  # none beats slower than it says
            try:
                with self._io:
                    self._beat(active, seconds)
            except Exception as exc:  # noqa: BLE001 - retried at the next beat
                self._outage.what = f"sending consumer heartbeats to Redis at {describe_url()}"
                self._outage.failed(exc, seconds)
            else:
                self._outage.report(None)
            self._wake.wait(seconds)
            self._wake.clear()

    @staticmethod
    def _beat(members: list[HeartbeatMiddleware], seconds: float) -> None:
        client = redis_client()
        script = client.register_script(_BEAT)
        ttl_ms = int(2 * DEAD_AFTER_BEATS * seconds * 1000)
        if not members:
            return
        pipe = client.pipeline(transaction=False)
        for member in members:
            record = json.dumps(member.record)
            for keys in (queue_keys(member.record["queue"]), host_keys(HOST)):
                script(keys, [member.record["id"], record, ttl_ms], client=pipe)
        pipe.execute()


beater = Beater()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=beater.reset_in_child)
