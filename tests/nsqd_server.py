"""A stand-in nsqd for the NSQ tests: the TCP protocol V2 subset and the HTTP API calls the broker uses.

No nsqd can be obtained on these machines, so this fixture implements, with the standard library,
what ``nsqd`` (v1.x, ``nsqd/protocol_v2.go``, ``channel.go``, ``http.go``) does for:

* TCP: the ``"  V2"`` magic; ``IDENTIFY`` (JSON body; the JSON answer when ``feature_negotiation`` is
  asked, else ``OK``; ``heartbeat_interval`` -1 or >= 1000 ms, ``msg_timeout`` >= 1000 ms), ``SUB``,
  ``RDY``, ``FIN``, ``REQ``, ``TOUCH``, ``PUB``, ``MPUB``, ``DPUB``, ``NOP``, ``CLS`` (``CLOSE_WAIT``);
  frames (size, type 0 response / 1 error / 2 message; a message is an 8-byte nanosecond timestamp, a
  2-byte attempts count, a 16-byte hex id and the body); ``_heartbeat_`` every heartbeat interval and
  the connection closed when nothing is read for two intervals; fatal errors (``E_INVALID``,
  ``E_BAD_TOPIC``, ``E_BAD_CHANNEL``, ``E_BAD_BODY``, ``E_BAD_MESSAGE``) close the connection, the
  others (``E_FIN_FAILED``, ``E_REQ_FAILED``, ``E_TOUCH_FAILED``) do not.
* Channels: every channel of a topic gets a copy of each message (the same id); a topic without a
  channel keeps its messages until the first channel is made; a message is sent to a subscriber whose
  RDY count exceeds its in-flight count, its attempts incremented on each sending; an in-flight
  message not finished within the client's ``msg_timeout`` is put back (``TOUCH`` restarts the
  timeout); ``REQ`` with a timeout and ``DPUB`` defer a message. As in nsqd, a closed connection's
  in-flight messages come back only when their timeout passes.
* HTTP: ``GET /ping``, ``GET /stats?format=json[&topic=&channel=]``, ``POST /pub``, ``/topic/create``,
  ``/topic/empty``, ``/topic/delete``, ``/channel/create``, ``/channel/empty``, ``/channel/delete``.

Not implemented: TLS, compression, AUTH, sampling, ephemeral deletion, pausing, disk queues (memory
only: a restart of this process loses everything), nsqlookupd.

Run ``python tests/nsqd_server.py [--tcp-port 4150] [--http-port 4151] [--idle-exit SECONDS]
[--background LOG]`` (``.ci/run`` does, in the background). A test session that collected an NSQ
test starts one in the background when nothing listens on the port (:func:`_nsqd_server`); that one
exits by itself after ten minutes without a client, so parallel sessions share it and none stops it.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

HOST, TCP_PORT, HTTP_PORT = "127.0.0.1", 4150, 4151
VERSION = "1.3.0-fixture"
MAX_RDY, MAX_MSG_SIZE, MAX_BODY_SIZE = 2500, 1048576, 5242880
DEFAULT_MSG_TIMEOUT, MAX_MSG_TIMEOUT, MAX_REQ_TIMEOUT = 60.0, 900.0, 3600.0
DEFAULT_HEARTBEAT = 30.0
RESPONSE, ERROR, MESSAGE = 0, 1, 2
_NAME = re.compile(r"^[.a-zA-Z0-9_-]+(#ephemeral)?$")


def valid_name(name: str) -> bool:
    return 1 <= len(name) <= 64 and bool(_NAME.match(name))


class ClientError(Exception):
    """An error frame; ``fatal`` ones close the connection (nsqd's FatalClientErr)."""

    def __init__(self, code: str, text: str, fatal: bool = True) -> None:
        super().__init__(f"{code} {text}")
        self.fatal = fatal


class Message:
    __slots__ = ("id", "body", "timestamp", "attempts", "sent")

    def __init__(self, msg_id: bytes, body: bytes, timestamp: int, attempts: int = 0) -> None:
        self.id, self.body, self.timestamp, self.attempts = msg_id, body, timestamp, attempts
        self.sent = 0.0  # monotonic time of its last sending

    def frame(self) -> bytes:
        return struct.pack(">qH", self.timestamp, self.attempts) + self.id + self.body


class Channel:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ready: deque[Message] = deque()
        self.in_flight: dict[bytes, tuple[Message, Client, float]] = {}
        self.deferred: list[tuple[float, int, Message]] = []
        self.clients: list[Client] = []
        self.message_count = self.requeue_count = self.timeout_count = 0
        self.turn = 0

    def put(self, msg: Message, defer: float = 0.0) -> None:
        self.message_count += 1
        if defer > 0:
            heapq.heappush(self.deferred, (time.monotonic() + defer, next(_seq), msg))
        else:
            self.ready.append(msg)


class Topic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.channels: dict[str, Channel] = {}
        self.backlog: deque[tuple[Message, float]] = deque()  # while the topic has no channel
        self.message_count = 0


_seq = itertools.count()


class Nsqd:
    """The state of one nsqd: topics, channels, clients; one lock guards it all."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.topics: dict[str, Topic] = {}
        self.clients: set[Client] = set()
        self.ids = itertools.count(1)
        self.node = os.getpid() % 1024
        self.started = time.time()
        self.last_activity = time.monotonic()

    def new_id(self) -> bytes:
        return b"%04x%012x" % (self.node, next(self.ids))

    def topic(self, name: str) -> Topic:
        topic = self.topics.get(name)
        if topic is None:
            topic = self.topics[name] = Topic(name)
        return topic

    def channel(self, topic_name: str, name: str) -> Channel:
        topic = self.topic(topic_name)
        channel = topic.channels.get(name)
        if channel is None:
            channel = topic.channels[name] = Channel(name)
            while topic.backlog:  # the first channel gets what the topic kept
                msg, defer = topic.backlog.popleft()
                channel.put(msg, defer)
        return channel

    def publish(self, topic_name: str, bodies: list[bytes], defer: float = 0.0) -> None:
        with self.lock:
            topic = self.topic(topic_name)
            for body in bodies:
                msg = Message(self.new_id(), body, time.time_ns())
                topic.message_count += 1
                if not topic.channels:
                    topic.backlog.append((msg, defer))
                for channel in topic.channels.values():
                    channel.put(Message(msg.id, body, msg.timestamp), defer)
            for channel in topic.channels.values():
                self.dispatch(channel)

    def dispatch(self, channel: Channel) -> None:
        """Send ready messages to subscribers with room (lock held), round robin."""
        while channel.ready:
            ready = [c for c in channel.clients if c.state == "subscribed" and c.in_flight < c.rdy]
            if not ready:
                return
            client = ready[channel.turn % len(ready)]
            channel.turn += 1
            msg = channel.ready.popleft()
            msg.attempts += 1
            msg.sent = time.monotonic()
            channel.in_flight[msg.id] = (msg, client, time.monotonic() + client.msg_timeout)
            client.in_flight += 1
            client.send(MESSAGE, msg.frame())

    def tick(self) -> None:
        """Timeouts of in-flight messages, due deferred messages, heartbeats."""
        now = time.monotonic()
        with self.lock:
            for topic in list(self.topics.values()):
                for channel in topic.channels.values():
                    for msg_id, (msg, client, deadline) in list(channel.in_flight.items()):
                        if deadline <= now:
                            del channel.in_flight[msg_id]
                            client.in_flight -= 1
                            channel.timeout_count += 1
                            channel.ready.append(msg)
                    while channel.deferred and channel.deferred[0][0] <= now:
                        channel.ready.append(heapq.heappop(channel.deferred)[2])
                    self.dispatch(channel)
            for client in list(self.clients):
                if client.heartbeat > 0 and now >= client.next_heartbeat:
                    client.next_heartbeat = now + client.heartbeat
                    client.send(RESPONSE, b"_heartbeat_")


class Client:
    """One TCP connection (nsqd's clientV2 and its IOLoop)."""

    def __init__(self, nsqd: Nsqd, sock: socket.socket) -> None:
        self.nsqd, self.sock = nsqd, sock
        self.reader = sock.makefile("rb")
        self.send_lock = threading.Lock()
        self.state = "init"
        self.rdy = self.in_flight = 0
        self.msg_timeout = DEFAULT_MSG_TIMEOUT
        self.heartbeat = DEFAULT_HEARTBEAT
        self.next_heartbeat = time.monotonic() + self.heartbeat
        self.channel: Channel | None = None
        self.alive = True

    def send(self, frame_type: int, data: bytes) -> None:
        if not self.alive:
            return
        try:
            with self.send_lock:
                self.sock.sendall(struct.pack(">ii", len(data) + 4, frame_type) + data)
        except OSError:
            self.alive = False

    def run(self) -> None:
        try:
            if self.reader.read(4) != b"  V2":
                self.send(ERROR, b"E_BAD_PROTOCOL protocol version not supported")
                return
            while self.alive:
                self.sock.settimeout(2 * self.heartbeat if self.heartbeat > 0 else None)
                line = self.reader.readline()
                if not line.endswith(b"\n"):
                    return  # EOF, or nothing read for two heartbeat intervals
                self.nsqd.last_activity = time.monotonic()
                params = line.rstrip(b"\r\n").split(b" ")
                try:
                    response = self.execute(params)
                except ClientError as exc:
                    self.send(ERROR, str(exc).encode())
                    if exc.fatal:
                        return
                    continue
                if response is not None:
                    self.send(RESPONSE, response)
        except (OSError, ValueError):
            pass
        finally:
            self.alive = False
            with self.nsqd.lock:
                self.nsqd.clients.discard(self)
                if self.channel is not None and self in self.channel.clients:
                    self.channel.clients.remove(self)  # its in-flight messages wait for their timeout
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # the reader file keeps the descriptor: shut it down
            except OSError:
                pass
            self.reader.close()
            self.sock.close()

    # -- commands ------------------------------------------------------------------------------------
    def execute(self, params: list[bytes]) -> bytes | None:
        command = params[0].decode("latin-1")
        handler = getattr(self, f"cmd_{command}", None) if command.isupper() else None
        if handler is None:
            raise ClientError("E_INVALID", f"invalid command {command}")
        return handler(params)  # type: ignore[no-any-return]

    def read_body(self, code: str, what: str, limit: int) -> bytes:
        header = self.reader.read(4)
        if len(header) != 4:
            raise ClientError(code, f"{what} failed to read body size")
        size = struct.unpack(">i", header)[0]
        if size <= 0:
            raise ClientError(code, f"{what} invalid body size {size}")
        if size > limit:
            raise ClientError(code, f"{what} body too big {size} > {limit}")
        body = self.reader.read(size)
        if len(body) != size:
            raise ClientError(code, f"{what} failed to read body")
        return body

    def cmd_IDENTIFY(self, params: list[bytes]) -> bytes:
        if self.state != "init":
            raise ClientError("E_INVALID", "cannot IDENTIFY in current state")
        try:
            data = json.loads(self.read_body("E_BAD_BODY", "IDENTIFY", MAX_BODY_SIZE))
        except ValueError:
            raise ClientError("E_BAD_BODY", "IDENTIFY failed to decode JSON body") from None
        heartbeat = int(data.get("heartbeat_interval", 0))
        if heartbeat == -1:
            self.heartbeat = 0.0
        elif heartbeat:
            if not 1000 <= heartbeat <= 60000:
                raise ClientError("E_BAD_BODY", f"IDENTIFY heartbeat interval ({heartbeat}) is invalid")
            self.heartbeat = heartbeat / 1000
        self.next_heartbeat = time.monotonic() + self.heartbeat
        msg_timeout = int(data.get("msg_timeout", 0))
        if msg_timeout:
            if not 1000 <= msg_timeout <= MAX_MSG_TIMEOUT * 1000:
                raise ClientError("E_BAD_BODY", f"IDENTIFY msg timeout ({msg_timeout}) is invalid")
            self.msg_timeout = msg_timeout / 1000
        if not data.get("feature_negotiation"):
            return b"OK"
        return json.dumps({"max_rdy_count": MAX_RDY, "version": VERSION, "max_msg_timeout": int(MAX_MSG_TIMEOUT * 1000),
                           "msg_timeout": int(self.msg_timeout * 1000), "tls_v1": False, "deflate": False,
                           "deflate_level": 6, "max_deflate_level": 6, "snappy": False, "sample_rate": 0,
                           "auth_required": False, "output_buffer_size": 16384,
                           "output_buffer_timeout": 250}).encode()

    def cmd_SUB(self, params: list[bytes]) -> bytes:
        if self.state != "init":
            raise ClientError("E_INVALID", "cannot SUB in current state")
        if self.heartbeat <= 0:
            raise ClientError("E_INVALID", "cannot SUB with heartbeats disabled")
        if len(params) < 3:
            raise ClientError("E_INVALID", "SUB insufficient number of parameters")
        topic, channel = params[1].decode("latin-1"), params[2].decode("latin-1")
        if not valid_name(topic):
            raise ClientError("E_BAD_TOPIC", f"SUB topic name {topic!r} is not valid")
        if not valid_name(channel):
            raise ClientError("E_BAD_CHANNEL", f"SUB channel name {channel!r} is not valid")
        with self.nsqd.lock:
            self.channel = self.nsqd.channel(topic, channel)
            self.channel.clients.append(self)
            self.state = "subscribed"
        return b"OK"

    def cmd_RDY(self, params: list[bytes]) -> None:
        if self.state == "closing":
            return None
        if self.state != "subscribed":
            raise ClientError("E_INVALID", "cannot RDY in current state")
        try:
            count = int(params[1]) if len(params) > 1 else 1
        except ValueError:
            raise ClientError("E_INVALID", f"RDY could not parse count {params[1]!r}") from None
        if not 0 <= count <= MAX_RDY:
            raise ClientError("E_INVALID", f"RDY count {count} out of range 0-{MAX_RDY}")
        with self.nsqd.lock:
            self.rdy = count
            assert self.channel is not None
            self.nsqd.dispatch(self.channel)
        return None

    def _owned(self, command: str, params: list[bytes], count: int) -> tuple[Channel, bytes]:
        if self.state not in ("subscribed", "closing"):
            raise ClientError("E_INVALID", f"cannot {command} in current state")
        if len(params) < count:
            raise ClientError("E_INVALID", f"{command} insufficient number of params")
        if len(params[1]) != 16:
            raise ClientError("E_INVALID", "invalid message ID")
        assert self.channel is not None
        return self.channel, params[1]

    def _pop(self, channel: Channel, msg_id: bytes, command: str) -> Message:
        entry = channel.in_flight.get(msg_id)
        if entry is None or entry[1] is not self:
            why = "ID not in flight" if entry is None else "client does not own message"
            raise ClientError(f"E_{command}_FAILED", f"{command} {msg_id.decode()} failed {why}", fatal=False)
        del channel.in_flight[msg_id]
        self.in_flight -= 1
        return entry[0]

    def cmd_FIN(self, params: list[bytes]) -> None:
        channel, msg_id = self._owned("FIN", params, 2)
        with self.nsqd.lock:
            self._pop(channel, msg_id, "FIN")
            self.nsqd.dispatch(channel)
        return None

    def cmd_REQ(self, params: list[bytes]) -> None:
        channel, msg_id = self._owned("REQ", params, 3)
        try:
            timeout = min(max(int(params[2]) / 1000, 0.0), MAX_REQ_TIMEOUT)
        except ValueError:
            raise ClientError("E_INVALID", f"REQ could not parse timeout {params[2]!r}") from None
        with self.nsqd.lock:
            msg = self._pop(channel, msg_id, "REQ")
            channel.requeue_count += 1
            channel.message_count -= 1  # put() counts it again
            channel.put(msg, timeout)
            self.nsqd.dispatch(channel)
        return None

    def cmd_TOUCH(self, params: list[bytes]) -> None:
        channel, msg_id = self._owned("TOUCH", params, 2)
        with self.nsqd.lock:
            entry = channel.in_flight.get(msg_id)
            if entry is None or entry[1] is not self:
                raise ClientError("E_TOUCH_FAILED", f"TOUCH {msg_id.decode()} failed ID not in flight", fatal=False)
            msg = entry[0]  # as nsqd: never past --max-msg-timeout after its sending
            deadline = min(time.monotonic() + self.msg_timeout, msg.sent + MAX_MSG_TIMEOUT)
            channel.in_flight[msg_id] = (msg, self, deadline)
        return None

    def cmd_NOP(self, params: list[bytes]) -> None:
        return None

    def cmd_CLS(self, params: list[bytes]) -> bytes:
        if self.state != "subscribed":
            raise ClientError("E_INVALID", "cannot CLS in current state")
        with self.nsqd.lock:
            self.state, self.rdy = "closing", 0
        return b"CLOSE_WAIT"

    def _topic_param(self, command: str, params: list[bytes], count: int) -> str:
        if len(params) < count:
            raise ClientError("E_INVALID", f"{command} insufficient number of parameters")
        topic = params[1].decode("latin-1")
        if not valid_name(topic):
            raise ClientError("E_BAD_TOPIC", f"{command} topic name {topic!r} is not valid")
        return topic

    def cmd_PUB(self, params: list[bytes]) -> bytes:
        topic = self._topic_param("PUB", params, 2)
        self.nsqd.publish(topic, [self.read_body("E_BAD_MESSAGE", "PUB", MAX_MSG_SIZE)])
        return b"OK"

    def cmd_DPUB(self, params: list[bytes]) -> bytes:
        topic = self._topic_param("DPUB", params, 3)
        try:
            defer_ms = int(params[2])
        except ValueError:
            raise ClientError("E_INVALID", f"DPUB could not parse timeout {params[2]!r}") from None
        if not 0 <= defer_ms <= MAX_REQ_TIMEOUT * 1000:
            raise ClientError("E_INVALID", f"DPUB timeout {defer_ms} out of range 0-{int(MAX_REQ_TIMEOUT * 1000)}")
        self.nsqd.publish(topic, [self.read_body("E_BAD_MESSAGE", "DPUB", MAX_MSG_SIZE)], defer_ms / 1000)
        return b"OK"

    def cmd_MPUB(self, params: list[bytes]) -> bytes:
        topic = self._topic_param("MPUB", params, 2)
        body = self.read_body("E_BAD_BODY", "MPUB", MAX_BODY_SIZE)
        if len(body) < 4:
            raise ClientError("E_BAD_BODY", "MPUB failed to read message count")
        count, at, bodies = struct.unpack(">i", body[:4])[0], 4, []
        if count <= 0 or count > MAX_BODY_SIZE // 4:
            raise ClientError("E_BAD_BODY", f"MPUB invalid message count {count}")
        for _ in range(count):
            if at + 4 > len(body):
                raise ClientError("E_BAD_MESSAGE", "MPUB failed to read message body size")
            size = struct.unpack(">i", body[at:at + 4])[0]
            if size <= 0 or size > MAX_MSG_SIZE or at + 4 + size > len(body):
                raise ClientError("E_BAD_MESSAGE", f"MPUB invalid message body size {size}")
            bodies.append(body[at + 4:at + 4 + size])
            at += 4 + size
        self.nsqd.publish(topic, bodies)
        return b"OK"


# -- HTTP --------------------------------------------------------------------------------------------
def _channel_stats(channel: Channel) -> dict[str, object]:
    return {"channel_name": channel.name, "depth": len(channel.ready), "backend_depth": 0,
            "in_flight_count": len(channel.in_flight), "deferred_count": len(channel.deferred),
            "message_count": channel.message_count, "requeue_count": channel.requeue_count,
            "timeout_count": channel.timeout_count, "client_count": len(channel.clients),
            "clients": [], "paused": False, "e2e_processing_latency": {"count": 0, "percentiles": None}}


def stats(nsqd: Nsqd, topic: str | None, channel: str | None) -> dict[str, object]:
    """``GET /stats?format=json``, nsqd 1.x's shape (topics filtered by ``topic``, channels by ``channel``)."""
    with nsqd.lock:
        topics = [{"topic_name": t.name, "depth": len(t.backlog), "backend_depth": 0, "message_count": t.message_count,
                   "message_bytes": 0, "paused": False,
                   "channels": [_channel_stats(c) for c in t.channels.values() if channel in (None, c.name)],
                   "e2e_processing_latency": {"count": 0, "percentiles": None}}
                  for t in nsqd.topics.values() if topic in (None, t.name)]
    return {"version": VERSION, "health": "OK", "start_time": int(nsqd.started), "topics": topics, "memory": {},
            "producers": []}


def admin(nsqd: Nsqd, path: str, topic_name: str, channel_name: str) -> tuple[int, str]:
    """The POST calls on topics and channels: (HTTP status, error message or "")."""
    if not valid_name(topic_name):
        return 400, "INVALID_TOPIC" if topic_name else "MISSING_ARG_TOPIC"
    if path.startswith("/channel/") and not valid_name(channel_name):
        return 400, "INVALID_CHANNEL" if channel_name else "MISSING_ARG_CHANNEL"
    with nsqd.lock:
        if path == "/topic/create":
            nsqd.topic(topic_name)
            return 200, ""
        if path == "/channel/create":
            nsqd.channel(topic_name, channel_name)
            return 200, ""
        topic = nsqd.topics.get(topic_name)
        if topic is None:
            return 404, "TOPIC_NOT_FOUND"
        if path in ("/topic/empty", "/topic/delete"):
            topic.backlog.clear()
            if path == "/topic/delete":
                del nsqd.topics[topic_name]
            return 200, ""
        channel = topic.channels.get(channel_name)
        if path not in ("/channel/empty", "/channel/delete"):
            return 404, "NOT_FOUND"
        if channel is None:
            return 404, "CHANNEL_NOT_FOUND"
        channel.ready.clear()  # as nsqd's Channel.Empty(): in-flight and deferred messages too
        channel.deferred.clear()
        channel.in_flight.clear()
        for client in channel.clients:
            client.in_flight = 0
        if path == "/channel/delete":
            del topic.channels[channel_name]
        return 200, ""


def _handler(nsqd: Nsqd) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

        def reply(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def answer(self, status: int, message: str) -> None:
            if status == 200:
                self.reply(200, message.encode())
            else:
                self.reply(status, json.dumps({"message": message}).encode(), "application/json; charset=utf-8")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/ping":
                self.reply(200, b"OK")
            elif url.path == "/stats":
                body = json.dumps(stats(nsqd, query.get("topic"), query.get("channel"))).encode()
                self.reply(200, body, "application/json; charset=utf-8")
            else:
                self.answer(404, "NOT_FOUND")

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            nsqd.last_activity = time.monotonic()
            topic = query.get("topic", "")
            if url.path != "/pub":
                self.answer(*admin(nsqd, url.path, topic, query.get("channel", "")))
            elif not valid_name(topic):
                self.answer(400, "INVALID_TOPIC" if topic else "MISSING_ARG_TOPIC")
            elif not body:
                self.answer(400, "MSG_EMPTY")
            else:
                nsqd.publish(topic, [body], float(query.get("defer", 0)) / 1000)
                self.answer(200, "OK")

    return Handler


class _HttpServer(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True


def serve(tcp_port: int = TCP_PORT, http_port: int = HTTP_PORT, idle_exit: float = 0.0) -> None:
    """Serve until killed, or until ``idle_exit`` seconds pass without a connection or request."""
    nsqd = Nsqd()
    http = _HttpServer((HOST, http_port), _handler(nsqd))  # first: once the TCP port listens, both do
    listener = socket.create_server((HOST, tcp_port))
    threading.Thread(target=http.serve_forever, daemon=True).start()

    def accept() -> None:
        while True:
            sock, _ = listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = Client(nsqd, sock)
            with nsqd.lock:
                nsqd.clients.add(client)
            nsqd.last_activity = time.monotonic()
            threading.Thread(target=client.run, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    while True:
        time.sleep(0.02)
        nsqd.tick()
        if idle_exit and not nsqd.clients and time.monotonic() - nsqd.last_activity > idle_exit:
            return


def listening(port: int = TCP_PORT) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def ensure_running(tcp_port: int = TCP_PORT, http_port: int = HTTP_PORT, idle_exit: float = 600.0,
                   log_path: str = "") -> bool:
    """Start a detached fixture nsqd unless one listens on ``tcp_port``; True once it listens. Several
    test sessions may call this at once: one server binds the ports, the others exit at once."""
    if listening(tcp_port):
        return True
    log_path = log_path or os.path.join(tempfile.gettempdir(), f"nsqd_fixture_{tcp_port}.log")
    with open(log_path, "ab") as log:
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--tcp-port", str(tcp_port), "--http-port",
                          str(http_port), "--idle-exit", str(idle_exit)], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if listening(tcp_port):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(autouse=True, scope="session")
def _nsqd_server(request: pytest.FixtureRequest) -> None:
    """Start the fixture nsqd when a collected test needs it and nothing listens on its port. It is
    never stopped by a session (parallel sessions share it): it exits after ten idle minutes."""
    if any("NSQ" in item.nodeid or "test_nsq.py" in item.nodeid for item in request.session.items):
        if not ensure_running():
            warnings.warn(f"the fixture nsqd did not listen on port {TCP_PORT}", stacklevel=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tcp-port", type=int, default=TCP_PORT)
    parser.add_argument("--http-port", type=int, default=HTTP_PORT)
    parser.add_argument("--idle-exit", type=float, default=0.0, help="exit after this many idle seconds (0: never)")
    parser.add_argument("--background", metavar="LOG", help="run detached, logging to LOG; return once it listens")
    args = parser.parse_args()
    if args.background:
        sys.exit(0 if ensure_running(args.tcp_port, args.http_port, args.idle_exit, args.background) else 1)
    serve(args.tcp_port, args.http_port, args.idle_exit)
