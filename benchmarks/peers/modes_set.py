"""The ``modes`` set of ``run.py``: concurrency modes, funboost_like beside funboost 55.

``python benchmarks/peers/run.py --set modes [--repeat 3] [--modes-scale 1.0]``

For each broker path (ours / funboost's: memory LOCAL_PYTHON_QUEUE / MEMORY_QUEUE, the embedded default
PERSISTQUEUE / SQLITE_QUEUE (persist-queue), Redis REDIS_ACK_ABLE / REDIS_ACK_ABLE), each workload and each
mode (THREADING, GEVENT, EVENTLET, ASYNC, and SINGLE_THREAD on the trivial workload only: one call at a time),
one fresh process per framework runs ``modes_workload.py`` (the same script on both sides; its
docstring says what the clock covers):

* ``trivial``: ``f(x, y): return x + y``, ``concurrent_num=50``: the rate the framework itself allows;
* ``io``: the same after a 10 ms wait (``time.sleep``, cooperative under the monkey patch;
  ``asyncio.sleep`` under ASYNC), ``concurrent_num=200``: what a mode exists for. The ideal time to finish
  N is N x 10 ms / 200; the table gives the time taken beside it.

Ours and funboost alternate process by process, and the whole grid repeats ``--repeat`` times; the table shows
medians. Every run must consume everything: exactly N calls, nothing left in the queue, nothing unacknowledged;
a run that does not is listed under "problems" and left out of the medians.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "modes_workload.py"
REPO_ROOT = HERE.parent.parent
CHILD_TIMEOUT_SECONDS = 300.0

BROKERS = {"memory": "memory: LOCAL_PYTHON_QUEUE / MEMORY_QUEUE",
           "sqlite": "embedded SQLite: PERSISTQUEUE / SQLITE_QUEUE",
           "redis_ack_able": "Redis REDIS_ACK_ABLE / REDIS_ACK_ABLE"}
MODES = ("threading", "gevent", "eventlet", "asyncio", "single_thread")
CONCURRENCY = {"trivial": 50, "io": 200}
IO_SECONDS = 0.01
# N per (broker, work): funboost consumes about 1k/s from SQLite, so its N is small enough for a few seconds.
N = {("memory", "trivial"): 20_000, ("memory", "io"): 10_000,
     ("sqlite", "trivial"): 3_000, ("sqlite", "io"): 3_000,
     ("redis_ack_able", "trivial"): 10_000, ("redis_ack_able", "io"): 10_000}


def _grid(scale: float) -> list[tuple[str, str, str, str, int]]:
    """(framework, broker, work, mode, n) in the order they run within one repetition."""
    runs = []
    for broker in BROKERS:
        for work in CONCURRENCY:
            n = max(100, int(N[broker, work] * scale))
            for mode in MODES if work == "trivial" else MODES[:-1]:  # one call at a time: no 10 ms waits
                runs += [("ours", broker, work, mode, n), ("funboost", broker, work, mode, n)]
    return runs


def _run_one(framework: str, broker: str, work: str, mode: str, n: int, python: str, redis_url: str,
             peer_env: Callable[[str], dict[str, str]]) -> dict:
    import json

    queue = f"{os.environ.get('PEERBENCH_RUN_TAG', 'peerbench')}_modes_{framework}_{broker}_{work}_{mode}"
    with tempfile.TemporaryDirectory(prefix="peerbench_modes_") as tmp:
        if framework == "ours":
            env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), FUNBOOST_LIKE_NO_USER_CONFIG="1")
            exe = sys.executable
        else:
            env, exe = peer_env(tmp), python
        cmd = [exe, "-W", "ignore", str(WORKLOAD), "--framework", framework, "--broker", broker, "--mode", mode,
               "--work", work, "--n", str(n), "--concurrency", str(CONCURRENCY[work]), "--queue", queue,
               "--redis-url", redis_url, "--tmp", tmp]
        try:
            proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {CHILD_TIMEOUT_SECONDS:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("PEER-RESULT "):
            result: dict = json.loads(line[len("PEER-RESULT "):])["results"]["consume"]
            return result
    return {"error": f"exited with {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}"}


def collect(python: str, redis_url: str, repeat: int, scale: float, only: set[str],
            peer_env: Callable[[str], dict[str, str]], cleanup: Callable[[], object]) -> dict:
    """Every run of every repetition: {(framework, broker, work, mode): [result, ...]}."""
    runs: dict[tuple[str, str, str, str], list[dict]] = {}
    grid = [g for g in _grid(scale) if g[0] in only]
    for rep in range(repeat):
        for framework, broker, work, mode, n in grid:
            t = time.monotonic()
            print(f"[{rep + 1}/{repeat}] {framework} {broker} {work} {mode} n={n} ...", end=" ", file=sys.stderr,
                  flush=True)
            result = _run_one(framework, broker, work, mode, n, python, redis_url, peer_env)
            cleanup()
            runs.setdefault((framework, broker, work, mode), []).append(result)
            print(f"{time.monotonic() - t:.1f}s" + (f" ERROR {result['error']}" if "error" in result else ""),
                  file=sys.stderr, flush=True)
    return {"runs": runs, "n": {(b, w): n for _, b, w, _, n in grid}}


def _median(results: list[dict], key: str, problems: list[str], label: str) -> float | None:
    values = []
    for i, r in enumerate(results, 1):
        if "error" in r:
            problems.append(f"{label} run {i}: {r['error']}")
        elif not r.get("ok_check"):
            problems.append(f"{label} run {i}: check failed: {r.get('check')}, unacked {r.get('pending_at_end')}")
        else:
            values.append(r[key])
    return statistics.median(values) if values else None


def report(data: dict) -> list[str]:
    """The table (markdown), then the problems."""
    runs, ns = data["runs"], data["n"]
    problems: list[str] = []
    lines = ["| broker (ours / funboost) | work, N, concurrent_num | mode | ours /s | funboost /s | ours / funboost "
             "| ours s | funboost s | ours stop s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for broker, label in BROKERS.items():
        for work, concurrency in CONCURRENCY.items():
            n = ns.get((broker, work))
            if n is None:
                continue
            what = f"{work}, {n:,}, {concurrency}" + (f" (ideal {n * IO_SECONDS / concurrency:.2f} s)"
                                                      if work == "io" else "")
            for mode in MODES:
                got = {}
                for fw in ("ours", "funboost"):
                    res = runs.get((fw, broker, work, mode), [])
                    tag = f"{fw} {broker} {work} {mode}"
                    got[fw] = (_median(res, "rate", problems, tag), _median(res, "elapsed", [], tag),
                               _median(res, "stop_seconds", [], tag) if fw == "ours" else None)
                if not any(runs.get((fw, broker, work, mode)) for fw in got):
                    continue
                (o_rate, o_s, o_stop), (f_rate, f_s, _) = got["ours"], got["funboost"]
                ratio = f"{o_rate / f_rate:.1f}x" if o_rate and f_rate else "-"
                lines.append(f"| {label} | {what} | {mode} | {_fmt(o_rate)} | {_fmt(f_rate)} | {ratio} "
                             f"| {_fmt_s(o_s)} | {_fmt_s(f_s)} | {_fmt_s(o_stop)} |")
    if problems:
        lines += ["", "problems:", *(f"  - {p}" for p in problems)]
    return lines


def _fmt(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def main(python: str, redis_url: str, repeat: int, scale: float, only: set[str],
         peer_env: Callable[[str], dict[str, str]], cleanup: Callable[[], object], versions: dict) -> None:
    """Run the set and print its report (the date, the load average at the start and at the end, the table)."""
    import datetime

    started = time.monotonic()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    data = collect(python, redis_url, max(1, repeat), scale, only & {"ours", "funboost"}, peer_env, cleanup)
    load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"modes benchmark  date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  "
          f"CPUs {os.cpu_count()}  Redis at {redis_url}  repeat {repeat} (medians)  "
          f"total {time.monotonic() - started:.0f}s")
    print(f"Python {sys.version.split()[0]} (ours)  venv: "
          + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    print(f"load average at start {load_start}, at end {load_end}")
    print()
    print("\n".join(report(data)))
    print()
    print("rate: N / the time from consume() until N calls ran and nothing was left unacknowledged (the s columns: "
          "that time, medians); io: a 10 ms wait per call (time.sleep, asyncio.sleep under asyncio). ours stop s: "
          "stop() and join() after the run (funboost has no stop).")
