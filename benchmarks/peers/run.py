"""funboost_like beside funboost 55 and Celery 5.7: same machine, same Redis, same run.

Usage (from the repository root, with the project's Python)::

    python benchmarks/peers/run.py [--venv /tmp/peers] [--redis-url redis://127.0.0.1:6379/13]
                                   [--repeat 3] [--only ours,funboost,celery] [--json]

funboost and Celery are never imported here and are not dependencies of the project: they live in a
scratch virtualenv (``--venv``, see ``benchmarks/peers/README.md``) whose Python runs the two small
workload scripts next to this file, ``funboost_bench.py`` and ``celery_bench.py``. Our own figures come
from ``benchmarks/throughput.py --repeat 1 --json`` run once per repetition with
``FUNBOOST_LIKE_BENCH_REDIS_URL`` set to the same Redis database. The three frameworks alternate in
every repetition, so load from elsewhere does not hit only one of them; the report gives the median of
the repetitions.

The same workload everywhere: ``f(x, y): return x + y``, 50 threads, one consumer process, N messages
published one by one (timed), then consumed (timed from starting the consumer until N calls ran and,
where the broker acks and its pending state can be read, until nothing is left unacknowledged).
Bulk publishing where the framework has it (ours: ``publish_many``; Celery: ``group().apply_async()``;
funboost has none). Details of each peer measurement are in the docstrings of the two scripts.

Every Redis key the peers create is deleted afterwards: keys whose name contains ``peerbench`` (all
peer queues, Celery runs with the key prefix ``peerbench_celery:``) and funboost's global bookkeeping
keys (``funboost_*``) that did not exist before the run. ``throughput.py`` deletes its own keys.

A measurement, not a test: the exit code is always 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
THROUGHPUT = REPO_ROOT / "benchmarks" / "throughput.py"
FUNBOOST_HOME = HERE / "funboost_home"
CHILD_TIMEOUT_SECONDS = 300.0

OURS_BROKERS = ["memory", "sqlite", "redis_list", "redis_ack_able", "redis_brpoplpush", "redis_stream"]
OURS_LABEL = {"memory": "memory (LOCAL_PYTHON_QUEUE)", "sqlite": "SQLite (PERSISTQUEUE)",
              "redis_list": "Redis list (REDIS)", "redis_ack_able": "Redis REDIS_ACK_ABLE",
              "redis_brpoplpush": "Redis RedisBrpopLpush", "redis_stream": "Redis REDIS_STREAM"}
OURS_PATHS = {"publish": "publish one-by-one", "bulk": "publish bulk", "consume": "consume (acked)"}


class Peer:
    """One peer workload: a row of the table, the script and arguments that measure it."""

    def __init__(self, key: str, framework: str, label: str, script: str, args: list[str], n: int,
                 match: str | None, paths: tuple[str, ...] = ("publish", "consume")) -> None:
        self.key, self.framework, self.label, self.script = key, framework, label, script
        self.args, self.n, self.match, self.paths = args, n, match, paths


def _peers(redis_url: str) -> list[Peer]:
    def fb(broker: str, n: int, match: str, label: str, key: str | None = None, exclusive: dict | None = None,
           paths: tuple[str, ...] = ("publish", "consume")) -> Peer:
        args = ["--broker", broker, "--n", str(n), "--paths", ",".join(paths)]
        if exclusive:
            args += ["--exclusive", json.dumps(exclusive), "--queue", f"peerbench_funboost_{(key or broker).lower()}"]
        return Peer(key or broker, "funboost", label, "funboost_bench.py", args, n, match, paths)

    def cel(acks_late: int, paths: tuple[str, ...], match: str) -> Peer:
        args = ["--redis-url", redis_url, "--n", "5000", "--acks-late", str(acks_late), "--paths", ",".join(paths)]
        return Peer(f"celery_acks_late_{acks_late}", "Celery", f"Redis, acks_late={bool(acks_late)}",
                    "celery_bench.py", args, 5000, match, paths)

    return [
        fb("MEMORY_QUEUE", 50_000, "memory", "memory (MEMORY_QUEUE)"),
        fb("FASTEST_MEM_QUEUE", 50_000, "memory", "memory (FASTEST_MEM_QUEUE)"),
        fb("SQLITE_QUEUE", 5_000, "sqlite", "SQLite (SQLITE_QUEUE = persistqueue)"),
        fb("REDIS", 50_000, "redis_list", "Redis list (REDIS)"),
        fb("REDIS", 10_000, "redis_list", "Redis list (REDIS, redis_bulk_push=0)", key="REDIS_NOBULK",
           exclusive={"redis_bulk_push": 0}, paths=("publish",)),
        fb("REDIS_ACK_ABLE", 15_000, "redis_ack_able", "Redis REDIS_ACK_ABLE"),
        fb("REDIS_BRPOP_LPUSH", 15_000, "redis_brpoplpush", "Redis RedisBrpopLpush"),
        fb("REDIS_STREAM", 15_000, "redis_stream", "Redis REDIS_STREAM"),
        cel(0, ("publish", "bulk", "consume"), "redis_list"),
        cel(1, ("publish", "consume"), "redis_ack_able"),
    ]


# ---------------------------------------------------------------------------------------------
# Redis bookkeeping (redis-py of the project's environment)
# ---------------------------------------------------------------------------------------------

def _redis(url: str):
    import redis

    return redis.Redis.from_url(url)


def _peer_keys(client) -> set[bytes]:
    keys = set(client.scan_iter(match="*peerbench*", count=1000))
    keys.update(client.scan_iter(match="funboost_*", count=1000))
    return keys


def _cleanup(client, keys_before: set[bytes]) -> int:
    """Delete the peers' keys: every ``*peerbench*`` key and ``funboost_*`` keys created since the start."""
    doomed = [k for k in _peer_keys(client) if b"peerbench" in k or k not in keys_before]
    for i in range(0, len(doomed), 500):
        client.delete(*doomed[i:i + 500])
    return len(doomed)


# ---------------------------------------------------------------------------------------------
# running the workloads
# ---------------------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict[str, str], cwd: str, marker: str) -> dict:
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_SECONDS:.0f}s"}
    out = proc.stdout
    if marker.startswith("PEER-RESULT"):
        for line in out.splitlines():
            if line.startswith(marker):
                return json.loads(line[len(marker):])
    else:  # throughput.py --json: the text report, a blank line, then one indented JSON document
        start = out.find("\n{\n")
        if start >= 0:
            return json.loads(out[start + 1:])
    return {"error": f"exited with {proc.returncode}: {(proc.stderr or out).strip()[-1500:]}"}


def run_peer(peer: Peer, python: str, redis_url: str) -> dict:
    u = urlparse(redis_url)
    with tempfile.TemporaryDirectory(prefix=f"peerbench_{peer.key.lower()}_") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update({
            "PYTHONPATH": str(FUNBOOST_HOME),  # funboost_config.py / nb_log_config.py; nothing written to the repo
            "PEERBENCH_TMP": tmp, "LOG_PATH": os.path.join(tmp, "logs"), "PYTHONDONTWRITEBYTECODE": "1",
            "PEERBENCH_REDIS_HOST": u.hostname or "127.0.0.1", "PEERBENCH_REDIS_PORT": str(u.port or 6379),
            "PEERBENCH_REDIS_DB": (u.path or "/0").lstrip("/") or "0",
        })
        return _run([python, str(HERE / peer.script), *peer.args], env, tmp, "PEER-RESULT ")


def run_ours(redis_url: str) -> dict:
    env = dict(os.environ, FUNBOOST_LIKE_BENCH_REDIS_URL=redis_url)
    cmd = [sys.executable, str(THROUGHPUT), "--brokers", ",".join(OURS_BROKERS), "--repeat", "1", "--json"]
    return _run(cmd, env, str(REPO_ROOT), "{")


def _venv_versions(python: str) -> dict:
    code = ("import json, platform, importlib.metadata as m\n"
            "v = {}\n"
            "for d in ('funboost', 'celery', 'kombu', 'redis', 'persist-queue', 'nb_log'):\n"
            "    try:\n        v[d] = m.version(d)\n    except Exception:\n        v[d] = None\n"
            "v['python'] = platform.python_version()\n"
            "print(json.dumps(v))\n")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"


def _ratio(ours: float | None, peer: float | None) -> str:
    return "-" if not ours or not peer else f"{ours / peer:.1f}x"


def _collect_rates(runs: list[dict], problems: list[str], label: str) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"publish": [], "bulk": [], "consume": []}
    for rep, data in enumerate(runs, 1):
        if "error" in data:
            problems.append(f"{label} run {rep}: {data['error']}")
            continue
        for path, res in data.get("results", {}).items():
            if not res:
                continue
            if "error" in res:
                problems.append(f"{label} {path} run {rep}: {res['error']}")
            elif "rate" in res:
                rates[path].append(res["rate"])
            if res.get("ok_check") is False:
                problems.append(f"{label} {path} run {rep}: check failed: {res.get('check')}")
    return rates


def _ours_rates(runs: list[dict], problems: list[str]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {b: {p: [] for p in OURS_PATHS} for b in OURS_BROKERS}
    for rep, data in enumerate(runs, 1):
        if "error" in data:
            problems.append(f"funboost_like run {rep}: {data['error']}")
            continue
        problems.extend(f"funboost_like run {rep}: {p}" for p in data.get("problems", []))
        for row in data.get("rows", []):
            path = next((k for k, v in OURS_PATHS.items() if v == row["path"]), None)
            if path and row["broker"] in out:
                out[row["broker"]][path].extend(row["rates"])
    return out


def _ours_n(runs: list[dict]) -> dict[str, dict[str, int]]:
    ns: dict[str, dict[str, int]] = {}
    for data in runs:
        for row in data.get("rows", []):
            path = next((k for k, v in OURS_PATHS.items() if v == row["path"]), None)
            if path:
                ns.setdefault(row["broker"], {})[path] = row["n"]
    return ns


def build_table(peers: list[Peer], ours_runs: list[dict],
                peer_runs: dict[str, list[dict]]) -> tuple[list[dict], list[str]]:
    problems: list[str] = []
    rows: list[dict] = []
    ours = _ours_rates(ours_runs, problems) if ours_runs else {}
    ours_n = _ours_n(ours_runs)
    ours_med = {b: {p: _median(v) for p, v in paths.items()} for b, paths in ours.items()}
    for broker in OURS_BROKERS if ours_runs else []:
        ns = ours_n.get(broker, {})
        rows.append({"framework": "funboost_like", "path": OURS_LABEL[broker], "key": broker,
                     "n": f"{ns.get('publish', 0):,} / {ns.get('consume', 0):,}", **ours_med[broker],
                     "runs": {p: ours[broker][p] for p in OURS_PATHS}, "ratio": ""})
    for peer in peers:
        if peer.key not in peer_runs:
            continue
        rates = _collect_rates(peer_runs[peer.key], problems, f"{peer.framework} {peer.label}")
        med = {p: _median(v) for p, v in rates.items()}
        mine = ours_med.get(peer.match or "", {})
        ratio = " / ".join(_ratio(mine.get(p), med[p]) if (med[p] is not None) else "-" for p in OURS_PATHS)
        n_consume = f"{peer.n:,}" if "consume" in peer.paths else "-"
        rows.append({"framework": peer.framework, "path": peer.label, "key": peer.key, "match": peer.match,
                     "n": f"{peer.n:,} / {n_consume}", **med, "runs": rates,
                     "ratio": ratio if mine else ""})
    return rows, problems


def print_table(rows: list[dict]) -> None:
    print("| framework | broker path | N (publish / consume) | publish one-by-one /s | bulk /s | consume /s "
          "| ours / peer (one-by-one / bulk / consume) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['framework']} | {r['path']} | {r['n']} | {_fmt(r['publish'])} | {_fmt(r['bulk'])} "
              f"| {_fmt(r['consume'])} | {r['ratio']} |")


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--venv", default="/tmp/peers", help="scratch virtualenv with funboost and celery[redis]")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13", help="one Redis database for everything")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--only", default="ours,funboost,celery", help="subset of: ours,funboost,celery")
    parser.add_argument("--json", action="store_true", help="also print every run as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - a linear driver
    args = _parse_args(argv)
    python = str(Path(args.venv) / "bin" / "python")
    only = {s.strip().lower() for s in args.only.split(",") if s.strip()}
    if not Path(python).exists() and only - {"ours"}:
        print(f"no Python at {python}: build the scratch virtualenv first (benchmarks/peers/README.md)",
              file=sys.stderr)
        return 0
    peers = [p for p in _peers(args.redis_url) if p.framework.lower() in only]
    client = _redis(args.redis_url)
    client.ping()
    keys_before = _peer_keys(client)
    _cleanup(client, keys_before)  # leftovers of an interrupted run (only names containing "peerbench")
    keys_before = _peer_keys(client)
    versions = _venv_versions(python) if peers else {}

    started = time.monotonic()
    load_start = _loadavg()
    ours_runs: list[dict] = []
    peer_runs: dict[str, list[dict]] = {p.key: [] for p in peers}
    deleted = 0
    repeat = max(1, args.repeat)
    try:
        for rep in range(repeat):
            if "ours" in only:
                t = time.monotonic()
                print(f"[{rep + 1}/{repeat}] funboost_like (throughput.py, 6 brokers) ...", end=" ", file=sys.stderr,
                      flush=True)
                ours_runs.append(run_ours(args.redis_url))
                print(f"{time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)
            for peer in peers:
                t = time.monotonic()
                print(f"[{rep + 1}/{repeat}] {peer.framework} {peer.label} ...", end=" ", file=sys.stderr, flush=True)
                data = run_peer(peer, python, args.redis_url)
                peer_runs[peer.key].append(data)
                deleted += _cleanup(client, keys_before)
                print(f"{time.monotonic() - t:.1f}s" + (f" ERROR {data['error']}" if "error" in data else ""),
                      file=sys.stderr, flush=True)
    finally:
        deleted += _cleanup(client, keys_before)

    rows, problems = build_table(peers, ours_runs, peer_runs)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python_ours": platform.python_version(), "peer_versions": versions, "redis_url": args.redis_url,
        "redis_server": client.info("server").get("redis_version"), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "repeat": repeat, "loadavg_start": load_start, "loadavg_end": _loadavg(),
        "total_seconds": round(time.monotonic() - started, 1), "peer_keys_deleted": deleted,
    }
    print(f"peers benchmark  date {info['date']}  CPUs {info['cpu_count']}  Redis {info['redis_server']} at "
          f"{args.redis_url}  repeat {repeat} (medians)  total {info['total_seconds']}s")
    print(f"Python {info['python_ours']} (ours)  venv {args.venv}: "
          + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"load average at start {load_start}, at end {info['loadavg_end']}")
    print()
    print_table(rows)
    print()
    print("ours / peer: our median divided by the peer's, per column (publish one-by-one / bulk / consume), against "
          "the funboost_like row of the same broker path (Celery acks_late=False against REDIS, True against "
          "REDIS_ACK_ABLE).")
    if problems:
        print()
        print("problems:")
        for p in problems:
            print(f"  - {p}")
    if args.json:
        print()
        print(json.dumps({"info": info, "rows": rows, "problems": problems, "ours_runs": ours_runs,
                          "peer_runs": peer_runs}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except Exception:  # a measurement, not a test: report and exit 0
        import traceback

        traceback.print_exc()
    sys.exit(0)
