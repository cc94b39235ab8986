"""The Mosquitto the MQTT benchmarks use: 127.0.0.1:18830, started when absent, stopped by its PID.

    python benchmarks/mqtt_server.py [--port 18830]     # run one in the foreground (Ctrl-C stops it)

A benchmark publishes N messages before it consumes them. Mosquitto's default ``max_queued_messages``
(1000 per session) drops the rest of such a backlog without telling the publisher (docs/mqtt.md), so
the benchmark server is the system's ``mosquitto`` binary with ``max_queued_messages 0`` (no limit),
persistence off (nothing written to disk: messages live in memory, as between two autosaves of a
persistent server), anonymous access on 127.0.0.1 only. ``benchmarks/throughput.py`` (``--brokers
mqtt``) and ``benchmarks/peers/run.py`` (``--set mqtt``) call :func:`ensure` and :func:`stop`; a
server already listening on the port is used as it is and left running.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_URL = "mqtt://127.0.0.1:18830"
CONFIG = """listener {port} 127.0.0.1
allow_anonymous true
max_queued_messages 0
{persistence}
log_dest stderr
log_type error
log_type warning
"""


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def ensure(url: str = DEFAULT_URL, persistent: Path | None = None) -> subprocess.Popen[bytes] | None:
    """Start a benchmark Mosquitto at ``url`` unless something listens there; return the process we started.
    ``persistent``: a folder for its database (persistence on, the default autosave every 1800 s)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 1883
    if _listening(host, port):
        return None
    if host not in ("127.0.0.1", "localhost") or shutil.which("mosquitto") is None:
        raise RuntimeError(f"no MQTT server at {host}:{port}, and none can be started here")
    folder = Path(tempfile.mkdtemp(prefix="funboost_like_bench_mosquitto_"))
    config = folder / "mosquitto.conf"
    persistence = "persistence false"
    if persistent is not None:
        persistent.chmod(0o777)  # mosquitto started as root writes as its own user
        persistence = f"persistence true\npersistence_location {persistent}/"
    config.write_text(CONFIG.format(port=port, persistence=persistence))
    process = subprocess.Popen(["mosquitto", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.args = ["mosquitto", "-c", str(config)]  # stop() removes the configuration's folder
    deadline = time.monotonic() + 10
    while not _listening(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"the benchmark Mosquitto did not start on port {port}")
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """Stop a server :func:`ensure` started (by its PID); nothing for None."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process is not None:
        shutil.rmtree(Path(process.args[-1]).parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18830)
    port = parser.parse_args().port
    process = ensure(f"mqtt://127.0.0.1:{port}")
    if process is None:
        print(f"something already listens on 127.0.0.1:{port}")
        return
    print(f"Mosquitto on 127.0.0.1:{port} (pid {process.pid}); Ctrl-C or SIGTERM stops it")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        process.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        stop(process)


if __name__ == "__main__":
    main()
