"""How fast the dashboard's task search answers with a million status records (SQLite status store).

Usage::

    python benchmarks/dashboard_search.py [--records 1000000] [--repeat 20] [--folder DIR]

Builds ``--records`` call records of one queue through the status store's own writer
(``StatusStore.record``: 90% finished, 8% failed with an exception, 2% running; arguments
``{"x": i, "user": "user<i % 1000>"}``; one change every 0.5 s of the past), unless ``DIR`` already
holds them (``--folder`` keeps the folder for the next run). Then starts the dashboard in this
process on a free port, logs in with its token, and times complete HTTP requests (connect, request,
server work, whole answer read) of the task search page and its JSON twin: the first page, the next
one by cursor, a page deep in the records, by state, by a time window, by task id, a text found
often and a text found nowhere (one page of a budget-limited scan), and the task detail page.
Prints the median, the 95th percentile and the worst of ``--repeat`` requests each, in milliseconds.
A measurement, not a test: exit code 0.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

QUEUE = "dashboard_bench_q"


def build(records: int) -> tuple[str, str]:
    """Write the records; return a task id found in the middle and its ``updated_at`` as text."""
    from funboost_like.core import codec
    from funboost_like.core.status_store import StatusEvent, open_status_store

    store = open_status_store(QUEUE)
    rnd = random.Random(1)
    now = time.time()
    middle = ("", "")
    started = time.perf_counter()
    for i in range(records):
        r = rnd.random()
        status = "finished" if r < 0.9 else ("failed" if r < 0.98 else "running")
        at = now - (records - i) * 0.5
        task_id = f"{i:08x}{rnd.getrandbits(64):016x}"
        if i == records // 2:
            middle = (task_id, repr(at))
        store.record(StatusEvent(
            task_id=task_id, queue=QUEUE, status=status, updated_at=at,
            kwargs=codec.dumps({"x": i, "user": f"user{i % 1000}"}).decode(),
            result=str(i) if status == "finished" else None,
            exception=f"ValueError: bad value {i}\nTraceback ..." if status == "failed" else None,
            attempts=1, publish_time=at - 0.01, started_at=at - 0.005, finished_at=at,
            duration=0.005 + rnd.random() * 0.01))
    store.flush(timeout=1200)
    print(f"built {records:,} records in {time.perf_counter() - started:.1f}s")
    return middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--folder", help="keep the records here (reused when they are there)")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="dashboard_bench_"))

    from funboost_like import BrokerEnum, patch_frame_config
    from funboost_like.brokers.registry import get_broker
    from funboost_like.core.status_store import open_status_store
    from funboost_like.ops import registry
    from funboost_like.ops.service import OpsService
    from funboost_like.web.auth import Credentials
    from funboost_like.web.server import make_server, serve_in_thread

    patch_frame_config(STATUS_DB_PATH=str(folder / "status"), SQLITE_QUEUES_PATH=str(folder / "queues"),
                       OPS_REGISTRY=True)
    registry.note_queue(get_broker(BrokerEnum.PERSISTQUEUE), QUEUE)
    marker = folder / "built.json"
    if marker.exists() and json.loads(marker.read_text())["records"] == args.records:
        middle = tuple(json.loads(marker.read_text())["middle"])
        print(f"reusing {args.records:,} records in {folder}")
    else:
        open_status_store(QUEUE).clear()
        middle = build(args.records)
        marker.write_text(json.dumps({"records": args.records, "middle": middle}))
    size = sum(p.stat().st_size for p in (folder / "status").iterdir()) / 1e6
    print(f"status files: {size:.0f} MB")

    server = make_server("127.0.0.1", 0, credentials=Credentials.make(),
                         service=lambda: OpsService(kinds=[BrokerEnum.PERSISTQUEUE]))
    serve_in_thread(server)
    port = server.server_address[1]
    cookie = login(port, str(server.dashboard.credentials.token))

    def get(path: str) -> tuple[float, str]:
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", path, headers={"Cookie": cookie})
        response = conn.getresponse()
        body = response.read().decode()
        conn.close()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}: {body[:300]}")
        return elapsed, body

    first = json.loads(get("/api/tasks?" + urlencode({"queue": QUEUE}))[1])
    newest = first["rows"][0]["updated_at"]
    cases = {
        "page 1 (HTML)": {"queue": QUEUE},
        "page 2 by cursor (HTML)": {"queue": QUEUE, "cursor": first["next"]},
        "page at the middle by cursor (HTML)": {"queue": QUEUE, "cursor": f"{middle[1]}:{args.records // 2}"},
        "state failed (HTML)": {"queue": QUEUE, "state": "failed"},
        "state running (HTML)": {"queue": QUEUE, "state": "running"},
        "time window of one day (HTML)": {"queue": QUEUE, "since": newest - 3 * 86400, "until": newest - 2 * 86400},
        "task id (HTML)": {"queue": QUEUE, "id": middle[0]},
        "text found often: user7 (HTML)": {"queue": QUEUE, "q": "user7"},
        "text found nowhere (HTML, one budget)": {"queue": QUEUE, "q": "no such text"},
        "text found nowhere (JSON, one budget)": {"queue": QUEUE, "q": "no such text", "api": "1"},
        "page 1 (JSON)": {"queue": QUEUE, "api": "1"},
    }
    print(f"{'request':42} {'median':>8} {'p95':>8} {'worst':>8}  rows")
    for name, params in cases.items():
        api = params.pop("api", None)
        path = ("/api/tasks?" if api else "/tasks?") + urlencode(params)
        report(name, [get(path) for _ in range(args.repeat)])
    report("task detail (HTML)", [get(f"/tasks/{middle[0]}?" + urlencode({"queue": QUEUE}))
                                  for _ in range(args.repeat)])
    server.shutdown()
    server.server_close()


def login(port: int, token: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/login", body=urlencode({"secret": token}),
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return str(response.getheader("Set-Cookie")).split(";", 1)[0]


def report(name: str, samples: list[tuple[float, str]]) -> None:
    times = sorted(t for t, _ in samples)
    body = samples[-1][1]
    rows = len(json.loads(body)["rows"]) if body.startswith("{") else max(0, len(re.findall("<tr>", body)) - 1)
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
    print(f"{name:42} {statistics.median(times):8.1f} {p95:8.1f} {times[-1]:8.1f}  {rows}")


if __name__ == "__main__":
    main()
