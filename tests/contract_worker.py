"""A consumer process for the contract suite's crash tests (tests/test_broker_contract.py).

    python tests/contract_worker.py QUEUE KIND RECORD_FILE {plain|supervised|hold}

In ``plain`` and ``supervised`` modes its function appends ``s <i> <pid>`` to RECORD_FILE when a
call starts and ``d <i> <pid>`` when it ends (O_APPEND, one write per line); a call with
``poison=True`` kills its process instead (``os._exit``), as a segfault or the OOM killer would. In
``hold`` mode it takes four messages with the broker's own API, acks the first three, stops
fetching, gives the acks half a second to be written, writes ``held 4`` to RECORD_FILE and kills
itself with SIGKILL, holding the fourth. Settings come from the environment.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from funboost_like import task_deco

queue, kind, record, mode = sys.argv[1:5]


def note(line: str) -> None:
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@task_deco(queue, broker_kind=int(kind), concurrent_num=4, max_retry_times=0)
def work(i: int, seconds: float = 0.0, poison: bool = False) -> None:
    note(f"s {i} {os.getpid()}\n")
    if poison:
        os._exit(3)
    time.sleep(seconds)
    note(f"d {i} {os.getpid()}\n")


def hold_then_die() -> None:
    from funboost_like.brokers.registry import get_broker

    broker = get_broker(int(kind))
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        got += broker.fetch(queue, 4 - len(got), 0.5)
    broker.ack(got[:3])
    broker.stop_fetching(queue)
    time.sleep(0.5)  # some clients' I/O threads write the acks (MQTT's PUBACKs): they are out by now
    note(f"held {len(got)}\n")
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if mode == "hold":
        hold_then_die()
    elif mode == "supervised":
        work.multi_process_consume(1)
    else:
        work.consume()
