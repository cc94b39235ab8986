"""Run every broker example of test_frame/ (``<broker>_example.py``) as a script, so a change that breaks
one fails the suite.

Each example runs against the server its docstring names, or the stand-in the other tests use, with
the settings of its kind's :class:`~funboost_like.brokers.registry.Fixture` given as environment
variables (``FUNBOOST_LIKE_<NAME>``). The ids name the kind (``PULSAR``, ``KAFKA-tansu``, ...): the
session fixtures of tests/conftest.py start the stand-ins a collected test's id names.

Most examples check themselves: they publish, consume, and exit 0 once every call ran (else they print
what is missing and exit 1). The two seed examples (httpsqs, zeromq) are a publisher and a consumer
that runs until Ctrl-C: the publisher must exit 0, the consumer must print the calls, and then exit
cleanly on SIGINT. A failure shows the tail of the script's stdout and stderr.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from funboost_like.brokers.registry import FIXTURES, Fixture, case_id, get_broker
from funboost_like.core.config import patch_frame_config
from funboost_like.core.enums import BrokerEnum

from .conftest import REPO, require_server, subprocess_env
from .standin import listening

EXAMPLES = REPO / "test_frame"
TIMEOUT = 60.0  # for one script; each takes a few seconds
GRACE = 5.0  # GRACEFUL_STOP_SECONDS given to the scripts: running calls finish within it after Ctrl-C

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT to the consumers")


def fixture_of(kind: BrokerEnum, variant: str = "") -> Fixture:
    entry = FIXTURES[kind]
    return next(f for f in (entry if isinstance(entry, tuple) else (entry,)) if f.variant == variant)


@dataclass(frozen=True)
class Example:
    """A script of test_frame/ with its arguments, the kind it uses and the client modules it imports."""

    script: str
    kind: BrokerEnum
    variant: str = ""  # the Fixture variant, when the kind has several
    args: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()

    @property
    def fixture(self) -> Fixture:
        return fixture_of(self.kind, self.variant)

    @property
    def id(self) -> str:
        return case_id(self.kind, self.fixture)


SELF_CHECKING = [
    Example("kafka_example.py", BrokerEnum.KAFKA, "tansu", ("--kind", "KAFKA"), ("kafka", "confluent_kafka")),
    Example("kafka_example.py", BrokerEnum.CONFLUENT_KAFKA, "tansu", ("--kind", "CONFLUENT_KAFKA"),
            ("confluent_kafka",)),
    Example("mongo_example.py", BrokerEnum.MONGOMQ, imports=("pymongo",)),
    Example("mqtt_example.py", BrokerEnum.MQTT, imports=("paho.mqtt",)),
    Example("nats_example.py", BrokerEnum.NATS, imports=("nats",)),
    Example("nsq_example.py", BrokerEnum.NSQ),
    Example("pulsar_example.py", BrokerEnum.PULSAR, imports=("pulsar",)),
    Example("sql_example.py", BrokerEnum.SQLACHEMY, "sqlite", imports=("sqlalchemy",)),
    Example("sql_example.py", BrokerEnum.SQLACHEMY, "postgresql", imports=("sqlalchemy", "psycopg")),
    Example("sql_example.py", BrokerEnum.SQLACHEMY, "mariadb", imports=("sqlalchemy", "pymysql")),
]
HTTPSQS = Example("httpsqs_example.py", BrokerEnum.HTTPSQS)
ZEROMQ = Example("zeromq_example.py", BrokerEnum.ZEROMQ, imports=("zmq",))

SUM = re.compile(r"^\s*(\d+) \+ (\d+) = (\d+)$", re.MULTILINE)
NUMBER = re.compile(r"^(\d+)$", re.MULTILINE)


class Script:
    """An example running in a child process; its stdout and stderr go to files in ``folder``."""

    def __init__(self, example: Example, env: dict[str, str], folder: Path, *args: str) -> None:
        self.name = " ".join([example.script, *example.args, *args])
        label = re.sub(r"\W+", "_", self.name)
        self.stdout_path, self.stderr_path = folder / f"{label}.stdout", folder / f"{label}.stderr"
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen([sys.executable, str(EXAMPLES / example.script), *example.args, *args],
                                         stdout=stdout, stderr=stderr, env=env, cwd=folder)
        self.started = time.monotonic()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")

    def report(self, what: str) -> str:
        return (f"{self.name}: {what} after {time.monotonic() - self.started:.1f}s\n"
                f"--- stdout (tail) ---\n{self.stdout[-2000:]}\n--- stderr (tail) ---\n{self.stderr[-4000:]}")

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit code; kills the script and fails the test when it runs longer than ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(self.report(f"still running after {timeout:.0f}s (killed)"))

    def succeeds(self, timeout: float = TIMEOUT) -> None:
        code = self.wait(timeout)
        assert code == 0, self.report(f"exited with {code}")
        assert "Traceback" not in self.stderr, self.report("exited with 0 but logged a traceback")

    def wait_until(self, done: Callable[[str], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Until ``done(stdout)``; fails when the script exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not done(self.stdout):
            if self.proc.poll() is not None:
                pytest.fail(self.report(f"exited with {self.proc.returncode} before {what}"))
            if time.monotonic() > deadline:
                pytest.fail(self.report(f"no {what} within {timeout:.0f}s"))
            time.sleep(0.05)

    def interrupt(self) -> None:
        """Ctrl-C, as the example's docstring says to stop it: running calls finish, then a clean exit."""
        self.proc.send_signal(signal.SIGINT)
        code = self.wait(GRACE + 10)
        assert code == 0, self.report(f"exited with {code} after Ctrl-C")
        assert "Traceback" not in self.stderr, self.report("logged a traceback")


def prepare(example: Example, queues: Path) -> dict[str, str]:
    """Skip without the example's client modules or server (fail in CI); its environment otherwise."""
    for module in example.imports:
        pytest.importorskip(module)
    fixture = example.fixture
    if fixture.server is not None:
        require_server(*fixture.server)
    settings = {f"FUNBOOST_LIKE_{name}": str(value) for name, value in fixture.settings.items()}
    return subprocess_env(queues, FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS=str(GRACE), **settings)


def test_every_broker_example_is_run() -> None:
    run = {example.script for example in [*SELF_CHECKING, HTTPSQS, ZEROMQ]}
    assert sorted(path.name for path in EXAMPLES.glob("*_example.py")) == sorted(run)


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("example", SELF_CHECKING, ids=[example.id for example in SELF_CHECKING])
def test_example_runs_and_exits_0(example: Example, isolated_settings: Path, tmp_path: Path,
                                  children: list[subprocess.Popen[bytes]]) -> None:
    script = Script(example, prepare(example, isolated_settings), tmp_path)
    children.append(script.proc)
    script.succeeds()


@pytest.mark.timeout(2 * TIMEOUT + 30)
def test_httpsqs_example_publisher_then_consumer_until_ctrl_c(
        isolated_settings: Path, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    env = prepare(HTTPSQS, isolated_settings)
    patch_frame_config(**HTTPSQS.fixture.settings)
    broker, queue = get_broker(BrokerEnum.HTTPSQS), "httpsqs_queue_test"
    broker.purge(queue)  # what an interrupted run left on the shared server
    publisher = Script(HTTPSQS, env, tmp_path, "publish")
    children.append(publisher.proc)
    publisher.succeeds()
    assert "queue holds 20 calls" in publisher.stdout, publisher.report("did not publish 20 calls")

    consumer = Script(HTTPSQS, env, tmp_path)
    children.append(consumer.proc)
    consumer.wait_until(lambda text: len(SUM.findall(text)) >= 20, "20 calls printed")
    time.sleep(0.3)  # a duplicate would show up now
    consumer.interrupt()
    expected = collections.Counter((str(i), str(2 * i), str(3 * i)) for i in range(20))  # 5 of them delayed 3 s
    assert collections.Counter(SUM.findall(consumer.stdout)) == expected, consumer.report("printed other calls")
    assert broker.count(queue) == 0


@pytest.mark.timeout(2 * TIMEOUT + 30)
def test_zeromq_example_consumer_then_publisher_until_ctrl_c(
        isolated_settings: Path, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    """At qps=2 the 100 calls would take 50 s: the consumer runs a few, then Ctrl-C hands the rest back
    to the hub, which the test stops at the end (what it holds is lost)."""
    env = prepare(ZEROMQ, isolated_settings)
    from funboost_like.brokers.zeromq_broker import ZeroMqBroker  # imports zmq: after prepare() checked it

    queue = "30778"
    broker = get_broker(BrokerEnum.ZEROMQ)
    assert isinstance(broker, ZeroMqBroker)
    if listening(int(queue)):
        broker.purge(queue)  # what an interrupted run left in the hub
    try:
        consumer = Script(ZEROMQ, env, tmp_path)  # first, as the seed says: it starts the hub
        children.append(consumer.proc)
        publisher = Script(ZEROMQ, env, tmp_path, "publish")
        children.append(publisher.proc)
        publisher.succeeds()
        consumer.wait_until(lambda text: len(NUMBER.findall(text)) >= 3, "3 calls printed")
        consumer.interrupt()
        ran = sorted(int(x) for x in NUMBER.findall(consumer.stdout))
        assert ran == list(range(len(ran))), consumer.report("ran other calls than the first, once each")
        assert broker.count(queue) == 100 - len(ran)  # Ctrl-C handed back every call not started
    finally:
        if listening(int(queue)):
            broker.stop_hub(queue)
