"""Logging helpers.

The framework logs through standard :mod:`logging`, one logger per queue named
``funboost_like.<prefix><queue_name>``, with lazy ``%``-style arguments. Nothing here runs at
import time: no handler is attached, no file is opened, ``print`` and ``sys.stdout`` are left alone.

Two optional handlers are provided:

- :class:`ColorConsoleHandler`, attached by :func:`ensure_console_handler` only when the
  application configured no logging at all (so a plain script still shows the consumer's output);
- :class:`ConcurrentRotatingFileHandler`, a size-rotating file handler that several processes may
  share (attached by :func:`add_file_handler`).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from funboost_like.core.config import data_dir_setting, settings

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    _StreamHandler = logging.StreamHandler[TextIO]
else:
    _StreamHandler = logging.StreamHandler

PACKAGE_LOGGER_NAME = "funboost_like"
LOG_FORMAT = '%(asctime)s - %(name)s - "%(filename)s:%(lineno)d" - %(levelname)s - %(message)s'
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 10

_console_lock = threading.Lock()
_file_handler_lock = threading.Lock()


def get_logger(queue_name: str, level: int, prefix: str = "") -> logging.Logger:
    """Return the logger ``funboost_like.<prefix><queue_name>``, set to ``level``."""
    logger = logging.getLogger(f"{PACKAGE_LOGGER_NAME}.{prefix}{queue_name}")
    logger.setLevel(level)
    return logger


def ensure_console_handler() -> logging.Handler | None:
    """Attach one :class:`ColorConsoleHandler` to the ``funboost_like`` logger if nothing is configured.

    A handler is added only when neither the root logger nor the ``funboost_like`` logger has a
    handler and the ``LOG_CONSOLE`` setting is true; an application that configures logging keeps
    full control. Idempotent and thread-safe. Returns the handler added, or ``None``.
    """
    with _console_lock:
        package_logger = logging.getLogger(PACKAGE_LOGGER_NAME)
        if logging.getLogger().handlers or package_logger.handlers:
            return None
        if not settings.get("LOG_CONSOLE"):
            return None
        handler = ColorConsoleHandler()
        package_logger.addHandler(handler)
        return handler


class ColorConsoleHandler(_StreamHandler):
    """A stream handler (stderr by default) whose lines are coloured by level.

    Colour is used only when the stream is a terminal, the ``LOG_COLOR`` setting is true and the
    ``NO_COLOR`` environment variable is unset or empty (https://no-color.org).
    """

    # Highest level first: a record takes the colour of the highest level it reaches.
    LEVEL_COLORS = (
        (logging.CRITICAL, "\033[1;31m"),  # bold red
        (logging.ERROR, "\033[31m"),  # red
        (logging.WARNING, "\033[33m"),  # yellow
        (logging.INFO, "\033[32m"),  # green
    )
    DEBUG_COLOR = "\033[36m"  # cyan
    RESET = "\033[0m"

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        self.use_color = self._should_use_color()

    def setStream(self, stream: TextIO) -> TextIO | None:
        previous = super().setStream(stream)
        self.use_color = self._should_use_color()
        return previous

    def _should_use_color(self) -> bool:
        if os.environ.get("NO_COLOR") or not settings.get("LOG_COLOR"):
            return False
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty()) if isatty is not None else False
        except ValueError:  # closed stream
            return False

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.use_color:
            return text
        color = next((code for level, code in self.LEVEL_COLORS if record.levelno >= level), self.DEBUG_COLOR)
        return f"{color}{text}{self.RESET}"


def add_file_handler(
    logger: logging.Logger,
    filename: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backup_count: int = DEFAULT_BACKUP_COUNT,
) -> logging.Handler:
    """Make ``logger`` also write to ``filename`` inside the ``LOG_DIR`` folder.

    ``LOG_DIR`` defaults to ``<per-user data dir>/logs``; it is created when the first record is
    written, not here. An absolute ``filename`` is used as is. Several processes may log to the
    same file (see :class:`ConcurrentRotatingFileHandler`; on Windows, one process per file).
    Adding the same file twice to one logger returns the existing handler.
    """
    path = os.path.abspath(data_dir_setting("LOG_DIR", "logs") / filename)
    with _file_handler_lock:
        for existing in logger.handlers:
            if getattr(existing, "baseFilename", None) == path:
                return existing
        handler = ConcurrentRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backup_count)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        logger.addHandler(handler)
        return handler


if sys.platform == "win32":

    class ConcurrentRotatingFileHandler(logging.handlers.RotatingFileHandler):
        """On Windows, the standard size-rotating file handler: safe for one process per file only.

        It has the POSIX handler's signature; the file and its folder are created with the first record.
        """

        def __init__(
            self,
            filename: str | os.PathLike[str],
            maxBytes: int = DEFAULT_MAX_BYTES,
            backupCount: int = DEFAULT_BACKUP_COUNT,
            encoding: str = "utf-8",
        ) -> None:
            super().__init__(filename, maxBytes=maxBytes, backupCount=backupCount, encoding=encoding, delay=True)

        def emit(self, record: logging.LogRecord) -> None:
            if self.stream is None:
                try:
                    Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
                except OSError:
                    self.handleError(record)
                    return
            super().emit(record)

else:

    class ConcurrentRotatingFileHandler(logging.Handler):
        """A size-rotating file handler that several processes may write to at once (POSIX only).

        Each record is written with a single ``os.write`` to a descriptor opened with ``O_APPEND``, so
        records from different processes never interleave. When the file would grow past ``maxBytes``,
        the rotation (``name`` -> ``name.1`` -> ... -> ``name.<backupCount>``) happens under an exclusive
        ``flock`` on the sidecar file ``<name>.lock``; after taking the lock the handler re-checks, and if
        another process rotated meanwhile (the path now names another inode) it only reopens the file.
        A record written by a process that has not yet noticed a rotation lands in ``name.1``: it is
        never lost while fewer than ``backupCount`` rotations happen between two of its writes.
        As with :class:`logging.handlers.RotatingFileHandler`, rotation is off when ``maxBytes`` or
        ``backupCount`` is 0. The file and its folder are created when the first record is written.
        The parameter names are those of :class:`logging.handlers.RotatingFileHandler`.
        """

        def __init__(
            self,
            filename: str | os.PathLike[str],
            maxBytes: int = DEFAULT_MAX_BYTES,
            backupCount: int = DEFAULT_BACKUP_COUNT,
            encoding: str = "utf-8",
        ) -> None:
            super().__init__()
            self.baseFilename = os.path.abspath(os.fspath(filename))
            self.maxBytes = maxBytes
            self.backupCount = backupCount
            self.encoding = encoding
            self._lock_path = self.baseFilename + ".lock"
            self._fd: int | None = None

        def emit(self, record: logging.LogRecord) -> None:
            try:
                data = (self.format(record) + "\n").encode(self.encoding, "backslashreplace")
                fd = self._fd if self._fd is not None else self._open()
                if self._should_rollover(fd, len(data)):
                    fd = self._rollover(fd, len(data))
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except Exception:
                self.handleError(record)

        def close(self) -> None:
            self.acquire()
            try:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
            finally:
                self.release()
            super().close()

        def _open(self) -> int:
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            return self._fd

        def _reopen(self) -> int:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            return self._open()

        def _should_rollover(self, fd: int, incoming: int) -> bool:
            if self.maxBytes <= 0 or self.backupCount <= 0:
                return False
            stat = os.fstat(fd)
            # st_nlink == 0: the file was rotated past backupCount and deleted; never write into it.
            return stat.st_nlink == 0 or stat.st_size + incoming > self.maxBytes

        def _replaced_by_other_process(self, fd: int) -> bool:
            try:
                on_disk = os.stat(self.baseFilename)
            except FileNotFoundError:
                return True
            ours = os.fstat(fd)
            return (on_disk.st_dev, on_disk.st_ino) != (ours.st_dev, ours.st_ino)

        def _rollover(self, fd: int, incoming: int) -> int:
            """Rotate if still needed once the lock is held; return the descriptor to write to."""
            # The lock file is opened per rotation: an flock is shared by descriptors inherited over
            # fork, so a descriptor kept open would not exclude a forked child.
            lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                if self._replaced_by_other_process(fd):
                    fd = self._reopen()
                if self._should_rollover(fd, incoming):
                    self._rotate_files()
                    fd = self._reopen()
                return fd
            finally:
                os.close(lock_fd)  # releases the flock

        def _rotate_files(self) -> None:
            base = self.baseFilename
            last = 0  # backups are numbered 1..last without gaps; shift only those that exist
            while last < self.backupCount - 1 and os.path.exists(f"{base}.{last + 1}"):
                last += 1
            for index in range(last, 0, -1):
                try:
                    os.replace(f"{base}.{index}", f"{base}.{index + 1}")
                except FileNotFoundError:
                    pass
            try:
                os.replace(base, f"{base}.1")
            except FileNotFoundError:
                pass
