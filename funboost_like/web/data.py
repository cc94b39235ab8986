"""What the pages and the JSON API show, each answer composed of service calls only.

A page and its ``/api/...`` twin call the same function here, so they always show the same values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from funboost_like.ops.service import OpsService


class BadParameter(ValueError):
    """A query parameter that cannot be read (answered with 400)."""


def overview_rows(service: OpsService) -> dict[str, Any]:
    """Every queue (``service.queues()``) with the p95 run time of its last minute, and brokers not read."""
    rows = service.queues()
    for row in rows:
        row["p95_seconds"] = service.run_times(row["queue"])["p95"]
    return {"queues": rows, "errors": list(service.errors)}


def queue_status(service: OpsService, queue: str) -> dict[str, Any]:
    """One queue (``service.status``) with its run times of the last minute."""
    status = service.status(queue)
    status["run_times"] = service.run_times(queue)
    return status


def search(service: OpsService, query: dict[str, str]) -> dict[str, Any]:
    """One page of task search from the query parameters ``queue``, ``state``, ``id``, ``q``, ``since``,
    ``until``, ``cursor`` and ``limit`` (see ``OpsService.search_tasks``)."""
    queue = query.get("queue", "")
    if not queue:
        raise BadParameter("name a queue (parameter queue)")
    try:
        limit = int(query.get("limit") or 50)
    except ValueError:
        raise BadParameter(f"bad limit {query.get('limit')!r}") from None
    return service.search_tasks(queue, state=query.get("state") or None, search=query.get("q") or None,
                                since=parse_time(query.get("since")), until=parse_time(query.get("until")),
                                task_id=(query.get("id") or "").strip() or None, cursor=query.get("cursor") or None,
                                limit=limit)


def parse_time(text: str | None) -> float | None:
    """A time given as UNIX seconds or ISO 8601 (local time when no zone): UNIX seconds."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BadParameter(f"bad time {text!r}: use UNIX seconds or YYYY-MM-DDTHH:MM") from None


def timeline(task: dict[str, Any]) -> list[tuple[str, float]]:
    """The known moments of one call, in time order."""
    moments = [("published", task.get("publish_time")), ("started", task.get("started_at")),
               ("finished" if task.get("status") != "failed" else "failed", task.get("finished_at")),
               (f"last change ({task.get('status')})", task.get("updated_at"))]
    return sorted(((name, float(when)) for name, when in moments if isinstance(when, (int, float))),
                  key=lambda item: item[1])
