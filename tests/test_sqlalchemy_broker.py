"""Behaviour of the SQLACHEMY broker beyond the shared contract suite.

Several consumer processes on one table, the settings (the seed's alias, the default URL), tables
created on first use and never at import, passwords kept out of logs and errors, and PostgreSQL's
LISTEN/NOTIFY wake-up. Real servers (DESIGN §8): PostgreSQL and MariaDB skip on a laptop without
them and fail in CI; SQLite always runs.
"""

from __future__ import annotations

import collections
import logging
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from funboost_like import BrokerEnum, task_deco
from funboost_like.brokers.base import Delivery
from funboost_like.brokers.registry import get_broker
from funboost_like.core.config import patch_frame_config, settings
from funboost_like.core.errors import BrokerConnectionError, ConfigurationError, MessageTooLargeError

from .conftest import require_server, subprocess_env, until

sa = pytest.importorskip("sqlalchemy")

from funboost_like.brokers.sqlalchemy_broker import SqlAlchemyBroker, engine_url  # noqa: E402
from funboost_like.brokers.sqlalchemy_tables import table_name  # noqa: E402

POSTGRESQL = os.environ.get("FUNBOOST_LIKE_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB = os.environ.get("FUNBOOST_LIKE_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
DATABASES = {"postgresql": (POSTGRESQL, ("PostgreSQL", "127.0.0.1", 5432)),
             "mariadb": (MARIADB, ("MariaDB", "127.0.0.1", 3306)),
             "sqlite": ("", None)}  # "": a SQLite file in the test's SQLITE_QUEUES_PATH


@pytest.fixture(params=list(DATABASES))
def url(request: pytest.FixtureRequest) -> str:
    """Each database in turn (its URL set as SQLALCHEMY_URL)."""
    url, server = DATABASES[request.param]
    if server is not None:
        require_server(*server)
    patch_frame_config(SQLALCHEMY_URL=url)
    return url


@pytest.fixture
def broker(url: str, queue_name: str) -> Iterator[SqlAlchemyBroker]:
    b = SqlAlchemyBroker()
    yield b
    b.drop_tables(queue_name)
    b.close()


CONSUMER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from funboost_like.brokers.registry import get_broker

    queue, sync = sys.argv[1], Path(sys.argv[2])
    broker = get_broker(10)
    broker.count(queue)  # connected, tables there: ready
    (sync / f"ready-{sys.argv[3]}").touch()
    while not (sync / "go").exists():
        time.sleep(0.005)
    seen, idle_since = [], time.monotonic()
    while time.monotonic() - idle_since < 1.0:
        got = broker.fetch(queue, 20, 0.1)
        if got:
            seen += [d.body.decode() for d in got]
            broker.ack(got)
            idle_since = time.monotonic()
            time.sleep(0.002)  # a breath between batches: SQLite's busy wait is not fair to the other process
    print(" ".join(seen))
    """
)


def test_two_consumer_processes_never_take_one_message_twice(broker: SqlAlchemyBroker, queue_name: str,
                                                             tmp_path: Path) -> None:
    total = 600
    broker.publish_many(queue_name, [str(i).encode() for i in range(total)])
    sync = tmp_path / "sync"
    sync.mkdir()
    env = subprocess_env(tmp_path / "sqlite_queues", FUNBOOST_LIKE_SQLALCHEMY_URL=str(settings.get("SQLALCHEMY_URL")))
    children = [subprocess.Popen([sys.executable, "-c", CONSUMER, queue_name, str(sync), str(i)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 30
        while len(list(sync.glob("ready-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        (sync / "go").touch()
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(5)
    assert [child.returncode for child in children] == [0, 0], [err.strip().splitlines()[-6:] for _, err in outputs]
    per_child = [out.split() for out, _ in outputs]
    counts = collections.Counter(body for seen in per_child for body in seen)
    assert set(counts) == {str(i) for i in range(total)}
    assert set(counts.values()) == {1}
    assert all(per_child)  # both really took part
    assert broker.count(queue_name) == 0


def test_ack_and_fetch_is_one_transaction_and_keeps_order(broker: SqlAlchemyBroker, queue_name: str) -> None:
    broker.publish_many(queue_name, [b"1", b"2", b"3"])
    first = broker.fetch(queue_name, 1, 1.0)
    second = broker.ack_and_fetch(first, queue_name, 5, 1.0)
    assert [d.body for d in second] == [b"2", b"3"]
    broker.ack(second)
    assert broker.count(queue_name) == 0 and broker.fetch(queue_name, 5, 0.05) == []


def test_tables_are_named_from_the_queue() -> None:
    assert table_name("orders") == f"fl_orders_{table_name('orders')[-8:]}"
    assert table_name("Orders") != table_name("orders")  # the hash tells case apart
    long = table_name("x" * 300 + ".y/z")
    assert len(long) <= 48 and long.isidentifier() and long.startswith("fl_xxxx")


def test_seed_spelling_is_an_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert engine_url() == f"sqlite:///{tmp_path / 'sqlite_queues' / 'sqlalchemy_queues.sqlite3'}"  # the default
    patch_frame_config(SQLACHEMY_ENGINE_URL="sqlite:///seed.db")
    assert engine_url() == "sqlite:///seed.db" and settings.get("SQLACHEMY_ENGINE_URL") == "sqlite:///seed.db"
    patch_frame_config(SQLACHEMY_ENGINE_URL="sqlite:///seed.db", SQLALCHEMY_URL="sqlite:///new.db")
    assert engine_url() == "sqlite:///new.db"  # both at one level: the correct spelling wins
    settings.reset()
    monkeypatch.setenv("FUNBOOST_LIKE_SQLACHEMY_ENGINE_URL", "sqlite:///from-env.db")
    assert engine_url() == "sqlite:///from-env.db"


def test_tables_are_created_on_first_use_never_at_import(tmp_path: Path) -> None:
    folder = tmp_path / "sqlite_queues"
    code = ("import funboost_like, funboost_like.brokers.sqlalchemy_broker\n"
            "from funboost_like import task_deco\n"
            "from funboost_like.brokers.registry import get_broker\n"
            "get_broker(10)\n"
            "task_deco('jobs', broker_kind=10)(lambda x: x)\n")
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(folder, FUNBOOST_LIKE_SQLALCHEMY_URL=""),
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not folder.exists()  # no SQLite file, not even its folder
    broker = get_broker(BrokerEnum.SQLACHEMY)
    assert isinstance(broker, SqlAlchemyBroker)
    assert broker.count("jobs") == 0  # first use
    assert (folder / "sqlalchemy_queues.sqlite3").exists()
    assert sa.inspect(broker.engine()).has_table(table_name("jobs"))


def test_first_use_creates_the_tables_on_a_server(broker: SqlAlchemyBroker, queue_name: str) -> None:
    inspector = sa.inspect(broker.engine())
    assert not inspector.has_table(table_name(queue_name))
    broker.publish(queue_name, b"{}")
    names = set(sa.inspect(broker.engine()).get_table_names())
    assert {table_name(queue_name), table_name(queue_name) + "_dl"} <= names
    assert table_name(queue_name) + "_kv" not in names  # made by the first use of the records
    broker.key_value_store(queue_name, "results").put("k", b"v", None)
    assert table_name(queue_name) + "_kv" in set(sa.inspect(broker.engine()).get_table_names())


def test_password_never_reaches_a_log_or_an_error(caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cretPW"
    unreachable = f"postgresql+psycopg://postgres:{secret}@127.0.0.1:1/test"
    patch_frame_config(SQLACHEMY_ENGINE_URL=unreachable)
    assert secret not in repr(settings.as_dict())
    broker = SqlAlchemyBroker()
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(BrokerConnectionError) as failed:
            broker.publish("jobs", b"{}")
        logging.getLogger("funboost_like").exception("logged with the error: %s", failed.value)
    assert "127.0.0.1" in str(failed.value) and secret not in str(failed.value)
    assert "\n" not in str(failed.value)  # one log line (psycopg's and SQLAlchemy's texts hold newlines)
    assert secret not in caplog.text
    patch_frame_config(SQLALCHEMY_URL=f"nosuchdb+driver://user:{secret}@host/db")
    with pytest.raises(ConfigurationError) as bad:
        SqlAlchemyBroker().count("jobs")
    assert secret not in str(bad.value)
    broker.close()


def test_end_to_end_with_rpc_results(url: str, queue_name: str) -> None:
    @task_deco(queue_name, broker_kind=BrokerEnum.SQLACHEMY, is_using_rpc_mode=True, concurrent_num=2)
    def add(x: int, y: int) -> int:
        return x + y

    try:
        add.consume()
        assert add.push(1, 2).result == 3  # type: ignore[union-attr]
    finally:
        add.stop()
        broker = get_broker(BrokerEnum.SQLACHEMY)
        assert isinstance(broker, SqlAlchemyBroker)
        broker.drop_tables(queue_name)


def test_listen_wakes_an_idle_consumer_at_once(queue_name: str) -> None:
    require_server("PostgreSQL", "127.0.0.1", 5432)
    patch_frame_config(SQLALCHEMY_URL=POSTGRESQL)
    broker = SqlAlchemyBroker()
    broker.count(queue_name)
    latencies = []
    try:
        for _ in range(3):
            waiting = threading.Event()
            got: list[Delivery] = []

            def fetch(waiting: threading.Event, got: list[Delivery]) -> None:
                waiting.set()
                got.extend(broker.fetch(queue_name, 1, 5.0))

            consumer = threading.Thread(target=fetch, args=(waiting, got))
            consumer.start()
            waiting.wait(5)
            time.sleep(0.3)  # no event says "blocked in LISTEN": give it time to get past its first poll slice
            sent = time.perf_counter()
            broker.publish(queue_name, b"{}")
            consumer.join(10)
            latencies.append(time.perf_counter() - sent)
            broker.ack(got)
        assert statistics.median(latencies) < 0.1, latencies  # polling every 0.25 s would average 0.125 s
    finally:
        broker.drop_tables(queue_name)
        broker.close()


def test_registered() -> None:
    assert type(get_broker(BrokerEnum.SQLACHEMY)) is SqlAlchemyBroker


def test_an_ack_sent_again_after_an_outage_keeps_its_lease_meanwhile(queue_name: str) -> None:
    """A consumer whose link to the database drops while a call finishes defers the ack until its next fetch,
    which may be in back-off for 30 s. The row was no longer renewed meanwhile: its lease ran out and
    another consumer ran the finished call again, counted as a death of a live process (three such
    outages dead-lettered a healthy message as poison). Now a deferred settlement is renewed until sent."""
    from .tcp_cut import CuttableLink

    require_server("PostgreSQL", "127.0.0.1", 5432)
    link = CuttableLink(5432)
    patch_frame_config(SQLALCHEMY_URL=POSTGRESQL.replace(":5432/", f":{link.port}/"), SQLALCHEMY_LEASE_SECONDS=1.5)
    a = SqlAlchemyBroker()  # through the link
    a.count(queue_name)  # its engine is made now, on the link's URL
    patch_frame_config(SQLALCHEMY_URL=POSTGRESQL)
    b = SqlAlchemyBroker()  # another consumer, direct
    try:
        b.publish(queue_name, b'{"x": 1}')
        (held,) = a.fetch(queue_name, 1, timeout=5)
        link.cut()
        with pytest.raises(BrokerConnectionError):
            a.ack([held])  # the call finished; the ack is kept to be sent again
        link.restore()
        deadline = time.monotonic() + 3 * 1.5  # three leases: the lease would have run out twice
        while time.monotonic() < deadline:
            assert b.fetch(queue_name, 1, timeout=0.3) == [], "another consumer took a finished call"
        assert a.fetch(queue_name, 1, timeout=0) == []  # sends the ack first
        assert b.count(queue_name) == 0 and b.in_flight(queue_name) == 0
    finally:
        link.close()
        b.drop_tables(queue_name)
        a.close()
        b.close()


def test_a_message_over_max_allowed_packet_is_refused_as_too_large_not_as_an_outage(queue_name: str) -> None:
    """MariaDB drops the connection of a statement over its max_allowed_packet (16 MiB by default), which
    the driver reports as "server has gone away": the publisher was told the database was unreachable."""
    require_server("MariaDB", "127.0.0.1", 3306)
    patch_frame_config(SQLALCHEMY_URL=MARIADB)
    broker = SqlAlchemyBroker()
    try:
        with broker.engine().connect() as conn:
            limit = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar())
        huge = b'{"x": "' + b"y" * limit + b'"}'
        broker.bind(queue_name, f"{queue_name}_x", "direct", ["k"])
        for publish in (lambda: broker.publish(queue_name, huge),
                        lambda: broker.publish_many(queue_name, [b"{}", huge]),
                        lambda: broker.publish_routed(f"{queue_name}_x", "k", [huge])):
            with pytest.raises(MessageTooLargeError, match=f"max_allowed_packet of {limit:,} bytes"):
                publish()
        broker.publish(queue_name, b'{"small": 1}')  # the broker goes on
        assert broker.count(queue_name) == 1
        with pytest.raises(BrokerConnectionError):  # a real outage of a large publish is still one
            patch_frame_config(SQLALCHEMY_URL="mysql+pymysql://root@127.0.0.1:1/test")
            SqlAlchemyBroker().publish(queue_name, b"y" * (2 << 20))
    finally:
        broker.drop_tables(queue_name)
        broker.close()


EVENTLET_SCRIPT = """
import eventlet; eventlet.monkey_patch()
import time
from funboost_like import BrokerEnum, ConcurrentModeEnum, patch_frame_config, task_deco

patch_frame_config(SQLALCHEMY_URL={url!r})
done, ticks = [], []

@task_deco({queue!r}, broker_kind=BrokerEnum.SQLACHEMY, concurrent_mode=ConcurrentModeEnum.EVENTLET,
           concurrent_num=20)
def f(x):
    time.sleep(0.02)
    done.append(x)

f.publish_many([{{"x": i}} for i in range(60)])
f.consume()
started = time.monotonic()
while len(done) < 60 and time.monotonic() - started < 20:
    time.sleep(0.1)
    ticks.append(1)
print("DONE", len(done), len(set(done)), len(ticks), round(time.monotonic() - started, 2), flush=True)
f.stop()
f.consumer.join(10)
SqlAlchemy = __import__("funboost_like.brokers.sqlalchemy_broker", fromlist=["x"]).SqlAlchemyBroker
SqlAlchemy().drop_tables({queue!r})
"""


def test_eventlet_on_postgresql_never_blocks_the_other_green_threads(isolated_settings: Path, tmp_path: Path,
                                                                      queue_name: str) -> None:
    """psycopg waited in C under eventlet (it yields only for gevent), blocking every green thread: a
    LISTEN wait froze the process, calls stalled until their leases ran out and ran twice, and SIGTERM
    went unheard. Now it waits in the patched select()."""
    pytest.importorskip("eventlet")
    require_server("PostgreSQL", "127.0.0.1", 5432)
    script = tmp_path / "eventlet_pg.py"
    script.write_text(textwrap.dedent(EVENTLET_SCRIPT.format(url=POSTGRESQL, queue=queue_name)))
    env = {k: v for k, v in subprocess_env(isolated_settings).items() if k != "PSYCOPG_WAIT_FUNC"}
    proc = subprocess.run([sys.executable, "-W", "ignore", str(script)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, runs, distinct, ticks, seconds = [ln for ln in proc.stdout.splitlines() if ln.startswith("DONE")][0].split()
    assert (runs, distinct) == ("60", "60")
    assert float(seconds) < 5.0  # 60 x 20 ms, 20 at a time: well under a second when nothing blocks
    assert int(ticks) >= 1


@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_a_connection_the_server_closed_is_replaced_without_failing_the_push(queue_name: str, database: str) -> None:
    """The server closed the idle connections (a restart, MariaDB's wait_timeout, a proxy) while the
    database stayed up: the next push raised BrokerConnectionError, one per stale connection, and the
    message was not stored. It now runs again on a fresh connection."""
    from .tcp_cut import CuttableLink

    url, server = DATABASES[database]
    assert server is not None
    require_server(*server)
    link = CuttableLink(server[2])
    patch_frame_config(SQLALCHEMY_URL=url.replace(f":{server[2]}/", f":{link.port}/"))
    broker = SqlAlchemyBroker()
    try:
        broker.publish(queue_name, b'{"x": 0}')  # a kept autocommit connection
        broker.publish_many(queue_name, [b'{"x": 1}', b'{"x": 2}'])  # a pooled one
        link.cut()  # both are reset by the "server"; it is back at once
        link.restore()
        broker.publish(queue_name, b'{"x": 3}')
        broker.publish_many(queue_name, [b'{"x": 4}', b'{"x": 5}'])
        got = broker.fetch(queue_name, 10, timeout=5)
        assert sorted(d.body for d in got) == [f'{{"x": {i}}}'.encode() for i in range(6)]
        broker.ack(got)
    finally:
        broker.drop_tables(queue_name)
        broker.close()
        link.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_a_server_that_accepts_and_never_answers_fails_the_push_in_bounded_time(
        queue_name: str, database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg and pymysql wait without end for a server that accepts and says nothing (frozen, or a black
    hole on the way): a push hung for minutes. The broker bounds the connection (10 s by default; 1 s here)
    unless the URL sets the driver's own timeouts."""
    import socket

    from funboost_like.brokers import sqlalchemy_tables

    monkeypatch.setattr(sqlalchemy_tables, "CONNECT_TIMEOUT", 1)
    monkeypatch.setattr(sqlalchemy_tables, "READ_TIMEOUT", 1)
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    url = DATABASES[database][0]
    patch_frame_config(SQLALCHEMY_URL=url.replace(f":{DATABASES[database][1][2]}/", f":{port}/"))  # type: ignore[index]
    broker = SqlAlchemyBroker()
    try:
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            broker.publish(queue_name, b"{}")
        assert time.monotonic() - started < 20  # libpq waits 2 s at least, per address and try
    finally:
        broker.close()
        silent.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_a_consumer_whose_link_goes_silent_mid_fetch_reconnects_once_it_is_back(
        queue_name: str, database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The path to the database went silent during a fetch (a proxy that stops forwarding: no reset, the
    packets it still acknowledges never arrive): psycopg waited in recv forever, so the consumer never
    fetched again, even once the path was back. Now a wait for the server ends after READ_TIMEOUT
    seconds of silence (60 s by default; 1 s here), the outage is logged once and the consumer goes on."""
    from funboost_like.brokers import sqlalchemy_tables

    from .tcp_cut import CuttableLink, ride_out_a_silence

    url, server = DATABASES[database]
    assert server is not None
    require_server(*server)
    monkeypatch.setattr(sqlalchemy_tables, "CONNECT_TIMEOUT", 1)
    monkeypatch.setattr(sqlalchemy_tables, "READ_TIMEOUT", 1)
    caplog.set_level(logging.INFO, logger="funboost_like")
    link = CuttableLink(server[2])
    patch_frame_config(SQLALCHEMY_URL=url.replace(f":{server[2]}/", f":{link.port}/"), SQLALCHEMY_LEASE_SECONDS=3)
    consumer_broker = get_broker(BrokerEnum.SQLACHEMY)
    consumer_broker.count(queue_name)  # its engine is made now, on the link's URL
    patch_frame_config(SQLALCHEMY_URL=url)
    direct = SqlAlchemyBroker()
    done: dict[int, threading.Event] = {1: threading.Event(), 2: threading.Event()}

    @task_deco(queue_name, broker_kind=BrokerEnum.SQLACHEMY, concurrent_num=1)
    def f(x: int) -> None:
        done[x].set()

    try:
        f.consume()
        direct.publish(queue_name, b'{"x": 1}')
        assert done[1].wait(10)
        rows = sa.text(f"SELECT COUNT(*) FROM {table_name(queue_name)}")

        def stored() -> int:
            with direct.engine().connect() as conn:
                return int(conn.execute(rows).scalar_one())

        assert until(lambda: stored() == 0, timeout=10)  # its ack went through
        ride_out_a_silence(link, lambda: direct.publish(queue_name, b'{"x": 2}'), done[2], stored, caplog)
    finally:
        f.stop()
        link.close()
        direct.drop_tables(queue_name)
        direct.close()


def test_the_urls_own_timeouts_and_keepalives_win(queue_name: str) -> None:
    """The broker's bounds on a silent server are defaults: what the URL's query sets is what the driver
    gets (``read_timeout`` on psycopg is the broker's, not passed to libpq, which would refuse it)."""
    from funboost_like.brokers import sql_psycopg
    from funboost_like.brokers.sqlalchemy_tables import READ_TIMEOUT, driver_timeouts

    given = sa.make_url(f"{POSTGRESQL}?keepalives_idle=20&read_timeout=7")
    assert driver_timeouts(given) == {"connect_timeout": 10, **{k: v for k, v in sql_psycopg.libpq_options().items()
                                                                if k != "keepalives_idle"}}
    assert driver_timeouts(sa.make_url(f"{MARIADB}?read_timeout=5")) == {"connect_timeout": 10, "write_timeout": 60}
    assert driver_timeouts(sa.make_url(POSTGRESQL))["read_timeout"] == READ_TIMEOUT
    require_server("PostgreSQL", "127.0.0.1", 5432)
    patch_frame_config(SQLALCHEMY_URL=given.render_as_string(hide_password=False))
    broker = SqlAlchemyBroker()
    try:
        def conninfo(raw: Any) -> dict[str, bytes | None]:
            return {option.keyword.decode(): option.val for option in raw.pgconn.info}

        with broker.engine().connect() as conn:
            raw: Any = conn.connection.dbapi_connection
            assert raw.read_timeout == 7 and conninfo(raw)["keepalives_idle"] == b"20"
            assert conninfo(raw)["keepalives"] == b"1"
        broker.count(queue_name)
        broker.publish(queue_name, b"{}")
        broker._wait(queue_name, 0.3)  # the LISTEN connection, too
        listening = broker._listener.connection
        assert listening.read_timeout == 7 and conninfo(listening)["keepalives_idle"] == b"20"
        assert [d.body for d in broker.fetch(queue_name, 1, 5)] == [b"{}"]
    finally:
        broker.drop_tables(queue_name)
        broker.close()
