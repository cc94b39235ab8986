"""Prometheus metrics: nothing while off; totals, histograms and queue gauges summed over processes; the
endpoints (the `funboost_like metrics` verb, a worker's METRICS_PORT) on the loopback address."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, patch_frame_config, task_deco
from funboost_like.ops.service import OpsService
from tests.conftest import in_forked_child, subprocess_env

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from funboost_like.observability import metrics, prometheus  # noqa: E402

from .standin import free_port  # noqa: E402

ALLOWED_LABELS = {"queue", "broker", "outcome", "le"}


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a scrape: (name, sorted labels) -> value; also checks that labels are low-cardinality."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_nothing_is_imported_started_or_written_while_off(tmp_path: Path, isolated_settings: Path) -> None:
    script = textwrap.dedent("""
        import logging, sys, threading, time
        import funboost_like
        from funboost_like import BrokerEnum, task_deco
        assert "prometheus_client" not in sys.modules and "opentelemetry" not in sys.modules
        @task_deco("metrics_off", broker_kind=BrokerEnum.MEMORY, log_level=logging.WARNING)
        def f(x):
            return x
        f.push(1)
        f.consume()
        while sum(f.consumer.stats.counts) < 1:
            time.sleep(0.01)
        names = [type(m).__name__ for m in f.consumer.middlewares]
        threads = [t.name for t in threading.enumerate()]
        print("prometheus_client" in sys.modules, "opentelemetry" in sys.modules, "MetricsMiddleware" in names,
              "funboost_like-metrics" in threads)
        f.consumer.stop()
    """)
    folder = tmp_path / "metrics"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=subprocess_env(isolated_settings, FUNBOOST_LIKE_METRICS_DIR=str(folder)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "False", "False"]
    assert not folder.exists()


_WORKER = textwrap.dedent("""
    import logging, sys, time
    from funboost_like import BrokerEnum, task_deco

    @task_deco(sys.argv[1], broker_kind=BrokerEnum.PERSISTQUEUE, log_level=logging.CRITICAL, max_retry_times=0)
    def f(x):
        if x == "fail":
            raise ValueError("fails")
        time.sleep(0.02)

    f.consume()
    while sum(f.consumer.stats.counts) < int(sys.argv[2]):
        time.sleep(0.01)
    f.consumer.stop()
    f.consumer.join(10)
""")  # the snapshot is written at exit


@pytest.mark.ops_registry
def test_numbers_of_two_processes_are_summed(queue_name: str, tmp_path: Path, isolated_settings: Path) -> None:
    folder = tmp_path / "metrics"
    patch_frame_config(METRICS=True, METRICS_DIR=str(folder), OPS_HEARTBEAT_SECONDS=0.2)

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: str) -> None:
        return None

    task_ids = [f.push(f"secret-{i}").task_id for i in range(4)] + f.publish_many([{"x": "fail"}, {"x": "ok"}])
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = subprocess_env(isolated_settings, FUNBOOST_LIKE_METRICS="1", FUNBOOST_LIKE_METRICS_DIR=str(folder))
    done = subprocess.run([sys.executable, str(script), queue_name, "6"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr

    body, content_type = prometheus.render_metrics()
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert not any(task_id in text for task_id in task_ids) and "secret" not in text
    samples = scrape(text)
    assert value(samples, "funboost_like_published_total", queue=queue_name) == 6  # this process
    finished = {outcome: value(samples, "funboost_like_finished_total", queue=queue_name, outcome=outcome)
                for outcome in ("succeeded", "failed", "requeued", "dead_lettered", "skipped", "released")}
    assert finished == {"succeeded": 5, "failed": 1, "requeued": 0, "dead_lettered": 0, "skipped": 0,
                        "released": 0}  # the child's file
    assert value(samples, "funboost_like_run_seconds_count", queue=queue_name) == 6
    assert value(samples, "funboost_like_run_seconds_bucket", queue=queue_name, le="0.01") == 1  # the failed call
    assert value(samples, "funboost_like_run_seconds_bucket", queue=queue_name, le="1.0") == 6
    assert 5 * 0.02 <= value(samples, "funboost_like_run_seconds_sum", queue=queue_name) < 3
    assert value(samples, "funboost_like_wait_seconds_count", queue=queue_name) == 6
    gauges = {"broker": "PERSISTQUEUE", "queue": queue_name}
    assert value(samples, "funboost_like_queue_depth", **gauges) == 0
    assert value(samples, "funboost_like_queue_oldest_message_age_seconds", **gauges) == 0
    assert value(samples, "funboost_like_queue_paused", **gauges) == 0
    assert value(samples, "funboost_like_queue_consumers", **gauges) == 0  # the child stopped cleanly

    service = OpsService()
    service.pause(queue_name)
    service.set_qps(queue_name, 3)
    f.push("waits")
    samples = scrape(prometheus.render_metrics()[0].decode())
    assert value(samples, "funboost_like_queue_paused", **gauges) == 1
    assert value(samples, "funboost_like_queue_qps_limit", **gauges) == 3
    assert value(samples, "funboost_like_queue_depth", **gauges) == 1
    age = value(samples, "funboost_like_queue_oldest_message_age_seconds", **gauges)
    assert age is not None and 0 <= age < 30  # from the last message the child started
    assert value(samples, "funboost_like_published_total", queue=queue_name) == 7
    assert len(list(folder.glob("*.json"))) == 2  # one file per process, never shared


def test_the_cli_and_a_worker_serve_on_the_loopback_address(queue_name: str, tmp_path: Path,
                                                            isolated_settings: Path,
                                                            children: list[subprocess.Popen[bytes]]) -> None:
    folder = tmp_path / "metrics"
    port = free_port()
    patch_frame_config(METRICS=True, METRICS_DIR=str(folder), METRICS_PORT=port)

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: int) -> None:
        return None

    f.push(1)
    f.consume()  # starts the worker's endpoint (METRICS_PORT)
    deadline = time.monotonic() + 10
    while sum(f.consumer.stats.counts) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    worker_scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert value(scrape(worker_scrape), "funboost_like_finished_total", queue=queue_name, outcome="succeeded") == 1

    cli_port = free_port()
    env = subprocess_env(isolated_settings, FUNBOOST_LIKE_METRICS_DIR=str(folder))
    child = subprocess.Popen([sys.executable, "-m", "funboost_like", "metrics", "--port", str(cli_port)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children.append(child)
    assert child.stdout is not None
    line = child.stdout.readline().decode()
    assert f"http://127.0.0.1:{cli_port}/metrics" in line, child.stderr.read() if child.poll() is not None else line
    cli_scrape = urllib.request.urlopen(f"http://127.0.0.1:{cli_port}/metrics", timeout=10).read().decode()
    samples = scrape(cli_scrape)
    assert value(samples, "funboost_like_published_total", queue=queue_name) == 1
    assert value(samples, "funboost_like_run_seconds_count", queue=queue_name) == 1

    once = subprocess.run([sys.executable, "-m", "funboost_like", "metrics", "--once"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert once.returncode == 0 and f'funboost_like_published_total{{queue="{queue_name}"}} 1.0' in once.stdout
    busy = subprocess.run([sys.executable, "-m", "funboost_like", "metrics", "--port", str(cli_port)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1 and "error" in busy.stderr  # the port is taken: a clear error, not a traceback
    prometheus.stop_worker_endpoint()


def test_a_forked_child_counts_from_zero_in_a_file_of_its_own(queue_name: str, tmp_path: Path) -> None:
    patch_frame_config(METRICS=True, METRICS_DIR=str(tmp_path / "metrics"))

    @task_deco(queue_name, broker_kind=BrokerEnum.MEMORY)
    def f(x: int) -> None:
        return None

    f.publish_many([{"x": 1}, {"x": 2}])
    parent_file = metrics.writer.name

    def child() -> str:
        f.push(3)
        return json.dumps([metrics.numbers_for(queue_name).snapshot()["published"], metrics.writer.name])

    published, child_file = json.loads(in_forked_child(child))
    assert published == 1 and child_file != parent_file
    assert metrics.numbers_for(queue_name).snapshot()["published"] == 2


def test_wait_time_runs_from_the_due_moment_to_the_first_run(queue_name: str, tmp_path: Path) -> None:
    """Messages due 2 s ago wait about 2 s, a countdown of 0.3 s waits about nothing after it is due, and a
    call that sleeps does not add its run time to its wait (the start of the first run ends the wait)."""
    patch_frame_config(METRICS=True, METRICS_DIR=str(tmp_path / "metrics"))
    ran = []

    @task_deco(queue_name, broker_kind=BrokerEnum.MEMORY, concurrent_num=4)
    def f(x: int) -> None:
        time.sleep(0.2)
        ran.append(x)

    late = time.time() - 2.0
    f.publish_many([{"x": i, "extra": {"publish_time": late}} for i in range(3)])
    f.publish({"x": 3}, priority_control_config=PriorityConsumingControlConfig(countdown=0.3))
    f.consume()
    deadline = time.monotonic() + 20
    while len(ran) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    f.consumer.stop()
    assert sorted(ran) == [0, 1, 2, 3]
    snapshot = metrics.numbers_for(queue_name).snapshot()
    waits = dict(zip((*metrics.WAIT_BUCKETS, "inf"), snapshot["wait"], strict=True))
    assert sum(waits.values()) == 4
    assert waits[5.0] == 3, waits  # 2 s late: in (1, 5]
    assert sum(waits[bound] for bound in metrics.WAIT_BUCKETS if bound <= 0.5) == 1, waits  # the countdown, when due
    assert 3 * 2.0 <= snapshot["wait_sum"] < 3 * 2.0 + 2.0, snapshot
    assert 4 * 0.2 <= snapshot["run_sum"] < 4 * 0.2 + 1.0, snapshot


@pytest.mark.ops_registry
def test_oldest_message_age_is_read_from_the_broker_with_no_consumer_running(queue_name: str, tmp_path: Path,
                                                                           isolated_settings: Path) -> None:
    """The queue that backs up because no worker runs is the one the gauge must show: read from the broker."""
    patch_frame_config(METRICS=True, METRICS_DIR=str(tmp_path / "metrics"))

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE)
    def f(x: int) -> None:
        return None

    f.publish_many([{"x": 1, "extra": {"publish_time": time.time() - 100}}, {"x": 2}])
    gauges = {"broker": "PERSISTQUEUE", "queue": queue_name}
    samples = scrape(prometheus.render_metrics()[0].decode())
    assert value(samples, "funboost_like_queue_depth", **gauges) == 2
    age = value(samples, "funboost_like_queue_oldest_message_age_seconds", **gauges)
    assert age is not None and 100 <= age < 130, age
    assert OpsService().status(queue_name)["oldest_waiting_seconds"] >= 100
    f.clear()
    samples = scrape(prometheus.render_metrics()[0].decode())
    assert value(samples, "funboost_like_queue_oldest_message_age_seconds", **gauges) == 0


def test_drained_observations_land_in_their_buckets_and_a_negative_wait_counts_as_zero() -> None:
    """Bucketing in bulk: a value on a bound is in that bucket ("le"), values past the last bound are in
    +Inf, run times all in the first bucket take the shortcut, and a negative wait (two hosts' clocks
    disagree) counts as 0 in both its bucket and the sum."""
    numbers = metrics.QueueNumbers("drain-test")
    for duration in (0.0001, 0.0002, 0.0005):
        numbers.runs.append(duration)
    numbers.drain()
    assert numbers.run.counts[0] == 3 and sum(numbers.run.counts) == 3
    assert numbers.run.total == pytest.approx(0.0008)
    for wait in (-3.0, 0.001, 0.002, 5.0, 100_000.0, -0.5):
        numbers.waits.append(wait)
    for duration in (0.0005, 0.7, 400.0):
        numbers.runs.append(duration)
    numbers.drain()
    assert numbers.runs == [] and numbers.waits == []
    waits = dict(zip((*metrics.WAIT_BUCKETS, "inf"), numbers.wait.counts, strict=True))
    assert waits[0.001] == 3 and waits[0.01] == 1 and waits[5.0] == 1 and waits["inf"] == 1, waits
    assert numbers.wait.total == pytest.approx(0.001 + 0.002 + 5.0 + 100_000.0)
    runs = dict(zip((*metrics.RUN_BUCKETS, "inf"), numbers.run.counts, strict=True))
    assert runs[0.0005] == 4 and runs[1.0] == 1 and runs["inf"] == 1, runs
    assert numbers.run.total == pytest.approx(0.0008 + 0.0005 + 0.7 + 400.0)
