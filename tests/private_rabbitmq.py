"""A RabbitMQ node of one test only, on free ports, stopped, started and killed by its PID (DESIGN §8).

The shared server on 5672 is never broken under other tests: restart and kill tests use a node of
their own (its own name, ports, Erlang cookie, data folder), started from Debian's rabbitmq-server
scripts in about 8 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests.standin import port_for_another_process

SBIN = Path("/usr/lib/rabbitmq/bin")




def available() -> bool:
    return (SBIN / "rabbitmq-server").exists()


class PrivateRabbitMQ:
    """A private node keeping its data in ``folder`` (so a killed node restarts with its durable messages)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = port_for_another_process()
        self.dist_port = port_for_another_process()
        self.node = f"fltest{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.process: subprocess.Popen[bytes] | None = None
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (folder / "enabled_plugins").write_text("[].\n")
        # Due routed messages no binding matches are retried by the server every 0.5 s (default 3 min).
        (folder / "advanced.config").write_text("[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 500}]}].\n")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HOME=str(self.folder), RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(self.port),
                   RABBITMQ_DIST_PORT=str(self.dist_port), RABBITMQ_CONFIG_FILE=str(self.folder / "rabbitmq"),
                   RABBITMQ_ADVANCED_CONFIG_FILE=str(self.folder / "advanced.config"),
                   RABBITMQ_MNESIA_BASE=str(self.folder / "mnesia"), RABBITMQ_LOG_BASE=str(self.folder / "log"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(self.folder / "enabled_plugins"),
                   RABBITMQ_PID_FILE=str(self.folder / "pid"))
        return env

    def start(self, timeout: float = 60.0) -> None:
        """Start the node (a new Erlang VM) and wait until it accepts AMQP connections."""
        self.process = subprocess.Popen([str(SBIN / "rabbitmq-server")], env=self._env(), cwd=self.folder,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait_until(True, timeout)

    def _wait_until(self, up: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.accepting() != up:
            if time.monotonic() > deadline:
                raise TimeoutError(f"RabbitMQ node {self.node} did not {'start' if up else 'stop'} in {timeout:.0f}s")
            time.sleep(0.1)

    def accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def ctl(self, *args: str) -> None:
        subprocess.run([str(SBIN / "rabbitmqctl"), "-n", self.node, *args], env=self._env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def stop_app(self) -> None:
        self.ctl("stop_app")
        self._wait_until(False, 30)

    def start_app(self) -> None:
        self.ctl("start_app")
        self._wait_until(True, 60)

    def kill(self) -> None:
        """SIGKILL the whole node (the Erlang VM and its helpers), as a crash would."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self._wait_until(False, 10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
