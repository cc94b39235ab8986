"""Framework settings.

Precedence, lowest first: the defaults below < a ``distributed_frame_config.py`` module found on
``sys.path`` (the start script's folder comes first there) < environment variables named
``FUNBOOST_LIKE_<SETTING>`` < :func:`patch_frame_config`. A setting named in :data:`ALIASES` may also be
given under its second name (a seed's spelling) at every level.

Nothing is read until a setting is first needed, and nothing is ever written: run
``python -m funboost_like init-config`` to copy the commented template into a project.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
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
    "SQLITE_FILES_PER_QUEUE": 1,  # files one queue is spread over, to lower write contention (alias MIDDLEWARE_NUM)
    # Redis (used by the Redis brokers and Redis-backed services).
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_HEARTBEAT_SECONDS": 5.0,  # REDIS_ACK_ABLE / RedisBrpopLpush consumers heartbeat this often
    "REDIS_DEAD_AFTER_SECONDS": 15.0,  # ... and a consumer silent this long is dead: its messages return
    # RabbitMQ (RABBITMQ_PIKA, RABBITMQ_AMQPSTORM, RABBITMQ_RABBITPY) and kombu (KOMBU; "" means RABBITMQ_URL).
    "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "KOMBU_URL": "",
    # SQL databases through SQLAlchemy 2 (SQLACHEMY; alias SQLACHEMY_ENGINE_URL, the seed's spelling).
    "SQLALCHEMY_URL": "",  # "" means sqlite:///<SQLITE_QUEUES_PATH folder>/sqlalchemy_queues.sqlite3
    "SQLALCHEMY_LEASE_SECONDS": 15.0,  # a killed consumer's messages come back after at most this long
    # NATS JetStream (NATS).
    "NATS_URL": "nats://127.0.0.1:4222",
    "NATS_ACK_WAIT_SECONDS": 30.0,  # a killed consumer's messages come back after this long (live ones renew)
    # NSQ (NSQ; docs/nsq.md): nsqd's TCP and HTTP addresses, in the same order.
    "NSQD_TCP_ADDRESSES": "127.0.0.1:4150",  # host:port[,host:port...]
    "NSQD_HTTP_ADDRESSES": "127.0.0.1:4151",  # the HTTP address of each nsqd above (count, purge, dead letters)
    "NSQ_MSG_TIMEOUT_SECONDS": 60.0,  # a killed consumer's messages come back after this long (live ones TOUCH)
    # Kafka (KAFKA with kafka-python, CONFLUENT_KAFKA with confluent-kafka; docs/kafka.md).
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",  # host:port[,host:port...]
    "KAFKA_PARTITIONS": 4,  # partitions of a topic funboost_like creates; publishers use at most this many
    "KAFKA_SESSION_TIMEOUT_SECONDS": 10.0,  # a killed consumer's partitions move to the others after this long
    "KAFKA_ORDERED_QUEUES": "",  # comma-separated queues that run one call at a time per partition
    "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    "KAFKA_SASL_MECHANISM": "PLAIN",
    "KAFKA_SASL_USERNAME": "",
    "KAFKA_SASL_PASSWORD": "",  # never logged
    "KAFKA_API_VERSION": "",  # kafka-python only: "" asks the server; "2.0" where its answer cannot be read
    "KAFKA_BOOTSTRAP_TIMEOUT_SECONDS": 10.0,  # kafka-python only: a new client's wait for its first contact
    # MQTT (MQTT; docs/mqtt.md): Mosquitto or any MQTT 5 server with shared subscriptions.
    "MQTT_URL": "mqtt://127.0.0.1:1883",  # mqtt://user:password@host:port, or mqtts:// for TLS
    "MQTT_SESSION_EXPIRY_SECONDS": 604800.0,  # the server keeps a consumer slot's session (its messages) this long
    "MQTT_RECEIVE_MAXIMUM": 1000,  # messages the server may send one consumer process before its acks
    # MongoDB (MONGOMQ): the URL's database is used ("funboost_like" when it names none).
    "MONGO_URL": "mongodb://127.0.0.1:27017/funboost_like",
    "MONGO_LEASE_SECONDS": 15.0,  # a killed consumer's messages come back after at most this long
    # ZeroMQ (ZEROMQ; docs/zeromq.md): a queue's name is the TCP port of its hub, a process on the consumers' host.
    "ZEROMQ_HOST": "127.0.0.1",  # where hubs are reached; on a loopback address a missing hub is started
    "ZEROMQ_BIND_HOST": "127.0.0.1",  # the address a started hub binds ("0.0.0.0": reachable from other hosts)
    "ZEROMQ_PORT": 0,  # the hub port of queues whose names are not port numbers (0: such names are refused)
    "ZEROMQ_TIMEOUT_SECONDS": 5.0,  # how long a request waits for its hub's answer
    "ZEROMQ_HUB_IDLE_SECONDS": 600.0,  # a started hub exits after this long without requests while empty
    # Apache Pulsar (PULSAR; docs/pulsar.md), tested on pulsar-lite.
    "PULSAR_URL": "pulsar://127.0.0.1:6650",  # pulsar://host:port or pulsar+ssl://host:port
    "PULSAR_NAMESPACE": "public/default",  # tenant/namespace of the queues' topics
    # HTTPSQS (HTTPSQS; docs/httpsqs.md): httpsqs 1.7, at-most-once; tested against a fixture server only.
    "HTTPSQS_URL": "http://127.0.0.1:1218/",  # http://host:port/?auth=PASSWORD (the password is never logged)
    "HTTPSQS_TIMEOUT_SECONDS": 5.0,  # how long one request waits for the server's answer
    "HTTPSQS_PIPELINE": 100,  # requests in flight on one connection (publish_many, batch fetches); 1: none
    # The Django ORM queue (DJANGO_ORM, funboost_like.contrib.django in INSTALLED_APPS; docs/django.md).
    "DJANGO_SETTINGS_MODULE": "",  # used to set Django up when the process has not; "" means the environment's
    "DJANGO_DATABASE_ALIAS": "",  # "" means the Django setting FUNBOOST_LIKE_DATABASE, else "default"
    "DJANGO_LEASE_SECONDS": 15.0,  # a killed consumer's messages come back after at most this long
    "DJANGO_MIGRATE_ON_FIRST_USE": False,  # True: apply the app's migrations when its tables are missing
    # Logging.
    "LOG_CONSOLE": True,  # attach a console handler when the application configured no logging
    "LOG_COLOR": True,
    "LOG_DIR": "",  # "" means <per-user data dir>/logs (used only when create_logger_file=True)
    # Consume loop.
    "GRACEFUL_STOP_SECONDS": 30.0,  # how long running calls may finish after SIGINT/SIGTERM
    "THREAD_KEEP_ALIVE_SECONDS": 10.0,  # an idle worker thread exits after this long
    "STATS_LOG_INTERVAL_SECONDS": 60.0,  # 0: no rate line
    # Operations (docs/operations.md): consumers register and beat; control records pause them, change qps.
    "OPS_REGISTRY": True,  # False: no worker records, no queue index, no run-time control
    "CONSUMER_HEARTBEAT_SECONDS": 5.0,  # is_send_consumer_hearbeat_to_redis: a beat this often; dead after 3 missed
    "OPS_HEARTBEAT_SECONDS": 2.0,  # a worker record is rewritten this often; stale after 3 beats, gone after 10
    "OPS_STORE_BROKER": "",  # kinds without key-value records (Kafka, Pulsar, ...) keep their registry in this
    # broker kind's records, e.g. "REDIS" (shared by every host); "" means this host's embedded SQLite store
    # Prometheus metrics and OpenTelemetry spans (docs/metrics.md).
    "METRICS": False,  # True: publishers and consumers count for Prometheus (per-process snapshots in METRICS_DIR)
    "METRICS_DIR": "",  # "" means <per-user data dir>/metrics; one folder per host, shared by its processes
    "METRICS_FLUSH_SECONDS": 1.0,  # how often a process writes its snapshot (> 0; METRICS=False is off)
    "METRICS_PORT": 0,  # > 0: a consumer's process serves /metrics on this port (0: none; see `funboost_like metrics`)
    "METRICS_HOST": "127.0.0.1",  # the address that endpoint binds
    "OPENTELEMETRY_TRACING": True,  # spans when opentelemetry-api is installed and an SDK is configured; False: never
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

SECRET_SETTINGS = frozenset({"REDIS_URL", "RABBITMQ_URL", "KOMBU_URL", "SQLALCHEMY_URL", "NATS_URL", "MONGO_URL",
                             "MQTT_URL", "PULSAR_URL", "KAFKA_SASL_PASSWORD", "HTTPSQS_URL"})


# A second name for a setting (a seed's spelling), read at every level like the setting's own name; where
# both are given at one level, the setting's own name wins.
ALIASES: dict[str, str] = {"MIDDLEWARE_NUM": "SQLITE_FILES_PER_QUEUE", "SQLACHEMY_ENGINE_URL": "SQLALCHEMY_URL"}


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
        for env_name, name in [*ALIASES.items(), *((name, name) for name in DEFAULTS)]:  # aliases first: own names win
            raw = os.environ.get(ENV_PREFIX + env_name)
            if raw is not None:
                values[name] = _in_range(name, _parse_env(env_name, raw, DEFAULTS[name]), f"{ENV_PREFIX}{env_name}")
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
            try:
                spec.loader.exec_module(module)
            except Exception as exc:  # a typo in the user's file: say which file, not a bare traceback
                raise ConfigurationError(f"the settings file {spec.origin} failed to load: "
                                         f"{type(exc).__name__}: {exc}") from exc
        self.source_file = spec.origin
        found = {name: getattr(module, alias) for alias, name in ALIASES.items() if hasattr(module, alias)}
        found.update({name: getattr(module, name) for name in DEFAULTS if hasattr(module, name)})
        return {name: _checked(name, value, spec.origin) for name, value in found.items()}

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
            if name in ALIASES:
                return values[ALIASES[name]]
            raise ConfigurationError(f"unknown setting {name!r}") from None

    def patch(self, settings: dict[str, Any]) -> None:
        own = {name: value for name, value in settings.items() if name not in ALIASES}
        settings = {**{ALIASES[name]: value for name, value in settings.items() if name in ALIASES}, **own}
        unknown = sorted(set(settings) - set(DEFAULTS))
        if unknown:
            hints = [f"{name} (did you mean {guess[0]}?)" if (guess := difflib.get_close_matches(name, DEFAULTS, n=1))
                     else name for name in unknown]
            raise ConfigurationError(f"unknown setting(s) {', '.join(hints)}; the settings are listed in "
                                     "docs/configuration.md and `python -m funboost_like show-config`")
        settings = {name: _checked(name, value, "patch_frame_config") for name, value in settings.items()}
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
                value = str(values[name])
                values[name] = redact_url(value) if "://" in value or not value else "***"  # a bare password
        return values


def _may_look_for_user_module() -> bool:
    return os.environ.get(ENV_PREFIX + "NO_USER_CONFIG", "") in ("", "0")


def _checked(name: str, value: Any, source: str) -> Any:
    """A setting given in code or in the config file, of its default's type: an on/off setting True or
    False (or 1, 0), a whole-number setting an int, any other number an int or a float. Other settings
    are taken as given. (Environment variables are text, and are read by :func:`_parse_env` instead.)"""
    default = DEFAULTS[name]
    if isinstance(default, bool):
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            return bool(value)
    elif isinstance(default, (int, float)):
        if not isinstance(value, bool) and isinstance(value, (int, float)) and \
                (isinstance(default, float) or isinstance(value, int)):
            return _in_range(name, float(value) if isinstance(default, float) else value, source)
    else:
        return value
    kind = "True or False" if isinstance(default, bool) else f"a number ({type(default).__name__})"
    raise ConfigurationError(f"setting {name}={value!r} (from {source}) must be {kind}")


# Number settings that must be more than 0 (every number setting must be finite and at least 0)
_POSITIVE = frozenset({"SQLITE_LEASE_SECONDS", "SQLALCHEMY_LEASE_SECONDS", "MONGO_LEASE_SECONDS",
                       "DJANGO_LEASE_SECONDS", "SQLITE_FILES_PER_QUEUE", "REDIS_HEARTBEAT_SECONDS",
                       "REDIS_DEAD_AFTER_SECONDS",
                       "NATS_ACK_WAIT_SECONDS", "NSQ_MSG_TIMEOUT_SECONDS", "KAFKA_PARTITIONS",
                       "KAFKA_BOOTSTRAP_TIMEOUT_SECONDS", "KAFKA_SESSION_TIMEOUT_SECONDS", "MQTT_RECEIVE_MAXIMUM",
                       "HTTPSQS_PIPELINE", "HTTPSQS_TIMEOUT_SECONDS", "ZEROMQ_TIMEOUT_SECONDS",
                       "RPC_RESULT_EXPIRE_SECONDS", "CONSUMER_HEARTBEAT_SECONDS", "OPS_HEARTBEAT_SECONDS",
                       "MQTT_SESSION_EXPIRY_SECONDS", "METRICS_FLUSH_SECONDS"})


def _in_range(name: str, value: Any, source: str) -> Any:
    """A number setting's value, if it is in range: a wrong one fails here, not in a consumer that retries
    its fetch forever (a lease of 0) or in a worker thread (a negative keep-alive)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        positive = name in _POSITIVE
        if not (0 < value if positive else 0 <= value) or value == math.inf:
            need = "more than 0" if positive else "0 or more"
            raise ConfigurationError(f"setting {name}={value!r} (from {source}) must be a finite number, {need}")
    return value


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


# query parameters redact_url masks: these names, and every name holding one of the words
_SECRET_PARAMETERS = frozenset({"pwd", "auth"})
_SECRET_WORDS = ("pass", "secret", "token")


def _secret_parameter(name: str) -> bool:
    name = name.lower()
    return name in _SECRET_PARAMETERS or any(word in name for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """``redis://user:secret@host/0?password=x`` -> ``redis://user:***@host/0?password=***``.

    Passwords never reach a log, whether in the user-info part or in a query parameter whose name
    holds ``pass``, ``secret`` or ``token`` (``password``, ``passwd``, ``sslpassword``, ...), or is
    ``pwd`` or httpsqs's ``auth``; nor does a NATS token (``nats://token@host``). A password with a
    bare ``/``, ``?`` or ``#`` (not percent-encoded) ends the authority early for urlsplit, and for
    the clients, which refuse the URL: then all before the last ``@`` is masked. A comma-separated
    list of URLs is redacted URL by URL.
    """
    if "," in url and url.count("://") > 1:
        return ",".join(redact_url(one.strip()) for one in url.split(","))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    scheme, _, rest = url.partition("://")
    if parts.netloc and parts.password is None and "@" in rest[len(parts.netloc):]:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    redacted = parts
    if parts.scheme in ("nats", "tls") and parts.username and parts.password is None:
        redacted = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1])
    elif parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        redacted = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(_secret_parameter(k) for k, _ in pairs):
        redacted = redacted._replace(query=urlencode(
            [(k, "***" if _secret_parameter(k) else v) for k, v in pairs], safe="*"))
    if redacted is parts:
        return url  # nothing secret: as given (urlunsplit would drop the "//" of sqlite:////abs/path.db)
    if not redacted.netloc:  # sqlite:///x.db?password=... keeps its empty authority
        return url.split("?", 1)[0] + ("?" + redacted.query if redacted.query else "")
    return urlunsplit(redacted)


settings = _Settings()


def patch_frame_config(**new_settings: Any) -> None:
    """Override settings from code; this has the last word over files and environment variables."""
    settings.patch(new_settings)


def data_dir_setting(name: str, subfolder: str) -> Path:
    """A folder setting whose empty default means ``<per-user data dir>/<subfolder>``."""
    configured = str(settings.get(name) or "")
    return Path(configured).expanduser() if configured else default_data_dir() / subfolder
