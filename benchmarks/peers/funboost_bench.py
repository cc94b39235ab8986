"""funboost workload of the peer benchmark. Runs ONLY inside the scratch virtualenv (see README.md).

Started by ``benchmarks/peers/run.py`` with ``PYTHONPATH=benchmarks/peers/funboost_home`` (funboost and
nb_log settings: Redis db, temporary folders, quiet start-up) and a temporary working directory.
One broker kind per process::

    python funboost_bench.py --broker REDIS --n 50000 [--paths publish,consume] [--exclusive '{"k": 1}']
    python funboost_bench.py --broker RABBITMQ_AMQPSTORM --n 20000 --queue peerbench_funboost_rabbitmq_amqpstorm
    python funboost_bench.py --broker ZEROMQ --n 20000 --exclusive '{"port": 29613}'

The workload is the one of ``benchmarks/throughput.py``: ``def f(x, y): return x + y`` decorated with
``@boost(BoosterParams(queue_name=..., broker_kind=..., concurrent_num=50,
concurrent_mode=THREADING, log_level=WARNING, create_logger_file=False))``.

* ``publish``: ``f.push(i, y=i)`` N times. The clock stops when ``f.get_message_count()`` reports
  all N messages in the broker (funboost's ``REDIS`` publisher buffers pushes and sends them 1,000 per
  RPUSH, plus a flush every 0.1 s; the wait makes the figure count messages that really arrived).
  ``f.get_message_count()`` is called once before the clock starts (connection, queue creation).
* ``consume``: the N messages published above are consumed. The clock runs from ``f.consume()`` until
  the function has run N times (counted inside it with ``itertools.count``) and, for the kinds whose
  pending state can be read (``REDIS_ACK_ABLE``: the consumer's unack zset; ``RedisBrpopLpush``: its
  unack list; ``REDIS_STREAM``: ``XPENDING`` of the group), nothing is left unacknowledged.
  ``RABBITMQ_AMQPSTORM`` (persistent messages on a durable queue, no publisher confirms, prefetch
  ``max(10, 2 * concurrent_num)`` = 100, acked with ``amqpstorm.Message.ack()`` after the call):
  AMQP cannot read a queue's unacknowledged count, so this script counts the acks funboost sends
  (``amqpstorm.Message.ack`` is wrapped in a counter before ``f.consume()``; the wrapper calls the
  original) and waits until N have been sent. For ``publish`` the message count comes from a passive
  ``queue.declare`` (funboost's ``get_message_count``), which is how the wait for arrival works there.

The kafka, nats, mongo, pulsar and kombu sets (servers from ``funboost_home/funboost_config.py``):

* ``KAFKA`` (kafka-python, ``enable_auto_commit=True``: at most once) and ``KAFKA_CONFLUENT``
  (confluent-kafka, offsets committed by hand every 2 s from its poll loop, after the calls: at least
  once); both on a topic of their own (``<queue>_<pid>``, ``num_partitions`` 10, funboost's default), group
  ``<queue>_<pid>_group``. Both producers send without waiting for the server, so the publish clock stops when
  funboost's producer has been flushed (every message acknowledged, as funboost's exit hook does); then,
  untimed, the topic must hold N (its ends, read with a confluent-kafka ``Consumer`` of this script:
  funboost's ``get_message_count`` is -1 there). The consume
  clock runs from the first call (the group join, from ``f.consume()`` to the first call, is reported
  apart as ``join``, as ``benchmarks/throughput.py`` does for our Kafka kinds) until N calls ran and, for
  ``KAFKA_CONFLUENT``, the group's committed offsets reached the end of every partition (``rate_calls_only``
  stops at the N-th call); ``KAFKA`` auto-commits in the background, so its clock stops at the N-th call.
* ``NATS_JETSTREAM`` (nats-py; a stream per queue with ``retention="workqueue"``, file storage, pull
  consumer fetching 10 at a time, ack after the call, ``publish`` waits for the server's PubAck): publish
  is checked with ``get_message_count`` (the stream's message count); consume waits until the stream is
  empty (a work-queue stream deletes a message when it is acked).
* ``NATS_CORE`` (nats-py, core NATS: no storage, no acks, a queue-group subscription; a message published
  while no consumer is subscribed is dropped): timed as ``MQTT`` (consumer first, warm-up pushes until one
  arrives, publish = the push loop, consume = the calls that ran over the time from the first timed push
  until N ran or no call came for 3 s; the missing ones are reported as lost).
* ``MONGOMQ`` (funboost's bundled mongomq: one ``insert_one`` per push, one ``find_one_and_update`` per
  message taken, ``complete()`` marks it finished): consume waits until no document is ``started``.
* ``PULSAR`` (pulsar-client; ``send`` waits for the receipt; a Shared subscription, ack after the call; its
  consumer subscribes at the latest position, so this script makes the subscription before publishing):
  ``get_message_count`` is -1, so the publish check is the synchronous ``send``; consume counts the
  acks (``pulsar.Consumer.acknowledge`` wrapped in a counter) and waits until N were sent.
* ``KOMBU`` (kombu's virtual Redis transport or py-amqp, ``prefetch_count`` 500, ack after the call):
  consume counts the acks (``kombu.message.Message.ack`` wrapped) and waits until N were sent.

funboost has no bulk-publish call, so there is no bulk figure. Prints one line
``PEER-RESULT {json}`` and ends with ``os._exit`` (funboost's consumer threads do not stop).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import sys
import threading
import time

TIMEOUT_SECONDS = 120.0


def _count_amqpstorm_acks():
    """Wrap ``amqpstorm.Message.ack`` in a counter (the original still runs); returns the count reader."""
    import amqpstorm

    acks = itertools.count(1)
    sent = [0]
    original = amqpstorm.Message.ack

    def ack(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        sent[0] = next(acks)
        return result

    amqpstorm.Message.ack = ack
    return lambda: sent[0]


def _pending_probe(fn, kind: str, box: dict):
    """A callable returning how many fetched messages are not acked yet, or None if not readable."""
    from funboost import BrokerEnum

    if "acks_sent" in box:  # RABBITMQ_AMQPSTORM, PULSAR, KOMBU: the acks this process sent
        acks_sent = box["acks_sent"]
        return lambda: box["target"] - acks_sent()
    if kind == BrokerEnum.NATS_JETSTREAM:  # a work-queue stream deletes what is acked
        return fn.get_message_count
    if kind == BrokerEnum.MONGOMQ:
        return _mongo_started(fn)
    consumer = fn.consumer
    if kind == BrokerEnum.REDIS_ACK_ABLE:
        return lambda: consumer.redis_db_frame.zcard(consumer._unack_zset_name)
    if kind == BrokerEnum.REDIS_BRPOP_LPUSH:
        return lambda: consumer.redis_db_frame.llen(consumer._unack_list_name)
    if kind == BrokerEnum.REDIS_STREAM:
        group = consumer.consumer_params.broker_exclusive_config["group"]
        return lambda: consumer.redis_db_frame.xpending(consumer.queue_name, group)["pending"]
    return None


def _count_acks(cls, name: str = "ack"):
    """Wrap ``cls.<name>`` in a counter (the original still runs); returns the count reader."""
    acks = itertools.count(1)
    sent = [0]
    original = getattr(cls, name)

    def ack(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        sent[0] = next(acks)
        return result

    setattr(cls, name, ack)
    return lambda: sent[0]


def _kafka_probe(queue: str) -> dict:
    """Readers of a Kafka topic's high watermarks and of a group's committed offsets (confluent-kafka)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    from funboost.funboost_config_deafult import BrokerConnConfig

    servers = ",".join(BrokerConnConfig.KAFKA_BOOTSTRAP_SERVERS)
    reader = Consumer({"bootstrap.servers": servers, "group.id": f"{queue}_probe", "enable.auto.commit": False})

    def partitions() -> list[int]:
        topic = reader.list_topics(queue, timeout=10).topics.get(queue)
        return sorted(topic.partitions) if topic is not None and not topic.error else []

    def ends() -> dict[int, int]:
        """{partition: end}. Tansu reports the base offset of the last batch as the end: the records from
        there on are read, and the end is the last one's offset + 1 (as our kafka_client.log_ends does)."""
        marks = {p: reader.get_watermark_offsets(TopicPartition(queue, p), timeout=10, cached=False)
                 for p in partitions()}
        peek = {p: high - 1 for p, (low, high) in marks.items() if high > low}
        out = {p: high for p, (_, high) in marks.items()}
        if peek:
            tail = Consumer({"bootstrap.servers": servers, "group.id": f"{queue}_probe",
                             "enable.auto.commit": False, "enable.partition.eof": True})
            try:
                tail.assign([TopicPartition(queue, p, offset) for p, offset in peek.items()])
                waiting, deadline = set(peek), time.monotonic() + 10
                while waiting and time.monotonic() < deadline:
                    for message in tail.consume(1000, 0.5):
                        if message.error() is None:
                            out[message.partition()] = max(out[message.partition()], message.offset() + 1)
                        elif message.error().code() == KafkaError._PARTITION_EOF:
                            waiting.discard(message.partition())
            finally:
                tail.close()
        return out

    def committed(group: str) -> dict[int, int]:
        watcher = Consumer({"bootstrap.servers": servers, "group.id": group, "enable.auto.commit": False})
        try:
            found = watcher.committed([TopicPartition(queue, p) for p in partitions()], timeout=10)
            return {tp.partition: max(tp.offset, 0) for tp in found}
        finally:
            watcher.close()

    return {"ends": ends, "committed": committed}


def _pulsar_subscribe(fn) -> None:
    """PULSAR: funboost's consumer subscribes at the latest position when it starts, so it never sees what was
    published before; the subscription is made here first (funboost's name and type, then closed), as a
    deployment's earlier consumer would have made it. Its cursor keeps the messages published after."""
    import pulsar
    from funboost.funboost_config_deafult import BrokerConnConfig

    config = fn.consumer.consumer_params.broker_exclusive_config
    client = pulsar.Client(BrokerConnConfig.PULSAR_URL)
    try:
        client.subscribe(fn.queue_name, subscription_name=config["subscription_name"],
                         consumer_type=getattr(pulsar.ConsumerType, config["consumer_type"])).close()
    finally:
        client.close()


def _mongo_started(fn):
    collection = fn.publisher.queue.collection
    return lambda: collection.count_documents({"status": "started"})


def _measure_publish(fn, n: int, count=None) -> dict:
    """``count``: how many messages the broker holds (default ``fn.get_message_count``); None in the
    result's check when the kind cannot say (PULSAR: ``send`` waits for the receipt)."""
    push = fn.push
    count_of = count or fn.get_message_count
    fn.get_message_count()  # warm-up, not timed
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        push(i, y=i)
    t_loop = time.perf_counter() - t0
    count = count_of()
    if count == -1:  # PULSAR: funboost cannot count; its send() returned after the server's receipt
        elapsed = time.perf_counter() - t0
        return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "push_loop_seconds": t_loop,
                "check": "count not readable; each send() waited for its receipt", "ok_check": True}
    while count < n and time.perf_counter() - t0 < TIMEOUT_SECONDS:  # buffered publishers
        time.sleep(0.0005 if count_of is fn.get_message_count else 0.01)  # Kafka: each count reads the log
        count = count_of()
    elapsed = time.perf_counter() - t0
    return {"n": n, "elapsed": elapsed, "rate": n / elapsed, "push_loop_seconds": t_loop,
            "check": f"queue holds {count}", "ok_check": count == n}


def _measure_consume(fn, kind: str, n: int, box: dict) -> dict:
    queued = fn.get_message_count()
    done = threading.Event()
    box.update(counter=itertools.count(1), target=n, done=done, first=None)
    if kind == "RABBITMQ_AMQPSTORM":
        box["acks_sent"] = _count_amqpstorm_acks()
    elif kind == "PULSAR":
        import pulsar

        box["acks_sent"] = _count_acks(pulsar.Consumer, "acknowledge")
    elif kind == "KOMBU":
        import kombu.message

        box["acks_sent"] = _count_acks(kombu.message.Message)
    gc.collect()
    t0 = time.perf_counter()
    fn.consume()
    finished = done.wait(TIMEOUT_SECONDS)
    t_ran = time.perf_counter()
    probe = _pending_probe(fn, kind, box)
    pending = None
    if finished and probe is not None:
        while (pending := probe()) and time.perf_counter() - t0 < TIMEOUT_SECONDS:
            time.sleep(0.0005)
    elapsed = time.perf_counter() - t0
    calls = next(box["counter"]) - 1
    left = fn.get_message_count()
    if left == -1 and probe is not None:  # PULSAR: nothing is counted; what is not acked is left
        left = pending
    first = box["first"]
    result = {
        "n": n, "elapsed": elapsed, "rate": (n if finished else calls) / elapsed,
        "ran_all_after": t_ran - t0, "rate_calls_only": (n if finished else calls) / (t_ran - t0),
        "first_call_after": None if first is None else first - t0, "queued_before": queued,
        "acks_waited": probe is not None, "pending_at_end": pending,
        "check": f"{calls} calls, {left} left in queue", "ok_check": finished and calls == n and left == 0,
    }
    if not finished:
        result["error"] = f"timed out after {TIMEOUT_SECONDS:.0f}s with {calls} of {n} calls run"
    return result


def _measure_zeromq(fn, n: int, box: dict) -> dict:
    """ZEROMQ: funboost's publisher waits (REQ/REP, through the broker process the consumer starts) until a
    consumer took each message into its pool, so the consumer runs first. One warm-up push (not timed)
    waits for the broker process; then N pushes one by one. publish: N / the push loop; consume: N / the
    time from the first timed push until the function ran N times (it overlaps the publishing)."""
    done = threading.Event()
    box.update(counter=itertools.count(1), target=n + 1, done=done, first=None)
    fn.consume()
    fn.push(-1, y=0)  # warm-up: returns once a consumer took it
    while box["first"] is None:
        time.sleep(0.001)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        fn.push(i, y=i)
    t_pushed = time.perf_counter()
    finished = done.wait(TIMEOUT_SECONDS)
    elapsed = time.perf_counter() - t0
    calls = next(box["counter"]) - 2
    publish = {"n": n, "elapsed": t_pushed - t0, "rate": n / (t_pushed - t0), "check": "every push was answered",
               "ok_check": True}
    consume = {"n": n, "elapsed": elapsed, "rate": (n if finished else calls) / elapsed,
               "check": f"{calls} calls", "ok_check": finished and calls == n}
    return {"publish": publish, "consume": consume}


def _calls(box: dict) -> int:
    """Calls counted so far by ``box["counter"]`` (an ``itertools.count(1)``; read without advancing it)."""
    return int(repr(box["counter"])[len("count("):-1]) - 1


def _use_mqtt_server() -> None:
    """Point funboost's ``MQTT_HOST`` and ``MQTT_TCP_PORT`` at ``PEERBENCH_MQTT_URL`` (before any publisher
    or consumer of the kind connects)."""
    from urllib.parse import urlsplit

    from funboost.funboost_config_deafult import BrokerConnConfig

    url = urlsplit(os.environ.get("PEERBENCH_MQTT_URL", "mqtt://127.0.0.1:18830"))
    BrokerConnConfig.MQTT_HOST, BrokerConnConfig.MQTT_TCP_PORT = url.hostname or "127.0.0.1", url.port or 1883


def _measure_mqtt(fn, n: int, box: dict) -> dict:
    """MQTT: funboost publishes at QoS 0 to the topic named after the queue and consumes through a QoS 0
    shared subscription (``$share/fsdf/<queue>``) on a clean session, without acks: the server drops a
    message published while no consumer is subscribed, and one its consumer does not take in time. So the
    consumer runs first, and warm-up pushes (not timed) repeat until one arrives. Then N pushes one by one.
    publish: N / the push loop. consume: the calls that ran / the time from the first timed push until N
    ran, or until no call came for 3 s (the missing ones are reported as lost). The server comes from
    ``PEERBENCH_MQTT_URL`` (funboost's ``MQTT_HOST`` and ``MQTT_TCP_PORT``)."""
    box.update(counter=itertools.count(1), target=0, done=threading.Event(), first=None)
    fn.consume()
    deadline = time.monotonic() + 30
    while box["first"] is None and time.monotonic() < deadline:
        fn.push(-1, y=0)  # warm-up: lost until the consumer's subscription exists
        time.sleep(0.2)
    if box["first"] is None:
        raise RuntimeError("no warm-up message reached the consumer in 30 s")
    time.sleep(0.5)  # the last warm-up pushes arrive
    done = threading.Event()
    box.update(counter=itertools.count(1), target=n, done=done)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        fn.push(i, y=i)
    t_pushed = time.perf_counter()
    seen, last_change = 0, time.perf_counter()
    while not done.wait(0.05) and time.perf_counter() - last_change < 3.0:
        if _calls(box) != seen:
            seen, last_change = _calls(box), time.perf_counter()
    calls = n if done.is_set() else _calls(box)
    elapsed = (time.perf_counter() if done.is_set() else last_change) - t0
    publish = {"n": n, "elapsed": t_pushed - t0, "rate": n / (t_pushed - t0), "check": "not confirmed",
               "ok_check": True}
    consume = {"n": n, "elapsed": elapsed, "rate": calls / elapsed, "lost": n - calls,
               "check": f"{calls} calls, {n - calls} lost", "ok_check": calls == n}
    return {"publish": publish, "consume": consume}


def _measure_kafka(fn, kind: str, n: int, box: dict, queue: str) -> dict:
    """KAFKA, KAFKA_CONFLUENT: publish (clock until the high watermarks add up to N), then consume (clock from the
    first call until N calls ran and, for KAFKA_CONFLUENT, the committed offsets reached the ends)."""
    probe = _kafka_probe(queue)
    publisher = fn.publisher
    flush = publisher._producer.flush if kind == "KAFKA" else publisher._confluent_producer.flush
    fn.get_message_count()  # warm-up, not timed (the topic exists since the publisher was made)
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        fn.push(i, y=i)
    t_loop = time.perf_counter() - t0
    flush()  # every message acknowledged by the server (what funboost's own exit hook does)
    elapsed = time.perf_counter() - t0
    count = sum(probe["ends"]().values())
    publish = {"n": n, "elapsed": elapsed, "rate": n / elapsed, "push_loop_seconds": t_loop,
               "check": f"topic holds {count}", "ok_check": count == n}
    if not publish["ok_check"]:
        return {"publish": publish}
    ends = {p: e for p, e in probe["ends"]().items() if e > 0}
    done = threading.Event()
    box.update(counter=itertools.count(1), target=n, done=done, first=None)
    gc.collect()
    t0 = time.perf_counter()
    fn.consume()
    finished = done.wait(TIMEOUT_SECONDS)
    t_ran = time.perf_counter()
    committed: dict[int, int] = {}
    group = fn.consumer.consumer_params.broker_exclusive_config["group_id"]
    if finished and kind == "KAFKA_CONFLUENT":
        while time.perf_counter() - t_ran < 60:
            committed = {p: c for p, c in probe["committed"](group).items() if p in ends}
            if committed == ends:
                break
            time.sleep(0.05)
    t_end = time.perf_counter()
    calls = next(box["counter"]) - 1
    first = box["first"] or t0
    consume = {
        "n": n, "elapsed": t_end - first, "rate": (n if finished else calls) / (t_end - first),
        "join": first - t0, "rate_calls_only": (n if finished else calls) / (t_ran - first),
        "commit_wait": t_end - t_ran, "ends": ends, "committed": committed,
        "check": f"{calls} calls" + (f", committed {sum(committed.values())} of {sum(ends.values())}"
                                     if kind == "KAFKA_CONFLUENT" else ", offsets auto-committed (not waited for)"),
        "ok_check": finished and calls == n and (kind != "KAFKA_CONFLUENT" or committed == ends),
    }
    if not finished:
        consume["error"] = f"timed out after {TIMEOUT_SECONDS:.0f}s with {calls} of {n} calls run"
    return {"publish": publish, "consume": consume}


def main() -> None:  # noqa: C901 - a linear driver
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True, help="BrokerEnum attribute name, e.g. REDIS_ACK_ABLE")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--paths", default="publish,consume")
    parser.add_argument("--queue", default=None)
    parser.add_argument("--exclusive", default="{}", help="broker_exclusive_config as JSON")
    args = parser.parse_args()

    import funboost
    from funboost import BoosterParams, BrokerEnum, ConcurrentModeEnum, boost

    kind = getattr(BrokerEnum, args.broker)
    if args.broker in ("KAFKA", "KAFKA_CONFLUENT"):
        logging.getLogger("kafka").setLevel(logging.ERROR)  # kafka-python's connection chatter
    if args.broker == "MQTT":
        _use_mqtt_server()
    queue = args.queue or f"{os.environ.get('PEERBENCH_RUN_TAG', 'peerbench')}_funboost_{args.broker.lower()}"
    exclusive = json.loads(args.exclusive)
    if args.broker in ("KAFKA", "KAFKA_CONFLUENT", "PULSAR"):  # a topic (and group) of this run: none can be emptied
        queue = f"{queue}_{os.getpid()}"
        if args.broker != "PULSAR":
            exclusive.setdefault("group_id", f"{queue}_group")
    box: dict = {}

    def f(x, y):
        if box["first"] is None:
            box["first"] = time.perf_counter()
        if next(box["counter"]) == box["target"]:
            box["done"].set()
        return x + y

    fn = boost(BoosterParams(
        queue_name=queue, broker_kind=kind, concurrent_num=50, concurrent_mode=ConcurrentModeEnum.THREADING,
        log_level=logging.WARNING, create_logger_file=False, broker_exclusive_config=exclusive,
    ))(f)
    if args.broker not in ("KAFKA", "KAFKA_CONFLUENT", "PULSAR"):  # fresh topics there; clear() only warns
        fn.clear()

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    results: dict[str, dict] = {}
    if args.broker == "PULSAR":
        _pulsar_subscribe(fn)
    # NATS_CORE (core NATS, no storage: a message nobody is subscribed to is dropped) is timed as MQTT is
    own = {"ZEROMQ": _measure_zeromq, "MQTT": _measure_mqtt, "NATS_CORE": _measure_mqtt,
           "KAFKA": lambda fn, n, box: _measure_kafka(fn, "KAFKA", n, box, queue),
           "KAFKA_CONFLUENT": lambda fn, n, box: _measure_kafka(fn, "KAFKA_CONFLUENT", n, box, queue)}.get(args.broker)
    if own is not None:  # publishing needs a running consumer (ZeroMQ), is lost without one (MQTT), or Kafka
        try:
            results = own(fn, args.n, box)
        except Exception as exc:
            results["publish"] = {"error": f"{type(exc).__name__}: {exc}"}
        paths = []
    if "publish" in paths:
        try:
            results["publish"] = _measure_publish(fn, args.n)
        except Exception as exc:
            results["publish"] = {"error": f"{type(exc).__name__}: {exc}"}
    if "consume" in paths and "error" not in results.get("publish", {}):
        try:
            results["consume"] = _measure_consume(fn, kind, args.n, box)
        except Exception as exc:
            results["consume"] = {"error": f"{type(exc).__name__}: {exc}"}
    if "consume" not in paths and args.broker not in ("KAFKA", "KAFKA_CONFLUENT", "PULSAR"):
        fn.clear()

    out = {"framework": "funboost", "version": funboost.__version__, "broker": args.broker, "kind": kind,
           "queue": queue, "exclusive": exclusive, "results": results}
    sys.__stdout__.write("PEER-RESULT " + json.dumps(out) + "\n")
    sys.__stdout__.flush()
    import multiprocessing

    for child in multiprocessing.active_children():  # ZEROMQ's broker process would outlive os._exit
        child.kill()
    os._exit(0)


if __name__ == "__main__":
    main()
