"""Bare client loops that wait for each message: the ceiling of a one-by-one push, without any framework.

Usage (the project's Python; ``benchmarks/peers/run.py`` runs it in every repetition of its kafka and
redis sets and prints the medians under its table)::

    python benchmarks/bare_push.py --kafka 127.0.0.1:19092 [--n 2000] [--json]
    python benchmarks/bare_push.py --redis redis://127.0.0.1:6379/13 [--n 15000] [--json]

Each loop sends one message and waits for the server's answer before the next, N times; the rate is
N / elapsed (after one untimed message that opens the connection). The body is a message as our
``push`` writes it (a JSON object of 143 bytes).

Kafka, on a topic ``peerbench_bare_<pid>`` of 4 partitions written round robin (as our kinds publish in
the benchmarks), deleted at the end:

* ``kafka-python send().get()``: ``KafkaProducer(acks="all")``, ``send(topic, body, partition=p).get()``;
* ``confluent-kafka produce()+flush()``: ``Producer({"acks": "all"})``, ``produce(...)`` then ``flush()``;
* ``wire, blocking read`` and ``wire, polling 1 ms first``: one ProduceRequest (acks=all, version 7, a
  record batch of one record built with kafka-python's ``DefaultRecordBatchBuilder``) per message,
  packed and its answer read by ``funboost_like/brokers/kafka_link.py``'s two functions, written to a
  plain socket and answered on the same thread, with a blocking read, or polling the socket for up to
  1 ms first: the protocol's own ceiling in Python on this machine, no client thread in between (what
  our ``KAFKA`` push does, the framework's message building and bookkeeping apart).

Redis, on keys ``peerbench_bare_<pid>_*``, deleted at the end: ``redis-py LPUSH`` (``Redis.lpush(key, body)``,
what funboost's ``REDIS_BRPOP_LPUSH`` and ``REDIS_ACK_ABLE`` publishers call) and ``redis-py XADD``
(``Redis.xadd(key, {"data": body})``, as funboost's ``REDIS_STREAM`` publisher does).

A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BODY = (b'{"x":1,"y":1,"extra":{"task_id":"5f1c0e7a9b2d4c3e8a6f1b0d2c4e6a8b","publish_time":1796675532.123,'
        b'"publish_time_format":"2026-12-07 20:32:12"}}')
PARTITIONS = 4


def timed(n: int, one: Callable[[int], object]) -> float:
    one(0)  # the connection, the metadata
    start = time.perf_counter()
    for i in range(n):
        one(i)
    return n / (time.perf_counter() - start)


def kafka_loops(servers: str, n: int) -> dict[str, float]:
    from confluent_kafka import Producer
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    topic = f"peerbench_bare_{os.getpid()}"
    admin = KafkaAdminClient(bootstrap_servers=servers.split(","))
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    rates: dict[str, float] = {}
    try:
        producer = KafkaProducer(bootstrap_servers=servers.split(","), acks="all")
        rates["kafka-python send().get()"] = timed(
            n, lambda i: producer.send(topic, BODY, partition=i % PARTITIONS).get(30))
        producer.close()
        confluent = Producer({"bootstrap.servers": servers, "acks": "all"})

        def produce_and_flush(i: int) -> None:
            confluent.produce(topic, BODY, partition=i % PARTITIONS)
            if confluent.flush(30):
                raise RuntimeError("confluent-kafka: flush timed out")

        rates["confluent-kafka produce()+flush()"] = timed(n, produce_and_flush)
        confluent.flush(30)
        for label, spin in (("wire, blocking read", 0.0), ("wire, polling 1 ms first", 0.001)):
            rates[label] = timed(n, wire_loop(servers, topic, spin))
    finally:
        admin.delete_topics([topic])
        admin.close()
    return rates


def wire_loop(servers: str, topic: str, spin: float) -> Callable[[int], None]:
    """One ProduceRequest per message on a plain socket to the (single) server of ``servers``, packed by
    ``kafka_link.produce_frame`` and read by ``kafka_link.answer_code`` (nothing else of the framework)."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    from funboost_like.brokers.kafka_link import answer_code, produce_frame

    host, _, port = servers.split(",")[0].rpartition(":")
    sock = socket.create_connection((host, int(port)), 30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def one(i: int) -> None:
        batch = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                          producer_epoch=-1, base_sequence=-1, batch_size=0)
        batch.append(0, int(time.time() * 1000), None, BODY, [])
        sock.sendall(produce_frame(7, i + 1, topic.encode(), i % PARTITIONS, bytes(batch.build()), 30_000))
        deadline = time.perf_counter() + spin
        while spin and not poller.poll(0) and time.perf_counter() < deadline:
            pass
        data = sock.recv(65536)
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            data += sock.recv(65536)
        code = answer_code(data[4:], i + 1)
        if code:
            raise RuntimeError(f"ProduceResponse error code {code}")

    return one


def redis_loops(url: str, n: int) -> dict[str, float]:
    import redis

    client = redis.Redis.from_url(url)
    keys = [f"peerbench_bare_{os.getpid()}_list", f"peerbench_bare_{os.getpid()}_stream"]
    try:
        return {"redis-py LPUSH": timed(n, lambda i: client.lpush(keys[0], BODY)),
                "redis-py XADD": timed(n, lambda i: client.xadd(keys[1], {"data": BODY}))}
    finally:
        client.delete(*keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--kafka", help="bootstrap servers of a Kafka (its first one is used by the wire loops)")
    parser.add_argument("--redis", help="a Redis URL")
    parser.add_argument("--n", type=int, default=None, help="messages per loop (default: Kafka 2,000, Redis 15,000)")
    parser.add_argument("--json", action="store_true", help="also print the rates as one BARE-RESULT JSON line")
    args = parser.parse_args(argv)
    rates: dict[str, float] = {}
    if args.kafka:
        rates.update(kafka_loops(args.kafka, args.n or 2_000))
    if args.redis:
        rates.update(redis_loops(args.redis, args.n or 15_000))
    for label, rate in rates.items():
        print(f"{label}: {rate:,.0f}/s")
    if args.json:
        print("BARE-RESULT " + json.dumps(rates))
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception:  # a measurement, not a test: report and exit 0
        import traceback

        traceback.print_exc()
    sys.exit(0)
