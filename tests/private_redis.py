"""A redis-server of one test only, on a free port, started, killed and restarted by its PID (DESIGN §8)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.standin import port_for_another_process


class PrivateRedis:
    """A private server keeping its files in ``folder``; with ``persistent`` its AOF survives a kill."""

    def __init__(self, folder: Path, *, password: str | None = None, persistent: bool = False) -> None:
        self.folder = folder
        self.port = port_for_another_process()
        self.password = password
        self.persistent = persistent
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the server and wait until it answers (after replaying its AOF); return how long that took."""
        began = time.monotonic()
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        auth = ["--requirepass", self.password] if self.password else []
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence, *auth,
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = self.client(socket_timeout=2)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    probe.ping()
                    return time.monotonic() - began
                except redis.exceptions.ConnectionError:  # refused, or LOADING while the AOF replays
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        self.stop()
                        raise
                    time.sleep(0.02)
        finally:
            probe.close()

    def kill(self) -> None:
        """SIGKILL the server by its PID, as a crash would."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def client(self, **options: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **options)  # type: ignore[arg-type]
