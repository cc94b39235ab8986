"""Shared fixtures: every test gets its own SQLite folder and fresh settings, and no consumer outlives it."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("FUNBOOST_LIKE_NO_USER_CONFIG", "1")

from funboost_like.brokers import registry  # noqa: E402
from funboost_like.core import runtime  # noqa: E402
from funboost_like.core.config import patch_frame_config, settings  # noqa: E402

CI = bool(os.environ.get("CI"))
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path) -> Iterator[Path]:
    queues = tmp_path / "sqlite_queues"
    patch_frame_config(SQLITE_QUEUES_PATH=str(queues), STATUS_DB_PATH=str(tmp_path / "status"),
                       GRACEFUL_STOP_SECONDS=5.0)
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
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every child process a test starts (append it); those still alive at the end are killed by their pid."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait(10)


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
