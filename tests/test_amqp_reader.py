"""The hand decoder of AMQP deliveries (brokers/amqp_reader.py) against frames encoded by pamqp: every
split of the bytes, bodies over several frames, headers and priority, and the other frames passed on
whole and in order. Also the push buffer's Signal, which wakes the consuming connection's waiters."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("pamqp")
from pamqp import commands  # noqa: E402
from pamqp import frame as pamqp_frame  # noqa: E402
from pamqp.body import ContentBody  # noqa: E402
from pamqp.header import ContentHeader  # noqa: E402
from pamqp.heartbeat import Heartbeat  # noqa: E402

from funboost_like.brokers.amqp_reader import DeliveryReader  # noqa: E402


def delivery(channel: int, tag: int, body: bytes, *, redelivered: bool = False, frame_max: int = 1 << 20,
             **properties: Any) -> bytes:
    frames = [pamqp_frame.marshal(commands.Basic.Deliver("ctag-1", tag, redelivered, "exchange", "routing.key"),
                                  channel),
              pamqp_frame.marshal(ContentHeader(0, len(body), commands.Basic.Properties(**properties)), channel)]
    frames += [pamqp_frame.marshal(ContentBody(body[start:start + frame_max]), channel)
               for start in range(0, len(body), frame_max)]
    return b"".join(frames)


class Recorder:
    def __init__(self) -> None:
        self.delivered: list[tuple[int, int, bytes, dict[str, Any], int, bool]] = []
        self.other: list[bytes] = []

    def on(self, channel: int) -> Any:
        return lambda *args: self.delivered.append((channel, *args))


def read_in_pieces(data: bytes, cuts: list[int], channels: tuple[int, ...] = (1,)) -> Recorder:
    recorder = Recorder()
    reader = DeliveryReader(recorder.other.append)
    for channel in channels:
        reader.register(channel, recorder.on(channel))
    rest = b""
    start = 0
    for cut in [*cuts, len(data)]:
        rest = reader.feed(rest + data[start:cut])
        start = cut
    assert rest == b""
    return recorder


def test_deliveries_are_decoded_whatever_the_reads_cut() -> None:
    heartbeat = pamqp_frame.marshal(Heartbeat(), 0)
    ack = pamqp_frame.marshal(commands.Basic.Ack(7, False), 1)
    data = b"".join([
        delivery(1, 1, b'{"x": 1}', content_type="application/json", delivery_mode=2),
        heartbeat,
        delivery(1, 2, b"", delivery_mode=2),  # an empty body: complete at its header
        delivery(1, 3, b"0123456789" * 30, frame_max=64, redelivered=True, priority=7,
                 headers={"fl-attempts": 2, "fl-crashes": 1, "note": "x"}, content_type="application/json"),
        ack,
        delivery(2, 9, b"unregistered channel"),  # goes to the client whole
        delivery(1, 4, b"last", correlation_id="c", reply_to="r", message_id="m", app_id="a", priority=3),
    ])
    expected = [(1, 1, b'{"x": 1}', {}, 0, False), (1, 2, b"", {}, 0, False),
                (1, 3, b"0123456789" * 30, {"fl-attempts": 2, "fl-crashes": 1, "note": "x"}, 7, True),
                (1, 4, b"last", {}, 3, False)]
    whole = read_in_pieces(data, [])
    assert whole.delivered == expected
    others = [heartbeat, ack, delivery(2, 9, b"unregistered channel")]
    assert b"".join(whole.other) == b"".join(others)
    assert len(whole.other) == 2 + 3  # the unregistered delivery's three frames, one at a time
    for cut in range(1, len(data)):  # every place a read can end
        pieces = read_in_pieces(data, [cut])
        assert pieces.delivered == expected, cut
        assert b"".join(pieces.other) == b"".join(others), cut
    assert read_in_pieces(data, list(range(1, len(data)))).delivered == expected  # one byte per read


def test_two_channels_interleave_and_a_registration_starts_clean() -> None:
    first, second = delivery(1, 1, b"a" * 100, frame_max=40), delivery(2, 1, b"b" * 100, frame_max=40)
    # The server interleaves frames of different channels (never within one channel's delivery).
    method1, header1, *bodies1 = _frames(first)
    method2, header2, *bodies2 = _frames(second)
    data = b"".join([method1, method2, header2, header1, bodies1[0], bodies2[0], bodies2[1], bodies1[1],
                     bodies1[2], bodies2[2]])
    recorder = read_in_pieces(data, [], channels=(1, 2))
    assert sorted(recorder.delivered) == [(1, 1, b"a" * 100, {}, 0, False), (2, 1, b"b" * 100, {}, 0, False)]

    recorder = Recorder()
    reader = DeliveryReader(recorder.other.append)
    reader.register(1, recorder.on(1))
    assert reader.feed(method1 + header1) == b""
    reader.register(1, recorder.on(1))  # the channel opened again: the half delivery is gone
    assert reader.feed(b"".join(bodies1)) == b""
    assert recorder.delivered == []
    assert recorder.other == bodies1  # the client's reader sees (and ignores) content it has no method for


def test_broken_framing_goes_to_the_client_reader() -> None:
    good = delivery(1, 1, b"ok")
    broken = bytearray(delivery(1, 2, b"no"))
    broken[-1] = 0x00  # not the frame-end byte
    recorder = Recorder()
    reader = DeliveryReader(recorder.other.append)
    reader.register(1, recorder.on(1))
    assert reader.feed(good + bytes(broken)) == b""
    assert recorder.delivered == [(1, 1, b"ok", {}, 0, False)]
    assert recorder.other[-1].endswith(b"no\x00")  # from the broken frame on: the client reports the error


def _frames(data: bytes) -> list[bytes]:
    frames = []
    while data:
        size = int.from_bytes(data[3:7], "big") + 8
        frames.append(data[:size])
        data = data[size:]
    return frames


def test_a_signal_loses_no_wake_up_when_it_notifies_once_per_wait() -> None:
    """push_buffer.Signal skips a notification while its waiter is already woken: a waiter must still see
    every item put before a skipped notification (else it would sleep its whole timeout)."""
    import threading
    import time

    from funboost_like.brokers.push_buffer import PushBuffer

    buffer = PushBuffer()
    n = 20_000
    taken: list[int] = []
    longest = [0.0]

    def take() -> None:
        while len(taken) < n:
            got = buffer.take(50)
            if got:
                taken.extend(got)
                continue
            started = time.monotonic()
            buffer.wait(5.0)
            longest[0] = max(longest[0], time.monotonic() - started)

    taker = threading.Thread(target=take)
    taker.start()
    for i in range(n):
        buffer.put(i)
        if i % 97 == 0:
            time.sleep(0)  # let the taker run dry and wait now and then
    taker.join(30)
    assert taken == list(range(n))
    assert longest[0] < 2.0  # a lost wake-up would sleep the whole 5 s
