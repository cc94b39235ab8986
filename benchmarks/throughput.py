"""Publish and consume throughput of funboost_like's brokers (DESIGN.md section 9 targets).

Usage::

    python benchmarks/throughput.py [--brokers memory,sqlite] [--n N] [--repeat R] [--json]
    python benchmarks/throughput.py --brokers redis_list,redis_ack_able,redis_brpoplpush,redis_stream

For every broker and every repetition a fresh Python subprocess (with its own temporary SQLite
folder and ``FUNBOOST_LIKE_NO_USER_CONFIG=1``) measures, in one process, with the trivial function
``def f(x, y): return x + y``, ``concurrent_num=50`` and log level WARNING:

* ``publish one-by-one``: ``f.push(i, y=i)`` N times; rate = N / elapsed. (Before either publish
  clock starts, ``f.get_message_count()`` opens the queue, so file creation is not timed.)
* ``publish bulk``: ``f.publish_many(chunk)`` over N messages in chunks of 10,000 dicts (the dicts
  are built before the clock starts); rate = N / elapsed.
* ``consume (acked)``: N messages are published in bulk first (not timed); the clock runs from
  ``f.consume()`` until the function has run N times *and* the broker holds no unacknowledged
  message of this process (every message acked); rate = N / elapsed. The consumer is then stopped,
  and the run is checked: exactly N calls, nothing left in the queue.

The Redis brokers (``redis_list`` = REDIS, ``redis_ack_able``, ``redis_brpoplpush``,
``redis_stream``) use ``FUNBOOST_LIKE_BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/14``);
every key of each benchmark queue is deleted before and after each path.

The SQLACHEMY cases (``sqlalchemy_postgresql``, ``sqlalchemy_mariadb``, ``sqlalchemy_sqlite``) use
``FUNBOOST_LIKE_BENCH_POSTGRESQL_URL`` / ``FUNBOOST_LIKE_BENCH_MARIADB_URL`` (defaults: the local test
databases) and a SQLite file in the temporary folder; each path's tables are dropped afterwards.

The ``django_postgresql`` case (DJANGO_ORM) runs on the test project's ``postgresql`` database
(tests/django_project/settings.py, the app's migrations applied on first use); each path's rows are
deleted afterwards (the app's tables stay).

The ``nats`` case (NATS JetStream) uses ``FUNBOOST_LIKE_BENCH_NATS_URL`` (default
``nats://127.0.0.1:4222``); each path's streams are deleted before and after it.

The ``mongo`` case (MONGOMQ) uses ``FUNBOOST_LIKE_BENCH_MONGO_URL`` (default
``mongodb://127.0.0.1:27117/funboost_like_bench?retryWrites=false``: SecantusDB, the MongoDB stand-in
the tests use, ``secantusd-py --host 127.0.0.1 --port 27117 --storage-path DIR``; with retryable writes
each of its writes gets slower as writes accumulate). SecantusDB is a MongoDB-wire
server written in Python on WiredTiger whose queries decode every candidate document (a sorted
``find`` with a limit scans the whole queue), so its rates say little about a real MongoDB; each
path's collections are dropped before and after it.

The ``zeromq`` case (ZEROMQ) keeps its queues in the hub of ``FUNBOOST_LIKE_BENCH_ZEROMQ_PORT`` (default
29518), a process of its own that the child starts at first use and stops after each path: every push
and fetch crosses a local TCP connection to it. At-most-once: "acked" means the call ran.

The ``mqtt`` case (MQTT, QoS 1, persistent sessions, acks after the call) uses the Mosquitto of
``FUNBOOST_LIKE_BENCH_MQTT_URL`` (default ``mqtt://127.0.0.1:18830``); when nothing listens there the parent
starts one for the run (``benchmarks/mqtt_server.py``: ``max_queued_messages 0``, since the default 1000
drops a larger backlog) and stops it at the end. No target of its own (issue 14 asks for the figures).

The ``nsq`` case (NSQ) runs on the protocol fixture ``tests/nsqd_server.py`` (no real nsqd here) at
``FUNBOOST_LIKE_BENCH_NSQD_TCP_PORT`` (default 14150) and the HTTP port after it, started by the child
when absent (it exits after a minute idle). Figures only: they measure that Python fixture as much as the broker.

The ``httpsqs`` case (HTTPSQS) uses ``FUNBOOST_LIKE_BENCH_HTTPSQS_URL`` (default ``http://127.0.0.1:11218/``);
when nothing listens there the child starts the fixture server (``tests/httpsqs_server.py``, no real
httpsqs here) in the background, which exits after a minute idle. At-most-once: "acked" means the call
ran. ``FUNBOOST_LIKE_HTTPSQS_PIPELINE=1`` measures it without pipelining. No target of its own.

The ``kafka`` (KAFKA, kafka-python) and ``confluent_kafka`` (CONFLUENT_KAFKA) cases use
``FUNBOOST_LIKE_BENCH_KAFKA_SERVERS`` (default ``127.0.0.1:9092``, Tansu as the tests start it),
``KAFKA_PARTITIONS=4`` and ``KAFKA_SESSION_TIMEOUT_SECONDS=3`` (Tansu's first join of a group takes half
of it), on topics named for the run; their consume clock runs from the first call (the group join, from
``f.consume()`` to the first call, is reported apart as ``join``) until N calls ran and the group's
committed offsets reached the end of every partition (``rate_calls_only`` stops at the N-th call). Each
path's topics are deleted afterwards. The ``pulsar`` case (PULSAR) uses ``FUNBOOST_LIKE_BENCH_PULSAR_URL``
(default ``pulsar://127.0.0.1:6650``), topics named for the run, purged afterwards (see
``benchmarks/pulsar_throughput.py`` for a server of its own). The ``kombu_redis`` case is KOMBU on kombu's
Redis transport: ``KOMBU_URL`` is ``FUNBOOST_LIKE_BENCH_REDIS_URL`` with ``global_keyprefix=fl_bench_kombu:``,
whose keys are deleted after each path (the ``kombu`` case is KOMBU on ``RABBITMQ_URL``).

The parent prints the median and the best rate of the repetitions against the targets. This is a
measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BROKERS = {"memory": "LOCAL_PYTHON_QUEUE", "sqlite": "PERSISTQUEUE", "redis_list": "REDIS",
           "redis_ack_able": "REDIS_ACK_ABLE", "redis_brpoplpush": "RedisBrpopLpush", "redis_stream": "REDIS_STREAM",
           "rabbitmq_pika": "RABBITMQ_PIKA", "rabbitmq_amqpstorm": "RABBITMQ_AMQPSTORM",
           "rabbitmq_rabbitpy": "RABBITMQ_RABBITPY", "kombu": "KOMBU", "sqlalchemy_postgresql": "SQLACHEMY",
           "sqlalchemy_mariadb": "SQLACHEMY", "sqlalchemy_sqlite": "SQLACHEMY"}
BROKERS["nats"] = "NATS"
BROKERS["mongo"] = "MONGOMQ"
BENCH_MONGO_URL = os.environ.get("FUNBOOST_LIKE_BENCH_MONGO_URL",
                                 "mongodb://127.0.0.1:27117/funboost_like_bench?retryWrites=false")
# DJANGO_ORM on PostgreSQL: the test project's settings (tests/django_project), its "postgresql" alias.
BROKERS["django_postgresql"] = "DJANGO_ORM"
DJANGO_CASES = {"django_postgresql": "postgresql"}
BENCH_NATS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_NATS_URL", "nats://127.0.0.1:4222")
# SQLACHEMY cases: the database URL of each ("" is a SQLite file in the benchmark's temporary folder).
SQL_URLS = {"sqlalchemy_postgresql": os.environ.get("FUNBOOST_LIKE_BENCH_POSTGRESQL_URL",
                                                    "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
            "sqlalchemy_mariadb": os.environ.get("FUNBOOST_LIKE_BENCH_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
            "sqlalchemy_sqlite": ""}
REDIS_BROKERS = {"redis_list", "redis_ack_able", "redis_brpoplpush", "redis_stream"}
RABBITMQ_BROKERS = {"rabbitmq_pika", "rabbitmq_amqpstorm", "rabbitmq_rabbitpy", "kombu"}
BENCH_REDIS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
PATHS = ("publish one-by-one", "publish bulk", "consume (acked)")

# Default N per broker and path (``--n`` overrides all of them).
DEFAULT_N = {
    "memory": {"publish one-by-one": 200_000, "publish bulk": 200_000, "consume (acked)": 200_000},
    "sqlite": {"publish one-by-one": 20_000, "publish bulk": 200_000, "consume (acked)": 50_000},
    **{b: {"publish one-by-one": 50_000, "publish bulk": 200_000, "consume (acked)": 200_000} for b in REDIS_BROKERS},
    **{b: {"publish one-by-one": 5_000, "publish bulk": 100_000, "consume (acked)": 100_000} for b in RABBITMQ_BROKERS},
    **{b: {"publish one-by-one": 5_000, "publish bulk": 100_000, "consume (acked)": 50_000} for b in SQL_URLS},
    "nats": {"publish one-by-one": 5_000, "publish bulk": 100_000, "consume (acked)": 50_000},
}
# DESIGN.md section 9 (single process, trivial function, 2-core machine).
TARGETS = {
    "memory": {"publish one-by-one": 200_000, "publish bulk": 200_000, "consume (acked)": 100_000},
    "sqlite": {"publish one-by-one": 5_000, "publish bulk": 50_000, "consume (acked)": 10_000},
    # Stated for REDIS_STREAM and REDIS_ACK_ABLE; the other two Redis kinds are held to the same figures.
    **{b: {"publish one-by-one": 9_000, "publish bulk": 150_000, "consume (acked)": 50_000} for b in REDIS_BROKERS},
    # Confirms on, persistent messages, durable queues (issue 11: for the fastest client).
    **{b: {"publish one-by-one": 8_000, "publish bulk": 40_000, "consume (acked)": 20_000} for b in RABBITMQ_BROKERS},
    **{b: {"publish one-by-one": 3_000, "publish bulk": 50_000, "consume (acked)": 10_000} for b in SQL_URLS},
    "nats": {"publish one-by-one": 8_000, "publish bulk": 50_000, "consume (acked)": 20_000},  # file storage
}
DEFAULT_N["django_postgresql"] = {"publish one-by-one": 5_000, "publish bulk": 50_000, "consume (acked)": 20_000}
TARGETS["django_postgresql"] = TARGETS["sqlalchemy_postgresql"]  # the SQL figures of issue 12
# MONGOMQ on SecantusDB: small N (every take scans the queue there); no target of its own, the SQL figures shown.
DEFAULT_N["mongo"] = {"publish one-by-one": 2_000, "publish bulk": 20_000, "consume (acked)": 5_000}
TARGETS["mongo"] = TARGETS["sqlalchemy_postgresql"]
# ZEROMQ: the named benchmark queues live in the hub of FUNBOOST_LIKE_BENCH_ZEROMQ_PORT (a process of its own,
# started by the child, stopped after each path); no target of its own, the at-most-once Redis list figures shown.
BROKERS["zeromq"] = "ZEROMQ"
BENCH_ZEROMQ_PORT = int(os.environ.get("FUNBOOST_LIKE_BENCH_ZEROMQ_PORT", "29518"))
DEFAULT_N["zeromq"] = {"publish one-by-one": 20_000, "publish bulk": 200_000, "consume (acked)": 100_000}
TARGETS["zeromq"] = TARGETS["redis_list"]
BROKERS["mqtt"] = "MQTT"
BENCH_MQTT_URL = os.environ.get("FUNBOOST_LIKE_BENCH_MQTT_URL", "mqtt://127.0.0.1:18830")
DEFAULT_N["mqtt"] = {"publish one-by-one": 5_000, "publish bulk": 50_000, "consume (acked)": 50_000}
TARGETS["mqtt"] = dict.fromkeys(PATHS, 0)  # none: figures only
# HTTPSQS on the fixture server (tests/httpsqs_server.py: no real httpsqs here) of FUNBOOST_LIKE_BENCH_HTTPSQS_URL; the
# child starts one in the background (it exits after a minute idle) when nothing listens there. Figures only.
BROKERS["httpsqs"] = "HTTPSQS"
BENCH_HTTPSQS_URL = os.environ.get("FUNBOOST_LIKE_BENCH_HTTPSQS_URL", "http://127.0.0.1:11218/")
DEFAULT_N["httpsqs"] = {"publish one-by-one": 5_000, "publish bulk": 50_000, "consume (acked)": 50_000}
TARGETS["httpsqs"] = dict.fromkeys(PATHS, 0)
# NSQ on the protocol fixture (tests/nsqd_server.py: no real nsqd here) at FUNBOOST_LIKE_BENCH_NSQD_TCP_PORT (and the
# HTTP port after it); the child starts one in the background (it exits after a minute idle). Figures only: they
# measure this Python fixture as much as the broker.
BROKERS["nsq"] = "NSQ"
BENCH_NSQD_TCP_PORT = int(os.environ.get("FUNBOOST_LIKE_BENCH_NSQD_TCP_PORT", "14150"))
DEFAULT_N["nsq"] = {"publish one-by-one": 5_000, "publish bulk": 100_000, "consume (acked)": 50_000}
TARGETS["nsq"] = dict.fromkeys(PATHS, 0)
# Kafka on FUNBOOST_LIKE_BENCH_KAFKA_SERVERS (Tansu by default), PULSAR on FUNBOOST_LIKE_BENCH_PULSAR_URL, KOMBU on
# the benchmark's Redis database: figures only (the Kafka targets of DESIGN.md are for bulk and consume).
KAFKA_CASES = {"kafka": "KAFKA", "confluent_kafka": "CONFLUENT_KAFKA"}
BROKERS.update(KAFKA_CASES)
BROKERS["pulsar"] = "PULSAR"
BROKERS["kombu_redis"] = "KOMBU"
BENCH_KAFKA_SERVERS = os.environ.get("FUNBOOST_LIKE_BENCH_KAFKA_SERVERS", "127.0.0.1:9092")
BENCH_PULSAR_URL = os.environ.get("FUNBOOST_LIKE_BENCH_PULSAR_URL", "pulsar://127.0.0.1:6650")
# FUNBOOST_LIKE_BENCH_RUN_ID (peers/run.py sets it): in every queue name and the kombu key prefix, so that runs
# side by side on one server keep apart.
RUN_ID = os.environ.get("FUNBOOST_LIKE_BENCH_RUN_ID", "")
KOMBU_REDIS_PREFIX = f"fl_bench_kombu{'_' + RUN_ID if RUN_ID else ''}:"
for _case in (*KAFKA_CASES, "pulsar", "kombu_redis"):
    DEFAULT_N[_case] = {"publish one-by-one": 5_000, "publish bulk": 50_000, "consume (acked)": 50_000}
    TARGETS[_case] = dict.fromkeys(PATHS, 0)
for _case in KAFKA_CASES:
    TARGETS[_case] = {"publish one-by-one": 0, "publish bulk": 50_000, "consume (acked)": 30_000}
BULK_CHUNK = 10_000
CONSUME_TIMEOUT_SECONDS = 120.0
CHILD_TIMEOUT_SECONDS = 600.0


# ---------------------------------------------------------------------------------------------
# child: one broker, one repetition, in a fresh process
# ---------------------------------------------------------------------------------------------

def _chunks(n: int, size: int = BULK_CHUNK) -> list[list[dict[str, int]]]:
    return [[{"x": i, "y": i} for i in range(start, min(n, start + size))] for start in range(0, n, size)]


def _measure_publish_one(fn, n: int) -> dict:
    push = fn.push
    fn.get_message_count()  # warm-up: opens this thread's connection / creates the queue (not timed)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        push(i, y=i)
    elapsed = time.perf_counter() - t0
    count = fn.get_message_count()
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "check": f"queue holds {count}", "ok_check": count == n}


def _measure_publish_bulk(fn, n: int) -> dict:
    chunks = _chunks(n)
    fn.get_message_count()  # warm-up: opens this thread's connection / creates the queue (not timed)
    gc.collect()
    t0 = time.perf_counter()
    for chunk in chunks:
        fn.publish_many(chunk)
    elapsed = time.perf_counter() - t0
    count = fn.get_message_count()
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "chunk": BULK_CHUNK,
            "check": f"queue holds {count}", "ok_check": count == n}


def _measure_consume(fn, n: int, counter_box: dict) -> dict:
    import itertools
    import threading

    for chunk in _chunks(n):  # not timed
        fn.publish_many(chunk)
    queued = fn.get_message_count()
    done = threading.Event()
    counter_box["counter"] = itertools.count(1)
    counter_box["target"] = n
    counter_box["done"] = done
    broker = fn.broker
    in_flight = getattr(broker, "in_flight", None)
    gc.collect()

    kafka_marks = _kafka_marks(fn) if "first" in counter_box else None
    t0 = time.perf_counter()
    fn.consume()
    pool = getattr(fn.consumer, "_pool", None)  # informative only: how many worker threads the pool grew to
    max_threads = 0
    while not (finished := done.wait(0.05)) and time.perf_counter() - t0 < CONSUME_TIMEOUT_SECONDS:
        max_threads = max(max_threads, getattr(pool, "worker_count", 0))
    t_ran = time.perf_counter()
    max_threads = max(max_threads, getattr(pool, "worker_count", 0))
    # Every call has run; now wait until the fetcher has acked the last batch.
    if finished and in_flight is not None:
        while in_flight(fn.queue_name) and time.perf_counter() - t0 < CONSUME_TIMEOUT_SECONDS:
            time.sleep(0.0005)
    kafka: dict = {}
    if kafka_marks is not None:  # Kafka: acked means committed; the clock runs from the first call
        ends, committed_now = kafka_marks
        committed: dict[int, int] = {}
        while finished and time.perf_counter() - t0 < CONSUME_TIMEOUT_SECONDS:
            committed = committed_now()
            if committed == ends:
                break
            time.sleep(0.002)
        first = counter_box["first"] or t0
        kafka = {"join": first - t0, "rate_calls_only": n / (t_ran - first), "commit_wait": time.perf_counter() - t_ran,
                 "committed_all": committed == ends}
        finished = finished and committed == ends
        t0 = first
    elapsed = time.perf_counter() - t0

    fn.stop()
    fn.consumer.join(60)
    calls = next(counter_box["counter"]) - 1
    left = fn.get_message_count()
    result = {
        "n": n, "elapsed": elapsed, "rate": (n if finished else calls) / elapsed,
        "ran_all_after": t_ran - t0, "queued_before": queued, "pool_threads_max": max_threads, **kafka,
        "check": f"{calls} calls, {left} left in queue", "ok_check": finished and calls == n and left == 0,
    }
    if not finished:
        result["error"] = f"timed out after {CONSUME_TIMEOUT_SECONDS:.0f}s with {calls} of {n} calls run"
    return result


def _kafka_marks(fn):
    """Kafka: the ends of the queue's partitions now (all published) and a reader of the group's committed offsets."""
    from funboost_like.brokers.kafka_client import log_ends

    client = fn.broker._client
    ends = {p: high for p, (_, high) in log_ends(client, fn.queue_name).items() if high > 0}
    return ends, lambda: client.group_offsets(f"funboost_like.{fn.queue_name}", fn.queue_name, list(ends))


def child_main(broker: str, ns: dict[str, int], tmpdir: str) -> None:  # noqa: C901 - one step per setting
    import logging

    import funboost_like
    from funboost_like import BrokerEnum, patch_frame_config, task_deco
    from funboost_like.core import codec

    patch_frame_config(SQLITE_QUEUES_PATH=tmpdir)
    if broker in REDIS_BROKERS:
        patch_frame_config(REDIS_URL=BENCH_REDIS_URL)
    patch_frame_config(NATS_URL=BENCH_NATS_URL)  # read by the nats case only
    patch_frame_config(MONGO_URL=BENCH_MONGO_URL)  # read by the mongo case only
    patch_frame_config(ZEROMQ_PORT=BENCH_ZEROMQ_PORT)  # read by the zeromq case only
    patch_frame_config(MQTT_URL=BENCH_MQTT_URL)  # read by the mqtt case only
    patch_frame_config(HTTPSQS_URL=BENCH_HTTPSQS_URL)  # read by the httpsqs case only
    _ensure_httpsqs_fixture(broker)
    _use_nsqd_fixture(broker)
    if broker in SQL_URLS:
        patch_frame_config(SQLALCHEMY_URL=SQL_URLS[broker])
    if broker in KAFKA_CASES:
        patch_frame_config(KAFKA_BOOTSTRAP_SERVERS=BENCH_KAFKA_SERVERS, KAFKA_PARTITIONS=4,
                           KAFKA_SESSION_TIMEOUT_SECONDS=3.0)
    patch_frame_config(PULSAR_URL=BENCH_PULSAR_URL)  # read by the pulsar case only
    if broker == "kombu_redis":
        sep = "&" if "?" in BENCH_REDIS_URL else "?"
        patch_frame_config(KOMBU_URL=f"{BENCH_REDIS_URL}{sep}global_keyprefix={KOMBU_REDIS_PREFIX}")
    _use_django_database(broker)
    kind = BrokerEnum[BROKERS[broker]]
    counter_box: dict = {}

    def make(queue: str, counting: bool):
        if counting and broker in KAFKA_CASES:  # the clock starts at the first call (the group join apart)
            counter_box["first"] = None

            def f(x, y):
                if counter_box["first"] is None:
                    counter_box["first"] = time.perf_counter()
                if next(counter_box["counter"]) == counter_box["target"]:
                    counter_box["done"].set()
                return x + y
        elif counting:
            def f(x, y):
                if next(counter_box["counter"]) == counter_box["target"]:
                    counter_box["done"].set()
                return x + y
        else:
            def f(x, y):
                return x + y
        return task_deco(queue, broker_kind=kind, concurrent_num=50, log_level=logging.WARNING)(f)

    results: dict[str, dict] = {}
    for path, queue, counting, measure in (
        ("publish one-by-one", "bench_publish_one", False, _measure_publish_one),
        ("publish bulk", "bench_publish_bulk", False, _measure_publish_bulk),
        ("consume (acked)", "bench_consume", True, None),
    ):
        fn = make(f"{queue}_{broker}" + (f"_{RUN_ID}" if RUN_ID else "")
                  + (f"_{os.getpid()}" if broker in (*KAFKA_CASES, "pulsar") else ""), counting)
        _delete_redis_keys(broker, fn.queue_name)
        _delete_rabbitmq_queue(broker, fn.queue_name)
        _delete_nats_streams(broker, fn)
        _drop_mongo_collections(broker, fn)
        try:
            if measure is None:
                results[path] = _measure_consume(fn, ns[path], counter_box)
            else:
                results[path] = measure(fn, ns[path])
        except Exception as exc:  # report and carry on with the next path
            results[path] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            try:
                fn.clear()
                _delete_redis_keys(broker, fn.queue_name)
                _delete_rabbitmq_queue(broker, fn.queue_name)
                _delete_nats_streams(broker, fn)
                _drop_mongo_collections(broker, fn)
                if broker in SQL_URLS:
                    fn.broker.drop_tables(fn.queue_name)
                _stop_zeromq_hub(broker, fn)
                _delete_kafka_topics(broker, fn)
                _delete_kombu_redis_keys(broker)
            except Exception:
                pass

    import sqlite3

    out = {
        "broker": broker,
        "results": results,
        "orjson": codec._orjson is not None,
        "funboost_like": getattr(funboost_like, "__version__", "?"),
        "sqlite": sqlite3.sqlite_version,
    }
    sys.stdout.write("BENCH-RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


def _ensure_httpsqs_fixture(broker: str) -> None:
    """The httpsqs case: start the fixture server in the background when nothing listens on its port."""
    if broker == "httpsqs":
        from urllib.parse import urlsplit

        from tests.httpsqs_server import listening, start_background

        port = urlsplit(BENCH_HTTPSQS_URL).port or 1218
        if not listening(port=port):
            start_background(port, auth=None, idle_exit=60.0)


def _use_django_database(broker: str) -> None:
    """The DJANGO_ORM cases: the test project's settings and the case's database alias."""
    if broker in DJANGO_CASES:
        from funboost_like import patch_frame_config

        patch_frame_config(DJANGO_SETTINGS_MODULE="tests.django_project.settings",
                           DJANGO_DATABASE_ALIAS=DJANGO_CASES[broker], DJANGO_MIGRATE_ON_FIRST_USE=True)


def _use_nsqd_fixture(broker: str) -> None:
    """The nsq case: the fixture nsqd of the benchmark's ports, started in the background when absent."""
    if broker == "nsq":
        from funboost_like import patch_frame_config
        from tests.nsqd_server import ensure_running

        patch_frame_config(NSQD_TCP_ADDRESSES=f"127.0.0.1:{BENCH_NSQD_TCP_PORT}",
                           NSQD_HTTP_ADDRESSES=f"127.0.0.1:{BENCH_NSQD_TCP_PORT + 1}")
        ensure_running(BENCH_NSQD_TCP_PORT, BENCH_NSQD_TCP_PORT + 1, idle_exit=60.0)


def _delete_redis_keys(broker: str, queue: str) -> None:
    """Every key of ``queue`` on the benchmark's Redis database (the queue's own and ``fl:{queue}:*``)."""
    if broker not in REDIS_BROKERS:
        return
    from funboost_like.brokers.redis_common import redis_client

    client = redis_client()
    keys = [queue, *client.scan_iter(match=f"fl:{{{queue}}}:*", count=1000)]
    client.delete(*keys)


def _delete_rabbitmq_queue(broker: str, queue: str) -> None:
    """Delete the benchmark queue on RabbitMQ (a fresh queue per path, declared by the broker as it wants)."""
    if broker not in RABBITMQ_BROKERS:
        return
    import pika

    from funboost_like.core.config import settings

    connection = pika.BlockingConnection(pika.URLParameters(str(settings.get("RABBITMQ_URL"))))
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


def _delete_nats_streams(broker: str, fn) -> None:
    """Delete the benchmark queue's streams on NATS (created again, as the broker wants, at first use)."""
    if broker == "nats":
        fn.broker.delete_queue(fn.queue_name)


def _drop_mongo_collections(broker: str, fn) -> None:
    """Drop the benchmark queue's collections on MongoDB (made again at first use)."""
    if broker == "mongo":
        fn.broker.drop_collections(fn.queue_name)


def _delete_kafka_topics(broker: str, fn) -> None:
    """Delete the Kafka topics of the benchmark queue (the queue's and those named after it: delays, dead letters)."""
    if broker not in KAFKA_CASES:
        return
    fn.stop()
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": BENCH_KAFKA_SERVERS, "log_level": 3})  # no info lines on stderr
    name = fn.queue_name
    topics = [t for t in admin.list_topics(timeout=10).topics if t == name or t.startswith(f"{name}.")]
    for future in admin.delete_topics(topics, operation_timeout=10).values() if topics else ():
        future.result()


def _delete_kombu_redis_keys(broker: str) -> None:
    """The kombu_redis case: every key under its prefix (queues, bindings, unacked index) on the benchmark database."""
    if broker == "kombu_redis":
        import redis

        client = redis.Redis.from_url(BENCH_REDIS_URL)
        keys = list(client.scan_iter(match=f"{KOMBU_REDIS_PREFIX}*", count=1000))
        if keys:
            client.delete(*keys)


def _stop_zeromq_hub(broker: str, fn) -> None:
    """Stop the hub the zeromq case started (what it still holds goes with it)."""
    if broker == "zeromq":
        fn.broker.stop_hub(fn.queue_name)


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------

def run_child(broker: str, ns: dict[str, int]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"funboost_like_bench_{broker}_") as tmpdir:
        env = dict(os.environ)
        env["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
        env["FUNBOOST_LIKE_SQLITE_QUEUES_PATH"] = tmpdir
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", broker, "--child-dir", tmpdir,
               "--child-ns", json.dumps(ns)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return {"broker": broker, "error": f"subprocess timed out after {CHILD_TIMEOUT_SECONDS:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            data = json.loads(line[len("BENCH-RESULT "):])
            if proc.stderr.strip():
                data["stderr"] = proc.stderr.strip()[-2000:]
            return data
    return {"broker": broker, "error": f"subprocess exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"}


def _fmt(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--brokers", default="memory,sqlite", help=f"comma-separated: {','.join(BROKERS)}")
    parser.add_argument("--n", type=int, default=None, help="messages per path (default: per broker and path)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the median and best are reported")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-ns", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _collect(brokers: list[str], ns_by_broker: dict[str, dict[str, int]], repeat: int) -> dict[str, list[dict]]:
    """Run every repetition of every broker, each in a fresh subprocess (brokers interleaved)."""
    runs: dict[str, list[dict]] = {b: [] for b in brokers}
    for rep in range(repeat):
        for broker in brokers:
            t = time.monotonic()
            print(f"[{rep + 1}/{repeat}] {broker} ...", end=" ", file=sys.stderr, flush=True)
            data = run_child(broker, ns_by_broker[broker])
            runs[broker].append(data)
            print(f"{time.monotonic() - t:.1f}s" + (f" ERROR {data['error']}" if "error" in data else ""),
                  file=sys.stderr, flush=True)
    return runs


def _row(broker: str, path: str, n: int, runs: list[dict], problems: list[str]) -> dict:
    rates = []
    for rep, data in enumerate(runs, 1):
        res = data.get("results", {}).get(path)
        if res is None:
            continue
        if "error" in res:
            problems.append(f"{broker} {path} run {rep}: {res['error']}")
        elif "rate" in res:
            rates.append(res["rate"])
        if res.get("ok_check") is False:
            problems.append(f"{broker} {path} run {rep}: check failed: {res.get('check')}")
    target = TARGETS[broker][path]
    median = statistics.median(rates) if rates else None
    return {
        "broker": broker, "path": path, "n": n, "runs": len(rates), "rates": rates, "median": median,
        "best": max(rates) if rates else None, "target": target, "ok": median is not None and median >= target,
    }


def _summarize(brokers: list[str], ns_by_broker: dict[str, dict[str, int]],
               runs: dict[str, list[dict]]) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    problems: list[str] = []
    for broker in brokers:
        for path in PATHS:
            rows.append(_row(broker, path, ns_by_broker[broker][path], runs[broker], problems))
        for rep, data in enumerate(runs[broker], 1):
            if "error" in data:
                problems.append(f"{broker} run {rep}: {data['error']}")
            elif data.get("stderr"):
                problems.append(f"{broker} run {rep} wrote to stderr: {data['stderr'][:500]}")
    return rows, problems


def _environment(runs: dict[str, list[dict]], repeat: int, started: float) -> dict:
    from funboost_like.core import codec

    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    child = next((d for datas in runs.values() for d in datas if "sqlite" in d), {})
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "orjson": child.get("orjson", codec._orjson is not None),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "sqlite": child.get("sqlite", "?"),
        "loadavg_at_end": load,
        "repeat": repeat,
        "bulk_chunk": BULK_CHUNK,
        "total_seconds": round(time.monotonic() - started, 1),
        "consume_pool_threads": {
            b: [d.get("results", {}).get("consume (acked)", {}).get("pool_threads_max") for d in datas]
            for b, datas in runs.items()
        },
    }


def _print_report(info: dict, rows: list[dict], problems: list[str]) -> None:
    print(f"funboost_like throughput  date {info['date']}  Python {info['python']} ({info['implementation']})"
          f"  orjson {'yes' if info['orjson'] else 'no'}  CPUs {info['cpu_count']} (usable {info['cpus_usable']})"
          f"  SQLite {info['sqlite']}")
    print(f"platform {info['platform']}  load average at end {info['loadavg_at_end']}  repeat {info['repeat']}"
          f"  total {info['total_seconds']}s")
    print()
    header = f"{'broker':<16} {'path':<20} {'N':>9} {'rate/s (median)':>16} {'best':>10} {'target':>9}  ok"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['broker']:<16} {row['path']:<20} {row['n']:>9,} {_fmt(row['median']):>16} {_fmt(row['best']):>10}"
              f" {row['target']:>9,}  {'yes' if row['ok'] else 'NO'}")
    print()
    print(f"publish bulk = publish_many in chunks of {BULK_CHUNK:,} dicts; consume = from consume() until all N "
          f"calls ran and were acked; 'ok' compares the median with the target.")
    threads = info.get("consume_pool_threads", {})
    if threads:
        print("consume: most worker threads seen per run (trivial calls need 1; more means the pool grew and "
              "the threads contend for the GIL): " + "; ".join(f"{b} {t}" for b, t in threads.items()))
    if problems:
        print()
        print("problems:")
        for p in problems:
            print(f"  - {p}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.child:
        child_main(args.child, json.loads(args.child_ns), args.child_dir)
        return 0

    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    unknown = [b for b in brokers if b not in BROKERS]
    if unknown:
        print(f"unknown broker(s) {', '.join(unknown)}; known: {', '.join(BROKERS)}", file=sys.stderr)
        return 0
    repeat = max(1, args.repeat)
    ns_by_broker = {b: {p: (args.n if args.n else DEFAULT_N[b][p]) for p in PATHS} for b in brokers}

    started = time.monotonic()
    import mqtt_server  # benchmarks/mqtt_server.py: the benchmark Mosquitto, started here when absent

    mosquitto = mqtt_server.ensure(BENCH_MQTT_URL) if "mqtt" in brokers else None
    try:
        runs = _collect(brokers, ns_by_broker, repeat)
    finally:
        mqtt_server.stop(mosquitto)
    rows, problems = _summarize(brokers, ns_by_broker, runs)
    info = _environment(runs, repeat, started)
    _print_report(info, rows, problems)
    if args.json:
        print()
        print(json.dumps({"info": info, "rows": rows, "problems": problems, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except Exception:  # a measurement, not a test: report and exit 0
        import traceback

        traceback.print_exc()
    sys.exit(0)
