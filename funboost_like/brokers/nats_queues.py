"""A NATS queue's names on the server (see :mod:`~funboost_like.brokers.nats_broker`), what a fetch makes of
the messages it took, and the mover of due delayed messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time

from funboost_like.brokers.base import Delivery
from funboost_like.brokers.nats_jetstream import JetStream, Puller
from funboost_like.brokers.nats_pull import Pulled, WirePuller
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.nats")

ATTEMPTS, CRASHES, DUE, MSG_ID = "fl-attempts", "fl-crashes", "fl-due", "Nats-Msg-Id"
CONSUMER, DELAY_CONSUMER = "fl", "fl-delay"
MAX_ACK_PENDING = 100_000
DEAD_LETTER_LIMIT = 10_000
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_BAD_SUBJECT = re.compile(r"[\s*>]|^\.|\.$|\.\.")
Copy = tuple[str, bytes, int, int, str]  # (token of the original, body, attempts before, crashes, de-dup id)


def stream_name(queue: str) -> str:
    """``fl_<queue>`` with characters outside ``[A-Za-z0-9_-]`` replaced (plus a hash of the name if any was)."""
    if not queue or _BAD_SUBJECT.search(queue):
        raise ConfigurationError(f"NATS queue names must be valid subjects (no spaces, '*', '>'), not {queue!r}")
    safe = _UNSAFE.sub("_", queue)
    return f"fl_{safe}" if safe == queue else f"fl_{safe}_{hashlib.sha1(queue.encode()).hexdigest()[:8]}"


def check_queue_name(queue: str) -> None:
    """A valid subject (:func:`stream_name`) whose stream is no other queue's dead-letter stream: queue
    ``q_dlq`` would have the stream ``fl_q_dlq`` of queue ``q``'s dead letters."""
    if stream_name(queue).endswith("_dlq"):
        raise ConfigurationError(f"NATS queue names must not end with '_dlq': the stream of {queue!r} would be the "
                                 f"dead-letter stream of queue {queue[:-4]!r}")


NO_SUCH_SEQUENCE = 10043  # JetStream's error code for a message sequence a stream does not hold


class Queue:
    """A queue's names on the server, and this process's pullers for it."""

    def __init__(self, queue: str) -> None:
        self.queue, self.stream = queue, stream_name(queue)
        self.dlq_stream, self.delayed, self.dlq = f"{self.stream}_dlq", f"{queue}.fl-delayed", f"{queue}.dlq"
        self.ready, self.delay = Puller(self.stream, CONSUMER), Puller(self.stream, DELAY_CONSUMER)
        self.mover: asyncio.Task[None] | None = None
        self.dlq_made = False
        self.wire: WirePuller | None = None  # pulls ready messages on the fetching thread (into ready.stash)


def numbers(reply: str) -> tuple[int, int]:
    """(num_delivered, stream sequence) from a JetStream reply subject: ``$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>...``, or the form with a domain and an account hash after ``$JS.ACK``."""
    tokens = reply.split(".")
    at = 4 if len(tokens) == 9 else 6
    return int(tokens[at]), int(tokens[at + 1])


def copy_of(pulled: Pulled) -> Copy:
    """The copy of a delivery the server made again (its holder died): every earlier delivery counted
    as a crash, with the de-duplication id shared by every copy of that stream message."""
    reply, data, headers = pulled
    attempts, crashes = int((headers or {}).get(ATTEMPTS, 0)), int((headers or {}).get(CRASHES, 0))
    delivered, seq = numbers(reply)
    return reply, data, attempts + delivered - 1, crashes + delivered - 1, f"fl.{seq}.{attempts}"


def sort_out(queue: str, q: Queue, taken: list[Pulled]) -> tuple[list[Delivery], list[Copy]]:
    """The deliveries of what a fetch took, and the copies to make of those whose holder died."""
    got: list[Delivery] = []
    dead: list[Copy] = []
    first = f"$JS.ACK.{q.stream}.{CONSUMER}.1."  # a first delivery's reply subject starts so
    for pulled in taken:
        reply, data, headers = pulled
        if not reply.startswith(first) and numbers(reply)[0] > 1:  # its holder died: counted in a
            dead.append(copy_of(pulled))  # copy, which runs alone later
        elif headers is None:
            got.append(Delivery(queue, data, reply))
        else:
            got.append(Delivery(queue, data, reply, int(headers.get(ATTEMPTS, 0)) + 1, 0,
                                int(headers.get(CRASHES, 0))))
    return got, dead


async def move_due(jet: JetStream, q: Queue) -> None:
    """Move due delayed messages of ``q`` to its ready subject; ``nak`` the others until due."""
    while True:
        try:
            await jet.long_poll(q.delay, 5.0)
            for reply, data, got_headers in await jet.take(q.delay, 256):
                headers = dict(got_headers or {})
                left = float(headers.pop(DUE, 0)) - time.time()
                if left > 0.001:
                    await jet.ack([reply], verb=b'-NAK {"delay": %d}' % int(left * 1e9))
                    continue
                headers[MSG_ID] = f"fl.d.{numbers(reply)[1]}"
                await jet.publish([(q.queue, data, headers)])
                await jet.ack([reply], confirm=True)  # so count() stops counting it at once
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged; tried again
            logger.warning("moving due delayed messages of queue %r failed (%s); retrying", q.queue, exc)
            await asyncio.sleep(1.0)
