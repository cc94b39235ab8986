"""Shared fixtures: every test gets its own SQLite folder and fresh settings, and no consumer outlives it."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

if sys.platform != "win32":
    import fcntl

os.environ.setdefault("FUNBOOST_LIKE_NO_USER_CONFIG", "1")

from funboost_like.brokers import registry  # noqa: E402
from funboost_like.core import runtime  # noqa: E402
from funboost_like.core.config import patch_frame_config, settings  # noqa: E402

from .httpsqs_server import _httpsqs_server  # noqa: E402, F401 - starts the HTTPSQS fixture when its tests run
from .kafka_server import _kafka_servers  # noqa: E402, F401 - starts Tansu / the mock cluster when Kafka tests run
from .mongo_server import _listening as _mongo_listening  # noqa: E402
from .mongo_server import _mongo_server  # noqa: E402, F401 - starts SecantusDB when MongoDB tests run
from .mongo_server import drop_leftovers as _drop_mongo_leftovers  # noqa: E402
from .nsqd_server import _nsqd_server  # noqa: E402, F401 - starts the fixture nsqd when NSQ tests run
from .pulsar_server import _pulsar_server  # noqa: E402, F401 - starts pulsar-lite when Pulsar tests run

CI = bool(os.environ.get("CI"))
# Set while another test session shares the servers: what tests left there is in use, not deleted at the end.
KEEP_LEFTOVERS = bool(os.environ.get("FUNBOOST_LIKE_TEST_KEEP_LEFTOVERS")
                      or os.environ.get("FUNBOOST_LIKE_TEST_KEEP_RABBITMQ"))
REPO = Path(__file__).resolve().parent.parent

# What the tests leave on the shared RabbitMQ server: queues and exchanges named <word>_<hex> (and their
# records, fl.kv.<queue>..., and the quorum queues fl.routed.<exchange> of delayed routed publishes), deleted
# when the session ends so runs do not pile them up.
_RABBITMQ_LEFTOVER = re.compile(r"^(fl\.kv\.|fl\.routed\.)?[a-z_]+_[0-9a-f]{8,}(_[a-z]+)?([.:].*)?$")


def _rabbitmq_names(what: str) -> list[str]:
    try:
        done = subprocess.run(["rabbitmqctl", "-q", f"list_{what}", "name"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [name for name in done.stdout.split() if _RABBITMQ_LEFTOVER.match(name)] if done.returncode == 0 else []


def _clean_rabbitmq() -> None:
    if not server_reachable("127.0.0.1", 5672):
        return
    try:
        import pika
    except ImportError:
        return
    queues, exchanges = _rabbitmq_names("queues"), _rabbitmq_names("exchanges")
    if not queues and not exchanges:
        return
    connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F"))
    try:
        channel = connection.channel()
        for name in queues:
            channel.queue_delete(name)
        for name in exchanges:
            channel.exchange_delete(name)
    finally:
        connection.close()


# The SQL servers' databases the tests use, and the tables a test queue leaves there (fl_test_<hex>_...);
# the Django ORM queue's tables keep rows of test queues (test_<hex>...) that killed workers held.
_SQL_SERVERS = {5432: "postgresql+psycopg://postgres@127.0.0.1:5432/test",
                3306: "mysql+pymysql://root@127.0.0.1:3306/test"}
_SQL_LEFTOVER = re.compile(r"^fl_test_[0-9a-f]{6,}")
_DJANGO_TABLES = ("funboost_like_message", "funboost_like_dead_letter", "funboost_like_record", "funboost_like_binding")


def _drop_sql_leftovers() -> None:
    try:
        import sqlalchemy as sa
    except ImportError:
        return
    urls = [url for port, url in _SQL_SERVERS.items() if server_reachable("127.0.0.1", port)]
    urls += [f"sqlite:///{path}" for path in Path(tempfile.gettempdir()).glob("funboost_like_django_tests*.sqlite3")]
    for url in urls:
        try:
            engine = sa.create_engine(url)
        except ImportError:
            continue
        try:
            with engine.begin() as conn:
                quote = engine.dialect.identifier_preparer.quote
                tables = set(sa.inspect(conn).get_table_names())
                for table in [t for t in tables if _SQL_LEFTOVER.match(t)]:
                    conn.execute(sa.text(f"DROP TABLE IF EXISTS {quote(table)}"))
                for table in tables.intersection(_DJANGO_TABLES):
                    conn.execute(sa.text(f"DELETE FROM {quote(table)} WHERE queue LIKE 'test!_%' ESCAPE '!'"))
        except sa.exc.SQLAlchemyError:
            pass  # a server that went away: nothing to tidy there
        finally:
            engine.dispose()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Tidy the shared servers once every test is over: in the controller when tests run in several
    workers (pytest-xdist; a worker that finished first would delete what the others still use)."""
    if KEEP_LEFTOVERS or hasattr(session.config, "workerinput"):
        return
    _clean_rabbitmq()
    _drop_sql_leftovers()
    if getattr(session.config.option, "numprocesses", None) and _mongo_listening():
        _drop_mongo_leftovers()  # xdist workers leave it to the controller (without xdist: tests/mongo_server.py)


_first_failures: list[tuple[str, str]] = []  # (test, failure) of tests that passed when run again


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep the first failure of a test that pytest-rerunfailures runs again: its summary names the test
    only, and a flaky test's cause is in that first failure."""
    if report.outcome == "rerun" and report.longrepr is not None:
        _first_failures.append((report.nodeid, report.longreprtext[-4000:]))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for nodeid, text in _first_failures:
        terminalreporter.section(f"first failure of {nodeid} (passed when run again)", sep="-")
        terminalreporter.write_line(text)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "ops_registry: the test runs with the operations registry on (OPS_REGISTRY)")
    config.addinivalue_line("markers", "serial: scripts/test.sh runs it after the parallel run, alone")


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """Fresh settings in a folder of the test's own. The operations registry is off unless the test is
    marked ``ops_registry``: its queue index is permanent, so every test queue would stay listed on
    the shared servers (RabbitMQ, Redis, SQL) run after run."""
    queues = tmp_path / "sqlite_queues"
    registry_on = request.node.get_closest_marker("ops_registry") is not None
    patch_frame_config(SQLITE_QUEUES_PATH=str(queues), STATUS_DB_PATH=str(tmp_path / "status"),
                       GRACEFUL_STOP_SECONDS=5.0, OPS_REGISTRY=registry_on)
    yield queues
    runtime.stop_all(timeout=10)
    registry.close_all()
    settings.reset()


@pytest.fixture
def queue_name() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


def server_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_server(name: str, host: str, port: int) -> None:
    """Skip on a laptop without the server; fail in CI, where every server must be up."""
    if server_reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if CI:
        pytest.fail(message)
    pytest.skip(message)


def subprocess_env(queues: Path, **extra: str) -> dict[str, str]:
    """Environment for a child process that must see the same settings as the test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["FUNBOOST_LIKE_SQLITE_QUEUES_PATH"] = str(queues)
    env.setdefault("FUNBOOST_LIKE_STATUS_DB_PATH", str(queues.parent / "status"))
    env["FUNBOOST_LIKE_NO_USER_CONFIG"] = "1"
    env["FUNBOOST_LIKE_OPS_REGISTRY"] = "1" if settings.get("OPS_REGISTRY") else "0"  # as in the test
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def lock_path(resource: str) -> Path:
    """The file of :func:`exclusive`'s lock of ``resource``."""
    return Path(tempfile.gettempdir()) / f"funboost_like_tests_{resource}.lock"


@contextlib.contextmanager
def exclusive(resource: str) -> Iterator[None]:
    """Hold this machine's lock of ``resource`` (a file lock in the temp folder) for the ``with`` block.

    Tests that share records on a shared server and delete them all at teardown take it, so they run
    one at a time across pytest-xdist workers and across test sessions on the machine. An
    ``xdist_group`` mark is no substitute: it keeps tests in one worker of one session only, and with
    pytest 9.2 and pytest-xdist 3.8 it is silently ignored (pytest-dev/pytest-xdist#1386). The lock
    goes with its holder: a killed test session never leaves it taken. (No lock on Windows.)
    """
    with open(lock_path(resource), "ab") as handle:
        if sys.platform != "win32":
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


OPS_REDIS_URL = "redis://127.0.0.1:6379/14"
OPS_REDIS_LOCK = "ops-registry-redis"


@pytest.fixture
def ops_registry_in_redis() -> Iterator[str]:
    """The operations registry in Redis db 14 (the Redis brokers', and ``OPS_STORE_BROKER="REDIS"``'s) for
    this test alone. Every registry record is deleted at teardown (one test's cannot be picked out: its
    slots form unbroken runs), so the fixture holds the :func:`exclusive` lock ``OPS_REDIS_LOCK`` from
    setup to teardown. Yields the Redis URL, set as ``REDIS_URL``."""
    require_server("Redis", "127.0.0.1", 6379)
    import redis

    from funboost_like.ops.registry import OPS_QUEUE

    with exclusive(OPS_REDIS_LOCK):
        patch_frame_config(REDIS_URL=OPS_REDIS_URL)
        yield OPS_REDIS_URL
        runtime.stop_all(timeout=10)  # the test's consumers write no record once the records are gone
        client = redis.Redis.from_url(OPS_REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"fl:{{{OPS_QUEUE}}}:*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every child process a test starts (append it); those still alive at the end are killed by their pid."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait(10)


def open_descriptors() -> list[str]:
    """What each descriptor this process has open points at (``socket:[...]``, a path, ...), from /proc."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed meanwhile
            pass
    return links


def open_sockets() -> int:
    """How many sockets this process has open."""
    return sum(link.startswith("socket:") for link in open_descriptors())


def sockets_after_ended_publishers(broker: Any, queue: str, threads: int = 10) -> tuple[int, int]:
    """Publishes once from this thread, then once from each of ``threads`` threads that end one after
    another: this process's open sockets (before those threads, after them)."""
    broker.publish(queue, b"{}")  # this thread's connection
    before = open_sockets()
    for _ in range(threads):
        worker = threading.Thread(target=broker.publish, args=(queue, b"{}"))
        worker.start()
        worker.join()
    return before, open_sockets()


def until(check: Callable[[], object], timeout: float = 2.0) -> bool:
    """Poll ``check`` every 10 ms until it returns something true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def in_forked_child(action: Callable[[], str]) -> str:
    """Run ``action`` in a forked child and return the text it returned; fail if the child failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.write(write_end, action().encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as reader:
        text = reader.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed"
    return text
