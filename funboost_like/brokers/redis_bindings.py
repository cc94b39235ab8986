"""The bindings of an exchange in Redis, shared by the four Redis kinds (emulated routing; see
docs/routing.md and :mod:`.redis_base`, whose routed publish reads them).

An exchange's bindings are the HASH ``fl:exchange:{<name>}``: the field ``type`` holds the exchange
type, set by the first bind (an exchange keeps its first type; a bind asking for another one logs a
warning and binds to it as it is), and each binding is a field ``["<queue>", "<binding key>"]``
(JSON). A bind is one Lua script, so concurrent binds never mix types.
"""

from __future__ import annotations

from collections.abc import Sequence

from funboost_like.brokers.redis_common import DirectConnections, LuaScript
from funboost_like.brokers.routing import Binding
from funboost_like.brokers.routing import logger as routing_logger
from funboost_like.core import codec

# KEYS: an exchange's HASH; ARGV: exchange type, then the fields of the bindings. Returns the type the
# exchange was first declared with.
_BIND = LuaScript("""
redis.call('HSETNX', KEYS[1], 'type', ARGV[1])
for i = 2, #ARGV do redis.call('HSETNX', KEYS[1], ARGV[i], '') end
return redis.call('HGET', KEYS[1], 'type')
""")


def exchange_key(exchange: str) -> str:
    return f"fl:exchange:{{{exchange}}}"


def bind(conn: DirectConnections, bindings: Sequence[Binding]) -> None:
    """Add ``bindings`` (all of one exchange and queue) to their exchange's HASH."""
    first = bindings[0]
    fields = [codec.dumps([binding.queue, binding.key]) for binding in bindings]
    declared = _BIND(conn, [exchange_key(first.exchange)], [first.exchange_type, *fields]).decode()
    if declared != first.exchange_type:
        routing_logger.warning("exchange %r exists as %s; binding queue %r with keys %r to it as it is, not as %s",
                               first.exchange, declared, first.queue, [b.key for b in bindings],
                               first.exchange_type)


def bindings_of(conn: DirectConnections, exchange: str) -> list[Binding]:
    """Every binding of ``exchange``, with the type it was first declared with ([] when it has none)."""
    stored = conn.execute_command("HGETALL", exchange_key(exchange))  # a map in RESP3
    fields = dict(stored.items() if isinstance(stored, dict) else zip(stored[::2], stored[1::2], strict=True))
    declared = fields.pop(b"type", b"").decode()
    return [Binding(exchange, declared, *codec.loads(field)) for field in fields]
