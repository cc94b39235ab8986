"""A consumer process for the contract suite's crash tests (tests/test_broker_contract.py).

    python tests/contract_worker.py QUEUE KIND RECORD_FILE {plain|supervised|hold|settle|standby}

In ``plain`` and ``supervised`` modes its function appends ``s <i> <pid>`` to RECORD_FILE when a call
starts and ``d <i> <pid>`` when it ends (O_APPEND, one write per line); a call with ``poison=True``
kills its process instead (``os._exit``), as a segfault or the OOM killer would. In ``hold`` mode it
takes four messages with the broker's own API, acks the first three, stops fetching, gives the acks half
a second to be written, writes ``held 4`` to RECORD_FILE and kills itself with SIGKILL, holding the
fourth. ``settle`` mode is ``plain`` that also appends ``a <i> <pid>`` to RECORD_FILE.acks once the
broker's ``ack`` or ``dead_letter`` that settled message ``i`` returned (``ack_and_fetch`` is an ``ack``
and then a ``fetch`` there). A call with ``fail=True`` raises (dead-lettered: no retries); one with
``hold=True`` waits until RECORD_FILE.go exists. ``standby`` mode is ``plain`` once RECORD_FILE.start
exists. Settings come from the environment.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from funboost_like import task_deco

queue, kind, record, mode = sys.argv[1:5]


def note(line: str) -> None:
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@task_deco(queue, broker_kind=int(kind), concurrent_num=4, max_retry_times=0)
def work(i: int, seconds: float = 0.0, poison: bool = False, fail: bool = False, hold: bool = False) -> None:
    note(f"s {i} {os.getpid()}\n")
    if poison:
        os._exit(3)
    if fail:
        raise ValueError(f"call {i} fails")
    deadline = time.monotonic() + 60
    while hold and not os.path.exists(record + ".go") and time.monotonic() < deadline:
        time.sleep(0.02)
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


def note_settlements() -> None:
    """Wrap the settling methods of this process's broker: ``a <i> <pid>`` once each has returned."""
    from funboost_like.brokers.registry import get_broker

    broker = get_broker(int(kind))

    def noting(method: Callable[..., Any], first: Callable[..., Sequence[Any]]) -> Callable[..., Any]:
        @functools.wraps(method)
        def settle(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            lines = "".join(f"a {json.loads(d.body)['i']} {os.getpid()}\n" for d in first(*args))
            if lines:
                fd = os.open(record + ".acks", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, lines.encode())
                finally:
                    os.close(fd)
            return result
        return settle

    broker.ack = noting(broker.ack, lambda deliveries, *_: deliveries)  # type: ignore[method-assign]
    fetch = broker.fetch

    def ack_then_fetch(deliveries: Sequence[Any], queue: str, max_n: int, timeout: float) -> Any:
        if deliveries:  # noted as soon as the ack returned, not after the fetch's wait
            broker.ack(deliveries)
        return fetch(queue, max_n, timeout)

    broker.ack_and_fetch = ack_then_fetch  # type: ignore[method-assign]
    broker.dead_letter = noting(broker.dead_letter, lambda delivery, *_: [delivery])  # type: ignore[method-assign]


if __name__ == "__main__":
    if mode == "standby":  # started early (the import is slow); consumes once RECORD_FILE.start exists
        while not os.path.exists(record + ".start"):
            time.sleep(0.01)
        work.consume()
    elif mode == "settle":
        note_settlements()
        work.consume()
    elif mode == "hold":
        hold_then_die()
    elif mode == "supervised":
        work.multi_process_consume(1)
    else:
        work.consume()
