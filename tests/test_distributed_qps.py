"""Distributed QPS control: the total start rate of every consumer process equals qps, as they come and go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from funboost_like import task_deco
from funboost_like.core.config import patch_frame_config

from .conftest import require_server, subprocess_env

REDIS_URL = "redis://127.0.0.1:6379/13"

WORKER = """
import os, sys, time
from funboost_like import task_deco

log = sys.argv[2]

@task_deco(sys.argv[1], qps=float(sys.argv[3]), is_using_distributed_frequency_control=True, concurrent_num=20,
           log_level=30)
def job(x):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{time.time():.6f} {os.getpid()}\\n".encode())
    os.close(fd)
    time.sleep(0.05)

job.consume()
"""


def starts_between(log: Path, t0: float, t1: float) -> list[float]:
    times = [float(line.split()[0]) for line in log.read_text().splitlines() if line.strip()]
    return [t for t in times if t0 <= t < t1]


@pytest.mark.timeout(90)
def test_total_rate_holds_as_processes_join_and_leave(isolated_settings: Path, tmp_path: Path,
                                                      queue_name: str) -> None:
    require_server("Redis", "127.0.0.1", 6379)
    patch_frame_config(REDIS_URL=REDIS_URL)
    qps = 20.0

    @task_deco(queue_name)
    def job(x: int) -> None:
        pass

    job.publish_many([{"x": i} for i in range(3000)])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = tmp_path / "starts.log"
    env = subprocess_env(isolated_settings, FUNBOOST_LIKE_REDIS_URL=REDIS_URL)

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, str(script), queue_name, str(log), str(qps)], env=env)

    procs = [start(), start(), start()]
    try:
        time.sleep(2.0)  # start-up
        t0 = time.time()
        time.sleep(5.0)
        three = len(starts_between(log, t0, t0 + 5.0)) / 5.0
        os.kill(procs[0].pid, signal.SIGKILL)  # one leaves
        procs[0].wait(10)
        t1 = time.time()
        time.sleep(5.0)
        two = len(starts_between(log, t1, t1 + 5.0)) / 5.0
        procs.append(start())  # one joins
        time.sleep(2.0)
        t2 = time.time()
        time.sleep(5.0)
        three_again = len(starts_between(log, t2, t2 + 5.0)) / 5.0
        pids = {line.split()[1] for line in log.read_text().splitlines()}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"total start rate: 3 processes {three:.2f}/s, after a kill {two:.2f}/s, after a join {three_again:.2f}/s")
    for rate in (three, two, three_again):
        assert abs(rate - qps) <= qps * 0.05 + 0.2, (three, two, three_again)  # within 5% (+1 start per 5 s)
    assert len(pids) == 4  # every process took part
