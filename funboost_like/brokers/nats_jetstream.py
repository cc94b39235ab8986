"""JetStream plumbing on nats-py for the NATS broker; every coroutine here runs on the bridge's loop.

:class:`JetStream` is one nats-py connection with what the broker needs on top of it, each cheap on
the hot path:

* pipelined publishes: a batch of messages is published with one reply subject, and the PubAcks
  coming back are counted, not matched one by one (:meth:`JetStream.publish`);
* acks without waiting (``+ACK`` published, the server answers nothing), or confirmed ones (each
  ack with a reply subject: the server answers once it removed the message);
* pull requests sent by hand to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` with one reply
  subject per request, answered into a :class:`Puller` (``no_wait`` batches, or a lingering pull of one
  message). Messages that arrive after their request ended (a lingering pull the server answered
  late) are kept in the puller's stash and handed out by the next pull.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

logger = logging.getLogger("funboost_like.nats")

TIMEOUT = 15.0  # seconds one operation may take
CONNECT_TIMEOUT = 3.0  # seconds the first connection may take
NO_WAIT_TIMEOUT = 3.0  # a no_wait pull is answered at once; longer means the request was lost (a reconnection)
WINDOW = 5_000  # publishes in flight at once
HeadersT = dict[str, str] | None


class Puller:
    """A durable pull consumer as seen by this process: its inbox, its current request and its stash."""

    def __init__(self, stream: str, consumer: str) -> None:
        self.next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.inbox = ""
        self.stash: deque[tuple[str, bytes, dict[str, str] | None]] = deque()  # (reply, data, headers)
        self.rids = itertools.count(1)
        self.waiter: tuple[str, int, asyncio.Future[None]] | None = None
        self.lock = asyncio.Lock()

    async def on_msg(self, msg: Msg) -> None:
        waiter = self.waiter
        if msg.reply:  # a message (of the current request, or a late one of an earlier request)
            self.stash.append((msg.reply, msg.data, msg.headers))
            if waiter and len(self.stash) >= waiter[1] and not waiter[2].done():
                waiter[2].set_result(None)
        elif waiter and msg.subject.endswith(waiter[0]) and (msg.headers or {}).get("Status") != "100":
            if not waiter[2].done():  # 404 no messages, 408 expired, 409 ...: this request is over
                waiter[2].set_result(None)

    def take(self, max_n: int) -> list[tuple[str, bytes, dict[str, str] | None]]:
        stash = self.stash
        return [stash.popleft() for _ in range(min(max_n, len(stash)))]


class JetStream:
    """One nats-py connection (made lazily) and the broker's operations on it."""

    def __init__(self, url: str, on_error: Callable[[Exception], Any]) -> None:
        self.url = url
        self.nc: Any = None
        self.js: Any = None
        self._on_error = on_error
        self._lock: asyncio.Lock | None = None
        self._batches: dict[str, list[Any]] = {}
        self._bids = itertools.count(1)
        self._prefix = ""

    async def connect(self) -> Any:
        if self.nc is not None:
            return self.nc
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.nc is None:
                async def on_error(exc: Exception) -> None:
                    if self.nc is not None:  # failures of the first connection are raised, not logged
                        self._on_error(exc)

                nc = nats.NATS()
                options: dict[str, Any] = {"name": "funboost_like", "connect_timeout": 2, "error_cb": on_error,
                                           "max_reconnect_attempts": -1, "reconnect_time_wait": 0.5}
                if "skip_subject_validation" in inspect.signature(nc.connect).parameters:  # not in older nats-py
                    options["skip_subject_validation"] = True  # queue names are checked once, by the broker
                try:  # nats-py tries forever when reconnecting is unlimited: the first connection gets 3 s
                    await asyncio.wait_for(nc.connect(self.url.split(","), **options), CONNECT_TIMEOUT)
                except asyncio.TimeoutError:
                    await nc.close()
                    raise nats.errors.NoServersError() from None
                self._prefix = nc.new_inbox() + "."
                await nc.subscribe(self._prefix + "*", cb=self._on_reply)
                self.js, self.nc = nc.jetstream(), nc
        return self.nc

    async def _on_reply(self, msg: Msg) -> None:
        batch = self._batches.get(msg.subject[len(self._prefix):])
        if batch is not None:
            batch.append(msg)
            if len(batch) == batch[0] + 2 and not batch[1].done():
                batch[1].set_result(None)

    async def _answered(self, send: Callable[[str], Any], n: int) -> list[Msg]:
        """Run ``send(reply_subject)`` (which sends ``n`` requests) and return the ``n`` answers."""
        bid = str(next(self._bids))
        batch: list[Any] = [n, asyncio.get_running_loop().create_future()]
        self._batches[bid] = batch
        try:
            await send(self._prefix + bid)
            await asyncio.wait_for(batch[1], TIMEOUT)
        finally:
            del self._batches[bid]
        return batch[2:]

    async def publish(self, items: Sequence[tuple[str, bytes, HeadersT]]) -> None:
        """Publish (subject, body, headers) in order, WINDOW at a time; raise unless every one was stored."""
        nc = await self.connect()
        for start in range(0, len(items), WINDOW):
            part = items[start:start + WINDOW]

            async def send(reply: str, part: Sequence[tuple[str, bytes, HeadersT]] = part) -> None:
                for subject, body, headers in part:
                    await nc.publish(subject, body, reply=reply, headers=headers)

            for answer in await self._answered(send, len(part)):
                if not answer.data or b'"error"' in answer.data:
                    status = (answer.headers or {}).get("Status", "")
                    raise nats.js.errors.APIError(description=f"publish refused: {answer.data!r} {status}")

    async def ack(self, tokens: Iterable[str], confirm: bool = False, verb: bytes = b"+ACK") -> None:
        """Send ``verb`` to each delivery's reply subject; with ``confirm``, wait until the server processed them."""
        nc = await self.connect()
        if not confirm:
            command = getattr(nc, "_send_command", None)
            if command is not None and nc.is_connected:  # one write for all: a third of the cost of publish() each
                await command(b"".join(b"PUB %s %d\r\n%s\r\n" % (token.encode(), len(verb), verb) for token in tokens))
                await nc._flush_pending()
                return
            for token in tokens:
                await nc.publish(token, verb)
            return
        tokens = list(tokens)

        async def send(reply: str) -> None:
            for token in tokens:
                await nc.publish(token, verb, reply=reply)

        await self._answered(send, len(tokens))

    async def pull(self, puller: Puller, request: dict[str, Any], want: int, timeout: float) -> None:
        """Send one pull request; return when ``want`` messages are stashed, the server ended it, or after
        ``timeout`` seconds."""
        nc = await self.connect()
        rid = str(next(puller.rids))
        done = asyncio.get_running_loop().create_future()
        puller.waiter = ("." + rid, want, done)
        try:
            await nc.publish(puller.next, json.dumps(request).encode(), reply=f"{puller.inbox}.{rid}")
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            puller.waiter = None

    async def long_poll(self, puller: Puller, timeout: float) -> None:
        """A lingering pull of one message (left in the stash), at most ``timeout`` seconds."""
        async with puller.lock:
            if not puller.stash:
                expires = max(1_000_000, int((timeout - 0.005) * 1e9))
                await self.pull(puller, {"batch": 1, "expires": expires}, 1, timeout)

    async def take(self, puller: Puller, max_n: int) -> list[tuple[str, bytes, dict[str, str] | None]]:
        """Up to ``max_n`` messages: the stash first, then one ``no_wait`` pull for the rest."""
        async with puller.lock:
            if len(puller.stash) < max_n:
                await self.pull(puller, {"batch": max_n - len(puller.stash), "no_wait": True}, max_n, NO_WAIT_TIMEOUT)
            return puller.take(max_n)

    async def subscribe(self, puller: Puller) -> None:
        if not puller.inbox:
            nc = await self.connect()
            puller.inbox = nc.new_inbox()
            await nc.subscribe(puller.inbox + ".*", cb=puller.on_msg)

    async def api(self, subject: str, payload: bytes = b"") -> dict[str, Any]:
        """A JetStream API request; its error raised as nats-py's APIError subclass."""
        nc = await self.connect()
        answer = json.loads((await nc.request(subject, payload, timeout=TIMEOUT)).data)
        if "error" in answer:
            raise nats.js.errors.APIError.from_error(answer["error"])
        return dict(answer)

    async def newest(self, stream: str, limit: int) -> list[tuple[int, bytes]]:
        """(sequence, body) of the newest ``limit`` messages of ``stream``, newest first."""
        js = self.js
        state = (await js.stream_info(stream)).state
        found: list[tuple[int, bytes]] = []
        seq = state.last_seq
        while seq >= max(1, state.first_seq) and len(found) < limit:
            try:
                found.append((seq, (await js.get_msg(stream, seq)).data or b""))
            except nats.js.errors.NotFoundError:
                pass  # deleted
            seq -= 1
        return found

    async def delete_streams(self, names: Iterable[str]) -> None:
        for name in names:
            try:
                await self.api(f"$JS.API.STREAM.DELETE.{name}")
            except nats.js.errors.NotFoundError:
                pass

    async def close(self) -> None:
        if self.nc is not None:
            nc, self.nc = self.nc, None
            await nc.close()
