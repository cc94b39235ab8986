"""The dashboard's HTTP server: the standard library's threading HTTP server around :class:`Dashboard`.

:func:`make_server` checks the binding rule (:func:`~funboost_like.web.auth.check_binding`) before it
opens the socket, so a dashboard on a non-loopback address without configured credentials never
listens. Request bodies over ``MAX_BODY`` bytes are refused, and so, at once, is a ``Content-Length``
that is not a decimal count (400); a request has ``REQUEST_TIMEOUT`` seconds to arrive.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from funboost_like.ops.service import OpsService
from funboost_like.web.app import Dashboard, Request, Response
from funboost_like.web.auth import Credentials, check_binding

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 30.0


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


class _DashboardServer6(DashboardServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    timeout = REQUEST_TIMEOUT
    server_version = "funboost_like-web"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_HEAD(self) -> None:  # noqa: N802 - a GET's status and headers, without its body (uptime probes)
        self._serve("GET", head=True)

    def _serve(self, method: str, *, head: bool = False) -> None:
        url = urlsplit(self.path)
        length = _content_length(self.headers.get("Content-Length"))
        if length is None:  # a negative length read until the client closed, holding the thread
            self.close_connection = True
            self._send(Response(400, b"bad Content-Length", "text/plain"))
            return
        if length > MAX_BODY:
            self._send(Response(413, b"request body too large", "text/plain"))
            return
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        form = dict(parse_qsl(body, keep_blank_values=True)) if "form" in (self.headers.get("Content-Type") or "") \
            else {}
        request = Request(method=method, path=url.path, query=dict(parse_qsl(url.query, keep_blank_values=True)),
                          headers={k.lower(): v for k, v in self.headers.items()}, form=form,
                          client=str(self.client_address[0]))
        self._send(self.server.dashboard.handle(request), head=head)

    def _send(self, response: Response, *, head: bool = False) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # no access log on stderr (a token in a query would land there)


def _content_length(header: str | None) -> int | None:
    """The body's length the header gives (0 without one), or None when it is not a decimal count."""
    if header is None:
        return 0
    header = header.strip()
    return int(header) if header.isdigit() and header.isascii() else None


def make_server(host: str = "127.0.0.1", port: int = 0, *, credentials: Credentials | None = None,
                read_only: bool = False, service: Callable[[], OpsService] = OpsService) -> DashboardServer:
    """A bound (not yet serving) dashboard server; port 0 picks a free port."""
    credentials = credentials or Credentials.make()
    check_binding(host, credentials)
    server_class = _DashboardServer6 if ":" in host else DashboardServer
    server = server_class((host.strip("[]"), port), _Handler)
    server.dashboard = Dashboard(credentials, read_only=read_only, host=host, port=server.server_address[1],
                                 service=service)
    return server


def serve_in_thread(server: DashboardServer) -> threading.Thread:
    """Serve ``server`` on a daemon thread (stop it with ``server.shutdown()``)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                              name="funboost_like-web")
    thread.start()
    return thread
