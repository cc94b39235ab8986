"""``schedule_tasks_on_main_thread=True``: ``consume()`` holds the calling thread until the consumer stops."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from funboost_like import BrokerEnum, ConfigurationError, task_deco

from .conftest import subprocess_env

MEMORY = BrokerEnum.LOCAL_PYTHON_QUEUE


def test_consume_blocks_the_calling_thread_until_the_consumer_stops(queue_name: str) -> None:
    done: list[int] = []

    @task_deco(queue_name, broker_kind=MEMORY, schedule_tasks_on_main_thread=True)
    def f(x: int) -> None:
        done.append(x)

    def stop_when_done() -> None:
        deadline = time.monotonic() + 10
        while len(done) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # consume() must still be blocked here
        returned_early.append(bool(returned))
        f.stop()

    returned_early: list[bool] = []
    returned: list[bool] = []
    f.publish_many([{"x": i} for i in range(50)])
    stopper = threading.Thread(target=stop_when_done)
    stopper.start()
    f.consume()  # returns only once stop_when_done stopped the consumer
    returned.append(True)
    stopper.join(5)
    assert returned_early == [False]
    assert sorted(done) == list(range(50))
    assert not f.consumer.is_running


def test_without_the_flag_consume_returns_at_once(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY)
    def f(x: int) -> None:
        pass

    started = time.monotonic()
    f.consume()
    assert time.monotonic() - started < 1.0 and f.consumer.is_running
    f.stop()


def test_inside_a_running_event_loop_it_refuses_instead_of_blocking_the_loop(queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=MEMORY, schedule_tasks_on_main_thread=True)
    def f(x: int) -> None:
        pass

    async def main() -> None:
        f.consume()

    with pytest.raises(ConfigurationError, match="runs an event loop"):
        asyncio.run(main())
    assert not f.consumer.is_running
    with pytest.raises(ConfigurationError, match="must be True or False"):
        task_deco(queue_name + "_x", broker_kind=MEMORY, schedule_tasks_on_main_thread="yes")


CHILDREN = """
import os, sys, time
from funboost_like import task_deco

@task_deco(sys.argv[1], schedule_tasks_on_main_thread=True, log_level=30)
def job(x):
    with open(sys.argv[2], "a") as f:
        f.write(f"{x}\\n")

if __name__ == "__main__":
    job.publish_many([{"x": i} for i in range(40)])
    supervisor = job.multi_process_consume(2, start_method=sys.argv[3])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(sys.argv[2]) and len(open(sys.argv[2]).read().splitlines()) >= 40:
            break
        time.sleep(0.05)
    supervisor.stop()
    print("STOPPED", supervisor.join(30))
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_children_of_multi_process_consume_consume_and_stop_with_the_flag(isolated_settings: Path, tmp_path: Path,
                                                                           queue_name: str, start_method: str) -> None:
    script = tmp_path / "children.py"
    script.write_text(CHILDREN)
    log = tmp_path / "done.log"
    proc = subprocess.run([sys.executable, str(script), queue_name, str(log), start_method], capture_output=True,
                          text=True, timeout=90, env=subprocess_env(isolated_settings))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "STOPPED True" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert sorted(int(x) for x in log.read_text().split()) == list(range(40))


SIGNALLED = """
{patch}
import sys, time
from funboost_like import BrokerEnum, ConcurrentModeEnum, task_deco

@task_deco(sys.argv[1], broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_mode=ConcurrentModeEnum.{mode},
           schedule_tasks_on_main_thread={held}, log_level=30)
def job(x):
    time.sleep(0.05)

job.push(1)
print("READY", flush=True)
try:
    job.consume()
    while True:  # only without the flag: the script goes on in its own loop
        time.sleep(0.1)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
print("AFTER", flush=True)
"""


@pytest.mark.parametrize("held", [True, False], ids=["held", "own-loop"])
@pytest.mark.parametrize("mode, patch", [("THREADING", ""), ("GEVENT", "from gevent import monkey; monkey.patch_all()"),
                                         ("EVENTLET", "import eventlet; eventlet.monkey_patch()")],
                         ids=["THREADING", "GEVENT", "EVENTLET"])
def test_sigint_raises_keyboard_interrupt_in_the_main_thread_in_every_mode(
        isolated_settings: Path, tmp_path: Path, queue_name: str, mode: str, patch: str, held: bool) -> None:
    """After the graceful stop, SIGINT raises KeyboardInterrupt where the script is, once, and nothing else:
    under gevent it was raised in the stopping greenlet first (a "failed with KeyboardInterrupt" traceback),
    and a consume() held on the main thread returned normally, so the code after it ran."""
    import signal

    if patch:
        pytest.importorskip(mode.lower())
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED.format(patch=patch, mode=mode, held=held))
    proc = subprocess.Popen([sys.executable, "-W", "ignore", str(script), queue_name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(isolated_settings))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        time.sleep(1.0)  # consuming (the flag's consume() is on its way into its wait)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert out.split() == ["INTERRUPTED", "AFTER"], out + err
    assert "Traceback" not in err and "failed with KeyboardInterrupt" not in err, err
