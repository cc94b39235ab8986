"""Status and result persistence (``function_result_status_persistance_conf``) on the default broker.

Publishes 200 calls, of which a few fail and one is slow, consumes them, then prints the counts by
status and a few records. Run it from the repository root::

    python test_frame/test_status/demo.py

The records go to ``<STATUS_DB_PATH>/status_demo.sqlite3`` (by default in the per-user data folder);
the script prints the path. Nothing else is written.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from funboost_like import FunctionResultStatusPersistanceConfig, task_deco  # noqa: E402
from funboost_like.core.status_store import FAILED, FINISHED, open_status_store  # noqa: E402

TOTAL = 200


@task_deco("status_demo", concurrent_num=20, max_retry_times=1, log_level=logging.WARNING,
           is_print_detail_exception=False,
           function_result_status_persistance_conf=FunctionResultStatusPersistanceConfig(
               is_save_status=True, is_save_result=True, expire_seconds=3600))
def divide(a: int, b: int) -> float:
    if a == 7:
        time.sleep(0.5)  # one slow call, to see it as "running" below
    return a / b  # b == 0 fails (ZeroDivisionError), after one retry


def main() -> int:
    store = open_status_store("status_demo")
    divide.clear()
    store.clear()
    print(f"records kept in {store.path}")

    ids = [divide.push(i, b=0 if i % 50 == 3 else 2).task_id for i in range(TOTAL)]
    print("after publishing:", {k: v for k, v in store.counts_by_status().items() if v})

    divide.consume()
    time.sleep(0.2)
    print("while consuming: ", {k: v for k, v in store.counts_by_status().items() if v})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counts = store.counts_by_status()
        if counts[FINISHED] + counts[FAILED] == TOTAL:
            break
        time.sleep(0.1)
    divide.stop()
    divide.consumer.join(30)
    print("after consuming:  ", {k: v for k, v in store.counts_by_status().items() if v})

    print("\nthe slow call:")
    slow = store.get(ids[7])
    if slow is not None:
        print(f"  {slow.task_id} {slow.status} kwargs={slow.kwargs} result={slow.result} "
              f"duration={slow.duration:.3f}s host={slow.host} pid={slow.pid}")
    print("the failures:")
    for record in store.query(status=FAILED, newest_first=False):
        print(f"  {record.task_id} kwargs={record.kwargs} attempts={record.attempts} "
              f"exception={record.exception.splitlines()[0] if record.exception else None}")
    print("the three latest to finish:")
    for record in store.query(status=FINISHED, limit=3):
        print(f"  {record.task_id} kwargs={record.kwargs} result={record.result} "
              f"published {time.strftime('%H:%M:%S', time.localtime(record.publish_time or 0))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
