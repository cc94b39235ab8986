"""Decorator parameters (the seed's names, spellings included) and publish-time options.

Validation happens at decoration time: an unknown parameter, a malformed value, or a feature the
chosen broker cannot honour raises :class:`ConfigurationError` (a ``ValueError``). This module checks
the parameters of the consume loop itself; each feature checks its own parameters in its middleware
module (``check_params``, collected by :func:`funboost_like.middleware.base.param_checks`). The
caller passes both the broker table and the feature checks, so this module imports neither
``brokers`` nor ``middleware``.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import inspect
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from funboost_like.concurrency.shared import check_shared_pool
from funboost_like.core import timezones
from funboost_like.core.enums import BrokerEnum, ConcurrentModeEnum
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.message import OPTION_NAMES, option_problem
from funboost_like.core.runtime import threads_are_green

if TYPE_CHECKING:
    from funboost_like.brokers.base import Broker, Capabilities


@dataclass
class FunctionResultStatusPersistanceConfig:
    """Seed name kept. Whether to keep each call's status and result, and for how long."""

    is_save_status: bool = False
    is_save_result: bool = False
    expire_seconds: int = 7 * 24 * 3600

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ConfigurationError for a field of the wrong type, or an ``expire_seconds`` that is negative,
        NaN or infinite (a store's TTL must be a finite number of seconds)."""
        for name in ("is_save_status", "is_save_result"):
            if not isinstance(getattr(self, name), (bool, int)):
                raise ConfigurationError(f"function_result_status_persistance_conf.{name} must be True or False, "
                                         f"got {getattr(self, name)!r}")
        expire = self.expire_seconds
        if isinstance(expire, bool) or not isinstance(expire, (int, float)) or not 0 <= expire < math.inf:
            raise ConfigurationError("function_result_status_persistance_conf.expire_seconds must be a number >= 0 "
                                     f"(finite), got {expire!r}")


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
    # Not in the seed: a message whose consumer process died this many times while it was in flight is
    # dead-lettered as a poison message (None: never).
    max_crash_redeliveries: int | None = 3
    # Not in the seed: retries wait in the broker (nack with a delay) instead of running again at once:
    # ``retry_backoff`` seconds before the first retry, doubling up to ``retry_backoff_max``.
    retry_backoff: float = 0
    retry_backoff_max: float = 600
    retry_jitter: bool = True
    # funboost's name: broker options; here the queue's exchange (DESIGN §9): ``exchange_name``,
    # ``exchange_type`` (fanout|direct|topic), ``routing_key_for_bind``, ``routing_key_for_publish``.
    broker_exclusive_config: dict[str, Any] | None = None
    # Seed 002's cache mode: arguments JSON cannot carry pass by reference to a consumer in this process
    # (funboost_like.core.arg_cache).
    use_cache: bool = False

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


class BrokerTable(Protocol):
    """Where :func:`build_params` finds the broker class of a kind: :mod:`funboost_like.brokers.registry`,
    passed by the caller."""

    def resolve_kind(self, kind: BrokerEnum | int | str) -> BrokerEnum: ...

    def broker_class(self, kind: BrokerEnum | int | str) -> type[Broker]: ...


# A feature's check of its own parameters against the chosen broker's capabilities; raises ConfigurationError.
ParamsCheck = Callable[["ConsumerParams", "Capabilities"], None]


def build_params(queue_name: str, consuming_function: Callable[..., Any] | None, raw: dict[str, Any], *,
                 brokers: BrokerTable, checks: Iterable[ParamsCheck]) -> ConsumerParams:
    """Check and normalise the keyword arguments given to ``task_deco`` / ``get_consumer``.

    ``brokers`` resolves ``broker_kind`` to its class, whose capabilities ``checks`` (the features'
    own parameter checks) read.
    """
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
    _normalise(params, brokers, checks)
    return params


def _normalise(params: ConsumerParams, brokers: BrokerTable, checks: Iterable[ParamsCheck]) -> None:
    params.broker_kind = brokers.resolve_kind(params.broker_kind)
    # A kind not built yet, or a missing client library, fails here.
    capabilities = brokers.broker_class(params.broker_kind).capabilities
    if capabilities.queue_names is not None:
        capabilities.queue_names(params.queue_name)
    check_flags(params)
    check_concurrency(params)
    check_logging(params)
    params.function_result_status_persistance_conf = status_config(params.function_result_status_persistance_conf)
    if not isinstance(params.max_retry_times, int) or params.max_retry_times < 0:
        raise ConfigurationError(f"max_retry_times must be an int >= 0, got {params.max_retry_times!r}")
    for name in ("qps", "msg_schedule_time_intercal", "function_timeout", "retry_backoff", "retry_backoff_max"):
        check_non_negative(params, name)
    check_redelivery_limits(params, capabilities)
    check_green_threads(params, capabilities)
    if params.msg_schedule_time_intercal and not params.qps:
        params.qps = 1.0 / params.msg_schedule_time_intercal
    for check in checks:
        check(params, capabilities)
    if params.consuming_function is not None and not callable(params.consuming_function):
        raise ConfigurationError(f"consuming_function must be callable, got {params.consuming_function!r}")
    check_mode_fits_function(params)


_FLAGS = tuple(f.name for f in dataclasses.fields(ConsumerParams) if f.type == "bool")


def check_flags(params: ConsumerParams) -> None:
    """Every on/off parameter is True or False (the seed's 0 and 1 are taken too): a string such as
    ``"False"`` would otherwise turn a feature on."""
    for name in _FLAGS:
        value = getattr(params, name)
        if not isinstance(value, bool):
            if type(value) is not int or value not in (0, 1):
                raise ConfigurationError(f"{name} must be True or False, got {value!r}")
            setattr(params, name, bool(value))


def check_logging(params: ConsumerParams) -> None:
    """``log_level`` is a level number or name (made a number); ``logger_prefix`` is a string."""
    level = params.log_level
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise ConfigurationError(f"log_level must be a logging level such as logging.INFO (20) or 'INFO', "
                                 f"got {params.log_level!r}")
    params.log_level = level
    if not isinstance(params.logger_prefix, str):
        raise ConfigurationError(f"logger_prefix must be a string, got {params.logger_prefix!r}")


def status_config(conf: Any) -> FunctionResultStatusPersistanceConfig:
    """``function_result_status_persistance_conf``: the config object, a dict of its fields, or None (off)."""
    if conf is None:
        return FunctionResultStatusPersistanceConfig()
    if isinstance(conf, dict):
        try:
            conf = FunctionResultStatusPersistanceConfig(**conf)
        except TypeError as exc:
            raise ConfigurationError(f"function_result_status_persistance_conf: {exc}") from None
    if not isinstance(conf, FunctionResultStatusPersistanceConfig):
        raise ConfigurationError("function_result_status_persistance_conf must be a "
                                 f"FunctionResultStatusPersistanceConfig, a dict of its fields or None, got {conf!r}")
    conf.check()  # again: a field may have been changed since construction
    return conf


def check_concurrency(params: ConsumerParams) -> None:
    """``concurrent_mode`` and ``concurrent_num`` (the shared pool's size when one is given)."""
    try:
        params.concurrent_mode = ConcurrentModeEnum(int(params.concurrent_mode))
    except ValueError:
        raise ConfigurationError(
            f"concurrent_mode must be one of {list(ConcurrentModeEnum)}, got {params.concurrent_mode!r}"
        ) from None
    if params.concurrent_mode == ConcurrentModeEnum.SINGLE_THREAD:  # funboost's: one call at a time
        if params.specify_concurrent_pool is not None:
            raise ConfigurationError("specify_concurrent_pool is not used with concurrent_mode=SINGLE_THREAD")
        params.concurrent_num = 1
    if params.specify_concurrent_pool is not None:  # the seed: the pool's size, not concurrent_num, counts
        params.concurrent_num = check_shared_pool(params.specify_concurrent_pool, params.concurrent_mode)
    concurrent_num = params.concurrent_num
    if not isinstance(concurrent_num, int) or isinstance(concurrent_num, bool) or concurrent_num < 1:
        raise ConfigurationError(f"concurrent_num must be an int >= 1, got {params.concurrent_num!r}")


def check_green_threads(params: ConsumerParams, capabilities: Any) -> None:
    """GEVENT and EVENTLET, or threading patched by either, need a broker client that runs on green threads."""
    green = params.concurrent_mode in (ConcurrentModeEnum.GEVENT, ConcurrentModeEnum.EVENTLET) or threads_are_green()
    if green and not capabilities.green_threads:
        raise ConfigurationError(f"{params.broker.name} does not work under gevent or eventlet (its client's I/O "
                                 f"thread cannot run as a greenlet); use another client of the same server, or "
                                 f"threads without monkey-patching")


def check_redelivery_limits(params: ConsumerParams, capabilities: Any) -> None:
    """``max_crash_redeliveries`` is None or an int >= 1; ``retry_backoff`` needs a broker that delays."""
    limit = params.max_crash_redeliveries
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigurationError(f"max_crash_redeliveries must be None or an int >= 1, got {limit!r}")
    if params.retry_backoff and capabilities.delay == "none":
        raise ConfigurationError(f"retry_backoff needs a broker that delays messages; {params.broker.name} does not")


def check_non_negative(params: ConsumerParams, name: str) -> None:
    """Raise ConfigurationError unless the parameter ``name`` is a finite number >= 0 (``qps=inf`` would stop
    the fetcher, ``nan`` every comparison; JSON, the registry's records, has neither)."""
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigurationError(f"{name} must be a finite number >= 0, got {value!r}")


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
    routing_key: str | None = None  # through the queue's exchange (broker_exclusive_config), not in ``extra``
    use_cache: bool | None = None  # cache mode for this message (None: the decorator's use_cache)
    msg_expire_seconds: float | None = None  # the spelling the decorator accepts too: sets msg_expire_senconds

    def __post_init__(self) -> None:
        if self.msg_expire_seconds is not None:
            if self.msg_expire_senconds not in (None, self.msg_expire_seconds):
                raise ConfigurationError("msg_expire_seconds and msg_expire_senconds are one option; give one")
            self.msg_expire_senconds = self.msg_expire_seconds
        if self.countdown is not None and self.eta is not None:
            raise ConfigurationError("countdown and eta cannot both be set")
        for name in sorted(OPTION_NAMES):  # checked again by the consumer (a hand-written message)
            value = getattr(self, name, None)  # run_at is not one of these options: the publish sets it
            problem = option_problem(name, value) if value is not None else ""
            if problem:
                raise ConfigurationError(problem)
        if self.eta is not None and not isinstance(self.eta, datetime.datetime):
            raise ConfigurationError(f"eta must be a datetime, got {type(self.eta).__name__}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ConfigurationError(f"priority must be an int, got {self.priority!r}")
        if self.routing_key is not None and not isinstance(self.routing_key, str):
            raise ConfigurationError(f"routing_key must be a string, got {self.routing_key!r}")

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
