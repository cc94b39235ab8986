"""funboost_like beside funboost 55 and Celery 5.7: same machine, same Redis / RabbitMQ, same run.

Usage (from the repository root, with the project's Python)::

    python benchmarks/peers/run.py [--venv /tmp/peers] [--set all|redis|rabbitmq|zeromq|mqtt|sql|kafka|nats|mongo|
                                   pulsar|kombu|modes] [--modes-scale 1.0]
                                   [--redis-url redis://127.0.0.1:6379/13]
                                   [--rabbitmq-url amqp://guest:guest@127.0.0.1:5672/%2F]
                                   [--repeat 3] [--only ours,funboost,celery] [--json] [--clean-leftovers]
                                   [--mqtt-url URL] [--kafka-servers HOST:PORT] [--mongo-url URL] [--pulsar-url URL]

Sets of workloads, all by default (``--set all``), in this order in every repetition:

* ``redis``: memory, SQLite and the four Redis kinds (ours, funboost), Celery on Redis;
* ``rabbitmq``: our RabbitMQ kinds that are built (``rabbitmq_pika``, ``rabbitmq_amqpstorm``,
  ``rabbitmq_rabbitpy``, ``kombu``: an entry of ``funboost_like.brokers.registry.BROKERS`` that is not
  None and whose module imports; the others are skipped and named), funboost ``RABBITMQ_AMQPSTORM``,
  Celery on RabbitMQ (``amqp://``, py-amqp);
* ``zeromq`` (no server): our ZEROMQ (its hub process on a local port) and funboost ``ZEROMQ`` (its broker
  process; its publisher needs a running consumer, so ``funboost_bench.py`` starts the consumer first).
* ``mqtt``: our MQTT (QoS 1, persistent sessions, acks after the call) and funboost ``MQTT`` (QoS 0, a clean
  session: messages published while no consumer is subscribed are lost, so its consumer starts first) on one
  Mosquitto, started for the run on a free port and stopped at the end (``benchmarks/mqtt_server.py``,
  ``max_queued_messages 0``), or the one at ``--mqtt-url`` (started there when nothing listens).
* ``sql``: our SQLACHEMY on PostgreSQL and MariaDB (``throughput.py``'s ``sqlalchemy_postgresql`` and
  ``sqlalchemy_mariadb``: the ``test`` database of each local server) and funboost ``SQLACHEMY`` on the same
  two databases (its drivers in the scratch venv: ``psycopg2-binary``, ``pymysql``, plus ``sqlalchemy`` and
  ``sqlalchemy_utils``); funboost's queue table is dropped after each of its runs.
* ``kafka``: our KAFKA and CONFLUENT_KAFKA (``throughput.py``'s ``kafka`` and ``confluent_kafka``) and funboost
  ``KAFKA`` and ``KAFKA_CONFLUENT`` on Tansu (started for the run on a free port with ``tests/kafka_server.py``'s
  command and stopped at the end, or the one at ``--kafka-servers``, started there when nothing listens). The
  consume column runs from the first call (the group join is printed apart, with the rate until the N-th call and
  the commit wait).
* ``nats``: our NATS (JetStream) and funboost ``NATS_JETSTREAM`` and ``NATS_CORE`` on the NATS server at ``NATS_URL``.
* ``mongo``: our MONGOMQ and funboost ``MONGOMQ`` on SecantusDB (started for the run on a free port like the
  tests start it, its files in a temporary folder; or ``--mongo-url``).
* ``pulsar``: our PULSAR and funboost ``PULSAR`` on pulsar-lite (likewise; or ``--pulsar-url``).
* ``kombu``: our KOMBU and funboost ``KOMBU`` on kombu's Redis transport, on ``--redis-url``.
* ``modes`` (not part of ``all``): the concurrency modes on memory, SQLite and REDIS_ACK_ABLE, ours and funboost
  alternating, a trivial function and one that waits 10 ms (``modes_set.py``, ``modes_workload.py``).

The kafka and redis sets also run ``benchmarks/bare_push.py`` in every repetition, after ours: bare client loops
that wait for each message (kafka-python ``send().get()``, confluent-kafka ``produce()`` + ``flush()``, one
ProduceRequest per message on a plain socket; redis-py ``LPUSH`` and ``XADD``), whose medians are printed under the
table as the ceiling of a one-by-one push on those servers.

Every name a run gives starts with its tag, ``peerbench_<run id>`` (six hex digits, printed in the report), and a
run deletes only names with its own tag, so runs of different sets (or of the same set) can go side by side on one
Redis database, RabbitMQ vhost and NATS server: each picks free ports for what it starts (the stand-ins, Mosquitto,
both ZeroMQ hubs). After every peer process of those sets, the topics (Kafka), streams (NATS) and collections
(funboost's database ``funboost_mongomq``) whose name contains the tag are deleted; funboost's KOMBU keys carry
the prefix ``<tag>_fbkombu:`` and go with the run's other keys. Our side (``throughput.py``, given the run id as
``FUNBOOST_LIKE_BENCH_RUN_ID``) deletes its own. ``--clean-leftovers`` first deletes every name containing
``peerbench`` on the chosen sets' servers (what interrupted runs left), so use it only when no other run is going.

funboost and Celery are never imported here and are not dependencies of the project: they live in a
scratch virtualenv (``--venv``, see ``benchmarks/peers/README.md``) whose Python runs the two small
workload scripts next to this file, ``funboost_bench.py`` and ``celery_bench.py``. Our own figures come
from ``benchmarks/throughput.py --repeat 1 --json`` run once per set and repetition with
``FUNBOOST_LIKE_BENCH_REDIS_URL`` set to the same Redis database and ``FUNBOOST_LIKE_RABBITMQ_URL``
to the same RabbitMQ. The three frameworks alternate in every repetition, so load from elsewhere does
not hit only one of them; the report gives the median of the repetitions.

The same workload everywhere: ``f(x, y): return x + y``, 50 threads, one consumer process, N messages
published one by one (timed), then consumed (timed from starting the consumer until N calls ran and,
where the broker acks and its pending state can be read, until nothing is left unacknowledged).
Bulk publishing where the framework has it (ours: ``publish_many``; Celery: ``group().apply_async()``;
funboost has none). Details of each peer measurement are in the docstrings of the two scripts.

Every Redis key the peers create is deleted after each peer process: keys whose name contains the run's tag (all
peer queues, Celery runs with the key prefix ``<tag>_celery:``), and funboost's global bookkeeping keys
(``funboost_*``, shared by every funboost process on the database) that did not exist before the run, unless keys
of another run (``*peerbench*``) are there then (the last run out deletes them).
``throughput.py`` deletes its own keys and queues. On RabbitMQ every peer queue, and every exchange Celery
declares for one, is named ``<tag>_*``; after each peer process those names are deleted with pika (queue and
exchange of the same name, only if they exist). At the end of the run, when the RabbitMQ host is this machine and
``rabbitmqctl`` works, any other queue or exchange of the vhost whose name contains the tag is deleted too.
Nothing is purged or deleted that does not have ``peerbench`` in its name.

A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
THROUGHPUT = REPO_ROOT / "benchmarks" / "throughput.py"
BARE_PUSH = REPO_ROOT / "benchmarks" / "bare_push.py"  # bare client loops: the ceiling of a one-by-one push
FUNBOOST_HOME = HERE / "funboost_home"
CHILD_TIMEOUT_SECONDS = 300.0

SETS = ("redis", "rabbitmq", "zeromq", "mqtt", "sql", "kafka", "nats", "mongo", "pulsar", "kombu")
# Our brokers per set: throughput.py name -> BrokerEnum member name (to check the registry).
OURS_SETS = {
    "redis": {"memory": "LOCAL_PYTHON_QUEUE", "sqlite": "PERSISTQUEUE", "redis_list": "REDIS",
              "redis_ack_able": "REDIS_ACK_ABLE", "redis_brpoplpush": "RedisBrpopLpush",
              "redis_stream": "REDIS_STREAM"},
    "rabbitmq": {"rabbitmq_pika": "RABBITMQ_PIKA", "rabbitmq_amqpstorm": "RABBITMQ_AMQPSTORM",
                 "rabbitmq_rabbitpy": "RABBITMQ_RABBITPY", "kombu": "KOMBU"},
    "zeromq": {"zeromq": "ZEROMQ"},
    "mqtt": {"mqtt": "MQTT"},
    "sql": {"sqlalchemy_postgresql": "SQLACHEMY", "sqlalchemy_mariadb": "SQLACHEMY"},
    "kafka": {"kafka": "KAFKA", "confluent_kafka": "CONFLUENT_KAFKA"},
    "nats": {"nats": "NATS"},
    "mongo": {"mongo": "MONGOMQ"},
    "pulsar": {"pulsar": "PULSAR"},
    "kombu": {"kombu_redis": "KOMBU"},
}
OURS_BROKERS = [b for kinds in OURS_SETS.values() for b in kinds]
OURS_LABEL = {"memory": "memory (LOCAL_PYTHON_QUEUE)", "sqlite": "SQLite (PERSISTQUEUE)",
              "redis_list": "Redis list (REDIS)", "redis_ack_able": "Redis REDIS_ACK_ABLE",
              "redis_brpoplpush": "Redis RedisBrpopLpush", "redis_stream": "Redis REDIS_STREAM",
              "rabbitmq_pika": "RabbitMQ RABBITMQ_PIKA (pika)",
              "rabbitmq_amqpstorm": "RabbitMQ RABBITMQ_AMQPSTORM (amqpstorm)",
              "rabbitmq_rabbitpy": "RabbitMQ RABBITMQ_RABBITPY (rabbitpy)",
              "kombu": "RabbitMQ KOMBU (kombu, py-amqp)",
              "zeromq": "ZeroMQ ZEROMQ (hub process, confirmed publish)",
              "mqtt": "MQTT (QoS 1, persistent sessions, acked)",
              "sqlalchemy_postgresql": "SQLACHEMY on PostgreSQL (psycopg 3)",
              "sqlalchemy_mariadb": "SQLACHEMY on MariaDB (PyMySQL)",
              "kafka": "Kafka KAFKA (kafka-python; push waits for the server; committed after the call; 4 partitions)",
              "confluent_kafka": "Kafka CONFLUENT_KAFKA (confluent-kafka; push waits for the server; committed "
                                 "after the call; 4 partitions)",
              "nats": "NATS JetStream NATS (file storage, PubAck per push, acked after the call)",
              "mongo": "MONGOMQ on SecantusDB (leased, acked after the call)",
              "pulsar": "Pulsar PULSAR (send waits for the receipt, acked after the call)",
              "kombu_redis": "kombu KOMBU on Redis (kombu's redis transport, acked after the call)"}
# The sql set's databases, for funboost's SQLACHEMY (its own drivers: psycopg2, PyMySQL) and the cleanup.
SQL_PEER_URLS = {"pg": "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
                 "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test"}
OURS_PATHS = {"publish": "publish one-by-one", "bulk": "publish bulk", "consume": "consume (acked)"}
# Every name a run gives (queues, keys, topics, streams, collections, Celery's and funboost KOMBU's key prefixes)
# starts with RUN_TAG, ``peerbench_<run id>`` (main() sets it, and PEERBENCH_RUN_TAG for the children), and each
# run deletes only names with its own tag: runs side by side on one Redis database or server keep apart.
RUN_TAG = "peerbench"
# The private stand-ins of the kafka, mongo and pulsar sets, started by run.py on a free port each unless an
# address is given (--kafka-servers, --mongo-url, --pulsar-url: started there when nothing listens); main() sets
# them. The zeromq set's hubs (ours, funboost's) and the mqtt set's Mosquitto get free ports likewise.
KAFKA_SERVERS = ""
MONGO_URL = ""
PULSAR_URL = ""
NATS_URL = "nats://127.0.0.1:4222"
ZEROMQ_PORTS = {"ours": 0, "funboost": 0}


def _kombu_peer_options() -> dict:
    """Where the peers' KOMBU keeps its Redis keys (deleted with the run's other keys)."""
    return {"transport_options": {"global_keyprefix": f"{RUN_TAG}_fbkombu:"}}


class Peer:
    """One peer workload: a row of the table, the script and arguments that measure it."""

    def __init__(self, key: str, framework: str, label: str, script: str, args: list[str], n: int,
                 match: tuple[str, ...], paths: tuple[str, ...] = ("publish", "consume"), set_: str = "redis",
                 rabbitmq_names: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.key, self.framework, self.label, self.script = key, framework, label, script
        self.args, self.n, self.match, self.paths = args, n, match, paths
        self.set, self.rabbitmq_names, self.env = set_, rabbitmq_names, env or {}


def _celery_amqp_url(rabbitmq_url: str) -> str:
    """The same server for kombu's py-amqp transport, written ``amqp://user:pass@host:port/<vhost>``."""
    u = urlparse(rabbitmq_url)
    vhost = unquote(u.path[1:]) if u.path else "/"
    vhost = vhost or "/"
    auth = f"{u.username or 'guest'}:{u.password or 'guest'}@"
    return f"amqp://{auth}{u.hostname or '127.0.0.1'}:{u.port or 5672}/{'/' if vhost == '/' else quote(vhost, safe='')}"


def _peers(redis_url: str, rabbitmq_url: str) -> list[Peer]:
    def fb(broker: str, n: int, match: str | tuple[str, ...], label: str, key: str | None = None,
           exclusive: dict | None = None, paths: tuple[str, ...] = ("publish", "consume"),
           set_: str = "redis", env: dict[str, str] | None = None) -> Peer:
        queue = f"{RUN_TAG}_funboost_{(key or broker).lower()}"
        args = ["--broker", broker, "--n", str(n), "--paths", ",".join(paths), "--queue", queue]
        if exclusive:
            args += ["--exclusive", json.dumps(exclusive)]
        return Peer(key or broker, "funboost", label, "funboost_bench.py", args, n,
                    (match,) if isinstance(match, str) else match, paths, set_,
                    (queue,) if set_ == "rabbitmq" else (), env)

    def cel(acks_late: int, paths: tuple[str, ...], match: tuple[str, ...], set_: str = "redis") -> Peer:
        url, where = (redis_url, "Redis") if set_ == "redis" else (_celery_amqp_url(rabbitmq_url), "RabbitMQ")
        args = ["--broker-url", url, "--n", "5000", "--acks-late", str(acks_late), "--paths", ",".join(paths)]
        queue = f"{RUN_TAG}_q_acks_late_{acks_late}"
        names = (queue, f"{queue}_bulk", f"{queue}_warm") if set_ == "rabbitmq" else ()
        key = f"celery_acks_late_{acks_late}" + ("" if set_ == "redis" else "_amqp")
        return Peer(key, "Celery", f"{where}, acks_late={bool(acks_late)}", "celery_bench.py", args, 5000,
                    match, paths, set_, names)

    rabbit_like_celery = ("kombu", "rabbitmq_pika")  # same client (kombu + py-amqp) if built, else pika
    return [
        fb("MEMORY_QUEUE", 50_000, "memory", "memory (MEMORY_QUEUE)"),
        fb("FASTEST_MEM_QUEUE", 50_000, "memory", "memory (FASTEST_MEM_QUEUE)"),
        fb("SQLITE_QUEUE", 5_000, "sqlite", "SQLite (SQLITE_QUEUE = persistqueue)"),
        fb("REDIS", 50_000, "redis_list", "Redis list (REDIS)"),
        fb("REDIS", 10_000, "redis_list", "Redis list (REDIS, redis_bulk_push=0)", key="REDIS_NOBULK",
           exclusive={"redis_bulk_push": 0}, paths=("publish",)),
        fb("REDIS_ACK_ABLE", 15_000, "redis_ack_able", "Redis REDIS_ACK_ABLE"),
        fb("REDIS_BRPOP_LPUSH", 15_000, "redis_brpoplpush", "Redis RedisBrpopLpush"),
        fb("REDIS_STREAM", 15_000, "redis_stream", "Redis REDIS_STREAM"),
        cel(0, ("publish", "bulk", "consume"), ("redis_list",)),
        cel(1, ("publish", "consume"), ("redis_ack_able",)),
        fb("RABBITMQ_AMQPSTORM", 20_000, ("rabbitmq_amqpstorm", "rabbitmq_pika"), "RabbitMQ RABBITMQ_AMQPSTORM",
           set_="rabbitmq"),
        cel(0, ("publish", "bulk", "consume"), rabbit_like_celery, "rabbitmq"),
        cel(1, ("publish", "consume"), rabbit_like_celery, "rabbitmq"),
        # funboost's ZeroMQ publisher waits for a running consumer (funboost_bench.py: consumer first)
        fb("ZEROMQ", 20_000, "zeromq", "ZeroMQ ZEROMQ (REQ/REP through its broker process)",
           exclusive={"port": ZEROMQ_PORTS["funboost"]}, set_="zeromq"),
        # funboost's MQTT is QoS 0 on a clean session: its consumer starts first (funboost_bench.py)
        fb("MQTT", 20_000, "mqtt", "MQTT (QoS 0, shared subscription, no acks)", set_="mqtt"),
        # funboost's SQLACHEMY: one row per message, a status column; its table is dropped afterwards
        *(fb("SQLACHEMY", 3_000, f"sqlalchemy_{name.replace('pg', 'postgresql')}",
             f"SQLACHEMY on {'PostgreSQL (psycopg2)' if name == 'pg' else 'MariaDB (PyMySQL)'}",
             key=f"SQLACHEMY_{name.upper()}", set_="sql", env={"PEERBENCH_SQLA_URL": url})
          for name, url in SQL_PEER_URLS.items()),
        # funboost's Kafka kinds: a topic per run (funboost_bench.py adds the pid), num_partitions 10 (its default)
        fb("KAFKA", 20_000, "kafka", "Kafka KAFKA (kafka-python; send not awaited, flushed; auto-commit: at most once; "
           "10 partitions)", set_="kafka"),
        fb("KAFKA_CONFLUENT", 20_000, "confluent_kafka", "Kafka KAFKA_CONFLUENT (confluent-kafka; produce not awaited, "
           "flushed; committed every 2 s after the call; 10 partitions)", set_="kafka"),
        fb("NATS_JETSTREAM", 10_000, "nats", "NATS JetStream NATS_JETSTREAM (file storage, PubAck per push, acked "
           "after the call)", set_="nats"),
        # funboost's NATS_CORE: core NATS, no storage and no acks; its consumer starts first (funboost_bench.py)
        fb("NATS_CORE", 20_000, "nats", "NATS core NATS_CORE (no storage, no acks: at most once)", set_="nats"),
        fb("MONGOMQ", 500, "mongo", "MONGOMQ on SecantusDB (mongomq: lock per message, acked after the call)",
           set_="mongo"),
        fb("PULSAR", 10_000, "pulsar", "Pulsar PULSAR (send waits for the receipt, Shared subscription, acked after "
           "the call)", set_="pulsar"),
        fb("KOMBU", 5_000, "kombu_redis", "kombu KOMBU on Redis (kombu's redis transport, prefetch 500, acked after "
           "the call)", exclusive=_kombu_peer_options(), set_="kombu"),
    ]


# ---------------------------------------------------------------------------------------------
# Redis bookkeeping (redis-py of the project's environment)
# ---------------------------------------------------------------------------------------------

def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)


def _peer_keys(client) -> set[bytes]:
    """funboost's global bookkeeping keys (``funboost_*``, not ours: ``funboost_like*``), to tell those a run
    created from earlier ones."""
    return {k for k in client.scan_iter(match="funboost_*", count=1000) if not k.startswith(b"funboost_like")}


def _delete(client, keys: list[bytes]) -> int:
    for i in range(0, len(keys), 500):
        client.delete(*keys[i:i + 500])
    return len(keys)


def _cleanup(client, keys_before: set[bytes]) -> int:
    """Delete this run's keys (every key naming ``RUN_TAG``), and funboost's global keys created since the
    start (not in ``keys_before``) unless keys of another run (``*peerbench*``) are there: those keys are
    shared by every funboost process on the database, so while another run goes they stay (the last run
    out deletes them)."""
    doomed = list(client.scan_iter(match=f"*{RUN_TAG}*", count=1000))
    if not any(RUN_TAG.encode() not in k for k in client.scan_iter(match="*peerbench*", count=1000)):
        doomed += [k for k in _peer_keys(client) if k not in keys_before and b"peerbench" not in k]
    return _delete(client, doomed)


def _clean_leftovers(client) -> int:
    """``--clean-leftovers``: every key naming ``peerbench``, whatever run left it (no other run may be going)."""
    return _delete(client, list(client.scan_iter(match="*peerbench*", count=1000)))


# ---------------------------------------------------------------------------------------------
# RabbitMQ bookkeeping (pika of the project's environment)
# ---------------------------------------------------------------------------------------------

def _rabbitmq_server(url: str) -> str:
    """Connect once (fails early when RabbitMQ is not there); the server's version."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        version = connection._impl.server_properties.get("version", b"?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        connection.close()


def _rabbitmq_listed(url: str, match: str) -> set[str]:
    """Queue and exchange names containing ``match`` on the vhost, via rabbitmqctl (local server only)."""
    u = urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1") or not shutil.which("rabbitmqctl"):
        return set()
    vhost = unquote(u.path[1:]) if u.path else "/"
    names: set[str] = set()
    for what in ("list_queues", "list_exchanges"):
        try:
            proc = subprocess.run(["rabbitmqctl", "-q", what, "-p", vhost or "/", "name"], capture_output=True,
                                  text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        names.update(line.strip() for line in proc.stdout.splitlines() if match in line)
    names.discard("name")
    return names


def _rabbitmq_cleanup(url: str, names: set[str] | tuple[str, ...]) -> int:
    """Delete the queues and exchanges among ``names`` that exist; only names containing ``peerbench``."""
    import pika
    from pika.exceptions import ChannelClosedByBroker

    doomed = sorted(n for n in names if "peerbench" in n)
    if not doomed:
        return 0
    deleted = 0
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()

    def exists(kind: str, name: str) -> bool:
        nonlocal channel
        try:
            (channel.queue_declare if kind == "queue" else channel.exchange_declare)(name, passive=True)
            return True
        except ChannelClosedByBroker:  # 404: the broker closes the channel
            channel = connection.channel()
            return False

    try:
        for name in doomed:
            if exists("queue", name):
                channel.queue_delete(name)
                deleted += 1
            if exists("exchange", name):
                channel.exchange_delete(name)
                deleted += 1
    finally:
        connection.close()
    return deleted


# ---------------------------------------------------------------------------------------------
# the kafka, nats, mongo and pulsar sets: stand-ins and clean-up (the project's clients)
# ---------------------------------------------------------------------------------------------

def _start_standins(sets: list[str], tmp: Path) -> list:
    """Start Tansu, SecantusDB and pulsar-lite on their private ports for the sets that need them, where nothing
    listens yet (tests/kafka_server.py, tests/mongo_server.py, tests/pulsar_server.py); return those started."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from standin import listening

    started = []
    wanted = []
    if "kafka" in sets:
        import kafka_server

        host, _, port = KAFKA_SERVERS.partition(",")[0].rpartition(":")

        def tansu(port: int = int(port)):
            server = kafka_server.StandIn("tansu", port)
            server.start(tmp / "tansu.log")
            return server

        wanted.append((int(port), tansu))
    if "mongo" in sets:
        import mongo_server

        port = urlparse(MONGO_URL).port or 27017

        def secantus(port: int = port):
            server = mongo_server.SecantusServer(tmp / "secantusdb", port)
            (tmp / "secantusdb").mkdir()
            server.start()
            return server

        wanted.append((port, secantus))
    if "pulsar" in sets:
        import pulsar_server

        port = urlparse(PULSAR_URL).port or 6650

        def pulsar_lite(port: int = port):
            server = pulsar_server.PulsarLiteServer(tmp / "pulsar-lite", port)
            server.start()
            return server

        wanted.append((port, pulsar_lite))
    for port, start in wanted:
        if not listening(port):
            started.append(start())
    return started


def _kafka_cleanup(match: str) -> int:
    """Delete every topic whose name contains ``match`` (confluent-kafka's AdminClient)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": KAFKA_SERVERS, "log_level": 3})  # errors only
    topics = [t for t in admin.list_topics(timeout=10).topics if match in t]
    for future in admin.delete_topics(topics, operation_timeout=10).values() if topics else ():
        future.result()
    return len(topics)


def _nats_cleanup(match: str) -> int:
    """Delete every JetStream stream whose name contains ``match`` (nats-py)."""
    import asyncio

    import nats

    async def run() -> int:
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            names = [info.config.name for info in await js.streams_info() if match in (info.config.name or "")]
            for name in names:
                await js.delete_stream(name)
            return len(names)
        finally:
            await nc.close()

    return asyncio.run(run())


def _mongo_cleanup(match: str) -> int:
    """Drop the collections of funboost's MONGOMQ database whose name contains ``match``."""
    import pymongo

    client = pymongo.MongoClient(MONGO_URL, serverSelectionTimeoutMS=5000)
    try:
        db = client["funboost_mongomq"]
        names = [n for n in db.list_collection_names() if match in n]
        for name in names:
            db.drop_collection(name)
        return len(names)
    finally:
        client.close()


SET_CLEANUP = {"kafka": _kafka_cleanup, "nats": _nats_cleanup, "mongo": _mongo_cleanup}


# ---------------------------------------------------------------------------------------------
# running the workloads
# ---------------------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict[str, str], cwd: str, marker: str) -> dict:
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_SECONDS:.0f}s"}
    out = proc.stdout
    if marker != "{":  # a line "PEER-RESULT {...}" or "BARE-RESULT {...}"
        for line in out.splitlines():
            if line.startswith(marker):
                return json.loads(line[len(marker):])
    else:  # throughput.py --json: the text report, a blank line, then one indented JSON document
        start = out.find("\n{\n")
        if start >= 0:
            return json.loads(out[start + 1:])
    return {"error": f"exited with {proc.returncode}: {(proc.stderr or out).strip()[-1500:]}"}


def peer_env(tmp: str, redis_url: str, rabbitmq_url: str) -> dict[str, str]:
    """The environment of a peer process working in ``tmp``: funboost's settings and the servers."""
    u = urlparse(redis_url)
    r = urlparse(rabbitmq_url)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({
        "PYTHONPATH": str(FUNBOOST_HOME),  # funboost_config.py / nb_log_config.py; nothing written to the repo
        "PEERBENCH_TMP": tmp, "LOG_PATH": os.path.join(tmp, "logs"), "PYTHONDONTWRITEBYTECODE": "1",
        "PEERBENCH_REDIS_HOST": u.hostname or "127.0.0.1", "PEERBENCH_REDIS_PORT": str(u.port or 6379),
        "PEERBENCH_REDIS_DB": (u.path or "/0").lstrip("/") or "0",
        # funboost_config.py: RABBITMQ_USER, _PASS, _HOST, _PORT, _VIRTUAL_HOST
        "PEERBENCH_RABBITMQ_USER": unquote(r.username or "guest"),
        "PEERBENCH_RABBITMQ_PASS": unquote(r.password or "guest"),
        "PEERBENCH_RABBITMQ_HOST": r.hostname or "127.0.0.1", "PEERBENCH_RABBITMQ_PORT": str(r.port or 5672),
        "PEERBENCH_RABBITMQ_VHOST": (unquote(r.path[1:]) if r.path else "/") or "/",
        "PEERBENCH_KAFKA_SERVERS": KAFKA_SERVERS, "PEERBENCH_NATS_URL": NATS_URL, "PEERBENCH_MONGO_URL": MONGO_URL,
        "PEERBENCH_PULSAR_URL": PULSAR_URL, "PEERBENCH_KOMBU_URL": redis_url,
    })
    return env


def run_peer(peer: Peer, python: str, redis_url: str, rabbitmq_url: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"peerbench_{peer.key.lower()}_") as tmp:
        env = {**peer_env(tmp, redis_url, rabbitmq_url), **peer.env}
        try:
            return _run([python, str(HERE / peer.script), *peer.args], env, tmp, "PEER-RESULT ")
        finally:
            if peer.set == "sql":
                _drop_sql_table(peer.env["PEERBENCH_SQLA_URL"], f"peerbench_funboost_{peer.key.lower()}")


def _drop_sql_table(url: str, table: str) -> None:
    """Drop funboost's queue table (with the project's SQLAlchemy and drivers)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("+psycopg2", "+psycopg"))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {engine.dialect.identifier_preparer.quote(table)}"))
    finally:
        engine.dispose()


def run_ours(brokers: list[str], redis_url: str, rabbitmq_url: str) -> dict:
    u = urlparse(MONGO_URL)
    env = dict(os.environ, FUNBOOST_LIKE_BENCH_REDIS_URL=redis_url, FUNBOOST_LIKE_RABBITMQ_URL=rabbitmq_url,
               FUNBOOST_LIKE_BENCH_KAFKA_SERVERS=KAFKA_SERVERS, FUNBOOST_LIKE_BENCH_NATS_URL=NATS_URL,
               FUNBOOST_LIKE_BENCH_PULSAR_URL=PULSAR_URL, FUNBOOST_LIKE_BENCH_ZEROMQ_PORT=str(ZEROMQ_PORTS["ours"]),
               FUNBOOST_LIKE_BENCH_RUN_ID=RUN_TAG.rpartition("_")[2],
               FUNBOOST_LIKE_BENCH_MONGO_URL=f"{u.scheme}://{u.netloc}/funboost_like_bench?{u.query}")
    cmd = [sys.executable, str(THROUGHPUT), "--brokers", ",".join(brokers), "--repeat", "1", "--json"]
    return _run(cmd, env, str(REPO_ROOT), "{")


def run_bare(set_: str, redis_url: str) -> dict:
    """The bare client loops of ``benchmarks/bare_push.py`` for the kafka and redis sets (others: nothing)."""
    where = {"kafka": ["--kafka", KAFKA_SERVERS], "redis": ["--redis", redis_url]}.get(set_)
    if where is None:
        return {}
    return _run([sys.executable, str(BARE_PUSH), *where, "--json"], dict(os.environ), str(REPO_ROOT), "BARE-RESULT ")


def print_bare(bare_runs: dict[str, list[dict]]) -> None:
    """Under the table: the medians of the bare client loops, one acknowledged message at a time."""
    lines = []
    for set_, runs in bare_runs.items():
        labels = dict.fromkeys(label for run in runs for label in run if label != "error")
        lines += [f"  {set_}: {label} {_fmt(_median([r[label] for r in runs if label in r]))}/s" for label in labels]
        lines += [f"  {set_}: error {run['error']}" for run in runs if "error" in run]
    if lines:
        print()
        print("Bare client loops that wait for each message, no framework (benchmarks/bare_push.py, in each "
              "repetition after ours; medians): the ceiling of a one-by-one push on these servers:")
        print("\n".join(lines))


def _unbuilt(brokers: dict[str, str]) -> dict[str, str]:
    """Our broker kinds that cannot run yet: registry entry None, or its module / class does not import."""
    from funboost_like.brokers.registry import BROKERS
    from funboost_like.core.enums import BrokerEnum

    missing: dict[str, str] = {}
    for name, member in brokers.items():
        entry = BROKERS.get(BrokerEnum[member])
        if entry is None:
            missing[name] = "not built (None in funboost_like.brokers.registry.BROKERS)"
            continue
        module, _, cls = entry[0].partition(":")
        try:
            getattr(importlib.import_module(module), cls)
        except Exception as exc:  # any failure means "skip it"
            missing[name] = f"does not import ({type(exc).__name__}: {exc})"
    return missing


def _venv_versions(python: str) -> dict:
    code = ("import json, platform, importlib.metadata as m\n"
            "v = {}\n"
            "for d in ('funboost', 'celery', 'kombu', 'amqp', 'AMQPStorm', 'redis', 'persist-queue', 'nb_log',\n"
            "          'kafka-python', 'confluent-kafka', 'nats-py', 'pymongo', 'pulsar-client',\n"
            "          'gevent', 'eventlet'):\n"
            "    try:\n        v[d] = m.version(d)\n    except Exception:\n        v[d] = None\n"
            "v['python'] = platform.python_version()\n"
            "print(json.dumps(v))\n")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"


def _ratio(ours: float | None, peer: float | None) -> str:
    if not ours or not peer:
        return "-"
    return f"{ours / peer:.2f}x" if ours / peer < 0.1 else f"{ours / peer:.1f}x"


def _collect_rates(runs: list[dict], problems: list[str], label: str) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"publish": [], "bulk": [], "consume": []}
    for rep, data in enumerate(runs, 1):
        if "error" in data:
            problems.append(f"{label} run {rep}: {data['error']}")
            continue
        for path, res in data.get("results", {}).items():
            if not res:
                continue
            if "error" in res:
                problems.append(f"{label} {path} run {rep}: {res['error']}")
            elif "rate" in res:
                rates[path].append(res["rate"])
            if res.get("ok_check") is False:
                problems.append(f"{label} {path} run {rep}: check failed: {res.get('check')}")
    return rates


def _ours_rates(runs: dict[str, list[dict]], problems: list[str]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {b: {p: [] for p in OURS_PATHS} for b in OURS_BROKERS}
    for set_, set_runs in runs.items():
        for rep, data in enumerate(set_runs, 1):
            if "error" in data:
                problems.append(f"funboost_like {set_} run {rep}: {data['error']}")
                continue
            problems.extend(f"funboost_like {set_} run {rep}: {p}" for p in data.get("problems", []))
            for row in data.get("rows", []):
                path = next((k for k, v in OURS_PATHS.items() if v == row["path"]), None)
                if path and row["broker"] in out:
                    out[row["broker"]][path].extend(row["rates"])
    return out


def _ours_n(runs: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    ns: dict[str, dict[str, int]] = {}
    for data in (d for set_runs in runs.values() for d in set_runs):
        for row in data.get("rows", []):
            path = next((k for k, v in OURS_PATHS.items() if v == row["path"]), None)
            if path:
                ns.setdefault(row["broker"], {})[path] = row["n"]
    return ns


def build_table(sets: list[str], ours_brokers: dict[str, list[str]], peers: list[Peer],
                ours_runs: dict[str, list[dict]],
                peer_runs: dict[str, list[dict]]) -> tuple[list[dict], list[str]]:
    """Rows set by set: our brokers of the set, then its peers with their ratios to our matching row.

    A peer's ``match`` lists our brokers in order of preference; the first one with figures is used.
    On RabbitMQ each peer row also gets ``ratio_best``: against our best RabbitMQ kind, per column.
    """
    problems: list[str] = []
    rows: list[dict] = []
    ours = _ours_rates(ours_runs, problems)
    ours_n = _ours_n(ours_runs)
    ours_med = {b: {p: _median(v) for p, v in paths.items()} for b, paths in ours.items()}
    for set_ in sets:
        ran = ours_brokers.get(set_, []) if ours_runs.get(set_) else []
        for broker in ran:
            ns = ours_n.get(broker, {})
            rows.append({"set": set_, "framework": "funboost_like", "path": OURS_LABEL[broker], "key": broker,
                         "n": f"{ns.get('publish', 0):,} / {ns.get('consume', 0):,}", **ours_med[broker],
                         "runs": {p: ours[broker][p] for p in OURS_PATHS}, "ratio": ""})
        best = {p: max(((ours_med[b][p], b) for b in ran if ours_med[b][p] is not None), default=(None, None))
                for p in OURS_PATHS}
        for peer in peers:
            if peer.set != set_ or peer.key not in peer_runs:
                continue
            rates = _collect_rates(peer_runs[peer.key], problems, f"{peer.framework} {peer.label}")
            med = {p: _median(v) for p, v in rates.items()}
            match = next((b for b in peer.match if b in ran and any(ours_med[b].values())), None)
            mine = ours_med.get(match or "", {})
            ratio = " / ".join(_ratio(mine.get(p), med[p]) if med[p] is not None else "-" for p in OURS_PATHS)
            n_consume = f"{peer.n:,}" if "consume" in peer.paths else "-"
            row = {"set": set_, "framework": peer.framework, "path": peer.label, "key": peer.key, "match": match,
                   "n": f"{peer.n:,} / {n_consume}", **med, "runs": rates,
                   "ratio": f"{ratio} vs {match}" if mine else ""}
            if set_ == "rabbitmq" and ran:
                row["ratio_best"] = {p: {"ours": best[p][1], "ratio": _ratio(best[p][0], med[p])}
                                     for p in OURS_PATHS if med[p] is not None}
            rows.append(row)
    return rows, problems


def print_table(rows: list[dict]) -> None:
    print("| framework | broker path | N (publish / consume) | publish one-by-one /s | bulk /s | consume /s "
          "| ours / peer (one-by-one / bulk / consume) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['framework']} | {r['path']} | {r['n']} | {_fmt(r['publish'])} | {_fmt(r['bulk'])} "
              f"| {_fmt(r['consume'])} | {r['ratio']} |")


def print_best(rows: list[dict]) -> None:
    """RabbitMQ: each peer against our best RabbitMQ kind of each column."""
    lines = [f"  {r['framework']} {r['path']}: "
             + ", ".join(f"{p} {b['ratio']} ({b['ours']})" for p, b in r["ratio_best"].items())
             for r in rows if r.get("ratio_best")]
    if lines:
        print()
        print("ours / peer on RabbitMQ against our best RabbitMQ kind of each column:")
        print("\n".join(lines))


def print_kafka_extras(sets: list[str], ours_runs: dict[str, list[dict]], peer_runs: dict[str, list[dict]],
                       peers: list[Peer]) -> None:
    """Kafka: the consume column runs from the first call; the group join, the rate until the N-th call and the
    wait for the commits after it (medians) are printed here."""
    if "kafka" not in sets:
        return
    lines = []

    def line(name: str, results: list[dict]) -> None:
        got = {k: _median([r[k] for r in results if isinstance(r.get(k), (int, float))])
               for k in ("join", "rate_calls_only", "commit_wait")}
        if any(v is not None for v in got.values()):
            lines.append(f"  {name}: join {got['join'] or 0:.1f} s, calls only {_fmt(got['rate_calls_only'])}/s, "
                         f"commit wait {got['commit_wait'] or 0:.2f} s")

    for broker in OURS_SETS["kafka"]:
        line(f"funboost_like {broker}", [run.get("runs", {}).get(broker, [{}])[0].get("results", {})
                                         .get("consume (acked)", {}) for run in ours_runs.get("kafka", [])])
    for peer in (p for p in peers if p.set == "kafka"):
        line(f"funboost {peer.key}", [run.get("results", {}).get("consume", {}) for run in peer_runs.get(peer.key, [])])
    if lines:
        print()
        print("Kafka consume (medians): the column above runs from the first call until N calls ran and (where "
              "committed) the group's offsets reached the ends; the group join before it, the rate until the N-th "
              "call and the wait for the commits after it:")
        print("\n".join(lines))


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run_modes(args: argparse.Namespace, python: str, only: set[str]) -> None:
    """The modes set (modes_set.py): concurrency modes, ours and funboost alternating, on one Redis database."""
    import modes_set  # benchmarks/peers/modes_set.py (this folder is sys.path[0])

    client = _redis(args.redis_url)
    if args.clean_leftovers:
        _clean_leftovers(client)
    keys_before = _peer_keys(client)
    try:
        modes_set.main(python, args.redis_url, args.repeat, args.modes_scale, only,
                       lambda tmp: peer_env(tmp, args.redis_url, args.rabbitmq_url),
                       lambda: _cleanup(client, keys_before), _venv_versions(python) if "funboost" in only else {})
    finally:
        _cleanup(client, keys_before)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--venv", default="/tmp/peers", help="scratch virtualenv with funboost and celery[redis]")
    parser.add_argument("--set", default="all", choices=("all", *SETS, "modes"),
                        help="redis: memory, SQLite and Redis (the original set); rabbitmq: RabbitMQ only; "
                             "zeromq: ZeroMQ (no server); mqtt: Mosquitto; sql: PostgreSQL and MariaDB; "
                             f"kafka: Tansu; nats: NATS JetStream ({NATS_URL}); mongo: SecantusDB; pulsar: "
                             "pulsar-lite (each stand-in started on a free port); kombu: kombu on Redis; "
                             "all: every set but modes; modes: concurrency modes on memory, SQLite and "
                             "REDIS_ACK_ABLE, ours and funboost (modes_set.py)")
    parser.add_argument("--modes-scale", type=float, default=1.0, help="modes set: N of every run times this")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13", help="one Redis database for everything")
    parser.add_argument("--mqtt-url", default=None,
                        help="one Mosquitto for the mqtt set (default: started for the run on a free port; a URL "
                             "given is used, and started there when nothing listens)")
    for name, example in (("kafka-servers", "127.0.0.1:19092"), ("mongo-url", "mongodb://127.0.0.1:27217/"),
                          ("pulsar-url", "pulsar://127.0.0.1:16650")):
        parser.add_argument(f"--{name}", default=None,
                            help=f"the stand-in to use (e.g. {example}; started there when nothing listens); "
                                 "default: one started for the run on a free port")
    parser.add_argument("--clean-leftovers", action="store_true",
                        help="first delete every name containing 'peerbench' that the chosen sets' servers hold "
                             "(keys, queues, topics, streams, collections left by interrupted runs); only when no "
                             "other run is going")
    parser.add_argument("--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/%2F",
                        help="one RabbitMQ vhost for everything (pika URL form; vhost / is %%2F)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--only", default="ours,funboost,celery", help="subset of: ours,funboost,celery")
    parser.add_argument("--json", action="store_true", help="also print every run as JSON")
    return parser.parse_args(argv)


def _choose_addresses(args: argparse.Namespace) -> None:
    """This run's tag and its servers' addresses (module globals, read by the helpers above): a free port for
    each stand-in, Mosquitto and ZeroMQ hub that no address was given for, so runs side by side do not meet."""
    global RUN_TAG, KAFKA_SERVERS, MONGO_URL, PULSAR_URL
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from standin import port_for_another_process as free_port

    RUN_TAG = f"peerbench_{secrets.token_hex(3)}"
    os.environ["PEERBENCH_RUN_TAG"] = RUN_TAG  # the peer scripts' names (peer_env copies os.environ)
    KAFKA_SERVERS = args.kafka_servers or f"127.0.0.1:{free_port()}"
    MONGO_URL = args.mongo_url or f"mongodb://127.0.0.1:{free_port()}/?retryWrites=false"
    PULSAR_URL = args.pulsar_url or f"pulsar://127.0.0.1:{free_port()}"
    args.mqtt_url = args.mqtt_url or f"mqtt://127.0.0.1:{free_port()}"
    ZEROMQ_PORTS.update(ours=free_port(), funboost=free_port())


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - a linear driver
    args = _parse_args(argv)
    _choose_addresses(args)
    python = str(Path(args.venv) / "bin" / "python")
    only = {s.strip().lower() for s in args.only.split(",") if s.strip()}
    sets = list(SETS) if args.set == "all" else [args.set]
    if not Path(python).exists() and only - {"ours"}:
        print(f"no Python at {python}: build the scratch virtualenv first (benchmarks/peers/README.md)",
              file=sys.stderr)
        return 0
    if args.set == "modes":
        run_modes(args, python, only)
        return 0
    peers = [p for p in _peers(args.redis_url, args.rabbitmq_url) if p.framework.lower() in only and p.set in sets]
    skipped = _unbuilt({b: k for set_ in sets for b, k in OURS_SETS[set_].items()}) if "ours" in only else {}
    ours_brokers = {set_: [b for b in OURS_SETS[set_] if b not in skipped] for set_ in sets}

    # Redis: required for the redis set; for the rabbitmq set only used to tidy up after funboost, if it is there.
    client = _redis(args.redis_url)
    try:
        client.ping()
    except Exception:
        if "redis" in sets:
            raise
        client = None
    if client is not None:
        if args.clean_leftovers:
            _clean_leftovers(client)
        keys_before = _peer_keys(client)
    rabbit_names = {n for p in peers for n in p.rabbitmq_names}
    rabbitmq_server = None
    deleted_rabbitmq = 0
    if "rabbitmq" in sets:
        rabbitmq_server = _rabbitmq_server(args.rabbitmq_url)
        if args.clean_leftovers:  # every name containing "peerbench", whatever run left it
            _rabbitmq_cleanup(args.rabbitmq_url, _rabbitmq_listed(args.rabbitmq_url, "peerbench"))
    versions = _venv_versions(python) if peers else {}
    os.environ.update(PEERBENCH_MQTT_URL=args.mqtt_url, FUNBOOST_LIKE_BENCH_MQTT_URL=args.mqtt_url)  # both children
    sys.path.insert(0, str(HERE.parent))
    import mqtt_server  # benchmarks/mqtt_server.py

    mosquitto = mqtt_server.ensure(args.mqtt_url) if "mqtt" in sets else None
    standin_dir = Path(tempfile.mkdtemp(prefix="peerbench_standins_"))
    try:
        standins = _start_standins(sets, standin_dir)
    except Exception:
        mqtt_server.stop(mosquitto)
        shutil.rmtree(standin_dir, ignore_errors=True)
        raise
    for set_ in sets:
        if set_ in SET_CLEANUP and args.clean_leftovers:
            SET_CLEANUP[set_]("peerbench")  # every name containing "peerbench", whatever run left it
    deleted_other = 0

    started = time.monotonic()
    load_start = _loadavg()
    ours_runs: dict[str, list[dict]] = {set_: [] for set_ in sets if ours_brokers[set_] and "ours" in only}
    peer_runs: dict[str, list[dict]] = {p.key: [] for p in peers}
    bare_runs: dict[str, list[dict]] = {set_: [] for set_ in sets if set_ in ("kafka", "redis")}
    deleted = 0
    repeat = max(1, args.repeat)
    try:
        for rep in range(repeat):
            for set_ in sets:
                if set_ in ours_runs:
                    t = time.monotonic()
                    print(f"[{rep + 1}/{repeat}] funboost_like (throughput.py, {', '.join(ours_brokers[set_])}) ...",
                          end=" ", file=sys.stderr, flush=True)
                    ours_runs[set_].append(run_ours(ours_brokers[set_], args.redis_url, args.rabbitmq_url))
                    print(f"{time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)
                if set_ in bare_runs:
                    print(f"[{rep + 1}/{repeat}] bare client loops ...", end=" ", file=sys.stderr, flush=True)
                    t = time.monotonic()
                    bare_runs[set_].append(run_bare(set_, args.redis_url))
                    print(f"{time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)
                for peer in (p for p in peers if p.set == set_):
                    t = time.monotonic()
                    print(f"[{rep + 1}/{repeat}] {peer.framework} {peer.label} ...", end=" ", file=sys.stderr,
                          flush=True)
                    data = run_peer(peer, python, args.redis_url, args.rabbitmq_url)
                    peer_runs[peer.key].append(data)
                    if client is not None:
                        deleted += _cleanup(client, keys_before)
                    if peer.rabbitmq_names:
                        deleted_rabbitmq += _rabbitmq_cleanup(args.rabbitmq_url, set(peer.rabbitmq_names))
                    if peer.set in SET_CLEANUP:
                        deleted_other += SET_CLEANUP[peer.set](RUN_TAG)
                    print(f"{time.monotonic() - t:.1f}s" + (f" ERROR {data['error']}" if "error" in data else ""),
                          file=sys.stderr, flush=True)
    finally:
        for set_ in sets:
            if set_ in SET_CLEANUP:
                try:
                    deleted_other += SET_CLEANUP[set_](RUN_TAG)
                except Exception as exc:  # reported; the stand-ins below go anyway
                    print(f"clean-up of the {set_} set failed: {exc}", file=sys.stderr)
        for server in standins:
            server.stop()
        shutil.rmtree(standin_dir, ignore_errors=True)
        mqtt_server.stop(mosquitto)
        if client is not None:
            deleted += _cleanup(client, keys_before)
        if "rabbitmq" in sets:
            deleted_rabbitmq += _rabbitmq_cleanup(args.rabbitmq_url,
                                                  rabbit_names | _rabbitmq_listed(args.rabbitmq_url, RUN_TAG))

    rows, problems = build_table(sets, ours_brokers, peers, ours_runs, peer_runs)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "sets": sets,
        "python_ours": platform.python_version(), "peer_versions": versions, "redis_url": args.redis_url,
        "redis_server": client.info("server").get("redis_version") if client is not None else None,
        "rabbitmq_url": args.rabbitmq_url, "rabbitmq_server": rabbitmq_server, "ours_skipped": skipped,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "repeat": repeat, "loadavg_start": load_start, "loadavg_end": _loadavg(),
        "total_seconds": round(time.monotonic() - started, 1), "peer_keys_deleted": deleted, "run_tag": RUN_TAG,
        "peer_rabbitmq_queues_and_exchanges_deleted": deleted_rabbitmq,
        "peer_topics_streams_collections_deleted": deleted_other,
        "standins_started": [f"{type(server).__name__} on {server.port}" for server in standins],
    }
    servers = []
    if "redis" in sets:
        servers.append(f"Redis {info['redis_server']} at {args.redis_url}")
    if "rabbitmq" in sets:
        servers.append(f"RabbitMQ {rabbitmq_server} at {urlparse(args.rabbitmq_url).hostname}:"
                       f"{urlparse(args.rabbitmq_url).port or 5672}")
    if "mqtt" in sets:
        servers.append(f"Mosquitto at {args.mqtt_url}" + (" (started for this run)" if mosquitto else ""))
    if "zeromq" in sets:
        servers.append(f"ZeroMQ hubs on ports {ZEROMQ_PORTS['ours']} (ours) and {ZEROMQ_PORTS['funboost']} (funboost)")
    started_ports = {server.port for server in standins}
    for set_, name, where in (("kafka", "Tansu", KAFKA_SERVERS), ("nats", "NATS JetStream", NATS_URL),
                              ("mongo", "SecantusDB", MONGO_URL), ("pulsar", "pulsar-lite", PULSAR_URL)):
        if set_ in sets:
            port = int(where.partition(",")[0].rsplit(":", 1)[-1].split("/")[0])
            servers.append(f"{name} at {where}" + (" (started for this run)" if port in started_ports else ""))
    if "kombu" in sets and "redis" not in sets:
        servers.append(f"Redis {info['redis_server']} at {args.redis_url}")
    print(f"peers benchmark  date {info['date']}  CPUs {info['cpu_count']}  {'  '.join(servers)}  "
          f"repeat {repeat} (medians)  total {info['total_seconds']}s  names {RUN_TAG}_*")
    print(f"Python {info['python_ours']} (ours)  venv {args.venv}: "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"load average at start {load_start}, at end {info['loadavg_end']}")
    if skipped:
        print("ours skipped: " + "; ".join(f"{b}: {why}" for b, why in skipped.items()))
    print()
    print_table(rows)
    print()
    print("ours / peer: our median divided by the peer's, per column (publish one-by-one / bulk / consume), against "
          "the funboost_like row named after 'vs': the same broker path on Redis (Celery acks_late=False against "
          "REDIS, True against REDIS_ACK_ABLE); on RabbitMQ the same client library (funboost RABBITMQ_AMQPSTORM "
          "against our rabbitmq_amqpstorm, Celery against our kombu; rabbitmq_pika where that kind is not built); "
          "on Kafka funboost KAFKA against our kafka (kafka-python), KAFKA_CONFLUENT against our confluent_kafka; "
          "elsewhere against our kind of the same name.")
    print_best(rows)
    print_kafka_extras(sets, ours_runs, peer_runs, peers)
    print_bare(bare_runs)
    if problems:
        print()
        print("problems:")
        for p in problems:
            print(f"  - {p}")
    if args.json:
        print()
        print(json.dumps({"info": info, "rows": rows, "problems": problems, "ours_runs": ours_runs,
                          "peer_runs": peer_runs, "bare_runs": bare_runs}, indent=2))
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
