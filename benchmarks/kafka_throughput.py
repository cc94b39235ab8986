"""Publish and consume throughput of the Kafka kinds on the stand-ins (DESIGN.md §11, issue 14).

Usage::

    python benchmarks/kafka_throughput.py [--kinds KAFKA,CONFLUENT_KAFKA] [--servers tansu,mock] [--n N]

Each (kind, server) runs in a fresh subprocess, with ``def f(x, y): return x + y``,
``concurrent_num=50``, ``KAFKA_PARTITIONS=4``, ``KAFKA_SESSION_TIMEOUT_SECONDS=3`` (Tansu's first
join of a group then takes 1.5 s; the mock cluster's 0.6 s, see tests/kafka_server.py):

* ``publish bulk``: ``f.publish_many(chunk)`` over N messages in chunks of 10,000 dicts (built before
  the clock starts; each chunk returns once the server acknowledged all of it); rate = N / elapsed.
* ``consume (committed)``: N messages published first (not timed); the clock runs from the first
  call until the function ran N times *and* the group's committed offsets reached the end of every
  partition (everything acked and committed); rate = N / elapsed. ``join`` is the time from
  ``f.consume()`` to the first call (the group join), reported apart.

Servers: Tansu on 127.0.0.1:9092 and the mock cluster on 127.0.0.1:9192 (``python tests/kafka_server.py
{tansu|mock} --background LOG`` starts them). A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVERS = {"tansu": "127.0.0.1:9092", "mock": "127.0.0.1:9192"}
TARGETS = {"publish bulk": 50_000, "consume (committed)": 30_000}
CHUNK = 10_000


def child(kind: str, server: str, n: int) -> dict[str, object]:
    sys.path.insert(0, str(REPO_ROOT))
    from funboost_like import patch_frame_config, task_deco
    from funboost_like.brokers.kafka_client import log_ends

    patch_frame_config(KAFKA_BOOTSTRAP_SERVERS=SERVERS[server], KAFKA_PARTITIONS=4, KAFKA_SESSION_TIMEOUT_SECONDS=3.0,
                       KAFKA_API_VERSION="2.0" if server == "mock" and kind == "KAFKA" else "", OPS_REGISTRY=False)
    queue = f"bench_{uuid.uuid4().hex[:10]}"
    calls, first, done = [0], [0.0], threading.Event()
    lock = threading.Lock()

    @task_deco(queue, broker_kind=kind, concurrent_num=50, log_level=30)
    def f(x: int, y: int) -> int:
        with lock:
            calls[0] += 1
            if calls[0] == 1:
                first[0] = time.perf_counter()
            if calls[0] == n:
                done.set()
        return x + y

    chunks = [[{"x": i, "y": i} for i in range(s, min(n, s + CHUNK))] for s in range(0, n, CHUNK)]
    f.get_message_count()  # creates the topics (not timed)
    t0 = time.perf_counter()
    for chunk in chunks:
        f.publish_many(chunk)
    publish = time.perf_counter() - t0
    del chunks  # the consume below runs without the 100,000s of dicts published (as benchmarks/throughput.py)
    gc.collect()
    queued = f.get_message_count()

    broker = f.broker
    client = broker._client  # type: ignore[attr-defined]
    group = f"funboost_like.{queue}"
    ends = {p: high for p, (_, high) in log_ends(client, queue).items() if high > 0}
    started = time.perf_counter()
    f.consume()
    finished = done.wait(300)
    committed: dict[int, int] = {}
    while finished and committed != ends:
        committed = client.group_offsets(group, queue, list(ends))
        if time.perf_counter() - started > 330:
            finished = False
        time.sleep(0.002)
    end = time.perf_counter()
    f.stop()
    return {"kind": kind, "server": server, "n": n, "queued": queued, "calls": calls[0], "ends": ends,
            "committed": committed,
            "publish bulk": n / publish, "join": first[0] - started,
            "consume (committed)": n / (end - first[0]) if finished else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="KAFKA,CONFLUENT_KAFKA")
    parser.add_argument("--servers", default="tansu,mock")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.n)))
        return
    env = {**os.environ, "FUNBOOST_LIKE_NO_USER_CONFIG": "1"}
    for kind in args.kinds.split(","):
        for server in args.servers.split(","):
            done = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--child", kind, server],
                                  capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                print(f"{kind} on {server}: failed\n{done.stderr[-2000:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rates = ", ".join(f"{name} {result[name]:,.0f}/s (target {target:,})" for name, target in TARGETS.items())
            print(f"{kind:16} {server:6} n={args.n:,}: {rates}; join {result['join']:.2f}s; "
                  f"{result['calls']:,} calls, {result['queued']:,} queued", flush=True)
            if result["committed"] != result["ends"]:
                print(f"  not all committed: ends {result['ends']}, committed {result['committed']}", flush=True)


if __name__ == "__main__":
    main()
