"""The dashboard's HTML pages. Every value shown passes through :func:`e` (``html.escape``), including
queue names, arguments, results, tracebacks and messages; no page has inline script or style (the
content security policy forbids them): behaviour lives in ``static/dashboard.js``."""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlencode

from funboost_like.core.errors import FunboostLikeError
from funboost_like.core.status_store import STATUSES
from funboost_like.ops.service import OpsService
from funboost_like.web import data


@dataclass
class View:
    user: str
    csrf: str
    read_only: bool


def e(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def q(value: str) -> str:
    """``value`` as one URL path segment."""
    return quote(value, safe="")


def when(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def fmt(value: Any) -> str:
    """A value as the live script writes it too: yes/no, '-' for none."""
    if isinstance(value, bool):
        return yes(value)
    return "-" if value is None else str(value)


def moment(timestamp: Any) -> str:
    return f"{when(timestamp)} ({timestamp})" if isinstance(timestamp, (int, float)) else "-"


def seconds(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else fmt(value)


def yes(value: Any) -> str:
    return "yes" if value else "no"


def segments(path: str) -> list[str]:
    return [unquote(part) for part in path.split("/") if part]


def table(header: Sequence[str], rows: Iterable[str], attrs: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def layout(view: View | None, title: str, body: str, flash: str | None = None) -> str:
    nav = ""
    if view is not None:
        links = "".join(f'<a href="{href}">{e(name)}</a>' for href, name in (
            ("/", "Queues"), ("/workers", "Workers"), ("/tasks", "Tasks"), ("/timing", "Timing jobs")))
        mode = '<span class="badge">read-only</span>' if view.read_only else ""
        nav = (f'<header><nav>{links}</nav><div class="who">{mode}{e(view.user)}'
               f'<form method="post" action="/logout">{csrf_field(view)}<button>Log out</button></form></div></header>')
    note = f'<p class="flash" id="flash">{e(flash)}</p>' if flash else ""
    token = f'<meta name="csrf-token" content="{e(view.csrf)}">' if view else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)} · funboost_like</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">{token}'
            '<link rel="stylesheet" href="/static/dashboard.css"><script src="/static/dashboard.js" defer></script>'
            f'</head><body>{nav}<main><h1>{e(title)}</h1>{note}{body}</main></body></html>')


def csrf_field(view: View) -> str:
    return f'<input type="hidden" name="csrf" value="{e(view.csrf)}">'


def login_page(error: str | None, with_user: bool) -> str:
    user = '<label>User <input name="user" autocomplete="username"></label>' if with_user else ""
    body = (f'<form method="post" action="/login" class="login">{user}'
            '<label>Token or password <input name="secret" type="password" autocomplete="current-password" '
            'autofocus id="secret"></label><button id="login">Log in</button></form>'
            '<p class="hint">The token is printed by <code>funboost_like web</code> when it starts.</p>')
    return layout(None, "Log in", body, error)


def error_page(status: int, phrase: str, message: str) -> str:
    return layout(None, f"{status} {phrase}", f'<p class="error">{e(message)}</p><p><a href="/">Back</a></p>')


def render(view: View, service: OpsService, path: str, query: dict[str, str]) -> str:
    """The page at ``path`` (raises LookupError for an unknown one)."""
    parts = segments(path)
    flash = query.get("done")
    if not parts:
        return layout(view, "Queues", overview(data.overview_rows(service)), flash)
    if parts == ["workers"]:
        return layout(view, "Workers", workers_table(service.workers()), flash)
    if parts == ["timing"]:
        return layout(view, "Timing jobs", timing(service.timing()), flash)
    if parts == ["tasks"]:
        return layout(view, "Tasks", tasks(service, query), flash)
    if len(parts) == 2 and parts[0] == "tasks":
        return layout(view, f"Task {parts[1]}", task(view, service.task(parts[1], query.get("queue") or None)), flash)
    if len(parts) == 2 and parts[0] == "queues":
        return layout(view, f"Queue {parts[1]}", queue(view, data.queue_status(service, parts[1])), flash)
    if len(parts) == 3 and parts[0] == "queues" and parts[2] == "dead":
        return layout(view, f"Dead letters of {parts[1]}", dead(view, parts[1], service.dead(parts[1], 200)), flash)
    if len(parts) == 3 and parts[0] == "queues" and parts[2] == "delayed":
        return layout(view, f"Delayed messages of {parts[1]}", delayed(service, parts[1]), flash)
    raise LookupError(f"no page at {path}")


def overview(result: dict[str, Any]) -> str:
    rows = [f'<tr data-queue="{e(r["queue"])}"><td><a href="/queues/{e(q(r["queue"]))}">{e(r["queue"])}</a></td>'
            f'<td>{e(r["broker"])}</td>' + "".join(f'<td data-field="{name}">{e(fmt(r.get(name)))}</td>' for name in (
                "depth", "done_per_second", "failed_per_second", "p95_seconds", "qps", "paused", "consumers",
                "stale_consumers", "in_flight")) + "</tr>" for r in result["queues"]]
    errors = "".join(f'<p class="error">{e(error)}</p>' for error in result["errors"])
    chart = ('<canvas id="chart" width="900" height="200" data-source="/api/queues"></canvas>'
             '<p class="legend"><span class="done">done/s</span> <span class="failed">failed/s</span> '
             '<span class="depth">depth</span> (all queues, live)</p>')
    if not rows:
        return errors + '<p>No queue known yet: publish to one, or start a consumer, with OPS_REGISTRY on.</p>'
    return errors + chart + table(("Queue", "Broker", "Depth", "Done/s", "Failed/s", "p95 s", "QPS", "Paused",
                                   "Consumers", "Stale", "In flight"), rows, ' id="queues" data-source="/api/queues"')


def workers_table(workers: list[dict[str, Any]]) -> str:
    if not workers:
        return "<p>No consumer registered.</p>"
    rows = [f'<tr class="{"stale" if w.get("stale") else "live"}">'
            f'<td><a href="/queues/{e(q(str(w.get("queue"))))}">{e(w.get("queue"))}</a></td>' + "".join(
                f"<td>{e(v)}</td>" for v in (
                    w.get("broker"), w.get("host"), w.get("pid"), "stale" if w.get("stale") else "live",
                    f'{float(w.get("age", 0)):.1f}s ago', when(w.get("started_at")), w.get("done_per_second"),
                    w.get("failed_per_second"), w.get("in_flight"), w.get("threads"), w.get("concurrent_num"),
                    w.get("qps"), yes(w.get("paused")))) + "</tr>" for w in workers]
    return table(("Queue", "Broker", "Host", "PID", "State", "Heartbeat", "Started", "Done/s", "Failed/s",
                  "In flight", "Threads", "Concurrency", "QPS", "Paused"), rows, ' id="workers"')


def queue(view: View, status: dict[str, Any]) -> str:
    name = str(status["queue"])
    shown = {**{k: v for k, v in status.items() if k not in ("workers", "run_times", "queue")},
             "p50_seconds": status["run_times"]["p50"], "p95_seconds": status["run_times"]["p95"]}
    facts = "".join(f'<tr><th>{e(k)}</th><td data-field="{e(k)}">'
                    f'{e(when(v) if k == "first_seen" else fmt(v))}</td></tr>' for k, v in shown.items())
    links = (f'<p><a href="/queues/{e(q(name))}/dead">Dead letters</a> · '
             f'<a href="/queues/{e(q(name))}/delayed">Delayed messages</a> · '
             f'<a href="/tasks?{e(urlencode({"queue": name}))}">Tasks</a></p>')
    chart = (f'<canvas id="chart" width="900" height="200" data-source="/api/queues/{e(q(name))}"></canvas>'
             '<p class="legend"><span class="done">done/s</span> <span class="failed">failed/s</span> '
             '<span class="depth">depth</span> (live)</p>')
    body = (f'{links}{chart}<table class="facts" id="status" data-source="/api/queues/{e(q(name))}">{facts}</table>'
            f'{"" if view.read_only else actions(view, name)}<h2>Consumers</h2>{workers_table(status["workers"])}')
    return body


def actions(view: View, name: str) -> str:
    base = f"/queues/{e(q(name))}"

    def form(action: str, inner: str, css: str = "") -> str:
        return (f'<form method="post" action="{base}/{action}" class="action {css}">{csrf_field(view)}{inner}'
                "</form>")

    return ('<h2>Actions</h2><div class="actions">'
            + form("pause", '<button id="pause">Pause</button>')
            + form("resume", '<button id="resume">Resume</button>')
            + form("qps", '<input name="qps" size="6" placeholder="qps" id="qps-value">'
                          '<button id="set-qps">Set qps</button> <small>0: no limit; empty: the decorator\'s</small>')
            + form("requeue-dead", '<button id="requeue-dead">Requeue all dead letters</button>')
            + form("delete-dead", '<button id="delete-dead">Delete all dead letters</button>')
            + form("purge", f'<input name="confirm" placeholder="type {e(name)} to purge" data-confirm="{e(name)}" '
                            'id="purge-confirm" autocomplete="off"><button id="purge" disabled>Purge waiting '
                            'messages</button>', "danger")
            + "</div>")


def delayed(service: OpsService, name: str) -> str:
    back = f'<p><a href="/queues/{e(q(name))}">Back to the queue</a></p>'
    try:
        rows = service.delayed(name, 200)
    except FunboostLikeError as exc:  # a broker that cannot list them: say so, the page stays up
        return back + f"<p>{e(exc)}</p>"
    if not rows:
        return back + "<p>No delayed message.</p>"
    cells = [f'<tr><td>{e(when(d["due_at"]))}</td><td>{e(d["task_id"])}</td>'
             f'<td><pre>{e(json.dumps(d["body"], default=str)[:2000])}</pre></td></tr>' for d in rows]
    return back + table(("Due at", "Task", "Message"), cells, ' id="delayed"')


def dead(view: View, name: str, letters: list[dict[str, Any]]) -> str:
    back = f'<p><a href="/queues/{e(q(name))}">Back to the queue</a> (actions on all letters are there)</p>'
    if not letters:
        return back + "<p>No dead letter.</p>"

    def one(d: dict[str, Any]) -> str:  # requeue or delete this letter (checked against its task id)
        if view.read_only:
            return ""
        fields = (f'{csrf_field(view)}<input type="hidden" name="index" value="{e(d["index"])}">'
                  f'<input type="hidden" name="task_id" value="{e(d["task_id"] or "")}">')
        return "".join(f'<form method="post" action="/queues/{e(q(name))}/{action}" class="action">{fields}'
                       f'<button class="{action}-one">{label}</button></form>'
                       for action, label in (("requeue-dead", "Requeue"), ("delete-dead", "Delete")))

    rows = [f'<tr><td>{e(d["index"])}</td><td>{e(d["task_id"])}</td><td>{e(when(d["failed_at"]))}</td>'
            f'<td>{e(d["attempts"])}</td><td><pre>{e(d["reason"])}</pre></td>'
            f'<td><pre>{e(json.dumps(d["body"], default=str)[:2000])}</pre></td><td>{one(d)}</td></tr>'
            for d in letters]
    return back + table(("#", "Task", "Failed at", "Runs", "Reason", "Message", ""), rows, ' id="dead"')


def tasks(service: OpsService, query: dict[str, str]) -> str:
    names = service.queue_names()
    chosen = query.get("queue", "")
    options = "".join(f'<option{" selected" if n == chosen else ""}>{e(n)}</option>' for n in names)
    states = "".join(f'<option{" selected" if s == query.get("state") else ""}>{e(s)}</option>' for s in STATUSES)
    form = (f'<form method="get" action="/tasks" class="search"><label>Queue <select name="queue">{options}</select>'
            f'</label><label>State <select name="state"><option value="">any</option>{states}</select></label>'
            f'<label>Task id <input name="id" value="{e(query.get("id", ""))}"></label>'
            f'<label>Arguments, id or error contain <input name="q" value="{e(query.get("q", ""))}"></label>'
            f'<label>Since <input name="since" type="datetime-local" value="{e(query.get("since", ""))}"></label>'
            f'<label>Until <input name="until" type="datetime-local" value="{e(query.get("until", ""))}"></label>'
            '<button id="search">Search</button></form>')
    if not chosen:
        return form
    result = data.search(service, query)
    rows = [f'<tr><td><a href="/tasks/{e(q(r["task_id"]))}?{e(urlencode({"queue": chosen}))}">{e(r["task_id"])}'
            f'</a></td><td class="s-{e(r["status"])}">{e(r["status"])}</td><td>{e(when(r["updated_at"]))}</td>'
            f'<td>{e(seconds(r["duration"]))}</td><td>{e(r["attempts"])}</td>'
            f'<td><code>{e(json.dumps(r["kwargs"], default=str)[:300])}</code></td><td>{e(r["error"])}</td></tr>'
            for r in result["rows"]]
    more = ""
    if result["next"]:
        note = " (looked through the next records without filling this page)" if result["partial"] else ""
        more = (f'<p><a id="next" href="/tasks?{e(urlencode({**query, "cursor": result["next"]}))}">Next page</a>'
                f'{e(note)}</p>')
    found = table(("Task", "Status", "Updated", "Seconds", "Runs", "Arguments", "Error"), rows, ' id="tasks"') \
        if rows else "<p>No call record matches (records are kept with function_result_status_persistance_conf).</p>"
    return form + found + more


def task(view: View, record: dict[str, Any]) -> str:
    steps = "".join(f"<li>{e(when(at))} ({at:.6f}) {e(name)}</li>" for name, at in data.timeline(record))
    facts = "".join(f"<tr><th>{e(k)}</th><td>{e(moment(v) if k.endswith(('_at', '_time')) else fmt(v))}</td></tr>"
                    for k, v in record.items() if k not in ("kwargs", "result", "exception", "error"))
    retry = "" if view.read_only else (
        f'<form method="post" action="/tasks/{e(q(record["task_id"]))}/retry">{csrf_field(view)}'
        f'<input type="hidden" name="queue" value="{e(record.get("queue"))}"><button id="retry">Retry '
        "(publish its arguments again)</button></form>")
    return (f'<table class="facts">{facts}</table><h2>Arguments</h2>'
            f'<pre id="kwargs">{e(json.dumps(record.get("kwargs"), indent=2, default=str))}</pre>'
            f'<h2>Result</h2><pre>{e(json.dumps(record.get("result"), indent=2, default=str))}</pre>'
            f'<h2>Traceback</h2><pre>{e(record.get("exception"))}</pre><h2>Timeline</h2><ol>{steps}</ol>{retry}')


def timing(result: dict[str, Any]) -> str:
    note = f'<p>{e(result.get("note"))}</p>' if result.get("note") else ""
    rows = [f'<tr><td>{e(j["id"])}</td><td>{e(j["name"])}</td><td>{e(j["trigger"])}</td>'
            f'<td>{e(j["next_run_time"])}</td><td>{e(yes(j["paused"]))}</td></tr>' for j in result["jobs"]]
    jobs = table(("Id", "Name", "Trigger", "Next run", "Paused"), rows) if rows else "<p>No timing job.</p>"
    return f'<p>Job store: {e(result["store"])}</p>{note}{jobs}'
