"""One daemon thread per process that serves a changing list of members (the operations agent, the
Redis heartbeats): started by the first member, ended by its own loop once the last member is gone,
and emptied in a forked child, which runs none of its parent's consumers."""

from __future__ import annotations

import logging
import threading
from typing import ClassVar, Generic, TypeVar

from funboost_like.core.outage import Outage

M = TypeVar("M")


class MemberThread(Generic[M]):
    """Subclasses set ``thread_name``, ``logger`` and ``service`` and write :meth:`_run`, which calls
    :meth:`_members_or_end` each round, reports each round's failure (or None) to ``self._outage``, and
    returns when :meth:`_members_or_end` gives an empty list."""

    thread_name: ClassVar[str]
    logger: ClassVar[logging.Logger]
    service: ClassVar[str]  # what failing rounds are logged as ("the operations registry")

    def __init__(self) -> None:
        self.reset_in_child()

    def reset_in_child(self) -> None:
        """Empty: a new instance, or a forked child's copy (its members are the parent's)."""
        self._members: list[M] = []
        self._lock = threading.Lock()
        self._io = threading.Lock()  # a member's record is written or removed at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage = Outage(self.logger, self.service)

    def add(self, member: M) -> None:
        with self._lock:
            self._members.append(member)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
                self._thread.start()
        self._wake.set()  # the new member's first round at once

    def wake(self) -> None:
        self._wake.set()

    def _discard(self, member: M) -> None:
        with self._lock:
            if member in self._members:
                self._members.remove(member)

    def _members_or_end(self) -> list[M]:
        """The members now; when there are none, the thread is marked ended (the caller returns)."""
        with self._lock:
            members = list(self._members)
            if not members:
                self._thread = None
            return members

    def _run(self) -> None:
        raise NotImplementedError
