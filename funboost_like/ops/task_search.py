"""Task search over one queue's status records with keyset pagination (the service's ``search_tasks``).

Guarantees:

* Pages are ordered newest change first (``updated_at`` descending, then SQLite's ``rowid``
  descending) and continue from a **cursor** (``"<updated_at>:<rowid>"``), never from an offset, so a
  page deep in a million records costs what the first one does: the walk starts on the
  ``calls_updated`` / ``calls_status`` index at the cursor.
* Filters: one status, a time window on the latest change (``since <= updated_at < until``), an exact
  task id (a primary-key lookup), and a text ``search`` in the task id, the arguments' JSON or the
  exception (case-insensitive). A text search looks through at most ``SCAN_BUDGET`` records per page;
  when it did not fill the page within them it returns what it found with ``next`` set to where it
  stopped and ``partial`` true, so a rare text costs several quick pages instead of one slow one.
* The records are read through a read-only connection per thread; nothing here writes.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from funboost_like.core.errors import FunboostLikeError
from funboost_like.core.status_store import COLUMNS, STATUSES, StatusRecord

SCAN_BUDGET = 50_000  # records a text search looks through for one page
MAX_PAGE = 500

_local = threading.local()


class BadCursor(FunboostLikeError, ValueError):
    """A pagination cursor that is not ``<updated_at>:<rowid>``."""


def parse_cursor(cursor: str | None) -> tuple[float, int] | None:
    if not cursor:
        return None
    try:
        when, _, rowid = cursor.partition(":")
        return float(when), int(rowid)
    except ValueError:
        raise BadCursor(f"bad page cursor {cursor!r}: expected '<updated_at>:<rowid>'") from None


def _cursor(updated_at: float, rowid: int) -> str:
    return f"{updated_at!r}:{rowid}"


def _connection(path: Path) -> sqlite3.Connection | None:
    conns: dict[str, sqlite3.Connection] | None = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    conn = conns.get(str(path))
    if conn is None:
        if not path.exists():
            return None
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        conn.execute("PRAGMA query_only = 1")
        conns[str(path)] = conn
    return conn


def search(path: Path, *, state: str | None = None, search_text: str | None = None, since: float | None = None,
           until: float | None = None, task_id: str | None = None, cursor: str | None = None,
           limit: int = 50) -> tuple[list[StatusRecord], str | None, bool]:
    """One page of records of the status file ``path``: ``(records, next cursor or None, partial)``."""
    if state is not None and state not in STATUSES:
        raise ValueError(f"unknown state {state!r}; known: {', '.join(STATUSES)}")
    limit = max(1, min(MAX_PAGE, int(limit)))
    after = parse_cursor(cursor)
    conn = _connection(path)
    if conn is None:
        return [], None, False
    columns = ", ".join(COLUMNS)
    where, params = _conditions(state, since, until, after)
    if task_id:
        where.append("task_id = ?")
        params.append(task_id)
    filters = (" WHERE " + " AND ".join(where)) if where else ""
    order = " ORDER BY updated_at DESC, rowid DESC"
    sql = f"SELECT rowid, {columns} FROM calls{filters}{order}"
    if not search_text:
        return _page(conn.execute(sql + " LIMIT ?", [*params, limit + 1]).fetchall(), limit)
    needle = search_text.lower()
    matched = ("(instr(lower(task_id), ?) OR instr(lower(coalesce(kwargs, '')), ?)"
               " OR instr(lower(coalesce(exception, '')), ?))")
    rows = conn.execute(f"SELECT * FROM ({sql} LIMIT ?) WHERE {matched} LIMIT ?",
                        [*params, SCAN_BUDGET, needle, needle, needle, limit + 1]).fetchall()
    if len(rows) > limit:
        return _page(rows, limit)
    # The page is not full: go on after the last record looked at, if the budget ran out before the end.
    last = conn.execute(f"SELECT updated_at, rowid FROM calls{filters}{order} LIMIT 1 OFFSET ?",
                        [*params, SCAN_BUDGET - 1]).fetchone()
    records = [StatusRecord.from_row(tuple(row[1:])) for row in rows]
    if last is None:
        return records, None, False
    return records, _cursor(float(last[0]), int(last[1])), True


def _conditions(state: str | None, since: float | None, until: float | None,
                after: tuple[float, int] | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if state is not None:
        where.append("status = ?")
        params.append(state)
    if since is not None:
        where.append("updated_at >= ?")
        params.append(float(since))
    if until is not None:
        where.append("updated_at < ?")
        params.append(float(until))
    if after is not None:
        where.append("updated_at <= ? AND (updated_at < ? OR rowid < ?)")
        params.extend([after[0], after[0], after[1]])
    return where, params


def _page(rows: list[Any], limit: int) -> tuple[list[StatusRecord], str | None, bool]:
    records = [StatusRecord.from_row(tuple(row[1:])) for row in rows[:limit]]
    if len(rows) <= limit:
        return records, None, False
    last = rows[limit - 1]
    return records, _cursor(float(last[COLUMNS.index("updated_at") + 1]), int(last[0])), False


def run_times(path: Path, since: float, limit: int = 2000) -> dict[str, Any]:
    """Run-time percentiles of the calls that finished or failed since ``since`` (the newest ``limit``)."""
    conn = _connection(path)
    if conn is None:
        return {"count": 0, "p50": None, "p95": None}
    durations = sorted(float(row[0]) for row in conn.execute(
        "SELECT duration FROM calls WHERE updated_at >= ? AND duration IS NOT NULL ORDER BY updated_at DESC LIMIT ?",
        (float(since), int(limit))))
    if not durations:
        return {"count": 0, "p50": None, "p95": None}

    def pick(q: float) -> float:
        return round(durations[min(len(durations) - 1, int(q * len(durations)))], 6)

    return {"count": len(durations), "p50": pick(0.5), "p95": pick(0.95)}
