"""pulsar-lite, the Pulsar stand-in (DESIGN §8), for the tests that need Pulsar on 127.0.0.1:6650.

``.ci/run`` starts it before the tests (``python tests/pulsar_server.py --background FOLDER``). On a
laptop the session fixture below starts one when a collected test needs it (the PULSAR contract
cases, tests/test_pulsar.py) and nothing listens on the port, with its files in a temporary folder,
and stops it by its PID at the end of the session. Without the ``pulsar-lite`` wheel (``pip install
pulsar-lite``) those tests skip, or fail in CI.

pulsar-lite serves its metrics on 0.0.0.0:8080 unless told otherwise: the configuration written
here turns them off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    from .standin import ServerProcess, listening
except ImportError:  # run as a script (.ci/run): tests/ is the first entry of sys.path
    from standin import ServerProcess, listening  # type: ignore[no-redef]

HOST, PORT = "127.0.0.1", 6650
CONFIG = "[metrics]\nenabled = false\n"


def _listening(port: int = PORT) -> bool:
    return listening(port, HOST)


def program() -> str | None:
    """The pulsar-lite binary inside the installed wheel, if any."""
    try:
        from pulsar_lite.binary_finder import find_pulsar_lite_binary
    except ImportError:
        return None
    try:
        return str(find_pulsar_lite_binary())
    except FileNotFoundError:
        return None


def command(folder: Path, port: int = PORT) -> list[str]:
    """The command line of a server on 127.0.0.1:``port`` keeping its files (and config) in ``folder``."""
    binary = program()
    if binary is None:
        raise FileNotFoundError("pulsar-lite is not installed (pip install pulsar-lite)")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "pulsar-lite.toml"
    config.write_text(CONFIG)
    return [binary, "--config", str(config), "--addr", f"{HOST}:{port}", "--db-path", str(folder / "data"),
            "--log-level", "warn"]


class PulsarLiteServer(ServerProcess):
    """A ``pulsar-lite`` process on 127.0.0.1:``port`` keeping its files in ``folder``."""

    def __init__(self, folder: Path, port: int = PORT) -> None:
        super().__init__("pulsar-lite", port)
        self.folder = folder

    def start(self, timeout: float = 30.0) -> None:
        self.launch(command(self.folder, self.port), self.folder / "pulsar-lite.log", cwd=self.folder, timeout=timeout)


def _needs_pulsar(session: pytest.Session) -> bool:
    return any("PULSAR" in item.nodeid or "test_pulsar.py" in item.nodeid for item in session.items)


@pytest.fixture(autouse=True, scope="session")
def _pulsar_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Start pulsar-lite for this session when a collected test needs it and none is running; stop it
    at the end. (Test queues have unique names; a shared server keeps them, as it keeps any topic.)"""
    server = None
    if _needs_pulsar(request.session) and not _listening() and program() is not None:
        server = PulsarLiteServer(Path(tempfile.mkdtemp(prefix="pulsar-lite-")))
        try:
            server.start()
        except RuntimeError as exc:  # the tests that need it skip, or fail in CI, saying it is unreachable
            warnings.warn(str(exc), stacklevel=1)
    try:
        yield
    finally:
        if server is not None and not os.environ.get("PYTEST_XDIST_WORKER"):  # other workers may still use it
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    """``python tests/pulsar_server.py --background FOLDER``: start a detached server (``.ci/run``)."""
    if len(argv) != 2 or argv[0] != "--background":
        print("usage: pulsar_server.py --background FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[1])
    argv_server = command(folder)
    with open(folder / "pulsar-lite.log", "ab") as log:
        subprocess.Popen(argv_server, stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
