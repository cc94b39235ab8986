"""The dashboard's requests: routing, the login and session checks, CSRF, and the JSON API.

Every page and every ``/api/...`` answer comes from :class:`~funboost_like.ops.service.OpsService`
(a new one per request), the same service the command line uses. Guarantees, for every request:

* without a valid session cookie (or, for ``/api/``, ``Authorization: Bearer <token>``) only the
  login page and the static files answer; pages redirect to ``/login``, the API answers 401;
* every POST made with a session carries its CSRF token (form field ``csrf`` or header
  ``X-CSRF-Token``) and, when the browser sends ``Origin``, comes from this origin; else 403;
* in read-only mode every action answers 403 (only logging in and out are POSTs that work);
* while bound to a loopback address, a ``Host`` header naming another host is refused (DNS rebinding).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import quote, urlsplit

from funboost_like.core.errors import BrokerError, FunboostLikeError
from funboost_like.ops.service import OpsService
from funboost_like.web import data, pages
from funboost_like.web.auth import COOKIE, SESSION_SECONDS, Credentials, is_loopback
from funboost_like.web.login_failures import LoginFailures

LOGIN_FAILURES_ALLOWED = 10  # per client address and LOGIN_WINDOW seconds
LOGIN_WINDOW = 300.0
LOGIN_ADDRESSES_KEPT = 10_000  # client addresses whose failed logins are remembered (the newest failures)
STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
ACTIONS = ("pause", "resume", "qps", "purge", "requeue-dead", "delete-dead")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    form: dict[str, str] = field(default_factory=dict)
    client: str = ""

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Dashboard:
    """The application: ``handle(request) -> response``, thread-safe."""

    def __init__(self, credentials: Credentials, *, read_only: bool = False, host: str = "127.0.0.1",
                 port: int = 0, service: Callable[[], OpsService] = OpsService) -> None:
        self.credentials = credentials
        self.read_only = read_only
        self.host, self.port = host, port
        self.make_service = service
        self._failures = LoginFailures(LOGIN_FAILURES_ALLOWED, LOGIN_WINDOW, LOGIN_ADDRESSES_KEPT)
        self._revoked: set[str] = set()
        self._lock = threading.Lock()

    # -- the entry point ----------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        api = request.path.startswith("/api/")
        try:
            response = self._route(request)
        except HttpError as exc:
            response = self._error(exc.status, str(exc), api)
        except LookupError as exc:
            response = self._error(404, _message(exc), api)
        except BrokerError as exc:
            response = self._error(502, str(exc), api)
        except (FunboostLikeError, ValueError) as exc:
            response = self._error(400, str(exc), api)
        response.headers += [("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                             ("X-Frame-Options", "DENY"), ("Referrer-Policy", "same-origin"),
                             ("Cache-Control", "no-store")]
        return response

    def _error(self, status: int, message: str, api: bool) -> Response:
        if api:
            return _json({"error": message}, status)
        return Response(status, pages.error_page(status, HTTPStatus(status).phrase, message).encode())

    def _route(self, request: Request) -> Response:
        self._check_host(request)
        path = request.path
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):])
        if path == "/login":
            return self._login(request)
        session = self._session(request)
        machine = path.startswith("/api/") or path == "/metrics"  # scripts and scrapers: a bearer token
        if session is None:
            if machine and self.credentials.check_bearer(request.headers.get("authorization")):
                session = {"user": "token", "sid": "", "bearer": "1"}
            elif machine or request.method == "POST":
                raise HttpError(401, "log in first (the token printed when the dashboard started)")
            else:
                return _redirect("/login")
        if request.method == "POST":
            self._check_post(request, session)
            if path == "/logout":
                with self._lock:
                    self._revoked.add(session["sid"])
                response = _redirect("/login")
                response.headers.append(("Set-Cookie", f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"))
                return response
            if self.read_only:
                raise HttpError(403, "the dashboard runs read-only: no action is allowed")
            return self._action(request)
        if request.method != "GET":
            raise HttpError(405, f"method {request.method} is not allowed")
        if path.startswith("/api/"):
            return _json(self._api_get(path[len("/api"):], request.query))
        if path == "/metrics":  # Prometheus: this host's numbers (docs/metrics.md)
            from funboost_like.observability.prometheus import render_metrics

            body, content_type = render_metrics()
            return Response(200, body, content_type)
        view = pages.View(user=session["user"], csrf=self.credentials.csrf_token(session["sid"]),
                          read_only=self.read_only)
        return Response(200, pages.render(view, self.make_service(), path, request.query).encode())

    # -- checks -------------------------------------------------------------------------------
    def _check_host(self, request: Request) -> None:
        if not is_loopback(self.host):
            return
        name = urlsplit("//" + request.headers.get("host", "")).hostname or ""
        if name not in ("127.0.0.1", "localhost", "::1", self.host.strip("[]")):
            raise HttpError(403, "this dashboard answers only under a loopback host name")

    def _session(self, request: Request) -> dict[str, str] | None:
        session = self.credentials.session(request.cookie(COOKIE))
        if session is None or session["sid"] in self._revoked:
            return None
        return session

    def _check_post(self, request: Request, session: dict[str, str]) -> None:
        if session.get("bearer"):
            return
        _check_origin(request)
        token = request.form.get("csrf") or request.headers.get("x-csrf-token")
        if not self.credentials.check_csrf(session["sid"], token):
            raise HttpError(403, "missing or wrong CSRF token: reload the page and try again")

    def _login(self, request: Request) -> Response:
        configured_user = self.credentials.user is not None
        if request.method != "POST":
            return Response(200, pages.login_page(None, configured_user).encode())
        _check_origin(request)
        now = time.monotonic()
        if self._failures.refused(request.client, now):
            raise HttpError(429, "too many failed logins from this address; wait a few minutes")
        user = self.credentials.check_login(request.form.get("user", ""), request.form.get("secret", ""))
        if user is None:
            self._failures.failed(request.client, now)
            return Response(403, pages.login_page("wrong token or password", configured_user).encode())
        response = _redirect("/")
        response.headers.append(("Set-Cookie", f"{COOKIE}={self.credentials.new_session(user)}; Max-Age="
                                 f"{SESSION_SECONDS}; Path=/; HttpOnly; SameSite=Strict"))
        return response

    @staticmethod
    def _static(name: str) -> Response:
        if name not in STATIC:
            raise HttpError(404, "no such file")
        body = resources.files("funboost_like.web").joinpath("static").joinpath(name).read_bytes()
        return Response(200, body, STATIC[name], [("Cache-Control", "max-age=300")])

    # -- the API ------------------------------------------------------------------------------
    def _api_get(self, path: str, query: dict[str, str]) -> Any:
        service = self.make_service()
        parts = pages.segments(path)
        if parts == ["queues"]:
            return data.overview_rows(service)
        if parts == ["workers"]:
            return service.workers(query.get("queue") or None)
        if parts == ["timing"]:
            return service.timing()
        if parts == ["tasks"]:
            return data.search(service, query)
        if len(parts) == 2 and parts[0] == "tasks":
            return service.task(parts[1], query.get("queue") or None)
        if len(parts) == 2 and parts[0] == "queues":
            return data.queue_status(service, parts[1])
        if len(parts) == 3 and parts[0] == "queues" and parts[2] == "dead":
            return service.dead(parts[1], _integer(query, "limit", 200))  # what the page shows
        if len(parts) == 3 and parts[0] == "queues" and parts[2] == "delayed":
            return service.delayed(parts[1], _integer(query, "limit", 50))
        raise HttpError(404, f"no such API path: {path}")

    def _action(self, request: Request) -> Response:
        api = request.path.startswith("/api/")
        parts = pages.segments(request.path[len("/api"):] if api else request.path)
        service = self.make_service()
        if len(parts) == 3 and parts[0] == "tasks" and parts[2] == "retry":
            result = service.retry(parts[1], request.form.get("queue") or None)
            back = f"/tasks/{quote(result['task_id'], safe='')}?queue={quote(result['queue'], safe='')}"
        elif len(parts) == 3 and parts[0] == "queues" and parts[2] in ACTIONS:
            result = self._queue_action(service, parts[1], parts[2], request.form)
            back = f"/queues/{quote(parts[1], safe='')}"
        else:
            raise HttpError(404, f"no such action: {request.path}")
        if api:
            return _json(result)
        return _redirect(back + ("&" if "?" in back else "?") + "done=" + quote(_summary(parts[-1], result)))

    @staticmethod
    def _queue_action(service: OpsService, queue: str, action: str, form: dict[str, str]) -> dict[str, Any]:
        if action in ("pause", "resume", "qps"):
            wait = _number(form, "wait", 2.0)  # every parameter checked before anything is changed
            if action == "qps":
                raw = form.get("qps", "").strip().lower()
                result = service.set_qps(queue, None if raw in ("", "default") else _number(form, "qps", 0.0))
            else:
                result = service.pause(queue) if action == "pause" else service.resume(queue)
            result.update(service.wait_applied(queue, timeout=wait))
            return result
        if action == "purge":
            if form.get("confirm") != queue:
                raise HttpError(400, "type the queue's name to purge it")
            return service.purge(queue)
        method = service.requeue_dead if action == "requeue-dead" else service.delete_dead
        if "index" in form:  # one letter, from the dead letters page
            return method(queue, index=_integer(form, "index", 0), task_id=form.get("task_id") or None)
        return method(queue, all_letters=True)


def _number(values: Mapping[str, str], name: str, default: float) -> float:
    """The finite number parameter ``name`` (``default`` when absent); 400 with its name when it is not one."""
    raw = values.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise HttpError(400, f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise HttpError(400, f"{name} must be a finite number, got {raw!r}")
    return value


def _integer(values: Mapping[str, str], name: str, default: int) -> int:
    """The integer parameter ``name`` (``default`` when absent); 400 with its name when it is not one."""
    raw = values.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise HttpError(400, f"{name} must be an integer, got {raw!r}") from None


def _check_origin(request: Request) -> None:
    """Refuse a POST a browser says comes from another origin (``Origin``, ``Sec-Fetch-Site``)."""
    origin = request.headers.get("origin")
    site = request.headers.get("sec-fetch-site")
    if (origin and urlsplit(origin).netloc != request.headers.get("host")) or site not in (None, "same-origin", "none"):
        raise HttpError(403, "cross-origin request refused")


def _summary(action: str, result: dict[str, Any]) -> str:
    shown = {k: v for k, v in result.items() if k not in ("queue", "broker", "updated_at", "by")}
    return f"{action}: " + ", ".join(f"{k} {pages.fmt(v)}" for k, v in shown.items())


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else str(exc)


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, default=str).encode(), "application/json")


def _redirect(location: str) -> Response:
    return Response(303, b"", headers=[("Location", location)])
