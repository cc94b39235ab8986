"""HTTPSQS (kind HTTPSQS): what the contract suite does not cover.

No real httpsqs runs here: these tests use the fixture server (tests/httpsqs_server.py), the shared one
on 127.0.0.1:1218 (started by .ci/run or by the session fixture) and, where a test needs a password or
a full queue of its own, a private one on a free port, stopped by its PID.
"""

from __future__ import annotations

import collections
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers.httpsqs_broker import HttpsqsBroker
from funboost_like.brokers.registry import FIXTURES, get_broker
from funboost_like.core.config import patch_frame_config
from funboost_like.core.errors import BrokerError

from .conftest import require_server, subprocess_env
from .httpsqs_server import _httpsqs_server, listening  # noqa: F401 - starts the shared fixture server
from .standin import free_port

SERVER = FIXTURES[BrokerEnum.HTTPSQS]
WORKER = Path(__file__).with_name("contract_worker.py")  # concurrent_num=4, records "s|d <i> <pid>" lines


@pytest.fixture
def broker() -> HttpsqsBroker:
    assert not isinstance(SERVER, tuple) and SERVER.server is not None
    require_server(*SERVER.server)
    patch_frame_config(**SERVER.settings)
    found = get_broker(BrokerEnum.HTTPSQS)
    assert isinstance(found, HttpsqsBroker)
    return found


def serve(*options: str) -> Iterator[int]:
    """A fixture server of a test's own on a free port; stopped by its PID."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("httpsqs_server.py")), "-p", str(port),
                               *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not listening("127.0.0.1", port):
            assert server.poll() is None and time.monotonic() < deadline, "the private fixture server did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture(scope="module")
def private() -> Iterator[int]:
    """A fixture server of this module's own, password "pw"."""
    yield from serve("-a", "pw")


def call(port: int, query: str, body: bytes | None = None, connection: http.client.HTTPConnection | None = None
         ) -> tuple[bytes, dict[str, str]]:
    """One request as any httpsqs client sends it; (answer, headers)."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST" if body is not None else "GET", "/?" + query, body)
    response = conn.getresponse()
    answer = response.read()
    if connection is None:
        conn.close()
    return answer, dict(response.getheaders())


def test_the_fixture_answers_as_httpsqs_1_7_does(private: int) -> None:
    q = "auth=pw&name=proto"
    assert call(private, "auth=bad&name=proto&opt=get")[0] == b"HTTPSQS_AUTH_FAILED"
    assert call(private, "name=proto&opt=status")[0] == b"HTTPSQS_AUTH_FAILED"  # no password: refused too
    keep = http.client.HTTPConnection("127.0.0.1", private, timeout=5)  # one keep-alive connection throughout
    answer, headers = call(private, f"{q}&opt=put&data=" + quote("a%2B b+c"), connection=keep)
    assert (answer, headers["Pos"], headers["Connection"]) == (b"HTTPSQS_PUT_OK", "1", "keep-alive")
    assert call(private, f"{q}&opt=put", b"x%25y+z", connection=keep)[0] == b"HTTPSQS_PUT_OK"  # the body wins
    assert call(private, f"{q}&opt=put", connection=keep)[0] == b"HTTPSQS_PUT_ERROR"  # neither body nor data=
    answer, headers = call(private, f"{q}&opt=get&charset=gb2312", connection=keep)
    assert answer == b"a+ b c"  # data= is URL-decoded twice (libevent's parser, then httpsqs's urldecode)
    assert (headers["Pos"], headers["Content-Type"]) == ("1", "text/plain; charset=gb2312")
    assert call(private, f"{q}&opt=view&pos=2")[0] == b"x%y z"
    assert call(private, f"{q}&opt=status_json")[0] == (
        b'{"name":"proto","maxqueue":1000000,"putpos":2,"putlap":1,"getpos":1,"getlap":1,"unread":1}\n')
    assert b"Number of unread queue: 1\n" in call(private, f"{q}&opt=status")[0]
    assert call(private, f"{q}&opt=get")[0] == b"x%y z"
    answer, headers = call(private, f"{q}&opt=get")
    assert answer == b"HTTPSQS_GET_END" and "Pos" not in headers
    assert call(private, f"{q}&opt=maxqueue&num=9")[0] == b"HTTPSQS_ERROR"  # 10 .. 10^9
    assert call(private, f"{q}&opt=maxqueue&num=10")[0] == b"HTTPSQS_MAXQUEUE_OK"
    answers = [call(private, f"{q}&opt=put&data={i}")[0] for i in range(10)]
    assert answers == [b"HTTPSQS_PUT_OK"] * 9 + [b"HTTPSQS_PUT_END"]  # the ring wrapped to 1, then met the reader
    wrapped = b'"putpos":1,"putlap":2,"getpos":2,"getlap":1,"unread":9}\n'
    assert call(private, f"{q}&opt=status_json")[0].endswith(wrapped)
    assert call(private, f"{q}&opt=maxqueue&num=20")[0] == b"HTTPSQS_MAXQUEUE_CANCEL"  # the put position wrapped
    assert call(private, f"{q}&opt=synctime&num=3")[0] == b"HTTPSQS_SYNCTIME_OK"
    assert call(private, f"{q}&opt=reset")[0] == b"HTTPSQS_RESET_OK"
    assert call(private, f"{q}&opt=get")[0] == b"HTTPSQS_GET_END"
    assert call(private, f"{q}&opt=view&pos=2")[0] == b"x%y z"  # reset forgets positions, not records
    assert call(private, f"{q}&opt=nothing")[0] == call(private, "auth=pw&opt=get")[0] == b"HTTPSQS_ERROR"
    keep.close()


def test_bodies_travel_byte_for_byte_and_other_clients_share_the_queues(broker: HttpsqsBroker, queue_name: str) -> None:
    bodies = [b'{"a": "100% + & = ? #"}', "{\"t\": \"\u00e9\u4e2d\"}".encode(), b"", b"\x1elooks framed",
              b"HTTPSQS_GET_END", b"\xff\xfe not utf-8"]
    patch_frame_config(HTTPSQS_PIPELINE=2)  # several windows on one connection
    broker.publish_many(queue_name, bodies)
    got = broker.fetch(queue_name, 10, 1.0)
    assert [d.body for d in got] == bodies and {d.attempts for d in got} == {1}
    broker.ack(got)
    # Another client's message is a body like any other; ours is stored as the body alone.
    port = SERVER.server[2] if not isinstance(SERVER, tuple) and SERVER.server else 0
    auth = "auth=fixture-secret"
    assert call(port, f"{auth}&name={queue_name}&opt=put&data=" + quote('{"x": 1}'))[0] == b"HTTPSQS_PUT_OK"
    broker.publish(queue_name, b'{"y": 2}')
    putpos = json.loads(call(port, f"{auth}&name={queue_name}&opt=status_json")[0])["putpos"]
    assert call(port, f"{auth}&name={queue_name}&opt=view&pos={putpos}")[0] == b'{"y": 2}'
    assert [d.body for d in broker.fetch(queue_name, 5, 1.0)] == [b'{"x": 1}', b'{"y": 2}']
    with pytest.raises(BrokerError, match="NUL"):
        broker.publish(queue_name, b"a\0b")


def test_wrong_password_and_full_queue_fail_clearly(private: int, queue_name: str) -> None:
    patch_frame_config(HTTPSQS_URL=f"http://127.0.0.1:{private}/?auth=wrong-secret")
    broker = HttpsqsBroker()
    try:
        with pytest.raises(BrokerError, match="AUTH_FAILED") as refused:
            broker.publish(queue_name, b"{}")
        assert "wrong-secret" not in str(refused.value) and "auth=***" in str(refused.value)
        patch_frame_config(HTTPSQS_URL=f"http://127.0.0.1:{private}/?auth=pw")
        assert call(private, f"auth=pw&name={queue_name}&opt=maxqueue&num=10")[0] == b"HTTPSQS_MAXQUEUE_OK"
        with pytest.raises(BrokerError, match="full"):
            broker.publish_many(queue_name, [b"{}"] * 11)
        assert broker.count(queue_name) == 10  # the first ten were stored
    finally:
        broker.close()


def test_connections_the_server_closed_while_idle_are_replaced(queue_name: str) -> None:
    for port in serve("-t", "0.3"):  # a keep-alive timeout of 0.3 s (httpsqs -t)
        patch_frame_config(HTTPSQS_URL=f"http://127.0.0.1:{port}/")
        broker = HttpsqsBroker()
        try:
            broker.publish(queue_name, b"1")
            time.sleep(0.6)  # the server closes the pooled connection meanwhile
            broker.publish(queue_name, b"2")
            time.sleep(0.6)
            broker.publish_many(queue_name, [b"3", b"4"])
            assert [d.body for d in broker.fetch(queue_name, 10, 1.0)] == [b"1", b"2", b"3", b"4"]
        finally:
            broker.close()


def plain(x: int) -> int:
    return x


def test_decoration_time_refuses_what_httpsqs_cannot_do() -> None:
    with pytest.raises(ValueError, match="252"):
        task_deco("q" * 253, broker_kind=BrokerEnum.HTTPSQS)(plain)
    task_deco("q" * 252, broker_kind=BrokerEnum.HTTPSQS, retry_backoff=1.0)(plain)  # delays are emulated
    for unsupported in ({"is_using_rpc_mode": True}, {"do_task_filtering": True},
                        {"broker_exclusive_config": {"exchange_name": "x", "exchange_type": "fanout"}}):
        with pytest.raises(ValueError):
            task_deco("q1", broker_kind=BrokerEnum.HTTPSQS, **unsupported)(plain)  # type: ignore[call-overload]


def test_a_delayed_message_waits_in_the_consumer_and_goes_back_at_close(broker: HttpsqsBroker,
                                                                      queue_name: str) -> None:
    other = HttpsqsBroker()  # another process's view of the server
    try:
        broker.publish(queue_name, b'{"later":1}', not_before=time.time() + 60)
        broker.publish(queue_name, b'{"soon":1}', not_before=time.time() + 0.5)
        broker.publish(queue_name, b'{"now":1}')
        [now] = broker.fetch(queue_name, 5, 0.2)  # the two delayed ones are parked, not returned
        assert now.body == b'{"now":1}'
        assert broker.count(queue_name) == 2 and other.count(queue_name) == 0
        [soon] = broker.fetch(queue_name, 5, 3.0)
        assert soon.body == b'{"soon":1}' and soon.attempts == 1
        broker.nack(soon, delay=0.3)
        [again] = broker.fetch(queue_name, 5, 3.0)
        assert again.body == b'{"soon":1}' and again.attempts == 2
        broker.ack([now, again])
        broker.close()  # the parked one goes back to the server, due time kept
        assert other.count(queue_name) == 1
        assert other.fetch(queue_name, 1, 0.2) == []  # still not due: parked by the other now
    finally:
        other.purge(queue_name)
        other.close()


def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_killed_consumer_loses_at_most_what_it_held_and_nothing_runs_twice(
        broker: HttpsqsBroker, queue_name: str, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    total, record = 30, tmp_path / "record"
    settings = {} if isinstance(SERVER, tuple) else SERVER.settings
    env = subprocess_env(tmp_path / "sqlite_queues", **{f"FUNBOOST_LIKE_{k}": str(v) for k, v in settings.items()})
    broker.publish_many(queue_name, [json.dumps({"i": i, "seconds": 0.1}).encode() for i in range(total)])

    def lines() -> list[tuple[str, int, int]]:
        text = record.read_text() if record.exists() else ""
        return [(kind, int(i), int(pid)) for kind, i, pid in (line.split() for line in text.splitlines())]

    def start() -> subprocess.Popen[bytes]:
        children.append(subprocess.Popen([sys.executable, str(WORKER), queue_name, str(int(BrokerEnum.HTTPSQS)),
                                          str(record), "plain"], env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT))
        return children[-1]

    first = start()
    eventually(lambda: sum(kind == "d" for kind, _, _ in lines()) >= 4, 30, "the first calls to finish")
    first.kill()
    first.wait(10)
    second = start()

    def finished() -> bool:
        seen = lines()
        done = {i for kind, i, _ in seen if kind == "d"}
        return broker.count(queue_name) == 0 and {i for kind, i, pid in seen if pid == second.pid} <= done

    eventually(lambda: any(pid == second.pid for _, _, pid in lines()) and finished(), 30, "the rest to run")
    started = collections.Counter(i for kind, i, _ in lines() if kind == "s")
    done = {i for kind, i, _ in lines() if kind == "d"}
    lost = set(range(total)) - done
    assert max(started.values()) == 1  # at-most-once: nothing ran twice
    assert len(lost) <= 4  # what the killed consumer held: at most its concurrent_num (its free room)
    print(f"lost {len(lost)} of {total} calls to one SIGKILL")
