"""Running trivially fast calls on the fetcher thread itself.

Handing a call to a pool worker costs two thread wake-ups per batch (the worker's when work arrives,
the fetcher's when capacity frees), and on a virtual machine whose idle CPUs halt, each wake-up can
cost more than a trivial call. So while the consumer's calls are fast, the fetcher runs them itself:

* only in THREADING mode without a rate limit or a decorator-level ``function_timeout`` (the consumer
  decides); the fetcher decodes each message before it decides, and one whose ``extra`` carries its
  own ``function_timeout`` goes to the pool with its decoded form, since a timed call needs a thread
  of its own (the message is decoded once either way);
* only after :data:`FAST_CALLS_FIRST` calls in a row took less than :data:`SLOW_CALL_SECONDS` each
  (wherever they ran); one slower call sends the following ones back to the pool until the streak is
  made again, so functions that block (I/O) always run in the pool, where they run side by side;
* a call that turns out slow while running inline does not hold up its batch: a rescuer thread that
  looks every :data:`RESCUE_AFTER_SECONDS` hands the batch's remaining messages to the pool; and if
  it runs past :data:`HAND_OVER_AFTER_SECONDS`, fetching goes on in a new fetcher thread (the caller's
  ``hand_over``), so a call that waits long (even for another message of the same queue, through RPC)
  never stops the consumer. The old thread finishes its call, settles it and ends.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from logging import Logger
from typing import TYPE_CHECKING, Any, Protocol

from funboost_like.core.errors import DecodeError
from funboost_like.core.message import DecodedMessage, FunctionSignature, decode

if TYPE_CHECKING:
    from funboost_like.brokers.base import Delivery
    from funboost_like.concurrency.base import Pool

# A call at least this long (wall time, retries included) is not "fast". Shorter calls lose no
# parallelism inline: the pool grows only when work waits 20 ms, so it runs them one after another too.
SLOW_CALL_SECONDS = 0.001
FAST_CALLS_FIRST = 50  # fast calls in a row before the fetcher runs calls itself
RESCUE_AFTER_SECONDS = 0.02  # an inline call running this long: the rest of its batch goes to the pool
HAND_OVER_AFTER_SECONDS = 0.1  # ... and this long: a new thread takes over fetching
_RESCUER_IDLE_SECONDS = 1.0  # the rescuer sleeps on an event after this long without inline calls


class Process(Protocol):
    """The consumer's way of running one message; ``message`` is its decoded form when already known."""

    def __call__(self, delivery: Delivery, message: DecodedMessage | None = None) -> None: ...


class InlineRunner:
    """The fetcher's way of running calls itself, with the rescue of a batch behind a slow call."""

    def __init__(self, process: Process, signature: FunctionSignature, pool: Pool, logger: Logger, name: str,
                 hand_over: Callable[[], None]) -> None:
        self._process = process
        self._signature = signature
        self._pool = pool
        self._logger = logger
        self._name = name
        self._hand_over = hand_over  # starts a new fetcher thread (called by the rescuer)
        self.fast_streak = 0  # written by every thread that finishes a call; a heuristic, races are harmless
        self._rest: deque[Delivery] = deque()  # the current batch's messages not started yet
        self._lock = threading.Lock()  # orders a call's end against the rescuer's decisions
        self._since = 0.0  # monotonic start of the inline call running now (0: none)
        self._caller = 0  # the thread running that call
        self._handed_over = 0  # a thread whose fetching was handed over while its call ran (0: none)
        self._active = threading.Event()  # set while inline batches run: the rescuer watches
        self._closed = threading.Event()
        self._rescuer: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.fast_streak >= FAST_CALLS_FIRST and not self._handed_over

    def record(self, duration: float) -> None:
        """Count one finished call (any thread)."""
        if duration < SLOW_CALL_SECONDS:
            self.fast_streak += 1
        else:
            self.fast_streak = 0

    def run(self, deliveries: list[Delivery], stop: threading.Event) -> bool:
        """Run ``deliveries`` on this thread, one by one, until done or ``stop`` is set.

        What the rescuer moved to the pool runs there; what is left after ``stop`` stays for
        :meth:`take_rest`. Returns False when fetching was handed over to a new thread while a call
        ran here: the caller is no longer the fetcher and must end.
        """
        rest = self._rest
        rest.extend(deliveries)
        if not self._active.is_set():
            self._wake_rescuer()
        process = self._process
        signature = self._signature
        lock = self._lock
        me = threading.get_ident()
        while not stop.is_set():
            try:
                delivery = rest.popleft()
            except IndexError:
                return True
            message: DecodedMessage | None
            try:
                message = decode(delivery.body, signature)
            except DecodeError:
                message = None  # process() decodes it again and dead-letters it with the reason
            else:
                if message.extra.get("function_timeout"):  # a timed call needs a thread of its own
                    self._pool.submit(partial(process, message=message), delivery)
                    continue
            with lock:
                self._since, self._caller = time.monotonic(), me
            try:
                process(delivery, message)  # settles its outcome itself, whatever happens
            except BaseException:  # as a pool worker does: log it, never lose the fetcher
                self._logger.exception("unhandled error in a call run by the fetcher of %s", self._name)
            finally:
                with lock:
                    self._since = 0.0
                    handed_over = self._handed_over == me
                    if handed_over:
                        self._handed_over = 0
            if handed_over:
                return False
        return True

    def take_rest(self) -> list[Delivery]:
        """The messages of an interrupted batch that never started."""
        taken = []
        while True:
            try:
                taken.append(self._rest.popleft())
            except IndexError:
                return taken

    def close(self) -> None:
        """Stop the rescuer (and wait for it, so it moves nothing to the pool after this returns)."""
        self._closed.set()
        self._active.set()  # wakes the rescuer so it can see it is closed
        if self._rescuer is not None and self._rescuer is not threading.current_thread():
            self._rescuer.join(1.0)

    # -- the rescuer -----------------------------------------------------------------------------
    def _wake_rescuer(self) -> None:
        self._active.set()
        if self._rescuer is None:
            self._rescuer = threading.Thread(target=self._rescue_loop, name=f"{self._name}-rescuer", daemon=True)
            self._rescuer.start()

    def _rescue_loop(self) -> None:
        active, closed = self._active, self._closed
        idle_since: float | None = None
        while True:
            active.wait()
            if closed.wait(RESCUE_AFTER_SECONDS):
                return
            since = self._since
            now = time.monotonic()
            if not since:
                if idle_since is None:
                    idle_since = now
                elif now - idle_since > _RESCUER_IDLE_SECONDS:
                    active.clear()  # sleep until the next inline batch (run() sets it again)
                    idle_since = None
                    if self._since:
                        active.set()
                continue
            idle_since = None
            if now - since >= RESCUE_AFTER_SECONDS and self._rest:
                self.fast_streak = 0
                moved = self._move_rest_to_pool()
                if moved:
                    self._logger.debug("a call ran over %.0f ms on the fetcher of %s; %d message(s) of its batch "
                                       "went to the pool", RESCUE_AFTER_SECONDS * 1000, self._name, moved)
            if now - since >= HAND_OVER_AFTER_SECONDS:
                with self._lock:  # the call may have ended meanwhile: then its thread goes on fetching
                    if self._since == since and not self._handed_over and not closed.is_set():
                        self.fast_streak = 0
                        self._handed_over = self._caller
                        self._hand_over()

    def _move_rest_to_pool(self) -> int:
        moved = 0
        submit: Callable[[Callable[[Any], None], Any], None] = self._pool.submit
        while True:
            try:
                delivery = self._rest.popleft()
            except IndexError:
                return moved
            submit(self._process, delivery)
            moved += 1
