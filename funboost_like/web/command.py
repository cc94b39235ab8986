"""The ``funboost_like web`` verb: start the dashboard (or print a password hash for it)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

from funboost_like.web.auth import Credentials, hash_password

DEFAULT_PORT = 27018


def add_web_command(commands: Any) -> None:
    """Add ``web`` to the ``funboost_like`` sub-command parsers."""
    web: argparse.ArgumentParser = commands.add_parser(
        "web", help="serve the web dashboard (127.0.0.1 unless credentials are configured)",
        description="Serve the web dashboard and its JSON API. Without a configured user or token it prints a "
                    "random token to log in with, and binds only a loopback address.")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs "
                                                         "FUNBOOST_LIKE_WEB_TOKEN or --user/--password-hash)")
    web.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    web.add_argument("--read-only", action="store_true", help="show everything, allow no action")
    web.add_argument("--broker", metavar="KIND", help="the only broker kind to look at")
    web.add_argument("--user", help="a user name (with --password-hash; or FUNBOOST_LIKE_WEB_USER)")
    web.add_argument("--password-hash", help="the user's hash from --hash-password (or "
                                             "FUNBOOST_LIKE_WEB_PASSWORD_HASH)")
    web.add_argument("--hash-password", action="store_true", help="read a password and print its hash, then exit")
    web.set_defaults(run=_web)


def _web(args: argparse.Namespace) -> int:
    if args.hash_password:
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        print(hash_password(password))
        return 0
    from funboost_like.ops.service import OpsService
    from funboost_like.web.server import make_server

    cwd = os.getcwd()  # the user's distributed_frame_config.py, as `python -m` would find it
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    credentials = Credentials.make(user=args.user, password_hash=args.password_hash)
    server = make_server(args.host, args.port, credentials=credentials, read_only=args.read_only,
                         service=lambda: OpsService(broker=args.broker))
    print(f"funboost_like dashboard on {server.url}{' (read-only)' if args.read_only else ''}", flush=True)
    if not credentials.configured:
        print(f"log in with the token: {credentials.token}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
