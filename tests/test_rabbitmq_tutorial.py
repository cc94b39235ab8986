"""RabbitMQ's five tutorials redone with the framework (test_frame/rabbitmq_tutorial/, seed 003).

Each program runs as a script in a child process, on RabbitMQ (RABBITMQ_PIKA; skipped without a
server at 127.0.0.1:5672, failing then when the ``CI`` environment variable is set), on the
in-memory broker (LOCAL_PYTHON_QUEUE) and on the default embedded one (PERSISTQUEUE, in the test's
own SQLite folder). It must exit by itself with status 0, having printed who got which message.
On RabbitMQ every queue and exchange name carries a prefix unique to the test
(``TUTORIAL_NAMESPACE``), and the test deletes them afterwards.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, require_server, subprocess_env

TUTORIAL = REPO / "test_frame" / "rabbitmq_tutorial"
BROKERS = ["RABBITMQ_PIKA", "LOCAL_PYTHON_QUEUE", "PERSISTQUEUE"]
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

# What each program declares on the server (without the namespace), for the clean-up.
QUEUES = ["tutorial_hello", "tutorial_task_queue", "tutorial_logs_to_disk", "tutorial_logs_to_screen",
          "tutorial_direct_errors", "tutorial_direct_console", "tutorial_topic_q1", "tutorial_topic_q2"]
EXCHANGES = ["logs", "direct_logs", "topic_logs"]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> str:
    if request.param == "RABBITMQ_PIKA":
        require_server("RabbitMQ", "127.0.0.1", 5672)
    return str(request.param)


@pytest.fixture
def namespace(broker: str) -> Iterator[str]:
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    yield prefix
    if broker == "RABBITMQ_PIKA":
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        channel = connection.channel()
        for name in QUEUES:
            channel.queue_delete(prefix + name)
            channel.queue_delete(f"{prefix}{name}.dlq")  # made only when a message was dead-lettered
        for name in EXCHANGES:
            channel.exchange_delete(prefix + name)
        connection.close()


def run(program: str, broker: str, namespace: str, queues: Path) -> str:
    """Run one tutorial program to its end; return what it printed (it must exit with status 0)."""
    env = subprocess_env(queues, TUTORIAL_BROKER=broker, TUTORIAL_NAMESPACE=namespace)
    proc = subprocess.run([sys.executable, str(TUTORIAL / program)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, f"{program} on {broker} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def test_hello_world(broker: str, namespace: str, isolated_settings: Path) -> None:
    out = run("1_hello.py", broker, namespace, isolated_settings)
    assert f" [x] Sent 'Hello World!' to queue '{namespace}tutorial_hello' on {broker}" in out
    assert out.count(" [consumer] received 'Hello World!'") == 1
    assert out.endswith("done\n")


def test_work_queues_dispatch_fairly(broker: str, namespace: str, isolated_settings: Path) -> None:
    out = run("2_work_queues.py", broker, namespace, isolated_settings)
    match = re.search(r"^slow worker ran (\d+) tasks, fast worker ran (\d+)$", out, re.M)
    assert match, out
    slow, fast = int(match[1]), int(match[2])
    assert slow + fast == 12
    assert fast > slow  # a worker takes a task only when it is free: the fast one takes most
    assert "every task ran exactly once: True" in out


def test_publish_subscribe_reaches_every_queue(broker: str, namespace: str, isolated_settings: Path) -> None:
    out = run("3_publish_subscribe.py", broker, namespace, isolated_settings)
    lines = "info: Hello World!, warning: disk almost full, error: disk full"
    assert f"\ndisk got: {lines}\n" in out
    assert f"\nscreen got: {lines}\n" in out
    assert f" [x] Sent 'info: Hello World!' to exchange '{namespace}logs'" in out


def test_routing_by_severity(broker: str, namespace: str, isolated_settings: Path) -> None:
    out = run("4_routing.py", broker, namespace, isolated_settings)
    assert "\ndisk got: error: disk full\n" in out
    assert "\nscreen got: info: the service started, warning: disk 90% full, error: disk full\n" in out
    assert " [x] 'debug': 'cache hit' dropped: no queue matches" in out
    assert " [x] Sent 'error': 'disk full'" in out


def test_topics_as_in_the_tutorial(broker: str, namespace: str, isolated_settings: Path) -> None:
    out = run("5_topics.py", broker, namespace, isolated_settings)
    assert "\nQ1 (*.orange.*) got: quick.orange.rabbit, lazy.orange.elephant, quick.orange.fox\n" in out
    assert ("\nQ2 (*.*.rabbit, lazy.#) got: quick.orange.rabbit, lazy.orange.elephant, lazy.brown.fox, "
            "lazy.pink.rabbit, lazy.orange.male.rabbit\n") in out  # lazy.pink.rabbit matches twice, arrives once
    for key in ("quick.brown.fox", "orange", "quick.orange.male.rabbit"):
        assert f" [x] {key} dropped: no queue matches" in out
    for key in ("quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox", "lazy.brown.fox",
                "lazy.pink.rabbit", "lazy.orange.male.rabbit"):
        assert f" [x] Sent {key}\n" in out
