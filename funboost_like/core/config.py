"""Framework settings.

Precedence, lowest first: the defaults below < a ``distributed_frame_config.py`` module found on
``sys.path`` (the start script's folder comes first there) < environment variables named
``FUNBOOST_LIKE_<SETTING>`` < :func:`patch_frame_config`.

Nothing is read until a setting is first needed, and nothing is ever written: run
``python -m funboost_like init-config`` to copy the commented template into a project.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from funboost_like.core.errors import ConfigurationError

ENV_PREFIX = "FUNBOOST_LIKE_"
USER_CONFIG_MODULE = "distributed_frame_config"


def default_data_dir() -> Path:
    """The per-user data directory (never the filesystem root, never the user's project)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "funboost_like"


# name -> default value. The type of the default is the type an environment variable is parsed to.
DEFAULTS: dict[str, Any] = {
    # Embedded SQLite broker (PERSISTQUEUE).
    "SQLITE_QUEUES_PATH": "",  # "" means <per-user data dir>/sqlite_queues
    "SQLITE_LEASE_SECONDS": 15.0,  # a killed consumer's messages come back after at most this long (renewed every 5 s)
    "SQLITE_BUSY_TIMEOUT_SECONDS": 5.0,  # below lease / 3, so lease renewal never stalls past a lease
    "SQLITE_SYNCHRONOUS": "NORMAL",  # NORMAL survives a process crash; FULL also survives power loss
    # Redis (used by the Redis brokers and Redis-backed services).
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_HEARTBEAT_SECONDS": 5.0,  # REDIS_ACK_ABLE / RedisBrpopLpush consumers heartbeat this often
    "REDIS_DEAD_AFTER_SECONDS": 15.0,  # ... and a consumer silent this long is dead: its messages return
    # Logging.
    "LOG_CONSOLE": True,  # attach a console handler when the application configured no logging
    "LOG_COLOR": True,
    "LOG_DIR": "",  # "" means <per-user data dir>/logs (used only when create_logger_file=True)
    # Consume loop.
    "GRACEFUL_STOP_SECONDS": 30.0,  # how long running calls may finish after SIGINT/SIGTERM
    "THREAD_KEEP_ALIVE_SECONDS": 10.0,  # an idle worker thread exits after this long
    "STATS_LOG_INTERVAL_SECONDS": 60.0,
    # Processes (run_consumer_with_multi_process, multi_process_consume).
    "MULTI_PROCESS_START_METHOD": "",  # "fork", "spawn" or "forkserver"; "" means the platform default
    # Timing jobs (fsdf_background_scheduler).
    "SCHEDULER_JOB_STORE": "memory",  # "memory", "sqlite" or "redis" (at REDIS_URL); jobs are stored as JSON
    "SCHEDULER_SQLITE_DIR": "",  # "" means <per-user data dir>/scheduler (jobs.sqlite3, fire_locks.sqlite3)
    "SCHEDULER_FIRE_LOCK": "auto",  # "auto", "sqlite", "redis" or "none" (see scheduling/fire_lock.py)
    "SCHEDULER_FIRE_LOCK_RETENTION_SECONDS": 86400.0,  # how long a published fire time is remembered
    "SCHEDULER_POLL_SECONDS": 1.0,  # how often a scheduler on a shared store looks for others' changes
    # Results, status and time.
    "RPC_TIMEOUT_SECONDS": 120.0,  # how long AsyncResult.result waits by default
    "RPC_RESULT_EXPIRE_SECONDS": 3600.0,  # how long a call's result is kept for the publisher
    "STATUS_DB_PATH": "",  # "" means <per-user data dir>/status (function_result_status_persistance_conf)
    "TIMEZONE": "",  # IANA name for naive eta datetimes and time windows; "" means the machine's local time
}

SECRET_SETTINGS = frozenset({"REDIS_URL"})


class _Settings:
    """Lazily loaded, thread-safe view of the settings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] | None = None
        self._patched: dict[str, Any] = {}
        self.source_file: str | None = None

    def _load(self) -> dict[str, Any]:
        values = dict(DEFAULTS)
        values.update(self._read_user_module())
        for name, default in DEFAULTS.items():
            raw = os.environ.get(ENV_PREFIX + name)
            if raw is not None:
                values[name] = _parse_env(name, raw, default)
        values.update(self._patched)
        return values

    def _read_user_module(self) -> dict[str, Any]:
        spec = importlib.util.find_spec(USER_CONFIG_MODULE) if _may_look_for_user_module() else None
        if spec is None or spec.origin is None:
            return {}
        module = sys.modules.get(USER_CONFIG_MODULE)
        if module is None:
            module = importlib.util.module_from_spec(spec)
            assert spec.loader is not None
            spec.loader.exec_module(module)
        self.source_file = spec.origin
        return {name: getattr(module, name) for name in DEFAULTS if hasattr(module, name)}

    def get(self, name: str) -> Any:
        values = self._values
        if values is None:
            with self._lock:
                if self._values is None:
                    self._values = self._load()
                values = self._values
        try:
            return values[name]
        except KeyError:
            raise ConfigurationError(f"unknown setting {name!r}") from None

    def patch(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(DEFAULTS))}"
            )
        with self._lock:
            self._patched.update(settings)
            self._values = None

    def reset(self) -> None:
        """Forget every patch and reload on next access (for tests)."""
        with self._lock:
            self._patched.clear()
            self._values = None

    def as_dict(self, redact: bool = True) -> dict[str, Any]:
        values = {name: self.get(name) for name in DEFAULTS}
        if redact:
            for name in SECRET_SETTINGS:
                values[name] = redact_url(str(values[name]))
        return values


def _may_look_for_user_module() -> bool:
    return os.environ.get(ENV_PREFIX + "NO_USER_CONFIG", "") in ("", "0")


def _parse_env(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if isinstance(default, (int, float)):
            return type(default)(raw)
    except ValueError:
        expected = type(default).__name__
        raise ConfigurationError(f"environment variable {ENV_PREFIX}{name}={raw!r} is not a valid {expected}") from None
    return raw


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0?password=x`` -> ``redis://user:***@host/0?password=***``.

    Passwords never reach a log, whether in the user-info part or in a ``password`` query parameter.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    if parts.query:
        pairs = [(k, "***" if k.lower() in ("password", "pass", "pwd") else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(pairs, safe="*"))
    return urlunsplit(parts)


settings = _Settings()


def patch_frame_config(**new_settings: Any) -> None:
    """Override settings from code; this has the last word over files and environment variables."""
    settings.patch(new_settings)


def data_dir_setting(name: str, subfolder: str) -> Path:
    """A folder setting whose empty default means ``<per-user data dir>/<subfolder>``."""
    configured = str(settings.get(name) or "")
    return Path(configured).expanduser() if configured else default_data_dir() / subfolder
