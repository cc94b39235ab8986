"""Core behaviour on the in-memory broker: publishing checks, retries, requeue, dead letters, QPS, the pool."""

from __future__ import annotations

import threading
import time

import pytest

from funboost_like import (
    BrokerEnum,
    ConfigurationError,
    ExceptionForRequeue,
    ExceptionForRetry,
    PriorityConsumingControlConfig,
    PublishError,
    get_consumer,
    task_deco,
)
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core import codec

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE


def memory() -> MemoryBroker:
    broker = get_broker(MEMORY)
    assert isinstance(broker, MemoryBroker)
    return broker


def test_push_runs_the_call_with_the_right_arguments(queue_name: str) -> None:
    results: list[tuple[int, int]] = []

    @task_deco(queue_name, broker_kind=MEMORY)
    def add(a: int, b: int = 10) -> None:
        results.append((a, b))

    add.push(1, 2)
    add.push(3)
    add.push(a=4, b=5)
    add.pub({"a": 6, "b": 7})
    add.publish({"a": 8})
    add.consume()
    memory().join(queue_name, timeout=5)
    assert sorted(results) == [(1, 2), (3, 10), (4, 5), (6, 7), (8, 10)]
    assert add(100, 1) is None and results[-1] == (100, 1)  # still callable directly


@pytest.mark.parametrize(
    "args, kwargs",
    [((1, 2, 3), {}), ((), {"c": 1}), ((), {}), ((1,), {"a": 2}), ((1, object()), {}),
     ((float("nan"),), {}), ((1, [None, {"x": float("inf")}]), {})],
    ids=["too-many", "unknown-kw", "missing", "twice", "not-json", "nan", "nested-infinity"],
)
def test_bad_push_raises_at_once(queue_name: str, args: tuple, kwargs: dict) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def f(a: int, b: int = 0) -> None:
        pass

    with pytest.raises(PublishError):
        f.push(*args, **kwargs)
    assert f.get_message_count() == 0


def test_none_is_sent_as_null_and_finite_floats_stay() -> None:
    value = {"a": None, "b": [1.5, None], "c": -0.0}
    assert codec.loads(codec.dumps(value)) == value


def test_bad_publish_dict_raises(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def f(a: int) -> None:
        pass

    with pytest.raises(PublishError):
        f.publish({"b": 1})
    with pytest.raises(PublishError):
        f.publish("[1, 2]")
    assert f.get_message_count() == 0


def test_unknown_parameter_raises_value_error_with_hint(queue_name: str) -> None:
    with pytest.raises(ValueError, match="did you mean 'qps'"):
        task_deco(queue_name, qsp=5)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        task_deco(queue_name, concurrent_num=0)
    with pytest.raises(ValueError):
        task_deco(queue_name, broker_kind=999)


def test_alias_parameter_is_accepted(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, msg_expire_seconds=5)
    def f() -> None:
        pass

    assert f.params.msg_expire_senconds == 5


def test_brokers_not_built_yet_raise_a_clear_error(queue_name: str) -> None:
    with pytest.raises(ValueError, match="not built yet"):
        @task_deco(queue_name, broker_kind=BrokerEnum.ROCKETMQ)
        def f() -> None:
            pass

        f.push()


def test_retry_then_success(queue_name: str) -> None:
    calls: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=3, is_print_detail_exception=False)
    def flaky(x: int) -> None:
        calls.append(x)
        if len(calls) < 3:
            raise ExceptionForRetry("not yet")

    flaky.push(1)
    flaky.consume()
    memory().join(queue_name, timeout=5)
    assert calls == [1, 1, 1]
    assert memory().list_dead_letters(queue_name) == []


def test_final_failure_goes_to_dead_letter_and_join_reraises(queue_name: str) -> None:
    calls: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=2, is_print_detail_exception=False)
    def always_fails(x: int) -> None:
        calls.append(x)
        raise KeyError("boom")

    always_fails.push(7)
    always_fails.consume()
    with pytest.raises(KeyError, match="boom"):
        memory().join(queue_name, timeout=5)
    assert calls == [7, 7, 7]
    [letter] = memory().list_dead_letters(queue_name)
    assert "failed 3 time(s)" in letter.reason and "KeyError" in letter.reason
    assert codec.loads(letter.body)["x"] == 7


def test_a_message_may_turn_tracebacks_on_or_off_for_itself(queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, max_retry_times=0)  # tracebacks on, the seed's default
    def fails(x: int) -> None:
        raise KeyError(f"boom {x}")

    fails.publish({"x": 1}, priority_control_config=PriorityConsumingControlConfig(is_print_detail_exception=False))
    fails.push(2)
    fails.consume()
    with caplog.at_level("ERROR", logger=f"funboost_like.{queue_name}"):
        memory().join(queue_name, timeout=5, fail_fast=False)
    letters = {codec.loads(letter.body)["x"]: letter.reason for letter in memory().list_dead_letters(queue_name)}
    assert "Traceback" not in letters[1] and "Traceback" in letters[2]
    failed = {record.getMessage().split("boom ")[1][0]: record.exc_info for record in caplog.records
              if "failed for good" in record.getMessage()}
    assert failed["1"] is None and failed["2"] is not None


def test_requeue_hands_the_message_back(queue_name: str) -> None:
    calls: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY)
    def picky(x: int) -> None:
        calls.append(x)
        if len(calls) == 1:
            raise ExceptionForRequeue()

    picky.push(5)
    picky.consume()
    memory().join(queue_name, timeout=5)
    assert calls == [5, 5]


def test_malformed_bodies_are_dead_lettered_and_consumer_keeps_running(queue_name: str) -> None:
    done: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int) -> None:
        done.append(x)

    broker = memory()
    broker.publish(queue_name, b"\x80not json")
    broker.publish(queue_name, b"[1,2]")
    broker.publish(queue_name, b'{"y": 1}')
    broker.publish(queue_name, b'{"x": 1, "extra": 5}')
    broker.publish(queue_name, b'{"x": 2}')  # no extra: valid, runs
    f.push(3)
    f.consume()
    broker.join(queue_name, timeout=5, fail_fast=False)
    assert sorted(done) == [2, 3]
    reasons = sorted(letter.reason for letter in broker.list_dead_letters(queue_name))
    assert len(reasons) == 4
    assert any("not valid JSON" in r for r in reasons)
    assert any("not an object" in r for r in reasons)
    assert any("unexpected keyword argument(s) 'y'" in r for r in reasons)
    assert any("'extra' must hold an object" in r for r in reasons)


def test_get_consumer_manual_form(queue_name: str) -> None:
    got: list[int] = []

    def add(a: int, b: int) -> None:
        got.append(a + b)

    consumer = get_consumer(queue_name, consuming_function=add, broker_kind=MEMORY)
    consumer.publisher_of_same_queue.clear()
    for i in range(10):
        consumer.publisher_of_same_queue.publish(dict(a=i, b=i * 2))
    assert consumer.publisher_of_same_queue.get_message_count() == 10
    consumer.start_consuming_message()
    memory().join(queue_name, timeout=5)
    assert sorted(got) == [i * 3 for i in range(10)]


def test_single_dict_parameter_mode(queue_name: str) -> None:
    got: list[dict] = []

    @task_deco(queue_name, broker_kind=MEMORY, is_consuming_function_use_multi_params=False)
    def handle(body: dict) -> None:
        got.append(body)

    handle.publish({"anything": 1, "goes": [2]})
    handle.consume()
    memory().join(queue_name, timeout=5)
    assert got == [{"anything": 1, "goes": [2]}]


def test_publish_many_and_count(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def f(n: int) -> None:
        pass

    ids = f.publish_many([{"n": i} for i in range(1000)])
    assert len(set(ids)) == 1000
    assert f.get_message_count() == 1000
    assert f.clear() == 1000
    with pytest.raises(PublishError):
        f.publish_many([{"n": 1}, {"m": 2}])


def test_priority_and_countdown(queue_name: str) -> None:
    order: list[str] = []

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_num=1)
    def f(tag: str) -> None:
        order.append(tag)

    f.publish({"tag": "late"}, PriorityConsumingControlConfig(countdown=0.5))
    f.publish({"tag": "low"})
    f.publish({"tag": "high"}, PriorityConsumingControlConfig(priority=3))
    started = time.monotonic()
    f.consume()
    memory().join(queue_name, timeout=5)
    assert order == ["high", "low", "late"]
    assert time.monotonic() - started >= 0.45


def test_message_expiry_drops_old_messages(queue_name: str) -> None:
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, msg_expire_senconds=0.2)
    def f(x: int) -> None:
        ran.append(x)

    f.push(1)
    time.sleep(0.4)
    f.push(2)
    f.consume()
    memory().join(queue_name, timeout=5)
    assert ran == [2]


def test_qps_holds_the_start_rate_with_blocking_calls(queue_name: str) -> None:
    starts: list[float] = []

    @task_deco(queue_name, broker_kind=MEMORY, qps=20, concurrent_num=100)
    def slow(x: int) -> None:
        starts.append(time.monotonic())
        time.sleep(0.5)  # 20/s with 0.5 s calls needs ~10 threads

    for i in range(40):
        slow.push(i)
    slow.consume()
    memory().join(queue_name, timeout=10)
    span = max(starts) - min(starts)
    assert len(starts) == 40
    assert 39 / 20 * 0.9 <= span <= 39 / 20 * 1.15
    assert 8 <= slow.consumer._pool.worker_count <= 16  # grew as needed, far below the ceiling


def test_pool_grows_only_while_calls_block(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, concurrent_num=50)
    def trivial(x: int) -> int:
        return x

    trivial.publish_many([{"x": i} for i in range(20000)])
    trivial.consume()
    memory().join(queue_name, timeout=20)
    assert trivial.consumer._pool.worker_count <= 10


def test_concurrency_ceiling_bounds_prefetch(queue_name: str) -> None:
    running = threading.Semaphore(0)
    release = threading.Event()

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_num=5)
    def blocked(x: int) -> None:
        running.release()
        release.wait(10)

    blocked.publish_many([{"x": i} for i in range(100)])
    blocked.consume()
    for _ in range(5):
        assert running.acquire(timeout=5)
    time.sleep(0.3)
    assert memory().in_flight(queue_name) == 5  # nothing prefetched beyond the ceiling
    assert blocked.get_message_count() == 95
    release.set()
    memory().join(queue_name, timeout=10)


def test_blocking_calls_below_the_ceiling_all_start(queue_name: str) -> None:
    running = threading.Semaphore(0)
    release = threading.Event()

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_num=50)
    def blocked(x: int) -> None:
        running.release()
        release.wait(10)

    for i in range(5):
        blocked.push(i)
    blocked.consume()
    for _ in range(5):
        assert running.acquire(timeout=2)
    release.set()
    memory().join(queue_name, timeout=10)


def test_stop_hands_unstarted_messages_back(queue_name: str) -> None:
    started = threading.Event()
    release = threading.Event()

    @task_deco(queue_name, broker_kind=MEMORY, concurrent_num=1, qps=0)
    def one_at_a_time(x: int) -> None:
        started.set()
        release.wait(5)

    one_at_a_time.publish_many([{"x": i} for i in range(10)])
    one_at_a_time.consume()
    assert started.wait(5)
    one_at_a_time.stop()
    release.set()
    assert one_at_a_time.consumer.join(10)
    assert memory().in_flight(queue_name) == 0
    assert one_at_a_time.get_message_count() == 9


def test_countdown_and_eta_are_exclusive(queue_name: str) -> None:
    with pytest.raises(ConfigurationError):
        PriorityConsumingControlConfig(countdown=1, eta=__import__("datetime").datetime.now())


def test_consumer_restarts_after_stop_and_follows_a_reopened_broker(queue_name: str) -> None:
    from funboost_like.brokers import registry

    done: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int) -> None:
        done.append(x)

    f.push(1)
    f.consume()
    memory().join(queue_name, timeout=5)
    f.stop()
    assert f.consumer.join(10)
    registry.close_all()  # brokers reopened (as between tests): cached instances must follow
    f.push(2)
    f.consume()  # a stopped consumer starts again
    memory().join(queue_name, timeout=5)
    assert done == [1, 2]


def test_consume_right_after_stop_starts_again_once_the_stop_is_over(queue_name: str) -> None:
    """consume() while the stop() before it was still under way returned at once and did nothing: the
    next messages waited in the queue with no consumer and nothing said."""
    done: list[int] = []
    started = threading.Event()

    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int) -> None:
        started.set()
        time.sleep(0.3 if x == 1 else 0)
        done.append(x)

    f.push(1)
    f.consume()
    assert started.wait(5)
    f.stop()  # the call of 1 is still running: the stop is under way
    f.push(2)
    f.consume()
    memory().join(queue_name, timeout=5)
    assert done == [1, 2]
    f.stop()
    f.consumer.join(5)


def test_a_queued_message_costs_its_body_not_a_whole_page(tmp_path) -> None:
    """orjson hands back bodies sitting in 4 KiB allocations; a queue of them must not keep those."""
    import subprocess
    import sys

    from .conftest import subprocess_env

    script = """
import logging, resource
from funboost_like import BrokerEnum, task_deco

@task_deco("rss_per_message", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, log_level=logging.WARNING)
def f(x, y):
    return x + y

for i in range(2000):  # warm-up: allocator pools, caches
    f.push(i, y=i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for i in range(40000):
    f.push(i, y=i)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024 / 40000)
"""
    out = subprocess.run([sys.executable, "-c", script], env=subprocess_env(tmp_path), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    bytes_per_message = float(out.strip().splitlines()[-1])
    assert bytes_per_message < 1200, f"{bytes_per_message:.0f} bytes of RSS per queued message"


@pytest.mark.parametrize(("kind", "bound"), [(MEMORY, 0.35), (BrokerEnum.PERSISTQUEUE, 0.6)],
                         ids=["LOCAL_PYTHON_QUEUE", "PERSISTQUEUE"])
def test_an_idle_consumer_of_a_local_queue_stops_at_once(queue_name: str, kind: BrokerEnum, bound: float) -> None:
    """stop() waited for the idle fetch's 1 s timeout (0.95 s here), which was most of the run time of the
    tests that stop consumers; the local brokers' empty fetch costs next to nothing, so theirs is short."""
    booster = task_deco(queue_name, broker_kind=kind)(lambda x: None)
    booster.consume()
    time.sleep(0.05)  # the fetcher is in its first idle wait
    began = time.monotonic()
    booster.stop()
    assert booster.consumer.join(5)
    assert time.monotonic() - began < bound


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # logged once, not raised again
def test_a_fetcher_crash_before_its_loop_is_logged_and_stops_the_consumer(
        queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    from funboost_like.core import runtime

    @task_deco(queue_name, broker_kind=MEMORY, qps=5)
    def f(x: int) -> None:
        pass

    def broken(qps: float) -> None:
        raise RuntimeError("no limiter today")

    f.consumer._make_limiter = broken  # type: ignore[method-assign]  # runs before the fetch loop
    with caplog.at_level("ERROR"):
        f.consume()
        assert f.consumer.join(5)
    assert not f.consumer.is_running and f.consumer not in runtime.running_consumers()
    crashed = [r for r in caplog.records if r.levelname == "ERROR" and queue_name in r.getMessage()]
    assert crashed and crashed[0].exc_info is not None and "no limiter today" in caplog.text


def test_the_stats_of_a_consumer_read_as_their_counts(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int) -> None:
        pass

    f.push(1)
    f.consume()
    memory().join(queue_name, timeout=5)
    f.stop()
    assert f.consumer.join(10)
    text = repr(f.consumer.stats)  # the rate moves with the clock: the counts are compared
    assert text.startswith("ConsumerStats({'succeeded': 1, 'failed': 0, 'requeued': 0, 'dead_lettered': 0, "
                           "'skipped': 0, 'released': 0, 'rate_per_second_last_minute': ")
