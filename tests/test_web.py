"""The web dashboard over HTTP (a live server on a free port, real consumers on the embedded SQLite
broker): login refused without the token, signed HttpOnly cookies, CSRF, read-only mode, escaping,
the binding rule, keyset pagination of the task search, and the pages and API agreeing."""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from funboost_like import (
    BrokerEnum,
    FunctionResultStatusPersistanceConfig,
    PriorityConsumingControlConfig,
    patch_frame_config,
    task_deco,
)
from funboost_like.cli import main
from funboost_like.ops import task_search
from funboost_like.ops.service import OpsService
from funboost_like.web.auth import Credentials, CredentialsError, hash_password, verify_password
from funboost_like.web.server import DashboardServer, make_server, serve_in_thread
from tests.test_ops_registry import wait_for

pytestmark = pytest.mark.ops_registry


class Client:
    """An HTTP client that keeps the session cookie and never follows redirects."""

    def __init__(self, server: DashboardServer, host_header: str | None = None) -> None:
        self.port = server.server_address[1]
        self.host_header = host_header or f"127.0.0.1:{self.port}"
        self.cookie: str | None = None

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = {"Host": self.host_header, **(headers or {})}
        if self.cookie:
            sent["Cookie"] = self.cookie
        body = None
        if form is not None:
            body = urlencode(form)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        received = {k.lower(): v for k, v in response.getheaders()}
        if "set-cookie" in received:
            self.cookie = received["set-cookie"].split(";", 1)[0]
        return response.status, received, text

    def get(self, path: str) -> tuple[int, dict[str, str], str]:
        return self.request("GET", path)

    def api(self, path: str) -> Any:
        status, _, text = self.get(path)
        assert status == 200, text
        return json.loads(text)

    def login(self, secret: str, user: str = "") -> int:
        return self.request("POST", "/login", {"user": user, "secret": secret})[0]

    def csrf(self, path: str = "/") -> str:
        status, _, text = self.get(path)
        assert status == 200, text
        found = re.search(r'name="csrf-token" content="([0-9a-f]+)"', text)
        assert found, text
        return found.group(1)


@pytest.fixture(autouse=True)
def fast_beats() -> None:
    patch_frame_config(OPS_HEARTBEAT_SECONDS=0.2)


def start(read_only: bool = False, credentials: Credentials | None = None) -> DashboardServer:
    server = make_server("127.0.0.1", 0, credentials=credentials or Credentials.make(), read_only=read_only,
                         service=lambda: OpsService(kinds=[BrokerEnum.PERSISTQUEUE]))
    serve_in_thread(server)
    return server


@pytest.fixture
def server() -> Iterator[DashboardServer]:
    server = start()
    yield server
    server.shutdown()
    server.server_close()


def consumer(queue_name: str, broken: threading.Event | None = None, status: bool = False) -> Any:
    conf = {"function_result_status_persistance_conf": FunctionResultStatusPersistanceConfig(is_save_status=True)}

    @task_deco(queue_name, broker_kind=BrokerEnum.PERSISTQUEUE, max_retry_times=0, is_print_detail_exception=False,
               log_level=logging.CRITICAL, **(conf if status else {}))
    def f(x: Any = None, note: str = "") -> Any:
        if broken is not None and broken.is_set():
            raise ValueError(f"broken {note}")
        return x

    return f


def test_nothing_without_the_token_and_a_signed_httponly_cookie_with_it(server: DashboardServer,
                                                                        queue_name: str) -> None:
    consumer(queue_name).push(1)
    client = Client(server)
    status, headers, _ = client.get("/")
    assert status == 303 and headers["location"] == "/login"
    assert client.get("/api/queues")[0] == 401
    assert client.request("POST", f"/queues/{queue_name}/pause", {"csrf": "x"})[0] == 401
    assert client.login("not the token") == 403
    assert client.cookie is None
    status, headers, _ = client.request("POST", "/login", {"secret": str(server.dashboard.credentials.token)})
    assert status == 303
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    status, headers, page = client.get("/")
    assert status == 200 and queue_name in page
    assert "script-src 'self'" in headers["content-security-policy"] and "default-src 'none'" in \
        headers["content-security-policy"]
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/dashboard.js" defer>']
    assert "style=" not in page and "onclick" not in page
    rows = client.api("/api/queues")["queues"]
    assert [r["depth"] for r in rows if r["queue"] == queue_name] == [1]

    tampered = Client(server)
    tampered.cookie = client.cookie[:-1] + ("0" if client.cookie[-1] != "0" else "1")  # type: ignore[index]
    assert tampered.get("/api/queues")[0] == 401
    bearer = Client(server).request("GET", "/api/queues",
                                    headers={"Authorization": f"Bearer {server.dashboard.credentials.token}"})
    assert bearer[0] == 200
    assert Client(server).get("/metrics")[0] == 401  # Prometheus: a session or the token, like the API
    scrape = Client(server).request("GET", "/metrics",
                                    headers={"Authorization": f"Bearer {server.dashboard.credentials.token}"})
    assert scrape[0] == 200 and "funboost_like_queue_depth" in scrape[2]
    assert Client(server, host_header="evil.example:80").get("/login")[0] == 403  # DNS rebinding
    csrf = client.csrf()
    assert client.request("POST", "/logout", {"csrf": csrf})[0] == 303
    client.cookie = tampered.cookie = None


def test_head_answers_as_get_without_a_body(server: DashboardServer) -> None:
    """An uptime probe's HEAD got 405; HTTP servers must answer HEAD like GET, without the body."""
    client = Client(server)
    status, headers, body = client.request("HEAD", "/login")
    assert status == 200 and body == "" and int(headers["content-length"]) == len(client.get("/login")[2].encode())
    status, headers, body = client.request("HEAD", "/")
    assert status == 303 and headers["location"] == "/login" and body == ""
    bearer = {"Authorization": f"Bearer {server.dashboard.credentials.token}"}
    assert client.request("HEAD", "/api/queues")[0] == 401
    assert client.request("HEAD", "/api/queues", headers=bearer)[:3:2] == (200, "")


def test_a_configured_user_logs_in_with_its_password() -> None:
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored) and not verify_password("wrong", stored)
    server = start(credentials=Credentials.make(user="admin", password_hash=stored))
    try:
        client = Client(server)
        assert "name=\"user\"" in client.get("/login")[2]
        assert client.login("wrong", "admin") == 403
        assert client.login("correct horse", "someone") == 403
        assert client.login("correct horse", "admin") == 303
        assert client.get("/")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_actions_need_the_csrf_token_and_work_with_it(server: DashboardServer, queue_name: str) -> None:
    f = consumer(queue_name)
    f.consume()
    service = OpsService(kinds=[BrokerEnum.PERSISTQUEUE])
    wait_for(lambda: service.workers(queue_name), what="the worker record")
    client = Client(server)
    client.login(str(server.dashboard.credentials.token))
    page = f"/queues/{quote(queue_name)}"
    csrf = client.csrf(page)
    assert client.request("POST", f"{page}/pause", {})[0] == 403
    assert client.request("POST", f"{page}/pause", {"csrf": "0" * 64})[0] == 403
    assert client.request("POST", f"{page}/pause", {"csrf": csrf},
                          headers={"Origin": "http://evil.example"})[0] == 403
    assert service.status(queue_name)["paused"] is False
    status, headers, _ = client.request("POST", f"{page}/pause", {"csrf": csrf})
    assert status == 303 and headers["location"].startswith(page + "?done=")
    assert "confirmed+1" in headers["location"] or "confirmed%201" in headers["location"]
    assert service.status(queue_name)["paused"] is True
    for i in range(3):
        f.push(i)
    assert client.request("POST", f"{page}/purge", {"csrf": csrf, "confirm": "wrong"})[0] == 400
    assert f.get_message_count() == 3
    answer = client.request("POST", f"/api/queues/{quote(queue_name)}/purge", {"confirm": queue_name},
                            headers={"X-CSRF-Token": csrf})
    assert answer[0] == 200 and json.loads(answer[2])["purged"] == 3
    assert client.request("POST", f"{page}/qps", {"csrf": csrf, "qps": "7"})[0] == 303
    assert client.api(f"/api/queues/{quote(queue_name)}")["qps"] == 7
    assert client.request("POST", f"{page}/resume", {"csrf": csrf})[0] == 303
    assert client.api(f"/api/queues/{quote(queue_name)}")["paused"] is False
    for action, form in (("pause", {"wait": "abc"}), ("qps", {"qps": "inf"}), ("qps", {"qps": "x"})):
        # refused before anything is changed (a bad wait answered 400 once the queue was paused already)
        answer = client.request("POST", f"/api/queues/{quote(queue_name)}/{action}", form,
                                headers={"X-CSRF-Token": csrf})
        assert answer[0] == 400 and "must be a" in answer[2]
    status = client.api(f"/api/queues/{quote(queue_name)}")
    assert (status["paused"], status["qps"]) == (False, 7)


def test_delayed_messages_are_listed_with_their_due_time(server: DashboardServer, queue_name: str) -> None:
    f = consumer(queue_name)
    f.publish({"x": 1, "note": "<b>later</b>"}, priority_control_config=PriorityConsumingControlConfig(countdown=600))
    f.push(2)  # ready: not listed
    client = Client(server)
    client.login(str(server.dashboard.credentials.token))
    [row] = client.api(f"/api/queues/{quote(queue_name)}/delayed")
    assert row["body"]["x"] == 1 and 590 < row["due_at"] - time.time() <= 600
    status, _, page = client.get(f"/queues/{quote(queue_name)}/delayed")
    assert status == 200 and "&lt;b&gt;later&lt;/b&gt;" in page and "<b>later</b>" not in page
    assert f'href="/queues/{quote(queue_name)}/delayed"' in client.get(f"/queues/{quote(queue_name)}")[2]
    status, _, text = client.get(f"/api/queues/{quote(queue_name)}/delayed?limit=ten")
    assert status == 400 and "limit must be an integer, got 'ten'" in text  # not Python's own message


def test_read_only_mode_refuses_every_action(queue_name: str) -> None:
    consumer(queue_name).push(1)
    server = start(read_only=True)
    try:
        client = Client(server)
        client.login(str(server.dashboard.credentials.token))
        status, _, page = client.get(f"/queues/{quote(queue_name)}")
        assert status == 200 and "read-only" in page and 'action="/queues' not in page
        csrf = client.csrf()
        assert client.request("POST", f"/queues/{quote(queue_name)}/purge", {"csrf": csrf, "confirm": queue_name}
                              )[0] == 403
        assert client.request("POST", f"/queues/{quote(queue_name)}/pause", {"csrf": csrf})[0] == 403
        assert client.api(f"/api/queues/{quote(queue_name)}")["depth"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_queue_names_arguments_and_errors_are_escaped(server: DashboardServer) -> None:
    name = "q<script>alert(1)</script>"
    broken = threading.Event()
    broken.set()
    f = consumer(name, broken, status=True)
    f.push(x="<img src=x onerror=alert(2)>", note="<b>bold</b>")
    f.consume()
    service = OpsService(kinds=[BrokerEnum.PERSISTQUEUE])
    wait_for(lambda: service.tasks(name, state="failed"), what="the failed record")
    client = Client(server)
    client.login(str(server.dashboard.credentials.token))
    pages = [client.get("/")[2], client.get(f"/queues/{quote(name, safe='')}")[2], client.get("/workers")[2],
             client.get(f"/queues/{quote(name, safe='')}/dead")[2],
             client.get("/tasks?" + urlencode({"queue": name, "q": "<b>"}))[2]]
    task_id = service.tasks(name)[0]["task_id"]
    pages.append(client.get(f"/tasks/{task_id}?" + urlencode({"queue": name}))[2])
    for page in pages:
        assert "<script>alert" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert "q&lt;script&gt;alert(1)&lt;/script&gt;" in pages[0]
    assert "&lt;img src=x onerror=alert(2)&gt;" in pages[5] and "ValueError: broken &lt;b&gt;bold" in pages[5]
    assert task_id in pages[4]


def test_binding_another_address_needs_configured_credentials(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("FUNBOOST_LIKE_WEB_TOKEN", "FUNBOOST_LIKE_WEB_USER", "FUNBOOST_LIKE_WEB_PASSWORD_HASH"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(CredentialsError, match="refusing to listen on '0.0.0.0'"):
        make_server("0.0.0.0", 0)
    assert main(["web", "--host", "0.0.0.0", "--port", "0"]) == 1
    assert "refusing to listen" in capsys.readouterr().err
    with pytest.raises(CredentialsError, match="16"):
        Credentials.make(token="short")
    with pytest.raises(CredentialsError, match="both"):
        Credentials.make(user="admin")
    server = make_server("0.0.0.0", 0, credentials=Credentials.make(token="a-long-configured-token"))
    server.server_close()


def test_task_search_pages_by_keyset_and_filters(server: DashboardServer, queue_name: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    broken = threading.Event()
    f = consumer(queue_name, broken, status=True)
    ids = [f.push(x=i, note=f"n{i}").task_id for i in range(110)]
    f.consume()
    service = OpsService(kinds=[BrokerEnum.PERSISTQUEUE])
    wait_for(lambda: len(service.tasks(queue_name, state="finished", limit=200)) == 110, timeout=15,
             what="110 finished calls")
    broken.set()
    failed_id = f.push(x=999, note="needle").task_id
    wait_for(lambda: service.tasks(queue_name, state="failed"), timeout=15, what="every call record")
    client = Client(server)
    client.login(str(server.dashboard.credentials.token))
    seen: list[str] = []
    cursor = ""
    while True:
        page = client.api("/api/tasks?" + urlencode({"queue": queue_name, "limit": 50, "cursor": cursor}))
        seen += [row["task_id"] for row in page["rows"]]
        if not page["next"]:
            break
        cursor = page["next"]
    assert sorted(seen) == sorted([*ids, failed_id]) and len(seen) == len(set(seen))
    failed = client.api("/api/tasks?" + urlencode({"queue": queue_name, "state": "failed"}))["rows"]
    assert [row["task_id"] for row in failed] == [failed_id]
    found = client.api("/api/tasks?" + urlencode({"queue": queue_name, "q": "NEEDLE"}))["rows"]
    assert [row["task_id"] for row in found] == [failed_id]
    assert [r["task_id"] for r in client.api("/api/tasks?" + urlencode({"queue": queue_name, "id": ids[7]}))["rows"]
            ] == [ids[7]]
    assert client.api("/api/tasks?" + urlencode({"queue": queue_name, "since": "2999-01-01T00:00"}))["rows"] == []
    assert client.get("/api/tasks?" + urlencode({"queue": queue_name, "cursor": "nonsense"}))[0] == 400
    html = client.get("/tasks?" + urlencode({"queue": queue_name, "limit": 50}))[2]
    assert 'id="next"' in html and html.count("<tr>") == 51  # the header and 50 rows
    detail = client.api(f"/api/tasks/{failed_id}?queue={quote(queue_name)}")
    assert detail["kwargs"] == {"x": 999, "note": "needle"} and detail["exception"].startswith("ValueError")
    page = client.get(f"/tasks/{failed_id}?queue={quote(queue_name)}")[2]
    assert "Timeline" in page and "published" in page and "failed" in page
    monkeypatch.setattr(task_search, "SCAN_BUDGET", 30)  # a rare text: several budget-limited stretches
    found, partial, cursor = [], [], None
    while True:
        page = service.search_tasks(queue_name, search='"n3', cursor=cursor, limit=5)
        found += [row["kwargs"]["x"] for row in page["rows"]]
        partial.append(page["partial"])
        cursor = page["next"]
        if cursor is None:
            break
    assert sorted(found) == [3, *range(30, 40)] and True in partial
    assert client.get("/tasks/no-such-task")[0] == 404
    assert client.get(f"/queues/{queue_name}-unknown")[0] == 404


@pytest.mark.parametrize("length", ["-1", "abc", "1e3"])
def test_a_bad_content_length_is_refused_at_once(server: DashboardServer, length: str) -> None:
    """A negative Content-Length read the body until the client closed: each such request held a server
    thread for the 30 s request timeout (a non-number ended the connection with no answer)."""
    import socket

    port = server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {length}\r\n"
                     "Content-Type: application/x-www-form-urlencoded\r\n\r\nsecret=x".encode())
        answer = sock.recv(4096)  # the old server answered nothing within the timeout
    assert answer.startswith(b"HTTP/1.0 400 "), answer


def test_failed_logins_from_ever_more_addresses_are_remembered_within_a_bound(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every address that failed a login was remembered for good (an empty list once its failures were
    old): logins sent from ever more addresses grew the dashboard's memory without end."""
    from funboost_like.web import app

    monkeypatch.setattr(app, "LOGIN_ADDRESSES_KEPT", 50, raising=False)
    dashboard = app.Dashboard(Credentials.make(), port=8000)

    def login(client: str) -> int:
        request = app.Request("POST", "/login", {}, {"host": "127.0.0.1:8000"}, {"secret": "wrong"}, client)
        return dashboard.handle(request).status

    for i in range(500):
        assert login(f"10.0.{i // 256}.{i % 256}") == 403
    assert len(dashboard._failures) <= 50
    for _ in range(app.LOGIN_FAILURES_ALLOWED):  # a recent address is still limited
        assert login("10.9.0.1") == 403
    assert login("10.9.0.1") == 429
    assert login("10.9.0.2") == 403


def test_an_address_is_forgotten_once_its_last_failed_login_is_out_of_the_window() -> None:
    from funboost_like.web.login_failures import LoginFailures

    failures = LoginFailures(allowed=2, window=10.0, max_addresses=100)
    failures.failed("a", 0.0)
    failures.failed("a", 1.0)
    failures.failed("b", 2.0)
    assert failures.refused("a", 5.0) and not failures.refused("b", 5.0)
    assert not failures.refused("a", 10.5) and len(failures) == 2  # one of a's two is recent
    assert not failures.refused("a", 11.5) and len(failures) == 1  # b's is recent
    assert len(failures) == 1 and not failures.refused("b", 12.0) and len(failures) == 0
