"""How ``DirectConnections`` waits for the reply of a ``push``: it polls the socket briefly before blocking.

The polling itself runs on real socket pairs. The rule for when it is used (a ``push``, and only when
no other thread used the same connections in the last ``SHARED_QUIET_SECONDS``) runs against the
real Redis server (database 14 by default, ``FUNBOOST_LIKE_TEST_REDIS_URL``), with a spy that
records each poll and then does it.
"""

from __future__ import annotations

import socket
import threading
import time
import types
from collections.abc import Iterator

import pytest
import redis

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers import redis_common, socket_spin
from funboost_like.brokers.redis_common import _spin_until_readable, direct_connections
from tests.test_redis_brokers import client, queue  # noqa: F401  (fixtures)

ACKED_KINDS = [BrokerEnum.REDIS, BrokerEnum.REDIS_ACK_ABLE, BrokerEnum.RedisBrpopLpush, BrokerEnum.REDIS_STREAM]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.settimeout(5.0)  # like redis-py's sockets: a timeout makes Python poll before each recv
    yield left, right
    left.close()
    right.close()


def as_connection(sock: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(_sock=sock)


def test_polling_ends_as_soon_as_a_reply_is_there(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    right.sendall(b"+OK\r\n")
    started = time.perf_counter()
    _spin_until_readable(as_connection(left), budget=2.0)
    assert time.perf_counter() - started < 1.0
    assert left.recv(16) == b"+OK\r\n"  # polling reads nothing itself


def test_polling_gives_up_after_its_budget(pair: tuple[socket.socket, socket.socket]) -> None:
    left, _ = pair
    started = time.perf_counter()
    _spin_until_readable(as_connection(left), budget=0.05)
    assert 0.05 <= time.perf_counter() - started < 1.0


def test_a_reply_arriving_during_the_poll_ends_it(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    timer = threading.Timer(0.05, right.sendall, args=(b"+OK\r\n",))
    timer.start()
    started = time.perf_counter()
    _spin_until_readable(as_connection(left), budget=5.0)
    elapsed = time.perf_counter() - started
    timer.join()
    assert 0.04 <= elapsed < 2.0


def test_sockets_that_are_not_the_standard_librarys_are_not_polled(pair: tuple[socket.socket, socket.socket]) -> None:
    left, _ = pair

    class CooperativeSocket:  # what gevent or eventlet hand out: their own class, with a real fileno
        fileno = left.fileno

    for sock in (None, CooperativeSocket()):
        started = time.perf_counter()
        _spin_until_readable(as_connection(sock), budget=2.0)
        assert time.perf_counter() - started < 0.5


@pytest.fixture
def polls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every poll ``DirectConnections`` starts, recorded; each still polls."""
    seen: list[object] = []
    real = redis_common._spin_until_readable

    def spy(connection: object, budget: float) -> None:
        seen.append(connection)
        real(connection, budget)

    monkeypatch.setattr(redis_common, "_spin_until_readable", spy)
    monkeypatch.setattr(direct_connections(), "poll_choice", socket_spin.PollChoice())  # its polling trial first
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)  # no sharing seen recently by an earlier test
    return seen


@pytest.mark.parametrize("kind", ACKED_KINDS, ids=[k.name for k in ACKED_KINDS])
def test_push_polls_for_its_reply_when_it_is_the_only_user(client: redis.Redis, queue: str,  # noqa: F811
                                                           kind: BrokerEnum, polls: list[object]) -> None:
    fn = task_deco(queue, broker_kind=kind)(lambda x: x)
    for i in range(20):
        fn.push(i)
    assert len(polls) == 20
    assert fn.get_message_count() == 20
    fn.clear()


def test_push_blocks_while_another_thread_uses_the_connections(client: redis.Redis, queue: str,  # noqa: F811
                                                                         polls: list[object]) -> None:
    fn = task_deco(queue, broker_kind=BrokerEnum.REDIS_STREAM)(lambda x: x)
    fn.push(0)  # opens the queue (creates the group) before the other thread starts
    polls.clear()
    waiting_key = f"{queue}:nothing"
    blocker = threading.Thread(target=direct_connections().execute_command, args=("BLPOP", waiting_key, "1"))
    blocker.start()
    try:
        deadline = time.monotonic() + 5
        while not client.client_list(_type="normal") or not any(
                c.get("cmd") == "blpop" for c in client.client_list(_type="normal")):
            assert time.monotonic() < deadline, "the other thread's BLPOP never reached the server"
            time.sleep(0.01)
        for i in range(1, 11):
            fn.push(i)
        assert polls == []
    finally:
        blocker.join()
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
    fn.push(11)  # alone again
    assert len(polls) == 1
    assert fn.get_message_count() == 12
    fn.clear()


def test_the_poll_choice_keeps_the_way_whose_trial_was_faster_and_tries_both_again_later() -> None:
    choice = socket_spin.PollChoice()
    trial, keep = socket_spin.PollChoice.TRIAL, socket_spin.PollChoice.KEEP
    for polled_takes, blocked_takes, keeps_polling in ((1e-4, 2e-4, True), (3e-4, 1e-4, False)):
        ways = []
        for _ in range(2 * trial + keep):
            ways.append(choice.polls())
            choice.took(polled_takes if ways[-1] else blocked_takes)
        assert ways == [True] * trial + [False] * trial + [keeps_polling] * keep
    ways = []
    for n in range(2 * trial):  # one slow wait does not decide a trial: the median does
        ways.append(choice.polls())
        choice.took(0.05 if n == 0 else 1e-4 if ways[-1] else 2e-4)
    assert choice.polls()


def test_the_poll_choice_keeps_blocking_when_polling_is_not_clearly_faster() -> None:
    """Polling holds a CPU (the server's, other processes', ZeroMQ's I/O threads') beyond the wait it
    measures: a trial that finds it 5% faster is a tie, and a tie goes to blocking."""
    choice = socket_spin.PollChoice()
    for _ in range(2 * socket_spin.PollChoice.TRIAL):
        choice.took(0.95e-4 if choice.polls() else 1e-4)
    assert not choice.polls()


def test_a_push_stops_polling_for_its_reply_while_polling_is_the_slower_way(
        client: redis.Redis, queue: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """On a busy machine polling for the reply holds a CPU the server needs: a push measures both ways
    in turns and keeps the faster (here polling is made slow: each poll costs 2 ms)."""
    polled: list[float] = []

    def slow_poll(connection: object, budget: float) -> None:
        polled.append(budget)
        time.sleep(0.002)

    monkeypatch.setattr(redis_common, "_spin_until_readable", slow_poll)
    connections = direct_connections()
    monkeypatch.setattr(connections, "poll_choice", socket_spin.PollChoice())
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
    trial = socket_spin.PollChoice.TRIAL
    for i in range(2 * trial + 200):
        connections.execute_command("LPUSH", queue, b"%d" % i, spin=True)
    assert len(polled) == trial  # the polling trial, then blocking kept
    assert client.llen(queue) == 2 * trial + 200
    client.delete(queue)


def test_sharing_seen_by_a_push_keeps_the_next_pushes_blocking_for_a_while(client: redis.Redis) -> None:  # noqa: F811
    connections = direct_connections()
    assert not connections.sharing.alone(2)  # another thread holds a connection right now
    assert not connections.sharing.alone(1)  # alone now, but threads that share tend to go on sharing
    time.sleep(2 * socket_spin.SHARED_QUIET_SECONDS)
    assert connections.sharing.alone(1)


def test_pipeline_replies_come_straight_from_hiredis_and_errors_stay_in_place(client: redis.Redis, queue: str,  # noqa: F811
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hiredis")  # the redis extra installs it; CI always has it
    assert redis_common._HIREDIS_PARSER is not None, "redis-py's hiredis parser moved: the fast reply path is off"
    used: list[int] = []
    real = redis_common._read_replies_from_hiredis

    def spy(parser: object, count: int) -> list[object]:
        used.append(count)
        return real(parser, count)

    monkeypatch.setattr(redis_common, "_read_replies_from_hiredis", spy)
    client.set(f"{queue}:string", "x")
    commands = [("RPUSH", queue, b"a" * 70_000)] * 30  # requests and replies over many socket reads
    commands += [("LPUSH", f"{queue}:string", "y"), ("LRANGE", queue, 0, -1), ("GET", f"{queue}:string")]
    replies = direct_connections().pipeline(commands)
    assert used == [len(commands)]
    assert replies[:30] == list(range(1, 31))
    assert isinstance(replies[30], redis.exceptions.ResponseError) and "WRONGTYPE" in str(replies[30])
    assert replies[31] == [b"a" * 70_000] * 30 and replies[32] == b"x"
    assert direct_connections().execute_command("LLEN", queue) == 30  # the connection is in step
    client.delete(f"{queue}:string")
