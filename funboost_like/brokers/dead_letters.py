"""A dead letter, and the JSON envelope ``{"body", "reason", "failed_at", "attempts"}`` that brokers without
a native dead-letter record keep it as (a ``<queue>.dlq`` queue, a Redis list, a stream); a body that is
not UTF-8 is kept in base64 as ``body_base64`` in place of ``body``."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from funboost_like.core import codec


@dataclass(frozen=True)
class DeadLetter:
    """A message the framework gave up on, with the reason and the number of runs it had."""

    queue: str
    body: bytes
    reason: str
    failed_at: float
    attempts: int = 0
    error: BaseException | None = field(default=None, compare=False, repr=False)
    # where the broker keeps it (a row id, a stream sequence, the stored bytes), for remove_dead_letter
    ref: Any = field(default=None, compare=False, repr=False)

    def envelope(self) -> bytes:
        """The letter as JSON text (the error is not kept): the body as text, or in base64 as ``body_base64``
        when it is not UTF-8, so the letter keeps the very bytes that failed."""
        try:
            body: dict[str, str] = {"body": self.body.decode("utf-8")}
        except UnicodeDecodeError:
            body = {"body_base64": base64.b64encode(self.body).decode("ascii")}
        return codec.dumps({**body, "reason": self.reason, "failed_at": self.failed_at, "attempts": self.attempts})

    @classmethod
    def from_envelope(cls, queue: str, raw: bytes) -> DeadLetter:
        """The letter an :meth:`envelope` holds; anything else is kept whole, as an unreadable envelope."""
        try:
            envelope = codec.loads(raw)
            body = (base64.b64decode(envelope["body_base64"], validate=True) if "body_base64" in envelope
                    else str(envelope["body"]).encode())
            return cls(queue, body, str(envelope.get("reason", "")),
                       float(envelope.get("failed_at", 0.0)), int(envelope.get("attempts", 0)), ref=raw)
        except (KeyError, TypeError, AttributeError, ValueError, UnicodeDecodeError, binascii.Error):
            return cls(queue, bytes(raw), "unreadable dead-letter envelope", 0.0, 0, ref=raw)


# Where a letter cannot be deleted alone (a log, a FIFO read from the front), removing it appends a
# tombstone naming it, ``{"fl_removed": ref}``, beside the letters; listings skip both.
_REMOVED = "fl_removed"
_TOMBSTONE_START = b'{"' + _REMOVED.encode() + b'"'


def tombstone(ref: Any) -> bytes:
    """The record that says the letter ``ref`` (JSON-able: a position, a [partition, offset]) is removed."""
    return codec.dumps({_REMOVED: ref})


def removed_ref(raw: bytes) -> Any:
    """The ``ref`` a tombstone names (a list comes back as a tuple); None for a letter or anything else."""
    if not raw.startswith(_TOMBSTONE_START):
        return None
    try:
        ref = codec.loads(raw)[_REMOVED]
    except (ValueError, KeyError, TypeError):  # codec.DecodeFailure is ValueError
        return None
    return tuple(ref) if isinstance(ref, list) else ref
