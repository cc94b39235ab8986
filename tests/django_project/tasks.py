"""Consuming functions of the test project (importable, so child processes find them by name)."""

from __future__ import annotations

import os
import time
from typing import Any


def record_message(message: dict[str, Any]) -> None:
    """Append ``<i> <pid>`` to the file ``message["record"]`` (one write per line, O_APPEND)."""
    time.sleep(float(message.get("seconds", 0.0)))
    fd = os.open(message["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{message['i']} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
