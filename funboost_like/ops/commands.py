"""The operations verbs of the ``funboost_like`` command: arguments in, the service's answer out.

Each verb builds an :class:`~funboost_like.ops.service.OpsService`, calls one method and prints the
result: as JSON with ``--json`` (the service's values unchanged), else as a short table or as
``name: value`` lines. Nothing here decides anything the service does not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from funboost_like.ops.service import OpsService

Run = Callable[[OpsService, argparse.Namespace], Any]


def add_ops_commands(commands: Any) -> None:
    """Add the operations verbs to the ``funboost_like`` sub-command parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--broker", metavar="KIND", help="the broker kind (name or number) of a queue no registry "
                                                         "knows, or the only broker to look at")

    def verb(name: str, run: Run, printer: Callable[[Any], None], help_text: str,
             queue: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, parents=[common], help=help_text,
                                                              description=help_text[0].upper() + help_text[1:] + ".")
        if queue:
            parser.add_argument("queue", metavar="QUEUE")
        parser.set_defaults(run=lambda args: _run(args, run, printer))
        return parser

    verb("queues", lambda s, a: s.queues(), _print_queues, "list the known queues", queue=False)
    verb("workers", lambda s, a: s.workers(a.queue), _print_workers, "list the consumers, live and stale",
         queue=False).add_argument("queue", metavar="QUEUE", nargs="?", help="only this queue's")
    verb("status", lambda s, a: s.status(a.queue), _print_status,
         "rates, depth, in flight, failures and time left of a queue")
    tasks = verb("tasks", lambda s, a: s.tasks(a.queue, a.state, a.search, a.limit), _print_tasks,
                 "list a queue's call records, newest first")
    tasks.add_argument("--state", help="only calls in this status (not_started, running, finished, failed, ...)")
    tasks.add_argument("--search", help="only calls whose id, arguments or error contain this text")
    tasks.add_argument("--limit", type=_positive, default=50)
    verb("task", lambda s, a: s.task(a.task_id, a.queue), _print_mapping, "show one call record",
         queue=False).add_argument("task_id", metavar="ID")
    retry = verb("retry", lambda s, a: s.retry(a.task_id, a.queue), _print_mapping,
                 "publish a recorded call again", queue=False)
    retry.add_argument("task_id", metavar="ID")
    for parser in (commands.choices["task"], retry):
        parser.add_argument("--queue", help="the task's queue (default: look in every known queue)")
    verb("dead", lambda s, a: s.dead(a.queue, a.limit), _print_dead, "list a queue's dead letters, newest first",
         ).add_argument("--limit", type=_positive, default=50)
    verb("delayed", lambda s, a: s.delayed(a.queue, a.limit), _print_delayed,
         "list a queue's messages not due yet, soonest first").add_argument("--limit", type=_positive, default=50)
    for name, method in (("requeue-dead", "requeue_dead"), ("delete-dead", "delete_dead")):
        parser = verb(name, _dead_action(method), _print_mapping, f"{name.split('-')[0]} dead letters of a queue")
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--all", action="store_true", help="every dead letter")
        which.add_argument("--index", type=int, help="the one at this index of `dead QUEUE` (0: the newest)")
        parser.add_argument("--task-id", metavar="ID", help="with --index: only if that letter is still this "
                                                           "task (a newer failure shifts every index)")
    verb("purge", _purge, _print_mapping, "delete every waiting message of a queue").add_argument(
        "--yes", action="store_true", help="really delete them")
    for name in ("pause", "resume"):
        verb(name, _control(name), _print_mapping, f"{name} a queue's consumers").add_argument(
            "--no-wait", action="store_true", help="do not wait for the consumers to confirm")
    qps = verb("qps", _control("qps"), _print_mapping, "set the qps of a queue's consumers")
    qps.add_argument("qps", metavar="N", type=_qps_argument,
                     help="calls per second (0: no limit; 'default': the decorator's)")
    qps.add_argument("--no-wait", action="store_true", help="do not wait for the consumers to confirm")
    verb("timing", lambda s, a: s.timing(), _print_timing, "list the timing jobs of the persistent job store",
         queue=False)


def _run(args: argparse.Namespace, run: Run, printer: Callable[[Any], None]) -> int:
    cwd = os.getcwd()  # the user's distributed_frame_config.py, as `python -m` would find it
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    service = OpsService(broker=args.broker)
    result = run(service, args)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        printer(result)
    for error in service.errors:  # brokers left out of a listing
        print(f"funboost_like: error: {error}", file=sys.stderr)
    return 1 if service.errors else 0


def _dead_action(method: str) -> Run:
    def action(service: OpsService, args: argparse.Namespace) -> Any:
        if args.task_id is not None and args.index is None:
            raise ValueError("--task-id goes with --index")
        return getattr(service, method)(args.queue, all_letters=args.all, index=args.index or 0,
                                        task_id=args.task_id)

    return action


def _purge(service: OpsService, args: argparse.Namespace) -> Any:
    if not args.yes:
        raise ValueError(f"purge deletes every waiting message of queue {args.queue!r}; add --yes to do it")
    return service.purge(args.queue)


def _control(name: str) -> Run:
    def action(service: OpsService, args: argparse.Namespace) -> Any:
        if name == "qps":
            result = service.set_qps(args.queue, args.qps)
        else:
            result = service.pause(args.queue) if name == "pause" else service.resume(args.queue)
        if not args.no_wait:
            result.update(service.wait_applied(args.queue))
        return result

    return action


# -- printing ---------------------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [[_text(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(header)]
    for row in [list(header), *cells]:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _print_queues(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no queue known yet (publish to one, or start a consumer, with OPS_REGISTRY on)")
        return
    _table([(r["queue"], r["broker"], r["depth"], r["consumers"], r["stale_consumers"], r["done_per_second"],
             r["failed_per_second"], r["paused"], r["qps"]) for r in rows],
           ("QUEUE", "BROKER", "DEPTH", "CONSUMERS", "STALE", "DONE/S", "FAILED/S", "PAUSED", "QPS"))


def _print_workers(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no consumer registered")
        return
    _table([(w["queue"], w["broker"], w["host"], w["pid"], "stale" if w["stale"] else "live", f"{w['age']:.1f}s",
             w["done_per_second"], w["failed_per_second"], w["in_flight"], w["paused"], w["qps"]) for w in rows],
           ("QUEUE", "BROKER", "HOST", "PID", "STATE", "BEAT", "DONE/S", "FAILED/S", "IN FLIGHT", "PAUSED", "QPS"))


def _print_status(status: dict[str, Any]) -> None:
    _print_mapping({k: v for k, v in status.items() if k != "workers"})
    print()
    _print_workers(status["workers"])


def _print_mapping(values: dict[str, Any]) -> None:
    for name, value in values.items():
        shown = _when(value) if name.endswith(("_at", "_time", "first_seen")) and value else value
        if isinstance(shown, (dict, list)):
            shown = json.dumps(shown, default=str)
        print(f"{name}: {_text(shown)}")


def _print_tasks(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no call record (records are kept with function_result_status_persistance_conf)")
        return
    _table([(r["task_id"], r["status"], _when(r["updated_at"]), r["duration"], r["attempts"], r["error"])
            for r in rows], ("TASK", "STATUS", "UPDATED", "SECONDS", "RUNS", "ERROR"))


def _print_dead(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no dead letter")
        return
    _table([(r["index"], r["task_id"], _when(r["failed_at"]), r["attempts"], str(r["reason"]).split("\n", 1)[0][:80])
            for r in rows], ("INDEX", "TASK", "FAILED AT", "RUNS", "REASON"))


def _print_delayed(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no delayed message")
        return
    _table([(_when(r["due_at"]), r["task_id"], json.dumps(r["body"], default=str)[:80]) for r in rows],
           ("DUE AT", "TASK", "MESSAGE"))


def _print_timing(result: dict[str, Any]) -> None:
    print(f"job store: {result['store']}")
    if result.get("note"):
        print(result["note"])
    if result["jobs"]:
        _table([(j["id"], j["name"], j["trigger"], j["next_run_time"]) for j in result["jobs"]],
               ("ID", "NAME", "TRIGGER", "NEXT RUN"))


def _qps_argument(text: str) -> float | None:
    """``N`` of ``qps``: a number >= 0, or ``default`` (None: the decorator's qps)."""
    if text.strip().lower() == "default":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of calls per second (or 'default')") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: the qps must be a finite number >= 0 (0: no limit)")
    return value


def _positive(text: str) -> int:
    """``--limit``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 or more")
    return value
