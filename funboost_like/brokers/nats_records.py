"""Key-value records (RPC results, task filters) of the NATS broker, in JetStream KV buckets.

One bucket per (queue, namespace): ``fl_kv_<queue>_<namespace>`` (characters outside
``[A-Za-z0-9_-]`` replaced as in stream names), file storage, history 1, no ``max_age``. Keys are
stored base64url-encoded (KV keys allow few characters). NATS 2.9 has no per-message TTL, so each
value starts with its expiry: 8 bytes, a big-endian IEEE double of the UNIX time after which the
record is invisible (0: never). An expired record is deleted by the first read that finds it, and
every ten minutes a process that writes records with a TTL sweeps the bucket in the background
(one pass of a KV watcher, deleting the expired ones); :meth:`NatsRecords.purge_expired` sweeps now.
The bucket has no ``max_age``: records without a TTL (task filters kept forever) must stay.
:meth:`~NatsRecords.add_if_absent` is atomic across processes: ``create`` (which fails when the key
exists), or, over an expired record, its deletion conditioned on its revision and ``create`` again.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nats.js.errors
from nats.js import api

from funboost_like.brokers.async_bridge import bridge
from funboost_like.core.stores import KeyValueStore, check_namespace, check_ttl

if TYPE_CHECKING:
    from funboost_like.brokers.nats_broker import NatsBroker

logger = logging.getLogger("funboost_like.nats")

_EXPIRY = struct.Struct(">d")
SWEEP_SECONDS = 600.0  # how often a process writing records with a TTL deletes the expired ones
_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.NotFoundError)


def _key(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=") or "_"


def _unkey(key: str) -> str:
    return "" if key == "_" else base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()


class NatsRecords(KeyValueStore):
    """The records of one (queue, namespace) in a JetStream KV bucket (see the module docstring)."""

    def __init__(self, broker: NatsBroker, queue: str, namespace: str) -> None:
        from funboost_like.brokers.nats_queues import stream_name

        self._broker = broker
        self.bucket = f"fl_kv_{stream_name(queue)[3:]}_{check_namespace(namespace)}"
        self._jet: Any = None
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        self._kv: Any = None

    async def _bucket(self) -> Any:
        jet = self._broker.jet
        if self._kv is None or self._jet is not jet:
            await jet.connect()
            js, self._jet = jet.js, jet
            try:
                self._kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await js.create_key_value(api.KeyValueConfig(bucket=self.bucket, history=1,
                                                                       storage=api.StorageType.FILE))
        return self._kv

    def _call(self, what: str, coro: Any) -> Any:
        broker = self._broker
        try:
            return broker._run(coro)
        except broker._client_errors as exc:
            raise broker._translated(exc, f"{what} in bucket {self.bucket}") from exc

    @staticmethod
    def _pack(value: bytes, ttl: float | None) -> bytes:
        ttl = check_ttl(ttl)
        return _EXPIRY.pack(0.0 if ttl is None else time.time() + ttl) + bytes(value)

    async def _live(self, key: str) -> tuple[bytes | None, Any]:
        """(value or None, entry or None) of ``key``; an expired record is deleted on the way."""
        kv = await self._bucket()
        try:
            entry = await kv.get(_key(key))
        except _MISSING:
            return None, None
        raw = entry.value or b""
        (expires,) = _EXPIRY.unpack_from(raw) if len(raw) >= 8 else (0.0,)
        if expires and expires <= time.time():
            try:
                await kv.delete(_key(key), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # replaced meanwhile
            return None, entry
        return raw[8:], entry

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        payload = self._pack(value, ttl)

        async def put() -> None:
            await (await self._bucket()).put(_key(key), payload)
        self._call("writing a record", put())
        if ttl is not None:
            self._sweep_now_and_then()

    def get(self, key: str) -> bytes | None:
        async def get() -> bytes | None:
            return (await self._live(key))[0]
        value: bytes | None = self._call("reading a record", get())
        return value

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        async def get_many() -> list[bytes | None]:
            return [(await self._live(key))[0] for key in keys]
        values = self._call("reading records", get_many())
        return {key: value for key, value in zip(keys, values, strict=True) if value is not None}

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        payload = self._pack(value, ttl)

        async def add() -> bool:
            kv = await self._bucket()
            try:
                await kv.create(_key(key), payload)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            current, entry = await self._live(key)  # deletes it when expired
            if current is not None or entry is None:
                return False
            try:  # over the deleted expired record, only if nobody wrote it meanwhile
                await kv.create(_key(key), payload)
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        added = bool(self._call("adding a record", add()))
        if added and ttl is not None:
            self._sweep_now_and_then()
        return added

    def delete(self, key: str) -> None:
        async def delete() -> None:
            await (await self._bucket()).delete(_key(key))
        self._call("deleting a record", delete())

    def purge_expired(self) -> int:
        """Delete every expired record now (one pass over the bucket); return how many."""
        return int(self._call("purging expired records", self._sweep()))

    async def _sweep(self) -> int:
        kv = await self._bucket()
        watcher = await kv.watchall(ignore_deletes=True)
        expired, now = [], time.time()
        try:
            async for entry in watcher:
                if entry is None:  # the current values are all read
                    break
                raw = entry.value or b""
                if len(raw) >= 8 and 0 < _EXPIRY.unpack_from(raw)[0] <= now:
                    expired.append((entry.key, entry.revision))
        finally:
            await watcher.stop()
        deleted = 0
        for key, revision in expired:
            try:
                await kv.delete(key, last=revision)
                deleted += 1
            except nats.js.errors.KeyWrongLastSequenceError:
                pass  # written again meanwhile
        return deleted

    def _sweep_now_and_then(self) -> None:
        """After a write with a TTL: every SWEEP_SECONDS, sweep the bucket in the background (on the loop)."""
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_SECONDS

            async def sweep() -> None:
                try:
                    await self._sweep()
                except Exception:  # noqa: BLE001 - tried again at the next sweep
                    logger.warning("sweeping expired records of bucket %s failed", self.bucket, exc_info=True)
            bridge.submit(sweep())
