"""What the MQTT kind loses or repeats when a consumer or the server dies (docs/mqtt.md, docs/guarantees.md).

    python benchmarks/mqtt_recovery.py [--n 2000] [--seconds 0.01] [--kills 3]

Runs on a private Mosquitto (127.0.0.1:18832, persistence on in a temporary folder with Mosquitto's
default autosave interval of 1800 s, ``max_queued_messages 0``), started and stopped here by its PID.
N calls ``{"i": i, "seconds": S}`` are published, then two consumer processes run them
(``tests/contract_worker.py``: ``concurrent_num=4``, each call appends ``s i pid`` when it starts and
``d i pid`` when it ends to a record file). Three scenarios, each on a fresh queue:

* ``consumer kills``: every 1.5 s one consumer is killed with SIGKILL and a new one started (``--kills``);
* ``server restart``: once a tenth of the calls ran, Mosquitto is stopped with SIGTERM (it saves its
  database) and started again;
* ``server kill``: once a tenth of the calls ran, Mosquitto is killed with SIGKILL and started again (it
  reloads its last save).

For each: lost = calls that never finished (once every call finished, or none did for 60 s),
repeated = calls started more than once. A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:0] = [str(REPO_ROOT), str(HERE)]

import mqtt_server  # noqa: E402 - benchmarks/mqtt_server.py

URL = "mqtt://127.0.0.1:18832"
WORKER = REPO_ROOT / "tests" / "contract_worker.py"
STALL_SECONDS = 60.0  # a scenario ends when every call finished, or none finished for this long


def records(path: Path) -> tuple[collections.Counter[int], set[int]]:
    started: collections.Counter[int] = collections.Counter()
    done: set[int] = set()
    if path.exists():
        for line in path.read_text().splitlines():
            kind, ident, _ = line.split()
            if kind == "s":
                started[int(ident)] += 1
            else:
                done.add(int(ident))
    return started, done


def scenario(name: str, n: int, seconds: float, kills: int, data: Path, work: Path) -> dict:
    from funboost_like.brokers.mqtt_broker import MqttBroker
    from funboost_like.core.config import patch_frame_config

    patch_frame_config(MQTT_URL=URL)
    queue, record = f"bench_recovery_{uuid.uuid4().hex[:8]}", work / f"{name.replace(' ', '_')}.record"
    env = dict(os.environ, FUNBOOST_LIKE_MQTT_URL=URL, FUNBOOST_LIKE_NO_USER_CONFIG="1",
               FUNBOOST_LIKE_OPS_REGISTRY="0", FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS="2",
               PYTHONPATH=str(REPO_ROOT), FUNBOOST_LIKE_SQLITE_QUEUES_PATH=str(work / "sqlite"))
    server = mqtt_server.ensure(URL, data)
    broker = MqttBroker()
    broker.publish_many(queue, [json.dumps({"i": i, "seconds": seconds}).encode() for i in range(n)])
    broker.close()

    def start() -> subprocess.Popen[bytes]:
        with open(work / f"{queue}.log", "ab") as log:
            return subprocess.Popen([sys.executable, str(WORKER), queue, "17", str(record), "plain"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, cwd=work)

    workers = [start(), start()]
    events = []
    try:
        if name == "consumer kills":
            for k in range(kills):
                time.sleep(1.5)
                victim = workers[k % 2]
                victim.kill()
                victim.wait()
                workers[k % 2] = start()
                events.append(f"killed consumer pid {victim.pid} with {len(records(record)[1])} calls done")
        else:
            deadline = time.monotonic() + 30
            while len(records(record)[1]) < n // 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            events.append(f"{len(records(record)[1])} calls done when the server was "
                          f"{'stopped (SIGTERM)' if name == 'server restart' else 'killed (SIGKILL)'}")
            if name == "server restart":
                mqtt_server.stop(server)
            else:
                assert server is not None
                server.kill()
                server.wait()
            server = mqtt_server.ensure(URL, data)
        done, last_progress = 0, time.monotonic()
        while done < n and time.monotonic() - last_progress < STALL_SECONDS:
            time.sleep(0.2)
            if len(records(record)[1]) > done:
                done, last_progress = len(records(record)[1]), time.monotonic()
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
        mqtt_server.stop(server)
    started, done = records(record)
    return {"scenario": name, "n": n, "lost": n - len(done), "repeated": sum(1 for c in started.values() if c > 1),
            "runs": sum(started.values()), "events": events}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=0.01, help="how long each call sleeps")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="keep the consumers' logs and records in DIR (must not exist)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="funboost_like_mqtt_recovery_") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(exist_ok=bool(not args.keep))
        data = work / "mosquitto-data"
        data.mkdir()
        for name in ("consumer kills", "server restart", "server kill"):
            result = scenario(name, args.n, args.seconds, args.kills, data, work)
            print(f"{result['scenario']:15}  n {result['n']}  lost {result['lost']}  repeated {result['repeated']}  "
                  f"runs {result['runs']}  ({'; '.join(result['events'])})", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    sys.exit(0)
