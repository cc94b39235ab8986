"""Pulling from a JetStream durable consumer on a blocking socket, on the fetching thread.

Through nats-py, each pulled message is parsed into a ``Msg``, queued on its subscription's
``asyncio.Queue``, taken off it by a task and handed to a callback, all on the bridge's event loop:
about 60% of a consumer's CPU at 50,000 messages (docs/nats.md). A :class:`WirePuller` instead
writes the acks of the last batch and the next pull request in one write and parses the messages
straight off its socket into ``(reply, data, headers)`` tuples: no event loop, no queue, no task.

Messages go to :attr:`WirePuller.stash` (a deque; the maintenance thread may read it with ``list``).
A request ends when it got the messages it asked for, or when the server answers it with a status
(``404`` no messages, ``408`` expired, ``409`` ...); a message the server sends after its request
ended (a lingering pull answered late) is stashed by whichever read comes next. Acks are fire and
forget (``+ACK`` without a reply subject), as through nats-py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from funboost_like.brokers.nats_wire import PublishRefused, WireConnection

Pulled = tuple[str, bytes, "dict[str, str] | None"]  # (reply subject = the ack token, body, headers)


def _parse_headers(block: bytes) -> tuple[str, dict[str, str]]:
    """(status, headers) of an ``HMSG`` header block: ``NATS/1.0[ <status> <text>]\\r\\nKey: value\\r\\n...``."""
    lines = block.decode("utf-8", "replace").split("\r\n")
    status = lines[0][9:12] if len(lines[0]) > 9 else ""
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return status, headers


class WirePuller(WireConnection):
    """A connection that pulls from the durable consumer whose ``$JS.API.CONSUMER.MSG.NEXT`` subject is
    ``next_subject``. One thread at a time (a lock guards it)."""

    name = "funboost_like-puller"

    def __init__(self, url: str, timeout: float, next_subject: str, stash: deque[Pulled]) -> None:
        super().__init__(url, timeout)
        self.timeout = timeout
        self.next = next_subject.encode()
        self.stash = stash
        self.lock = threading.Lock()
        self._rid = 1  # reply subject <inbox>.<rid> of the current request
        self._ended = 0  # the newest request the server ended (their statuses may come out of order)
        self._pongs = 0

    def pull(self, acks: Iterable[str], request: dict[str, object], want: int, timeout: float) -> None:
        """Send ``+ACK`` for ``acks`` and one pull ``request``; return once ``want`` messages are stashed,
        the server ended the request, or after ``timeout`` seconds."""
        self._rid += 1
        reply = b"%s.%d" % (self.inbox.encode(), self._rid)
        body = json.dumps(request).encode()
        out = b"".join([b"PUB %s 4\r\n+ACK\r\n" % token.encode() for token in acks])
        self.send(out + b"PUB %s %s %d\r\n%s\r\n" % (self.next, reply, len(body), body))
        self._read_until(lambda: len(self.stash) >= want or self._ended == self._rid, timeout)

    def ack(self, tokens: Iterable[str]) -> None:
        self.send(b"".join([b"PUB %s 4\r\n+ACK\r\n" % token.encode() for token in tokens]))

    def drain(self, timeout: float) -> None:
        """Read everything the server sent before now (a ``PING`` answered), stashing messages."""
        pongs = self._pongs
        self.send(b"PING\r\n")
        self._read_until(lambda: self._pongs > pongs, timeout)

    def _read_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        sock = self._sock
        try:
            while True:
                self._parse()
                if done():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                sock.settimeout(left)
                self._recv()
        except TimeoutError:
            return  # what comes later is stashed by the next read
        finally:
            sock.settimeout(self.timeout)

    def _parse(self) -> None:
        """Parse every whole frame in the buffer."""
        buf, stash = self._buf, self.stash
        pos, size = 0, len(buf)
        while (end := buf.find(b"\r\n", pos)) >= 0:
            op = buf[pos:pos + 4]
            if op == b"MSG " or op == b"HMSG":  # MSG <subject> <sid> [reply] <size>, HMSG ... <header size> <size>
                fields = buf[pos + 4:end].split()
                start = end + 2
                stop = start + int(fields[-1])
                if stop + 2 > size:
                    break
                pos = stop + 2
                if op == b"MSG ":
                    if len(fields) == 4:  # with a reply subject: a pulled message
                        stash.append((fields[2].decode(), bytes(buf[start:stop]), None))
                    continue
                split = start + int(fields[-2])
                status, headers = _parse_headers(bytes(buf[start:split]))
                if len(fields) == 5:
                    stash.append((fields[2].decode(), bytes(buf[split:stop]), headers))
                elif status and status != "100":  # the end of a request (heartbeats, 100, do not end one)
                    self._ended = max(self._ended, int(fields[0].rsplit(b".", 1)[1]))
            else:
                line = buf[pos:end]
                pos = end + 2
                if line == b"PING":
                    self.send(b"PONG\r\n")
                elif line == b"PONG":
                    self._pongs += 1
                elif line.startswith(b"-ERR"):
                    del buf[:pos]
                    raise PublishRefused(bytes(line).decode("utf-8", "replace"))
        del buf[:pos]

    def take(self, max_n: int) -> list[Pulled]:
        stash = self.stash
        if len(stash) <= max_n:
            taken = list(stash)
            stash.clear()
            return taken
        return [stash.popleft() for _ in range(max_n)]
