"""The publishing connections a broker opens one per thread, listed so that they can be closed.

A consumer's pool workers come and go (idle ones end), and each that published, or stored an RPC result,
opened a connection of its own: :meth:`PerThread.add` closes those of threads that ended whenever another
thread opens one, so a long-running process keeps one per live thread, not one per thread it ever had.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
logger = logging.getLogger("funboost_like.broker")


class PerThread(Generic[T]):
    """Every thread's connection, with its thread; ``close`` closes one (errors are logged at DEBUG)."""

    def __init__(self, close: Callable[[T], object]) -> None:
        self._close = close
        self._items: list[tuple[threading.Thread, T]] = []
        self._lock = threading.Lock()

    def add(self, item: T) -> None:
        """List the current thread's new ``item``; close the items of threads that ended."""
        with self._lock:
            ended = [old for thread, old in self._items if not thread.is_alive()]
            self._items = [(thread, old) for thread, old in self._items if thread.is_alive()]
            self._items.append((threading.current_thread(), item))
        self.close_all(ended)

    def forget(self, item: T) -> None:
        """Unlist ``item`` (broken: its owner closes it as it must)."""
        with self._lock:
            self._items = [(thread, kept) for thread, kept in self._items if kept is not item]

    def take_all(self) -> list[T]:
        """Unlist every item and return them (the broker closes)."""
        with self._lock:
            items, self._items = self._items, []
        return [item for _, item in items]

    def __len__(self) -> int:
        return len(self._items)

    def close_all(self, items: list[T]) -> None:
        for item in items:
            try:
                self._close(item)
            except Exception:  # noqa: BLE001 - closing anyway: it is broken or its thread is gone
                logger.debug("closing a publishing connection failed", exc_info=True)
