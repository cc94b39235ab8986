"""The seed's script shape in every concurrency mode: push, then ``f.consume()`` as the last line.

The main thread (or main greenlet) ends right after ``consume()`` returns; the process must go on
consuming until SIGINT/SIGTERM, then stop gracefully and exit cleanly.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from funboost_like import task_deco

from .conftest import subprocess_env

SEED_SCRIPT = """
{patch}
import sys
from funboost_like import task_deco, ConcurrentModeEnum, run_consumer_with_multi_process

@task_deco(sys.argv[1], concurrent_mode=ConcurrentModeEnum.{mode})
{define} f(x):
    print("ran", x, flush=True)

if __name__ == "__main__":
    for i in range({calls}):
        f.push(i)
    {run}
"""
SINGLE = {"calls": 5, "run": "f.consume()"}
MULTI_PROCESS = {"calls": 4, "run": 'run_consumer_with_multi_process(f, 2); print("returned", flush=True)'}

MODES = {
    "THREADING": ("", "def"),
    "GEVENT": ("from gevent import monkey; monkey.patch_all()", "def"),
    "EVENTLET": ("import eventlet; eventlet.monkey_patch()", "def"),
    "ASYNC": ("", "async def"),
}
LINE_TIMEOUT = 20.0


def read_lines(stream: object, lines: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line.strip())
    lines.put(None)  # end of output: the process closed its stdout


def start_script(tmp_path: Path, isolated_settings: Path, queue_name: str, mode: str, shape: dict[str, object]
                 ) -> tuple[subprocess.Popen[str], queue.Queue[str | None], Path]:
    """Write the seed-shaped script in ``mode`` and start it; its stdout lines arrive in the queue."""
    patch, define = MODES[mode]
    if patch:
        pytest.importorskip(mode.lower())
    script = tmp_path / "seed_script.py"
    script.write_text(textwrap.dedent(SEED_SCRIPT.format(patch=patch, mode=mode, define=define, **shape)))
    logs = tmp_path / "stderr.txt"
    with logs.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-W", "ignore", str(script), queue_name], stdout=subprocess.PIPE,
                                 stderr=stderr, text=True, env=subprocess_env(isolated_settings))
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=read_lines, args=(child.stdout, lines), daemon=True).start()
    return child, lines, logs


def wait_for_line(lines: queue.Queue[str | None], wanted: str, child: subprocess.Popen[str], logs: Path) -> None:
    wait_for_lines(lines, {wanted}, child, logs)


def wait_for_lines(lines: queue.Queue[str | None], wanted: set[str], child: subprocess.Popen[str], logs: Path) -> None:
    """Read lines until each of ``wanted`` came, in any order (children of one script print in any order)."""
    missing = set(wanted)
    while missing:
        try:
            line = lines.get(timeout=LINE_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"no {sorted(missing)} within {LINE_TIMEOUT:.0f}s\n{logs.read_text()}")
        if line is None:
            pytest.fail(f"the script ended (exit code {child.wait(5)}) before printing {sorted(missing)}\n"
                        f"{logs.read_text()}")
        missing.discard(line)


@contextlib.contextmanager
def killed_at_the_end(child: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_seed_script_keeps_consuming_after_its_last_line(isolated_settings: Path, tmp_path: Path, queue_name: str,
                                                           mode: str, sig: int) -> None:
    child, lines, logs = start_script(tmp_path, isolated_settings, queue_name, mode, SINGLE)
    with killed_at_the_end(child):
        for i in range(5):
            wait_for_line(lines, f"ran {i}", child, logs)

        # The main thread ended long ago; a message published now by another process still runs.
        @task_deco(queue_name)
        def f(x: int) -> None:
            pass

        f.push(100)
        wait_for_line(lines, "ran 100", child, logs)
        assert child.poll() is None, "the consumer process ended"

        child.send_signal(sig)
        code = child.wait(15)
    output = logs.read_text()
    assert code == 0, f"exit code {code} after {signal.Signals(sig).name}\n{output}"
    assert "Traceback" not in output, output
    assert f"stopped consuming queue {queue_name!r}" in output, output  # the graceful stop ran


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("mode", "sig"), [*[(mode, signal.SIGTERM) for mode in MODES], ("EVENTLET", signal.SIGINT)],
                         ids=lambda value: value if isinstance(value, str) else signal.Signals(value).name)
def test_a_signal_to_a_multi_process_script_stops_its_children_and_returns(
        isolated_settings: Path, tmp_path: Path, queue_name: str, mode: str, sig: int) -> None:
    """Under eventlet's monkey patch the supervisor took its own main thread for another one and installed
    no signal handler: SIGTERM killed it at once (its children orphaned), SIGINT ended in a traceback."""
    child, lines, logs = start_script(tmp_path, isolated_settings, queue_name, mode, MULTI_PROCESS)
    with killed_at_the_end(child):
        wait_for_lines(lines, {f"ran {i}" for i in range(4)}, child, logs)
        child.send_signal(sig)
        code = child.wait(20)
    output = logs.read_text()
    rest = []
    while (line := lines.get(timeout=5)) is not None:
        rest.append(line)
    assert code == 0, f"exit code {code} after {signal.Signals(sig).name}\n{output}"
    assert "returned" in rest and "Traceback" not in output, output
    assert "stopping the children" in output and "supervisor of" not in output, output  # not its error path
