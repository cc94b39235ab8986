"""The ceiling of one-by-one acknowledged publishing on this machine's NATS JetStream, without the framework.

Usage::

    python benchmarks/nats_bare_push.py [--url nats://127.0.0.1:4222] [--n 5000] [--repeat 3] [--spin 0.0003]

A plain socket speaks the NATS protocol: a stream ``bare_push_<hex>`` (work-queue retention, file
storage, as the ``NATS`` kind makes them) is created, then N ``PUB`` commands each wait for their
JetStream PubAck (polled for up to ``--spin`` seconds, then a blocking read: what the ``NATS`` kind's
push does). Printed per repetition: the rate, the mean wait for the PubAck after the send, and
nats-server's own CPU time per publish (from ``/proc``, when a local ``nats-server`` process is found).
The stream is deleted at the end. Compare with ``python benchmarks/throughput.py --brokers nats``
(its ``publish one-by-one`` row) in the same minute: the gap is the framework's share.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import time
import uuid
from urllib.parse import urlsplit


class BareNats:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), 10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                          b"SUB _bare.inbox.* 1\r\nPING\r\n")
        while self.line() != b"PONG":
            pass
        self.poller = select.poll()
        self.poller.register(self.sock, select.POLLIN)

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self.buf += self.sock.recv(65536)
        line = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return line

    def reply(self) -> bytes:
        """The payload of the next MSG (answering PINGs on the way)."""
        while True:
            line = self.line()
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                size = int(line.rsplit(b" ", 1)[1])
                while len(self.buf) < size + 2:
                    self.buf += self.sock.recv(65536)
                data = bytes(self.buf[:size])
                del self.buf[:size + 2]
                return data

    def request(self, subject: str, payload: bytes) -> bytes:
        self.sock.sendall(b"PUB %s _bare.inbox.1 %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
        return self.reply()

    def push(self, subject: bytes, body: bytes, spin: float) -> float:
        """PUB ``body``, wait for its PubAck; return the seconds waited after the send."""
        self.sock.sendall(b"PUB %s _bare.inbox.1 %d\r\n%s\r\n" % (subject, len(body), body))
        sent = time.perf_counter()
        deadline = sent + spin
        while not self.poller.poll(0) and time.perf_counter() < deadline:
            pass
        answer = self.reply()
        if b'"error"' in answer:
            raise RuntimeError(answer.decode())
        return time.perf_counter() - sent


def server_cpu() -> float | None:
    """nats-server's CPU seconds so far, or None when no local process is found."""
    found = subprocess.run(["pgrep", "-x", "nats-server"], capture_output=True, text=True, check=False).stdout.split()
    if not found:
        return None
    with open(f"/proc/{found[0]}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("FUNBOOST_LIKE_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--spin", type=float, default=0.0003)
    args = parser.parse_args()
    nats = BareNats(args.url)
    stream = f"bare_push_{uuid.uuid4().hex[:8]}"
    config = {"name": stream, "subjects": [stream], "retention": "workqueue", "storage": "file"}
    nats.request(f"$JS.API.STREAM.CREATE.{stream}", json.dumps(config).encode())
    body = json.dumps({"x": 1, "y": 1, "extra": {"task_id": uuid.uuid4().hex, "publish_time": time.time()}}).encode()
    try:
        for _ in range(args.repeat):
            cpu, waited, started = server_cpu(), 0.0, time.perf_counter()
            for _ in range(args.n):
                waited += nats.push(stream.encode(), body, args.spin)
            elapsed = time.perf_counter() - started
            cpu_after = server_cpu()
            server = f", nats-server {(cpu_after - cpu) / args.n * 1e6:.0f} µs CPU a publish" \
                if cpu is not None and cpu_after is not None else ""
            print(f"bare push: {args.n / elapsed:,.0f}/s, PubAck wait {waited / args.n * 1e6:.0f} µs{server}",
                  flush=True)
    finally:
        nats.request(f"$JS.API.STREAM.DELETE.{stream}", b"")


if __name__ == "__main__":
    main()
