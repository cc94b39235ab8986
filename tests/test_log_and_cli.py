"""Logging helpers, the command line, the settings template, and a side-effect-free import."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from funboost_like.cli import main
from funboost_like.core import log
from funboost_like.core.config import DEFAULTS, patch_frame_config, redact_url, settings

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_TEMPLATE = REPO_ROOT / "funboost_like" / "distributed_frame_config_template.py"
ROOT_TEMPLATE = REPO_ROOT / "distributed_frame_config_template.py"
LINE_FORMAT = re.compile(
    r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - funboost_like\.q - "test_log_and_cli\.py:\d+" - INFO - hello 42$'
)


@pytest.fixture(autouse=True)
def _forget_patches() -> Iterator[None]:
    yield
    settings.reset()


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


@contextlib.contextmanager
def _no_logging_configured() -> Iterator[logging.Logger]:
    """Empty the root and package loggers' handlers for the block (pytest installs its own on root)."""
    root = logging.getLogger()
    package = logging.getLogger("funboost_like")
    saved_root, saved_package = root.handlers[:], package.handlers[:]
    root.handlers.clear()
    package.handlers.clear()
    try:
        yield package
    finally:
        root.handlers[:] = saved_root
        package.handlers[:] = saved_package


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ----- console handler -----


def test_get_logger_names_and_level() -> None:
    logger = log.get_logger("q1", logging.DEBUG, prefix="pub.")
    assert logger.name == "funboost_like.pub.q1"
    assert logger.level == logging.DEBUG


def test_console_handler_added_once_when_nothing_is_configured() -> None:
    with _no_logging_configured() as package:
        threads = [threading.Thread(target=log.ensure_console_handler) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert log.ensure_console_handler() is None
        assert [type(h) for h in package.handlers] == [log.ColorConsoleHandler]
        assert package.handlers[0].stream is sys.stderr  # type: ignore[attr-defined]


def test_console_handler_not_added_when_root_has_a_handler() -> None:
    with _no_logging_configured() as package:
        logging.getLogger().addHandler(logging.NullHandler())
        assert log.ensure_console_handler() is None
        assert package.handlers == []


def test_console_handler_not_added_when_package_logger_has_a_handler() -> None:
    with _no_logging_configured() as package:
        own = logging.NullHandler()
        package.addHandler(own)
        assert log.ensure_console_handler() is None
        assert package.handlers == [own]


def test_console_handler_not_added_when_disabled_by_setting() -> None:
    patch_frame_config(LOG_CONSOLE=False)
    with _no_logging_configured() as package:
        assert log.ensure_console_handler() is None
        assert package.handlers == []


def _format_one(handler: log.ColorConsoleHandler) -> str:
    logger = log.get_logger("q", logging.INFO)
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 7, "hello %d", (42,), None)
    return handler.format(record)


def test_console_format_without_colour_off_a_terminal() -> None:
    assert LINE_FORMAT.match(_format_one(log.ColorConsoleHandler(io.StringIO())))


def test_console_colour_only_on_a_terminal_and_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = _format_one(log.ColorConsoleHandler(_FakeTerminal()))
    assert coloured.startswith("\033[32m") and coloured.endswith("\033[0m")
    assert LINE_FORMAT.match(coloured[len("\033[32m") : -len("\033[0m")])

    monkeypatch.setenv("NO_COLOR", "1")
    assert "\033" not in _format_one(log.ColorConsoleHandler(_FakeTerminal()))

    monkeypatch.delenv("NO_COLOR")
    patch_frame_config(LOG_COLOR=False)
    assert "\033" not in _format_one(log.ColorConsoleHandler(_FakeTerminal()))


# ----- file handler -----


def test_add_file_handler_is_lazy_and_idempotent(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    patch_frame_config(LOG_DIR=str(log_dir))
    logger = log.get_logger("file_q", logging.INFO)
    logger.propagate = False
    try:
        handler = log.add_file_handler(logger, "file_q.log")
        assert log.add_file_handler(logger, "file_q.log") is handler
        assert not log_dir.exists()
        logger.info("first %s", "record")
        text = (log_dir / "file_q.log").read_text(encoding="utf-8")
        assert text.endswith(" - INFO - first record\n")
    finally:
        for h in logger.handlers[:]:
            logger.removeHandler(h)
            h.close()
        logger.propagate = True


def test_rotation_keeps_at_most_backup_count_files(tmp_path: Path) -> None:
    path = tmp_path / "r.log"
    handler = log.ConcurrentRotatingFileHandler(path, maxBytes=1000, backupCount=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for n in range(500):
            handler.emit(logging.makeLogRecord({"msg": f"line {n:04d} " + "x" * 40}))
    finally:
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["r.log", "r.log.1", "r.log.2", "r.log.3", "r.log.lock"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.glob("r.log*"))
    assert path.read_text().splitlines()[-1].startswith("line 0499 ")


_WRITER = textwrap.dedent(
    """
    import logging, sys, time
    from funboost_like.core.log import ConcurrentRotatingFileHandler

    path, worker, lines, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    handler = ConcurrentRotatingFileHandler(path, maxBytes=4_000, backupCount=1_000)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("writer")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    time.sleep(max(0.0, start_at - time.time()))
    for n in range(lines):
        logger.info("worker=%s seq=%05d %s end", worker, n, "p" * (n % 50))
    handler.close()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="the multi-process handler is POSIX only")
def test_file_handler_loses_no_line_across_processes_and_rotations(tmp_path: Path) -> None:
    workers, lines = 4, 2000
    path = tmp_path / "shared.log"
    start_at = f"{time.time() + 1.0:.3f}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), str(w), str(lines), start_at],
            env=_subprocess_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0 and stderr == "", stderr  # a logging error would be on stderr

    files = [p for p in tmp_path.iterdir() if p.name != "shared.log.lock"]
    assert len(files) > 50, "maxBytes should have caused many rotations"
    pattern = re.compile(r"^worker=(\d) seq=(\d{5}) (p*) end$")
    seen: set[tuple[int, int]] = set()
    total = 0
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            total += 1
            match = pattern.match(line)
            assert match, f"corrupted line in {file.name}: {line!r}"
            seq = int(match[2])
            assert len(match[3]) == seq % 50, f"corrupted line in {file.name}: {line!r}"
            seen.add((int(match[1]), seq))
    assert total == workers * lines
    assert seen == {(w, n) for w in range(workers) for n in range(lines)}


# ----- redaction -----


def test_redact_url_masks_nats_tokens_and_every_url_of_a_list() -> None:
    assert redact_url("nats://s3cret@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"
    assert redact_url("nats://a:s3cret@h:1,nats://t0ken@h2:2") == "nats://a:***@h:1,nats://***@h2:2"
    assert "s3cret" not in redact_url("amqp://u:s3cret@a//,amqp://u:s3cret@b//")


def test_redact_url_masks_the_password_only() -> None:
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:s3cret@host/1") == "redis://:***@host/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_redact_url_masks_a_password_with_unescaped_url_characters() -> None:
    """A password holding a bare ``/``, ``?`` or ``#`` ends the URL's authority early for urlsplit (and for
    the clients, which refuse the URL with an error that shows it): none of it may be shown."""
    for url in ("redis://user:s3/cret@host:6379/0", "redis://:s3#cret@host/0", "amqp://u:s3?cret@host/%2F",
                "nats://s3/cret@host:4222"):
        assert "cret" not in redact_url(url), url
        assert redact_url(url).endswith("@" + url.rsplit("@", 1)[1])  # the server is still named
    for url in ("mysql+pymysql://root@h/test?passwd=s3cret", "postgresql://h/db?sslpassword=s3cret",
                "redis://h/0?token=s3cret", "https://h/?client_secret=s3cret"):
        assert "s3cret" not in redact_url(url), url
    assert redact_url("sqlite:////data/a@b.db") == "sqlite:////data/a@b.db"  # no authority: nothing hidden


def test_a_redis_url_with_an_unescaped_password_fails_without_showing_it(queue_name: str) -> None:
    from funboost_like import BrokerEnum, task_deco
    from funboost_like.core.errors import FunboostLikeError

    patch_frame_config(REDIS_URL="redis://user:s3/cret@127.0.0.1:6379/15", OPS_REGISTRY=False)
    f = task_deco(queue_name, broker_kind=BrokerEnum.REDIS)(lambda x: x)
    with pytest.raises(FunboostLikeError) as info:
        f.push(1)
    assert "cret" not in str(info.value)


def test_redact_url_keeps_a_url_without_secrets_as_given() -> None:
    """show-config printed sqlite:////tmp/x.db as sqlite://tmp/x.db (a host named tmp) and sqlite:///q.db
    as sqlite:/q.db: rebuilding the URL dropped its empty authority."""
    assert redact_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert redact_url("sqlite:///q.db") == "sqlite:///q.db"
    assert redact_url("sqlite:///q.db?password=s3cret&x=1") == "sqlite:///q.db?password=***&x=1"
    assert redact_url("mysql+pymysql://root@127.0.0.1:3306/test") == "mysql+pymysql://root@127.0.0.1:3306/test"


def test_show_config_never_prints_a_password(capsys: pytest.CaptureFixture[str]) -> None:
    patch_frame_config(REDIS_URL="redis://user:s3cret@host:6379/0")
    assert settings.as_dict()["REDIS_URL"] == "redis://user:***@host:6379/0"
    assert main(["show-config"]) == 0
    assert main(["show-config", "--json"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert "redis://user:***@host:6379/0" in out


def test_show_config_names_the_folder_an_empty_folder_setting_means(capsys: pytest.CaptureFixture[str]) -> None:
    from funboost_like.core.config import default_data_dir

    patch_frame_config(LOG_DIR="", STATUS_DB_PATH="/tmp/elsewhere")
    assert main(["show-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"LOG_DIR = ''  # {default_data_dir() / 'logs'}" in lines
    assert "STATUS_DB_PATH = '/tmp/elsewhere'" in lines  # set: shown as it is


# ----- init-config and the template -----


def test_init_config_writes_refuses_then_forces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "distributed_frame_config.py"
    template = PACKAGE_TEMPLATE.read_text(encoding="utf-8")

    assert main(["init-config", "--path", str(tmp_path)]) == 0
    assert target.read_text(encoding="utf-8") == template

    target.write_text("REDIS_URL = 'mine'\n", encoding="utf-8")
    assert main(["init-config", "--path", str(tmp_path)]) == 1
    assert target.read_text(encoding="utf-8") == "REDIS_URL = 'mine'\n"
    assert "--force" in capsys.readouterr().err

    assert main(["init-config", "--path", str(tmp_path), "--force"]) == 0
    assert target.read_text(encoding="utf-8") == template


def test_init_config_through_python_dash_m(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "funboost_like", "init-config"],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "distributed_frame_config.py").read_bytes() == PACKAGE_TEMPLATE.read_bytes()


def test_template_copies_are_identical() -> None:
    assert ROOT_TEMPLATE.read_bytes() == PACKAGE_TEMPLATE.read_bytes()


def test_template_documents_every_setting_and_changes_none() -> None:
    text = PACKAGE_TEMPLATE.read_text(encoding="utf-8")
    for name, default in DEFAULTS.items():
        assert re.search(rf"^# {name} = {re.escape(repr(default))}  # \S", text, re.M) or re.search(
            rf'^# {name} = "{re.escape(str(default))}"  # \S', text, re.M
        ), f"{name} is missing from the template or its default is wrong"
    namespace: dict[str, object] = {}
    exec(compile(text, str(PACKAGE_TEMPLATE), "exec"), namespace)
    assert not set(namespace) & set(DEFAULTS)


# ----- import has no side effects -----


def test_import_prints_nothing_and_writes_nothing(tmp_path: Path) -> None:
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    code = (
        "import funboost_like\n"
        "import logging, funboost_like.cli, funboost_like.core.log\n"
        "assert not logging.getLogger('funboost_like').handlers\n"
        "assert not logging.getLogger().handlers\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workdir,
        env=_subprocess_env(HOME=str(home), XDG_DATA_HOME=str(home / "data")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == ""
    assert list(workdir.iterdir()) == []
    assert list(home.iterdir()) == []


def test_each_successful_run_is_one_debug_line_at_the_default_level_and_none_at_info(
        queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    from funboost_like import BrokerEnum, task_deco
    from funboost_like.brokers.registry import get_broker
    from funboost_like.middleware.run_log import RunLog

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)  # log_level DEBUG, the seed's default
    def add(x: int, y: int) -> int:
        return x + y

    @task_deco(queue_name + "_info", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, log_level=logging.INFO)
    def quiet(x: int) -> int:
        return x

    assert any(isinstance(m, RunLog) for m in add.consumer.middlewares)
    assert not any(isinstance(m, RunLog) for m in quiet.consumer.middlewares)  # nothing to pay per message
    with caplog.at_level(logging.DEBUG, logger="funboost_like"):
        add.push(1, y="x" * 500)  # fails: int + str, no retry line expected at DEBUG
        add.push(2, y=3)
        quiet.push(4)
        add.consume()
        quiet.consume()
        broker = get_broker(BrokerEnum.LOCAL_PYTHON_QUEUE)
        broker.join(queue_name, timeout=10, fail_fast=False)
        broker.join(queue_name + "_info", timeout=10)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "succeeded in" in r.getMessage()]
    assert len(lines) == 1, lines
    assert re.search(r"add\(x=2, y=3\) succeeded in \d+\.\d{4}s \(run 1\), result 5$", lines[0]), lines[0]
    assert all(len(r.getMessage()) < 2000 for r in caplog.records)  # a large argument is abbreviated


def test_the_debug_line_counts_the_runs_of_earlier_deliveries(queue_name: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A retry with backoff goes back through the broker: its second run is a new delivery, and the line
    gave "(run 1)" for it (as for a call run again after its consumer died)."""
    from funboost_like import BrokerEnum, task_deco
    from funboost_like.brokers.registry import get_broker

    failed: list[int] = []

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, max_retry_times=1, retry_backoff=0.05)
    def flaky(x: int) -> int:
        if not failed:
            failed.append(x)
            raise ValueError("first run fails")
        return x

    with caplog.at_level(logging.DEBUG, logger="funboost_like"):
        flaky.push(7)
        flaky.consume()
        get_broker(BrokerEnum.LOCAL_PYTHON_QUEUE).join(queue_name, timeout=10, fail_fast=False)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "succeeded in" in r.getMessage()]
    assert len(lines) == 1 and "(run 2)" in lines[0], lines


def test_create_logger_file_writes_the_queue_log_and_says_where(queue_name: str, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    from funboost_like import BrokerEnum, task_deco
    from funboost_like.brokers.registry import get_broker

    patch_frame_config(LOG_DIR=str(tmp_path / "logs"))

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, create_logger_file=True, logger_prefix="p_")
    def double(x: int) -> int:
        return 2 * x

    with caplog.at_level(logging.DEBUG, logger="funboost_like"):
        double.push(21)
        double.consume()
        get_broker(BrokerEnum.LOCAL_PYTHON_QUEUE).join(queue_name, timeout=10)
    path = tmp_path / "logs" / f"p_{queue_name}.log"
    [started] = [r.getMessage() for r in caplog.records if "consuming queue" in r.getMessage()]
    assert started.endswith(f"; log file {path}")
    deadline = time.monotonic() + 5
    while "double(x=21) succeeded" not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, "the run's line never reached the file"
        time.sleep(0.02)
    double.stop()


def test_every_setting_is_in_the_configuration_table() -> None:
    table = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [name for name in DEFAULTS if f"`{name}`" not in table]
    assert missing == [], f"add these settings to docs/configuration.md: {missing}"
