"""Decorator parameters (the seed's names, spellings included) and publish-time options.

Validation happens at decoration time: an unknown parameter, a malformed value, or a feature the
chosen broker cannot honour raises :class:`ConfigurationError` (a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from funboost_like.core import timezones
from funboost_like.core.enums import BrokerEnum, ConcurrentModeEnum
from funboost_like.core.errors import ConfigurationError


@dataclass
class FunctionResultStatusPersistanceConfig:
    """Seed name kept. Whether to keep each call's status and result, and for how long."""

    is_save_status: bool = False
    is_save_result: bool = False
    expire_seconds: int = 7 * 24 * 3600


@dataclass
class ConsumerParams:
    """Every parameter ``task_deco`` / ``get_consumer`` accept, with the seed's names and defaults."""

    queue_name: str
    consuming_function: Callable[..., Any] | None = None
    function_timeout: float = 0
    concurrent_num: int = 50
    specify_concurrent_pool: Any = None
    specify_async_loop: Any = None
    concurrent_mode: int = ConcurrentModeEnum.THREADING
    max_retry_times: int = 3
    log_level: int = logging.DEBUG
    is_print_detail_exception: bool = True
    msg_schedule_time_intercal: float = 0.0
    qps: float = 0
    is_using_distributed_frequency_control: bool = False
    msg_expire_senconds: float = 0
    is_send_consumer_hearbeat_to_redis: bool = False
    logger_prefix: str = ""
    create_logger_file: bool = False
    do_task_filtering: bool = False
    task_filtering_expire_seconds: float = 0
    is_consuming_function_use_multi_params: bool = True
    is_do_not_run_by_specify_time_effect: bool = False
    do_not_run_by_specify_time: tuple[str, str] = ("10:00:00", "22:00:00")
    schedule_tasks_on_main_thread: bool = False
    function_result_status_persistance_conf: FunctionResultStatusPersistanceConfig = field(
        default_factory=FunctionResultStatusPersistanceConfig
    )
    is_using_rpc_mode: bool = False
    broker_kind: int = BrokerEnum.PERSISTQUEUE

    @property
    def broker(self) -> BrokerEnum:
        return BrokerEnum(self.broker_kind)


# Correctly spelled aliases accepted beside the seed's spellings.
ALIASES = {
    "msg_expire_seconds": "msg_expire_senconds",
    "msg_schedule_time_interval": "msg_schedule_time_intercal",
    "function_result_status_persistence_conf": "function_result_status_persistance_conf",
    "is_send_consumer_heartbeat_to_redis": "is_send_consumer_hearbeat_to_redis",
}

PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(ConsumerParams))

# Parameters this version accepts by name but whose feature is not built yet: a non-default value
# raises instead of being silently ignored. Each later feature removes its line.
NOT_BUILT_YET: dict[str, str] = {
    "is_send_consumer_hearbeat_to_redis": "consumer heartbeats in Redis",
    "specify_concurrent_pool": "shared concurrency pools",
}

_BUILT_CONCURRENT_MODES = set(ConcurrentModeEnum)


def build_params(queue_name: str, consuming_function: Callable[..., Any] | None, raw: dict[str, Any]) -> ConsumerParams:
    """Check and normalise the keyword arguments given to ``task_deco`` / ``get_consumer``."""
    if not isinstance(queue_name, str) or not queue_name:
        raise ConfigurationError(f"queue_name must be a non-empty string, got {queue_name!r}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        canonical = ALIASES.get(name, name)
        if canonical not in PARAM_NAMES or canonical in ("queue_name", "consuming_function"):
            guess = difflib.get_close_matches(name, sorted(PARAM_NAMES | set(ALIASES)), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            raise ConfigurationError(f"unknown parameter {name!r} for queue {queue_name!r}{hint}")
        if canonical in values:
            raise ConfigurationError(f"parameter {canonical!r} given twice (once through an alias)")
        values[canonical] = value
    params = ConsumerParams(queue_name=queue_name, consuming_function=consuming_function, **values)
    _normalise(params)
    defaults = ConsumerParams(queue_name=queue_name)
    for name, feature in NOT_BUILT_YET.items():
        if getattr(params, name) != getattr(defaults, name):
            raise ConfigurationError(f"{name}={getattr(params, name)!r}: {feature} are not built yet in this version")
    return params


def _normalise(params: ConsumerParams) -> None:
    from funboost_like.brokers.registry import broker_class, resolve_kind

    params.broker_kind = resolve_kind(params.broker_kind)
    broker_class(params.broker_kind)  # a kind not built yet, or a missing client library, fails here
    from funboost_like.core.stores import require_key_value_store

    for name in ("is_using_rpc_mode", "do_task_filtering"):
        if getattr(params, name):  # results and filters live in the broker's key-value records
            require_key_value_store(params.broker_kind, name)
    try:
        params.concurrent_mode = ConcurrentModeEnum(int(params.concurrent_mode))
    except ValueError:
        raise ConfigurationError(
            f"concurrent_mode must be one of {list(ConcurrentModeEnum)}, got {params.concurrent_mode!r}"
        ) from None
    if params.concurrent_mode not in _BUILT_CONCURRENT_MODES:
        raise ConfigurationError(
            f"concurrent_mode={ConcurrentModeEnum(params.concurrent_mode).name} is not built yet in this version; "
            "use THREADING"
        )
    concurrent_num = params.concurrent_num
    if not isinstance(concurrent_num, int) or isinstance(concurrent_num, bool) or concurrent_num < 1:
        raise ConfigurationError(f"concurrent_num must be an int >= 1, got {params.concurrent_num!r}")
    if not isinstance(params.max_retry_times, int) or params.max_retry_times < 0:
        raise ConfigurationError(f"max_retry_times must be an int >= 0, got {params.max_retry_times!r}")
    for name in ("qps", "msg_schedule_time_intercal", "msg_expire_senconds", "function_timeout",
                 "task_filtering_expire_seconds"):
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigurationError(f"{name} must be a number >= 0, got {value!r}")
    if params.msg_schedule_time_intercal and not params.qps:
        params.qps = 1.0 / params.msg_schedule_time_intercal
    from funboost_like.middleware.time_window import parse_window

    parse_window(params.do_not_run_by_specify_time)  # a malformed window fails at decoration time
    if isinstance(params.log_level, str):
        level = logging.getLevelName(params.log_level.upper())
        if not isinstance(level, int):
            raise ConfigurationError(f"log_level {params.log_level!r} is not a logging level")
        params.log_level = level
    if params.consuming_function is not None and not callable(params.consuming_function):
        raise ConfigurationError(f"consuming_function must be callable, got {params.consuming_function!r}")
    check_mode_fits_function(params)


def check_mode_fits_function(params: ConsumerParams) -> None:
    """An 'async def' function needs concurrent_mode=ASYNC, and ASYNC needs one."""
    function = params.consuming_function
    if function is None:
        return
    is_async = inspect.iscoroutinefunction(function)
    if is_async and params.concurrent_mode != ConcurrentModeEnum.ASYNC:
        raise ConfigurationError(f"{function.__qualname__} is an 'async def' function: use concurrent_mode=ASYNC")
    if not is_async and params.concurrent_mode == ConcurrentModeEnum.ASYNC:
        raise ConfigurationError(
            f"concurrent_mode=ASYNC runs 'async def' functions; {function.__qualname__} is not one"
        )
    if params.specify_async_loop is not None and params.concurrent_mode != ConcurrentModeEnum.ASYNC:
        raise ConfigurationError("specify_async_loop is only used with concurrent_mode=ASYNC")


@dataclass
class PriorityConsumingControlConfig:
    """Publish-time options for one message (seed name kept). Use with ``publish(..., priority_control_config=)``.

    ``countdown`` (seconds after publishing) and ``eta`` (a datetime) delay the run; only one of the
    two may be set. ``priority`` orders delivery on brokers that support it (higher first).
    """

    function_timeout: float | None = None
    max_retry_times: int | None = None
    is_print_detail_exception: bool | None = None
    msg_expire_senconds: float | None = None
    is_using_rpc_mode: bool | None = None
    countdown: float | None = None
    eta: datetime.datetime | None = None
    misfire_grace_time: float | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.countdown is not None and self.eta is not None:
            raise ConfigurationError("countdown and eta cannot both be set")
        if self.countdown is not None and (isinstance(self.countdown, bool) or self.countdown < 0):
            raise ConfigurationError(f"countdown must be >= 0, got {self.countdown!r}")
        if self.eta is not None and not isinstance(self.eta, datetime.datetime):
            raise ConfigurationError(f"eta must be a datetime, got {type(self.eta).__name__}")
        if self.misfire_grace_time is not None and self.misfire_grace_time < 1:
            raise ConfigurationError("misfire_grace_time must be None or a number >= 1")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ConfigurationError(f"priority must be an int, got {self.priority!r}")

    def not_before(self, publish_time: float) -> float | None:
        """The UNIX time before which the message must not run, or None."""
        if self.countdown is not None:
            return publish_time + float(self.countdown)
        if self.eta is not None:
            return timezones.timestamp(self.eta)  # naive: in the TIMEZONE setting ("" = the machine's local time)
        return None

    def to_extra(self, publish_time: float) -> dict[str, Any]:
        """The options that travel in the message's ``extra``."""
        extra: dict[str, Any] = {}
        for name in ("function_timeout", "max_retry_times", "is_print_detail_exception", "msg_expire_senconds",
                     "is_using_rpc_mode", "countdown", "misfire_grace_time"):
            value = getattr(self, name)
            if value is not None:
                extra[name] = value
        if self.eta is not None:
            extra["eta"] = self.eta.isoformat()
        run_at = self.not_before(publish_time)
        if run_at is not None:
            extra["run_at"] = run_at
        if self.priority:
            extra["priority"] = self.priority
        return extra
