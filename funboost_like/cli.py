"""The ``funboost_like`` command line.

``funboost_like init-config [--path DIR] [--force]`` copies the commented settings template to
``DIR/distributed_frame_config.py``; ``funboost_like show-config [--json]`` prints the effective
settings with passwords masked. The operations verbs (``queues``, ``workers``, ``status``, ``tasks``,
``task``, ``retry``, ``delayed``, ``dead``, ``requeue-dead``, ``delete-dead``, ``purge``, ``pause``, ``resume``,
``qps``, ``timing``) parse their arguments, call :class:`funboost_like.ops.service.OpsService` and
print what it returns (:mod:`funboost_like.ops.commands`); every one takes ``--json``, and
``--broker KIND`` for a queue no registry knows. ``web`` serves the dashboard over the same service
(:mod:`funboost_like.web.command`); ``metrics`` serves the Prometheus numbers
(:mod:`funboost_like.observability.command`). Also reachable as ``python -m funboost_like``.

Exit status: 0 done, 1 an error (unknown queue, unreachable broker, ...; the message says which),
2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata, resources
from pathlib import Path

from funboost_like.core.config import USER_CONFIG_MODULE, data_dir_setting, settings
from funboost_like.core.errors import FunboostLikeError
from funboost_like.observability.command import add_metrics_command
from funboost_like.ops.commands import add_ops_commands
from funboost_like.web.command import add_web_command

TEMPLATE_NAME = "distributed_frame_config_template.py"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = args.run(args)
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, and keep Python from complaining
        # again when it flushes stdout at exit (the recipe of the `signal` module's docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (FunboostLikeError, OSError, ValueError) as e:
        print(f"funboost_like: error: {e}", file=sys.stderr)
        return 1
    return status


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funboost_like", description="funboost_like command line.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    init = commands.add_parser(
        "init-config",
        help=f"write a commented {USER_CONFIG_MODULE}.py listing every setting",
        description=f"Copy the settings template to DIR/{USER_CONFIG_MODULE}.py.",
    )
    init.add_argument("--path", default=".", metavar="DIR", help="folder to write into (default: current folder)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(run=_init_config)

    show = commands.add_parser(
        "show-config",
        help="print the effective settings (passwords masked)",
        description="Print the effective settings after defaults, config file, environment and patches.",
    )
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(run=_show_config)
    add_ops_commands(commands)
    add_web_command(commands)
    add_metrics_command(commands)
    return parser


def _version() -> str:
    try:
        return metadata.version("funboost_like")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def template_text() -> str:
    """The settings template shipped inside the package."""
    return resources.files("funboost_like").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def _init_config(args: argparse.Namespace) -> int:
    folder = Path(args.path)
    if not folder.is_dir():
        print(f"funboost_like: error: {folder} is not a folder", file=sys.stderr)
        return 1
    target = folder / f"{USER_CONFIG_MODULE}.py"
    try:
        with open(target, "w" if args.force else "x", encoding="utf-8") as out:
            out.write(template_text())
    except FileExistsError:
        print(f"funboost_like: {target} already exists; use --force to overwrite it", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    return 0


def _show_config(args: argparse.Namespace) -> int:
    # Look for the user's config file in the current folder too, as `python -m` would; the console
    # script's sys.path starts with its own bin folder instead.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        values = settings.as_dict(redact=True)
    finally:
        if added:
            sys.path.remove(cwd)
    if args.json:
        print(json.dumps(values, indent=2, sort_keys=True))
        return 0
    source = settings.source_file or f"none ({USER_CONFIG_MODULE}.py not found on sys.path)"
    print(f"# config file: {source}")
    for name, value in values.items():
        folder = _DATA_FOLDERS.get(name)
        used = f"  # {data_dir_setting(name, folder)}" if folder is not None and not value else ""
        print(f"{name} = {value!r}{used}")
    return 0


# Folder settings whose empty default means a folder under the per-user data directory: show-config
# names the folder in use.
_DATA_FOLDERS = {"SQLITE_QUEUES_PATH": "sqlite_queues", "STATUS_DB_PATH": "status", "LOG_DIR": "logs",
                 "METRICS_DIR": "metrics", "SCHEDULER_SQLITE_DIR": "scheduler"}
