"""A TCP relay to a real server whose link the test can cut and restore (an outage, the server alive), or
silence and restore (a proxy that stops forwarding, a black hole on the way: nothing more arrives and no
reset ever comes, yet every socket stays open).

Cut, it resets every relayed connection and refuses new ones; silent, it drops what either side sends on
the connections it relays and holds new ones open without an answer; for a server that refuses
connections, point the client at a free port and start the relay there later (``listen_port``)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import pytest

from .standin import relay


class _Pair:
    """One relayed connection: its two sockets, and whether it still forwards."""

    def __init__(self, client: socket.socket, server: socket.socket | None) -> None:
        self.ends = [client] if server is None else [client, server]
        self.forwarding = server is not None

    def passing(self) -> bool:
        return self.forwarding


class CuttableLink:
    """Relays 127.0.0.1:<port> to ``target``. :meth:`cut` resets every relayed connection and refuses new
    ones; :meth:`silence` stops forwarding, closing nothing; :meth:`restore` relays new connections again."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", listen_port))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.silent = False
        self.lock = threading.Lock()
        self.pairs: list[_Pair] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            if self.silent:
                with self.lock:
                    self.pairs.append(_Pair(client, None))  # held open, never answered
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self.lock:
                self.pairs.append(pair)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=relay, args=(a, b, pair.passing), daemon=True).start()

    def silence(self) -> None:
        """From now on nothing passes either way on the connections relayed so far, which stay open and
        silent for good (what was dropped cannot be replayed), and new connections are held open unanswered
        until :meth:`restore`: the network path went silent."""
        with self.lock:
            self.silent = True
            for pair in self.pairs:
                pair.forwarding = False

    freeze = silence  # a frozen server looks the same from the client

    def cut(self) -> None:
        self.up = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for end in pair.ends:
                try:
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    # wakes the relay thread blocked in recv (which holds the socket open until it returns)
                    # without sending anything; closed then, the socket resets, as a dropped link gives
                    end.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
                end.close()

    def restore(self) -> None:
        """New connections are relayed again (silenced ones stay silent)."""
        self.up = True
        self.silent = False

    def close(self) -> None:
        self.cut()
        self.listener.close()


def ride_out_a_silence(link: CuttableLink, publish: Callable[[], object], ran_it: threading.Event,
                       stored: Callable[[], int], caplog: pytest.LogCaptureFixture) -> None:
    """A running consumer (idle, its acks through) behind ``link``: the link goes silent, ``publish`` sends a
    message, the consumer must notice (one outage line), fetch again once the link is back, run the message
    (``ran_it``) and leave nothing stored."""
    from .conftest import until

    link.silence()  # the idle consumer's next fetch meets silence
    publish()
    assert until(lambda: "failed" in caplog.text, timeout=30), "the consumer never noticed"
    link.restore()
    assert ran_it.wait(30), "the consumer never fetched again"
    assert until(lambda: "works again" in caplog.text, timeout=10)
    outages = [r for r in caplog.records if r.levelno >= logging.WARNING and "failed" in r.getMessage()]
    assert len(outages) == 1, [r.getMessage() for r in outages]
    assert until(lambda: stored() == 0, timeout=10)  # nothing lost, nothing left
