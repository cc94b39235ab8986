"""The ``funboost_like metrics`` verb: serve this host's Prometheus numbers, or print them once.

``funboost_like metrics [--port 9464] [--host 127.0.0.1]`` serves the scrape (every path answers,
``/metrics`` included) until interrupted; ``--once`` prints it to standard output and exits. It reads
the snapshots of ``METRICS_DIR`` (the workers of this host must run with ``METRICS = True`` and the
same folder) and the operations registry, like the web dashboard's ``/metrics``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any

DEFAULT_PORT = 9464  # the port OpenTelemetry's Prometheus exporter and others default to


def add_metrics_command(commands: Any) -> None:
    """Add ``metrics`` to the ``funboost_like`` sub-command parsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "metrics", help="serve this host's Prometheus metrics (or print them once)",
        description="Serve the Prometheus numbers of this host's processes (METRICS = True) and of the queues "
                    "the operations registry knows.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; 0.0.0.0 for a Prometheus on another machine)")
    parser.add_argument("--once", action="store_true", help="print the scrape to standard output and exit")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    cwd = os.getcwd()  # the user's distributed_frame_config.py, as `python -m` would find it
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    from funboost_like.observability import prometheus

    if args.once:
        body, _content_type = prometheus.render_metrics()
        sys.stdout.write(body.decode("utf-8"))
        return 0
    server = prometheus.serve(args.port, args.host)
    host, port = server.server_address[:2]
    print(f"serving Prometheus metrics on http://{host}:{port}/metrics (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
