"""A stand-in server process for the tests (SecantusDB, pulsar-lite, Kafka's stand-ins): started, waited
for until it listens on its port, and stopped by its PID. Also imported by those modules run as scripts."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HOST = "127.0.0.1"


def listening(port: int, host: str = HOST) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def relay(source: socket.socket, target: socket.socket, passing: Callable[[], bool] | None = None) -> None:
    """Copy what ``source`` sends to ``target`` until either end closes, then shut both down (one direction
    of a TCP relay: run one per direction, each on its own thread). ``passing``: while it says False, what
    arrives is dropped (a silent link)."""
    try:
        while data := source.recv(65536):
            if passing is None or passing():
                target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on now (the kernel's pick; free until someone binds it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_for_another_process(host: str = HOST) -> int:
    """A free TCP port for a server that another process binds later (a ZeroMQ hub, say).

    :func:`free_port`'s pick comes from the kernel's ephemeral range, which is also where outgoing
    connections take their source ports: under a busy test run, one of them (to Redis, RabbitMQ, ...)
    can take the port before the other process binds it. This one is below that range.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(20001, low))
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return port
    return free_port(host)


class ServerProcess:
    """One server process of this test session, named ``name`` in errors, listening on ``port``."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self, argv: Sequence[str], log: Path, cwd: Path | None = None, timeout: float = 30.0) -> None:
        """Start ``argv`` with its output in ``log``; return once the port accepts connections."""
        with open(log, "wb") as out:
            self.process = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        deadline = time.monotonic() + timeout
        while not listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not listen on port {self.port}; see {log}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it by its PID (SIGTERM, then SIGKILL after 10 s)."""
        process = self.process
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
