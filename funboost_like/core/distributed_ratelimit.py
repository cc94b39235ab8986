"""Distributed QPS control (``is_using_distributed_frequency_control``): one start grid shared in Redis.

Every consumer of a queue, in any process on any host, claims its next start slot from the same key
with one Lua script that reads the Redis server's clock: ``slot = max(next, now)`` (``now`` when the
grid is more than one interval behind, so idle time builds no burst), then ``next = slot + 1/qps``.
The caller sleeps until its slot. The total start rate is therefore ``qps`` whatever the number of
consumers, and it adapts at once when consumers join or leave: nobody needs to count them.

It uses the ``REDIS_URL`` setting whatever the queue's broker, through the framework's own Redis
client (:mod:`funboost_like.core.redis_connection`), never a broker's. While Redis cannot be reached,
no call starts (the limit is never exceeded): the error is logged and the claim retried every second.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from funboost_like.core.redis_connection import describe_url, key_prefix, redis_client

logger = logging.getLogger("funboost_like.ratelimit")

_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local slot = tonumber(redis.call('GET', KEYS[1]) or '0')
if now - slot > tonumber(ARGV[2]) then slot = now end
redis.call('SET', KEYS[1], string.format('%.6f', slot + tonumber(ARGV[1])), 'PX', ARGV[3])
return {string.format('%.6f', slot), string.format('%.6f', now)}
"""
_CLAIM_SHA = hashlib.sha1(_CLAIM.encode("utf-8")).hexdigest()


class DistributedRateLimiter:
    """Same interface as :class:`~funboost_like.core.ratelimit.RateLimiter`, shared through Redis."""

    def __init__(self, queue: str, qps: float) -> None:
        if qps <= 0:
            raise ValueError("qps must be > 0")
        self.interval = 1.0 / qps
        self.tolerance = min(self.interval, 0.05)
        self.key = f"{key_prefix(queue)}qps_next_slot"
        # Keep the key a little longer than one interval so a long pause restarts the grid cleanly.
        self._ttl_ms = str(int(max(60.0, 10 * self.interval) * 1000))

    def wait(self, stop: threading.Event) -> bool:
        """Block until this consumer's next start slot; return False if ``stop`` was set meanwhile."""
        from redis.exceptions import NoScriptError, RedisError

        args = (repr(self.interval), repr(self.tolerance), self._ttl_ms)
        while not stop.is_set():
            try:
                client = redis_client()
                try:
                    slot, now = client.evalsha(_CLAIM_SHA, 1, self.key, *args)
                except NoScriptError:  # first use on this server, or after a restart or SCRIPT FLUSH
                    slot, now = client.execute_command("EVAL", _CLAIM, 1, self.key, *args)  # type: ignore[no-untyped-call]
            except RedisError as exc:
                logger.error("distributed QPS control cannot reach Redis at %s (%s); no call starts until it can",
                             describe_url(), exc)
                stop.wait(1.0)
                continue
            delay = float(slot) - float(now)
            if delay > 0:
                if delay > 0.05:
                    return not stop.wait(delay)
                time.sleep(delay)
            return not stop.is_set()
        return False
