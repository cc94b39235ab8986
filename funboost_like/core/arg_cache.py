"""Cache mode (seed 002's ``use_cache``): arguments JSON cannot carry pass through this process's memory.

With ``use_cache=True`` (``task_deco`` for every call of a function, or
``PriorityConsumingControlConfig(use_cache=True)`` for one message), each argument that JSON can
encode travels in the message as usual, visible to filters and status records; each other one (a
socket, a lock, a DataFrame, ...) is kept here, by reference, and the message's ``extra`` carries
its key and names: ``{"cached": {"key": "<process>#<n>", "names": [...]}}``. The consumer takes the
objects out before the signature check, so the function gets the very objects that were pushed.

It works only when the publisher and the consumer share a process, and says so: a consumer in
another process (or after a restart, when the cache is gone) dead-letters the message with the
reason, and a persistent broker keeps it there. Taking the objects out removes them from the cache;
in-place retries (``max_retry_times``) reuse them, and a requeued message (``retry_backoff``,
``ExceptionForRequeue``) of a function decorated with ``use_cache=True`` puts them back for its next
run (:mod:`funboost_like.middleware.cache`). Entries of messages that never run (a purged queue)
stay until the process ends: :func:`clear` drops them all.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from typing import Any

from funboost_like.core import codec
from funboost_like.core.errors import DecodeError

CACHE_KEY = "cached"


def _new_process() -> None:
    global _process, _counter
    _process = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
    _counter = itertools.count()
    _entries.clear()  # a forked child's copies would be the parent's objects, run twice


_entries: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()
_process = ""
_counter = itertools.count()
_new_process()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_process)


def stash(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Move the arguments of ``kwargs`` that JSON cannot encode into the cache; return what ``extra``
    carries for them (None when every argument encodes)."""
    kept: dict[str, Any] = {}
    for name, value in kwargs.items():
        try:
            codec.dumps_arguments(value)
        except (TypeError, ValueError):
            kept[name] = value
    if not kept:
        return None
    for name in kept:
        del kwargs[name]
    key = f"{_process}#{next(_counter)}"
    with _lock:
        _entries[key] = kept
    return {"key": key, "names": list(kept)}


def take(kwargs: dict[str, Any], reference: object) -> None:
    """Move the cached arguments of ``reference`` (``extra["cached"]``) into ``kwargs``; raise DecodeError
    saying why they are not here."""
    key = reference.get("key") if isinstance(reference, dict) else None
    if not isinstance(key, str):
        raise DecodeError(f"extra[{CACHE_KEY!r}] must be an object with a string 'key', got {reference!r}")
    with _lock:
        entry = _entries.pop(key, None)
    if entry is None:
        origin = key.rpartition("#")[0]
        if origin != _process:
            raise DecodeError(f"its arguments were cached (use_cache=True) in the publishing process {origin} and "
                              f"exist only there; cache mode needs the publisher and the consumer in one process")
        raise DecodeError("its cached arguments (use_cache=True) are no longer in this process (taken by an "
                          "earlier run of a requeued message, or cleared)")
    kwargs.update(entry)


def put_back(reference: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Cache again the arguments of a message that goes back to its queue, under the same key."""
    names = reference.get("names") or ()
    with _lock:
        _entries[reference["key"]] = {name: kwargs[name] for name in names if name in kwargs}


def clear() -> int:
    """Drop every entry (of messages that will never run here, say after a purge); return how many."""
    with _lock:
        n = len(_entries)
        _entries.clear()
    return n


def size() -> int:
    return len(_entries)
