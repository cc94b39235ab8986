"""The pool contract every concurrency mode implements: three methods.

``submit`` starts a call as soon as a worker is free (growing the pool up to its ceiling when
every worker is busy), ``drain`` takes back the calls that were submitted but not started yet, and
``shutdown`` stops the workers, waiting up to a timeout for running calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any


class Pool(ABC):
    max_workers: int

    @abstractmethod
    def submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Schedule ``fn(arg)``. Never blocks; the caller bounds how much it submits."""

    @abstractmethod
    def drain(self) -> list[Any]:
        """Remove and return the ``arg`` of every submitted call that has not started."""

    @abstractmethod
    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting work and let workers exit; True when every running call ended in time."""

    @property
    @abstractmethod
    def worker_count(self) -> int:
        """How many workers exist right now."""

    def grow_if_stalled(self) -> bool:
        """Add workers for calls that wait because every worker is busy; True if calls are waiting."""
        return False

    def forget(self, thread_id: int) -> None:
        """Stop counting a worker stuck in an abandoned call (thread pools only)."""
        return None
