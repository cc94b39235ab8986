"""The operations verbs of the command line: a real consumer process paused and resumed through
``funboost_like pause/resume``, ``--json`` everywhere, and clear errors with a non-zero exit status."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, patch_frame_config, task_deco
from funboost_like.cli import main
from funboost_like.ops import registry
from tests.conftest import subprocess_env
from tests.test_ops_registry import wait_for

_WORKER = textwrap.dedent("""
    import logging, sys
    from funboost_like import BrokerEnum, task_deco

    @task_deco(sys.argv[1], broker_kind=BrokerEnum.PERSISTQUEUE, log_level=logging.WARNING)
    def f(x):
        return x

    f.consume()
""")

pytestmark = pytest.mark.ops_registry


@task_deco("ops_timing_q", broker_kind=BrokerEnum.PERSISTQUEUE)
def timed(n: int) -> int:
    return n


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "funboost_like", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_consumer_process_is_paused_and_resumed_from_the_command_line(
        queue_name: str, isolated_settings: Path, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = subprocess_env(isolated_settings, FUNBOOST_LIKE_OPS_HEARTBEAT_SECONDS="0.5")
    children.append(subprocess.Popen([sys.executable, str(script), queue_name], env=env))

    def workers() -> list[dict[str, Any]]:
        done = cli(env, "workers", queue_name, "--json")
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    wait_for(workers, timeout=15, what="the consumer's record")
    done = cli(env, "pause", queue_name, "--json")
    assert done.returncode == 0, done.stderr
    paused = json.loads(done.stdout)
    # applied within about a second of the control record's write (the CLI's own start is not counted:
    # it varies with the machine's load); the margin is for three test workers on two cores
    assert paused["confirmed"] == 1 and paused["applied_in_seconds"] < 1.5

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, log_level=logging.WARNING)
    def f(x: int) -> None:
        return None

    for i in range(3):
        f.push(i)
    time.sleep(0.3)  # a running consumer would have taken them by now
    assert f.get_message_count() == 3
    done = cli(env, "resume", queue_name)
    assert done.returncode == 0 and "confirmed: 1" in done.stdout, done.stderr
    assert float(done.stdout.split("applied_in_seconds:")[1].split()[0]) < 1.5
    wait_for(lambda: f.get_message_count() == 0, what="the messages after resume")
    status = json.loads(cli(env, "status", queue_name, "--json").stdout)
    assert status["paused"] is False and status["consumers"] == 1 and status["depth"] == 0


def test_every_verb_answers_in_json_and_in_text(queue_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: int) -> None:
        return None

    f.push(1)
    f.push(2)
    [row] = [q for q in run_json(capsys, "queues") if q["queue"] == queue_name]
    assert row["depth"] == 2 and row["broker"] == "PERSISTQUEUE"
    assert run_json(capsys, "status", queue_name)["depth"] == 2
    assert isinstance(run_json(capsys, "workers"), list)
    assert run_json(capsys, "tasks", queue_name) == []
    assert run_json(capsys, "dead", queue_name) == []
    assert run_json(capsys, "delayed", queue_name) == []
    f.publish({"x": 3}, priority_control_config=PriorityConsumingControlConfig(countdown=60))
    [later] = run_json(capsys, "delayed", queue_name)
    assert later["body"]["x"] == 3 and later["due_at"] > time.time() + 50
    assert main(["delayed", queue_name]) == 0 and '{"x": 3' in capsys.readouterr().out
    assert run_json(capsys, "qps", queue_name, "5")["qps"] == 5.0
    with pytest.raises(SystemExit) as usage:  # a usage error (2) that says what N must be
        main(["qps", queue_name, "abc"])
    assert usage.value.code == 2 and "'abc' is not a number of calls per second" in capsys.readouterr().err
    assert run_json(capsys, "qps", queue_name, "default")["qps"] is None
    with pytest.raises(SystemExit) as usage:
        main(["tasks", queue_name, "--limit", "0"])
    assert usage.value.code == 2 and "give 1 or more" in capsys.readouterr().err
    assert run_json(capsys, "pause", queue_name, "--no-wait")["paused"] is True
    assert run_json(capsys, "resume", queue_name, "--no-wait")["paused"] is False
    assert run_json(capsys, "requeue-dead", queue_name, "--all")["requeued"] == 0
    assert run_json(capsys, "timing")["store"] == "memory"
    assert main(["queues"]) == 0
    assert queue_name in capsys.readouterr().out
    assert main(["purge", queue_name]) == 1
    assert "--yes" in capsys.readouterr().err and f.get_message_count() == 3
    assert run_json(capsys, "purge", queue_name, "--yes")["purged"] == 3


def test_one_dead_letter_is_taken_by_index_only_if_it_is_still_the_listed_task(
        queue_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Index 0 is the newest letter, so a failure between the listing and the command shifted every index
    and the CLI silently took another call: it now names the task it took and takes --task-id."""
    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, max_retry_times=0, is_print_detail_exception=False,
               log_level=logging.CRITICAL)
    def f(x: int) -> None:
        raise ValueError(x)

    f.push(1)
    f.push(2)
    f.consume()
    wait_for(lambda: len(run_json(capsys, "dead", queue_name)) == 2, what="two dead letters")
    listed = run_json(capsys, "dead", queue_name)
    f.push(3)  # one more failure: every index moves
    wait_for(lambda: len(run_json(capsys, "dead", queue_name)) == 3, what="the third dead letter")
    assert main(["delete-dead", queue_name, "--index", "1", "--task-id", listed[1]["task_id"]]) == 1
    assert "no longer task" in capsys.readouterr().err
    taken = run_json(capsys, "delete-dead", queue_name, "--index", "2", "--task-id", listed[1]["task_id"])
    assert (taken["deleted"], taken["task_id"]) == (1, listed[1]["task_id"])
    assert listed[1]["task_id"] not in [row["task_id"] for row in run_json(capsys, "dead", queue_name)]


def test_a_broker_kind_number_and_an_infinite_qps(queue_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: int) -> None:
        return None

    f.push(1)
    number = str(int(BrokerEnum.PERSISTQUEUE))
    assert run_json(capsys, "status", queue_name, "--broker", number)["depth"] == 1  # "a kind name or number"
    with pytest.raises(SystemExit) as usage:
        main(["qps", queue_name, "inf"])
    assert usage.value.code == 2 and "finite number" in capsys.readouterr().err


def test_unknown_queue_and_unreachable_broker_exit_non_zero(queue_name: str, isolated_settings: Path) -> None:
    env = subprocess_env(isolated_settings)
    done = cli(env, "status", queue_name)
    assert done.returncode == 1
    assert f"queue {queue_name!r} is not known" in done.stderr and "--broker" in done.stderr
    env["FUNBOOST_LIKE_REDIS_URL"] = "redis://127.0.0.1:1/14"  # nothing listens there
    done = cli(env, "status", queue_name, "--broker", "REDIS_ACK_ABLE")
    assert done.returncode == 1 and "unreachable" in done.stderr, done.stderr
    done = cli(env, "pause", queue_name, "--broker", "NO_SUCH_BROKER")
    assert done.returncode == 1 and "unknown broker kind" in done.stderr


def a_queue_beside_a_gone_broker(queue_name: str) -> Any:
    """A PERSISTQUEUE queue holding one message, on a host that used Redis once (unreachable now)."""
    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: int) -> None:
        return None

    f.push(1)
    registry.note_kind(int(BrokerEnum.REDIS_ACK_ABLE))
    patch_frame_config(REDIS_URL="redis://127.0.0.1:1/14")
    return f


def test_a_listing_shows_what_it_can_read_and_names_the_unreachable_broker(
        queue_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    a_queue_beside_a_gone_broker(queue_name)
    assert main(["queues"]) == 1
    out, err = capsys.readouterr()
    assert queue_name in out and "REDIS_ACK_ABLE" in err and "unreachable" in err


def test_timing_lists_the_jobs_of_the_sqlite_job_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from funboost_like.scheduling.timing import FsdfBackgroundScheduler

    patch_frame_config(SCHEDULER_JOB_STORE="sqlite", SCHEDULER_SQLITE_DIR=str(tmp_path / "scheduler"))
    assert run_json(capsys, "timing") == {"store": "sqlite", "jobs": []}  # no file yet: none made either
    assert not (tmp_path / "scheduler").exists()
    scheduler = FsdfBackgroundScheduler()
    scheduler.add_timing_publish_job(timed, "interval", seconds=30, id="every30", kwargs={"n": 1})
    scheduler.start(paused=True)
    scheduler.shutdown()
    [job] = run_json(capsys, "timing")["jobs"]
    assert job["id"] == "every30" and "interval" in job["trigger"] and job["next_run_time"]


def test_a_command_on_a_found_queue_does_not_fail_for_an_unreachable_unrelated_broker(
        queue_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`purge Q --yes` purged Q, then printed the errors of every other broker kind this host once used and
    exited 1, as if it had failed."""
    f = a_queue_beside_a_gone_broker(queue_name)
    assert main(["purge", queue_name, "--yes"]) == 0
    out, err = capsys.readouterr()
    assert "purged" in out and err == ""
    assert f.get_message_count() == 0


def test_status_of_a_found_queue_does_not_wait_for_an_unreachable_unrelated_broker(
        queue_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`status Q` read the consumers of every broker kind this host once used: with one of them down it
    waited out that client's timeout (33 s with a MongoDB gone), printed its error and exited 1."""
    a_queue_beside_a_gone_broker(queue_name)
    assert main(["status", queue_name]) == 0
    out, err = capsys.readouterr()
    assert "depth: 1" in out and err == ""


def test_a_broker_found_down_is_not_asked_again_by_the_same_service(queue_name: str) -> None:
    """A Prometheus scrape lists the queues and then the consumers: each listing asked the gone broker again
    (twice its client's timeout: 66 s with a MongoDB gone), and it counted twice in brokers_unreadable."""
    from funboost_like.observability.prometheus import _queue_rows

    a_queue_beside_a_gone_broker(queue_name)
    rows, _, errors = _queue_rows()
    assert queue_name in [row["queue"] for row in rows]
    assert len(errors) == 1 and errors[0].startswith("REDIS_ACK_ABLE: "), errors


def test_a_listing_names_a_broker_that_does_not_answer_instead_of_waiting_for_it(
        queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a MongoDB this host once used gone, `queues` and `workers` waited out pymongo's 30 s server
    selection before they printed anything; a listing now waits READ_DEADLINE seconds for a registry."""
    from funboost_like.ops import service as service_module

    a_queue_beside_a_gone_broker(queue_name)  # a queue on the embedded broker, listed
    registry.note_kind(int(BrokerEnum.MONGOMQ))
    patch_frame_config(MONGO_URL="mongodb://127.0.0.1:1/funboost_like_gone?serverSelectionTimeoutMS=30000")
    monkeypatch.setattr(service_module, "READ_DEADLINE", 1.0, raising=False)
    service = service_module.OpsService(kinds=[BrokerEnum.PERSISTQUEUE, BrokerEnum.MONGOMQ])
    started = time.monotonic()
    names = service.queue_names()
    assert time.monotonic() - started < 5, "waited for the gone MongoDB"
    assert queue_name in names
    assert service.errors == ["MONGOMQ: no answer within 1 s"], service.errors


class _MeetingStore:
    """A registry store whose reads wait for the other one's (a barrier of two): read one after the other,
    the first read waits in vain."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        self.barrier.wait(timeout=5)
        return {}

    def exists(self, key: str) -> bool:
        return False


def test_the_registries_of_several_brokers_are_read_side_by_side() -> None:
    """They were read one after the other, so a listing with two brokers down took both timeouts (docs/
    operations.md: as long as the slowest broker's client takes to give up once)."""
    from funboost_like.ops.service import OpsService

    barrier = threading.Barrier(2)
    stores = {BrokerEnum.REDIS_ACK_ABLE: _MeetingStore(barrier), BrokerEnum.NATS: _MeetingStore(barrier)}

    class Service(OpsService):
        def store(self, kind: Any) -> Any:
            return stores[kind]

    service = Service(kinds=list(stores))
    assert service.workers() == [] and service.errors == []
    barrier.reset()
    assert service.queue_names() == [] and service.errors == []
