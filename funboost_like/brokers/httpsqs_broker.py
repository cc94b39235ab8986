"""HTTPSQS: Zhang Yan's HTTP Simple Queue Service (httpsqs 1.7, Tokyo Cabinet), over keep-alive HTTP.

Each queue is an httpsqs queue of the same name on the server of ``HTTPSQS_URL``
(``http://host:1218/?auth=PASSWORD``; the password never reaches a log). A publish is one
``opt=put`` request, ``publish_many`` pipelines its puts on one connection (order kept), a fetch
of several messages one ``opt=get`` then the others pipelined; ``count`` reads ``opt=status_json``
and ``purge`` is ``opt=reset`` (which also forgets a ``maxqueue`` set on the queue, as httpsqs does).

Guarantee: **at-most-once**. httpsqs has no acknowledgement: ``opt=get`` removes the message, so
a consumer killed while it holds messages loses them (running, fetched but not started: at most
its free room, about ``concurrent_num``; and the delayed messages it was keeping until due, see
below). Waiting messages are as persistent as httpsqs makes them (Tokyo Cabinet, synced to disk
every 5 s by default: a killed server loses up to that much). A publish returns when the server
answered ``HTTPSQS_PUT_OK``; a full queue (``HTTPSQS_PUT_END``, 1,000,000 messages by default) or a
wrong password raises ``BrokerError``.

What httpsqs lacks is emulated or refused, never pretended:

* attempts and delays travel in the message: a requeued or delayed message is stored as
  ``\\x1e<attempts> <due UNIX time>\\x1e<body>``; a message published without either is stored
  as its body alone, so other httpsqs clients (funboost's own ``HTTPSQS`` publisher, PHP, curl)
  read and write this framework's queues. A body written by someone else that starts with that
  exact header would be misread; nothing else is;
* delays (``countdown``, ``eta``, retries with backoff, ``nack(delay=)``): **emulated**. The
  message waits on the server; a consumer that takes it before it is due keeps it in memory until
  then (so a delayed message does not block the ones behind it) and puts it back on the server at
  a graceful stop or ``close``; a SIGKILL loses it, as anything else it held;
* a nack puts the message back at the end of the queue, attempt counted; a release (unstarted
  messages at a graceful stop) at the end too, without counting one: httpsqs cannot put at the
  front, so those messages lose their place;
* dead letters: kept in the httpsqs queue ``<queue>.dlq`` as JSON envelopes, listed with
  ``opt=view`` (newest first) and purged with ``opt=reset``; removing one letter puts a tombstone
  naming its position there (httpsqs reads only from the front), which listings skip;
* no priorities, no key-value records (no RPC results, no task filtering), no routing: the
  capabilities say so, and parameter validation refuses them at decoration time.

Names: httpsqs keeps names of at most 256 bytes, so a queue name is 1 to 252 UTF-8 bytes (room
for ``.dlq``). Bodies are C strings there: a body with a NUL byte is refused at publish time.
Settings: ``HTTPSQS_URL``, ``HTTPSQS_TIMEOUT_SECONDS`` (one request's answer), ``HTTPSQS_PIPELINE``
(requests in flight on one connection; 1 turns pipelining off).
"""

from __future__ import annotations

import dataclasses
import heapq
import http.client
import itertools
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import ClassVar

from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.dead_letters import removed_ref, tombstone
from funboost_like.brokers.httpsqs_client import HttpsqsClient, HttpsqsRefused, Reply
from funboost_like.core.config import redact_url, settings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.httpsqs")
HEADER = re.compile(rb"\x1e(\d+) (\d+(?:\.\d+)?)\x1e")
STATUS = re.compile(rb'"maxqueue":(\d+),"putpos":(\d+),"putlap":\d+,"getpos":(\d+),"getlap":\d+,"unread":(\d+)\}\s*\Z')
NAME_BYTES = 252
SCAN_LIMIT = 10_000  # queue positions list_delayed reads
LIST_PAGE = 500  # dead-letter positions read in one pipelined batch


def check_queue_name(queue: str) -> None:
    """httpsqs names are at most 256 bytes (and ``.dlq`` must fit); no NUL."""
    size = len(queue.encode("utf-8"))
    if not 1 <= size <= NAME_BYTES or "\0" in queue:
        raise ConfigurationError(f"HTTPSQS queue names are 1 to {NAME_BYTES} UTF-8 bytes without NUL "
                                 f"(httpsqs keeps names of at most 256 bytes, and '.dlq' must fit), not {queue!r}")


def frame(body: bytes, attempts: int, due: float | None) -> bytes:
    """The stored form of a message: its body alone, or with the header of attempts and due time."""
    if b"\0" in body:
        raise ValueError("httpsqs stores messages as C strings: a body with a NUL byte would be cut there")
    if not attempts and not due and not body.startswith(b"\x1e"):
        return body
    return b"\x1e%d %.3f\x1e" % (attempts, due or 0.0) + body


def unframe(stored: bytes) -> tuple[bytes, int, float]:
    """(body, attempts so far, due time or 0) of a stored message."""
    if stored.startswith(b"\x1e"):
        header = HEADER.match(stored)
        if header is not None:
            return stored[header.end():], int(header.group(1)), float(header.group(2))
    return stored, 0, 0.0


class HttpsqsBroker(Broker):
    """Queues on an httpsqs server; at-most-once (see the module docstring)."""

    kind = BrokerEnum.HTTPSQS
    capabilities = Capabilities(redelivery="none", delay="emulated", max_priority=0, dead_letters=True,
                                key_value=False, routing="none", persistent=True, cross_process=True,
                                cross_host=True, fifo=True, queue_names=check_queue_name, release_front=False,
                                counts_delayed=False, purges_delayed=False)  # delays kept by processes
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError, http.client.HTTPException)
    errors: ClassVar[tuple[type[BaseException], ...]] = (HttpsqsRefused, ValueError)

    def __init__(self) -> None:
        super().__init__()
        self._client_lock = threading.Lock()
        self._client_key: tuple[str, float, int] | None = None
        self._http: HttpsqsClient | None = None
        self._fresh_state()

    def _fresh_state(self) -> None:
        self._tokens = itertools.count(1)
        self._parked: dict[str, list[tuple[float, int, bytes, int]]] = {}  # queue -> heap of not yet due
        self._parked_lock = threading.Lock()

    def _after_fork(self) -> None:
        if self._http is not None:
            self._http.forget()
        self._client_lock = threading.Lock()
        self._fresh_state()  # the parent keeps what it parked

    # -- the server ----------------------------------------------------------------------------
    def _client(self) -> HttpsqsClient:
        key = (str(settings.get("HTTPSQS_URL")), float(settings.get("HTTPSQS_TIMEOUT_SECONDS")),
               int(settings.get("HTTPSQS_PIPELINE")))
        http = self._http
        if http is None or key != self._client_key:
            with self._client_lock:
                if self._http is None or key != self._client_key:
                    if self._http is not None:
                        self._http.close()
                    self._http, self._client_key = HttpsqsClient(*key), key
                http = self._http
        assert http is not None
        return http

    def _where(self) -> str:
        return f"HTTPSQS at {redact_url(str(settings.get('HTTPSQS_URL')))}"

    def _send(self, queue: str, opt: str, count: int = 1, extra: str = "") -> list[Reply]:
        client = self._client()
        return client.send([client.request_bytes(queue, opt, extra)] * count)

    @staticmethod
    def _refused(reply: Reply, action: str) -> HttpsqsRefused:
        word = reply.body[:64].decode("utf-8", "replace")
        hint = {"HTTPSQS_PUT_END": " (the queue is full: raise its length with opt=maxqueue)",
                "HTTPSQS_AUTH_FAILED": " (the auth= password of HTTPSQS_URL is wrong or missing)"}.get(word, "")
        return HttpsqsRefused(f"{action}: the server answered {word}{hint}")

    def _status(self, queue: str) -> tuple[int, int, int, int]:
        """(maxqueue, putpos, getpos, unread) of ``queue``."""
        [reply] = self._send(queue, "status_json")
        found = STATUS.search(reply.body)
        if found is None:
            raise self._refused(reply, f"reading the status of {queue!r}")
        maxqueue, put, get, unread = (int(group) for group in found.groups())
        return maxqueue, put, get, unread

    # -- primitives ----------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        due = not_before if not_before is not None and not_before > time.time() else None
        self._store(queue, [frame(body, 0, due) for body in bodies])

    def _store(self, queue: str, stored: Sequence[bytes]) -> None:
        client = self._client()
        for reply in client.send([client.request_bytes(queue, "put", body=body) for body in stored]):
            if reply.body != b"HTTPSQS_PUT_OK":
                raise self._refused(reply, f"putting a message in {queue!r}")

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        got = self._due(queue, max_n)
        if len(got) < max_n:
            [first] = self._send(queue, "get")
            replies = [first]
            if first.pos is not None and max_n - len(got) > 1:
                replies += self._send(queue, "get", max_n - len(got) - 1)
            now = time.time()
            for reply in replies:
                if reply.pos is None:  # no Pos header: HTTPSQS_GET_END (or an error word)
                    if reply.body != b"HTTPSQS_GET_END":
                        raise self._refused(reply, f"getting a message of {queue!r}")
                    continue
                body, attempts, due = unframe(reply.body)
                if due > now:
                    with self._parked_lock:
                        heapq.heappush(self._parked.setdefault(queue, []), (due, next(self._tokens), body, attempts))
                else:
                    got.append(Delivery(queue, body, next(self._tokens), attempts + 1))
        return got

    def _due(self, queue: str, max_n: int) -> list[Delivery]:
        """The parked messages of ``queue`` that are due now (oldest due first)."""
        if not self._parked.get(queue):
            return []
        now, got = time.time(), list[Delivery]()
        with self._parked_lock:  # read under the lock: _unpark may have taken the heap away
            heap = self._parked.get(queue)
            while heap and heap[0][0] <= now and len(got) < max_n:
                _, token, body, attempts = heapq.heappop(heap)
                got.append(Delivery(queue, body, token, attempts + 1))
        return got

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        """Nothing to do: ``opt=get`` removed the messages already."""

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        due = time.time() + delay if delay > 0 else None
        self._store(deliveries[0].queue, [frame(d.body, d.attempts if count_attempt else d.attempts - 1, due)
                                          for d in deliveries])

    def _unpark(self, queue: str) -> int:
        """Put the messages parked for ``queue`` back on the server (due time kept); how many."""
        with self._parked_lock:
            heap = self._parked.pop(queue, [])
        try:
            if heap:
                self._store(queue, [frame(body, attempts, due) for due, _, body, attempts in sorted(heap)])
        except BaseException:  # kept here: a later fetch still runs them
            with self._parked_lock:
                kept = self._parked.setdefault(queue, [])
                kept += heap
                heapq.heapify(kept)
            raise
        return len(heap)

    def _stop_fetching(self, queue: str) -> None:
        self._unpark(queue)

    def _purge(self, queue: str) -> int:
        with self._parked_lock:
            parked = len(self._parked.pop(queue, []))
        unread = self._status(queue)[3]
        [reply] = self._send(queue, "reset")
        if reply.body != b"HTTPSQS_RESET_OK":
            raise self._refused(reply, f"resetting {queue!r}")
        return unread + parked

    def _size(self, queue: str) -> int:
        return self._status(queue)[3] + len(self._parked.get(queue, ()))

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        """(due time, body) of the delayed messages of ``queue``, soonest first: those this process
        parked, and those waiting on the server among its first ``SCAN_LIMIT`` unread positions
        (read with ``opt=view``; nothing is taken)."""
        now = time.time()
        with self._parked_lock:
            found = [(due, body) for due, _, body, _ in self._parked.get(queue, ())]
        try:
            maxqueue, _, get, unread = self._status(queue)
            positions = [(get + i) % maxqueue + 1 for i in range(min(unread, SCAN_LIMIT))]
            client = self._client()
            replies = client.send([client.request_bytes(queue, "view", f"&pos={pos}") for pos in positions])
        except self._client_errors as exc:
            raise self._translated(exc, f"listing the delayed messages of {queue!r}") from exc
        for reply in replies:
            body, _, due = unframe(reply.body)
            if due > now:
                found.append((due, body))
        return sorted(found, key=lambda item: item[0])[:limit]

    # -- dead letters: the httpsqs queue <queue>.dlq ------------------------------------------------
    def _live_letters(self, queue: str, limit: int) -> list[DeadLetter]:
        """The newest ``limit`` live letters of ``<queue>.dlq`` (``opt=view``, nothing is taken), each
        ``ref`` its position. Read newest first, a tombstone comes before the letter it removes."""
        dlq = f"{queue}.dlq"
        maxqueue, put, _, unread = self._status(dlq)
        positions = [(put - i - 1) % maxqueue + 1 for i in range(unread)]
        client = self._client()
        letters: list[DeadLetter] = []
        removed: set[int] = set()
        for start in range(0, len(positions), LIST_PAGE):
            page = positions[start:start + LIST_PAGE]
            for pos, reply in zip(page, client.send([client.request_bytes(dlq, "view", f"&pos={pos}")
                                                     for pos in page]), strict=True):
                gone = removed_ref(reply.body)
                if gone is not None:
                    removed.add(gone)
                elif pos not in removed:
                    letters.append(dataclasses.replace(DeadLetter.from_envelope(queue, reply.body), ref=pos))
            if len(letters) >= limit:
                break
        return letters[:limit]

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` letters of ``<queue>.dlq`` that were not removed."""
        try:
            return self._live_letters(queue, limit)
        except self._client_errors as exc:
            raise self._translated(exc, f"listing the dead letters of {queue!r}") from exc

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        """Put a tombstone of ``letter`` (its position) in ``<queue>.dlq``: httpsqs reads only from the
        front, so a letter cannot be deleted alone. False when it is not a live letter any more."""
        try:
            if letter.ref not in {live.ref for live in self._live_letters(queue, 1 << 62)}:
                return False
            self._store(f"{queue}.dlq", [tombstone(letter.ref)])
            return True
        except self._client_errors as exc:
            raise self._translated(exc, f"removing a dead letter of {queue!r}") from exc

    def purge_dead_letters(self, queue: str) -> int:
        """Reset ``<queue>.dlq``; return how many live letters it held."""
        live = len(self.list_dead_letters(queue, 1 << 62))
        self.purge(f"{queue}.dlq")
        return live

    def _close(self) -> None:
        for queue in list(self._parked):
            try:
                self._unpark(queue)
            except self._client_errors as exc:  # the server is gone: those delayed messages are lost
                logger.warning("%s: %d delayed message(s) of queue %r could not be put back and are lost: %s",
                               self._where(), len(self._parked.get(queue, ())), queue, exc)
        with self._client_lock:
            http, self._http, self._client_key = self._http, None, None
        if http is not None:
            http.close()
