"""A fixture HTTPSQS server: Zhang Yan's httpsqs 1.7 protocol, in Python's standard library.

No httpsqs server can be obtained here (DESIGN §8), so the HTTPSQS tests run against this one. It
answers like httpsqs 1.7's ``httpsqs_handler`` (read from the 1.7 C source and its README), verb by
verb, including its quirks:

* every answer is ``200 OK`` with ``Content-Type: text/plain`` (``; charset=X`` when the request
  has ``charset=X`` of at most 40 bytes), ``Connection: keep-alive``, ``Cache-Control: no-cache``;
  ``Pos: N`` on a successful put and get;
* ``auth=`` must equal the server's password when it has one (``-a``), else ``HTTPSQS_AUTH_FAILED``
  whatever the verb;
* ``opt=put``: a request body wins over ``data=``; the body is URL-decoded once, ``data=`` twice
  (by libevent's query parser, then by httpsqs's own ``urldecode``); no body and no ``data=``:
  ``HTTPSQS_PUT_ERROR``; full: ``HTTPSQS_PUT_END``. Stored as a C string: cut at the first NUL;
* ``opt=get``: the message and ``Pos``, or ``HTTPSQS_GET_END``; ``opt=view&pos=N`` (1..10^9): the
  record at N (empty when none, stale records included, as Tokyo Cabinet keeps them);
* ``opt=status`` (text), ``opt=status_json``, ``opt=reset`` (``HTTPSQS_RESET_OK``; positions and
  max length forgotten, records left), ``opt=maxqueue&num=N`` (10..10^9; ``HTTPSQS_MAXQUEUE_OK``
  or ``_CANCEL`` when the put position has wrapped behind the get position or passes N),
  ``opt=synctime&num=N`` (1..10^9, ``HTTPSQS_SYNCTIME_OK``); anything else: ``HTTPSQS_ERROR``;
* a queue is a ring of ``maxqueue`` (default 1,000,000) positions, with 1.7's rule that the put
  position wraps to 1 only once something was read past position 1;
* a query with a pair lacking ``=`` is thrown away whole, as libevent 2.0's parser does.

Differences: one asyncio thread instead of libevent (requests are still answered one at a time, in
order, pipelined or not); Tokyo Cabinet is replaced by a dict, written to ``<data dir>/httpsqs.json``
every ``synctime`` seconds and at SIGTERM/SIGINT when ``-x`` is given (else memory only); chunked
request bodies are not read (a 411 answers them). ``--idle-exit`` ends the server after that long
without a connection, so tests can start one in the background and leave it.

Run: ``python tests/httpsqs_server.py -p 1218 [-a PASSWORD] [-x DIR] [--background LOG]``. The session
fixture :func:`_httpsqs_server` starts one on 127.0.0.1:1218 when a collected test needs it and
nothing listens there; it is detached and shared by pytest-xdist workers, and exits when idle.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest

HOST, PORT, AUTH = "127.0.0.1", 1218, "fixture-secret"
URL = f"http://{HOST}:{PORT}/?auth={AUTH}"
VERSION = "1.7"
DEFAULT_MAXQUEUE = 1_000_000
BILLION = 1_000_000_000
MAX_HEAD = 64 * 1024


def atoi(text: bytes | None) -> int:
    """C's ``atoi``: the leading integer of ``text`` (0 when none)."""
    if not text:
        return 0
    text = text.lstrip(b" \t\n\r\f\v")
    digits = 1 if text[:1] in (b"+", b"-") else 0
    while digits < len(text) and text[digits:digits + 1].isdigit():
        digits += 1
    try:
        return int(text[:digits])
    except ValueError:
        return 0


def urldecode(raw: bytes) -> bytes:
    """httpsqs's ``urldecode``: ``+`` is a space, ``%XX`` a byte when both are hex digits."""
    return unquote_to_bytes(raw.replace(b"+", b" "))


def c_string(value: bytes) -> bytes:
    """What a C string keeps of ``value``: up to its first NUL."""
    return value.split(b"\0", 1)[0]


def parse_query(query: bytes) -> dict[bytes, bytes]:
    """libevent 2.0's ``evhttp_parse_query_str``: values decoded once (``+`` as a space); the whole
    query is dropped when a pair has no ``=`` or an empty key. The first of repeated keys wins."""
    found: dict[bytes, bytes] = {}
    if not query:
        return found
    for pair in query.split(b"&"):
        key, sep, value = pair.partition(b"=")
        if not sep or not key:
            return {}
        found.setdefault(key, c_string(urldecode(value)))
    return found


class Store:
    """The Tokyo Cabinet table of httpsqs: ``name:putpos``, ``name:getpos``, ``name:maxqueue`` and
    ``name:N`` records, with 1.7's position arithmetic."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.table: dict[bytes, bytes] = {}
        if path is not None and path.exists():
            saved = json.loads(path.read_text("utf-8"))
            self.table = {k.encode("latin-1"): v.encode("latin-1") for k, v in saved.items()}

    def sync(self) -> None:
        if self.path is not None:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps({k.decode("latin-1"): v.decode("latin-1") for k, v in self.table.items()}))
            temporary.replace(self.path)

    def _int(self, name: bytes, field: bytes, default: int = 0) -> int:
        value = self.table.get(name + b":" + field)
        return default if value is None else atoi(value)

    def positions(self, name: bytes) -> tuple[int, int, int]:
        """(maxqueue, putpos, getpos)."""
        return self._int(name, b"maxqueue", DEFAULT_MAXQUEUE), self._int(name, b"putpos"), self._int(name, b"getpos")

    def now_putpos(self, name: bytes) -> int:
        maxqueue, put, get = self.positions(name)
        put += 1
        if put == get or (get <= 1 and put > maxqueue):  # caught up with the readers: full
            return 0
        if put > maxqueue:
            put = 1
        self.table[name + b":putpos"] = b"%d" % put
        return put

    def now_getpos(self, name: bytes) -> int:
        maxqueue, put, get = self.positions(name)
        if get == 0 and put > 0:
            get = 1
        elif get < put or (get > put and get < maxqueue):
            get += 1
        elif get > put and get == maxqueue:
            get = 1
        else:
            return 0
        self.table[name + b":getpos"] = b"%d" % get
        return get

    def unread(self, name: bytes) -> tuple[int, int, int, int, int]:
        """(maxqueue, putpos, getpos, unread, put lap)."""
        maxqueue, put, get = self.positions(name)
        if put >= get:
            return maxqueue, put, get, put - get, 1
        return maxqueue, put, get, abs(maxqueue - get + put), 2

    def maxqueue(self, name: bytes, num: int) -> bool:
        _, put, get = self.positions(name)
        if num >= put and num >= get and put >= get:
            self.table[name + b":maxqueue"] = b"%d" % num
            self.sync()
            return True
        return False

    def reset(self, name: bytes) -> None:
        for field in (b"putpos", b"getpos", b"maxqueue"):
            self.table.pop(name + b":" + field, None)
        self.sync()


class Httpsqs:
    """The request handler: one call per request, in arrival order (httpsqs_handler)."""

    def __init__(self, store: Store, auth: bytes | None, synctime: int) -> None:
        self.store, self.auth, self.synctime = store, auth, synctime

    def handle(self, target: bytes, body: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """(reply body, extra headers) for a request of ``target`` (path and query) with ``body``."""
        query = parse_query(target.partition(b"?")[2].partition(b"#")[0])
        charset = query.get(b"charset")
        headers = [(b"Content-Type", b"text/plain; charset=" + charset if charset is not None and len(charset) <= 40
                    else b"text/plain"), (b"Connection", b"keep-alive"), (b"Cache-Control", b"no-cache")]
        if self.auth is not None and query.get(b"auth") != self.auth:
            return b"HTTPSQS_AUTH_FAILED", headers
        name, opt = query.get(b"name"), query.get(b"opt")
        if name is None or opt is None or len(name) > 256:
            return b"HTTPSQS_ERROR", headers
        if opt == b"put":
            return self.put(name, body, query.get(b"data"), headers)
        if opt == b"get":
            at = self.store.now_getpos(name)
            value = self.store.table.get(b"%s:%d" % (name, at)) if at else None
            if value is None:
                return b"HTTPSQS_GET_END", headers
            return value, [*headers, (b"Pos", b"%d" % at)]
        return self.other(name, opt, query, headers)

    def put(self, name: bytes, body: bytes, data: bytes | None, headers: list[tuple[bytes, bytes]]
            ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        if body:
            value = c_string(urldecode(body))
        elif data is not None:
            value = c_string(urldecode(data))  # decoded a second time, as httpsqs does
        else:
            return b"HTTPSQS_PUT_ERROR", headers
        at = self.store.now_putpos(name)
        if not at:
            return b"HTTPSQS_PUT_END", headers
        self.store.table[b"%s:%d" % (name, at)] = value
        return b"HTTPSQS_PUT_OK", [*headers, (b"Pos", b"%d" % at)]

    def other(self, name: bytes, opt: bytes, query: dict[bytes, bytes], headers: list[tuple[bytes, bytes]]
              ) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """status, status_json, view, reset, maxqueue, synctime; HTTPSQS_ERROR for anything else."""
        store, num, pos = self.store, atoi(query.get(b"num")), atoi(query.get(b"pos"))
        if opt in (b"status", b"status_json"):
            maxqueue, put, get, unread, lap = store.unread(name)
            if opt == b"status_json":
                return (b'{"name":"%s","maxqueue":%d,"putpos":%d,"putlap":%d,"getpos":%d,"getlap":1,"unread":%d}\n'
                        % (name, maxqueue, put, lap, get, unread)), headers
            laps = b"1st lap" if lap == 1 else b"2nd lap"
            return (b"HTTP Simple Queue Service v%s\n------------------------------\nQueue Name: %s\n"
                    b"Maximum number of queues: %d\nPut position of queue (%s): %d\n"
                    b"Get position of queue (1st lap): %d\nNumber of unread queue: %d\n"
                    % (VERSION.encode(), name, maxqueue, laps, put, get, unread)), headers
        if opt == b"view" and 1 <= pos <= BILLION:
            return store.table.get(b"%s:%d" % (name, pos), b""), headers
        if opt == b"reset":
            store.reset(name)
            return b"HTTPSQS_RESET_OK", headers
        if opt == b"maxqueue" and 10 <= num <= BILLION:
            return (b"HTTPSQS_MAXQUEUE_OK" if store.maxqueue(name, num) else b"HTTPSQS_MAXQUEUE_CANCEL"), headers
        if opt == b"synctime" and 1 <= num <= BILLION:
            self.synctime = num
            return b"HTTPSQS_SYNCTIME_OK", headers
        return b"HTTPSQS_ERROR", headers


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection: requests parsed from the buffer and answered in order."""

    def __init__(self, server: Server) -> None:
        self.server, self.buffer = server, bytearray()
        self.transport: asyncio.Transport | None = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections += 1
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections -= 1
        self.server.last_activity = time.monotonic()
        if self.idle is not None:
            self.idle.cancel()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(self.server.timeout, self._close)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._arm()
        out: list[bytes] = []
        keep = True
        while keep:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    out.append(self._reply(b"HTTP/1.1", 413, b"", []))
                    keep = False
                break
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            fields = {}
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                fields[key.strip().lower()] = value.strip()
            parts = lines[0].split()
            if len(parts) != 3 or b"transfer-encoding" in fields:
                out.append(self._reply(b"HTTP/1.1", 400 if len(parts) != 3 else 411, b"", []))
                keep = False
                break
            size = atoi(fields.get(b"content-length"))
            if len(self.buffer) < end + 4 + size:
                break
            body = bytes(self.buffer[end + 4:end + 4 + size])
            del self.buffer[:end + 4 + size]
            connection = fields.get(b"connection", b"").lower()
            keep = parts[2] == b"HTTP/1.1" and connection != b"close" or connection == b"keep-alive"
            reply, headers = self.server.app.handle(parts[1], body)
            out.append(self._reply(parts[2], 200, reply, headers))
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if not keep:
            self._close()

    @staticmethod
    def _reply(version: bytes, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
        reason = {200: b"OK", 400: b"Bad Request", 411: b"Length Required", 413: b"Too Large"}[status]
        head = [b"%s %d %s" % (version if version.startswith(b"HTTP/1.") else b"HTTP/1.1", status, reason)]
        head += [key + b": " + value for key, value in headers]
        head += [b"Date: " + email.utils.formatdate(usegmt=True).encode(), b"Content-Length: %d" % len(body)]
        return b"\r\n".join(head) + b"\r\n\r\n" + body


class Server:
    """The listening socket, the sync timer, and the idle exit."""

    def __init__(self, app: Httpsqs, timeout: float, idle_exit: float) -> None:
        self.app, self.timeout, self.idle_exit = app, timeout, idle_exit
        self.connections, self.last_activity = 0, time.monotonic()

    async def serve(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Connection(self), host, port, reuse_address=True, backlog=1024)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        synced = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            if now - synced >= self.app.synctime:
                self.app.store.sync()
                synced = now
            if self.idle_exit and not self.connections and now - self.last_activity > self.idle_exit:
                break
        server.close()
        self.app.store.sync()


def _background(log: str) -> None:
    """Detach from the caller (a shell, a test session): a new session, stdio to ``log``."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fixture HTTPSQS 1.7 server (standard library only).")
    parser.add_argument("-l", dest="listen", default=HOST, help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("-p", dest="port", type=int, default=PORT, help="TCP port (default 1218)")
    parser.add_argument("-x", dest="datapath", help="database directory (default: memory only)")
    parser.add_argument("-t", dest="timeout", type=float, default=60.0, help="keep-alive timeout (default 60)")
    parser.add_argument("-s", dest="synctime", type=int, default=5, help="seconds between syncs to disk (default 5)")
    parser.add_argument("-a", dest="auth", help="the auth password (default: none)")
    parser.add_argument("--idle-exit", type=float, default=0.0, help="exit after this many idle seconds (0: never)")
    parser.add_argument("--background", metavar="LOG", help="detach and write the output to LOG")
    args = parser.parse_args(argv)
    path = None
    if args.datapath:
        Path(args.datapath).mkdir(parents=True, exist_ok=True)
        path = Path(args.datapath) / "httpsqs.json"
    if args.background:
        _background(args.background)
    app = Httpsqs(Store(path), args.auth.encode() if args.auth else None, max(1, args.synctime))
    try:
        asyncio.run(Server(app, args.timeout, args.idle_exit).serve(args.listen, args.port))
    except OSError as exc:  # the port is taken: another fixture server won the race
        sys.exit(f"httpsqs fixture: cannot listen on {args.listen}:{args.port}: {exc}")


# -- the tests' session fixture ---------------------------------------------------------------------


def listening(host: str = HOST, port: int = PORT) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def start_background(port: int = PORT, auth: str | None = AUTH, idle_exit: float = 600.0,
                     log: str | None = None) -> None:
    """Start a detached fixture server on 127.0.0.1:``port`` (it exits after ``idle_exit`` idle
    seconds) and wait until it listens. Harmless when another one wins the port."""
    command = [sys.executable, __file__, "-p", str(port), "--idle-exit", str(idle_exit),
               "--background", log or os.devnull]
    if auth:
        command += ["-a", auth]
    subprocess.run(command, check=True, timeout=30)
    deadline = time.monotonic() + 10
    while not listening(HOST, port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the httpsqs fixture did not listen on port {port}")
        time.sleep(0.02)


@pytest.fixture(autouse=True, scope="session")
def _httpsqs_server(request: pytest.FixtureRequest) -> Iterator[None]:
    """Start the fixture server when a collected test needs HTTPSQS and nothing listens on its port."""
    if any("HTTPSQS" in item.nodeid or "httpsqs" in item.nodeid for item in request.session.items):
        if not listening():
            start_background()
    yield


if __name__ == "__main__":
    main()
