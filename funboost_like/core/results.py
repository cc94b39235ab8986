"""What ``push``/``publish`` return."""

from __future__ import annotations

from typing import TYPE_CHECKING

from funboost_like.core.errors import ResultNotAvailable

if TYPE_CHECKING:
    from funboost_like.core.publisher import Publisher


class AsyncResult:
    """A handle on one published call. ``task_id`` identifies the message on the wire.

    Fetching the call's result needs RPC mode, which this version does not provide yet; asking for
    it raises :class:`ResultNotAvailable` instead of blocking forever.
    """

    __slots__ = ("task_id", "publisher")

    def __init__(self, task_id: str, publisher: Publisher | None = None) -> None:
        self.task_id = task_id
        self.publisher = publisher

    def __repr__(self) -> str:
        return f"AsyncResult(task_id={self.task_id!r})"

    def get(self, timeout: float | None = None) -> object:
        raise ResultNotAvailable(
            f"task {self.task_id}: results are only kept in RPC mode (is_using_rpc_mode=True), which is not built yet"
        )

    @property
    def result(self) -> object:
        return self.get()

    @property
    def status_and_result(self) -> object:
        return self.get()
