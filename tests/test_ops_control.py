"""Run-time control: pause and resume, a new qps, purge, dead letters requeued or deleted, and a
failed call retried from its status record; on the memory broker, the embedded SQLite one and Redis."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from funboost_like import BrokerEnum, FunctionResultStatusPersistanceConfig, patch_frame_config, task_deco
from funboost_like.core.errors import FunboostLikeError
from funboost_like.ops.records import TaskNotFound
from funboost_like.ops.service import OpsService, UnknownQueue
from tests.test_ops_registry import wait_for

pytestmark = pytest.mark.ops_registry


@pytest.fixture(autouse=True)
def fast_beats() -> None:
    patch_frame_config(OPS_HEARTBEAT_SECONDS=0.2)


def _pause_and_resume(kind: BrokerEnum, queue_name: str) -> None:
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=kind, log_level=logging.WARNING)
    def f(x: int) -> None:
        ran.append(x)

    f.consume()
    service = OpsService(kinds=[kind])
    wait_for(lambda: service.workers(queue_name), what="the worker record")
    started = time.monotonic()
    service.pause(queue_name)
    applied = service.wait_applied(queue_name)
    assert (applied["consumers"], applied["confirmed"]) == (1, 1)
    assert 0 <= applied["applied_in_seconds"] < 1.5
    assert time.monotonic() - started < 1.5
    for i in range(5):
        f.push(i)
    time.sleep(0.3)  # long enough for a running consumer to take them
    assert ran == [] and f.get_message_count() == 5
    assert service.status(queue_name)["paused"] is True
    started = time.monotonic()
    service.resume(queue_name)
    wait_for(lambda: len(ran) == 5, what="the calls after resume")
    assert time.monotonic() - started < 1.5


def test_a_consumer_started_on_a_paused_or_throttled_queue_obeys_from_its_first_call(queue_name: str) -> None:
    """It ran a whole batch (paused) or an unlimited burst (qps lowered) before the agent's first round read
    the control record."""
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, concurrent_num=20, log_level=logging.WARNING)
    def f(x: int) -> None:
        ran.append(x)

    for i in range(40):
        f.push(i)  # the queue is known to the registry from here
    service = OpsService(kinds=[BrokerEnum.PERSISTQUEUE])
    service.pause(queue_name)
    service.set_qps(queue_name, 2)
    f.consume()
    time.sleep(1.0)
    assert ran == [] and f.get_message_count() == 40
    service.resume(queue_name)
    wait_for(lambda: ran, what="the first call after resume")
    time.sleep(1.0)
    assert 1 <= len(ran) <= 4  # 2 per second, not a burst of 20 or more


def test_time_left_counts_the_calls_that_fail_for_good_too(queue_name: str) -> None:
    """They leave the queue as well: a queue whose calls all failed showed no time left while emptying."""
    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, qps=10, max_retry_times=0,
               is_print_detail_exception=False, log_level=logging.CRITICAL)
    def f(x: int) -> None:
        raise ValueError(x)

    f.publish_many([{"x": i} for i in range(200)])
    f.consume()
    service = OpsService(kinds=[BrokerEnum.PERSISTQUEUE])
    status = wait_for(lambda: (s := service.status(queue_name))["failed_per_second"] > 0 and s, timeout=10,
                      what="a failure rate")
    assert status["done_per_second"] == 0 and status["seconds_left"] is not None
    assert status["seconds_left"] == round(status["depth"] / status["failed_per_second"], 1)


def test_a_pause_is_confirmed_while_every_slot_runs_a_long_call(queue_name: str) -> None:
    """The fetcher asks before its next fetch, so the pause holds at once; it was reported as not applied
    until a running call ended."""
    release = threading.Event()
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, concurrent_num=1, log_level=logging.WARNING)
    def f(x: int) -> None:
        ran.append(x)
        release.wait(20)

    f.push(1)
    f.push(2)
    f.consume()
    service = OpsService(kinds=[BrokerEnum.PERSISTQUEUE])
    wait_for(lambda: ran == [1] and service.workers(queue_name), what="the first call running")
    try:
        service.pause(queue_name)
        applied = service.wait_applied(queue_name, timeout=3)
        assert (applied["consumers"], applied["confirmed"]) == (1, 1)
    finally:
        release.set()
    time.sleep(0.5)
    assert ran == [1]  # and it holds: the second call waits
    service.resume(queue_name)
    wait_for(lambda: ran == [1, 2], what="the second call after resume")


def test_pause_and_resume_on_memory(queue_name: str) -> None:
    _pause_and_resume(BrokerEnum.MEMORY, queue_name)


def test_pause_and_resume_on_sqlite(queue_name: str) -> None:
    _pause_and_resume(BrokerEnum.PERSISTQUEUE, queue_name)


def test_pause_and_resume_on_redis(queue_name: str, ops_registry_in_redis: str) -> None:
    _pause_and_resume(BrokerEnum.REDIS_STREAM, queue_name)


def test_a_new_qps_rebuilds_the_rate_limiter(queue_name: str) -> None:
    starts: list[float] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.MEMORY, log_level=logging.WARNING)
    def f(x: int) -> None:
        starts.append(time.monotonic())

    f.consume()
    service = OpsService(kinds=[BrokerEnum.MEMORY])
    wait_for(lambda: service.workers(queue_name), what="the worker record")
    service.set_qps(queue_name, 10)
    assert service.wait_applied(queue_name)["confirmed"] == 1
    assert f.consumer.qps_in_effect == 10
    for i in range(6):
        f.push(i)
    wait_for(lambda: len(starts) == 6, what="the calls at 10/s")
    assert starts[-1] - starts[0] >= 0.4  # five intervals of 0.1 s
    service.set_qps(queue_name, None)  # back to the decorator's: no limit
    assert service.wait_applied(queue_name)["confirmed"] == 1
    assert f.consumer.qps_in_effect == 0
    with pytest.raises(ValueError):
        service.set_qps(queue_name, -1)


def test_a_queue_shows_the_qps_its_consumers_apply_until_a_control_record_sets_another(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.MEMORY, qps=20, log_level=logging.WARNING)
    def f(x: int) -> None:
        pass

    service = OpsService(kinds=[BrokerEnum.MEMORY])
    f.consume()
    wait_for(lambda: service.workers(queue_name), what="the worker record")
    assert service.status(queue_name)["qps"] == 20  # the decorator's, as the consumer applies it
    service.set_qps(queue_name, 5)
    assert service.status(queue_name)["qps"] == 5
    service.set_qps(queue_name, 0)  # no limit
    assert service.status(queue_name)["qps"] is None


def test_unknown_queue_is_refused(queue_name: str) -> None:
    with pytest.raises(UnknownQueue, match="--broker"):
        OpsService().pause(queue_name)
    assert OpsService(broker="PERSISTQUEUE").status(queue_name)["depth"] == 0  # named broker: no registry needed


@pytest.mark.parametrize("kind", [BrokerEnum.MEMORY, BrokerEnum.PERSISTQUEUE])
def test_dead_letters_requeued_and_deleted(kind: BrokerEnum, queue_name: str) -> None:
    broken = threading.Event()
    broken.set()
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=kind, max_retry_times=0, is_print_detail_exception=False,
               log_level=logging.CRITICAL)
    def f(x: int) -> None:
        if broken.is_set():
            raise ValueError(f"broken {x}")
        ran.append(x)

    for i in range(3):
        f.push(i)
    f.consume()
    service = OpsService(kinds=[kind])
    letters = wait_for(lambda: len(service.dead(queue_name)) == 3 and service.dead(queue_name), what="3 dead letters")
    assert {letter["index"] for letter in letters} == {0, 1, 2} and "broken" in letters[0]["reason"]
    with pytest.raises(FunboostLikeError, match="no dead letter at index 3"):
        service.requeue_dead(queue_name, index=3)
    with pytest.raises(FunboostLikeError, match="listing changed"):  # a page's stale index is refused
        service.delete_dead(queue_name, index=1, task_id=letters[0]["task_id"])
    broken.clear()
    one = letters[1]["body"]
    assert service.requeue_dead(queue_name, index=1, task_id=letters[1]["task_id"])["requeued"] == 1  # that one only
    wait_for(lambda: len(ran) == 1, what="the requeued call")
    assert [letter["body"] for letter in service.dead(queue_name)] == [letters[0]["body"], letters[2]["body"]]
    assert one["x"] == ran[0]
    assert service.delete_dead(queue_name, index=0)["deleted"] == 1
    assert [letter["body"] for letter in service.dead(queue_name)] == [letters[2]["body"]]
    assert service.requeue_dead(queue_name, all_letters=True)["requeued"] == 1
    wait_for(lambda: len(ran) == 2, what="the last requeued call")
    assert service.dead(queue_name) == []
    broken.set()
    f.push(9)
    wait_for(lambda: service.dead(queue_name), what="a new dead letter")
    assert service.delete_dead(queue_name, all_letters=True)["deleted"] == 1
    assert service.dead(queue_name) == []


def test_a_requeued_dead_letter_is_published_anew(queue_name: str) -> None:
    """It kept its first publish time: on a queue with msg_expire_senconds, requeuing an older letter only
    had it skipped as expired, and the queue's oldest-message age counted from its first publish."""
    from funboost_like.core.message import due_time

    broken = threading.Event()
    broken.set()
    ran: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, max_retry_times=0, msg_expire_senconds=1,
               is_print_detail_exception=False, log_level=logging.CRITICAL)
    def f(x: int) -> None:
        if broken.is_set():
            raise ValueError(x)
        ran.append(x)

    f.push(1)
    f.consume()
    service = OpsService(kinds=[BrokerEnum.PERSISTQUEUE])
    [letter] = wait_for(lambda: service.dead(queue_name), what="the dead letter")
    time.sleep(1.2)  # older than its expiry now
    f.stop()
    f.consumer.join(5)
    assert service.requeue_dead(queue_name, all_letters=True)["requeued"] == 1
    [head] = f.broker.heads(queue_name)
    assert time.time() - (due_time(head) or 0) < 1.0  # waiting since the requeue
    broken.clear()
    f.consume()
    wait_for(lambda: ran == [1], what="the requeued call to run")


def test_a_text_search_of_call_records_goes_past_its_first_scan(queue_name: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """It looked at the newest SEARCH_SCAN_LIMIT records only and said there were none."""
    from funboost_like.ops import records

    @task_deco(queue_name, log_level=logging.CRITICAL,
               function_result_status_persistance_conf=FunctionResultStatusPersistanceConfig(is_save_status=True))
    def f(note: str) -> None:
        return None

    f.push("the needle")
    for i in range(14):
        f.push(f"hay {i}")
    f.consume()
    service = OpsService()
    wait_for(lambda: len(service.tasks(queue_name, state="finished", limit=100)) == 15, what="15 records")
    monkeypatch.setattr(records, "SEARCH_SCAN_LIMIT", 10)
    [row] = service.tasks(queue_name, search="NEEDLE")
    assert row["kwargs"] == {"note": "the needle"}
    assert len(service.tasks(queue_name, search="hay", limit=12)) == 12


def test_retry_a_failed_call_from_its_record_and_purge(queue_name: str) -> None:
    broken = threading.Event()
    broken.set()
    ran: list[int] = []

    @task_deco(queue_name, max_retry_times=0, is_print_detail_exception=False, log_level=logging.CRITICAL,
               function_result_status_persistance_conf=FunctionResultStatusPersistanceConfig(is_save_status=True))
    def f(x: int) -> None:
        if broken.is_set():
            raise ValueError("not yet")
        ran.append(x)

    failed_id = f.push(7).task_id
    f.consume()
    service = OpsService()
    wait_for(lambda: service.tasks(queue_name, state="failed"), what="the failed record")
    [row] = service.tasks(queue_name, search="not yet")
    assert row["task_id"] == failed_id and row["kwargs"] == {"x": 7}
    assert service.tasks(queue_name, search="no such text") == []
    assert service.task(failed_id)["exception"].startswith("ValueError: not yet")
    broken.clear()
    retried = service.retry(failed_id)
    assert retried["retry_of"] == failed_id and retried["task_id"] != failed_id
    assert service.task(retried["task_id"])["kwargs"] == {"x": 7}  # its record exists at once (it did not)
    wait_for(lambda: ran == [7], what="the retried call")
    with pytest.raises(TaskNotFound):
        service.task("no-such-task")
    service.pause(queue_name)
    service.wait_applied(queue_name)
    for i in range(4):
        f.push(i)
    assert service.purge(queue_name)["purged"] == 4
    assert f.get_message_count() == 0
