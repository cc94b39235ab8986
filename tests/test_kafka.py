"""Kafka (kinds KAFKA and CONFLUENT_KAFKA): what the contract suite does not cover.

On the stand-ins of tests/kafka_server.py: Tansu (127.0.0.1:9092) and librdkafka's mock cluster
(127.0.0.1:9192). Queues are fresh topics named test_<hex>; the stand-ins keep them in memory.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers.kafka_confluent import ConfluentKafkaBroker
from funboost_like.brokers.offset_tracker import OffsetTracker
from funboost_like.brokers.registry import get_broker
from funboost_like.core.config import patch_frame_config, settings
from funboost_like.core.errors import BrokerConnectionError

from .conftest import require_server, subprocess_env
from .standin import free_port

TANSU, MOCK = ("Tansu", "127.0.0.1", 9092), ("librdkafka mock cluster", "127.0.0.1", 9192)
WORKER = Path(__file__).with_name("contract_worker.py")


def use(server: tuple[str, str, int], **extra: object) -> dict[str, str]:
    """Point the settings at ``server`` (fast group joins); return them as a child's environment."""
    require_server(*server)
    values = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{server[2]}", "KAFKA_SESSION_TIMEOUT_SECONDS": 2.0,
              "KAFKA_API_VERSION": "2.0" if server is MOCK else "", **extra}
    patch_frame_config(**values)
    return {f"FUNBOOST_LIKE_{name}": str(value) for name, value in values.items()}


def test_offset_tracker_commits_the_lowest_unfinished_offset_and_forgets_revoked_partitions() -> None:
    tracker = OffsetTracker()
    tracker.assign(0, 10)
    tracker.assign(1, -1)  # nothing committed yet
    assert tracker.taken(0, [10, 11, 12, 13]) == [10, 11, 12, 13]
    assert tracker.taken(1, [0, 1]) == [0, 1]
    tracker.finished(0, [11, 13])  # out of order: 10 still runs
    assert tracker.due() == {}  # 10 still runs: nothing moved
    tracker.finished(0, [10])
    assert tracker.due()[0] == 12  # 12 is the lowest unfinished
    tracker.committed({0: 12})
    assert 0 not in tracker.due()
    tracker.finished(0, [12])
    assert tracker.due()[0] == 14  # all taken finished: one past the highest
    assert tracker.revoke([1]) == {1: 0}  # commit on revoke: 0 and 1 still unfinished
    assert tracker.finished(1, [0, 1]) is False and tracker.owned() == [0]  # forgotten: ignored
    assert tracker.skip_to(0, 20, keep=[]) == 0 and tracker.taken(0, [15, 20]) == [20]  # a purge's floor


def test_a_busy_group_commits_at_most_every_commit_every_and_an_idle_one_at_once() -> None:
    from funboost_like.brokers import kafka_groups
    from funboost_like.brokers.kafka_client import GroupConsumer
    from funboost_like.brokers.kafka_queue import GroupState, QueueState

    class Recording(GroupConsumer):  # the group member's side of a commit: what settle asked to commit
        def __init__(self) -> None:
            self.commits: list[dict[int, int]] = []

        def commit(self, offsets: dict[int, int]) -> None:
            self.commits.append(dict(offsets))

    member = Recording()
    group, q = GroupState(member), QueueState("q", [0])
    group.tracker.assign(0, 0)
    group.tracker.taken(0, [0, 1, 2])
    group.tracker.finished(0, [0])
    kafka_groups.settle(None, q, group)  # type: ignore[arg-type]  # the client is used for marks only
    assert member.commits == [{0: 1}]
    group.tracker.finished(0, [1])
    kafka_groups.settle(None, q, group)  # type: ignore[arg-type]
    assert member.commits == [{0: 1}]  # 2 still runs and the last commit was just now: it waits
    time.sleep(kafka_groups.COMMIT_EVERY)
    kafka_groups.settle(None, q, group)  # type: ignore[arg-type]
    assert member.commits == [{0: 1}, {0: 2}]
    group.tracker.finished(0, [2])
    kafka_groups.settle(None, q, group)  # type: ignore[arg-type]
    assert member.commits[-1] == {0: 3}  # nothing runs any more: committed at once


@pytest.mark.parametrize("kind, server", [(BrokerEnum.KAFKA, TANSU), (BrokerEnum.CONFLUENT_KAFKA, MOCK)],
                         ids=["KAFKA-tansu", "CONFLUENT_KAFKA-mock"])
def test_one_of_two_consumers_in_a_group_sigkilled_loses_nothing(
        kind: BrokerEnum, server: tuple[str, str, int], queue_name: str, tmp_path: Path,
        children: list[subprocess.Popen[bytes]]) -> None:
    env = subprocess_env(tmp_path / "sqlite_queues", **use(server, KAFKA_PARTITIONS=4),
                         FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS="2")
    broker, total, record = get_broker(kind), 40, tmp_path / "record"
    for i in range(total):  # one publish a call: round robin over the four partitions (two per consumer)
        broker.publish(queue_name, json.dumps({"i": i, "seconds": 0.4}).encode())

    def start() -> subprocess.Popen[bytes]:
        with open(tmp_path / f"worker-{len(children)}.log", "wb") as log:
            children.append(subprocess.Popen([sys.executable, str(WORKER), queue_name, str(int(kind)), str(record),
                                              "plain"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
        return children[-1]

    def lines() -> list[tuple[str, int, int]]:
        text = record.read_text() if record.exists() else ""
        return [(kind, int(i), int(pid)) for kind, i, pid in (line.split() for line in text.splitlines())]

    # Generous: it returns as soon as the condition holds. After the kill, the survivor waits for the
    # rebalance and then runs the victim's unfinished calls one by one as suspects (DESIGN §3.3).
    def wait_for(condition: object, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text("utf-8", "replace")[-1500:] for p in sorted(tmp_path.glob("worker-*")))
                pytest.fail(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.05)

    victim, survivor = start(), start()
    wait_for(lambda: {pid for s, _, pid in lines() if s == "s"} == {victim.pid, survivor.pid}, "both to run calls")
    victim.kill()  # one of two in the group, with calls in flight
    victim.wait(10)
    wait_for(lambda: {i for s, i, _ in lines() if s == "d"} == set(range(total)), "every call to finish")
    started = collections.Counter(i for s, i, _ in lines() if s == "s")
    # Run again: at most what was in flight at the kill and at the two rebalances (4 calls each).
    assert sum(started.values()) - total <= 12, started


@pytest.mark.parametrize("kind", [BrokerEnum.CONFLUENT_KAFKA, BrokerEnum.KAFKA], ids=["CONFLUENT_KAFKA", "KAFKA"])
def test_ordered_runs_one_call_per_partition_and_a_retry_with_backoff_does_not_block_it(
        kind: BrokerEnum, queue_name: str) -> None:
    ordered, parallel = queue_name, f"{queue_name}_parallel"
    use(TANSU, KAFKA_PARTITIONS=1)
    running, peak, seen = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    lock, done = threading.Lock(), {ordered: threading.Event(), parallel: threading.Event()}
    failed_once: set[int] = set()

    def body(queue: str, i: int) -> None:
        with lock:
            running[queue] += 1
            peak[queue] = max(peak[queue], running[queue])
            seen[queue].append(i)
        time.sleep(0.05)
        with lock:
            running[queue] -= 1
            if len(set(seen[queue])) == 8 and len(seen[queue]) == 9 - (queue == parallel):
                done[queue].set()
        if queue == ordered and i == 0 and i not in failed_once:
            failed_once.add(i)
            raise ValueError("fails once, retried after 1.5 s")

    @task_deco(ordered, broker_kind=kind, concurrent_num=4, max_retry_times=1, retry_backoff=1.5, retry_jitter=False,
               broker_exclusive_config={"ordered": True})
    def in_order(i: int) -> None:
        body(ordered, i)

    @task_deco(parallel, broker_kind=kind, concurrent_num=4)
    def in_parallel(i: int) -> None:
        body(parallel, i)

    for i in range(8):
        in_order.push(i)
        in_parallel.push(i)
    in_order.consume()
    in_parallel.consume()
    assert done[ordered].wait(30) and done[parallel].wait(30)
    assert peak[ordered] == 1 and seen[ordered][:8] == list(range(8))  # log order, one at a time
    assert seen[ordered][8] == 0  # the retry came back after the rest: the partition went on meanwhile
    assert peak[parallel] > 1


def test_topics_are_made_with_the_partition_count_and_the_password_stays_out_of_logs(
        queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    use(TANSU, KAFKA_PARTITIONS=3, KAFKA_SASL_PASSWORD="s3cret-pw")
    broker = ConfluentKafkaBroker()
    with caplog.at_level(logging.DEBUG):
        broker.publish(queue_name, b'{"x": 1}')
        assert broker.count(queue_name) == 1
    client = broker._client
    assert sorted(client.partitions(queue_name)) == [0, 1, 2]
    assert client.partitions(f"{queue_name}.fl-delay") == [0, 1, 2] and client.partitions(f"{queue_name}.dlq") == [0]
    assert settings.as_dict()["KAFKA_SASL_PASSWORD"] == "***"
    assert "s3cret-pw" not in caplog.text and "s3cret-pw" not in broker._where()
    broker.purge(queue_name)
    broker.close()


def test_a_kafka_python_client_reports_a_cluster_it_cannot_reach_after_the_bootstrap_timeout(queue_name: str) -> None:
    """kafka-python's first contact waited its default 30 s before a push (or a consumer) heard of a cluster
    that is down; it is KAFKA_BOOTSTRAP_TIMEOUT_SECONDS now, 10 s by default as CONFLUENT_KAFKA's, and a
    clear BrokerConnectionError."""
    from funboost_like.brokers import kafka_python

    assert kafka_python.base_config()["bootstrap_timeout_ms"] == 10_000
    patch_frame_config(KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", KAFKA_BOOTSTRAP_TIMEOUT_SECONDS=1.0)
    broker = get_broker(BrokerEnum.KAFKA)
    try:
        for attempt in (lambda: broker.publish(queue_name, b'{"x": 1}'), lambda: broker.count(queue_name)):
            started = time.monotonic()
            with pytest.raises(BrokerConnectionError, match="unreachable.*Unable to bootstrap"):
                attempt()
            assert 0.9 < time.monotonic() - started < 5
    finally:
        broker.close()


def test_kafka_pythons_own_records_stay_out_of_the_log_unless_its_logger_is_set_to_debug(
        queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """kafka-python logged each connection at INFO and each failed attempt at ERROR (a consumer during an
    outage: about ten lines a second); the consumer reports an outage itself, once."""
    use(TANSU)
    broker = get_broker(BrokerEnum.KAFKA)
    try:
        with caplog.at_level(logging.INFO):
            broker.publish(queue_name, b'{"x": 1}')
            assert broker.count(queue_name) == 1
        assert [r.getMessage() for r in caplog.records if r.name.startswith("kafka")] == []
        logging.getLogger("kafka").setLevel(logging.DEBUG)  # the user asks for them: all shown again
        with caplog.at_level(logging.DEBUG):
            broker.purge(queue_name)
        assert [r for r in caplog.records if r.name.startswith("kafka.")]
    finally:
        logging.getLogger("kafka").setLevel(logging.NOTSET)
        broker.close()


@pytest.mark.parametrize("server", [TANSU, MOCK], ids=["tansu", "mock"])
def test_publish_many_builds_record_batches_that_split_at_the_size_limit_and_keep_order(
        queue_name: str, server: tuple[str, str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    from funboost_like.brokers import kafka_python

    use(server, KAFKA_PARTITIONS=2)
    monkeypatch.setattr(kafka_python, "BATCH_BYTES", 4_000)  # about 100 records of the bodies below
    broker = get_broker(BrokerEnum.KAFKA)
    client = broker._client
    requests: list[int] = []
    send_batch = client._send_batch
    monkeypatch.setattr(client, "_send_batch", lambda topic, partition, batch: (
        requests.append(partition), send_batch(topic, partition, batch))[-1])
    bodies = [json.dumps({"n": n, "pad": "x" * 20}).encode() for n in range(1_000)]
    broker.publish_many(queue_name, bodies)
    broker.publish_many(queue_name, bodies[:3])  # under BATCH_FROM: through the producer
    assert len(requests) >= 10 and len(set(requests)) == 1, requests
    assert broker.count(queue_name) == 1_003
    read = client.read(queue_name, {requests[0]: 0}, {requests[0]: 1_000}, 20.0)
    assert [json.loads(r.value)["n"] for r in read] == list(range(1_000))
    assert [r.offset for r in read] == list(range(1_000))
    broker.purge(queue_name)
    broker.close()


def test_the_push_link_packs_produce_requests_and_reads_answers_as_kafka_python_does() -> None:
    """kafka_link packs a ProduceRequest by hand (kafka-python's classes cost ~60 µs a push): byte for byte
    what kafka-python encodes, for every version it uses, and it reads kafka-python's ProduceResponses."""
    import kafka.errors
    from kafka.protocol.producer import ProduceRequest, ProduceResponse

    from funboost_like.brokers.kafka_link import CLIENT_ID, VERSIONS, answer_code, produce_frame

    data, answer = ProduceRequest.TopicProduceData, ProduceResponse.TopicProduceResponse
    for version in range(VERSIONS[0], VERSIONS[1] + 1):
        request = ProduceRequest[version](transactional_id=None, acks=-1, timeout_ms=10_000, topic_data=[
            data(name="tq", partition_data=[data.PartitionProduceData(index=2, records=b"batch")])])
        request.with_header(correlation_id=7, client_id=CLIENT_ID.decode())
        assert produce_frame(version, 7, b"tq", 2, b"batch", 10_000) == bytes(request.encode(framed=True, header=True))
        response = ProduceResponse[version](throttle_time_ms=0, responses=[answer(name="tq", partition_responses=[
            answer.PartitionProduceResponse(index=2, error_code=6, base_offset=5, log_append_time_ms=-1,
                                            log_start_offset=0, record_errors=[], error_message=None)])])
        response.with_header(correlation_id=7)
        assert answer_code(bytes(response.encode(framed=True, header=True))[4:], 7) == 6
        with pytest.raises(kafka.errors.CorrelationIdError):
            answer_code(bytes(response.encode(framed=True, header=True))[4:], 8)


@pytest.mark.parametrize("server", [TANSU, MOCK], ids=["tansu", "mock"])
def test_a_kafka_python_push_goes_out_on_the_callers_connection_and_falls_back_to_the_producer(
        queue_name: str, server: tuple[str, str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """A push (one record for one partition) is written to the leader on the calling thread and waited
    for there (kafka_link), not handed to the producer's I/O thread; when the link is taken by another
    thread or its connection broke, the record goes through the producer instead; nothing is lost."""
    use(server, KAFKA_PARTITIONS=1)
    broker = get_broker(BrokerEnum.KAFKA)
    client = broker._client
    sent: list[bytes] = []
    send = client.producer.send
    monkeypatch.setattr(client.producer, "send", lambda topic, value, **kw: (sent.append(value),
                                                                              send(topic, value, **kw))[-1])
    bodies = [json.dumps({"n": n}).encode() for n in range(8)]
    for body in bodies[:4]:
        broker.publish(queue_name, body)
    assert sent == [] and broker.count(queue_name) == 4  # stored when push returned, without the producer
    link = client.link
    with link._lock:  # another thread on the link: the producer takes the push
        broker.publish(queue_name, bodies[4])
    assert sent == [bodies[4]]
    for sock in link._sockets.values():
        sock.shutdown(socket.SHUT_RDWR)  # a connection that broke: the push goes through the producer
    broker.publish(queue_name, bodies[5])
    assert sent == [bodies[4], bodies[5]]
    for body in bodies[6:]:  # and the next push connects again
        broker.publish(queue_name, body)
    assert sent == [bodies[4], bodies[5]]
    assert [r.value for r in client.read(queue_name, {0: 0}, {0: 8}, 20.0)] == bodies
    threads = [threading.Thread(target=lambda t=t: [broker.publish(queue_name, b'{"t": %d}' % t) for _ in range(25)])
               for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert broker.count(queue_name) == 108
    broker.purge(queue_name)
    broker.close()


def test_a_commit_refused_by_a_rebalance_is_not_recorded_and_does_not_raise() -> None:
    """A member fenced off by a rebalance it missed (unknown member, old generation: seen once on the mock
    cluster right after a SIGKILL) gets False from its commit. Raising there made every fetch fail before
    it could poll, so the member never joined again and its calls never ran; now the commit is skipped
    (nothing is noted as committed, no mark is lowered) and the next poll joins the group again."""
    from funboost_like.brokers.kafka_client import GroupConsumer
    from funboost_like.brokers.kafka_groups import commit
    from funboost_like.brokers.kafka_queue import GroupState, QueueState

    class Fenced(GroupConsumer):
        def commit(self, offsets: dict[int, int]) -> bool:
            return False

    class NoAdmin:
        def commit_offsets(self, *args: object) -> None:
            raise AssertionError("a mark must not be lowered after a refused commit")

    q, group = QueueState("q", [0]), GroupState(Fenced())
    group.tracker.assign(0, 5)
    group.tracker.taken(0, [5, 6])
    group.tracker.finished(0, [5, 6])
    q.marks[0] = 9
    commit(NoAdmin(), q, group, group.tracker.due())  # type: ignore[arg-type]
    assert group.tracker.due() == {0: 7} and q.marks[0] == 9  # still due: sent again once joined


def test_a_hand_over_refused_by_a_rebalance_counts_no_death_and_resumes_where_this_process_was() -> None:
    """Seen on the mock cluster under load: the group refused every commit for seconds (a slow member kept
    it rebalancing), including the one on revoke. The marks stayed above the committed offsets, so the
    same process, given its partitions back, ran its own finished calls again as deaths, one by one; a
    few such rebalances would dead-letter healthy messages. Now the marks come down to what the group
    holds, and the process resumes at its own position when the partitions come back."""
    from funboost_like.brokers.kafka_client import GroupConsumer
    from funboost_like.brokers.kafka_groups import hand_over, set_up
    from funboost_like.brokers.kafka_queue import GroupState, QueueState

    class Refusing(GroupConsumer):  # the group is rebalancing: every commit refused, nothing committed yet
        def commit(self, offsets: dict[int, int]) -> bool:
            return False

        def committed(self, partitions: list[int]) -> dict[int, int]:
            return dict.fromkeys(partitions, -1)

    class Marks:  # the delivered marks' group, read and written from outside it
        def __init__(self) -> None:
            self.marks: dict[int, int] = {}

        def commit_offsets(self, group: str, topic: str, offsets: dict[int, int]) -> None:
            self.marks.update(offsets)

        def group_offsets(self, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
            return {p: self.marks.get(p, -1) for p in partitions}

    client, q, group = Marks(), QueueState("q", [0, 1]), GroupState(Refusing())
    for partition in (0, 1):
        group.tracker.assign(partition, -1)
    group.tracker.taken(0, range(10))
    group.tracker.finished(0, range(10))  # all done here
    group.tracker.taken(1, range(10))
    group.tracker.finished(1, range(7))  # 7, 8 and 9 still run at the revoke
    client.marks, q.marks = {0: 10, 1: 10}, {0: 10, 1: 10}
    hand_over(client, q, group, [0, 1], delay=False)  # type: ignore[arg-type]
    assert client.marks == {0: 0, 1: 0}  # another owner runs them again as new work, not as deaths
    group.fresh[:] = [0, 1]  # the same partitions come back to this process
    set_up(client, q, group, delay=False)  # type: ignore[arg-type]
    assert q.crash_until == {}
    assert group.tracker.taken(0, range(12)) == [10, 11] and group.tracker.taken(1, range(10)) == [7, 8, 9]
    assert group.tracker.due() == {0: 10, 1: 7}  # sent by the next settle


@pytest.mark.parametrize("kind, server", [(BrokerEnum.KAFKA, TANSU), (BrokerEnum.CONFLUENT_KAFKA, MOCK)],
                         ids=["KAFKA-tansu", "CONFLUENT_KAFKA-mock"])
def test_a_graceful_stop_commits_the_calls_that_finished_during_it(
        kind: BrokerEnum, server: tuple[str, str, int], queue_name: str) -> None:
    """Seen with SIGINT and a restart: acks are bookkeeping that the next fetch commits, and a stopped
    consumer fetches no more, so the calls that finished while the stop waited for them were never
    committed, and their delivered marks stayed up. The restart (after the session timeout: the member
    never left the group) ran them again as deaths, one by one. Now the end of the stop commits them,
    lowers the marks and leaves the group."""
    use(server, KAFKA_PARTITIONS=2)
    started, total = threading.Semaphore(0), 8

    @task_deco(queue_name, broker_kind=kind, concurrent_num=total)
    def slow(i: int) -> None:
        started.release()
        time.sleep(0.5)

    for i in range(total):
        slow.push(i)
    slow.consume()
    for _ in range(total):
        assert started.acquire(timeout=30)
    slow.stop()  # every call still runs: they all finish during the stop
    assert slow.consumer.join(30)
    client = get_broker(kind)._client
    partitions = sorted(client.partitions(queue_name))
    ends = {p: high for p, (_, high) in client.watermarks(queue_name, partitions).items()}
    assert sum(ends.values()) == total
    group = f"funboost_like.{queue_name}"
    assert client.group_offsets(group, queue_name, partitions) == ends  # nothing to run again
    marks = client.group_offsets(f"{group}.delivered", queue_name, partitions)
    assert all(marks[p] <= ends[p] for p in partitions), marks  # no death counted
