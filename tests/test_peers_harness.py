"""benchmarks/peers/run.py: runs side by side keep apart (their own names, ports and clean-up)."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest
import redis

from .conftest import require_server

RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "peers" / "run.py"
REDIS_URL = "redis://127.0.0.1:6379/15"


def load_run() -> ModuleType:
    """A fresh copy of run.py (its addresses and tag are module globals: one copy per run)."""
    spec = importlib.util.spec_from_file_location(f"peers_run_{uuid.uuid4().hex}", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_runs_have_their_own_names_and_ports_and_delete_only_their_own_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two kafka sets at once both wanted Tansu on port 19092, and every run deleted every ``*peerbench*``
    key after each peer process, those of a run beside it included."""
    require_server("Redis", "127.0.0.1", 6379)
    monkeypatch.setattr(sys, "path", list(sys.path))  # run.py adds tests/ and benchmarks/
    monkeypatch.setenv("PEERBENCH_RUN_TAG", "")  # set by each run; put back afterwards
    a, b = load_run(), load_run()
    for run in (a, b):
        run._choose_addresses(run._parse_args(["--set", "all"]))
    assert a.RUN_TAG != b.RUN_TAG and a.RUN_TAG.startswith("peerbench_")
    assert a.KAFKA_SERVERS != b.KAFKA_SERVERS and a.MONGO_URL != b.MONGO_URL and a.PULSAR_URL != b.PULSAR_URL
    assert set(a.ZEROMQ_PORTS.values()).isdisjoint(b.ZEROMQ_PORTS.values()) and len(set(a.ZEROMQ_PORTS.values())) == 2
    assert a._peers("redis://x/0", "amqp://x/")[0].args[-1].startswith(f"{a.RUN_TAG}_funboost_")
    client = redis.Redis.from_url(REDIS_URL)
    before = a._peer_keys(client)
    own, other = f"{a.RUN_TAG}_funboost_redis", f"{b.RUN_TAG}_funboost_redis"
    shared, ours = f"funboost_peers_harness_{uuid.uuid4().hex}", f"funboost_like_peers_harness_{uuid.uuid4().hex}"
    for key in (own, other, shared, ours):
        client.set(key, 1)
    try:
        assert a._cleanup(client, before) == 1  # its own keys: run b still holds keys, so funboost's shared stay
        assert client.exists(other, shared, ours) == 3
        b._cleanup(client, before)  # alone now: funboost's shared keys go too (ours never)
        assert client.exists(other, shared) == 0 and client.exists(ours) == 1
    finally:
        client.delete(own, other, shared, ours)
        client.close()
