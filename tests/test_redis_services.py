"""Redis-backed services on every Redis broker kind: RPC results and task filtering live in Redis."""

from __future__ import annotations

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.core.config import patch_frame_config

from .conftest import require_server

REDIS_KINDS = [BrokerEnum.REDIS, BrokerEnum.REDIS_ACK_ABLE, BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM]


@pytest.fixture(autouse=True)
def redis_db() -> None:
    require_server("Redis", "127.0.0.1", 6379)
    patch_frame_config(REDIS_URL="redis://127.0.0.1:6379/15")


@pytest.mark.parametrize("kind", REDIS_KINDS, ids=[k.name for k in REDIS_KINDS])
def test_rpc_and_filtering_on_every_redis_kind(kind: BrokerEnum, queue_name: str) -> None:
    runs: list[tuple[int, int]] = []

    @task_deco(queue_name, broker_kind=kind, is_using_rpc_mode=True, do_task_filtering=True)
    def add(a: int, b: int) -> int:
        runs.append((a, b))
        return a + b

    add.clear()
    add.consume()
    try:
        assert add.push(1, 2).get(timeout=10) == 3
        second = add.push(b=2, a=1)  # the same call: filtered, so it never runs again
        assert second.status_and_result["status"] == "skipped"
        assert add.push(2, 3).result == 5
        assert runs == [(1, 2), (2, 3)]
    finally:
        add.stop()
        add.consumer.join(10)
        import redis

        client = redis.Redis.from_url("redis://127.0.0.1:6379/15")
        for key in [queue_name.encode(), *client.scan_iter(match=f"fl:{{{queue_name}}}:*")]:
            client.delete(key)
