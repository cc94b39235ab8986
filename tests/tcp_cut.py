"""A TCP relay to a real server whose link the test can cut and restore (an outage, the server alive), or
freeze (a frozen server, a black hole on the way: nothing more arrives, no reset ever comes).

Cut, it accepts and resets; frozen, it accepts and never answers; for a server that refuses
connections, point the client at a free port and start the relay there later (``listen_port``)."""

from __future__ import annotations

import socket
import threading

from .standin import relay


class CuttableLink:
    """Relays 127.0.0.1:<port> to ``target``. :meth:`cut` resets every relayed connection and refuses new
    ones; :meth:`restore` accepts again."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", listen_port))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.frozen = False
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
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
            if self.frozen:
                with self.lock:
                    self.pairs.append((client, client))  # held open, never answered
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=relay, args=(a, b, lambda: not self.frozen), daemon=True).start()

    def freeze(self) -> None:
        """From now on nothing passes either way, and nothing is closed: the server went silent."""
        self.frozen = True

    def cut(self) -> None:
        self.up = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for end in pair:
                try:
                    end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    end.close()  # a reset, as a dropped link gives
                except OSError:
                    pass

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()
